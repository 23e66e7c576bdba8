"""Per-forward bookkeeping of a token sequence as a backbone carries it through its layers.

A backbone has one stream (ViLT: ``[text | image]``) or one per modality (METER, BridgeTower).
A stream is a run of segments, each holding its real tokens first and padding after them. The
adapter fills in what it captured at a reduction layer (attention keys, text-saliency scores);
the method turns that into a :class:`ReductionPlan`; the stream applies the plan to its masks,
sizes and per-row counts, and the adapter applies it to hidden states and residuals.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pumer_plug.ops.counts import RowCounts, add_counts, row_counts, sum_counts
from pumer_plug.ops.plan import ReductionPlan, concat_plans
from pumer_plug.ops.reduce import text_saliency_per_head

TEXT, IMAGE, MIXED = "text", "image", "mixed"


@dataclass(frozen=True)
class Segment:
    """A contiguous run of one modality in a stream.

    Attributes:
        modality: ``"text"``, ``"image"`` or ``"mixed"`` (after a method merged across modalities).
        length: padded length of the run (tokens).
        num_protected: protected tokens per row inside the run (host int).
    """

    modality: str
    length: int
    num_protected: int


@dataclass
class SegmentView:
    """The tensors of one segment, sliced out of its stream.

    Shapes:
        keys (B, n, C) or None, mask (B, n) bool, protected (B, n) bool, saliency (B, H, n) or None
        (text-saliency per head, combined by the method);
        lengths: real tokens per row (host ints, with their device copy: ``RowCounts``).
    """

    segment: Segment
    keys: torch.Tensor | None
    mask: torch.Tensor
    protected: torch.Tensor
    lengths: tuple[int, ...]
    saliency: torch.Tensor | None


class TokenStream:
    """Masks, token sizes and per-row real counts of one sequence during a forward.

    Args:
        mask: (B, N) bool, real tokens.
        protected: (B, N) bool, tokens never pruned or merged.
        segments: the modality runs in sequence order; their lengths sum to N.
        lengths: real tokens per row of every segment, one tuple per segment: host ints, or
            :class:`~pumer_plug.ops.counts.RowCounts` that also hold them on the device (adapters
            pass those, from the mask sums; plain tuples are copied to the device once here).

    The per-row counts stay on both sides for the whole forward: plans carry what they removed
    (host and device), and the stream subtracts it, so methods and ops never copy counts to the
    device.
    """

    def __init__(
        self,
        mask: torch.Tensor,
        protected: torch.Tensor,
        segments: list[Segment],
        lengths: list[tuple[int, ...]],
    ) -> None:
        if sum(s.length for s in segments) != mask.shape[1]:
            raise ValueError(f"segments {segments} do not cover the {mask.shape[1]} tokens of the stream")
        self.mask = mask
        self.protected = protected
        self.segments = list(segments)
        self.lengths: list[RowCounts] = [row_counts(n, mask.device) for n in lengths]
        self.size: torch.Tensor | None = None  # (B, N, 1) float32; None while every size is 1
        self.keys: torch.Tensor | None = None  # (B, N, C), captured at a reduction layer
        self.saliency: torch.Tensor | None = None  # (B, H, V) per head, over the image segment
        self.hidden: torch.Tensor | None = None  # (B, N, C) token features at a reduction layer (DynamicViT)
        self.bias_cache: torch.Tensor | None = None
        # the plan of the last reduction and the text-saliency scores it saw, until the handle reads them
        self.last_plan: ReductionPlan | None = None
        self.last_saliency: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.mask.shape[1]

    def count(self, modality: str) -> int:
        """Padded number of tokens of a modality in the stream."""
        return sum(s.length for s in self.segments if s.modality == modality)

    def real_counts(self) -> RowCounts:
        """Real tokens per row over all segments (host ints, with their device copy)."""
        return sum_counts(self.lengths)

    def sizes(self) -> torch.Tensor:
        """Token sizes (B, N, 1) float32: how many input tokens each token stands for."""
        if self.size is None:
            self.size = torch.ones(*self.mask.shape, 1, device=self.mask.device)
        return self.size

    def set_keys(self, keys: torch.Tensor, num_heads: int) -> None:
        """Stores the matching metric: attention keys averaged over heads, as ToMe and PuMer's
        released code use (``k.mean(1)``).

        Shapes:
            keys (B, N, C) with heads concatenated along C -> stored (B, N, C / num_heads)
        """
        B, N, C = keys.shape
        self.keys = keys.view(B, N, num_heads, C // num_heads).mean(dim=2)  # (B, N, C/H)

    def set_text_saliency(self, attn: torch.Tensor, text_mask: torch.Tensor) -> None:
        """Stores PuMer Eq. (1) scores per head from text-to-image attention for the image segment;
        the method combines the heads (:func:`~pumer_plug.ops.reduce.combine_heads`).

        Shapes:
            attn (B, H, T, V), text_mask (B, T) -> stored (B, H, V)
        """
        self.saliency = text_saliency_per_head(attn, text_mask)

    def views(self) -> list[SegmentView]:
        """Slices keys, masks and scores per segment."""
        out, start = [], 0
        for segment, lengths in zip(self.segments, self.lengths):
            stop = start + segment.length
            keys = None if self.keys is None else self.keys[:, start:stop]
            saliency = self.saliency if segment.modality == IMAGE else None
            out.append(SegmentView(segment, keys, self.mask[:, start:stop], self.protected[:, start:stop], lengths, saliency))
            start = stop
        return out

    def reduce_segments(self, plans: list[ReductionPlan]) -> ReductionPlan:
        """Applies one plan per segment (in order) and returns the plan over the whole stream."""
        plan = concat_plans(plans, [s.length for s in self.segments])
        self.segments = [replace(s, length=p.num_out) for s, p in zip(self.segments, plans)]
        self.lengths = [_subtract(n, p.removed) for n, p in zip(self.lengths, plans)]
        self._apply(plan)
        return plan

    def reduce_all(self, plan: ReductionPlan) -> ReductionPlan:
        """Applies a plan that may merge across segments; the stream becomes one mixed segment."""
        total = self.real_counts()
        num_protected = sum(s.num_protected for s in self.segments)
        self.segments = [Segment(MIXED, plan.num_out, num_protected)]
        self.lengths = [_subtract(total, plan.removed)]
        self._apply(plan)
        return plan

    def _apply(self, plan: ReductionPlan) -> None:
        self.last_plan, self.last_saliency = plan, self.saliency
        if not plan.is_identity:
            if plan.merges or self.size is not None:  # keep-or-drop plans leave sizes of 1 unset
                self.size = plan.apply_size(self.size)
            self.mask = plan.apply_mask(self.mask)
            self.protected = plan.apply_mask(self.protected)
            self.bias_cache = None
        self.keys = None
        self.saliency = None
        self.hidden = None


def _subtract(lengths: RowCounts, removed: tuple[int, ...]) -> RowCounts:
    out = add_counts(lengths, removed, sign=-1)
    return out if isinstance(out, RowCounts) else RowCounts(out, lengths.tensor - torch.tensor(removed, device=lengths.tensor.device))
