"""Throughput: variants timed interleaved round-robin in one process, warm-up dropped, median of rounds."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .variants import Batch, Variant, _resolve_device, _synchronize, to_device, attached, batch_size_of, inference


@dataclass(frozen=True)
class ThroughputResult:
    """Timing of one variant over the measured (non-warm-up) rounds.

    Attributes:
        throughput_per_s: Median over rounds of examples per second.
        latency_ms: Median over rounds of the mean wall time per batch, in milliseconds.
        throughput_per_s_rounds: Examples per second of every measured round, in order.
        latency_ms_rounds: Mean per-batch latency of every measured round, in order.
    """

    name: str
    config: str
    throughput_per_s: float
    latency_ms: float
    throughput_per_s_rounds: tuple[float, ...]
    latency_ms_rounds: tuple[float, ...]
    examples_per_round: int
    batches_per_round: int
    rounds: int
    warmup: int



def _check_throughput_args(batches: Sequence[Batch], variants: Sequence[Variant], rounds: int,
                           warmup: int) -> None:
    if not batches:
        raise ValueError("batches is empty; pass at least one batch of model inputs")
    if not variants:
        raise ValueError("variants is empty; pass at least one Variant")
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"variant names must be unique; repeated: {duplicates}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")


def _time_variant(model: nn.Module, batches: Sequence[Batch], variant: Variant,
                  device: torch.device, clock: Callable[[], float]) -> float:
    """Returns the seconds one pass over ``batches`` takes with ``variant`` attached: CUDA events
    on a CUDA device with the default clock, else ``clock`` around synchronized work."""
    with attached(model, variant.attach):
        if device.type == "cuda" and clock is time.perf_counter:
            return _cuda_event_seconds(model, batches, device)
        _synchronize(device)
        start = clock()
        for batch in batches:
            model(**batch)
        _synchronize(device)
        return clock() - start


def _cuda_event_seconds(model: nn.Module, batches: Sequence[Batch], device: torch.device) -> float:
    """Seconds between two CUDA events recorded around the forwards on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _synchronize(device)
    start.record()
    for batch in batches:
        model(**batch)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0  # ms -> s


def measure_throughput(
    model: nn.Module,
    batches: Sequence[Batch],
    variants: Sequence[Variant],
    rounds: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, ThroughputResult]:
    """Times every variant over the same batches, interleaved round-robin in this process.

    Each of ``warmup + rounds`` rounds runs, for each variant in order: attach, forward every
    batch, remove. Warm-up rounds are dropped; attaching and removing are outside the timed region.

    Args:
        model: Any module called as ``model(**batch)``; it is not moved.
        batches: Dicts of model kwargs; batch size = first dim of each batch's first tensor.
        variants: Compared variants with unique names.
        rounds: Measured rounds (>= 1); the result is the median over them.
        warmup: Dropped rounds run first (>= 0).
        device: Where batches are moved before timing; default: the model's parameter device.
        clock: Seconds counter (``time.perf_counter``); injectable for tests. With the default on
            a CUDA device the forwards are timed with CUDA events instead.

    Returns:
        ``{variant.name: ThroughputResult}`` in the order of ``variants``.

    Raises:
        ValueError: on empty ``batches`` or ``variants``, repeated names, ``rounds < 1``,
            ``warmup < 0``, or a batch without tensors.
    """
    _check_throughput_args(batches, variants, rounds, warmup)
    device = _resolve_device(model, device)
    batches = [to_device(b, device) for b in batches]
    examples = sum(batch_size_of(b) for b in batches)
    seconds: dict[str, list[float]] = {v.name: [] for v in variants}
    with inference(model):
        for round_index in range(warmup + rounds):
            for variant in variants:
                elapsed = _time_variant(model, batches, variant, device, clock)
                if round_index >= warmup:
                    seconds[variant.name].append(elapsed)
    return {v.name: _throughput_result(v, seconds[v.name], examples, len(batches), warmup)
            for v in variants}


def _throughput_result(variant: Variant, seconds: list[float], examples: int, num_batches: int,
                       warmup: int) -> ThroughputResult:
    per_s = tuple(examples / s if s > 0 else float("inf") for s in seconds)
    latency_ms = tuple(1000.0 * s / num_batches for s in seconds)
    return ThroughputResult(
        name=variant.name, config=variant.config,
        throughput_per_s=statistics.median(per_s), latency_ms=statistics.median(latency_ms),
        throughput_per_s_rounds=per_s, latency_ms_rounds=latency_ms,
        examples_per_round=examples, batches_per_round=num_batches,
        rounds=len(seconds), warmup=warmup,
    )

