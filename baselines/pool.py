"""Pooling: average-pool the projected image-token grid before the decoder.

The decoder analogue of a smaller input resolution (SmRes): LLaVA-1.5's 24 x 24 grid of 576
projected tokens pooled 2 x 2 gives 144 (3 x 3 gives 64), and every decoder layer, the KV cache
and every decode step see the smaller grid. Image tokens are assumed to be a square raster grid
in row-major order (CLIP patches without CLS, as LLaVA-1.5 feeds them).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from pumer_plug.method import ReductionMethod
from pumer_plug.ops.plan import ReductionPlan
from pumer_plug.ops.reduce import drop_padding
from pumer_plug.config import MethodConfig
from pumer_plug.errors import UserError
from pumer_plug.registry import METHODS
from pumer_plug.stream import IMAGE, TokenStream


@dataclass(frozen=True)
class PoolConfig(MethodConfig):
    """Average pooling of the image-token grid.

    Attributes:
        stride: side of the pooling window and its stride (1 is the identity; a partial window
            at the grid's edge averages the tokens it covers).

    Raises:
        UserError: a stride that is not an int >= 1.
    """

    stride: int = 2

    LABEL: ClassVar[str] = "Pool"

    def __post_init__(self) -> None:
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise UserError(f"PoolConfig.stride must be an int >= 1, got {self.stride!r}")

    @property
    def is_identity(self) -> bool:
        return self.stride == 1

    def summary(self) -> str:
        return f"stride={self.stride}"


PoolConfig.register_preset("keep144", "2 x 2 pooling of LLaVA-1.5's 24 x 24 grid (576 -> 144)", stride=2)
PoolConfig.register_preset("keep64", "3 x 3 pooling of the 24 x 24 grid (576 -> 64)", stride=3)


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


@METHODS.register("pool")
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
