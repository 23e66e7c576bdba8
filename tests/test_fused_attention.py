"""PuMer beside fused attention: text-saliency from queries and keys, METER on SDPA, sdpa == eager plugged."""
from __future__ import annotations

import math

import pytest
import torch

import pumer_plug
from pumer_plug.config import PumerConfig
from pumer_plug.ops.reduce import text_saliency_per_head
from pumer_plug.ops.saliency import attention_rows, text_saliency_from_qk
from tests.backbones import METHOD_CONFIGS, build_meter, build_timm_vit, image_batch, meter_batch


def _loop_rows(q, k, num_heads, bias):
    """Obviously-correct reference: one softmax per (row, head, query)."""
    B, T, C = q.shape
    D = C // num_heads
    out = torch.zeros(B, num_heads, T, k.shape[1])
    for b in range(B):
        for h in range(num_heads):
            for t in range(T):
                logits = [float(q[b, t, h * D:(h + 1) * D] @ k[b, n, h * D:(h + 1) * D]) / math.sqrt(D)
                          + float(bias[b, 0, 0, n]) for n in range(k.shape[1])]
                top = max(logits)
                exps = [math.exp(x - top) for x in logits]
                out[b, h, t] = torch.tensor([e / sum(exps) for e in exps])
    return out


def test_attention_rows_match_loop_reference():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    bias = torch.zeros(2, 5).masked_fill(~mask, torch.finfo(torch.float32).min)
    bias = (bias + torch.rand(2, 5, generator=g).log1p())[:, None, None, :]  # log(size)-like
    probs = attention_rows(q, k, 2, bias)
    torch.testing.assert_close(probs, _loop_rows(q, k, 2, bias), atol=1e-6, rtol=1e-5)
    assert (probs[1, :, :, 2:] == 0).all()  # padding keys get no mass


def test_text_saliency_from_qk_equals_probabilities_path():
    g = torch.Generator().manual_seed(1)
    B, T, V, C, H = 2, 4, 6, 16, 4
    x = torch.randn(B, T + V, C, generator=g)
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    bias = torch.zeros(B, 1, 1, T + V)
    full = attention_rows(x, x, H, bias)  # (B, H, N, N): what an eager model would hand over
    want = text_saliency_per_head(full[:, :, :T, T:], text_mask)
    got = text_saliency_from_qk(x[:, :T], x, text_mask, H, slice(T, None), bias)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert got.shape == (B, H, V)


def _record_saliency(handle):
    """Wraps the method's reduce to record the per-head scores and the kept/merged plan of each call."""
    method, seen = handle.method, []
    inner = method.reduce

    def reduce(layer, stream):
        saliency = None if stream.saliency is None else stream.saliency.clone()
        plan = inner(layer, stream)
        seen.append((layer, saliency, plan.dest.clone()))
        return plan

    method.reduce = reduce
    return seen


@pytest.mark.parametrize("proportional", [False, True])
def test_meter_sdpa_saliency_equals_eager(proportional):
    batch = meter_batch()
    config = PumerConfig(reduction_layers=(0, 1, 2), prune_ratio=0.3, image_merge_ratio=0.3, text_merge_ratio=0.2,
                         proportional_attention=proportional)
    runs = {}
    for impl in ("eager", "sdpa"):
        model = build_meter(attn_implementation=impl)
        with pumer_plug.apply(model, adapter="meter", method="pumer", config=config) as handle, torch.no_grad():
            seen = _record_saliency(handle)
            out = model(**batch)
            runs[impl] = (out, seen, {k: vars(v) for k, v in handle.token_counts.items()})
        del handle.method.reduce
    (out_e, seen_e, counts_e), (out_s, seen_s, counts_s) = runs["eager"], runs["sdpa"]
    assert counts_e == counts_s
    scored = [(a, b) for a, b in zip(seen_e, seen_s) if a[1] is not None]
    assert len(scored) == 3  # every reduction block's image stream got scores
    for (layer_e, sal_e, dest_e), (layer_s, sal_s, dest_s) in zip(seen_e, seen_s):
        assert layer_e == layer_s
        assert torch.equal(dest_e, dest_s)  # same kept and merged sets
        if sal_e is not None:
            torch.testing.assert_close(sal_s, sal_e, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_s, out_e, atol=1e-5, rtol=1e-4)


def test_meter_sdpa_dense_equals_eager_and_uses_no_probabilities():
    batch = meter_batch()
    eager, sdpa = build_meter(attn_implementation="eager"), build_meter(attn_implementation="sdpa")
    calls = []
    sdpa.cross_modal_text_layers[0].crossattention.self.dropout.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        torch.testing.assert_close(sdpa(**batch), eager(**batch), atol=1e-5, rtol=1e-4)
    assert calls == []  # SDPA computes no probabilities


def test_meter_rejects_unknown_attn_implementation():
    with pytest.raises(ValueError, match="attn_implementation"):
        build_meter(attn_implementation="flash")


@pytest.mark.parametrize("method", ["pumer", "tome", "dynamicvit", "smres"])
def test_meter_every_method_sdpa_equals_eager(method):
    batch = meter_batch()
    reducing, _ = METHOD_CONFIGS[method]
    outs, counts = {}, {}
    for impl in ("eager", "sdpa"):
        model = build_meter(attn_implementation=impl)
        with pumer_plug.apply(model, adapter="meter", method=method, config=reducing(4, ("text", "image"))) as h, \
                torch.no_grad():
            outs[impl] = model(**batch)
            counts[impl] = {k: vars(v) for k, v in h.token_counts.items()}
    assert counts["eager"] == counts["sdpa"]
    torch.testing.assert_close(outs["sdpa"], outs["eager"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["tome", "dynamicvit", "smres"])
def test_timm_every_method_fused_equals_eager(method):
    batch = image_batch()
    reducing, _ = METHOD_CONFIGS[method]
    outs = {}
    for fused in (False, True):
        model = build_timm_vit()
        for block in model.blocks:
            block.attn.fused_attn = fused
        with pumer_plug.apply(model, method=method, config=reducing(4, ("image",))), torch.no_grad():
            outs[fused] = model(batch["x"] if "x" in batch else next(iter(batch.values())))
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-4)
