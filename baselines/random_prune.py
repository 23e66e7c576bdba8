"""Random pruning: a seeded random keep set of image tokens at decoder layer K.

A strong baseline in recent token-reduction benchmarks (VTC-Bench, arXiv 2510.07143;
UniPruneBench, arXiv 2511.02650). The same budget fields as FastV (:class:`KeepConfig`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pumer_plug.baselines.fastv import KeepConfig, KeepTopK
from pumer_plug.errors import UserError
from pumer_plug.registry import METHODS
from pumer_plug.stream import IMAGE, TokenStream


@dataclass(frozen=True)
class RandomConfig(KeepConfig):
    """Random keep set. See :class:`KeepConfig`.

    Attributes:
        seed: seeds the keep set. Every sample with V image tokens draws the same scores, so a
            batched forward keeps what each row alone would keep.
    """

    seed: int = 0

    LABEL: ClassVar[str] = "Random"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserError(f"RandomConfig.seed must be an int, got {self.seed!r}")

    def summary(self) -> str:
        return f"{super().summary()} seed={self.seed}"


@METHODS.register("random")
class RandomPrune(KeepTopK):
    """Keeps a seeded random subset of the image tokens at layer K (in their original order)."""

    name = "random"
    display_name = "Random"
    config_class = RandomConfig

    def scores(self, layer: int, stream: TokenStream) -> torch.Tensor:
        V = stream.count(IMAGE)
        g = torch.Generator().manual_seed(self.config.seed)
        scores = torch.rand(V, generator=g)  # one draw per sample size: batch-independent
        return scores.to(stream.mask.device).expand(stream.mask.shape[0], V)  # (B, V)
