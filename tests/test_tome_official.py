"""Our ToMe makes the merges of the official code (facebookresearch/ToMe ``tome/merge.py``,
``tome/patch/timm.py``): a small reference written from the repository's algorithm, checked on a
hand-sized example and against a plugged timm ViT."""
import math

import pytest
import torch

import pumer_plug
from pumer_plug import TomeConfig
from pumer_plug.ops.reduce import bipartite_soft_matching
from tests.backbones import build_timm_vit


# -- a reference of ToMe's bipartite_soft_matching + merge_wavg ------------------------------------
def reference_matching(metric: torch.Tensor, r: int, class_token: bool = True, distill_token: bool = False):
    """ToMe's split: A = x[..., ::2, :], B = x[..., 1::2, :] (absolute positions); the class token
    (A's first) gets a -inf row, the distillation token (B's first) a -inf column; the r best
    edges merge A into B; output = cat([unmerged A (class token sorted first), B])."""
    protected = int(class_token) + int(distill_token)
    r = min(r, (metric.shape[1] - protected) // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


def reference_wavg(merge, x: torch.Tensor, size: torch.Tensor | None):
    """ToMe's ``merge_wavg``: size-weighted average, sizes summed."""
    size = torch.ones_like(x[..., 0, None]) if size is None else size
    x = merge(x * size)
    size = merge(size)
    return x / size, size


def plan_for(keys, r, num_protected=1):
    B, N, _ = keys.shape
    mask = torch.ones(B, N, dtype=torch.bool)
    protected = torch.zeros_like(mask)
    protected[:, :num_protected] = True
    r = min(r, (N - num_protected) // 2)
    return bipartite_soft_matching(keys, mask, protected, (r,) * B, (N,) * B, split="position")


# -- hand-sized -------------------------------------------------------------------------------------
def test_the_split_is_by_absolute_position_and_the_order_is_tomes():
    """[CLS, t1 .. t6]: A = CLS, t2, t4, t6 (even), B = t1, t3, t5 (odd). t2 ~ t5 merge; output
    [CLS, t4, t6 | t1, t3, t5 + t2] as ToMe's cat([unm, dst])."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 7, 8, generator=g)
    keys[0, 2] = keys[0, 5]
    plan = plan_for(keys, 1)
    assert plan.dest[0].tolist() == [0, 3, 5, 4, 1, 5, 2]
    x = torch.randn(1, 7, 4, generator=g)
    expected, _ = reference_wavg(reference_matching(keys, 1), x, None)
    torch.testing.assert_close(plan.apply(x), expected)


@pytest.mark.parametrize("num_protected", [1, 2])
@pytest.mark.parametrize("r", [1, 3, 8])
def test_random_keys_give_the_reference_merges(r, num_protected):
    g = torch.Generator().manual_seed(r)
    keys, x = torch.randn(3, 17, 8, generator=g), torch.randn(3, 17, 5, generator=g)
    size = torch.rand(3, 17, 1, generator=g) + 0.5
    plan = plan_for(keys, r, num_protected)
    merge = reference_matching(keys, r, class_token=True, distill_token=num_protected == 2)
    expected, expected_size = reference_wavg(merge, x, size)
    torch.testing.assert_close(plan.apply(x, size), expected)
    torch.testing.assert_close(plan.apply_size(size), expected_size)


# -- on a timm ViT ----------------------------------------------------------------------------------
def reference_tome_vit(model, x: torch.Tensor, r: int) -> torch.Tensor:
    """``tome.patch.timm``: merge after each block's attention residual, proportional attention."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    size = None
    for block in model.blocks:
        attn = block.attn
        h = block.norm1(x)
        B, N, C = h.shape
        qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D)
        k = attn.k_norm(k)
        scores = (attn.q_norm(q) * attn.scale) @ k.transpose(-2, -1)
        if size is not None:
            scores = scores + size.log()[:, None, None, :, 0]
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
        x = x + block.ls1(attn.proj(attn.norm(out)))
        x, size = reference_wavg(reference_matching(k.mean(1), r, class_token=True), x, size)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("r", [2, 6])
def test_plugged_timm_vit_equals_the_official_algorithm(r):
    model = build_timm_vit(img_size=48)  # 1 + 36 tokens, 4 blocks
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference_tome_vit(model, x, r)
        dense = model(x)
        with pumer_plug.apply(model, adapter="timm-vit", method="tome", config=TomeConfig(r=r)):
            out = model(x)
    assert not torch.allclose(out, dense, atol=1e-3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
