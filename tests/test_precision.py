"""Half precision: no NaN/Inf with padded text rows, padded image patches, proportional attention and
tokens merged at every layer (model cast and autocast); bf16 on the CPU, fp16 on a GPU."""
from __future__ import annotations

import pytest
import torch

import pumer_plug
from pumer_plug.baselines.tome import TomeConfig
from pumer_plug.config import PumerConfig
from tests.backbones import BACKBONES

CUDA = torch.cuda.is_available()


def _merge_everywhere(name: str, num_layers: int):
    if name == "timm-vit":
        return "tome", TomeConfig(r=3, proportional_attention=True)
    return "pumer", PumerConfig(reduction_layers=tuple(range(num_layers)), prune_ratio=0.2, image_merge_ratio=0.4,
                                text_merge_ratio=0.4, proportional_attention=True)


def _batch(name: str, dtype: torch.dtype | None, device: str) -> dict:
    batch = BACKBONES[name].make_batch()
    if name == "vilt":  # padded image patches too: the right third of row 1's image is padding
        pixel_mask = torch.ones(3, 64, 96, dtype=torch.long)
        pixel_mask[1, :, 64:] = 0
        batch["pixel_mask"] = pixel_mask
    cast = lambda v: v.to(device=device, dtype=dtype) if dtype is not None and v.is_floating_point() else v.to(device)  # noqa: E731
    return {k: cast(v) for k, v in batch.items()}


def _run(name: str, dtype: torch.dtype, device: str, autocast: bool) -> tuple[torch.Tensor, dict]:
    backbone = BACKBONES[name]
    model = backbone.build().to(device)
    if not autocast:
        model = model.to(dtype)
    method, config = _merge_everywhere(name, backbone.num_layers)
    batch = _batch(name, None if autocast else dtype, device)
    with pumer_plug.apply(model, method=method, config=config) as handle, torch.no_grad(), \
            torch.autocast(device, dtype=dtype, enabled=autocast):
        out = backbone.logits(model(**batch))
    return out, handle.token_counts


def _check(name: str, dtype: torch.dtype, device: str, autocast: bool) -> None:
    out, counts = _run(name, dtype, device, autocast)
    assert torch.isfinite(out.float()).all(), f"{name} {dtype} autocast={autocast}: non-finite outputs"
    first, last = min(counts), max(counts)
    assert counts[last].total < counts[first].total or len(counts) == 1  # tokens were really merged


NAMES = ["vilt", "meter", "bridgetower", "timm-vit"]


@pytest.mark.parametrize("autocast", [False, True], ids=["cast", "autocast"])
@pytest.mark.parametrize("name", NAMES)
def test_bf16_cpu_finite(name, autocast):
    _check(name, torch.bfloat16, "cpu", autocast)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("autocast", [False, True], ids=["cast", "autocast"])
@pytest.mark.parametrize("name", NAMES)
def test_half_cuda_finite(name, autocast, dtype):
    _check(name, dtype, "cuda", autocast)


def test_sizes_accumulate_in_float32_under_half_precision():
    backbone = BACKBONES["vilt"]
    model = backbone.build().to(torch.bfloat16)
    method, config = _merge_everywhere("vilt", backbone.num_layers)
    sizes = []
    with pumer_plug.apply(model, method=method, config=config) as handle, torch.no_grad():
        inner = handle.method.reduce

        def reduce(layer, stream):
            plan = inner(layer, stream)
            if stream.size is not None:
                sizes.append(stream.size.dtype)
            return plan

        handle.method.reduce = reduce
        model(**_batch("vilt", torch.bfloat16, "cpu"))
        del handle.method.reduce
    assert sizes and all(d == torch.float32 for d in sizes)
