"""Behaviour tests of the built-in model's training recipe: curriculum data and auxiliary targets."""
from __future__ import annotations

import pytest
import torch

from pumer_plug.evaluation import builtin, digits
from pumer_plug.evaluation.builtin_training import (BACKGROUND, IGNORE, AuxiliaryHeads, Stage, auxiliary_targets,
                                                    curriculum_datasets, fit, step_losses)
from pumer_plug.evaluation.digits import EMPTY, GRID_CELLS, PATCH_PX, PLACE_NAMES, DigitsVQA

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
        assert inked <= {(r, c) for r, c, _ in placed}  # ink only where a digit was placed
        for row, col, _ in placed:
            assert (row // region_patches, col // region_patches) in {(i // 3, i % 3) for i in range(9)}
        cells = [(row // region_patches) * GRID_CELLS + col // region_patches for row, col, _ in placed]
        assert cells == [i for i, d in enumerate(example.cell_labels) if d != EMPTY]


@pytest.mark.parametrize("kwargs", [{"region_patches": 0}, {"region_patches": 5}, {"jitter": 0}])
def test_bad_canvas_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="region_patches|jitter"):
        DigitsVQA("train", 4, **kwargs)


def test_auxiliary_targets_agree_with_the_layout_and_question():
    data = DigitsVQA("train", 200, seed=1)
    inputs, _ = data.collate(list(range(200)))
    targets = auxiliary_targets(data.examples, inputs["input_ids"], _digit_word_ids(data.tokenizer))
    vocab = {i: w for w, i in data.tokenizer.get_vocab().items()}
    for b, example in enumerate(data.examples):
        labels = example.cell_labels
        # patches: region * 10 + digit where a digit sits, background elsewhere
        expected = {(r, c): (r // 4 * 3 + c // 4) * 10 + d for r, c, d in example.digit_patches()}
        grid = targets["patch"][b]
        assert all(grid[r, c] == v for (r, c), v in expected.items())
        assert int((grid != BACKGROUND).sum()) == len(expected)
        assert targets["layout"][b].tolist() == [10 if d == EMPTY else d for d in labels]
        assert targets["counts"][b].tolist() == [labels.count(d) for d in range(10)] + [9 - labels.count(EMPTY)]
        words = [vocab[int(i)] for i in inputs["input_ids"][b]]
        for t, word in enumerate(words):
            digit_target, place_target = int(targets["digit_words"][b, t]), int(targets["place_words"][b, t])
            assert digit_target == (labels.count(int(word)) if word.isdigit() else IGNORE)
            previous = " ".join(words[t - 1:t + 1])
            name = previous if previous in PLACE_NAMES else word if word in PLACE_NAMES else None
            if name is None:
                assert place_target == IGNORE
            else:
                d = labels[PLACE_NAMES.index(name)]
                assert place_target == (10 if d == EMPTY else d)
    assert (targets["place_words"] != IGNORE).any() and (targets["digit_words"] != IGNORE).any()


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
