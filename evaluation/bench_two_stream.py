"""Speed, FLOPs and reducer-time benchmark of PuMer on one model and batch (any registered adapter).

Written for the two-stream backbones (BridgeTower, METER), where only the cross-modal layers
shrink, but backbone-agnostic: it runs ``model(**batch)`` and never asks which backbone it holds.
Dense and plugged variants are timed interleaved in one process (``measure_throughput``), FLOPs
are counted over the real forward with ``FlopCounterMode``, and the share of the plugged forward
spent inside the handle's hooks is timed separately (the handle's ``time_hooks`` switch).

Example (the numbers in the BridgeTower adapter's report)::

    /work/venv/bin/python -m pumer_plug.evaluation.bench_two_stream --rounds 5 --threads 2 [--clock process]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch.nn as nn

from pumer_plug.evaluation.measure import Variant, environment_record, measure_flops, measure_throughput
from pumer_plug.handle import apply


def hook_time_share(model: nn.Module, batch: dict, attach, forwards: int = 3) -> float | None:
    """Fraction of the plugged forward's wall time spent inside the handle's hooks (CPU timing).

    Returns None when the handle cannot time its hooks (no ``time_hooks`` switch).
    """
    handle = attach(model)
    try:
        if not hasattr(handle, "time_hooks"):
            return None
        with torch.inference_mode():
            model(**batch)  # warm-up
            handle.time_hooks, handle.hook_seconds = True, 0.0
            start = time.perf_counter()
            for _ in range(forwards):
                model(**batch)
            total = time.perf_counter() - start
    finally:
        handle.remove()
    return handle.hook_seconds / total


def bench_model(model: nn.Module, batch: dict, config: Any, rounds: int = 5, adapter: str = "auto",
                method: str = "pumer", warmup: int = 1, clock: str = "wall") -> dict[str, Any]:
    """Times dense vs. plugged interleaved, counts FLOPs and the hooks' time share.

    Args:
        model: the backbone (or a head around it); put in eval mode for the measurements.
        batch: model kwargs of one batch.
        config: the method's config.
        rounds: measured rounds (the median is reported); ``warmup`` rounds are dropped first.
        clock: ``"wall"`` (``time.perf_counter``) or ``"process"`` (``time.process_time``, CPU
            seconds of this process: less sensitive to other processes on a shared machine).

    Returns:
        A JSON-ready dict: ``throughput_increase`` (ratio of the medians, same run),
        ``throughput_increase_paired`` (median of the per-round ratios), ``flops_ratio``
        (dense / plugged), ``hook_time_share``, per-variant figures, token counts, environment.
    """
    model.eval()

    def attach(m: nn.Module):
        return apply(m, adapter=adapter, config=config, method=method)

    variants = [Variant("dense", "-", None), Variant(method, _describe(config), attach)]
    clocks = {"wall": time.perf_counter, "process": time.process_time}
    speed = measure_throughput(model, [batch], variants, rounds=rounds, warmup=warmup, clock=clocks[clock])
    dense_gflops = measure_flops(model, batch)
    reduced_gflops = measure_flops(model, batch, attach)
    with attach(model) as handle, torch.inference_mode():
        model(**batch)
        counts = {layer: vars(c) for layer, c in handle.token_counts.items()}
        adapter_name = handle.adapter.name
    batch_size = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
    return {
        "model": type(model).__name__,
        "adapter": adapter_name,
        "method": method,
        "config": _describe(config),
        "dense_throughput_per_s": speed["dense"].throughput_per_s,
        "reduced_throughput_per_s": speed[method].throughput_per_s,
        "throughput_increase": speed[method].throughput_per_s / speed["dense"].throughput_per_s,
        # median over rounds of (plugged / dense) within a round: robust to load that drifts between rounds
        "throughput_increase_paired": statistics.median(
            r / d for r, d in zip(speed[method].throughput_per_s_rounds, speed["dense"].throughput_per_s_rounds)
        ),
        "dense_throughput_per_s_rounds": speed["dense"].throughput_per_s_rounds,
        "reduced_throughput_per_s_rounds": speed[method].throughput_per_s_rounds,
        "dense_gflops_per_example": dense_gflops,
        "reduced_gflops_per_example": reduced_gflops,
        "flops_ratio": dense_gflops / reduced_gflops,
        "hook_time_share": hook_time_share(model, batch, attach),
        "token_counts": counts,
        "rounds": rounds,
        "warmup": warmup,
        "clock": clock,
        **environment_record("cpu", "float32", batch_size, torch.get_num_threads(), "eager"),
    }


def bridgetower_base(batch_size: int = 4, text_len: int = 40) -> tuple[nn.Module, dict]:
    """BridgeTowerModel from the default ``BridgeTowerConfig`` (random init) and one batch at its image size."""
    from transformers import BridgeTowerConfig, BridgeTowerModel

    torch.manual_seed(0)
    config = BridgeTowerConfig()
    model = BridgeTowerModel(config).eval()
    size = config.vision_config.image_size
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (batch_size, text_len), generator=g),
        "attention_mask": torch.ones(batch_size, text_len, dtype=torch.long),
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=g),
    }
    return model, batch


def _describe(config: Any) -> str:
    return config.describe() if hasattr(config, "describe") else repr(config)


def main() -> None:
    from pumer_plug import PumerConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=40)
    parser.add_argument("--clock", choices=("wall", "process"), default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, batch = bridgetower_base(args.batch_size, args.text_len)
    config = PumerConfig(reduction_layers=(0, 1, 2, 3), prune_ratio=0.2, image_merge_ratio=0.2, text_merge_ratio=0.2)
    result = bench_model(model, batch, config, rounds=args.rounds, adapter="bridgetower", clock=args.clock)
    print(json.dumps({"benchmark": f"BridgeTower base (default config), batch {args.batch_size}, {args.text_len} text "
                      f"tokens, {model.config.vision_config.image_size}px images", **result}))


if __name__ == "__main__":
    main()
