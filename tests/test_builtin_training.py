"""Behaviour tests of the built-in model's training recipe: curriculum data and auxiliary targets."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pumer_plug.evaluation.tasks import builtin, digits
from pumer_plug.evaluation.tasks.builtin_training import (BACKGROUND, IGNORE, AuxiliaryHeads, Stage, _capture,
                                                    auxiliary_targets, curriculum_datasets, fit, step_losses)
from pumer_plug.evaluation.tasks.digits import CANVAS_PX, EMPTY, GRID_CELLS, PATCH_PX, DigitsVQA

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_ratio": 2}


def _digit_word_ids(tokenizer) -> torch.Tensor:
    vocab = tokenizer.get_vocab()
    return torch.tensor([vocab[str(d)] for d in range(10)])


@pytest.mark.parametrize("region_patches", [1, 2, 4])
def test_curriculum_canvas_puts_each_digit_on_one_patch_of_its_region(region_patches):
    data = DigitsVQA("train", 20, seed=3, region_patches=region_patches, jitter=2)
    inputs, _ = data.collate(list(range(20)))
    side = PATCH_PX * GRID_CELLS * region_patches
    assert inputs["pixel_values"].shape == (20, 1, side, side)
    for b, example in enumerate(data.examples):
        patches = inputs["pixel_values"][b, 0].unfold(0, PATCH_PX, PATCH_PX).unfold(1, PATCH_PX, PATCH_PX)
        inked = {(r, c) for r, c in (patches.amax((-1, -2)) > 0).nonzero().tolist()}
        placed = example.digit_patches()
        assert inked == {(r, c) for r, c, _ in placed}  # every scan has ink (max grey level >= 14)
        full = [i for i, d in enumerate(example.cell_labels) if d != EMPTY]
        for (row, col, label), cell in zip(placed, full):
            assert (row // region_patches, col // region_patches) == divmod(cell, GRID_CELLS)
            assert label == example.cell_labels[cell]


@pytest.mark.parametrize("kwargs", [{"region_patches": 0}, {"region_patches": 5}, {"jitter": 0}])
def test_bad_canvas_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="region_patches|jitter"):
        DigitsVQA("train", 4, **kwargs)


@pytest.mark.parametrize("region_patches", [1, 2, 4])
def test_auxiliary_targets_agree_with_the_layout_and_question(region_patches):
    data = DigitsVQA("train", 200, seed=1, region_patches=region_patches)
    inputs, _ = data.collate(list(range(200)))
    targets = auxiliary_targets(data.examples, inputs["input_ids"], _digit_word_ids(data.tokenizer))
    vocab = {i: w for w, i in data.tokenizer.get_vocab().items()}
    for b, example in enumerate(data.examples):
        labels = example.cell_labels
        # patches: region * 10 + digit where a digit sits, background elsewhere
        full = [i for i, d in enumerate(labels) if d != EMPTY]
        expected = {(r, c): cell * 10 + d for (r, c, d), cell in zip(example.digit_patches(), full)}
        grid = targets["patch"][b]
        assert grid.shape == (3 * region_patches, 3 * region_patches)
        assert all(grid[r, c] == v for (r, c), v in expected.items())
        assert int((grid != BACKGROUND).sum()) == len(expected)
        assert targets["layout"][b].tolist() == [10 if d == EMPTY else d for d in labels]
        assert targets["counts"][b].tolist() == [labels.count(d) for d in range(10)] + [len(full)]
        words = [vocab[int(i)] for i in inputs["input_ids"][b]]
        for t, word in enumerate(words):
            assert int(targets["digit_words"][b, t]) == (labels.count(int(word)) if word.isdigit() else IGNORE)
    assert (targets["place_words"] != IGNORE).any() and (targets["digit_words"] != IGNORE).any()


@pytest.mark.parametrize("question, targets", [
    ("is the top center digit larger than the center digit ?", {4: 1, 9: 4}),  # [CLS] is token 0
    ("which is larger , the bottom left digit or the middle right digit ?", {7: 6, 12: 5}),
    ("what digit is in the center ?", {6: 4}),
    ("is there a 3 ?", {}),
])
def test_place_word_targets_sit_on_the_last_word_of_each_place_phrase(question, targets):
    labels = (0, 1, 2, 3, 4, 5, 6, 7, 8)  # the digit in cell i is i
    example = dataclasses.replace(DigitsVQA("train", 1, seed=0).examples[0], cell_labels=labels, question=question)
    tokenizer = digits.build_tokenizer()
    input_ids = torch.tensor([tokenizer.encode(question).ids])
    place_words = auxiliary_targets([example], input_ids, _digit_word_ids(tokenizer))["place_words"][0]
    assert {t: int(v) for t, v in enumerate(place_words) if v != IGNORE} == targets


def test_each_image_token_is_trained_on_the_patch_it_came_from():
    """ViLT returns image tokens in its own order; the recorded patch index must line them up."""
    data = DigitsVQA("train", 4, seed=2)
    model = builtin.build_builtin_model(seed=0, **TINY).train()
    inputs, _ = data.collate(list(range(4)))
    with _capture(model) as captured:
        model(**inputs)
    rows, cols = captured["patch_index"].unbind(-1)  # (B, V)
    pixels = inputs["pixel_values"][:, 0].unfold(1, PATCH_PX, PATCH_PX).unfold(2, PATCH_PX, PATCH_PX)  # (B, P, P, 16, 16)
    token_pixels = pixels[torch.arange(4)[:, None], rows, cols]  # (B, V, 16, 16)
    projection = model.vilt.embeddings.patch_embeddings.projection
    expected = projection(token_pixels.reshape(-1, 1, PATCH_PX, PATCH_PX)).flatten(1).view(4, -1, model.config.hidden_size)
    embedded = model.vilt.embeddings.patch_embeddings(inputs["pixel_values"]).flatten(2).transpose(1, 2)  # (B, P*P, C)
    grid = rows * (CANVAS_PX // PATCH_PX) + cols
    torch.testing.assert_close(embedded[torch.arange(4)[:, None], grid], expected)


def test_step_losses_are_finite_and_train_the_backbone():
    data = DigitsVQA("train", 8, seed=0, region_patches=2)
    model = builtin.build_builtin_model(seed=0, **TINY).train()
    heads = AuxiliaryHeads(model.config.hidden_size)
    inputs, answer_ids = data.collate(list(range(8)))
    parts = step_losses(model, heads, inputs, answer_ids, data.examples, _digit_word_ids(data.tokenizer))
    assert set(parts) == {"answer", "patch", "layout", "counts", "digit_words", "place_words"}
    assert all(torch.isfinite(v) and v > 0 for v in parts.values())
    sum(parts.values()).backward()
    assert model.vilt.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    assert model.vilt.embeddings.text_embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert "visual_embed" not in vars(model.vilt.embeddings)  # the recording wrapper is gone


def test_fit_refuses_a_stage_too_small_for_its_steps():
    model = builtin.build_builtin_model(seed=0, **TINY)
    with pytest.raises(ValueError, match="needs steps"):
        fit(model, [(DigitsVQA("train", 10), 3)], batch_size=4, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_recipe_learns_to_read_the_image_on_every_seed(seed):
    """The recipe's first curriculum stage (48 px canvases, auxiliary heads) at a reduced model
    size leaves the question-only prior far behind within ~30 s, for more than one seed.

    (The full recipe on the full canvas takes minutes; its multi-seed figures are in
    docs/benchmarks.md.)
    """
    torch.manual_seed(seed)
    tokenizer = digits.build_tokenizer()
    stages = curriculum_datasets((Stage(1, 1, 800),), 32, seed, tokenizer)
    model = builtin.build_builtin_model(seed, hidden_size=64, num_layers=4, num_heads=4)
    fit(model, stages, 32, learning_rate=2e-3, progress=False)
    val = DigitsVQA("val", 300, seed, question_types=("place",), tokenizer=tokenizer, region_patches=1, jitter=1)
    train = DigitsVQA("train", 3000, seed, question_types=("place",), tokenizer=tokenizer)
    assert builtin.evaluate_accuracy(model, val) > digits.question_prior_accuracy(val, train) + 0.4
