"""FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2"), on decoder VLMs.

After layer ``K - 1`` of the decoder the image tokens are ranked by the attention they receive
from the last prompt token (summed over heads) and only the top ones go on to layers ``K..``:
FastV's defaults are K = 2 and R = 50% pruned. The budget is a prune ratio or a keep count
(``keep_tokens``: 192 / 128 / 64 of LLaVA-1.5's 576, as papers report). Pruning happens in the
prefill only; decode steps attend to the reduced KV cache ("static" pruning, FastV issue #14).
"""
from __future__ import annotations

from typing import Any

from pumer_plug.baselines.keep_config import KEEP_BUDGETS, FastVConfig, KeepConfig  # noqa: F401 (re-exported)
from pumer_plug.method import TEXT_SALIENCY, ReductionMethod
from pumer_plug.ops.plan import ReductionPlan
from pumer_plug.ops.reduce import combine_heads, drop_padding, prune_by_score
from pumer_plug.stream import IMAGE, TokenStream

class KeepTopK(ReductionMethod):
    """Base of the keep-top-k decoder methods: one reduction between layers K - 1 and K.

    Subclasses implement :meth:`scores`.
    """

    placements = frozenset({"decoder-layer"})

    def reduction_layers(self, num_layers: int) -> tuple[int, ...]:
        point = self.config.layer - 1  # the adapter's reduction point i lies between layers i and i + 1
        if point >= num_layers:
            raise ValueError(
                f"{type(self.config).__name__}.layer K={self.config.layer} is beyond the decoder: the kept tokens "
                f"must enter a layer in 1..{num_layers}"
            )
        return (point,)

    @classmethod
    def suggest_config(cls, trial: Any, num_layers: int, placement: str = "encoder-layer") -> KeepConfig:
        """K (the first layer on the kept tokens) and the prune ratio R."""
        return cls.config_class(layer=trial.suggest_int("layer", 1, num_layers),
                                prune_ratio=trial.suggest_float("prune_ratio", 0.0, 0.95, step=0.05))

    def check_image_tokens(self, num_image: int) -> None:
        k = self.config.keep_tokens
        if k is not None and k > num_image:
            raise ValueError(
                f"{type(self.config).__name__}.keep_tokens={k} exceeds the {num_image} image tokens of a sample"
            )

    def scores(self, layer: int, stream: TokenStream):
        raise NotImplementedError

    def reduce(self, layer: int, stream: TokenStream) -> ReductionPlan:
        plans = []
        for view in stream.views():
            if view.segment.modality != IMAGE:
                plans.append(drop_padding(view.mask, view.lengths))
                continue
            pruned = tuple(self.config.num_pruned(n) for n in view.lengths)
            if not any(pruned):
                plans.append(drop_padding(view.mask, view.lengths))
                continue
            scores = self.scores(layer, stream)
            plans.append(prune_by_score(scores, view.mask, view.protected, pruned, view.lengths))
        return stream.reduce_segments(plans)


# METHODS entry "fastv" (declared in pumer_plug/catalog.py)
class FastV(KeepTopK):
    """Keeps the image tokens the last prompt token attends to most (FastV Sec. 4).

    Raises:
        RuntimeError: at a forward where the adapter did not capture the attention scores.
    """

    name = "fastv"
    display_name = "FastV"
    config_class = FastVConfig
    requires = frozenset({TEXT_SALIENCY})
    saliency_queries = "last"

    def scores(self, layer: int, stream: TokenStream):
        if stream.saliency is None:
            raise RuntimeError(f"FastV: the last prompt token's attention was not captured at layer {layer}")
        return combine_heads(stream.saliency, "sum")  # (B, H, V) -> (B, V): the last prompt token's attention, summed over heads
