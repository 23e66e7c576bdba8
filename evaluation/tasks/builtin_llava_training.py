"""Training recipe of the built-in digits-VQA LLaVA: the ViLT's canvas curriculum and grounding heads.

What made the built-in ViLT learn (:mod:`~pumer_plug.evaluation.tasks.builtin_training`) carries
over to a decoder VLM:

1. **Canvas curriculum** (:data:`LLAVA_CURRICULUM`): 48 px canvases first (9 image tokens, every
   patch a grid cell, steps ~6x cheaper), then 96 px, then the task's 192 px (144 image tokens).
   The CLIP tower interpolates its position table to each grid (``interpolate_pos_encoding``),
   which starts as a 2-D sine-cosine table, so a region keeps about the same positions at every size.
   The decoder's RoPE positions are those of the task canvas on every stage (:func:`task_positions`):
   with plain numbering the question sat ~10 positions after a 9-token image in stage 1 and ~145
   after the task's 144 tokens, and what attention learned did not carry over (val 77.0% with
   plain positions, 95.6% with these; same steps, seed 0).
2. **Auxiliary heads** (:class:`~pumer_plug.evaluation.tasks.builtin_training.AuxiliaryHeads`,
   dropped after training), read from the decoder's final hidden states: every image token names
   its region and digit; the last prompt token (the one that generates the answer) names the
   digit in every cell and the digit counts; question words name how often their digit appears
   and the digit in the place they name. Causal attention lets only text after the image see it,
   so these targets teach exactly the text -> image reads that FastV's and PuMer's scores use.

The answer loss is next-token cross-entropy on the answer word and ``</s>``. The saved model is a
plain ``LlavaForConditionalGeneration``.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import LlavaForConditionalGeneration

from pumer_plug.evaluation.training.loop import decay_groups, schedule

from .builtin_llava_data import collate_llava, num_image_tokens, token_ids
from .builtin_training import AuxiliaryHeads, Stage, auxiliary_targets, grounding_losses, run_stages
from .digits import CANVAS_PX, PATCH_PX, DigitsVQA, Example

#: 48 px (V = 9), 96 px (V = 36), then the task's 192 px (V = 144)
LLAVA_CURRICULUM = (Stage(1, 1, 1200), Stage(2, 2, 300), Stage(4, 2, 160))


def curriculum_data(curriculum: tuple[Stage, ...], batch_size: int, seed: int) -> list[tuple[DigitsVQA, int]]:
    """One (train dataset, steps) per stage; stage i draws from seed ``seed * 1000 + 500 + i``."""
    return [(DigitsVQA("train", stage.steps * batch_size, seed * 1000 + 500 + i, jitter=stage.jitter,
                       region_patches=stage.region_patches), stage.steps)
            for i, stage in enumerate(curriculum)]


def task_positions(mask: torch.Tensor, grid: int, task_grid: int = CANVAS_PX // PATCH_PX) -> torch.Tensor:
    """Decoder positions that put a small canvas's tokens where the task's canvas has them.

    ``generate`` numbers a left-padded prompt ``0, 1, ...`` from its ``<s>``, so on the task's
    192 px canvas the question starts at position 145. On a curriculum canvas of ``grid x grid``
    image tokens, RoPE would otherwise see the question ~10 positions after the image instead of
    ~145, and what attention learned about those distances would not carry over. Here image
    token (row, col) takes the position of the task-canvas patch at the same place (its block's
    centre) and every later token is shifted as if the image had ``task_grid ** 2`` tokens. On the
    task's own canvas the result equals the plain numbering.

    Shapes:
        mask (B, N) with 1 on prompt tokens, left padded -> positions (B, N), long
    """
    plain = (mask.cumsum(-1) - 1).clamp(min=0)  # 0 = <s>, 1..V image, then text
    V, scale = grid * grid, task_grid // grid
    k = (plain - 1).clamp(0, V - 1)
    row, col = k // grid * scale + scale // 2, k % grid * scale + scale // 2
    image = 1 + row * task_grid + col
    after = plain + task_grid * task_grid - V
    return torch.where(plain == 0, plain, torch.where(plain <= V, image, after))


def decoder_hidden(model: LlavaForConditionalGeneration, inputs: dict[str, torch.Tensor],
                   task_layout: bool = False) -> torch.Tensor:
    """The decoder's final (normed) hidden states of a prompt batch, image grid of any size.

    Same computation as ``LlavaModel.forward`` with positions from the attention mask (as
    ``generate`` makes them), except that the tower interpolates its positions to the canvas;
    with ``task_layout``, positions come from :func:`task_positions` (training on small canvases).

    Shapes:
        input_ids, attention_mask (B, N); pixel_values (B, 1, S, S) -> (B, N, C)
    """
    llava, config = model.model, model.config
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    embeds = llava.get_input_embeddings()(ids)  # (B, N, C)
    feats = llava.get_image_features(inputs["pixel_values"], vision_feature_layer=config.vision_feature_layer,
                                     vision_feature_select_strategy=config.vision_feature_select_strategy,
                                     interpolate_pos_encoding=True).pooler_output  # B x (V, C)
    image = (ids == config.image_token_id)[..., None]  # (B, N, 1)
    embeds = embeds.masked_scatter(image, torch.cat(list(feats), 0).to(embeds.dtype))
    if task_layout:
        positions = task_positions(mask, inputs["pixel_values"].shape[-1] // PATCH_PX)
    else:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, N)
    return llava.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state


def question_positions(words: list[list[int]], num_image: int, prompt_end: int) -> tuple[torch.Tensor, ...]:
    """Question tokens as ``auxiliary_targets`` numbers them (t = 0 is ``<s>``, t = i + 1 word i),
    where each sits in its left-padded prompt row, and the column of every row's ``<s>``.

    Shapes:
        words: B lists of word ids; prompts end at column ``prompt_end`` (exclusive) ->
        question (B, T) right padded with 0, positions (B, T) (padding clamped to the last
        prompt column), start (B,)
    """
    B, T = len(words), 1 + max(len(w) for w in words)
    question = torch.zeros(B, T, dtype=torch.long)
    start = prompt_end - torch.tensor([1 + num_image + len(w) for w in words])  # (B,)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), num_image + torch.arange(1, T)])  # (T,)
    for b, w in enumerate(words):
        question[b, 1:1 + len(w)] = torch.tensor(w, dtype=torch.long)
    positions = (start[:, None] + offsets).clamp(max=prompt_end - 1)  # (B, T)
    return question, positions, start


def first_token_accuracy(model: LlavaForConditionalGeneration, tokenizer: Tokenizer, data: DigitsVQA,
                         batch_size: int = 64) -> float:
    """Fraction of ``data`` whose greedy first answer token is right, on canvases of any size (the
    tower interpolates its positions; ``generate`` cannot pass that flag to the tower alone; the
    decoder numbers tokens as training does, :func:`task_positions`)."""
    hits = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            chosen = data.examples[start:start + batch_size]
            seeds = [data._noise_base + start + i for i in range(len(chosen))]
            inputs, answers = collate_llava(chosen, tokenizer, data.noise_std, seeds)
            guess = model.lm_head(decoder_hidden(model, inputs, task_layout=True)[:, -1]).argmax(-1)
            hits += [int(g) == tokenizer.token_to_id(a) for g, a in zip(guess, answers)]
    return float(np.mean(hits)) if hits else 0.0


def step_losses(model: LlavaForConditionalGeneration, heads: AuxiliaryHeads, inputs: dict[str, torch.Tensor],
                examples: list[Example], tokenizer: Tokenizer, digit_word_ids: torch.Tensor,
                task_layout: bool = True) -> dict[str, torch.Tensor]:
    """Answer cross-entropy (answer word and ``</s>``) and every auxiliary head's, for one batch.

    The batch holds ``prompt answer </s>`` rows, left padded: the answer is column -2 everywhere.
    """
    hidden = decoder_hidden(model, inputs, task_layout)  # (B, N, C)
    ids = inputs["input_ids"]
    B, N = ids.shape
    V = num_image_tokens(examples[0].canvas_px)
    logits = model.lm_head(hidden[:, -3:-1])  # (B, 2, vocab): predicts the answer, then </s>
    answer_loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, -2:].reshape(-1))
    words = [tokenizer.encode(e.question, add_special_tokens=False).ids for e in examples]
    question, positions, start = question_positions(words, V, N - 2)
    targets = auxiliary_targets(examples, question, digit_word_ids, numbered_places=True)
    rows = torch.arange(B)[:, None]
    text = hidden[rows, positions]  # (B, T, C)
    image = hidden[rows, start[:, None] + 1 + torch.arange(V)]  # (B, V, C), row-major over the grid
    last = hidden[:, -3]  # the last prompt token
    return {"answer": answer_loss,
            **grounding_losses(heads, image, targets["patch"].reshape(B, V), text, last, targets)}


def fit_llava(model: LlavaForConditionalGeneration, stages: list[tuple[DigitsVQA, int]], tokenizer: Tokenizer,
              batch_size: int, learning_rate: float = 1e-3, warmup_fraction: float = 0.06, weight_decay: float = 0.01,
              progress: bool = True, aux_weight: float = 1.0, task_layout: bool = True) -> list[dict[str, float]]:
    """Trains ``model`` in place through ``stages`` of (dataset, steps); returns per-step losses.

    One warm-up + cosine schedule (down to 5% of the peak) spans all stages, stepped by the shared
    loop (:func:`~pumer_plug.evaluation.training.loop.train_steps`). The auxiliary heads are built
    here and discarded at the end. ``task_layout=False`` numbers the decoder's positions plainly on
    every canvas (the format-3 recipe, kept for the ablation in docs/benchmarks.md).

    Raises:
        ValueError: a stage's dataset holds fewer than ``steps * batch_size`` examples.
    """
    for data, steps in stages:
        if len(data) < steps * batch_size:
            raise ValueError(f"a stage has {len(data)} examples, needs steps * batch_size = {steps * batch_size}")
    total_steps = sum(steps for _, steps in stages)
    digit_word_ids = torch.tensor([tokenizer.token_to_id(str(d)) for d in range(10)])
    heads = AuxiliaryHeads(model.config.text_config.hidden_size)
    trained = nn.ModuleList([model, heads])
    optimizer = torch.optim.AdamW(decay_groups(trained, weight_decay), lr=learning_rate, betas=(0.9, 0.98))
    scheduler = schedule(optimizer, "cosine", total_steps, warmup_fraction, min_lr_rate=0.05)
    model.train()

    def stage_batches(data: DigitsVQA, steps: int) -> Iterator[tuple]:
        for step in range(steps):
            chosen = [data.examples[i] for i in range(step * batch_size, (step + 1) * batch_size)]
            seeds = [data._noise_base + step * batch_size + i for i in range(batch_size)]
            inputs, _ = collate_llava(chosen, tokenizer, data.noise_std, seeds, with_answer=True)
            yield inputs, chosen

    def losses(batch: tuple) -> dict[str, torch.Tensor]:
        terms = step_losses(model, heads, *batch, tokenizer, digit_word_ids, task_layout)
        return {k: v if k == "answer" else aux_weight * v for k, v in terms.items()}

    history = run_stages("built-in LLaVA", stages, stage_batches, losses, optimizer, scheduler, model, progress)
    model.eval()
    return history


__all__ = ["LLAVA_CURRICULUM", "curriculum_data", "decoder_hidden", "fit_llava", "step_losses", "token_ids"]
