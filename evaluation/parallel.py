"""Data-parallel accuracy passes under ``accelerate launch`` or ``torchrun``; timing stays on one device.

``compare``, ``sweep`` and ``finetune`` run unchanged in one process. Started by ``accelerate
launch --num_processes N -m pumer_plug.cli ...`` (or ``torchrun``), every process loads the model on
its own device, scores every N-th test batch (process ``i`` takes batches ``i, i + N, ...``), and the
per-batch predictions of all processes are gathered once per pass and put back in batch order, so
metrics and prediction files equal a one-process run's. Throughput, memory and FLOPs are measured by
the main process alone, on its own device (the other processes wait at the next gather), and only
the main process prints and writes files.

Example:
    >>> procs = Processes.current("cuda")          # this process's rank, count and device
    >>> mine = procs.shard(task.batches("test", 64))  # its batches, still on the CPU
    >>> predictions = procs.predictions(task, model, on_device(mine, procs.device))  # every batch, in order
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pumer_plug.errors import UserError

if TYPE_CHECKING:  # torch is imported when a run starts: `pumer-plug list` checks commands without it
    import torch

    from pumer_plug.evaluation.tasks.base import Batch, Predictions, Task

#: commands that run data-parallel under ``accelerate launch``; the others refuse several processes
DATA_PARALLEL_COMMANDS = ("compare", "sweep", "finetune")


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 when run directly)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


@dataclass(frozen=True)
class Processes:
    """This process's place in a data-parallel run.

    Attributes:
        index: rank of this process (0 is the main process, the one that times, prints and writes).
        count: number of processes (1: an ordinary run).
        device: the device this process computes on (``cuda:<local rank>`` under a launcher).
    """

    index: int
    count: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @classmethod
    def current(cls, device: str | torch.device = "cpu") -> Processes:
        """The processes of this run; under a launcher, joins its process group (``accelerate.PartialState``).

        Raises:
            UserError: several processes and a device with an index (``--device cuda:1``).
        """
        import torch

        dev = torch.device(device)
        if launched_processes() == 1:
            return cls(0, 1, dev)
        if dev.index is not None:
            raise UserError(f"under torchrun / accelerate launch every process takes its own device; pass --device {dev.type}, "
                            f"not --device {dev}")
        from accelerate import PartialState

        state = PartialState(cpu=dev.type == "cpu")
        return cls(state.process_index, state.num_processes, state.device)

    def shard(self, batches: Iterable[Batch]) -> Iterable[Batch]:
        """This process's batches: every ``count``-th batch from its ``index`` (``batches`` itself for one process).

        A ``DataLoader`` is rebuilt over the chosen batches of its batch sampler, so no process decodes
        another's images; any other re-iterable is walked and the other batches are skipped.
        """
        if self.count == 1:
            return batches
        from torch.utils.data import DataLoader

        if isinstance(batches, DataLoader) and batches.batch_sampler is not None:
            mine = list(batches.batch_sampler)[self.index::self.count]
            return DataLoader(batches.dataset, batch_sampler=mine, num_workers=batches.num_workers,
                              collate_fn=batches.collate_fn, pin_memory=batches.pin_memory,
                              worker_init_fn=batches.worker_init_fn,
                              persistent_workers=batches.persistent_workers and batches.num_workers > 0)
        return _Strided(batches, self.index, self.count)

    def predictions(self, task: Task, model: torch.nn.Module, batches: Iterable[Batch]) -> Predictions:
        """``task.predictions`` over every process's shard, gathered once and put back in batch order.

        ``batches`` is this process's shard (:meth:`shard`). Every process must call this the same
        number of times (it is a collective); every process gets the whole result.

        Raises:
            RuntimeError: the task's predictions do not hold one entry per example of each batch.
        """
        if self.count == 1:
            return task.predictions(model, batches)
        sizes: list[int] = []

        def counted() -> Iterator[Batch]:
            for inputs, targets in batches:
                sizes.append(len(targets))
                yield inputs, targets

        local = task.predictions(model, counted())
        if len(local.outputs) != sum(sizes) or len(local.targets) != sum(sizes):
            raise RuntimeError(f"{type(task).__name__}.predictions returned {len(local.outputs)} outputs for "
                               f"{sum(sizes)} examples; data-parallel passes need one output per example")
        from accelerate.utils import gather_object

        shards = gather_object([(_chunks(local.outputs, sizes), _chunks(local.targets, sizes))])
        return interleave(type(local), shards)

    def accuracy(self, task: Task, model: torch.nn.Module, batches: Iterable[Batch]) -> float:
        """The task's headline metric over every process's shard (see :meth:`predictions`); in one
        process, ``task.accuracy`` itself (a task may override it)."""
        if self.count == 1:
            return task.accuracy(model, batches)
        return task.metrics(self.predictions(task, model, batches))[task.metric]

    def smallest(self, value: int) -> int:
        """The smallest ``value`` of all processes (e.g. the batch size each found to fit), on every process."""
        if self.count == 1:
            return value
        from accelerate.utils import gather_object

        return min(gather_object([value]))


def is_main_process() -> bool:
    """Whether this is the process that prints and writes files (rank 0, or the only one)."""
    return os.environ.get("RANK", "0") == "0"


def check_command(command: str) -> None:
    """Refuses several processes for a command that does not run data-parallel.

    Raises:
        UserError: ``command`` is not one of :data:`DATA_PARALLEL_COMMANDS` and several processes run.
    """
    if launched_processes() > 1 and command not in DATA_PARALLEL_COMMANDS:
        raise UserError(f"{command} runs in one process (it times or searches on one device); run it without "
                        f"torchrun / accelerate launch (data-parallel commands: {', '.join(DATA_PARALLEL_COMMANDS)})")


class _Strided:
    """Every ``step``-th batch of a re-iterable, from ``start``."""

    def __init__(self, batches: Iterable[Batch], start: int, step: int):
        self.batches, self.start, self.step = batches, start, step

    def __iter__(self) -> Iterator[Batch]:
        for i, batch in enumerate(self.batches):
            if i % self.step == self.start:
                yield batch


def _chunks(values: list[Any], sizes: list[int]) -> list[list[Any]]:
    out, start = [], 0
    for size in sizes:
        out.append(values[start:start + size])
        start += size
    return out


def interleave(kind: type, shards: list[tuple[list[list[Any]], list[list[Any]]]]) -> Predictions:
    """Puts per-process batch chunks back in batch order: process ``i``'s ``j``-th batch is batch ``j * N + i``.

    Args:
        kind: the ``Predictions`` class to build.
        shards: per process, in rank order, (output chunks, target chunks), one chunk per batch.
    """
    result = kind()
    rounds = max((len(outputs) for outputs, _ in shards), default=0)
    for j in range(rounds):
        for outputs, targets in shards:
            if j < len(outputs):
                result.outputs += outputs[j]
                result.targets += targets[j]
    return result


__all__ = ["DATA_PARALLEL_COMMANDS", "Processes", "check_command", "interleave", "is_main_process", "launched_processes"]
