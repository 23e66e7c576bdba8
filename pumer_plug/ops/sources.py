"""Source tracking: which input tokens every token stands for after each reduction layer.

As ToMe's ``source`` matrix, but from plans: the plans of a stream compose (``plan_a.then(plan_b)``)
into one plan from the forward's input tokens to the tokens leaving a layer, so the slot of every
input token tells whether it was kept alone, merged with others (tokens sharing a slot) or pruned
(the discard slot). :func:`trace_sources` records these composed plans on a handle; it is off
unless asked for, since it keeps one (B, N) index tensor per stream and layer.

Example:
    >>> handle = pumer_plug.apply(model, method="tome", config=TomeConfig(r=8))
    >>> trace = trace_sources(handle)
    >>> model(**batch)
    >>> groups = patch_groups(trace.slots(layer=3, stream="vilt")[0], start=9, num_patches=144)
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from pumer_plug.ops.plan import ReductionPlan


def source_slots(plan: ReductionPlan, num_tokens: int) -> tuple[torch.Tensor, int]:
    """Slot of every input token under a composed plan, and the discard slot.

    Shapes:
        plan.dest (B, N) or None (identity) -> (B, N) int64 slots, values in [0, num_out]
    """
    if plan.dest is None:
        return torch.arange(num_tokens).unsqueeze(0), num_tokens + 1  # nothing is ever discarded
    return plan.dest, plan.num_out


@dataclass(frozen=True)
class PatchGroups:
    """What became of each of one row's patches at one layer.

    Attributes:
        slot: per patch, the token it went into, or -1 when it was pruned.
        kept: patches that are a token of their own.
        merged: groups (sorted lists of patch indices) of patches sharing one token, in order of the token.
        pruned: pruned patches.
    """

    slot: list[int]
    kept: list[int]
    merged: list[list[int]]
    pruned: list[int]

    @property
    def num_tokens(self) -> int:
        """Image tokens the patches became (kept ones plus one per merged group)."""
        return len(self.kept) + len(self.merged)


def patch_groups(slots: torch.Tensor, start: int, num_patches: int, discard: int) -> PatchGroups:
    """Sorts one row's patches into kept, merged groups and pruned.

    Args:
        slots: (N,) slot of every input token of the stream (:func:`source_slots`, one row).
        start: index of the first patch token; the patches are ``start .. start + num_patches - 1``.
        discard: the discard slot.
    """
    row = slots[start:start + num_patches].tolist()
    members: dict[int, list[int]] = {}
    for patch, slot in enumerate(row):
        if slot != discard:
            members.setdefault(slot, []).append(patch)
    kept = sorted(ps[0] for ps in members.values() if len(ps) == 1)
    merged = [members[s] for s in sorted(members) if len(members[s]) > 1]
    pruned = [p for p, s in enumerate(row) if s == discard]
    return PatchGroups([-1 if s == discard else s for s in row], kept, merged, pruned)


def token_groups(slots: torch.Tensor, start: int, length: int, discard: int) -> list[list[int]]:
    """Surviving tokens ``start .. start + length - 1`` of one row grouped by the token they went into,
    in order of that token (a group of one is a token kept alone).

    Shapes:
        slots (N,) -> lists of indices relative to ``start``
    """
    members: dict[int, list[int]] = {}
    for i, slot in enumerate(slots[start:start + length].tolist()):
        if slot != discard:
            members.setdefault(slot, []).append(i)
    return [members[s] for s in sorted(members)]


@dataclass
class SourceTrace:
    """The composed plan of every stream after each reduction layer of the last forward.

    Attributes:
        plans: layer -> stream name -> plan from the forward's input tokens to the tokens leaving the layer.
        saliency: layer -> stream name -> (B, H, V) text-saliency scores per head the layer's reducer
            saw over the stream's image segment (PuMer Eq. 1), for methods that compute them.
        inputs: the model's keyword arguments of the last forward that reduced tokens (after any
            method's input hook).
    """

    plans: dict[int, dict[str, ReductionPlan]] = field(default_factory=dict)
    saliency: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    inputs: Mapping[str, Any] = field(default_factory=dict)
    _total: dict[str, ReductionPlan] = field(default_factory=dict)

    def reset(self, inputs: Mapping[str, Any]) -> None:
        self.plans, self.saliency, self._total, self.inputs = {}, {}, {}, dict(inputs)

    def observe(self, layer: int, stream: str, plan: ReductionPlan | None, saliency: torch.Tensor | None) -> None:
        """A ``handle.plan_observers`` callback: composes ``plan`` onto the stream's plans so far."""
        total = self._total.get(stream, ReductionPlan(dest=None, num_out=0))  # identity so far
        if plan is not None:
            total = total.then(plan)
        self._total[stream] = total
        self.plans.setdefault(layer, {})[stream] = total
        if saliency is not None:
            self.saliency.setdefault(layer, {})[stream] = saliency.detach()

    def slots(self, layer: int, stream: str, num_tokens: int) -> tuple[torch.Tensor, int]:
        """(B, N) slots of the stream's input tokens after ``layer`` and the discard slot (:func:`source_slots`)."""
        plan = self.plans.get(layer, {}).get(stream) or ReductionPlan(dest=None, num_out=num_tokens)
        return source_slots(plan, num_tokens)


def trace_sources(handle: Any) -> SourceTrace:
    """Starts recording the composed plans of every forward of ``handle``'s model.

    A forward is what the adapter counts as one (``handle.start_forward()``): the trace restarts at
    the first reduction after it, so the decode steps of a decoder's generation, which continue
    the prefill's forward and reduce nothing, leave the prefill's plans and inputs in place.
    Outputs are unchanged (only indices are kept); ``handle.remove()`` stops the recording.
    """
    trace = SourceTrace()
    signature = inspect.signature(handle.model.forward)

    pending: dict[str, Any] = {"inputs": {}, "forward": None}

    def start(module: Any, args: tuple, kwargs: dict) -> None:
        pending["inputs"] = signature.bind_partial(*args, **kwargs).arguments  # by name, positional ones too

    def observe(layer: int, stream: str, plan: ReductionPlan | None, saliency: torch.Tensor | None) -> None:
        if handle.state is not pending["forward"]:  # the first reduction since handle.start_forward()
            pending["forward"] = handle.state
            trace.reset(pending["inputs"])
        trace.observe(layer, stream, plan, saliency)

    handle.add_forward_pre_hook(handle.model, start, with_kwargs=True)
    handle.plan_observers.append(observe)
    return trace
