"""Readers, metrics and output files of the benchmark data layer, on tiny fixtures in the real layouts."""
from __future__ import annotations

import json
import random

import pytest
import torch

from pumer_plug.evaluation.tasks.answer_space import AnswerSpace, map_labels, vqa_score, vqa_soft_targets
from pumer_plug.evaluation.tasks.arrow_tables import (
    read_f30k_arrow,
    read_nlvr2_arrow,
    read_snli_ve_arrow,
    read_vqav2_arrow,
)
from pumer_plug.evaluation.tasks.classification_metric import label_accuracy, nlvr2_consistency
from pumer_plug.evaluation.tasks.custom import read_custom
from pumer_plug.evaluation.tasks.data_files import DataError, ImageDecoder, decode_image, safe_join
from pumer_plug.evaluation.tasks.flickr30k import read_flickr30k
from pumer_plug.evaluation.tasks.nlvr2 import read_nlvr2
from pumer_plug.evaluation.tasks.predictions import (
    RunOutputs,
    read_label_predictions,
    read_vqa_results,
    write_label_predictions,
    write_run_info,
    write_vqa_results,
)
from pumer_plug.evaluation.tasks.retrieval_metric import retrieval_recall
from pumer_plug.evaluation.tasks.snli_ve import read_snli_ve
from pumer_plug.evaluation.tasks.subset import seeded_subset
from pumer_plug.evaluation.tasks.vqa_metric import soft_score_accuracy, vqa_accuracy
from pumer_plug.evaluation.tasks.vqav2 import read_vqav2
from tests.fixtures_benchmarks import (
    VQA_FIXTURE_ANSWERS,
    write_corrupt_image,
    write_custom,
    write_f30k_arrow,
    write_flickr30k,
    write_nlvr2,
    write_nlvr2_arrow,
    write_snli_arrow,
    write_snli_ve,
    write_vqav2,
    write_vqav2_arrow,
)


# ---------------------------------------------------------------- VQAv2
def test_vqav2_reads_official_layout(tmp_path):
    split = read_vqav2(write_vqav2(tmp_path, "val", num_questions=6), "val")
    assert split.has_answers and len(split.examples) == 6
    ex = split.examples[1]
    assert ex.question_id == 42 * 1000 + 1 and ex.image_id == 42
    assert ex.image == tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"
    assert len(ex.answers) == 10 and ex.answer_type == "number" and ex.question_type == "how many"
    assert decode_image(ex.image).size == (48, 40)


def test_vqav2_fixture_scores_by_hand_and_round_trips_through_results_file(tmp_path):
    split = read_vqav2(write_vqav2(tmp_path / "data", "val"), "val")
    qids = [ex.question_id for ex in split.examples]
    # fixture questions 0..5 and the hand-computed score of each prediction (see VQA_FIXTURE_QUESTIONS):
    # yes vs 10 yes -> 1.0 | "3": 3 of 10 -> 0.9 | "dark red": 1 -> 0.3 | "cat": 2 -> 0.6 | "yes": 1 -> 0.3 | "3": 3 -> 0.9
    answers = dict(zip(qids, ["yes", "3", "dark red", "cat", "yes", "3"]))
    outputs = RunOutputs(tmp_path / "out")
    path = write_vqa_results(outputs, "pumer", "val", answers)
    assert path == tmp_path / "out" / "pumer" / "vqav2_val_results.json"
    assert json.loads(path.read_text())[0] == {"question_id": qids[0], "answer": "yes"}
    score = vqa_accuracy(read_vqa_results(path), split.examples)
    assert score.overall == pytest.approx((1.0 + 0.9 + 0.3 + 0.6 + 0.3 + 0.9) / 6)
    assert score.per_answer_type == pytest.approx({"yes/no": 0.65, "number": 0.9, "other": 0.45})


def test_vqav2_test_dev_has_no_answers(tmp_path):
    split = read_vqav2(write_vqav2(tmp_path, "test-dev", num_questions=4), "test-dev")
    assert not split.has_answers and split.examples[0].answers == ()
    assert split.examples[0].image.parent.name == "test2015"


def test_vqav2_missing_file_names_file_and_layout(tmp_path):
    write_vqav2(tmp_path, "val")
    (tmp_path / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(DataError, match=r"missing file .*v2_mscoco_val2014_annotations.json; expected layout: "):
        read_vqav2(tmp_path, "val")


def test_vqav2_question_annotation_mismatch_names_first_id(tmp_path):
    write_vqav2(tmp_path, "val", num_questions=4)
    path = tmp_path / "v2_mscoco_val2014_annotations.json"
    data = json.loads(path.read_text())
    dropped = data["annotations"].pop(2)["question_id"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"question {dropped} in .* has no annotation"):
        read_vqav2(tmp_path, "val")
    data["annotations"].append({**data["annotations"][0], "question_id": 999})
    data["annotations"].insert(2, {**data["annotations"][0], "question_id": dropped, "image_id": 7})
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"question {dropped}: image 1042 in .* but 7 in"):
        read_vqav2(tmp_path, "val")
    data["annotations"][2]["image_id"] = 1042
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="annotation for question 999 .* has no question"):
        read_vqav2(tmp_path, "val")


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    split = read_vqav2(write_vqav2(tmp_path, "val"), "val")
    bad = write_corrupt_image(split.examples[0].image)
    with pytest.raises(DataError, match=f"corrupt image {bad}"):
        decode_image(bad)
    decoder = ImageDecoder(skip_bad_images=True)
    assert decoder(bad) is None and decoder(split.examples[2].image) is not None
    assert decoder.num_skipped == 1 and decoder.skipped == [str(bad)]
    bad.unlink()
    with pytest.raises(DataError, match="missing image"):
        decoder(bad, layout="somewhere")  # a missing file is a layout problem: never skipped


# ---------------------------------------------------------------- NLVR2, SNLI-VE, Flickr30k
@pytest.mark.parametrize("split", ["dev", "train"])
def test_nlvr2_reads_pairs_named_from_identifier(tmp_path, split):
    examples = read_nlvr2(write_nlvr2(tmp_path, split, num_pairs=3), split)
    assert len(examples) == 6
    ex = examples[3]
    assert ex.identifier == f"{split}-101-0-1" and ex.label == "True"
    left, right = ex.images
    assert left.name == f"{split}-101-0-img0.png" and right.name == f"{split}-101-0-img1.png"
    assert left.is_file() and right.is_file()
    assert (left.parent.parent.name == "train") == (split == "train")  # images/train/<directory>/


def test_nlvr2_bad_label_and_escaping_identifier(tmp_path):
    write_nlvr2(tmp_path, "dev", num_pairs=1)
    path = tmp_path / "dev.json"
    lines = path.read_text().splitlines()
    path.write_text(lines[0].replace('"True"', '"maybe"') + "\n")
    with pytest.raises(DataError, match="dev-100-0-0 has label 'maybe'"):
        read_nlvr2(tmp_path, "dev")
    record = json.loads(lines[0])
    record["identifier"] = "../dev-100-0-0"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match="identifier"):
        read_nlvr2(tmp_path, "dev")


def test_snli_ve_reads_hypotheses_and_refuses_escaping_ids(tmp_path):
    examples = read_snli_ve(write_snli_ve(tmp_path, "test", num_images=2), "test")
    assert len(examples) == 6
    assert [ex.label for ex in examples[:3]] == ["entailment", "neutral", "contradiction"]
    assert examples[3].image == tmp_path / "flickr30k_images" / "1000092796.jpg" and examples[3].image.is_file()
    path = tmp_path / "snli_ve_test.jsonl"
    record = json.loads(path.read_text().splitlines()[0])
    path.write_text(json.dumps({**record, "Flickr30K_ID": "../../etc/passwd"}) + "\n")
    with pytest.raises(DataError, match="leaves the data folder"):
        read_snli_ve(tmp_path, "test")


def test_flickr30k_karpathy_split_and_subset(tmp_path):
    split = read_flickr30k(write_flickr30k(tmp_path), "test")
    assert len(split.images) == 3 and len(split.texts) == 15
    assert split.text_image == tuple(i for i in range(3) for _ in range(5))
    assert split.texts[5] == "Caption 0 of image 4."  # train 0-1, val 2, test 3-5
    sub = split.subset([2, 0])
    assert sub.image_ids == (split.image_ids[2], split.image_ids[0]) and sub.text_image == (1,) * 5 + (0,) * 5


# ---------------------------------------------------------------- arrow tables
def test_vqav2_arrow_soft_scores(tmp_path):
    split = read_vqav2_arrow(write_vqav2_arrow(tmp_path, "val", num_images=3), "val")
    assert split.has_answers and len(split.examples) == 6
    ex = split.examples[1]  # 6x "2", 3x "3", 1x "two" (not a label): ViLT scores 1.0, 0.9
    assert ex.question_id == 42001 and isinstance(ex.image, bytes)
    assert dict(ex.answer_scores) == {"2": 1.0, "3": 0.9}
    assert decode_image(ex.image, name="vqav2_val.arrow row 0").size == (48, 40)
    preds = {e.question_id: "yes" for e in split.examples}
    preds[42001] = "3"
    # question 0: yes 1.0; question 1: "3" 0.9; question 4 (9x no, 1x yes): 0.3; others: 0
    assert soft_score_accuracy(preds, split.examples).overall == pytest.approx((1.0 + 0.9 + 0.3) / 6)


def test_other_arrow_tables(tmp_path):
    nlvr2 = read_nlvr2_arrow(write_nlvr2_arrow(tmp_path, "dev", num_pairs=2), "dev")
    assert len(nlvr2) == 4 and nlvr2[1].identifier == "dev-100-0#1" and nlvr2[1].label == "False"
    assert all(isinstance(image, bytes) for image in nlvr2[0].images)
    snli = read_snli_ve_arrow(write_snli_arrow(tmp_path, "test", num_images=2), "test")
    assert [ex.label for ex in snli[3:6]] == ["neutral", "contradiction", "entailment"]
    f30k = read_f30k_arrow(write_f30k_arrow(tmp_path, "test", num_images=3), "test")
    assert len(f30k.texts) == 15 and f30k.text_image[-1] == 2 and isinstance(f30k.images[2], bytes)


def test_arrow_missing_column_is_named(tmp_path):
    import pyarrow as pa

    table = pa.table({"image": [b""], "questions": [["q"]]})
    with pa.OSFile(str(tmp_path / "vqav2_val.arrow"), "wb") as sink, pa.RecordBatchFileWriter(sink, table.schema) as w:
        w.write_table(table)
    with pytest.raises(DataError, match="lacks column 'answers'"):
        read_vqav2_arrow(tmp_path, "val")


# ---------------------------------------------------------------- custom JSON lines
def test_custom_vqa_and_classification(tmp_path):
    vqa = read_custom(write_custom(tmp_path / "v", "val", "vqa"), "val")
    assert vqa.kind == "vqa" and vqa.examples[0].answers == ("red", "red", "blue")
    # 3 answers: leave-one-out over 3 subsets of 2: "red" -> (1/3 + 1/3 + 2/3) / 3
    score = vqa_accuracy({"q0": "red"}, vqa.examples[:1])
    assert score.overall == pytest.approx(4 / 9)
    # 4 copies of the sole answer: every subset of 3 has 3 matches -> 1.0
    assert vqa_accuracy({"q1": "blue"}, vqa.examples[1:2]).overall == 1.0
    path = write_vqa_results(RunOutputs(tmp_path / "out"), "dense", "val", {"q1": "blue", "q0": "red"})
    assert read_vqa_results(path) == {"q0": "red", "q1": "blue"}
    (tmp_path / "v" / "val.jsonl").write_text(json.dumps({"id": "q", "image": "images/img0.jpg", "text": "t", "answers": ["red"]}) + "\n")
    with pytest.raises(DataError, match="at least 2 answers"):
        read_custom(tmp_path / "v", "val")
    cls = read_custom(write_custom(tmp_path / "c", "val", "classification"), "val")
    assert cls.kind == "classification" and cls.labels == ("False", "True") and len(cls.examples[1].images) == 2


@pytest.mark.parametrize("bad, message", [
    ({"id": "x", "text": "t", "image": "../outside.jpg", "label": "a"}, "leaves the data folder"),
    ({"id": "x", "text": "t", "image": "/etc/passwd", "label": "a"}, "absolute"),
    ({"id": "x", "text": "t", "image": "i.jpg", "answers": ["a", "a"]}, "earlier lines are classification"),
    ({"id": "p0", "text": "t", "image": "i.jpg", "label": "a"}, "id p0 appears twice"),
    ({"id": "x", "text": "t", "image": "i.jpg", "label": "a", "answers": ["a"]}, "exactly one of"),
])
def test_custom_refuses_bad_lines_naming_them(tmp_path, bad, message):
    write_custom(tmp_path, "val", "classification", num_examples=1)
    with (tmp_path / "val.jsonl").open("a") as f:
        f.write(json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=message):
        read_custom(tmp_path, "val")


def test_safe_join(tmp_path):
    assert safe_join(tmp_path, "a/b.jpg") == tmp_path / "a" / "b.jpg"
    for bad in ("../x", "a/../../x", "/abs", "C:\\x", "a\\..\\..\\x", ""):
        with pytest.raises(DataError):
            safe_join(tmp_path, bad)


def test_records_pickle_for_dataloader_workers(tmp_path):
    """Workers started with ``spawn`` pickle the dataset: every reader's records must survive it."""
    import pickle

    splits = [
        read_vqav2(write_vqav2(tmp_path / "a"), "val").examples,
        read_nlvr2(write_nlvr2(tmp_path / "b"), "dev"),
        read_snli_ve(write_snli_ve(tmp_path / "c"), "test"),
        read_custom(write_custom(tmp_path / "d"), "val").examples,
        read_vqav2_arrow(write_vqav2_arrow(tmp_path / "e"), "val").examples,
        read_nlvr2_arrow(write_nlvr2_arrow(tmp_path / "f"), "dev"),
        read_snli_ve_arrow(write_snli_arrow(tmp_path / "g"), "test"),
        read_f30k_arrow(write_f30k_arrow(tmp_path / "h"), "test").images,
    ]
    for records in splits:
        copy = pickle.loads(pickle.dumps(records))
        assert len(copy) == len(records) and copy[-1] == records[-1]


# ---------------------------------------------------------------- metrics and outputs
def test_retrieval_recall_hand_computed():
    # 2 images x 4 captions (2 each). Columns: t0, t1 describe image 0; t2, t3 image 1.
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2],
                           [0.5, 0.9, 0.7, 0.3]])
    r = retrieval_recall(scores, [0, 0, 1, 1], ks=(1, 2))
    # text->image top-1: t0 -> img0 yes, t1 -> img1 no, t2 -> img0 no, t3 -> img1 yes
    assert r.text_to_image == {1: 0.5, 2: 1.0}
    # image->text top-1: img0 -> t0 (own) yes, img1 -> t1 (image 0's) no; top-2 for img1 has t2
    assert r.image_to_text == {1: 0.5, 2: 1.0}
    ties = retrieval_recall(torch.zeros(2, 4), [0, 0, 1, 1], ks=(1,))  # ties: lower index first
    assert ties.text_to_image == {1: 0.5} and ties.image_to_text == {1: 0.5}
    # re-ranking only a first stage's top entries: the rest are -inf and rank last
    reranked = scores.clone()
    reranked[1, 1] = float("-inf")  # img1 no longer outranks img0 for t1, nor t1 outranks t2 for img1
    assert retrieval_recall(reranked, [0, 0, 1, 1], ks=(1,)).as_dict() == pytest.approx(
        {"ir_r1": 0.75, "tr_r1": 1.0, "rsum": 175.0})


def _loop_recall(scores, text_image, k):
    n_img, n_txt = len(scores), len(scores[0])
    ir = sum(sum(1 for i in range(n_img) if scores[i][t] > scores[text_image[t]][t]
                 or (scores[i][t] == scores[text_image[t]][t] and i < text_image[t])) < k for t in range(n_txt))
    tr = 0
    for i in range(n_img):
        ranks = [sum(1 for u in range(n_txt) if scores[i][u] > scores[i][t] or (scores[i][u] == scores[i][t] and u < t))
                 for t in range(n_txt) if text_image[t] == i]
        tr += min(ranks) < k
    return ir / n_txt, tr / n_img


def test_retrieval_recall_matches_loops_on_random_scores():
    rng = random.Random(0)
    for _ in range(20):
        n_img = rng.randint(1, 6)
        text_image = list(range(n_img)) + [rng.randrange(n_img) for _ in range(rng.randint(0, 8))]
        scores = [[rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in text_image] for _ in range(n_img)]
        r = retrieval_recall(torch.tensor(scores), text_image, ks=(1, 2, 5))
        for k in (1, 2, 5):
            assert (r.text_to_image[k], r.image_to_text[k]) == pytest.approx(_loop_recall(scores, text_image, k))


def test_retrieval_recall_refuses_uncaptioned_image():
    with pytest.raises(DataError, match="image 1 has no caption"):
        retrieval_recall(torch.zeros(2, 2), [0, 0])


def test_label_accuracy_and_nlvr2_consistency():
    gold = {"dev-1-0-0": "True", "dev-1-1-0": "False", "dev-1-0-1": "True", "dev-1-1-1": "True"}
    pred = {"dev-1-0-0": "True", "dev-1-1-0": "False", "dev-1-0-1": "True", "dev-1-1-1": "False"}
    score = label_accuracy(pred, gold)
    assert (score.accuracy, score.num_correct) == (0.75, 3) and score.per_class == {"False": 1.0, "True": 2 / 3}
    # sentence 0 (dev-1--0) right on both pairs, sentence 1 (dev-1--1) wrong on one -> 1 of 2 consistent
    assert nlvr2_consistency(pred, gold) == 0.5
    with pytest.raises(DataError, match="no prediction for example 'dev-1-1-1'"):
        label_accuracy({k: v for k, v in pred.items() if k != "dev-1-1-1"}, gold)


def test_label_predictions_csv_is_the_official_nlvr2_format(tmp_path):
    outputs = RunOutputs(tmp_path)
    path = write_label_predictions(outputs, "dense", "nlvr2", "dev", {"dev-1-0-0": "True", "dev-1-1-0": "False"})
    assert path.read_text() == "dev-1-0-0,True\ndev-1-1-0,False\n"
    assert read_label_predictions(path) == {"dev-1-0-0": "True", "dev-1-1-0": "False"}


def test_outputs_never_replace_a_file_the_run_did_not_create(tmp_path):
    (tmp_path / "pumer").mkdir()
    theirs = tmp_path / "pumer" / "vqav2_val_results.json"
    theirs.write_text("[]")
    with pytest.raises(DataError, match="exists and was not written by this run"):
        write_vqa_results(RunOutputs(tmp_path), "pumer", "val", {1: "yes"})
    assert theirs.read_text() == "[]"
    outputs = RunOutputs(tmp_path, overwrite=True)
    write_vqa_results(outputs, "pumer", "val", {1: "yes"})
    assert outputs.replaced == [theirs]
    write_vqa_results(outputs, "pumer", "val", {1: "no"})  # its own file: rewritten freely
    assert read_vqa_results(theirs) == {1: "no"} and outputs.replaced == [theirs]
    with pytest.raises(DataError, match="plain file name"):
        outputs.write_text("../up", "x.json", "")
    info = write_run_info(outputs, "pumer", {"examples": "2 of 6 questions, seed 0"})
    assert json.loads(info.read_text())["examples"] == "2 of 6 questions, seed 0"


def test_seeded_subset():
    a, b = seeded_subset(214354, 2000, seed=0, unit="questions"), seeded_subset(214354, 2000, seed=0, unit="questions")
    assert a == b and a.describe() == "2000 of 214354 questions, seed 0"
    assert list(a.indices) == sorted(set(a.indices)) and len(a.indices) == 2000
    assert seeded_subset(214354, 2000, seed=1).indices != a.indices
    assert seeded_subset(5, None, unit="pairs").describe() == "all 5 pairs"
    assert seeded_subset(10, 3, seed=0).take(list("abcdefghij")) == [list("abcdefghij")[i] for i in seeded_subset(10, 3).indices]
    with pytest.raises(DataError, match="more than the 5 examples"):
        seeded_subset(5, 6)


def test_answer_space_and_vqa_soft_targets():
    space = AnswerSpace.from_id2label({"0": "yes", "1": "no", "2": "2"})
    ids, coverage = map_labels(["yes", "maybe", "2", "maybe", "never"], space)
    assert ids == [0, None, 2, None, None]
    assert (coverage.num_total, coverage.num_missing, coverage.missing_examples) == (5, 3, ("maybe", "never"))
    assert "3 of 5 answers are not in the model's label space" in coverage.describe()
    assert [vqa_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    targets = vqa_soft_targets(["2"] * 6 + ["3"] * 3 + ["yes"], space)  # "3" is not a label
    assert (targets.label_ids, targets.scores, targets.num_unmapped) == ((2, 0), (1.0, 0.3), 1)
    assert targets.dense(3).tolist() == pytest.approx([0.3, 0.0, 1.0])
    with pytest.raises(DataError, match="ids must be 0..1"):
        AnswerSpace.from_id2label({0: "a", 2: "b"})
    assert set(VQA_FIXTURE_ANSWERS) >= {"yes", "no", "2", "3"}
