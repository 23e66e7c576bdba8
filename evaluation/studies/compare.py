"""``pumer-plug compare``: the dense model and reduction methods side by side on a task.

Backbone-agnostic: a :class:`~pumer_plug.evaluation.tasks.Task` gives a model, batches and a
metric; a method gives an ``apply()``. Columns follow the paper's Table 1: accuracy and its change,
throughput and its increase (Sec. 5.4: eval mode, inference mode, warm-up, variants interleaved,
median of rounds), peak memory and its reduction, GFLOPs per example.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pumer_plug.errors import UserError
from pumer_plug.evaluation.measure import (DTYPES, Variant, attached, attention_kernel, environment_record,
                                           find_batch_size, measure_flops, measure_peak_memory, measure_throughput,
                                           measure_train_step_memory, to_device)
from pumer_plug.evaluation.studies.report import compare_rows
from pumer_plug.evaluation.measure.variants import batch_size_of, counting_attaches
from pumer_plug.evaluation.parallel import Processes
from pumer_plug.evaluation.tasks.base import Task, attach_method, check_methods_fit, on_device


@dataclass
class MethodSpec:
    """A method to compare: registry name, its config, and a label for the table."""

    method: str
    config: Any

    @property
    def label(self) -> str:
        return self.config.describe()


def make_variants(task: Task, specs: Sequence[MethodSpec]) -> list[Variant]:
    """The dense model first, then one variant per method (each attaches with ``apply``)."""
    variants = [Variant("dense", "-", None)]
    for spec in specs:
        variants.append(Variant(spec.method, spec.label, _attacher(task, spec)))
    return variants


def _attacher(task: Task, spec: MethodSpec) -> Callable[[nn.Module], Any]:
    def attach(model: nn.Module):
        return attach_method(model, task.adapter, spec.method, spec.config)

    return attach


def load_model(task: Task, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The task's model on ``device`` in eval mode, cast to ``dtype``."""
    return task.load_model(device).to(dtype=dtype).eval()


def largest_batch_size(task: Task, model: nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """The largest test batch the dense model runs on ``device`` (CUDA only; see ``find_batch_size``).

    Raises:
        UserError: the device is not CUDA, or not one example fits.
    """
    def make_batch(batch_size: int) -> dict[str, torch.Tensor]:
        inputs, _ = next(iter(task.batches("test", batch_size, batch_size)))
        return to_device(inputs, device, dtype)

    return find_batch_size(model, make_batch, None, device=device)


def run_compare(task: Task, specs: Sequence[MethodSpec], batch_size: int | None = 32, device: str = "cpu",
                rounds: int = 5, timing_batches: int = 4, progress: bool = True, dtype: str = "float32",
                predictions_dir: str | Path | None = None, train_memory: bool = True) -> list[dict[str, Any]]:
    """Evaluates every variant on the task's test split and measures its cost.

    Args:
        batch_size: examples per batch; None searches the largest that fits (CUDA only).
        dtype: one of ``DTYPES``: the model and the inputs' float tensors are cast to it.
        predictions_dir: if given, each variant's predictions go to ``predictions-<name>.jsonl``
            there (or the task's own format, ``Task.write_predictions``).
        train_memory: also measure the peak of one training step (forward + backward with the
            method attached; :func:`add_train_memory`).

    Returns:
        One row per variant (dense first) with the columns of
        :func:`~pumer_plug.evaluation.studies.report.compare_rows` and the environment record;
        ``[]`` on a process other than the main one under ``accelerate launch`` (it only scores its
        share of the test batches: :mod:`~pumer_plug.evaluation.parallel`).

    Raises:
        UserError: ``batch_size`` is None on a device that is not CUDA, or a method does not fit the model.
    """
    procs = Processes.current(device)  # under accelerate launch: this process's rank and device
    dev, cast = procs.device, DTYPES[dtype]
    if batch_size is None and dev.type != "cuda":
        raise UserError(f"--find-batch-size needs a CUDA device, got {dev}; pass --batch-size instead")
    model = load_model(task, dev, cast)
    check_methods_fit(model, task.adapter, [(spec.method, spec.config) for spec in specs])
    if batch_size is None:
        batch_size = procs.smallest(largest_batch_size(task, model, dev, cast))  # one batch size for every process
    variants = make_variants(task, specs)
    if predictions_dir is not None:
        task.check_outputs(Path(predictions_dir), [v.name for v in variants])  # before the first pass
    test = on_device(procs.shard(task.batches("test", batch_size)), dev, cast)
    accuracy, scores = {}, {}
    progress = progress and procs.is_main
    with tqdm(desc="accuracy", unit="ex", disable=not progress) as bar:  # counts examples of every variant
        for k, variant in enumerate(variants):
            bar.set_postfix_str(variant.name)
            with attached(model, variant.attach):
                predictions = procs.predictions(task, model, _counted(test, bar))
            if k == 0:  # the number of test examples is known after the first pass
                bar.total = bar.n * len(variants)
                bar.refresh()
            scores[variant.name] = task.metrics(predictions)  # every key of the task's metrics, recorded per row
            accuracy[variant.name] = scores[variant.name][task.metric]
            if predictions_dir is not None and procs.is_main:
                Path(predictions_dir).mkdir(parents=True, exist_ok=True)
                task.write_predictions(predictions, Path(predictions_dir) / f"predictions-{variant.name}.jsonl")
    if not procs.is_main:  # timing, memory and FLOPs: the main process alone, on its own device
        return []
    timing = [x for x, _ in itertools.islice(test, timing_batches)]
    with tqdm(total=(1 + rounds) * len(variants), desc=f"timing ({rounds} rounds + 1 warm-up, variants interleaved)",
              unit="pass", disable=not progress) as bar:
        throughput = measure_throughput(model, timing, counting_attaches(variants, bar.update), rounds=rounds,
                                        warmup=1, device=dev)
    memory, gflops = {}, {}
    for v in tqdm(variants, desc="memory and FLOPs", unit="variant", disable=not progress):
        memory[v.name] = measure_peak_memory(model, timing[0], v.attach, device=dev)
        gflops[v.name] = measure_flops(model, timing[0], v.attach, device=dev)
    env = environment_record(dev, cast, batch_size, torch.get_num_threads(), attention_kernel(model))
    env.update(task=task.name, metric=task.metric, accuracy_processes=procs.count)  # the "accuracy" column holds the task's headline metric
    env.update(task.run_notes())  # what was evaluated: subset, skipped images, label coverage
    rows = compare_rows(variants, environment=env, accuracy=accuracy, throughput=throughput,
                        memory=memory, gflops=gflops)
    for row in rows:
        row["metrics"] = scores[row["method"]]
    if train_memory:
        add_train_memory(rows, {v.name: measure_train_step_memory(model, timing[0], v.attach, device=dev) for v in variants})
    return rows


def add_train_memory(rows: list[dict[str, Any]], results: dict[str, Any], baseline: str = "dense") -> None:
    """Adds the training-step memory columns to compare rows (in place): ``train_peak_memory_mib``,
    ``train_activation_memory_mib`` and ``train_memory_reduction`` (dense / variant, like
    ``memory_reduction``); ``results`` maps a row's ``method`` to a ``MemoryResult``."""
    base = results[baseline].peak_memory_mib
    for row in rows:
        result = results[row["method"]]
        row["train_peak_memory_mib"] = result.peak_memory_mib
        row["train_activation_memory_mib"] = result.activation_memory_mib
        row["train_memory_reduction"] = base / result.peak_memory_mib if result.peak_memory_mib else None


def _counted(batches: Any, bar: tqdm) -> Any:
    """``batches``, advancing ``bar`` by each batch's number of examples."""
    for inputs, targets in batches:
        yield inputs, targets
        bar.update(batch_size_of(inputs))

