"""``pumer-plug compare``: the dense model and reduction methods side by side on a task.

Backbone-agnostic: a task gives a model, batches and a metric; a method gives an ``apply()``.
Columns follow the paper's Table 1: accuracy and its change, throughput and its increase
(Sec. 5.4: eval mode, inference mode, warm-up, variants interleaved, median of rounds), peak
memory and its reduction, GFLOPs per example.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pumer_plug.evaluation.measure import (
    Variant,
    environment_record,
    measure_flops,
    measure_peak_memory,
    measure_throughput,
)
from pumer_plug.evaluation.report import compare_rows
from pumer_plug.handle import apply

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


class EvalTask(Protocol):
    """What the harness needs from a task."""

    name: str
    adapter: str

    def load_model(self, device: torch.device) -> nn.Module: ...

    def batches(self, split: str, batch_size: int) -> list[Batch]: ...

    def accuracy(self, model: nn.Module, batches: Sequence[Batch]) -> float: ...

    def default_config(self, method: str) -> Any: ...


@dataclass
class MethodSpec:
    """A method to compare: registry name, its config, and a label for the table."""

    method: str
    config: Any

    @property
    def label(self) -> str:
        return self.config.describe() if hasattr(self.config, "describe") else repr(self.config)


def make_variants(task: EvalTask, specs: Sequence[MethodSpec]) -> list[Variant]:
    """The dense model first, then one variant per method (each attaches with ``apply``)."""
    variants = [Variant("dense", "-", None)]
    for spec in specs:
        variants.append(Variant(spec.method, spec.label, _attacher(task, spec)))
    return variants


def _attacher(task: EvalTask, spec: MethodSpec) -> Callable[[nn.Module], Any]:
    def attach(model: nn.Module):
        return apply(model, adapter=task.adapter, config=spec.config, method=spec.method)

    return attach


def evaluate_accuracy(task: EvalTask, model: nn.Module, batches: Sequence[Batch], variant: Variant) -> float:
    if variant.attach is None:
        return task.accuracy(model, batches)
    with variant.attach(model):
        return task.accuracy(model, batches)


def run_compare(
    task: EvalTask,
    specs: Sequence[MethodSpec],
    batch_size: int = 32,
    device: str = "cpu",
    rounds: int = 5,
    timing_batches: int = 4,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluates every variant on the task's test split and measures its cost.

    Returns:
        One row per variant (dense first) with the columns of
        :func:`~pumer_plug.evaluation.report.compare_rows` and the environment record.
    """
    dev = torch.device(device)
    model = task.load_model(dev)
    model.eval()
    test = [(_to(x, dev), y.to(dev)) for x, y in task.batches("test", batch_size)]
    variants = make_variants(task, specs)
    accuracy = {}
    for variant in tqdm(variants, desc="accuracy", disable=not progress):
        accuracy[variant.name] = evaluate_accuracy(task, model, test, variant)
    timing = [x for x, _ in test[:timing_batches]]
    throughput = measure_throughput(model, timing, variants, rounds=rounds, warmup=1, device=dev)
    memory = {v.name: measure_peak_memory(model, timing[0], v.attach, device=dev) for v in variants}
    gflops = {v.name: measure_flops(model, timing[0], v.attach, device=dev) for v in variants}
    env = environment_record(dev, next(model.parameters()).dtype, batch_size, torch.get_num_threads(), "eager")
    env["task"] = task.name
    return compare_rows(variants, environment=env, accuracy=accuracy, throughput=throughput,
                        memory=memory, gflops=gflops)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
