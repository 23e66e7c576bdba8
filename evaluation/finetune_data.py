"""Train and val batches of a finetuning run (see :mod:`~pumer_plug.evaluation.finetune`)."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def epoch_seed(seed: int, epoch: int) -> int:
    """The data seed of one epoch, derived from the run seed (independent streams per epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class DatasetBatches(Sequence):
    """Shuffled, equal-sized batches of a dataset with ``collate(indices)``, collated on access."""

    def __init__(self, dataset: Any, batch_size: int, seed: int):
        self.dataset, self.batch_size = dataset, batch_size
        self.order = np.random.default_rng(seed).permutation(len(dataset))

    def __len__(self) -> int:
        return len(self.dataset) // self.batch_size

    def __getitem__(self, index: int) -> Batch:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.dataset.collate(self.order[index * self.batch_size:(index + 1) * self.batch_size].tolist())


def train_batches_of(task: Any, batch_size: int, seed: int, num_examples: int = 2048) -> Sequence[Batch]:
    """The train batches of one epoch: ``task.train_batches`` or, for tasks with ``dataset(split, n)``
    (the built-in task), ``num_examples`` shuffled by ``seed`` in full batches.

    Raises:
        ValueError: the task offers neither.
    """
    if hasattr(task, "train_batches"):
        batches = task.train_batches(batch_size, seed)
        return batches if isinstance(batches, Sequence) else list(batches)
    if hasattr(task, "dataset"):
        return DatasetBatches(task.dataset("train", num_examples), batch_size, seed)
    raise ValueError(f"task {getattr(task, 'name', task)!r} cannot be trained: it has no "
                     "train_batches(batch_size, seed) method")


class Reiterable:
    def __init__(self, make: Callable[[], Iterator[Batch]]):
        self.make = make

    def __iter__(self) -> Iterator[Batch]:
        return self.make()


def val_batches_of(task: Any, batch_size: int, num_examples: int) -> Iterable[Batch]:
    """Val batches of about ``num_examples`` examples; the built-in task's are collated lazily."""
    if hasattr(task, "dataset"):
        data = task.dataset("val", num_examples)
        return Reiterable(lambda: data.batches(batch_size))
    return list(task.batches("val", batch_size))[: math.ceil(num_examples / batch_size)]


class EpochBatches(torch.utils.data.Dataset):
    """One epoch's batches as a map-style dataset (item i = batch i); ``select_epoch`` reshuffles.

    Not named ``set_epoch``: accelerate's loaders call that with their own iteration count, which
    restarts at 0 in a resumed process.
    """

    def __init__(self, make: Callable[[int], Sequence[Batch]], seed: int, cap: int | None):
        self.make, self.seed, self.cap = make, seed, cap
        self.batches: Sequence[Batch] = ()

    def select_epoch(self, epoch: int) -> None:
        self.batches = self.make(epoch_seed(self.seed, epoch))
        if len(self.batches) == 0:
            raise ValueError("the task yielded no train batches")

    def __len__(self) -> int:
        return min(len(self.batches), self.cap or len(self.batches))

    def __getitem__(self, index: int) -> Batch:
        return self.batches[index]


def single_batch(items: list[Batch]) -> Batch:
    return items[0]
