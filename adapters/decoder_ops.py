"""Tensor helpers of the decoder adapters: lifting an image-run plan to whole prompt rows and
reducing the 4-D attention mask with it (symbols: B batch, N prompt tokens, V image tokens)."""
from __future__ import annotations

import torch

from pumer_plug.ops.plan import ReductionPlan


def reduce_mask(mask: torch.Tensor | None, rep: torch.Tensor, orig_index: torch.Tensor) -> torch.Tensor | None:
    """The 4-D mask of the reduced prefill: rows and columns of the kept tokens.

    A None mask (sdpa, no padding: causal by order) stays None while the kept positions increase;
    otherwise a boolean mask says which original positions each token may attend to.

    Shapes:
        mask (B or 1, 1, N, N) or None, rep (B, N'), orig_index (B, N') -> (B, 1, N', N') or None
    """
    if mask is None:
        if bool((orig_index[:, 1:] > orig_index[:, :-1]).all()):
            return None
        return (orig_index[:, None, None, :] <= orig_index[:, None, :, None])  # (B, 1, N', N')
    B, n = rep.shape
    mask = mask.expand(B, *mask.shape[1:])
    heads = mask.shape[1]
    mask = mask.gather(2, rep[:, None, :, None].expand(-1, heads, -1, mask.shape[3]))  # rows
    return mask.gather(3, rep[:, None, None, :].expand(-1, heads, n, -1))  # columns


def row_plan(plan: ReductionPlan, starts: torch.Tensor, V: int, N: int) -> ReductionPlan:
    """Lifts a plan over every row's image run (B, V) to the whole row (B, N).

    Text before the image keeps its slots, image tokens go where ``plan`` sends them (offset by
    the row's image start), text after the image moves up by the tokens removed.
    """
    if plan.dest is None:
        return ReductionPlan.identity(N)
    B = plan.dest.shape[0]
    r = V - plan.num_out
    out = N - r
    pos = torch.arange(N, device=plan.dest.device).expand(B, N)
    rel = pos - starts[:, None]  # (B, N)
    d = plan.dest.gather(1, rel.clamp(0, V - 1))  # (B, N)
    image_dest = torch.where(d < plan.num_out, starts[:, None] + d, torch.full_like(d, out))
    dest = torch.where((rel >= 0) & (rel < V), image_dest, torch.where(rel >= V, pos - r, pos))
    return ReductionPlan(dest=dest, num_out=out, removed=plan.removed)


def scatter_image(size: torch.Tensor, starts: torch.Tensor, N: int) -> torch.Tensor:
    """Token sizes of a whole row: the image run's sizes, 1 elsewhere. (B, V, 1) -> (B, N, 1)"""
    B, V, _ = size.shape
    out = torch.ones(B, N, 1, dtype=size.dtype, device=size.device)
    index = (starts[:, None] + torch.arange(V, device=size.device))[..., None]
    return out.scatter(1, index, size)
