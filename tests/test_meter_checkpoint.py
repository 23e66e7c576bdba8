"""An official-format METER checkpoint as ``--model``: tiny random-init METERs saved as Lightning
``.ckpt`` and safetensors with a tokenizer and ``meter_config.json``, run through ``pumer-plug compare``."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pumer_plug.models.meter import MeterConfig, MeterModel, save_meter_checkpoint
from tests import fixtures_benchmarks as fx
from tests.test_benchmark_tasks import VOCAB, _one_line_error, plain_vqa_accuracy, run_cli

ANSWERS = [*fx.VQA_FIXTURE_ANSWERS, "four", "five"]  # the tiny head's 10 answers


def save_tiny_meter(folder: Path, task: str = "vqa", suffix: str = ".ckpt", labels=ANSWERS) -> Path:
    """A METER model folder: checkpoint, meter_config.json and a tokenizer saved offline."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = dataclasses.replace(MeterConfig.tiny(), num_top_layer=4)  # 4 co-attention blocks: meter-vqa fits
    save_meter_checkpoint(MeterModel(config, task=task), folder / f"meter_tiny_{task}{suffix}")
    spec = {"task": task, "config": dataclasses.asdict(config)}
    if labels is not None:
        spec["labels"] = labels
    (folder / "meter_config.json").write_text(json.dumps(spec))
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab=str(vocab), do_lower_case=True).save_pretrained(folder)  # vocab=: transformers 5 ignores vocab_file=
    return folder


def _compare(data: Path, model: Path, output: Path, task: str = "vqav2", *extra: str) -> list[str]:
    return ["compare", "--task", task, "--data-dir", str(data), "--model", str(model), "--methods", "dense,pumer,tome",
            "--config", "tome={\"r\": 2}", "--batch-size", "4", "--rounds", "1", "--timing-batches", "1",
            "--output", str(output), *extra]


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_compare_vqav2_on_a_meter_checkpoint(tmp_path, capsys, suffix):
    model = save_tiny_meter(tmp_path / "meter", suffix=suffix)
    data = fx.write_vqav2(tmp_path / "vqav2", "val", num_questions=6)
    checkpoint = next((tmp_path / "meter").glob(f"*{suffix}"))
    code, out, err = run_cli(_compare(data, checkpoint, tmp_path / "out"), capsys)  # the checkpoint file itself
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["dense", "pumer", "tome"]
    assert "PuMer layers=0,1,2,3" in out  # METER's preset meter-vqa (co-attention blocks 0-3)
    annotations = json.loads((data / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    for row in rows:
        results = json.loads((tmp_path / "out" / row["method"] / "vqav2_val_results.json").read_text())
        answers = {r["question_id"]: r["answer"] for r in results}
        assert set(answers.values()) <= set(ANSWERS)
        assert row["accuracy"] == pytest.approx(plain_vqa_accuracy(answers, annotations), abs=1e-12)
    code, _, err = run_cli(_compare(data, model, tmp_path / "out2"), capsys)  # the folder works as well
    assert code == 0, err


def test_the_reduction_really_runs_on_the_meter_model(tmp_path):
    from pumer_plug.evaluation.tasks import TaskOptions, get_task

    model = save_tiny_meter(tmp_path / "meter")
    data = fx.write_vqav2(tmp_path / "vqav2", "val", num_questions=4)
    task = get_task("vqav2", TaskOptions(model=str(model), data_dir=str(data)))
    meter = task.load_model(torch.device("cpu"))
    inputs, _ = next(iter(task.batches("test", 4)))
    import pumer_plug

    dense = meter(**inputs).logits
    with pumer_plug.apply(meter, adapter=task.adapter, config=task.default_config("pumer")) as handle:
        reduced = meter(**inputs).logits
        counts = handle.token_counts
    assert task.adapter == "meter" and dense.shape == reduced.shape == (4, len(ANSWERS))
    image_tokens = 1 + (32 // 8) ** 2
    assert counts and min(c.image for c in counts.values()) < image_tokens


def test_nlvr2_and_snli_ve_on_meter_heads(tmp_path, capsys):
    nlvr2 = save_tiny_meter(tmp_path / "meter-nlvr2", task="nlvr2", labels=None)
    data = fx.write_nlvr2(tmp_path / "nlvr2", "dev", num_pairs=2)
    code, _, err = run_cli(_compare(data, nlvr2, tmp_path / "o1", "nlvr2"), capsys)
    assert code == 0, err
    snli = save_tiny_meter(tmp_path / "meter-snli", task="snli", labels=["entailment", "neutral", "contradiction"])
    data = fx.write_snli_ve(tmp_path / "snli", "test", num_images=1)
    code, _, err = run_cli(_compare(data, snli, tmp_path / "o2", "snli-ve"), capsys)
    assert code == 0, err


def test_bad_meter_folders_are_one_line(tmp_path, capsys):
    data = fx.write_vqav2(tmp_path / "vqav2", "val", num_questions=4)
    model = save_tiny_meter(tmp_path / "no-config")
    (model / "meter_config.json").unlink()
    code, _, err = run_cli(_compare(data, next(model.glob("*.ckpt")), tmp_path / "o"), capsys)
    _one_line_error(code, err, "meter_config.json", "missing")

    model = save_tiny_meter(tmp_path / "nlvr2-head", task="nlvr2", labels=None)
    code, _, err = run_cli(_compare(data, model, tmp_path / "o"), capsys)
    _one_line_error(code, err, "METER nlvr2 model", "vqa")

    model = save_tiny_meter(tmp_path / "short-table", labels=ANSWERS[:3])
    code, _, err = run_cli(_compare(data, model, tmp_path / "o"), capsys)
    _one_line_error(code, err, "labels", "10")

    model = save_tiny_meter(tmp_path / "no-tokenizer")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    code, _, err = run_cli(_compare(data, model, tmp_path / "o"), capsys)
    _one_line_error(code, err, "tokenizer")

    model = save_tiny_meter(tmp_path / "wrong-size")
    spec = json.loads((model / "meter_config.json").read_text())
    spec["config"]["hidden_size"] = 48
    (model / "meter_config.json").write_text(json.dumps(spec))
    code, _, err = run_cli(_compare(data, model, tmp_path / "o"), capsys)
    _one_line_error(code, err, "mismatched-shape")


def test_flickr30k_on_a_meter_itm_head(tmp_path, capsys):
    model = save_tiny_meter(tmp_path / "meter-itm", task="itm", labels=None)
    data = fx.write_flickr30k(tmp_path / "f30k", {"test": 3}, captions_per_image=2)
    code, out, err = run_cli(_compare(data, model, tmp_path / "o", "flickr30k"), capsys)
    assert code == 0, err
    scores = json.loads((tmp_path / "o" / "dense" / "flickr30k_test_scores.json").read_text())
    assert len(scores) == 3 * 6 and len({round(s["score"], 6) for s in scores}) > 1  # METER's rank_output scores
