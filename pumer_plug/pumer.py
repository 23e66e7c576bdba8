"""PuMer: text-informed image pruning and modality-aware merging (Cao et al., ACL 2023, Sec. 4)."""
from __future__ import annotations

from pumer_plug.config import PumerConfig
from pumer_plug.method import ReductionMethod
from pumer_plug.ops.plan import ReductionPlan
from pumer_plug.ops.reduce import bipartite_soft_matching, drop_padding, merge_count, prune_by_score, prune_count
from pumer_plug.registry import METHODS
from pumer_plug.stream import IMAGE, TEXT, SegmentView, TokenStream


@METHODS.register("pumer")
class Pumer(ReductionMethod):
    """Token reducer of PuMer Alg. 1, applied per segment of each stream.

    At a reduction layer an image segment is pruned by text-saliency score (keep the top
    ``1 - k``) and its kept tokens are merged by bipartite soft matching (ratio ``r``); a text
    segment is merged (ratio ``t``). Image and text tokens never merge with each other.
    Counts per row follow the row's real tokens: ``round(k|V|)`` pruned, ``round(r|V_p|)`` and
    ``round(t|T|)`` merged (PuMer Alg. 1 lines 2 and 8, footnotes 5-6), merges capped at half
    of a segment's mergeable tokens.

    Raises:
        RuntimeError: at a forward where the adapter did not capture the keys or text-saliency
            scores the reducer needs (the model is never run unreduced in silence).
    """

    name = "pumer"
    config_class = PumerConfig
    needs_keys = True
    needs_text_saliency = True

    def __init__(self, config: PumerConfig) -> None:
        super().__init__(config)
        self.merges_text = config.text_merge_ratio > 0

    def reduce(self, layer: int, stream: TokenStream) -> ReductionPlan:
        plans = []
        for view in stream.views():
            if view.segment.modality == IMAGE:
                plans.append(self._reduce_image(layer, view))
            elif view.segment.modality == TEXT:
                plans.append(self._merge(layer, view, view.lengths, self.config.text_merge_ratio))
            else:
                raise RuntimeError(f"PuMer cannot reduce a {view.segment.modality!r} segment at layer {layer}")
        return stream.reduce_segments(plans)

    def _reduce_image(self, layer: int, view: SegmentView) -> ReductionPlan:
        cfg = self.config
        p = view.segment.num_protected
        pruned = tuple(prune_count(n, cfg.prune_ratio, p) for n in view.lengths)
        if any(pruned) and view.saliency is None:
            raise RuntimeError(f"PuMer: text-saliency scores were not captured at reduction layer {layer}")
        prune = prune_by_score(view.saliency, view.mask, view.protected, pruned, view.lengths) if any(pruned) else None
        if prune is None or prune.is_identity:
            return self._merge(layer, view, view.lengths, cfg.image_merge_ratio)
        kept = tuple(n - k for n, k in zip(view.lengths, pruned))
        after = SegmentView(
            view.segment,
            None if view.keys is None else prune.apply(view.keys),
            prune.apply_mask(view.mask),
            prune.apply_mask(view.protected),
            kept,
            None,
        )
        return prune.then(self._merge(layer, after, kept, cfg.image_merge_ratio))

    def _merge(self, layer: int, view: SegmentView, lengths: tuple[int, ...], ratio: float) -> ReductionPlan:
        merged = tuple(merge_count(n, ratio, view.segment.num_protected) for n in lengths)
        if any(merged) and view.keys is None:
            raise RuntimeError(f"PuMer: attention keys were not captured at reduction layer {layer}")
        if not any(merged):
            return drop_padding(view.mask, lengths)
        return bipartite_soft_matching(view.keys, view.mask, view.protected, merged, lengths)
