"""Train and val batches of a finetuning run (see :mod:`~pumer_plug.evaluation.training.finetune`)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from pumer_plug.evaluation.tasks.base import Batch, Task


def epoch_seed(seed: int, epoch: int) -> int:
    """The data seed of one epoch, derived from the run seed (independent streams per epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def train_batches_of(task: Task, batch_size: int, seed: int, num_examples: int = 2048) -> Sequence[Batch]:
    """The train batches of one epoch (``task.train_batches``) as a sequence.

    Raises:
        UserError: the task cannot be trained.
    """
    batches = task.train_batches(batch_size, seed, num_examples)
    return batches if isinstance(batches, Sequence) else list(batches)


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
