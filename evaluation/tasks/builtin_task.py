"""The built-in task: VQA over scikit-learn's handwritten digits with a small ViLT trained here.

The model and its cache are in :mod:`~pumer_plug.evaluation.tasks.builtin`, the data in
:mod:`~pumer_plug.evaluation.tasks.digits`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from pumer_plug.errors import UserError

from . import builtin
from .base import Batch, Reiterable, Task, TaskOptions
from .digits import ANSWER_VOCAB, CANVAS_PX, SPLITS, DigitsVQA, majority_answer_accuracy, question_prior_accuracy

NUM_TRAIN_EXAMPLES = 2048


class DatasetBatches(Sequence):
    """Shuffled, equal-sized batches of a :class:`DigitsVQA`, collated on access."""

    def __init__(self, dataset: DigitsVQA, batch_size: int, seed: int):
        self.dataset, self.batch_size = dataset, batch_size
        self.order = np.random.default_rng(seed).permutation(len(dataset))

    def __len__(self) -> int:
        return len(self.dataset) // self.batch_size

    def __getitem__(self, index: int) -> Batch:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.dataset.collate(self.order[index * self.batch_size:(index + 1) * self.batch_size].tolist())


# TASKS entry "builtin" (declared in pumer_plug/catalog.py)
class BuiltinDigitsTask(Task):
    """VQA over real handwritten digits with the built-in ViLT (shipped in the package; retrained if stale).

    Options used: ``cache_dir``, ``retrain``, ``num_test_examples`` (default 1000).
    """

    name = "builtin-digits-vqa"
    adapter = "vilt"
    accepted_options = frozenset({"cache_dir", "retrain", "num_test_examples"})
    #: per-method configs scaled to the built-in model's 6 layers (see docs/benchmarks.md)
    default_configs = {
        "pumer": "builtin-digits",
        "tome": {"r": 12},
        "dynamicvit": {"reduction_layers": [1, 3, 4], "keep_ratio": 0.7},
        "smres": {"scale": 0.75},
    }

    def __init__(self, options: TaskOptions | None = None):
        super().__init__(options)
        # results record the test size; state the default instead of None
        self.options = dataclasses.replace(self.options,
                                           num_test_examples=self.options.num_test_examples or builtin.NUM_TEST_EXAMPLES)
        self._retrain = self.options.retrain
        self._tokenizer = None

    @property
    def split_sizes(self) -> dict[str, int]:
        return {"train": NUM_TRAIN_EXAMPLES, "val": builtin.NUM_VAL_EXAMPLES,
                "test": self.options.num_test_examples}

    def load_model(self, device: torch.device) -> nn.Module:
        model, self._tokenizer = builtin.load_builtin_model(self.options.cache_dir, retrain=self._retrain)
        self._retrain = False
        return model.to(device).eval()

    def dataset(self, split: str, num_examples: int | None = None) -> DigitsVQA:
        """The examples of ``split`` (seed 0), ``num_examples`` of them or the split's size.

        Raises:
            UserError: an unknown split.
        """
        if split not in SPLITS:
            raise UserError(f"task {self.name!r} has no split {split!r}; splits: {', '.join(SPLITS)}")
        if self._tokenizer is None:
            _, self._tokenizer = builtin.load_builtin_model(self.options.cache_dir)
        return DigitsVQA(split, num_examples or self.split_sizes[split], seed=0, tokenizer=self._tokenizer)

    def batches(self, split: str, batch_size: int, num_examples: int | None = None) -> Iterable[Batch]:
        """The split's examples, at most ``num_examples`` of them (never more than the split holds)."""
        size = self.split_sizes.get(split)
        data = self.dataset(split, None if size is None else min(num_examples or size, size))  # unknown split: refused
        return Reiterable(lambda: data.batches(batch_size))

    def train_batches(self, batch_size: int, seed: int, num_examples: int) -> Sequence[Batch]:
        return DatasetBatches(self.dataset("train", num_examples), batch_size, seed)

    def token_texts(self, input_ids: Sequence[int]) -> list[str]:
        if self._tokenizer is None:
            _, self._tokenizer = builtin.load_builtin_model(self.options.cache_dir)
        return [self._tokenizer.id_to_token(int(i)) or str(i) for i in input_ids]

    def encode_example(self, image, question: str) -> dict[str, torch.Tensor]:
        """A greyscale canvas of the task's size (light ink on a dark background, as the digits) and the question."""
        if self._tokenizer is None:
            _, self._tokenizer = builtin.load_builtin_model(self.options.cache_dir)
        grey = np.asarray(image.convert("L").resize((CANVAS_PX, CANVAS_PX)), dtype=np.float32) / 127.5 - 1.0
        enc = self._tokenizer.encode(question)
        ids = torch.tensor([enc.ids], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.tensor([enc.attention_mask], dtype=torch.long),
                "token_type_ids": torch.tensor([enc.type_ids], dtype=torch.long),
                "pixel_values": torch.from_numpy(grey)[None, None],
                "pixel_mask": torch.ones(1, CANVAS_PX, CANVAS_PX, dtype=torch.long)}

    def answer_text(self, output: int) -> str:
        return ANSWER_VOCAB[output]

    def reference_accuracies(self, split: str = "test") -> dict[str, float]:
        """Accuracies of trivial predictors on ``split``: always the most frequent train answer, and
        the most frequent train answer per question (the best a model that ignores the image does)."""
        data, train = self.dataset(split), DigitsVQA("train", 10000, seed=0, tokenizer=self._tokenizer)
        return {"majority answer": majority_answer_accuracy(data, train),
                "question-only prior": question_prior_accuracy(data, train)}
