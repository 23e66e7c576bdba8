"""PuMer's token-reduction math as pure tensor functions (PuMer Sec. 4, Alg. 1; ToMe Sec. 3).

Symbols: B batch, T text tokens, V image tokens, N tokens of a segment, C channels, H heads,
r tokens removed. Protected tokens (CLS, image CLS, distillation token) are an explicit (B, N) bool
argument and are never pruned or merged. Per-row counts are host integers, so a batch with mixed lengths reduces each row exactly as it
would be reduced alone.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from pumer_plug.ops.plan import ReductionPlan, compact_plan


def prune_count(num_tokens: int, prune_ratio: float, num_protected: int) -> int:
    """Image tokens pruned from a row with ``num_tokens`` real tokens (PuMer Alg. 1 line 2).

    ``k' = (1 - k)|V|`` tokens are kept; protected tokens are always kept, so at most
    ``num_tokens - num_protected`` tokens are pruned. Rounds as the released code does, with
    Python's ``round()`` (half to even): 0.1 x 145 = 14.5 -> 14.
    """
    return max(0, min(round(prune_ratio * num_tokens), num_tokens - num_protected))


def merge_count(num_tokens: int, merge_ratio: float, num_protected: int) -> int:
    """Tokens removed by merging in a row with ``num_tokens`` real tokens (PuMer Alg. 1 line 8).

    ``r' = r|X|``, capped, as in ToMe, at half of the mergeable tokens: bipartite matching can
    remove at most one token per edge and each side holds half of them. Rounds half to even,
    as the released code does (``round(merge_ratio * length)``).
    """
    return max(0, min(round(merge_ratio * num_tokens), (num_tokens - num_protected) // 2))


SALIENCY_HEADS = ("sum", "first")


def text_saliency_per_head(attn: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Text-to-image attention of every head averaged over the real text tokens (PuMer Eq. 1
    before the sum over heads); padding text tokens never change a score.

    Shapes:
        attn (B, H, T, V), text_mask (B, T) -> (B, H, V) float32
    """
    with torch.no_grad():
        weight = text_mask.float()  # (B, T)
        weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(1.0)
        return torch.einsum("bhtv,bt->bhv", attn.float(), weight)


def combine_heads(per_head: torch.Tensor, heads: str = "sum") -> torch.Tensor:
    """Text-saliency score from per-head scores: summed over heads (PuMer Eq. 1; the released
    code's ``mh`` mean ranks the same) or the first head only (released ``fh``, its ViLT VQA default).

    Shapes:
        per_head (B, H, V) -> (B, V)

    Raises:
        ValueError: ``heads`` is not one of ``SALIENCY_HEADS``.
    """
    if heads == "sum":
        return per_head.sum(dim=1)
    if heads == "first":
        return per_head[:, 0]
    raise ValueError(f"saliency heads must be one of {SALIENCY_HEADS}, got {heads!r}")


def text_saliency_score(attn: torch.Tensor, text_mask: torch.Tensor, heads: str = "sum") -> torch.Tensor:
    """Text-saliency score of every image token, PuMer Eq. (1).

    Text-to-image attention averaged over the real text tokens only (so padding text tokens never
    change a score) and summed over heads, or taken from the first head (``heads="first"``).

    Shapes:
        attn (B, H, T, V), text_mask (B, T) -> (B, V) float32
    """
    return combine_heads(text_saliency_per_head(attn, text_mask), heads)  # PuMer Eq. (1)


def prune_by_score(
    scores: torch.Tensor,
    mask: torch.Tensor,
    protected: torch.Tensor,
    num_pruned: Sequence[int],
    lengths: Sequence[int],
) -> ReductionPlan:
    """Keeps the top-scoring real tokens of each row in their original order (PuMer Alg. 1 l. 2-3).

    Args:
        scores: (B, N) text-saliency scores; higher is kept.
        mask: (B, N) bool, real tokens.
        protected: (B, N) bool, tokens that are always kept (e.g. image CLS).
        num_pruned: tokens to prune per row (host ints, see :func:`prune_count`).
        lengths: real tokens per row (host ints).

    Shapes:
        scores (B, N) -> plan with num_out = max_i(lengths_i - num_pruned_i); kept tokens first,
        in their original order, then padding.
    """
    with torch.no_grad():
        if not any(num_pruned):
            return drop_padding(mask, lengths)
        keep_counts = [n - p for n, p in zip(lengths, num_pruned)]
        s = scores.float().masked_fill(~mask, -math.inf)  # (B, N)
        s = s.masked_fill(protected & mask, math.inf)
        rank = _rank_descending(s)  # (B, N)
        keep_t = torch.tensor(keep_counts, device=scores.device).unsqueeze(1)  # (B, 1)
        return compact_plan(rank < keep_t, max(keep_counts), removed=tuple(num_pruned))


def bipartite_soft_matching(
    keys: torch.Tensor,
    mask: torch.Tensor,
    protected: torch.Tensor,
    num_merged: Sequence[int],
    lengths: Sequence[int],
) -> ReductionPlan:
    """Merge plan from bipartite soft matching on attention keys (ToMe Sec. 3; PuMer Alg. 1 l. 5-10).

    The mergeable tokens of a row (real and not protected) alternate, in order, between set A and
    set B; every A token draws an edge to its most similar B token (cosine similarity of keys),
    and the ``r`` most similar edges of the row are merged: the A token joins its B token.
    Padding and protected tokens take no edge, so a real token is never merged with padding.
    Surviving tokens keep their relative order (a merged pair sits at the B token's place) and
    come first, padding after them.

    Args:
        keys: (B, N, C) attention keys (heads flattened into C).
        mask: (B, N) bool, real tokens.
        protected: (B, N) bool, tokens never merged (CLS, image CLS, distillation token).
        num_merged: tokens removed per row (host ints, see :func:`merge_count`); must not exceed
            half of the row's mergeable tokens.
        lengths: real tokens per row (host ints).

    Shapes:
        keys (B, N, C) -> plan with num_out = max_i(lengths_i - num_merged_i)
    """
    with torch.no_grad():
        if not any(num_merged):
            return drop_padding(mask, lengths)
        B, N, _ = keys.shape
        mergeable = mask & ~protected  # (B, N)
        order = (mergeable.to(torch.int64).cumsum(dim=1) - 1) % 2  # (B, N) 0 -> A, 1 -> B
        is_a, is_b = mergeable & (order == 0), mergeable & (order == 1)
        pos_a, ok_a = _gather_positions(is_a)  # (B, N_a)
        pos_b, ok_b = _gather_positions(is_b)  # (B, N_b)
        k = keys.float()
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k_a = k.gather(1, pos_a.unsqueeze(-1).expand(-1, -1, k.shape[-1]))  # (B, N_a, C)
        k_b = k.gather(1, pos_b.unsqueeze(-1).expand(-1, -1, k.shape[-1]))  # (B, N_b, C)
        scores = k_a @ k_b.transpose(1, 2)  # (B, N_a, N_b)
        scores = scores.masked_fill(~(ok_a[:, :, None] & ok_b[:, None, :]), -math.inf)
        node_max, node_idx = scores.max(dim=-1)  # (B, N_a)
        r_t = torch.tensor(num_merged, device=keys.device).unsqueeze(1)  # (B, 1)
        merged_a = (_rank_descending(node_max) < r_t) & ok_a  # (B, N_a)

        merged = torch.zeros_like(mask).scatter_(1, pos_a, merged_a)  # (B, N)
        survive = mask & ~merged
        slot = survive.to(torch.int64).cumsum(dim=1) - 1  # (B, N)
        num_out = max(n - r for n, r in zip(lengths, num_merged))
        dest = torch.where(survive, slot, torch.full_like(slot, num_out))
        match_slot = slot.gather(1, pos_b.gather(1, node_idx))  # (B, N_a) slot of each A's match
        dest_a = torch.where(merged_a, match_slot, dest.gather(1, pos_a))
        dest = dest.scatter(1, pos_a, dest_a)
        return ReductionPlan(dest=dest, num_out=num_out, removed=tuple(num_merged))


def attention_bias(
    mask: torch.Tensor, size: torch.Tensor | None, dtype: torch.dtype, proportional: bool
) -> torch.Tensor:
    """Additive attention bias over keys: padding masked out, plus ``log(size)`` if proportional.

    Proportional attention (ToMe Sec. 3) lets a merged token of size s count as s tokens.

    Shapes:
        mask (B, N) bool, size (B, N, 1) -> (B, 1, 1, N)
    """
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    bias = bias.masked_fill(~mask, torch.finfo(dtype).min)
    if proportional and size is not None:
        bias = bias + size[..., 0].log().to(dtype)
    return bias[:, None, None, :]


def _rank_descending(values: torch.Tensor) -> torch.Tensor:
    """Rank of each entry in its row, 0 = largest; ties broken by position.

    Shapes:
        values (B, N) -> (B, N) int64
    """
    order = values.argsort(dim=-1, descending=True, stable=True)
    return order.argsort(dim=-1)


def _gather_positions(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the true entries of each row, in order, padded to the longest row.

    Shapes:
        flags (B, N) bool -> positions (B, M) int64, valid (B, M) bool, M = max true per row
    """
    N = flags.shape[1]
    pos = torch.arange(N, device=flags.device)
    key = torch.where(flags, pos, pos + N)  # (B, N) true entries sort first, in order
    width = max(1, (N + 1) // 2)
    positions = key.argsort(dim=1)[:, :width]  # (B, M)
    valid = flags.gather(1, positions)
    return positions, valid


def drop_padding(mask: torch.Tensor, lengths: Sequence[int]) -> ReductionPlan:
    """Plan that removes no real token: the identity, or a compaction when the batch carries
    more padding than its longest row needs.

    Shapes:
        mask (B, N) bool -> plan with num_out = max(lengths)
    """
    num_out = max(lengths)
    if num_out == mask.shape[1]:
        return ReductionPlan.identity(mask.shape[1])
    return compact_plan(mask, num_out, removed=tuple(0 for _ in lengths))
