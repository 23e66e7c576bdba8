"""Digits VQA: visual question answering over the real handwritten digits shipped in scikit-learn.

Each example is a canvas of ``CANVAS_PX x CANVAS_PX`` grey pixels holding up to nine digit images
(``sklearn.datasets.load_digits``: 1797 8x8 scans, grey levels 0..16) in a 3 x 3 grid of regions,
and an English question whose answer needs the image (what digit is where, is there a d, how many,
which is larger). Answers are classes of a fixed answer vocabulary, as in ViLT's VQAv2 head.

Layout, chosen so that a from-scratch ViLT learns it on a CPU: every digit is upscaled to
``PATCH_PX x PATCH_PX`` (2x nearest neighbour) and placed exactly on one ViLT patch cell; a region
is ``REGION_PATCHES x REGION_PATCHES`` patches and the digit sits on one of its central cells
(patch-aligned jitter). The canvas has ``IMAGE_PATCHES`` = 144 patches against at most
``MAX_QUESTION_TOKENS`` = 16 text tokens, so image tokens dominate as in real VQA. A training
curriculum may draw smaller canvases (``region_patches`` < 4: 48, 96 or 144 px, same grid and
questions); the task itself (val, test, ``pumer-plug compare``) always uses the 192 px canvas.

Splits: the 1797 digit images are first partitioned by ``image_seed`` into train/val/test
(70/15/15 %), so val and test canvases only show digit scans the train split never saw; questions
and layouts are then drawn from ``(seed, split)``.

Example:
    >>> data = DigitsVQA("val", num_examples=256, seed=0)
    >>> inputs, answer_ids = next(data.batches(batch_size=64))
    >>> logits = model(**inputs).logits  # (64, len(ANSWER_VOCAB))
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

PATCH_PX = 16  # ViLT patch size; one digit covers exactly one patch
REGION_PATCHES = 4  # a grid region is 4 x 4 patches
GRID_CELLS = 3  # 3 x 3 regions
CANVAS_PX = PATCH_PX * REGION_PATCHES * GRID_CELLS  # 192
IMAGE_PATCHES = (CANVAS_PX // PATCH_PX) ** 2  # 144
MAX_QUESTION_TOKENS = 16  # including [CLS] and [SEP]
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")  # [PAD] = 0
ANSWER_VOCAB = tuple(str(d) for d in range(10)) + ("yes", "no", "none")
ANSWER_TO_ID = {a: i for i, a in enumerate(ANSWER_VOCAB)}

ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "center", "right")
# Cell index = 3 * row + col; names as a reader would say them ("center", not "middle center").
PLACE_NAMES = tuple(
    "center" if (r, c) == (1, 1) else f"{ROW_NAMES[r]} {COL_NAMES[c]}"
    for r in range(GRID_CELLS) for c in range(GRID_CELLS)
)
QUESTION_TYPES = (
    "place", "row_column", "exists", "count_all", "count_digit", "compare_yes_no", "compare_which",
)
QUESTION_WEIGHTS = (0.20, 0.10, 0.15, 0.10, 0.15, 0.15, 0.15)
EMPTY = -1


@dataclass(frozen=True)
class Example:
    """One canvas (as a layout, rendered on demand) with one question.

    Attributes:
        digit_indices: per grid cell (row-major, 9 cells), index into ``load_digits()`` or -1.
        cell_labels: per grid cell, the digit class 0..9 shown there or -1 for an empty cell.
        offsets: per grid cell, the (row, col) patch offset of the digit inside its region.
        question: lower-case English question, words separated by spaces.
        answer: one entry of ``ANSWER_VOCAB``.
        question_type: one of ``QUESTION_TYPES``.
        region_patches: side of a grid region in patches; the canvas is ``3 * region_patches``
            patches wide (``REGION_PATCHES`` = 4 for the task; smaller only in a training curriculum).
    """

    digit_indices: tuple[int, ...]
    cell_labels: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]
    question: str
    answer: str
    question_type: str
    region_patches: int = REGION_PATCHES

    @property
    def canvas_px(self) -> int:
        """Side of the rendered canvas in pixels."""
        return PATCH_PX * GRID_CELLS * self.region_patches

    def digit_patches(self) -> list[tuple[int, int, int]]:
        """Returns (patch row, patch column, digit label) of every placed digit."""
        r = self.region_patches
        return [((cell // GRID_CELLS) * r + dy, (cell % GRID_CELLS) * r + dx, label)
                for cell, (label, (dy, dx)) in enumerate(zip(self.cell_labels, self.offsets)) if label != EMPTY]


@functools.lru_cache(maxsize=1)
def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """Returns scikit-learn's digit scans and labels, loaded once from the installed package.

    Shapes:
        images (1797, 8, 8) float32 in [0, 16]; labels (1797,) int64.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def split_image_indices(split: str, image_seed: int = 0) -> np.ndarray:
    """Returns the sorted ``load_digits`` indices that belong to ``split`` (disjoint across splits).

    Raises:
        ValueError: if ``split`` is not one of ``SPLITS``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    num_images = len(digit_images()[1])
    order = np.random.default_rng(image_seed).permutation(num_images)
    bounds = np.cumsum([0] + [round(f * num_images) for f in SPLIT_FRACTIONS])
    bounds[-1] = num_images
    k = SPLITS.index(split)
    return np.sort(order[bounds[k]:bounds[k + 1]])


def _ask(kind: str, labels: list[int], rng: np.random.Generator) -> tuple[str, str] | None:
    """Draws one question of ``kind`` about ``labels`` (9 cells); None if it does not apply."""
    full = [i for i, d in enumerate(labels) if d != EMPTY]
    present = sorted({labels[i] for i in full})
    if kind in ("place", "row_column"):
        empty = [i for i, d in enumerate(labels) if d == EMPTY]
        cell = int(rng.choice(empty if empty and rng.random() < 0.15 else full))
        answer = "none" if labels[cell] == EMPTY else str(labels[cell])
        if kind == "place":
            return f"what digit is in the {PLACE_NAMES[cell]} ?", answer
        return f"what digit is in row {cell // 3 + 1} column {cell % 3 + 1} ?", answer
    if kind == "exists":
        absent = [d for d in range(10) if d not in present]
        digit = int(rng.choice(present if rng.random() < 0.5 or not absent else absent))
        return f"is there a {digit} ?", "yes" if digit in present else "no"
    if kind == "count_all":
        return "how many digits are there ?", str(len(full))
    if kind == "count_digit":
        digit = int(rng.choice(present) if rng.random() < 0.6 else rng.integers(10))
        return f"how many times does {digit} appear ?", str(labels.count(digit))
    a, b = (int(i) for i in rng.choice(full, size=2, replace=False))
    if kind == "compare_yes_no":
        answer = "yes" if labels[a] > labels[b] else "no"
        return f"is the {PLACE_NAMES[a]} digit larger than the {PLACE_NAMES[b]} digit ?", answer
    if labels[a] == labels[b]:
        return None
    answer = str(max(labels[a], labels[b]))
    return f"which is larger , the {PLACE_NAMES[a]} digit or the {PLACE_NAMES[b]} digit ?", answer


def make_example(rng: np.random.Generator, pool: np.ndarray, jitter: int = 2,
                 question_types: tuple[str, ...] = QUESTION_TYPES, region_patches: int = REGION_PATCHES) -> Example:
    """Draws one layout from the digit scans in ``pool`` and one question about it.

    Args:
        rng: the generator all randomness comes from.
        pool: ``load_digits`` indices this example may show.
        jitter: how many patch offsets per axis a digit may take inside its region (1..4).
        question_types: the question types to draw from (``QUESTION_WEIGHTS`` renormalised).
        region_patches: side of a grid region in patches (jitter is capped at it).
    """
    weights = np.array([QUESTION_WEIGHTS[QUESTION_TYPES.index(k)] for k in question_types])
    _, all_labels = digit_images()
    num_digits = int(rng.integers(2, 8))  # 2..7 digits on 9 cells
    cells = set(rng.choice(GRID_CELLS**2, size=num_digits, replace=False).tolist())
    indices = [int(rng.choice(pool)) if c in cells else EMPTY for c in range(GRID_CELLS**2)]
    labels = [int(all_labels[i]) if i != EMPTY else EMPTY for i in indices]
    jitter = min(jitter, region_patches)
    low = (region_patches - jitter) // 2
    offsets = tuple((low + int(rng.integers(jitter)), low + int(rng.integers(jitter))) for _ in indices)
    while True:
        kind = question_types[int(rng.choice(len(question_types), p=weights / weights.sum()))]
        asked = _ask(kind, labels, rng)
        if asked is not None:
            return Example(tuple(indices), tuple(labels), offsets, asked[0], asked[1], kind, region_patches)


def render(example: Example, noise_std: float = 0.0, noise_seed: int = 0) -> np.ndarray:
    """Draws the canvas of ``example``: background -1, ink up to +1 (ViLT-like [-1, 1] range).

    Shapes:
        returns (canvas_px, canvas_px) float32; canvas_px = CANVAS_PX for the task's examples.
    """
    images, _ = digit_images()
    canvas = np.full((example.canvas_px, example.canvas_px), -1.0, dtype=np.float32)
    scale = PATCH_PX // 8
    placed = [i for i in example.digit_indices if i != EMPTY]
    for index, (row, col, _) in zip(placed, example.digit_patches()):
        glyph = np.kron(images[index], np.ones((scale, scale), dtype=np.float32))  # (16, 16)
        canvas[row * PATCH_PX:(row + 1) * PATCH_PX, col * PATCH_PX:(col + 1) * PATCH_PX] = glyph / 8.0 - 1.0
    if noise_std > 0:
        canvas += np.random.default_rng(noise_seed).normal(0.0, noise_std, canvas.shape).astype(np.float32)
    return canvas


def question_words() -> list[str]:
    """Returns every word the question templates can produce, sorted."""
    words = {"what", "digit", "is", "in", "the", "row", "column", "there", "a", "how", "many",
             "digits", "are", "times", "does", "appear", "larger", "than", "which", "or", "?", ","}
    words |= {str(d) for d in range(10)} | set(ROW_NAMES) | set(COL_NAMES)
    return sorted(words)


def build_tokenizer() -> Tokenizer:
    """Builds the word-level tokenizer of the task: [PAD]=0, [UNK], [CLS] ... [SEP], batch padding."""
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + question_words())}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest question of a batch
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Writes ``tokenizer.json`` into ``directory`` and returns its path."""
    path = Path(directory) / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Reads ``tokenizer.json`` from ``directory`` (padding settings included)."""
    return Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))


def collate(examples: list[Example], tokenizer: Tokenizer, noise_std: float = 0.0,
            noise_seeds: list[int] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Builds ViLT keyword inputs and answer ids for a list of examples.

    Returns:
        ``(inputs, answer_ids)``; ``inputs`` holds exactly the keyword arguments of
        ``ViltForQuestionAnswering.forward``: input_ids, attention_mask, token_type_ids,
        pixel_values, pixel_mask. Labels are kept out of ``inputs``.

    Shapes:
        input_ids, attention_mask, token_type_ids (B, T) with T the longest question of the batch;
        pixel_values (B, 1, S, S); pixel_mask (B, S, S) with S = ``Example.canvas_px`` (CANVAS_PX
        for the task; all examples of a batch share it);
        answer_ids (B,).
    """
    encodings = tokenizer.encode_batch([e.question for e in examples])
    seeds = noise_seeds if noise_seeds is not None else [0] * len(examples)
    pixels = np.stack([render(e, noise_std, s) for e, s in zip(examples, seeds)])[:, None]
    inputs = {
        "input_ids": torch.tensor([enc.ids for enc in encodings], dtype=torch.long),
        "attention_mask": torch.tensor([enc.attention_mask for enc in encodings], dtype=torch.long),
        "token_type_ids": torch.tensor([enc.type_ids for enc in encodings], dtype=torch.long),
        "pixel_values": torch.from_numpy(pixels),
        "pixel_mask": torch.ones(pixels.shape[0], pixels.shape[2], pixels.shape[3], dtype=torch.long),
    }
    answer_ids = torch.tensor([ANSWER_TO_ID[e.answer] for e in examples], dtype=torch.long)
    return inputs, answer_ids


class DigitsVQA(torch.utils.data.Dataset):
    """A deterministic list of digits-VQA examples of one split.

    Args:
        split: "train", "val" or "test".
        num_examples: how many examples to draw.
        seed: seed of layouts, questions and pixel noise (the same seed gives the same examples).
        image_seed: seed of the digit-image partition; keep it equal across splits compared.
        tokenizer: the word-level tokenizer; ``build_tokenizer()`` when None.
        noise_std: standard deviation of Gaussian pixel noise on the [-1, 1] canvas.
        jitter: patch offsets per axis a digit may take inside its region (1..4).
        question_types: which of ``QUESTION_TYPES`` to ask (all by default).
        region_patches: side of a grid region in patches; 4 (the task's 192 px canvas) unless a
            training curriculum asks for a smaller canvas.

    Raises:
        ValueError: on an unknown split or question type, a negative size, or a jitter or region size
            outside 1..4.
    """

    answer_vocab = ANSWER_VOCAB

    def __init__(self, split: str, num_examples: int, seed: int = 0, *, image_seed: int = 0,
                 tokenizer: Tokenizer | None = None, noise_std: float = 0.05, jitter: int = 2,
                 question_types: tuple[str, ...] = QUESTION_TYPES, region_patches: int = REGION_PATCHES):
        if num_examples < 0 or not 1 <= jitter <= REGION_PATCHES or not 1 <= region_patches <= REGION_PATCHES:
            raise ValueError(f"need num_examples >= 0, 1 <= jitter <= {REGION_PATCHES} and 1 <= region_patches <= "
                             f"{REGION_PATCHES}, got {num_examples}, {jitter}, {region_patches}")
        if not question_types or set(question_types) - set(QUESTION_TYPES):
            raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES}")
        self.split, self.seed, self.noise_std = split, seed, noise_std
        self.image_indices = split_image_indices(split, image_seed)
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        self.examples = [make_example(rng, self.image_indices, jitter, tuple(question_types), region_patches)
                         for _ in range(num_examples)]
        self._noise_base = int(rng.integers(2**31))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def collate(self, indices: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Returns ``(inputs, answer_ids)`` for the examples at ``indices`` (see :func:`collate`)."""
        seeds = [self._noise_base + int(i) for i in indices]
        return collate([self.examples[i] for i in indices], self.tokenizer, self.noise_std, seeds)

    def batches(self, batch_size: int, shuffle: bool = False, shuffle_seed: int = 0,
                drop_last: bool = False) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Yields ``(inputs, answer_ids)`` batches in order, or shuffled by ``shuffle_seed``.

        Shapes:
            see :func:`collate`; B = ``batch_size`` (the last batch may be smaller).
        """
        order = np.arange(len(self))
        if shuffle:
            order = np.random.default_rng(shuffle_seed).permutation(len(self))
        stop = len(self) - len(self) % batch_size if drop_last else len(self)
        for start in range(0, stop, batch_size):
            yield self.collate(order[start:start + batch_size].tolist())

    def answer_counts(self) -> Counter:
        """Returns how often each answer occurs in this dataset."""
        return Counter(e.answer for e in self.examples)


def majority_answer_accuracy(split: DigitsVQA, reference: DigitsVQA | None = None) -> float:
    """Returns the accuracy of always answering the most frequent answer of ``reference``.

    ``reference`` defaults to ``split`` itself (the optimistic majority baseline).
    """
    answer = (reference or split).answer_counts().most_common(1)[0][0]
    return sum(e.answer == answer for e in split.examples) / max(len(split), 1)


def question_prior_accuracy(split: DigitsVQA, reference: DigitsVQA) -> float:
    """Returns the accuracy of a text-only model: the most frequent ``reference`` answer per question.

    This is the best a model that ignores the image can do (up to sampling noise); questions unseen
    in ``reference`` fall back to the overall majority answer.
    """
    per_question: dict[str, Counter] = {}
    for e in reference.examples:
        per_question.setdefault(e.question, Counter())[e.answer] += 1
    fallback = reference.answer_counts().most_common(1)[0][0]
    best = {q: c.most_common(1)[0][0] for q, c in per_question.items()}
    hits = sum(best.get(e.question, fallback) == e.answer for e in split.examples)
    return hits / max(len(split), 1)
