"""Each op against a slow, obviously-correct loop reference on seeded random inputs."""
import math

import pytest
import torch

from pumer_plug.ops.plan import ReductionPlan, compact_plan, concat_plans, gather_rows
from pumer_plug.ops.reduce import (
    attention_bias,
    bipartite_soft_matching,
    merge_count,
    prune_by_score,
    prune_count,
    text_saliency_score,
)


def loop_saliency(attn, text_mask, heads=None):
    B, H, T, V = attn.shape
    heads = range(H) if heads is None else heads
    out = torch.zeros(B, V, dtype=torch.float64)
    for b in range(B):
        real = [t for t in range(T) if text_mask[b, t]]
        for v in range(V):
            out[b, v] = sum(float(attn[b, h, t, v]) for h in heads for t in real) / len(real)
    return out


def test_text_saliency_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(3, 2, 5, 7, generator=g).softmax(-1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(text_saliency_score(attn, mask).double(), loop_saliency(attn, mask))
    torch.testing.assert_close(text_saliency_score(attn, mask, heads="first").double(), loop_saliency(attn, mask, [0]))


def test_text_saliency_rejects_unknown_head_mode():
    with pytest.raises(ValueError, match="saliency heads must be one of"):
        text_saliency_score(torch.rand(1, 2, 3, 4), torch.ones(1, 3, dtype=torch.bool), heads="mean")


def test_text_saliency_ignores_padding_text_tokens():
    g = torch.Generator().manual_seed(1)
    attn = torch.rand(2, 4, 6, 9, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    padded_attn = torch.cat([attn, torch.rand(2, 4, 3, 9, generator=g) * 100], dim=2)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(text_saliency_score(padded_attn, padded_mask), text_saliency_score(attn, mask))


def test_counts_follow_the_paper_and_are_capped():
    assert prune_count(145, 0.1, 1) == 14  # round(k|V|), half to even as the released code: 14.5 -> 14
    assert prune_count(155, 0.1, 1) == 16  # 15.5 -> 16
    assert merge_count(130, 0.3, 1) == 39  # round(r|X|)
    assert merge_count(10, 0.9, 1) == 4  # capped at half of the 9 mergeable tokens
    assert prune_count(3, 0.9, 1) == 2  # protected token always kept
    assert merge_count(5, 0.0, 1) == 0


def loop_prune(scores, mask, protected, pruned, lengths):
    rows = []
    for b in range(scores.shape[0]):
        real = [i for i in range(scores.shape[1]) if mask[b, i]]
        keep_n = lengths[b] - pruned[b]
        ranked = sorted(real, key=lambda i: (not protected[b, i], -float(scores[b, i]), i))
        rows.append(sorted(ranked[:keep_n]))
    return rows


def test_prune_keeps_top_tokens_in_order_and_protected():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(4, 10, generator=g)
    lengths = (10, 8, 10, 5)
    mask = torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]
    protected = torch.zeros_like(mask)
    protected[:, 0] = True
    scores[:, 0] = -1.0  # the protected token has the lowest score and is still kept
    pruned = tuple(prune_count(n, 0.4, 1) for n in lengths)
    plan = prune_by_score(scores, mask, protected, pruned, lengths)
    x = torch.arange(10.0)[None, :, None].expand(4, 10, 1)
    out = plan.apply(x)
    out_mask = plan.apply_mask(mask)
    for b, kept in enumerate(loop_prune(scores, mask, protected, pruned, lengths)):
        assert out[b, : len(kept), 0].tolist() == [float(i) for i in kept]
        assert out_mask[b].sum() == len(kept)
        assert not out_mask[b, len(kept):].any()


def loop_bipartite(keys, mask, protected, merged, lengths):
    """Slow reference: returns, per row, the list of groups (input positions) of each output token."""
    rows = []
    for b in range(keys.shape[0]):
        cand = [i for i in range(keys.shape[1]) if mask[b, i] and not protected[b, i]]
        A, Bset = cand[0::2], cand[1::2]
        k = keys[b].double()
        k = k / k.norm(dim=-1, keepdim=True)
        edges = []
        for a in A:
            sims = [float(k[a] @ k[bb]) for bb in Bset]
            j = max(range(len(Bset)), key=lambda j: (sims[j], -j))
            edges.append((sims[j], a, Bset[j]))
        chosen = sorted(edges, key=lambda e: (-e[0], A.index(e[1])))[: merged[b]]
        groups = {i: [i] for i in range(keys.shape[1]) if mask[b, i]}
        for _, a, bb in chosen:
            groups[bb].append(a)
            del groups[a]
        rows.append([sorted(groups[i]) for i in sorted(groups)])
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bipartite_soft_matching_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, N, C = 3, 11, 8
    keys = torch.randn(B, N, C, generator=g)
    lengths = (11, 7, 9)
    mask = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]
    protected = torch.zeros_like(mask)
    protected[:, 0] = True
    protected[0, 5] = True  # a protected token in the middle (e.g. image CLS)
    merged = tuple(merge_count(n, 0.4, int(protected[b].sum())) for b, n in enumerate(lengths))
    plan = bipartite_soft_matching(keys, mask, protected, merged, lengths)
    x = torch.randn(B, N, 4, generator=g, dtype=torch.float64)
    out, out_mask = plan.apply(x), plan.apply_mask(mask)
    sizes = plan.apply_size(torch.ones(B, N, 1, dtype=torch.float64))
    for b, groups in enumerate(loop_bipartite(keys, mask, protected, merged, lengths)):
        assert len(groups) == lengths[b] - merged[b]
        for slot, group in enumerate(groups):
            torch.testing.assert_close(out[b, slot], x[b, group].mean(dim=0))
            assert sizes[b, slot, 0] == len(group)
        assert out_mask[b].sum() == len(groups)


def test_merge_never_touches_padding_or_protected():
    g = torch.Generator().manual_seed(3)
    keys = torch.ones(2, 8, 4)  # all tokens equally similar, padding included
    keys += 0.01 * torch.randn(2, 8, 4, generator=g)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3], dtype=torch.bool)
    protected = torch.zeros_like(mask)
    protected[:, 0] = True
    plan = bipartite_soft_matching(keys, mask, protected, (3, 2), (8, 5))
    x = torch.zeros(2, 8, 1)
    x[1, 5:] = 1000.0  # padding content must not leak into any real token
    x[:, 0] = -7.0
    out = plan.apply(x)
    assert out[1].abs().max() < 1000.0 and out[1, 0, 0] == -7.0 and out[0, 0, 0] == -7.0


def test_weighted_average_uses_sizes_and_gradients_flow():
    x = torch.tensor([[[1.0], [3.0], [10.0]]], requires_grad=True)
    dest = torch.tensor([[0, 0, 1]])
    plan = ReductionPlan(dest=dest, num_out=2, removed=(1,))
    size = torch.tensor([[[1.0], [3.0], [1.0]]])
    out = plan.apply(x, size)
    assert out[0, 0, 0].item() == pytest.approx((1 * 1 + 3 * 3) / 4)
    out.sum().backward()
    assert x.grad is not None and (x.grad != 0).all()


def loop_apply(dest, num_out, x, size):
    B, N, C = x.shape
    out = torch.zeros(B, num_out, C, dtype=torch.float64)
    for b in range(B):
        for slot in range(num_out):
            members = [n for n in range(N) if dest[b, n] == slot]
            if members:
                weight = sum(float(size[b, n, 0]) for n in members)
                out[b, slot] = sum(x[b, n].double() * float(size[b, n, 0]) for n in members) / weight
    return out


@pytest.mark.parametrize("merges", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_apply_matches_loop_reference(merges, seed):
    """Merging (index-add) and keep-or-drop (gather) plans, with discarded tokens and empty slots."""
    g = torch.Generator().manual_seed(seed)
    B, N, C, M = 3, 9, 4, 5
    if merges:
        dest = torch.randint(0, M + 1, (B, N), generator=g)  # several tokens per slot, some discarded
    else:
        dest = torch.stack([torch.cat([torch.arange(M), torch.full((N - M,), M)])[torch.randperm(N, generator=g)]
                            for _ in range(B)])  # at most one token per slot
        dest[0][dest[0] == 2] = M  # row 0: slot 2 stays empty
    plan = ReductionPlan(dest=dest, num_out=M, merges=merges)
    x = torch.randn(B, N, C, generator=g, requires_grad=True)
    size = torch.randint(1, 4, (B, N, 1), generator=g).float()
    out = plan.apply(x, size)
    assert out.shape == (B, M, C) and out.is_contiguous()
    torch.testing.assert_close(out.double(), loop_apply(dest, M, x.detach(), size))
    torch.testing.assert_close(plan.apply(x).double(), loop_apply(dest, M, x.detach(), torch.ones(B, N, 1)))
    out.sum().backward()
    kept = dest < M
    assert (x.grad.abs().sum(-1) > 0)[kept].all() and (x.grad[~kept] == 0).all()


def test_gather_rows_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=g)
    index = torch.randint(0, 7, (3, 4), generator=g)
    out = gather_rows(x, index)
    assert out.shape == (3, 4, 5)
    for b in range(3):
        for m in range(4):
            assert torch.equal(out[b, m], x[b, index[b, m]])


def test_identity_plan_and_compositions():
    x = torch.randn(2, 5, 3)
    ident = ReductionPlan.identity(5)
    assert ident.apply(x) is x
    keep = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    p1 = compact_plan(keep, 3, removed=(2, 3))
    p2 = ReductionPlan(dest=torch.tensor([[0, 0, 1], [0, 1, 2]]), num_out=2, removed=(1, 0))
    both = p1.then(p2)
    torch.testing.assert_close(both.apply(x), p2.apply(p1.apply(x), p1.apply_size(torch.ones(2, 5, 1))))
    assert both.removed == (3, 3)
    joined = concat_plans([p1, ReductionPlan.identity(2)], [5, 2])
    y = torch.randn(2, 7, 3)
    torch.testing.assert_close(joined.apply(y), torch.cat([p1.apply(y[:, :5]), y[:, 5:]], dim=1))


def test_attention_bias_masks_padding_and_adds_log_size():
    mask = torch.tensor([[True, True, False]])
    size = torch.tensor([[[1.0], [4.0], [1.0]]])
    bias = attention_bias(mask, size, torch.float32, proportional=True)
    assert bias.shape == (1, 1, 1, 3)
    assert bias[0, 0, 0, 0] == 0 and bias[0, 0, 0, 1] == pytest.approx(math.log(4.0))
    assert bias[0, 0, 0, 2] < -1e30
    plain = attention_bias(mask, size, torch.float32, proportional=False)
    assert plain[0, 0, 0, 1] == 0
