"""Pooling: average-pool the projected image-token grid before the decoder.

The decoder analogue of a smaller input resolution (SmRes): LLaVA-1.5's 24 x 24 grid of 576
projected tokens pooled 2 x 2 gives 144 (3 x 3 gives 64), and every decoder layer, the KV cache
and every decode step see the smaller grid. Image tokens are assumed to be a square raster grid
in row-major order (CLIP patches without CLS, as LLaVA-1.5 feeds them).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from pumer_plug.baselines.pool_config import PoolConfig
from pumer_plug.method import ReductionMethod
from pumer_plug.ops.plan import ReductionPlan
from pumer_plug.ops.reduce import drop_padding
from pumer_plug.stream import IMAGE, TokenStream


def pool_plan(batch: int, side: int, stride: int, device: torch.device) -> ReductionPlan:
    """Plan that averages every ``stride x stride`` window of a ``side x side`` raster grid.

    Shapes:
        -> dest (B, side * side), num_out = ceil(side / stride) ** 2
    """
    out_side = -(-side // stride)
    r = torch.arange(side, device=device)
    cell = (r[:, None] // stride) * out_side + r[None, :] // stride  # (side, side)
    dest = cell.reshape(1, -1).expand(batch, -1)  # (B, V)
    removed = side * side - out_side * out_side
    return ReductionPlan(dest=dest, num_out=out_side * out_side, removed=(removed,) * batch)


# METHODS entry "pool" (declared in pumer_plug/catalog.py)
class Pool(ReductionMethod):
    """Average-pools the image grid before the decoder (one reduction, reported at layer 0)."""

    name = "pool"
    display_name = "Pool"
    config_class = PoolConfig
    placements = frozenset({"decoder-input"})

    def reduction_layers(self, num_layers: int) -> tuple[int, ...]:
        return ()

    def check_image_tokens(self, num_image: int) -> None:
        side = math.isqrt(num_image)
        if side * side != num_image:
            raise ValueError(f"pool: {num_image} image tokens do not form a square grid")

    @classmethod
    def suggest_config(cls, trial: Any, num_layers: int, placement: str = "encoder-layer") -> PoolConfig:
        """The pooling stride (window side)."""
        return PoolConfig(stride=trial.suggest_int("stride", 1, 4))

    def reduce(self, layer: int, stream: TokenStream) -> ReductionPlan:
        plans = []
        for view in stream.views():
            side = math.isqrt(view.segment.length)
            if view.segment.modality != IMAGE or self.config.stride == 1:
                plans.append(drop_padding(view.mask, view.lengths))
            else:
                plans.append(pool_plan(view.mask.shape[0], side, self.config.stride, view.mask.device))
        return stream.reduce_segments(plans)
