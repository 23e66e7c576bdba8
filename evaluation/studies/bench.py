"""Speed benchmark of a reduction method on a backbone built from its config (random init).

``pumer-plug bench`` calls :func:`run_bench`: the dense model and the plugged model are timed
interleaved in one process (:func:`~pumer_plug.evaluation.measure.measure_throughput`), FLOPs are
counted over the real reduced forward, and the share of plugged time spent inside the reducers'
hooks is timed separately. Random weights give the same token counts and FLOPs as trained ones;
only accuracy needs a trained model (``pumer-plug compare``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pumer_plug.evaluation.measure import (DTYPES, Variant, environment_record, measure_flops, measure_peak_memory,
                                           measure_throughput, measure_train_step_memory, to_device)
from pumer_plug.evaluation.measure.variants import counting_attaches
from pumer_plug.evaluation.studies.report import throughput_increase
from pumer_plug.handle import apply


@dataclass
class BenchSetup:
    """A model, one input batch, and the method config the issue's benchmark prescribes.

    Attributes:
        config: PuMer's config for this setup.
        method_configs: configs of other methods that this setup needs instead of their defaults
            (e.g. a DynamicViT with stages inside a 6-layer model); see :func:`setup_config`.
        runner: set by a setup that measures itself (a decoder VLM: prefill and decode steps, not
            one forward): ``runner(method, rounds) -> rows``; ``pumer-plug bench`` prints and writes them.
    """

    model: nn.Module | None
    batch: dict[str, torch.Tensor]
    adapter: str
    config: Any
    description: str
    attention: str = "eager"  # the backbone's attention kernel, recorded with the result ("eager" | "sdpa")
    method_configs: dict[str, Any] = field(default_factory=dict)
    runner: Callable[[str, int], list[dict[str, Any]]] | None = None


def setup_config(setup: BenchSetup, method: str) -> Any:
    """The config ``method`` runs with on ``setup``: PuMer's setup config, the setup's own config for
    the method, else the method's default config."""
    from pumer_plug.config import load_method_config

    if method == "pumer":
        return setup.config
    return setup.method_configs.get(method) or load_method_config(method, None)


def _six_layer_configs() -> dict[str, Any]:
    """Configs for a backbone with 6 reducible (cross-modal) layers: DynamicViT's stages at layers
    3, 6, 9 of 12 scaled to 6 layers, as for the built-in 6-layer model."""
    from pumer_plug.baselines.dynamicvit import DynamicViTConfig

    return {"dynamicvit": DynamicViTConfig(reduction_layers=(1, 3, 4), keep_ratio=0.7)}


# BENCH_MODELS entry "vilt-b32" (declared in pumer_plug/catalog.py)
def vilt_b32(batch_size: int = 8, text_len: int = 40, image_hw: tuple[int, int] = (384, 640)) -> BenchSetup:
    """ViLT-B/32 from the default ``ViltConfig``; PuMer at layers 2,4,6,8, k=0.1, r=0.3, t=0.2."""
    from transformers import ViltConfig, ViltForQuestionAnswering

    from pumer_plug.config import PumerConfig

    torch.manual_seed(0)
    model = ViltForQuestionAnswering(ViltConfig()).eval()
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (batch_size, text_len), generator=g),
        "attention_mask": torch.ones(batch_size, text_len, dtype=torch.long),
        "pixel_values": torch.randn(batch_size, 3, *image_hw, generator=g),
    }
    config = PumerConfig(reduction_layers=(2, 4, 6, 8), prune_ratio=0.1, image_merge_ratio=0.3, text_merge_ratio=0.2)
    desc = f"ViLT-B/32 default ViltConfig, batch {batch_size}, {text_len} text tokens, {image_hw[0]}x{image_hw[1]} images"
    return BenchSetup(model, batch, "vilt", config, desc)


def reducer_time_share(model: nn.Module, batch: dict, attach: Callable, forwards: int = 3) -> float:
    """Fraction of the plugged forward's wall time spent inside the handle's hooks (host timing:
    on CUDA it counts the time to launch the hooks' kernels, not to run them)."""
    handle = attach(model)
    try:
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


def run_bench(setup: BenchSetup, method: str = "pumer", rounds: int = 5, warmup: int = 1,
              num_threads: int | None = None, device: str = "cpu", dtype: str = "float32",
              train_memory: bool = False, progress: bool = True) -> dict[str, Any]:
    """Times dense vs. plugged interleaved, counts FLOPs and the reducers' time share.

    Args:
        device: where the model and batch run ("cpu", "cuda", "cuda:1").
        dtype: one of ``measure.DTYPES``; the model and the batch's float tensors are cast to it.
        train_memory: also measure peak memory, of inference and of one training step (forward +
            backward with the method attached), dense and plugged.
        progress: show a progress bar over the timed passes.

    Returns:
        A JSON-ready dict with ``throughput_increase``, ``flops_ratio``, ``reducer_time_share``,
        per-variant ``throughput_per_s`` and ``gflops_per_example``, token counts and the environment
        (device and dtype included).
    """
    dev, cast = torch.device(device), DTYPES[dtype]
    model = setup.model.to(device=dev, dtype=cast).eval()
    batch = to_device(setup.batch, dev, cast)

    def attach(m: nn.Module):
        return apply(m, adapter=setup.adapter, config=setup.config, method=method)

    variants = [Variant("dense", "-", None), Variant(method, setup.config.describe(), attach)]
    with tqdm(total=(warmup + rounds) * len(variants), desc=f"timing ({rounds} rounds + {warmup} warm-up, interleaved)",
              unit="pass", disable=not progress) as bar:
        speed = measure_throughput(model, [batch], counting_attaches(variants, bar.update), rounds=rounds,
                                   warmup=warmup, device=dev)
    dense_gflops = measure_flops(model, batch)
    reduced_gflops = measure_flops(model, batch, attach)
    with attach(model) as handle, torch.inference_mode():
        model(**batch)
        counts = {layer: vars(c) for layer, c in handle.token_counts.items()}
    share = reducer_time_share(model, batch, attach)
    batch_size = next(iter(batch.values())).shape[0]
    memory = _memory_fields(model, batch, attach, dev) if train_memory else {}
    return {
        "benchmark": setup.description,
        "method": method,
        "config": setup.config.describe(),
        "dense_throughput_per_s": speed["dense"].throughput_per_s,
        "reduced_throughput_per_s": speed[method].throughput_per_s,
        "throughput_increase": throughput_increase(speed[method].throughput_per_s_rounds,
                                                   speed["dense"].throughput_per_s_rounds),
        "dense_gflops_per_example": dense_gflops,
        "reduced_gflops_per_example": reduced_gflops,
        "flops_ratio": dense_gflops / reduced_gflops,
        "reducer_time_share": share,
        "token_counts": counts,
        "rounds": rounds,
        **memory,
        **environment_record(dev, cast, batch_size, num_threads or torch.get_num_threads(), setup.attention),
    }


def _memory_fields(model: nn.Module, batch: dict, attach: Callable, device: torch.device) -> dict[str, Any]:
    """Inference and training-step peak memory, dense and plugged, and the reductions (dense / plugged)."""
    out: dict[str, Any] = {}
    for kind, measure in (("", measure_peak_memory), ("train_", measure_train_step_memory)):
        dense, reduced = measure(model, batch, None, device=device), measure(model, batch, attach, device=device)
        out[f"dense_{kind}peak_memory_mib"] = dense.peak_memory_mib
        out[f"reduced_{kind}peak_memory_mib"] = reduced.peak_memory_mib
        out[f"{kind}memory_reduction"] = dense.peak_memory_mib / reduced.peak_memory_mib
        out["memory_method"] = dense.memory_method
    model.eval()
    return out


def _random_batch(batch_size: int, text_len: int, image_size: int) -> dict[str, torch.Tensor]:
    """Seeded random token ids (B, T), an all-ones mask (B, T) and pixels (B, 3, S, S) for a two-stream model."""
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, 20000, (batch_size, text_len), generator=g),
        "attention_mask": torch.ones(batch_size, text_len, dtype=torch.long),
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=g),
    }


# BENCH_MODELS entry "meter-base" (declared in pumer_plug/catalog.py)
def meter_base(batch_size: int = 4, text_len: int = 40, image_size: int = 384, attn_implementation: str = "sdpa") -> BenchSetup:
    """METER-CLIP16-RoBERTa base from the default ``MeterConfig`` (VQA head); PuMer preset ``meter-vqa``
    (co-attention blocks 0-3, k = r = t = 0.2). The paper's figure for this setting is 92 -> 64.7
    GMACs (PuMer Table 7; the vision encoder is not reduced)."""
    import dataclasses

    from pumer_plug.config import PumerConfig
    from pumer_plug.models.meter import MeterConfig, MeterModel

    torch.manual_seed(0)
    config = dataclasses.replace(MeterConfig(), image_size=image_size, attn_implementation=attn_implementation)
    model = MeterModel(config, task="vqa").eval()
    batch = _random_batch(batch_size, text_len, image_size)
    desc = (f"METER-CLIP16-RoBERTa base (default MeterConfig, {attn_implementation} attention), batch {batch_size}, "
            f"{text_len} text tokens, {image_size}x{image_size} images")
    return BenchSetup(model, batch, "meter", PumerConfig.preset("meter-vqa"), desc,
                      attention=model.config.attn_implementation, method_configs=_six_layer_configs())


# BENCH_MODELS entry "meter-base-eager" (declared in pumer_plug/catalog.py)
def meter_base_eager(batch_size: int = 4, text_len: int = 40, image_size: int = 384) -> BenchSetup:
    """``meter-base`` with the eager co-attention (probabilities computed; METER's original code path)."""
    return meter_base(batch_size, text_len, image_size, attn_implementation="eager")


# BENCH_MODELS entry "bridgetower-base" (declared in pumer_plug/catalog.py)
def bridgetower_base(batch_size: int = 4, text_len: int = 40) -> BenchSetup:
    """``BridgeTowerModel`` from the default ``BridgeTowerConfig`` (random init) at its image size;
    PuMer with the METER VQAv2 ratios on cross-modal layers 0-3 (k = r = t = 0.2)."""
    from transformers import BridgeTowerConfig, BridgeTowerModel

    from pumer_plug.config import PumerConfig

    torch.manual_seed(0)
    config = BridgeTowerConfig()
    model = BridgeTowerModel(config).eval()
    size = config.vision_config.image_size
    batch = _random_batch(batch_size, text_len, size)
    desc = f"BridgeTower base (default BridgeTowerConfig), batch {batch_size}, {text_len} text tokens, {size}x{size} images"
    return BenchSetup(model, batch, "bridgetower", PumerConfig.preset("meter-vqa"), desc, _six_layer_configs())

