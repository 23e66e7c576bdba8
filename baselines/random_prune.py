"""Random pruning: a seeded random keep set of image tokens at decoder layer K.

A strong baseline in recent token-reduction benchmarks (VTC-Bench, arXiv 2510.07143;
UniPruneBench, arXiv 2511.02650). The same budget fields as FastV (:class:`KeepConfig`).
"""
from __future__ import annotations


import torch

from pumer_plug.baselines.fastv import KeepTopK
from pumer_plug.baselines.keep_config import RandomConfig
from pumer_plug.stream import IMAGE, TokenStream


# METHODS entry "random" (declared in pumer_plug/catalog.py)
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
