"""PuMer: text-informed image pruning and modality-aware merging (Cao et al., ACL 2023, Sec. 4)."""
from __future__ import annotations

from pumer_plug.config import PumerConfig
from pumer_plug.method import KEYS, TEXT_SALIENCY, ReductionMethod, suggest_layers
from pumer_plug.ops.counts import add_counts, cap_merges, merge_count, prune_count
from pumer_plug.ops.plan import ReductionPlan
from pumer_plug.ops.reduce import bipartite_soft_matching, combine_heads, drop_padding, prune_by_score
from pumer_plug.stream import IMAGE, TEXT, SegmentView, TokenStream


# METHODS entry "pumer" (declared in pumer_plug/catalog.py)
class Pumer(ReductionMethod):
    """Token reducer of PuMer Alg. 1, applied per segment of each stream.

    At a reduction layer an image segment is pruned by text-saliency score (keep the top
    ``1 - k``) and its kept tokens are merged by bipartite soft matching (ratio ``r``); a text
    segment is merged (ratio ``t``). Image and text tokens never merge with each other.
    Counts per row follow the row's real tokens (rounded half to even, as the released code's
    ``round()``): ``round(k|V|)`` pruned, ``round(r|V|)`` and
    ``round(t|T|)`` merged, merges capped at half of a segment's mergeable tokens. The image merge
    count is taken of the image tokens *before* pruning, as in the released code
    (``merge_r = round(merge_ratio * image_length)``) and in the FLOPs of the paper's Table 7;
    Alg. 1's footnote 6 writes ``r|X|`` of the pruned set instead.

    Raises:
        RuntimeError: at a forward where the adapter did not capture the keys or text-saliency
            scores the reducer needs (the model is never run unreduced in silence).
    """

    name = "pumer"
    display_name = "PuMer"
    config_class = PumerConfig
    requires = frozenset({KEYS, TEXT_SALIENCY})
    placements = frozenset({"encoder-layer", "decoder-layer"})

    def __init__(self, config: PumerConfig) -> None:
        super().__init__(config)
        self.merges_text = config.text_merge_ratio > 0

    def proportional_attention(self) -> bool:
        return self.config.proportional_attention

    @classmethod
    def suggest_config(cls, trial, num_layers: int, placement: str = "encoder-layer") -> PumerConfig:
        """Reduction layers, prune ratio k, image merge ratio r and text merge ratio t (PuMer Table 4's knobs).

        Between decoder layers (``"decoder-layer"``) text is never merged (t = 0: every prompt token
        is a cached, causally ordered position) and k reaches 0.95, as FastV's prune ratio does.
        """
        decoder = placement == "decoder-layer"
        return PumerConfig(reduction_layers=suggest_layers(trial, num_layers),
                           prune_ratio=trial.suggest_float("prune_ratio", 0.0, 0.95 if decoder else 0.8, step=0.05),
                           image_merge_ratio=trial.suggest_float("image_merge_ratio", 0.0, 0.5, step=0.05),
                           text_merge_ratio=0.0 if decoder else
                           trial.suggest_float("text_merge_ratio", 0.0, 0.3, step=0.05))

    def reduce(self, layer: int, stream: TokenStream) -> ReductionPlan:
        plans = []
        for view in stream.views():
            if view.segment.modality == IMAGE:
                plans.append(self._reduce_image(layer, view))
            elif view.segment.modality == TEXT:
                t = self.config.text_merge_ratio
                merged = merge_count(view.lengths, t, view.segment.num_protected)
                plans.append(self._merge(layer, view, view.lengths, merged))
            else:
                raise RuntimeError(f"PuMer cannot reduce a {view.segment.modality!r} segment at layer {layer}")
        return stream.reduce_segments(plans)

    def _reduce_image(self, layer: int, view: SegmentView) -> ReductionPlan:
        cfg, p = self.config, view.segment.num_protected
        pruned = prune_count(view.lengths, cfg.prune_ratio, p)  # PuMer Alg. 1 line 2
        merged = merge_count(view.lengths, cfg.image_merge_ratio, p)  # of |V| before pruning
        if not any(pruned):
            return self._merge(layer, view, view.lengths, merged)
        if view.saliency is None:
            raise RuntimeError(f"PuMer: text-saliency scores were not captured at reduction layer {layer}")
        scores = combine_heads(view.saliency, cfg.saliency_heads)  # PuMer Eq. (1): (B, H, V) -> (B, V)
        prune = prune_by_score(scores, view.mask, view.protected, pruned, view.lengths)  # Alg. 1 line 3
        kept = add_counts(view.lengths, pruned, sign=-1)
        after = SegmentView(
            view.segment,
            None if view.keys is None else prune.apply(view.keys),
            prune.apply_mask(view.mask),
            prune.apply_mask(view.protected),
            kept,
            None,
        )
        return prune.then(self._merge(layer, after, kept, merged))  # Alg. 1 line 4

    def _merge(self, layer: int, view: SegmentView, lengths: tuple[int, ...], merged: tuple[int, ...]) -> ReductionPlan:
        p = view.segment.num_protected
        merged = cap_merges(merged, lengths, p)  # cap after pruning
        if any(merged) and view.keys is None:
            raise RuntimeError(f"PuMer: attention keys were not captured at reduction layer {layer}")
        if not any(merged):
            return drop_padding(view.mask, lengths)
        return bipartite_soft_matching(view.keys, view.mask, view.protected, merged, lengths)
