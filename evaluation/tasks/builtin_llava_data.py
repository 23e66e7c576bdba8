"""Digits VQA as LLaVA prompts: the word tokenizer, the prompt layout and batch collation.

A prompt row is ``[pad ... | <bos> | <image> x V | question words]`` (left padded, so every
prompt ends at the last column and generation appends after it); the answer is generated as one
word followed by ``<eos>``. On the task's 192 px canvas V = 144 image tokens (16 px patches)
against at most 15 prompt tokens (<s> and <= 14 words). A training curriculum may use smaller canvases (V = 9 or 36).

Example:
    >>> tokenizer = build_llava_tokenizer()
    >>> data = DigitsVQA("val", 64, seed=0)
    >>> inputs, answers = collate_llava(data.examples, tokenizer)  # answers: the words
"""
from __future__ import annotations

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

from .digits import ANSWER_VOCAB, PATCH_PX, Example, question_words, render

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL = (PAD, UNK, BOS, EOS, IMAGE)


def build_llava_tokenizer() -> Tokenizer:
    """The word-level tokenizer of the built-in LLaVA: specials, question words, answer words."""
    words = sorted(set(question_words()) | set(ANSWER_VOCAB))
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL) + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIAL])
    return tokenizer


def token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Ids of the special tokens, by name."""
    return {name: tokenizer.token_to_id(tok) for name, tok in
            zip(("pad", "unk", "bos", "eos", "image"), SPECIAL)}


def num_image_tokens(canvas_px: int) -> int:
    """V, the image tokens of a canvas (one per 16 px patch; the vision CLS is dropped)."""
    return (canvas_px // PATCH_PX) ** 2


def collate_llava(examples: list[Example], tokenizer: Tokenizer, noise_std: float = 0.0,
                  noise_seeds: list[int] | None = None, with_answer: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Left-padded LLaVA prompts (optionally followed by ``answer </s>``) and the answer words.

    Shapes:
        input_ids, attention_mask (B, N) with N = 1 + V + longest question (+ 2 with the answer);
        pixel_values (B, 1, S, S), S = ``Example.canvas_px`` (shared by the batch).
    """
    ids = token_ids(tokenizer)
    num_image = num_image_tokens(examples[0].canvas_px)
    rows = []
    for e in examples:
        words = tokenizer.encode(e.question, add_special_tokens=False).ids
        row = [ids["bos"], *[ids["image"]] * num_image, *words]
        if with_answer:
            row += [tokenizer.token_to_id(e.answer), ids["eos"]]
        rows.append(row)
    n = max(len(r) for r in rows)
    input_ids = torch.tensor([[ids["pad"]] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    seeds = noise_seeds if noise_seeds is not None else [0] * len(examples)
    pixels = np.stack([render(e, noise_std, s) for e, s in zip(examples, seeds)])[:, None]
    inputs = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": torch.from_numpy(pixels)}
    return inputs, [e.answer for e in examples]


def normalize_answer(text: str) -> str:
    """Lower case, specials and surrounding space removed: what exact match compares."""
    for tok in SPECIAL:
        text = text.replace(tok, " ")
    return " ".join(text.lower().split())
