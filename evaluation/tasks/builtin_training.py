"""Training recipe of the built-in digits-VQA ViLT: a canvas curriculum and dense auxiliary targets.

A from-scratch ViLT trained on the answer alone sits at the question-only prior for many CPU
minutes: one answer per example is too little signal to discover *which* of 144 image tokens a
question is about. Two things make it learn within a few minutes on 2 CPU cores:

1. **Canvas curriculum** (:data:`CURRICULUM`). Training starts on 48 px canvases (a 3 x 3 grid of
   one-patch regions: 9 image tokens, every patch a cell, ~8x cheaper steps), then 96 px, then
   the task's 192 px canvas. ViLT interpolates its image position embeddings to the patch grid of
   each input (``ViltEmbeddings.visual_embed``), so a region keeps roughly the same positions at
   every canvas size and what is learned on small canvases carries over.
2. **Auxiliary heads** (:class:`AuxiliaryHeads`, dropped after training) give ~170 targets per
   example: every final image token names its region and digit (or background); the pooled
   output names the digit in each cell, how often each digit appears and how many digits there
   are; every digit word of the question (row and column numbers included) names how often its
   digit appears, and the last word of every place phrase ("top left") names the digit in that
   cell. The word targets ground question words in the image, which is what the "is there a d",
   "how many d" and comparison questions need.

Measured figures of the default recipe are in ``builtin.json`` of the cache and in
``docs/benchmarks.md``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn
from tqdm.auto import tqdm
from transformers import ViltForQuestionAnswering

from pumer_plug.evaluation.training.loop import decay_groups, schedule, train_steps

from .digits import EMPTY, GRID_CELLS, PATCH_PX, PLACE_NAMES, DigitsVQA, Example, build_tokenizer

IGNORE = -100  # cross-entropy target of tokens without a target
NUM_CELLS = GRID_CELLS**2
BACKGROUND = NUM_CELLS * 10  # patch class of a patch without ink; ink is region * 10 + digit


@dataclass(frozen=True)
class Stage:
    """One stage of the canvas curriculum.

    Attributes:
        region_patches: side of a grid region in patches (canvas = 3 * region_patches patches).
        jitter: patch offsets per axis a digit may take inside its region.
        steps: optimizer steps of the stage.
    """

    region_patches: int
    jitter: int
    steps: int


CURRICULUM = (Stage(1, 1, 1200), Stage(2, 2, 300), Stage(4, 2, 200))


def curriculum_datasets(curriculum: tuple[Stage, ...], batch_size: int, seed: int,
                        tokenizer: Tokenizer) -> list[tuple[DigitsVQA, int]]:
    """Returns one (train dataset, steps) per stage; stage i draws from seed ``seed * 1000 + i``.

    Every stage draws fresh layouts and questions from the train digit images only.
    """
    return [(DigitsVQA("train", stage.steps * batch_size, seed * 1000 + i, tokenizer=tokenizer, jitter=stage.jitter,
                       region_patches=stage.region_patches), stage.steps)
            for i, stage in enumerate(curriculum)]


class AuxiliaryHeads(nn.Module):
    """Training-only heads with dense targets (see the module docstring); the saved model has none.

    Shapes:
        patch: final image tokens (B, V, C) -> (B, V, 91): region * 10 + digit, 90 = background.
        layout: pooled (B, C) -> (B, 9, 11): digit per cell, 10 = empty.
        counts: pooled (B, C) -> (B, 11, 10): how often each digit appears, then how many digits
            there are (0..9 each).
        digit_words: final text tokens (B, T, C) -> (B, T, 10): how often the word's digit appears.
        place_words: final text tokens (B, T, C) -> (B, T, 11): digit in the named cell, 10 = empty.
    """

    def __init__(self, hidden_size: int):
        super().__init__()

        def head(classes: int) -> nn.Module:
            return nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, classes))

        self.patch = head(BACKGROUND + 1)
        self.layout = nn.Linear(hidden_size, NUM_CELLS * 11)
        self.counts = nn.Linear(hidden_size, 11 * (NUM_CELLS + 1))
        self.digit_words = head(NUM_CELLS + 1)
        self.place_words = head(11)


def auxiliary_targets(examples: list[Example], input_ids: torch.Tensor,
                      digit_word_ids: torch.Tensor, numbered_places: bool = False) -> dict[str, torch.Tensor]:
    """Returns the targets of :class:`AuxiliaryHeads` for one batch.

    Token ``t`` of a question is word ``t - 1`` (the tokenizer is word-level with [CLS] first).
    A place named in words ("top left") gives its last word a ``place_words`` target. With
    ``numbered_places``, a place named by numbers ("row 2 column 3") does too, on the column
    number, and its two numbers get no ``digit_words`` target (they name a place, not a digit).

    Shapes:
        input_ids (B, T); digit_word_ids (10,): token id of the words "0".."9".
        returns patch (B, P, P) on the canvas patch grid, layout (B, 9), counts (B, 11),
        digit_words (B, T) and place_words (B, T) with ``IGNORE`` where a token has no target.
    """
    labels = torch.tensor([e.cell_labels for e in examples], dtype=torch.long)  # (B, 9)
    counts = (labels[:, :, None] == torch.arange(10)).sum(1)  # (B, 10): how often each digit appears
    grid = examples[0].canvas_px // PATCH_PX
    patch = torch.full((len(examples), grid, grid), BACKGROUND, dtype=torch.long)
    place_words = torch.full(input_ids.shape, IGNORE, dtype=torch.long)
    numbers = torch.zeros(input_ids.shape, dtype=torch.bool)  # tokens that number a row or column
    for b, example in enumerate(examples):
        r = example.region_patches
        for row, col, label in example.digit_patches():
            patch[b, row, col] = (row // r * GRID_CELLS + col // r) * 10 + label
        words = example.question.split()
        for i, word in enumerate(words):
            phrase = " ".join(words[i - 1:i + 1])
            cell = PLACE_NAMES.index(phrase) if phrase in PLACE_NAMES else (
                PLACE_NAMES.index(word) if word in PLACE_NAMES else None)
            if numbered_places and i >= 3 and words[i - 3] == "row" and words[i - 1] == "column":
                cell = GRID_CELLS * (int(words[i - 2]) - 1) + int(word) - 1
                numbers[b, [i - 1, i + 1]] = True  # tokens of the row and column numbers
            if cell is not None:
                place_words[b, i + 1] = 10 if labels[b, cell] == EMPTY else labels[b, cell]
    is_digit = (input_ids[:, :, None] == digit_word_ids) & ~numbers[:, :, None]  # (B, T, 10)
    digit_words = torch.where(is_digit.any(-1), (is_digit.long() * counts[:, None, :]).sum(-1), IGNORE)
    total = counts.sum(1, keepdim=True)  # (B, 1): how many digits
    return {"patch": patch, "layout": torch.where(labels == EMPTY, 10, labels), "counts": torch.cat([counts, total], 1),
            "digit_words": digit_words, "place_words": place_words}


@contextlib.contextmanager
def _capture(model: ViltForQuestionAnswering) -> Iterator[dict[str, torch.Tensor]]:
    """Records the pooled output, the final sequence and ViLT's image-token order during a forward.

    ViLT's ``visual_embed`` returns the grid position of every image token (it may shuffle them),
    which ``ViltEmbeddings.forward`` drops; a wrapper set on the instance keeps them and is deleted
    on exit, restoring the class method.
    """
    captured: dict[str, torch.Tensor] = {}
    embeddings = model.vilt.embeddings
    visual_embed = embeddings.visual_embed

    def recording_visual_embed(*args, **kwargs):
        x, x_mask, (patch_index, hw) = visual_embed(*args, **kwargs)
        captured["patch_index"] = patch_index  # (B, V, 2): grid (row, col) of each image token
        return x, x_mask, (patch_index, hw)

    def keep(name: str, use_input: bool):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            captured[name] = args[0] if use_input else output  # returning None keeps the output
        return hook

    handles = [model.classifier.register_forward_hook(keep("pooled", True)),  # (B, C)
               model.vilt.layernorm.register_forward_hook(keep("sequence", False))]  # (B, N, C)
    embeddings.visual_embed = recording_visual_embed
    try:
        yield captured
    finally:
        del embeddings.visual_embed
        for handle in handles:
            handle.remove()


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not ``IGNORE`` (0 when there are none)."""
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if not (targets != IGNORE).any():
        return logits.sum() * 0.0
    return nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE)


def step_losses(model: ViltForQuestionAnswering, heads: AuxiliaryHeads, inputs: dict[str, torch.Tensor],
                answer_ids: torch.Tensor, examples: list[Example],
                digit_word_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Returns the answer cross-entropy and the cross-entropy of every auxiliary head for one batch."""
    with _capture(model) as captured:
        logits = model(**inputs).logits  # (B, answers)
    targets = auxiliary_targets(examples, inputs["input_ids"], digit_word_ids)
    num_text = inputs["input_ids"].shape[1]
    text, image = captured["sequence"][:, :num_text], captured["sequence"][:, num_text + 1:]  # skip image CLS
    rows, cols = captured["patch_index"].unbind(-1)  # (B, V) each
    patch = targets["patch"][torch.arange(len(examples))[:, None], rows, cols]  # (B, V)
    return {"answer": nn.functional.cross_entropy(logits, answer_ids),
            **grounding_losses(heads, image, patch, text, captured["pooled"], targets)}


def grounding_losses(heads: AuxiliaryHeads, image: torch.Tensor, patch: torch.Tensor, text: torch.Tensor,
                     summary: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The training-only grounding terms of the built-in recipes (ViLT and LLaVA).

    Shapes:
        image (B, V, C) in raster order, patch (B, V) targets of those tokens, text (B, T, C),
        summary (B, C) (ViLT's pooled output, LLaVA's last prompt token) -> scalar per term
    """
    patch_logits = heads.patch(image)  # (B, V, 91)
    ink = patch != BACKGROUND
    return {
        # ink and background weigh the same: 2-7 digit patches against 137-142 background ones
        "patch": _cross_entropy(patch_logits[ink], patch[ink]) + _cross_entropy(patch_logits[~ink], patch[~ink]),
        "layout": _cross_entropy(heads.layout(summary).view(-1, NUM_CELLS, 11), targets["layout"]),
        "counts": _cross_entropy(heads.counts(summary).view(-1, 11, NUM_CELLS + 1), targets["counts"]),
        "digit_words": _cross_entropy(heads.digit_words(text), targets["digit_words"]),
        "place_words": _cross_entropy(heads.place_words(text), targets["place_words"]),
    }


def fit(model: ViltForQuestionAnswering, stages: list[tuple[DigitsVQA, int]], batch_size: int,
        learning_rate: float = 1e-3, warmup_fraction: float = 0.06, weight_decay: float = 0.01,
        progress: bool = True) -> list[dict[str, float]]:
    """Trains ``model`` in place through ``stages`` of (dataset, steps); returns per-step losses.

    Each stage takes consecutive batches of its dataset; one warm-up + cosine schedule spans all
    stages (transformers' cosine schedule down to 5% of the peak), stepped by the shared loop
    (:func:`~pumer_plug.evaluation.training.loop.train_steps`). Loss: the sum of :func:`step_losses`
    (answer + auxiliary heads, all weight 1). The auxiliary heads are built here and discarded at the end.

    Raises:
        ValueError: if a stage's dataset holds fewer than ``steps * batch_size`` examples.
    """
    for data, steps in stages:
        if len(data) < steps * batch_size:
            raise ValueError(f"a stage has {len(data)} examples, needs steps * batch_size = {steps * batch_size}")
    total_steps = sum(steps for _, steps in stages)
    vocab = build_tokenizer().get_vocab()
    digit_word_ids = torch.tensor([vocab[str(d)] for d in range(10)])
    heads = AuxiliaryHeads(model.config.hidden_size)
    trained = nn.ModuleList([model, heads])
    optimizer = torch.optim.AdamW(decay_groups(trained, weight_decay), lr=learning_rate, betas=(0.9, 0.98))
    scheduler = schedule(optimizer, "cosine", total_steps, warmup_fraction, min_lr_rate=0.05)
    model.train()

    def stage_batches(data: DigitsVQA, steps: int) -> Iterator[tuple]:
        for step in range(steps):
            indices = list(range(step * batch_size, (step + 1) * batch_size))
            yield (*data.collate(indices), [data.examples[i] for i in indices])

    def losses(batch: tuple) -> dict[str, torch.Tensor]:
        inputs, answer_ids, examples = batch
        return step_losses(model, heads, inputs, answer_ids, examples, digit_word_ids)

    history = run_stages("built-in ViLT", stages, stage_batches, losses, optimizer, scheduler, model, progress)
    model.eval()
    return history


def run_stages(name: str, stages: list[tuple[DigitsVQA, int]], stage_batches: Callable[[DigitsVQA, int], Iterator[Any]],
               losses: Callable[[Any], dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer, scheduler: Any,
               model: nn.Module, progress: bool) -> list[dict[str, float]]:
    """The curriculum's steps, stage after stage, through the shared loop; one progress bar per stage
    (a stage's steps differ in cost from the others', so does its ETA). Returns the per-step loss terms."""
    history: list[dict[str, float]] = []
    for k, (data, steps) in enumerate(stages):
        canvas = f" ({data.examples[0].canvas_px} px)" if len(data) else ""
        with tqdm(total=steps, disable=not progress, desc=f"training {name}, stage {k + 1}/{len(stages)}{canvas}",
                  unit="step") as bar:
            for values in train_steps(stage_batches(data, steps), losses, optimizer, scheduler, model.parameters()):
                history.append({key: v for key, v in values.items() if key != "loss"})
                bar.update()
                if len(history) % 10 == 1:
                    bar.set_postfix({key: f"{np.mean([h[key] for h in history[-20:]]):.2f}"
                                     for key in ("answer", "patch", "layout")})
    return history
