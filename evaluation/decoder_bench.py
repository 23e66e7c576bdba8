"""Decoder-VLM benchmark: token reduction on a LLaVA-1.5-shaped model (``pumer-plug bench --model llava-cpu``).

The CPU model keeps LLaVA-1.5-7B's token geometry and depth (a CLIP-like tower on 336 x 336
images in 14 x 14 patches: 576 image tokens; a Llama decoder with 32 layers) at a width a CPU can
run, with random init: the share of the unreduced first layers is the real one. Measured per
variant (dense, then every method at keep 192 / 128 / 64 of 576 from decoder layer 2; pooling at
its square budgets): prefill latency (time to first token, vision tower included), decode
tokens/s, KV-cache bytes after the prefill and prefill FLOPs (``FlopCounterMode``, SDPA counted
by its math backend). Variants are timed interleaved, round-robin in one process, warm-up
dropped; medians and best rounds reported (the best round is the robust figure on a shared
CPU; the 1-minute load average is recorded with every row). Analytic prefill FLOPs and fp16 KV-cache bytes of the real
LLaVA-1.5-7B shape come from its parameter shapes on the meta device.

Example:
    $ python -m pumer_plug.evaluation.decoder_bench --rounds 3 --out results.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import pumer_plug
from pumer_plug import PumerConfig

IMAGE_TOKEN = 32000
NUM_IMAGE = 576
KEEP_BUDGETS = (192, 128, 64)


@dataclass(frozen=True)
class DecoderBenchConfig:
    """Shape of the CPU model and of the measurement.

    Attributes:
        text_hidden, text_layers, text_heads, text_intermediate, vocab: the Llama decoder (C, depth, H, MLP, vocab).
        vision_hidden, vision_layers: the CLIP-like tower (336 x 336 images, 14 x 14 patches).
        text_before, text_after: prompt tokens before and after the image (LLaVA-1.5's
            ``USER: <image>\\n{question} ASSISTANT:`` with a VQA question).
        layer: K, the first decoder layer on the reduced tokens.
        new_tokens: decode steps timed after the prefill.
        rounds, warmup: timed and dropped rounds over all variants.
    """

    text_hidden: int = 256
    text_layers: int = 32
    text_heads: int = 4
    text_intermediate: int = 688
    vocab: int = 32064
    vision_hidden: int = 128
    vision_layers: int = 4
    text_before: int = 5
    text_after: int = 40
    layer: int = 2
    new_tokens: int = 8
    rounds: int = 3
    warmup: int = 1


def llava_config(vision: CLIPVisionConfig, text: LlamaConfig) -> LlavaConfig:
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=NUM_IMAGE,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = "sdpa"
    return config


def cpu_config(cfg: DecoderBenchConfig) -> LlavaConfig:
    """The CPU model: LLaVA-1.5's geometry (576 image tokens, 32 decoder layers) at reduced width."""
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=2, image_size=336, patch_size=14)
    text = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                       num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                       num_key_value_heads=cfg.text_heads, max_position_embeddings=4096)
    return llava_config(vision, text)


def llava_7b_config() -> LlavaConfig:
    """LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336 and a Llama-2-7B decoder."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    return llava_config(vision, text)


def variants(cfg: DecoderBenchConfig, methods: tuple[str, ...] | None = None) -> list[tuple[str, str | None, Any, int]]:
    """(name, method, config, image tokens every layer from K on) for dense and every method x budget
    (only ``methods`` when given)."""
    from pumer_plug.baselines.fastv import FastVConfig
    from pumer_plug.baselines.pool import PoolConfig
    from pumer_plug.baselines.random_prune import RandomConfig

    out: list[tuple[str, str | None, Any, int]] = [("dense", None, None, NUM_IMAGE)]
    for keep in KEEP_BUDGETS:
        out.append((f"fastv-keep{keep}", "fastv", FastVConfig(layer=cfg.layer, keep_tokens=keep), keep))
        out.append((f"random-keep{keep}", "random", RandomConfig(layer=cfg.layer, keep_tokens=keep), keep))
        out.append((f"pumer-keep{keep}", "pumer", PumerConfig.preset(f"llava-keep{keep}",
                                                                      reduction_layers=(cfg.layer - 1,)), keep))
    out.append(("pool-keep144", "pool", PoolConfig(stride=2), 144))
    out.append(("pool-keep64", "pool", PoolConfig(stride=3), 64))
    return [row for row in out if methods is None or row[1] is None or row[1] in methods]


def prompt(cfg: DecoderBenchConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    before = torch.randint(100, 30000, (cfg.text_before,), generator=g)
    after = torch.randint(100, 30000, (cfg.text_after,), generator=g)
    ids = torch.cat([torch.tensor([1]), before, torch.full((NUM_IMAGE,), IMAGE_TOKEN), after])[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, 3, 336, 336, generator=g)}


def kv_cache_bytes(cache: Any) -> int:
    """Bytes of every key and value tensor the cache holds."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _prefill(model: nn.Module, batch: dict) -> tuple[float, Any, torch.Tensor]:
    start = time.perf_counter()
    out = model(**batch, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start, out.cache, out.logits[:, -1].argmax(-1, keepdim=True)


def _decode(model: nn.Module, batch: dict, cache: Any, token: torch.Tensor, steps: int) -> float:
    mask = batch["attention_mask"]
    start = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - start


def _attach(model: nn.Module, method: str | None, config: Any):
    if method is None:
        import contextlib

        return contextlib.nullcontext()
    return pumer_plug.apply(model, adapter="llava", method=method, config=config)


def measure_cpu(cfg: DecoderBenchConfig, methods: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Times, counts and sizes dense and every variant (of ``methods``) on the CPU model (interleaved rounds)."""
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cpu_config(cfg)).eval()
    batch = prompt(cfg)
    table = variants(cfg, methods)
    ttft = {name: [] for name, *_ in table}
    decode = {name: [] for name, *_ in table}
    kv, flops = {}, {}
    with torch.inference_mode():
        for name, method, config, _ in table:  # FLOPs and KV bytes: one counted prefill each
            with _attach(model, method, config), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
                out = model(**batch, use_cache=True, logits_to_keep=1)
            flops[name], kv[name] = counter.get_total_flops() / 1e9, kv_cache_bytes(out.cache)
        for r in range(cfg.warmup + cfg.rounds):
            for name, method, config, _ in table:
                with _attach(model, method, config):
                    seconds, cache, token = _prefill(model, batch)
                    steps = _decode(model, batch, cache, token, cfg.new_tokens)
                if r >= cfg.warmup:
                    ttft[name].append(seconds)
                    decode[name].append(cfg.new_tokens / steps)
    env = {"device": "cpu", "dtype": "float32", "batch_size": 1, "attention_kernel": "sdpa",
           "num_threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
           "platform": platform.platform(), "rounds": cfg.rounds, "warmup": cfg.warmup,
           "load_average_1min": os.getloadavg()[0], "num_cpus": os.cpu_count()}
    dense_ttft, dense_best, dense_flops = statistics.median(ttft["dense"]), min(ttft["dense"]), flops["dense"]
    rows = []
    for name, method, config, keep in table:
        t = statistics.median(ttft[name])
        rows.append({"model": "llava-cpu", "variant": name, "method": method or "dense",
                     "config": None if config is None else config.describe(), "image_tokens_kept": keep,
                     "prompt_tokens": batch["input_ids"].shape[1], "ttft_ms": 1e3 * t, "ttft_speedup": dense_ttft / t,
                     "ttft_best_ms": 1e3 * min(ttft[name]), "ttft_speedup_best": dense_best / min(ttft[name]),
                     "decode_tokens_per_s": statistics.median(decode[name]),
                     "decode_tokens_per_s_best": max(decode[name]), "kv_cache_mib": kv[name] / 2**20,
                     "prefill_gflops": flops[name], "flops_ratio": flops[name] / dense_flops, **env})
    return rows


def analytic_7b(cfg: DecoderBenchConfig) -> list[dict[str, Any]]:
    """Prefill FLOPs and fp16 KV-cache bytes of LLaVA-1.5-7B, from its parameter shapes (meta device).

    A layer on n tokens costs ``2 n P`` (its P weights, multiply-add = 2 FLOPs) plus ``4 n^2 d``
    (QK^T and AV over all n keys, as a dense kernel computes them); the tower runs on 577 tokens
    and the LM head on the last token only.
    """
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_7b_config())
    text, vision = model.config.text_config, model.config.vision_config
    layer_params = sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    tower_layer = sum(p.numel() for p in model.model.vision_tower.encoder.layers[0].parameters())
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    d, depth = text.hidden_size, text.num_hidden_layers
    kv_dim = text.num_key_value_heads * (d // text.num_attention_heads)
    n_tower = NUM_IMAGE + 1
    fixed = vision.num_hidden_layers * (2 * n_tower * tower_layer + 4 * n_tower**2 * vision.hidden_size)
    fixed += 2 * NUM_IMAGE * projector + 2 * d * text.vocab_size
    N = 1 + cfg.text_before + NUM_IMAGE + cfg.text_after
    rows = []
    for name, method, _, keep in variants(cfg):
        first = 0 if method == "pool" else (depth if method is None else cfg.layer)
        lengths = [N if i < first else N - NUM_IMAGE + keep for i in range(depth)]
        gflops = (fixed + sum(2 * n * layer_params + 4 * n * n * d for n in lengths)) / 1e9
        kv_mib = sum(2 * n * kv_dim * 2 for n in lengths) / 2**20
        rows.append({"model": "llava-1.5-7b (analytic)", "variant": name, "image_tokens_kept": keep, "prompt_tokens": N,
                     "prefill_gflops": gflops, "kv_cache_mib_fp16": kv_mib})
    dense = rows[0]["prefill_gflops"]
    for row in rows:
        row["flops_ratio"] = row["prefill_gflops"] / dense
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the measured or analytic rows."""
    keys = [k for k in ("variant", "image_tokens_kept", "ttft_ms", "ttft_speedup", "ttft_best_ms", "ttft_speedup_best",
                        "decode_tokens_per_s", "decode_tokens_per_s_best", "kv_cache_mib",
                        "kv_cache_mib_fp16", "prefill_gflops", "flops_ratio") if k in rows[0]]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


# BENCH_MODELS entry "llava-cpu" (declared in pumer_plug/catalog.py)
def llava_cpu(batch_size: int = 1, **sizes: Any) -> Any:
    """LLaVA-1.5's geometry on a CPU (576 image tokens, 32 decoder layers, C = 256; random init):
    time to first token, decode tokens/s, KV-cache MiB and prefill FLOPs of dense and ``--method``
    at keep 192 / 128 / 64 (``all``: every method). ``sizes`` override ``DecoderBenchConfig`` fields."""
    from pumer_plug.evaluation.studies.bench import BenchSetup
    from pumer_plug.errors import UserError

    if batch_size != 1:
        raise UserError("bench llava-cpu measures batch size 1 (time to first token of one prompt)")

    def run(method: str, rounds: int) -> list[dict[str, Any]]:
        cfg = DecoderBenchConfig(**{**sizes, "rounds": rounds})
        methods = None if method == "all" else (method,)
        if methods and len(variants(cfg, methods)) == 1:
            raise UserError(f"bench llava-cpu has no variants of method {method!r}; choose from: "
                            f"{', '.join(sorted({m for _, m, _, _ in variants(cfg) if m}))}, all")
        return measure_cpu(cfg, methods)

    return BenchSetup(None, {}, "llava", None, "llava-cpu: LLaVA-1.5 token geometry at CPU width", runner=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=DecoderBenchConfig.rounds)
    parser.add_argument("--new-tokens", type=int, default=DecoderBenchConfig.new_tokens)
    parser.add_argument("--layers", type=int, default=DecoderBenchConfig.text_layers, help="decoder depth of the CPU model")
    parser.add_argument("--analytic-only", action="store_true", help="only the LLaVA-1.5-7B analytic rows")
    parser.add_argument("--out", help="append result rows here as JSON lines")
    args = parser.parse_args(argv)
    cfg = DecoderBenchConfig(rounds=args.rounds, new_tokens=args.new_tokens, text_layers=args.layers)
    rows = analytic_7b(cfg)
    print("LLaVA-1.5-7B, analytic (meta device)\n" + format_rows(rows))
    if not args.analytic_only:
        measured = measure_cpu(cfg)
        print(f"\nllava-cpu (C={cfg.text_hidden}, {cfg.text_layers} layers, {torch.get_num_threads()} threads)\n"
              + format_rows(measured))
        rows += measured
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps({**row, "bench_config": asdict(cfg)}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
