"""PuMer's token-reduction math as pure tensor functions (PuMer Sec. 4, Alg. 1; ToMe Sec. 3).

Symbols: B batch, T text tokens, V image tokens, N tokens of a segment, C channels, H heads,
r tokens removed. Protected tokens (CLS, image CLS, distillation token) are an explicit (B, N) bool
argument and are never pruned or merged. Per-row counts are host integers, so a batch with mixed
lengths reduces each row exactly as it would be reduced alone; given as
:class:`~pumer_plug.ops.counts.RowCounts` they also carry their device copy, and the ops make no
host-to-device copy (plain tuples are copied once per op).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from pumer_plug.ops import SALIENCY_HEADS
from pumer_plug.ops.counts import add_counts, counts_on_device, merge_count, prune_count  # noqa: F401 (re-exported)
from pumer_plug.ops.plan import ReductionPlan, compact_plan, gather_rows


def text_saliency_per_head(attn: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Text-to-image attention of every head averaged over the real text tokens (PuMer Eq. 1
    before the sum over heads); padding text tokens never change a score.

    Shapes:
        attn (B, H, T, V), text_mask (B, T) -> (B, H, V) float32
    """
    with torch.no_grad():
        weight = text_mask.float()  # (B, T)
        weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(1.0)
        # (B, 1, 1, T) @ (B, H, T, V): a batched matmul reads the strided text rows in place (4x faster than einsum on CPU)
        return torch.matmul(weight[:, None, None, :], attn.float()).squeeze(2)  # (B, H, V)


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
        keep_counts = add_counts(lengths, num_pruned, sign=-1)
        s = scores.float().masked_fill(~mask, -math.inf)  # (B, N)
        s = s.masked_fill(protected & mask, math.inf)
        rank = _rank_descending(s)  # (B, N)
        keep_t = counts_on_device(keep_counts, scores.device).unsqueeze(1)  # (B, 1)
        return compact_plan(rank < keep_t, max(keep_counts), removed=_as_counts(num_pruned))


def bipartite_soft_matching(
    keys: torch.Tensor,
    mask: torch.Tensor,
    protected: torch.Tensor,
    num_merged: Sequence[int],
    lengths: Sequence[int],
    split: str = "mergeable",
) -> ReductionPlan:
    """Merge plan from bipartite soft matching on attention keys (ToMe Sec. 3; PuMer Alg. 1 l. 5-10).

    Tokens are split into sets A and B; every A token draws an edge to its most similar B token
    (cosine similarity of keys), and the ``r`` most similar edges of the row are merged: the A
    token joins its B token. Padding and protected tokens take no edge, so a real token is never
    merged with padding. Two splits (``SPLITS``):

    - ``"mergeable"`` (PuMer here): the mergeable tokens of a row (real, not protected)
      alternate, in order, between A and B, so the split does not depend on where protected
      tokens sit. Survivors keep their relative order (a merged pair sits at the B token's place).
    - ``"position"`` (ToMe's ``tome.merge.bipartite_soft_matching``, to the letter): A = even, B =
      odd positions among the row's real tokens; protected tokens take no edge (ToMe's ``-inf``
      row of the class token, column of the distillation token). Output as ToMe's
      ``cat([unm, dst])``: protected tokens, then A's unmerged tokens, then B's, each in order.

    Survivors come first, padding after them.

    Args:
        keys: (B, N, C) attention keys (heads flattened into C).
        mask: (B, N) bool, real tokens.
        protected: (B, N) bool, tokens never merged (CLS, image CLS, distillation token).
        num_merged: tokens removed per row (host ints, see :func:`merge_count`); must not exceed
            half of the row's mergeable tokens.
        lengths: real tokens per row (host ints).
        split: ``"mergeable"`` or ``"position"``.

    Shapes:
        keys (B, N, C) -> plan with num_out = max_i(lengths_i - num_merged_i)
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    with torch.no_grad():
        if not any(num_merged):
            return drop_padding(mask, lengths)
        mergeable = mask & ~protected  # (B, N)
        counted = mergeable if split == "mergeable" else mask  # what the alternation runs over
        odd = (counted.to(torch.int64).cumsum(dim=1) - 1) % 2 == 1  # (B, N); ToMe: x[::2] -> A, x[1::2] -> B
        is_a, is_b = mergeable & ~odd, mergeable & odd
        merged_a, pos_a, pos_b, node_idx = _best_edges(keys, is_a, is_b, num_merged)
        merged = torch.zeros_like(mask).scatter_(1, pos_a, merged_a)  # (B, N)
        survive = mask & ~merged
        if split == "mergeable":
            slot = survive.to(torch.int64).cumsum(dim=1) - 1  # (B, N) survivors keep their order
        else:
            N = mask.shape[1]
            pos = torch.arange(N, device=mask.device)
            group = torch.where(protected, 0, torch.where(is_b, 2, 1))  # protected, unmerged A, B
            order = torch.where(survive, group * N + pos, 3 * N + pos)  # (B, N) survivors first
            slot = order.argsort(dim=1).argsort(dim=1)  # (B, N) output slot of every survivor
        num_out = max(n - r for n, r in zip(lengths, num_merged))
        dest = torch.where(survive, slot, torch.full_like(slot, num_out))  # (B, N)
        match_slot = slot.gather(1, pos_b.gather(1, node_idx))  # (B, N_a) slot of each A's match
        dest = dest.scatter(1, pos_a, torch.where(merged_a, match_slot, dest.gather(1, pos_a)))
        return ReductionPlan(dest=dest, num_out=num_out, removed=_as_counts(num_merged))


SPLITS = ("mergeable", "position")


def _best_edges(keys: torch.Tensor, is_a: torch.Tensor, is_b: torch.Tensor, num_merged: Sequence[int]):
    """The ``r`` most similar A -> B edges of every row (cosine similarity of keys).

    Shapes:
        keys (B, N, C), is_a (B, N), is_b (B, N) -> merged_a (B, N_a) bool, pos_a (B, N_a),
        pos_b (B, N_b), node_idx (B, N_a) index into pos_b of each A token's best B token
    """
    pos_a, ok_a = _gather_positions(is_a)  # (B, N_a)
    pos_b, ok_b = _gather_positions(is_b)  # (B, N_b)
    k = keys.float()
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k_a, k_b = gather_rows(k, pos_a), gather_rows(k, pos_b)  # (B, N_a, C), (B, N_b, C)
    scores = k_a @ k_b.transpose(1, 2)  # (B, N_a, N_b)
    scores.masked_fill_(~ok_b[:, None, :], -math.inf)  # no edge into a padding slot of B (broadcast, in place)
    node_max, node_idx = scores.max(dim=-1)  # (B, N_a)
    node_max.masked_fill_(~ok_a, -math.inf)  # padding slots of A rank last
    r_t = counts_on_device(num_merged, keys.device).unsqueeze(1)  # (B, 1)
    merged_a = (_rank_descending(node_max) < r_t) & ok_a  # (B, N_a)
    return merged_a, pos_a, pos_b, node_idx


def attention_bias(
    mask: torch.Tensor, size: torch.Tensor | None, dtype: torch.dtype, proportional: bool,
    masked_value: float | None = None,
) -> torch.Tensor:
    """Additive attention bias over keys: padding masked out (``masked_value``, default the
    dtype's minimum), plus ``log(size)`` if proportional and sizes are set.

    Proportional attention (ToMe Sec. 3) lets a merged token of size s count as s tokens.

    Shapes:
        mask (B, N) bool, size (B, N, 1) -> (B, 1, 1, N)
    """
    fill = torch.finfo(dtype).min if masked_value is None else masked_value
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    bias = bias.masked_fill(~mask, fill)
    if proportional and size is not None:
        bias = bias + size[..., 0].log().to(dtype)
    return bias[:, None, None, :]


def _rank_descending(values: torch.Tensor) -> torch.Tensor:
    """Rank of each entry in its row, 0 = largest; ties broken by position.

    Shapes:
        values (B, N) -> (B, N) int64
    """
    order = values.argsort(dim=-1, descending=True, stable=True)  # (B, N)
    ranks = torch.arange(values.shape[-1], device=values.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)  # the inverse permutation, without a second sort


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
    return compact_plan(mask, num_out)


def _as_counts(counts: Sequence[int]) -> tuple[int, ...]:
    return counts if isinstance(counts, tuple) else tuple(counts)
