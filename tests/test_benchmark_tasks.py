"""Benchmark tasks end to end: a user-made tiny ViLT directory (model + processor saved with
``save_pretrained``) and data folders in the public layouts, through ``pumer-plug compare``/``finetune``.

The VQA accuracy of the written predictions is recomputed here by an independent, deliberately
plain implementation of the official rules (not :mod:`vqa_metric`), and must equal the printed one.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pumer_plug.cli import main
from tests import fixtures_benchmarks as fx

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
    {w for q in fx.VQA_FIXTURE_QUESTIONS for w in re.findall(r"\w+|[^\w\s]", q[0].lower())}
    | {"a", "the", "cat", "dog", "two", "left", "right", "image", "man", "is", "there"})
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=16, max_position_embeddings=16, vocab_size=len(VOCAB))
METHOD_CONFIGS = {"pumer": {"reduction_layers": [1], "prune_ratio": 0.2, "image_merge_ratio": 0.2},
                  "tome": {"r": 2}}


def save_tiny_vilt(path: Path, cls_name: str, labels: tuple[str, ...], **overrides) -> Path:
    """Writes a random-init ViLT and a locally built ViltProcessor (32 px images) to ``path``."""
    import torch
    import transformers
    from transformers import BertTokenizerFast, ViltConfig, ViltImageProcessor, ViltProcessor

    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)  # transformers 5 ignores vocab_file= (all [UNK])
    image_processor = ViltImageProcessor(size={"shortest_edge": 32}, size_divisor=16)
    config = ViltConfig(**{**TINY, **overrides}, id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    torch.manual_seed(0)
    getattr(transformers, cls_name)(config).save_pretrained(path)
    ViltProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def method_configs(tmp_path: Path) -> list[str]:
    out = []
    for method, config in METHOD_CONFIGS.items():
        file = tmp_path / f"{method}.json"
        file.write_text(json.dumps(config))
        out += ["--config", f"{method}={file}"]
    return out


# -- an independent VQA accuracy (official rules, written plainly) -------------------------------------
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def _normalize(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = re.sub(r"(?!<=\d)(\.)(?!\d)", "", text)
    for p in ';/[]"{}()=+\\_-><@`,?!':
        text = text.replace(p, "" if (p + " " in text or " " + p in text) else " ")
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in ("a", "an", "the")]
    return " ".join(words)


def plain_vqa_accuracy(answers: dict, annotations: list[dict]) -> float:
    total = 0.0
    for ann in annotations:
        gts = [a["answer"].strip() for a in ann["answers"]]
        pred = answers[ann["question_id"]].strip()
        if len(set(gts)) > 1:
            gts, pred = [_normalize(g) for g in gts], _normalize(pred)
        accs = []
        for i in range(len(gts)):
            others = gts[:i] + gts[i + 1:]
            accs.append(min(1.0, sum(g == pred for g in others) / 3))
        total += sum(accs) / len(accs)
    return total / len(annotations)


@pytest.fixture(scope="module")
def vqa_model(tmp_path_factory) -> Path:
    return save_tiny_vilt(tmp_path_factory.mktemp("models") / "vilt-vqa", "ViltForQuestionAnswering", fx.VQA_FIXTURE_ANSWERS)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compare_vqav2_writes_official_predictions_whose_accuracy_equals_the_printed_one(tmp_path, vqa_model, capsys):
    data = fx.write_vqav2(tmp_path / "vqav2", "val", num_questions=8)
    output = tmp_path / "out"
    code, out, err = run_cli(["compare", "--task", "vqav2", "--data-dir", str(data), "--model", str(vqa_model),
                              "--methods", "dense,pumer,tome", *method_configs(tmp_path), "--batch-size", "4",
                              "--rounds", "1", "--timing-batches", "1", "--output", str(output), "--limit", "6"], capsys)
    assert code == 0, err
    annotations = json.loads((data / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    rows = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["dense", "pumer", "tome"]
    assert "6 of 8 questions, seed 0" in out
    for row in rows:
        name = row["method"]
        results = json.loads((output / name / "vqav2_val_results.json").read_text())
        answers = {r["question_id"]: r["answer"] for r in results}
        assert len(answers) == 6 and set(answers) <= {a["question_id"] for a in annotations}
        expected = plain_vqa_accuracy(answers, [a for a in annotations if a["question_id"] in answers])
        assert row["accuracy"] == pytest.approx(expected, abs=1e-12)
        info = json.loads((output / name / "run_info.json").read_text())
        assert info["examples"] == "6 of 8 questions, seed 0"
        assert f"{100 * row['accuracy']:.2f}" in out  # the printed table shows the same number
    distinct = {x["answer"] for q in annotations if q["question_id"] in answers for x in q["answers"]}
    missing = sorted(distinct - set(fx.VQA_FIXTURE_ANSWERS))
    assert (f"label_coverage: {len(missing)} of {len(distinct)} answers are not in the model's label space "
            f"(e.g. {', '.join(map(repr, missing))})") in out  # distinct answers, in a stable order


def test_finetune_vqav2_lowers_the_training_loss(tmp_path, vqa_model, capsys):
    data = fx.write_vqav2(tmp_path / "vqav2", "train", num_questions=12)
    fx.write_vqav2(data, "val", num_questions=6)
    output = tmp_path / "ft"
    code, out, err = run_cli(["finetune", "--task", "vqav2", "--data-dir", str(data), "--model", str(vqa_model),
                              "--method", "pumer", "--config", str(method_configs(tmp_path)[1].split("=", 1)[1]),
                              "--epochs", "4", "--patience", "4", "--train-batch-size", "4", "--num-train-examples", "12",
                              "--num-val-examples", "6", "--lr", "1e-3", "--no-distill", "--output", str(output)], capsys)
    assert code == 0, err
    history = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 4
    assert history[-1]["train_task"] < history[0]["train_task"]


def test_finetune_vqav2_raises_val_accuracy(tmp_path, vqa_model, capsys):
    """The fixture's answers follow from the question (six questions, each with its own majority
    answer), so finetuning the random-init model with PuMer attached must lift val accuracy above
    its plug-and-play start."""
    data = fx.write_vqav2(tmp_path / "vqav2", "train", num_questions=24)
    fx.write_vqav2(data, "val", num_questions=12)
    output = tmp_path / "ft"
    code, out, err = run_cli(["finetune", "--task", "vqav2", "--data-dir", str(data), "--model", str(vqa_model),
                              "--method", "pumer", "--config", str(method_configs(tmp_path)[1].split("=", 1)[1]),
                              "--epochs", "10", "--patience", "10", "--train-batch-size", "8", "--num-train-examples", "24",
                              "--num-val-examples", "12", "--lr", "3e-3", "--no-distill", "--output", str(output)], capsys)
    assert code == 0, err
    summary = json.loads((output / "finetune.json").read_text())
    assert summary["initial_val_accuracy"] is not None
    assert summary["best_val_accuracy"] >= summary["initial_val_accuracy"] + 0.2, summary
    best = summary["best_epoch"]  # counted from 0 in the files, from 1 where printed; the line says both
    assert f"(epoch {best + 1} of {summary['epochs_run']}; " in out and f"best_epoch {best})" in out
    # the output folder is a model compare loads (processor saved beside the weights), and its
    # method.json a --config: PuMer on the finetuned weights scores its best val accuracy again
    code, out, err = run_cli(["compare", "--task", "vqav2", "--data-dir", str(data), "--model", str(output),
                              "--methods", "dense,pumer", "--config", f"pumer={output / 'method.json'}",
                              "--batch-size", "4", "--rounds", "1", "--timing-batches", "1",
                              "--output", str(tmp_path / "eval")], capsys)
    assert code == 0, err
    rows = {r["method"]: r for r in map(json.loads, (tmp_path / "eval" / "results.jsonl").read_text().splitlines())}
    assert rows["pumer"]["accuracy"] == pytest.approx(summary["best_val_accuracy"], abs=1e-9)


def test_a_finetunes_method_json_of_another_method_is_refused(tmp_path):
    from pumer_plug.config import load_method_config
    from pumer_plug.errors import UserError

    saved = tmp_path / "method.json"
    saved.write_text(json.dumps({"method": "tome", "config": {"r": 2}, "adapter": "vilt", "state": None}))
    assert load_method_config("tome", str(saved)).r == 2
    with pytest.raises(UserError, match="method.json of a tome finetune, not of pumer"):
        load_method_config("pumer", str(saved))
    saved.write_text(json.dumps({"method": "dynamicvit", "config": {}, "adapter": "vilt", "state": "method_state.safetensors"}))
    with pytest.raises(UserError, match="learned state"):
        load_method_config("dynamicvit", str(saved))


def _compare_args(data: Path, model: Path, output: Path, *extra: str) -> list[str]:
    return ["compare", "--task", "vqav2", "--data-dir", str(data), "--model", str(model), "--methods", "dense",
            "--batch-size", "4", "--rounds", "1", "--timing-batches", "1", "--output", str(output), *extra]


def _one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("pumer-plug: error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0]


def test_missing_data_file_names_the_file_and_layout(tmp_path, vqa_model, capsys):
    data = fx.write_vqav2(tmp_path / "vqav2", "val", num_questions=4)
    (data / "v2_mscoco_val2014_annotations.json").unlink()
    code, _, err = run_cli(_compare_args(data, vqa_model, tmp_path / "out"), capsys)
    _one_line_error(code, err, "v2_mscoco_val2014_annotations.json")


def test_a_model_whose_head_does_not_fit_names_the_heads_that_fit(tmp_path, capsys):
    model = save_tiny_vilt(tmp_path / "retrieval", "ViltForImageAndTextRetrieval", ("x",))
    data = fx.write_vqav2(tmp_path / "vqav2", "val", num_questions=4)
    code, _, err = run_cli(_compare_args(data, model, tmp_path / "out"), capsys)
    _one_line_error(code, err, "ViltForImageAndTextRetrieval", "ViltForQuestionAnswering")


def test_a_missing_model_directory_is_one_line(tmp_path, capsys):
    data = fx.write_vqav2(tmp_path / "vqav2", "val", num_questions=4)
    code, _, err = run_cli(_compare_args(data, tmp_path / "no-such-model", tmp_path / "out"), capsys)
    _one_line_error(code, err, "no-such-model")


def test_a_corrupt_image_is_named_or_skipped_and_counted(tmp_path, vqa_model, capsys):
    data = fx.write_vqav2(tmp_path / "vqav2", "val", num_questions=6)
    bad = data / "val2014" / f"COCO_val2014_{fx.vqav2_image_id(1):012d}.jpg"
    fx.write_corrupt_image(bad)
    code, _, err = run_cli(_compare_args(data, vqa_model, tmp_path / "out"), capsys)
    _one_line_error(code, err, bad.name)
    code, out, err = run_cli(_compare_args(data, vqa_model, tmp_path / "out2", "--skip-bad-images"), capsys)
    assert code == 0, err
    assert "skipped_examples: 2" in out  # the two questions about the bad image
    assert "examples: all 6 questions, 4 scored" in out
    results = json.loads((tmp_path / "out2" / "dense" / "vqav2_val_results.json").read_text())
    assert len(results) == 4


def test_test_dev_writes_a_submission_file_only(tmp_path, vqa_model, capsys):
    data = fx.write_vqav2(tmp_path / "vqav2", "test-dev", num_questions=4)
    code, out, err = run_cli(_compare_args(data, vqa_model, tmp_path / "out", "--split", "test-dev"), capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "dense" / "vqav2_test-dev_results.json").read_text())
    assert len(results) == 4 and all(isinstance(r["answer"], str) for r in results)


def _read_csv(path: Path) -> dict[str, str]:
    return dict(line.split(",", 1) for line in path.read_text().splitlines() if line)


def _compare_all(task: str, data: Path, model: Path, tmp_path: Path, capsys, *extra: str) -> tuple[list[dict], str, Path]:
    output = tmp_path / "out"
    code, out, err = run_cli(["compare", "--task", task, "--data-dir", str(data), "--model", str(model),
                              "--methods", "dense,pumer,tome", *method_configs(tmp_path), "--batch-size", "4",
                              "--rounds", "1", "--timing-batches", "1", "--output", str(output), *extra], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["dense", "pumer", "tome"]
    return rows, out, output


@pytest.mark.parametrize("layout", ["json", "arrow"])
def test_compare_nlvr2_accuracy_of_the_written_predictions_equals_the_printed_one(tmp_path, capsys, layout):
    model = save_tiny_vilt(tmp_path / "vilt-nlvr2", "ViltForImagesAndTextClassification", ("False", "True"),
                           num_images=2, modality_type_vocab_size=3)
    data = tmp_path / "nlvr2"
    if layout == "json":
        fx.write_nlvr2(data, "dev", num_pairs=3)
        gold = {json.loads(l)["identifier"]: json.loads(l)["label"] for l in (data / "dev.json").read_text().splitlines()}
    else:
        fx.write_nlvr2_arrow(data, "dev", num_pairs=2)
        gold = None
    rows, out, output = _compare_all("nlvr2", data, model, tmp_path, capsys)
    for row in rows:
        predicted = _read_csv(output / row["method"] / "nlvr2_dev_predictions.csv")
        assert set(predicted.values()) <= {"True", "False"}
        if gold is not None:
            assert set(predicted) == set(gold)
            assert row["accuracy"] == pytest.approx(sum(predicted[k] == gold[k] for k in gold) / len(gold))
        assert f"{100 * row['accuracy']:.2f}" in out


@pytest.mark.parametrize("layout", ["json", "arrow"])
def test_compare_snli_ve_accuracy_of_the_written_predictions_equals_the_printed_one(tmp_path, capsys, layout):
    model = save_tiny_vilt(tmp_path / "vilt-ve", "ViltForQuestionAnswering", ("contradiction", "neutral", "entailment"))
    data = tmp_path / "snli-ve"
    if layout == "json":
        fx.write_snli_ve(data, "test", num_images=2, hypotheses_per_image=3)
        gold = {json.loads(l)["pairID"]: json.loads(l)["gold_label"]
                for l in (data / "snli_ve_test.jsonl").read_text().splitlines()}
    else:
        fx.write_snli_arrow(data, "test", num_images=2)
        gold = None
    rows, out, output = _compare_all("snli-ve", data, model, tmp_path, capsys)
    for row in rows:
        predicted = _read_csv(output / row["method"] / "snli-ve_test_predictions.csv")
        if gold is not None:
            assert set(predicted) == set(gold)
            assert row["accuracy"] == pytest.approx(sum(predicted[k] == gold[k] for k in gold) / len(gold))
        assert f"{100 * row['accuracy']:.2f}" in out


def test_compare_vqav2_on_vilts_arrow_table(tmp_path, vqa_model, capsys):
    data = fx.write_vqav2_arrow(tmp_path / "arrow", "val", num_images=3)
    rows, out, output = _compare_all("vqav2", data, vqa_model, tmp_path, capsys)
    assert "soft-score" in out
    for row in rows:
        assert len(json.loads((output / row["method"] / "vqav2_val_results.json").read_text())) == 6


def test_a_classifier_without_the_tasks_labels_is_refused(tmp_path, vqa_model, capsys):
    data = fx.write_snli_ve(tmp_path / "snli-ve", "test")
    code, _, err = run_cli(["compare", "--task", "snli-ve", "--data-dir", str(data), "--model", str(vqa_model),
                            "--methods", "dense", "--output", str(tmp_path / "out")], capsys)
    _one_line_error(code, err, "entailment")


@pytest.mark.parametrize("layout", ["json", "arrow"])
def test_compare_flickr30k_recall_of_the_written_scores_equals_the_printed_one(tmp_path, capsys, layout):
    model = save_tiny_vilt(tmp_path / "vilt-itm", "ViltForImageAndTextRetrieval", ("match",))
    data = tmp_path / "f30k"
    if layout == "json":
        fx.write_flickr30k(data, {"test": 3, "train": 1, "val": 1}, captions_per_image=2)
    else:
        fx.write_f30k_arrow(data, "test", num_images=3, captions_per_image=2)
    rows, out, output = _compare_all("flickr30k", data, model, tmp_path, capsys)
    for row in rows:
        scores = json.loads((output / row["method"] / "flickr30k_test_scores.json").read_text())
        assert len(scores) == 3 * 6  # the full gallery: every image against every caption
        by_image: dict[str, dict[int, float]] = {}
        for s in scores:
            by_image.setdefault(s["image"], {})[s["caption_index"]] = s["score"]
        images = list(by_image)
        own = {t: t // 2 for t in range(6)}  # captions are grouped by image, two each
        hits = sum(max(range(6), key=lambda t: (by_image[images[i]][t], -t)) in [t for t in own if own[t] == i]
                   for i in range(3))
        assert row["accuracy"] == pytest.approx(hits / 3)  # TR R@1: the best caption of each image is its own
        assert 0 <= row["metrics"]["ir_r1"] <= row["metrics"]["ir_r5"] <= 1
        assert f"{100 * row['accuracy']:.2f}" in out
    assert "ir_r1" in out and "full gallery of 3 images x 6 captions" in out


def test_compare_custom_vqa_lines(tmp_path, vqa_model, capsys):
    data = fx.write_custom(tmp_path / "mine", "val", kind="vqa", num_examples=4)
    rows, out, output = _compare_all("custom", data, vqa_model, tmp_path, capsys)
    records = [json.loads(l) for l in (data / "val.jsonl").read_text().splitlines()]
    for row in rows:
        answers = {r["question_id"]: r["answer"] for r in json.loads((output / row["method"] / "vqav2_val_results.json").read_text())}
        annotations = [{"question_id": r["id"], "answers": [{"answer": a} for a in r["answers"]]} for r in records]
        assert row["accuracy"] == pytest.approx(plain_vqa_accuracy(answers, annotations), abs=1e-12)


def test_compare_custom_two_image_classification_lines(tmp_path, capsys):
    model = save_tiny_vilt(tmp_path / "vilt-nlvr2", "ViltForImagesAndTextClassification", ("False", "True"),
                           num_images=2, modality_type_vocab_size=3)
    data = fx.write_custom(tmp_path / "mine", "val", kind="classification", num_examples=4)
    rows, out, output = _compare_all("custom", data, model, tmp_path, capsys)
    gold = {json.loads(l)["id"]: json.loads(l)["label"] for l in (data / "val.jsonl").read_text().splitlines()}
    for row in rows:
        predicted = _read_csv(output / row["method"] / "custom_val_predictions.csv")
        assert row["accuracy"] == pytest.approx(sum(predicted[k] == gold[k] for k in gold) / len(gold))


def test_sweep_and_plot_on_vqav2(tmp_path, vqa_model, capsys):
    data = fx.write_vqav2(tmp_path / "vqav2", "val", num_questions=6)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"name": "tiny", "points": [
        {"method": "pumer", "base": {"reduction_layers": [1]}, "configs": [{"prune_ratio": 0.2}, {"prune_ratio": 0.4}]},
        {"method": "tome", "vary": {"r": [1, 2]}}]}))
    output = tmp_path / "sweep"
    code, out, err = run_cli(["sweep", "--task", "vqav2", "--data-dir", str(data), "--model", str(vqa_model),
                              "--grid", str(grid), "--batch-size", "3", "--rounds", "1", "--timing-batches", "1",
                              "--output", str(output)], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(r["status"] == "ok" for r in records)
    assert all(0 <= r["accuracy"] <= 1 for r in records)
    assert (output / "tradeoff.png").is_file()


def test_dataloader_workers_give_the_same_predictions(tmp_path, vqa_model, capsys):
    data = fx.write_vqav2(tmp_path / "vqav2", "val", num_questions=6)
    results = []
    for workers in ("0", "2"):
        code, _, err = run_cli(_compare_args(data, vqa_model, tmp_path / f"out{workers}", "--workers", workers), capsys)
        assert code == 0, err
        results.append((tmp_path / f"out{workers}" / "dense" / "vqav2_val_results.json").read_text())
    assert results[0] == results[1]


def test_an_output_file_the_run_did_not_create_is_not_replaced_silently(tmp_path, vqa_model, capsys):
    data = fx.write_vqav2(tmp_path / "vqav2", "val", num_questions=4)
    assert run_cli(_compare_args(data, vqa_model, tmp_path / "out"), capsys)[0] == 0
    code, _, err = run_cli(_compare_args(data, vqa_model, tmp_path / "out"), capsys)
    _one_line_error(code, err, "--overwrite", "nothing was evaluated")  # refused before the first pass
    assert run_cli(_compare_args(data, vqa_model, tmp_path / "out", "--overwrite"), capsys)[0] == 0


def test_finetune_nlvr2_runs_on_class_targets(tmp_path, capsys):
    model = save_tiny_vilt(tmp_path / "vilt-nlvr2", "ViltForImagesAndTextClassification", ("False", "True"),
                           num_images=2, modality_type_vocab_size=3)
    data = fx.write_nlvr2(tmp_path / "nlvr2", "train", num_pairs=4)
    fx.write_nlvr2(data, "dev", num_pairs=2)
    output = tmp_path / "ft"
    code, out, err = run_cli(["finetune", "--task", "nlvr2", "--data-dir", str(data), "--model", str(model),
                              "--method", "tome", "--config", str(method_configs(tmp_path)[3].split("=", 1)[1]),
                              "--epochs", "3", "--patience", "3", "--train-batch-size", "4", "--num-train-examples", "8",
                              "--num-val-examples", "4", "--lr", "1e-3", "--no-distill", "--output", str(output)], capsys)
    assert code == 0, err
    history = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 3 and all(0 < h["train_task"] < 10 for h in history)  # CE on True/False (learning: see vqav2)


def save_tiny_bridgetower_retrieval(path: Path) -> Path:
    """A random-init BridgeTowerForImageAndTextRetrieval with a locally built byte-level BPE processor."""
    import torch
    from transformers import BridgeTowerForImageAndTextRetrieval, BridgeTowerImageProcessor, BridgeTowerProcessor, RobertaTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from tests.backbones import tiny_bridgetower_config

    path.mkdir(parents=True, exist_ok=True)
    tokens = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + list(bytes_to_unicode().values())
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = RobertaTokenizerFast(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"))  # not vocab_file=: ignored in transformers 5
    image_processor = BridgeTowerImageProcessor(size={"shortest_edge": 64}, crop_size={"shortest_edge": 64})
    config = tiny_bridgetower_config(text_config=dict(vocab_size=len(tokens), hidden_size=64, num_hidden_layers=4,
                                                      num_attention_heads=4, intermediate_size=128, max_position_embeddings=80))
    torch.manual_seed(0)
    BridgeTowerForImageAndTextRetrieval(config).save_pretrained(path)
    BridgeTowerProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def test_compare_flickr30k_on_bridgetower(tmp_path, capsys):
    model = save_tiny_bridgetower_retrieval(tmp_path / "bridgetower-itm")
    data = fx.write_flickr30k(tmp_path / "f30k", {"test": 3}, captions_per_image=2)
    rows, out, output = _compare_all("flickr30k", data, model, tmp_path, capsys)
    for row in rows:
        assert len(json.loads((output / row["method"] / "flickr30k_test_scores.json").read_text())) == 18
        assert 0 <= row["accuracy"] <= 1


def test_rerank_candidates_are_each_querys_top_k():
    from pumer_plug.evaluation.tasks.retrieval_task import rerank_candidates

    g = torch.Generator().manual_seed(0)
    first = torch.randn(12, 24, generator=g)
    assert len(rerank_candidates(first, 24)) == 12 * 24  # K >= the gallery: every pair
    pairs = set(rerank_candidates(first, 10))
    for i in range(12):
        assert {(i, int(t)) for t in first[i].topk(10).indices} <= pairs
    for t in range(24):
        assert {(int(i), t) for i in first[:, t].topk(10).indices} <= pairs
    assert len(pairs) < 12 * 24
    # re-ranking the first stage's own top 10 by the same scores keeps recall@1/5/10 exactly
    from pumer_plug.evaluation.tasks.retrieval_metric import retrieval_recall

    kept = torch.full_like(first, -torch.inf)
    for i, t in pairs:
        kept[i, t] = first[i, t]
    owner = [t // 2 for t in range(24)]
    assert retrieval_recall(kept, owner).as_dict() == retrieval_recall(first, owner).as_dict()


def test_flickr30k_rerank_scores_only_the_candidates_and_marks_the_result(tmp_path, capsys):
    """The model scores exactly the first stage's candidates (fewer than the full gallery), the printed
    recall is the one of the written scores with the other pairs ranked last, and the output says so."""
    from pumer_plug.evaluation.tasks.retrieval_task import rerank_candidates
    from pumer_plug.evaluation.tasks.retrieval_metric import retrieval_recall

    model = save_tiny_vilt(tmp_path / "vilt-itm", "ViltForImageAndTextRetrieval", ("match",))
    data = fx.write_flickr30k(tmp_path / "f30k", {"test": 12}, captions_per_image=2)
    base = ["compare", "--task", "flickr30k", "--data-dir", str(data), "--model", str(model), "--methods", "dense",
            "--batch-size", "16", "--rounds", "1", "--timing-batches", "1"]
    code, _, err = run_cli([*base, "--output", str(tmp_path / "full")], capsys)
    assert code == 0, err
    first_stage = tmp_path / "full" / "dense" / "flickr30k_test_scores.json"
    full = json.loads((tmp_path / "full" / "results.jsonl").read_text().splitlines()[0])
    code, out, err = run_cli([*base, "--output", str(tmp_path / "rr"), "--rerank-top-k", "10",
                              "--first-stage-scores", str(first_stage)], capsys)
    assert code == 0, err
    row = json.loads((tmp_path / "rr" / "results.jsonl").read_text().splitlines()[0])
    scored = json.loads((tmp_path / "rr" / "dense" / "flickr30k_test_scores.json").read_text())
    assert len(scored) < 12 * 24
    first_rows = json.loads(first_stage.read_text())
    order = {image: i for i, image in enumerate(dict.fromkeys(r["image"] for r in first_rows))}  # gallery order
    assert len(order) == 12 and full["metrics"]["tr_r1"] is not None
    first = torch.empty(12, 24)
    for r in first_rows:
        first[order[r["image"]], r["caption_index"]] = r["score"]
    assert {(order[r["image"]], r["caption_index"]) for r in scored} == set(rerank_candidates(first, 10))
    matrix = torch.full((12, 24), -torch.inf)
    for r in scored:
        matrix[order[r["image"]], r["caption_index"]] = r["score"]
    expected = retrieval_recall(matrix, [t // 2 for t in range(24)]).as_dict()  # captions grouped by image, two each
    for key in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"):
        assert row["metrics"][key] == pytest.approx(expected[key])
    assert "NOT comparable to the paper" in out


@pytest.mark.parametrize("extra, words", [
    (["--rerank-top-k", "10"], ["--rerank-top-k", "--first-stage-scores"]),
    (["--rerank-top-k", "5", "--first-stage-scores", "x.json"], ["at least 10"]),
])
def test_rerank_options_are_checked_in_one_line(tmp_path, capsys, extra, words):
    model = save_tiny_vilt(tmp_path / "vilt-itm", "ViltForImageAndTextRetrieval", ("match",))
    data = fx.write_flickr30k(tmp_path / "f30k", {"test": 3}, captions_per_image=2)
    code, _, err = run_cli(["compare", "--task", "flickr30k", "--data-dir", str(data), "--model", str(model),
                            "--methods", "dense", "--output", str(tmp_path / "o"), *extra], capsys)
    _one_line_error(code, err, *words)


def test_fixture_tokenizers_read_their_vocabulary(tmp_path):
    """The tiny models' tokenizers know the fixture words (transformers 5 ignored ``vocab_file=``, so
    every word became [UNK] and no test fed text to a model)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(save_tiny_vilt(tmp_path / "vilt", "ViltForQuestionAnswering", ("yes",)))
    tokens = processor.tokenizer.convert_ids_to_tokens(processor.tokenizer("Is there a cat?")["input_ids"])
    assert "[UNK]" not in tokens and "cat" in tokens


def test_tasks_say_whether_test_is_held_out_from_val(tmp_path, vqa_model):
    """``tune``/``finetune`` choose on val; VQAv2 and NLVR2 evaluate val/dev by default (not held out)."""
    from pumer_plug.evaluation.tasks import TaskOptions, get_task

    data = fx.write_vqav2(tmp_path / "vqav2", "val", num_questions=2)
    assert not get_task("vqav2", TaskOptions(model=str(vqa_model), data_dir=str(data))).held_out_test_split()
    assert get_task("vqav2", TaskOptions(model=str(vqa_model), data_dir=str(data), split="test-dev")).held_out_test_split()
    assert get_task("snli-ve", TaskOptions(model=str(vqa_model), data_dir=str(data))).held_out_test_split()


def test_show_draws_a_users_model_and_data_with_the_reference_answer(tmp_path, vqa_model, capsys):
    data = fx.write_vqav2(tmp_path / "vqav2", "val", num_questions=2)
    code, out, err = run_cli(["show", "--task", "vqav2", "--model", str(vqa_model), "--data-dir", str(data),
                              "--method", "pumer", "--config", json.dumps(METHOD_CONFIGS["pumer"]), "--index", "0", "1",
                              "--output", str(tmp_path / "show")], capsys)
    assert code == 0, err
    # the fixture's first questions: "Is there a cat?" (10 x yes), "How many dogs?" (6 x 2, 3 x 3, two)
    assert "example 0: answer yes," in out and "example 1: answer 2," in out
    assert sorted(p.name for p in (tmp_path / "show").glob("*.png")) == ["pumer-test-0.png", "pumer-test-1.png"]
