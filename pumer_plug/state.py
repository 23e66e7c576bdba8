"""The one per-forward state of a plugged model, owned by its handle.

Everything a forward accumulates lives here and nowhere else: the token streams, the token
counts after each reduction layer, per-layer scratch (e.g. the residual a reducer hands to the
FFN's residual rewriter), the adapter's own scratch and the method's. The handle replaces the
whole object at the start of every forward (:meth:`ReductionHandle.start_forward`), so nothing
from an earlier forward, or from one that raised half-way, can leak into the next.

Where each part goes:

- ``streams``: one :class:`~pumer_plug.stream.TokenStream` per token sequence, by name.
- ``counts``: reduction layer -> stream name -> :class:`TokenCount` (``handle.token_counts``).
- ``layer(i)``: a dict of scratch for layer ``i`` (shared hook factories use the keys
  ``"residual"``); cleared with the state.
- ``adapter``: the adapter's small dataclass, built by ``Adapter.new_forward_state()`` (e.g.
  the co-attention adapters' ``BlockState``). An adapter that needs more than streams and
  per-layer scratch declares one dataclass, returns a fresh one from ``new_forward_state`` and
  reads it back as ``handle.state.adapter`` in its hooks; it keeps nothing on ``self``.
- ``method``: the method's dataclass, set by ``ReductionMethod.on_forward_start(state)`` (ToMe's
  effective r, DynamicViT's decisions and policies).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pumer_plug.stream import IMAGE, MIXED, TEXT, TokenStream


@dataclass(frozen=True)
class TokenCount:
    """Padded token counts leaving a reduction layer (the lengths the next layer computes on)."""

    text: int
    image: int
    mixed: int = 0

    @property
    def total(self) -> int:
        return self.text + self.image + self.mixed


@dataclass
class ForwardState:
    """What one forward of a plugged model accumulates (see the module docstring).

    Attributes:
        training: the plugged model's ``training`` flag when the forward started.
        streams: stream name -> its :class:`TokenStream`.
        counts: reduction layer -> stream name -> :class:`TokenCount`.
        layers: layer -> scratch dict (use :meth:`layer`).
        adapter: the adapter's per-forward dataclass, or None.
        method: the method's per-forward dataclass, or None.
    """

    training: bool = False
    streams: dict[str, TokenStream] = field(default_factory=dict)
    counts: dict[int, dict[str, TokenCount]] = field(default_factory=dict)
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)
    adapter: Any = None
    method: Any = None

    def layer(self, index: int) -> dict[str, Any]:
        """The scratch dict of layer ``index`` (created empty on first use)."""
        return self.layers.setdefault(index, {})

    def record_counts(self, layer: int, name: str, stream: TokenStream) -> None:
        """Stores the padded (text, image, mixed) lengths of stream ``name`` after ``layer``."""
        self.counts.setdefault(layer, {})[name] = TokenCount(stream.count(TEXT), stream.count(IMAGE), stream.count(MIXED))

    def token_counts(self) -> dict[int, TokenCount]:
        """Token counts after each reduction layer, summed over streams."""
        out = {}
        for layer, per_stream in sorted(self.counts.items()):
            counts = list(per_stream.values())
            out[layer] = TokenCount(*(sum(getattr(c, f) for c in counts) for f in ("text", "image", "mixed")))
        return out
