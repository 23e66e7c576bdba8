"""Behaviour tests of the built-in digits VQA task and of the built-in model's cache."""
from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
from transformers import ViltForQuestionAnswering

from pumer_plug.evaluation.tasks import builtin, digits
from pumer_plug.evaluation.tasks.builtin_training import Stage
from pumer_plug.evaluation.tasks.digits import (ANSWER_VOCAB, CANVAS_PX, EMPTY, IMAGE_PATCHES,
                                          MAX_QUESTION_TOKENS, PATCH_PX, PLACE_NAMES, REGION_PATCHES,
                                          DigitsVQA)

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_ratio": 2}


def _recompute_answer(question: str, labels: tuple[int, ...]) -> str:
    """Independent oracle: parses the question and answers it from the placed digit labels."""
    place = {name: i for i, name in enumerate(PLACE_NAMES)}
    present = [d for d in labels if d != EMPTY]
    if m := re.fullmatch(r"what digit is in the (.+) \?", question):
        d = labels[place[m[1]]]
        return "none" if d == EMPTY else str(d)
    if m := re.fullmatch(r"what digit is in row (\d) column (\d) \?", question):
        d = labels[3 * (int(m[1]) - 1) + int(m[2]) - 1]
        return "none" if d == EMPTY else str(d)
    if m := re.fullmatch(r"is there a (\d) \?", question):
        return "yes" if int(m[1]) in present else "no"
    if question == "how many digits are there ?":
        return str(len(present))
    if m := re.fullmatch(r"how many times does (\d) appear \?", question):
        return str(present.count(int(m[1])))
    if m := re.fullmatch(r"is the (.+) digit larger than the (.+) digit \?", question):
        a, b = labels[place[m[1]]], labels[place[m[2]]]
        assert EMPTY not in (a, b)
        return "yes" if a > b else "no"
    m = re.fullmatch(r"which is larger , the (.+) digit or the (.+) digit \?", question)
    assert m, question
    a, b = labels[place[m[1]]], labels[place[m[2]]]
    assert EMPTY not in (a, b) and a != b
    return str(max(a, b))


def test_image_splits_are_disjoint_and_cover_all_digits():
    parts = [set(digits.split_image_indices(s, image_seed=3).tolist()) for s in digits.SPLITS]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 1797
    assert parts[0] != set(digits.split_image_indices("train", image_seed=4).tolist())


def test_examples_are_deterministic_and_test_uses_unseen_digit_images():
    a, b = DigitsVQA("train", 300, seed=5), DigitsVQA("train", 300, seed=5)
    assert a.examples == b.examples
    assert a.examples != DigitsVQA("train", 300, seed=6).examples
    torch.testing.assert_close(a.collate([0, 7]), b.collate([0, 7]), rtol=0, atol=0)
    test = DigitsVQA("test", 300, seed=5)
    train_images = set(digits.split_image_indices("train").tolist())
    shown = {i for e in test.examples for i in e.digit_indices if i != EMPTY}
    assert shown and not shown & train_images


def test_every_answer_follows_from_the_placed_digits_and_the_canvas_shows_them():
    data = DigitsVQA("val", 600, seed=1)
    images, labels = digits.digit_images()
    assert {e.question_type for e in data.examples} == set(digits.QUESTION_TYPES)
    for e in data.examples:
        assert e.answer in ANSWER_VOCAB
        assert _recompute_answer(e.question, e.cell_labels) == e.answer
        assert all(labels[i] == d for i, d in zip(e.digit_indices, e.cell_labels) if i != EMPTY)
    e = data[0]
    canvas = digits.render(e)
    assert canvas.shape == (CANVAS_PX, CANVAS_PX) and canvas.min() >= -1 and canvas.max() <= 1
    for cell, (index, (dy, dx)) in enumerate(zip(e.digit_indices, e.offsets)):
        top = ((cell // 3) * REGION_PATCHES + dy) * PATCH_PX
        left = ((cell % 3) * REGION_PATCHES + dx) * PATCH_PX
        patch = canvas[top:top + PATCH_PX, left:left + PATCH_PX]
        expected = -1.0 if index == EMPTY else images[index] / 8 - 1
        np.testing.assert_allclose(patch[::2, ::2], np.broadcast_to(expected, (8, 8)))
    ink = (canvas > -1).sum()
    assert ink == sum((images[i] > 0).sum() * 4 for i in e.digit_indices if i != EMPTY)


def test_tokenizer_round_trip_and_token_budget(tmp_path):
    tokenizer = digits.build_tokenizer()
    digits.save_tokenizer(tokenizer, tmp_path)
    loaded = digits.load_tokenizer(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.token_to_id("[PAD]") == 0 and loaded.token_to_id("[UNK]") is not None
    data = DigitsVQA("train", 500, seed=2)
    for e in data.examples:
        enc = loaded.encode(e.question)
        assert "[UNK]" not in enc.tokens
        assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
        assert loaded.decode(enc.ids[1:-1]) == e.question
        assert len(enc.ids) <= MAX_QUESTION_TOKENS
    assert IMAGE_PATCHES == (CANVAS_PX // PATCH_PX) ** 2 >= 100
    assert IMAGE_PATCHES >= 6 * MAX_QUESTION_TOKENS


def test_batches_feed_a_tiny_vilt_forward():
    data = DigitsVQA("val", 70, seed=0)
    model = builtin.build_builtin_model(seed=0, **TINY)
    batches = list(data.batches(32))
    assert [len(a) for _, a in batches] == [32, 32, 6]
    inputs, answer_ids = batches[0]
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids", "pixel_values", "pixel_mask"}
    lengths = inputs["attention_mask"].sum(1)
    assert inputs["input_ids"].shape[1] == lengths.max() and lengths.min() < lengths.max()
    assert (inputs["input_ids"][inputs["attention_mask"] == 0] == 0).all()
    assert inputs["pixel_values"].shape == (32, 1, CANVAS_PX, CANVAS_PX)
    with torch.inference_mode():
        out = model.eval()(**inputs, output_hidden_states=True)
    assert out.logits.shape == (32, len(ANSWER_VOCAB))
    assert out.hidden_states[0].shape[1] == inputs["input_ids"].shape[1] + IMAGE_PATCHES + 1
    accuracy = builtin.evaluate_accuracy(model, data, batch_size=32)
    assert 0.0 <= accuracy <= 1.0 and model.training is False


def test_baselines_are_low():
    train, test = DigitsVQA("train", 4000, seed=0), DigitsVQA("test", 1000, seed=0)
    assert digits.majority_answer_accuracy(test) < 0.25
    assert digits.question_prior_accuracy(test, train) < 0.40


def _fake_trainer(calls):
    original = builtin.train_builtin_model  # captured before the test patches it in

    def train(output_dir, seed=0, progress=True):
        calls.append(output_dir)
        return original(output_dir, seed=seed, curriculum=(Stage(1, 1, 1), Stage(4, 2, 1)), batch_size=4,
                        progress=False, num_val_examples=8)
    return train


@pytest.fixture
def tiny_cache(tmp_path, monkeypatch):
    """A cache root where 'training' is two steps of a tiny model checked as the default one."""
    calls: list = []
    config = builtin.builtin_vilt_config
    monkeypatch.setattr(builtin, "train_builtin_model", _fake_trainer(calls))
    monkeypatch.setattr(builtin, "builtin_vilt_config", lambda vocab_size=None, **kw: config(vocab_size, **TINY))
    monkeypatch.setattr(builtin, "recipe_differences", lambda metadata, seed=None: [])  # a tiny recipe
    monkeypatch.setattr(builtin, "PACKAGED_MODEL_DIR", tmp_path / "not-packaged")
    monkeypatch.setenv(builtin.CACHE_ENV_VAR, str(tmp_path))
    return tmp_path, calls


def test_cache_is_trained_once_then_reused(tiny_cache):
    root, calls = tiny_cache
    model, tokenizer = builtin.load_builtin_model(progress=False)
    assert len(calls) == 1 and builtin.builtin_model_dir() == root / builtin.BUILTIN_NAME
    assert isinstance(model, ViltForQuestionAnswering) and not model.training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, _ = builtin.load_builtin_model(progress=False)
    assert len(calls) == 1
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)
    assert [p.name for p in root.iterdir()] == [builtin.BUILTIN_NAME]  # no staging leftovers


@pytest.mark.parametrize("damage", ["truncate_weights", "delete_weights", "bad_json", "config_mismatch"])
def test_corrupt_cache_is_reported_and_rebuilt(tiny_cache, damage):
    root, calls = tiny_cache
    builtin.load_builtin_model(progress=False)
    model_dir = builtin.builtin_model_dir()
    weights = model_dir / builtin.WEIGHTS_FILE
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "delete_weights":
        weights.unlink()
    elif damage == "bad_json":
        (model_dir / builtin.METADATA_FILE).write_text("{not json")
    else:
        config = json.loads((model_dir / "config.json").read_text())
        config["num_hidden_layers"] = 1
        (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="unusable"):
        model, _ = builtin.load_builtin_model(progress=False)
    assert len(calls) == 2
    builtin.load_builtin_model(progress=False)  # the rebuilt cache is trusted again
    assert len(calls) == 2


def test_interrupted_training_leaves_no_cache(tiny_cache, monkeypatch):
    root, _ = tiny_cache

    def crash(output_dir, seed=0, progress=True):
        (output_dir / "partial").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "train_builtin_model", crash)
    with pytest.raises(KeyboardInterrupt):
        builtin.load_builtin_model(progress=False)
    assert list(root.iterdir()) == []


def test_train_command_retrains_with_the_seed_and_prints_val_accuracy(tiny_cache, capsys):
    from pumer_plug.cli import main

    root, calls = tiny_cache
    assert main(["train", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert len(calls) == 1 and "seed 3" in out and "question-only prior" in out and "place" in out
    assert json.loads((builtin.builtin_model_dir() / builtin.METADATA_FILE).read_text())["seed"] == 3
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--seed", "-1"])
    assert exit_info.value.code == 2 and "expected an integer >= 0" in capsys.readouterr().err


def test_builtin_task_reports_trivial_predictors_on_its_test_split(tiny_cache):
    from pumer_plug.evaluation.tasks import TaskOptions, get_task

    references = get_task("builtin", TaskOptions(num_test_examples=500)).reference_accuracies()
    assert set(references) == {"majority answer", "question-only prior"}
    assert 0.1 < references["majority answer"] < references["question-only prior"] < 0.45


def test_training_shows_one_progress_bar_per_stage(tmp_path, capsys):
    """Stages differ in cost per step, so one bar over all steps would give a wrong ETA (issue 17)."""
    builtin.train_builtin_model(tmp_path, curriculum=(Stage(1, 1, 1), Stage(4, 2, 2)), batch_size=4,
                                progress=True, num_val_examples=8, **TINY)
    err = capsys.readouterr().err
    assert re.search(r"stage 1/2 \(48 px\): 100%\|.*\| 1/1 ", err)  # each bar counts its own stage's steps
    assert re.search(r"stage 2/2 \(192 px\): 100%\|.*\| 2/2 ", err)


def test_first_use_training_ends_with_val_accuracy_and_folder(tiny_cache, capsys):
    root, _ = tiny_cache
    builtin.load_builtin_model(progress=True)
    err = capsys.readouterr().err
    assert "no packaged model in" in err and "val accuracy" in err and f"stored in {root / builtin.BUILTIN_NAME}" in err
