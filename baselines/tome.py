"""ToMe: Token Merging (Bolya et al., ICLR 2023), the merging baseline of PuMer Table 2.

At every layer with ``r > 0`` the tokens of a stream are merged by bipartite soft matching on the
attention keys, over ALL tokens whatever their modality (the paper's ToMe baseline never looks
at text vs. image), between attention and MLP, with proportional attention by default.
``r`` is an absolute token count per layer (not a ratio), capped as in ToMe at half of a row's
mergeable tokens; the counts really used are kept in :attr:`Tome.effective_r`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pumer_plug.baselines.tome_config import TomeConfig, merge_cap  # noqa: F401 (re-exported)
from pumer_plug.method import KEYS, ReductionMethod
from pumer_plug.ops.counts import cap_merges
from pumer_plug.ops.plan import ReductionPlan
from pumer_plug.ops.reduce import bipartite_soft_matching, drop_padding
from pumer_plug.stream import TokenStream


@dataclass
class TomeForwardState:
    """ToMe's per-forward scratch: layer -> tokens merged away per row, one tuple per stream."""

    effective_r: dict[int, list[tuple[int, ...]]] = field(default_factory=dict)


# METHODS entry "tome" (declared in pumer_plug/catalog.py)
class Tome(ReductionMethod):
    """Token merging by bipartite soft matching over a whole stream (ToMe Sec. 3), with ToMe's
    split by position (``tome.merge.bipartite_soft_matching``; ``split="position"``).

    Raises:
        RuntimeError: at a forward where the adapter did not capture the keys.
    """

    name = "tome"
    display_name = "ToMe"
    config_class = TomeConfig
    requires = frozenset({KEYS})

    def __init__(self, config: TomeConfig) -> None:
        super().__init__(config)
        self.merges_text = not config.is_identity  # tokens merge whatever their modality
        self._schedule: tuple[int, ...] = ()

    @property
    def effective_r(self) -> dict[int, list[tuple[int, ...]]]:
        """Layer -> tokens merged away per row in the current (or last) forward, after the cap;
        one tuple per stream in the order the adapter reduced them (two-stream models have two)."""
        return self.scratch.effective_r

    def new_forward_state(self) -> TomeForwardState:
        return TomeForwardState()

    def proportional_attention(self) -> bool:
        return self.config.proportional_attention

    def reduction_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.config.reduction_layers is not None:
            super().reduction_layers(num_layers)  # raises on a layer beyond the depth
        self._schedule = self.config.schedule(num_layers)
        return tuple(i for i, r in enumerate(self._schedule) if r > 0)

    @classmethod
    def suggest_config(cls, trial: Any, num_layers: int, placement: str = "encoder-layer") -> TomeConfig:
        """r per layer and ToMe's schedule shape (``inflection``: -1 decreasing, 0 constant, +1 increasing)."""
        return TomeConfig(r=trial.suggest_int("r", 1, 32, log=True),
                          inflection=trial.suggest_categorical("inflection", [-1.0, -0.5, 0.0, 0.5, 1.0]))

    def reduce(self, layer: int, stream: TokenStream) -> ReductionPlan:
        r = self._schedule[layer] if layer < len(self._schedule) else 0
        lengths = stream.real_counts()
        num_protected = sum(s.num_protected for s in stream.segments)
        merged = cap_merges(r, lengths, num_protected)
        self.effective_r.setdefault(layer, []).append(merged)
        if any(merged) and stream.keys is None:
            raise RuntimeError(f"ToMe: attention keys were not captured at reduction layer {layer}")
        if any(merged):
            plan = bipartite_soft_matching(stream.keys, stream.mask, stream.protected, merged, lengths, split="position")
        else:
            plan = drop_padding(stream.mask, lengths)
        if len(stream.segments) == 1:  # one run keeps its modality (an image-only ViT stays "image")
            return stream.reduce_segments([plan])
        return stream.reduce_all(plan)  # ToMe merges text and image tokens with each other
