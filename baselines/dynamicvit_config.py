"""DynamicViT's config and presets (torch-free, so ``pumer-plug list`` reads them without importing the method)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from pumer_plug.config import MethodConfig
from pumer_plug.errors import UserError


@dataclass(frozen=True)
class DynamicViTConfig(MethodConfig):
    """DynamicViT's pruning schedule.

    Attributes:
        reduction_layers: 0-based layers holding a prediction module (stages 1, 2, ...); unique,
            ascending, below the model's depth (checked at ``apply``).
        keep_ratio: rho in (0, 1]; stage ``s`` keeps ``floor(rho^s * V0)`` image tokens. 1.0 keeps
            everything (no predictor runs).
        tau: Gumbel-softmax temperature of the train-mode decisions (> 0; DynamicViT uses 1).
        embed_dim: width of the predictors; None takes the width the adapter hands over
            (``adapter.hidden_size``) when the method attaches.
        keep_ratio_weight: weight of the keep-ratio loss in ``training_losses()`` (DynamicViT's
            ``ratio_weight``, 2.0).

    Raises:
        ValueError: a field of the wrong type or range; the message names the field.

    Example:
        >>> DynamicViTConfig.preset("vilt")       # layers 3, 6, 9; rho = 0.7
        >>> DynamicViTConfig(reduction_layers=(1, 3), keep_ratio=0.5, embed_dim=768)
    """

    reduction_layers: tuple[int, ...] = (3, 6, 9)
    keep_ratio: float = 0.7
    tau: float = 1.0
    embed_dim: int | None = None
    keep_ratio_weight: float = 2.0

    LABEL: ClassVar[str] = "DynamicViT"

    def __post_init__(self) -> None:
        owner = "DynamicViTConfig"
        self._layers()
        if not self.reduction_layers:
            raise UserError(f"{owner}.reduction_layers must name at least one layer")
        rho = self.keep_ratio
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 < rho <= 1.0:
            raise UserError(f"{owner}.keep_ratio must be a number in (0, 1], got {rho!r}")
        tau = self.tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < tau < math.inf:
            raise UserError(f"{owner}.tau must be a finite number > 0, got {tau!r}")
        dim = self.embed_dim
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 4):
            raise UserError(f"{owner}.embed_dim must be None or an int >= 4, got {dim!r}")
        w = self.keep_ratio_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w < math.inf:
            raise UserError(f"{owner}.keep_ratio_weight must be a finite number >= 0, got {w!r}")

    @property
    def is_identity(self) -> bool:
        return self.keep_ratio >= 1.0

    def summary(self) -> str:
        return f"layers={','.join(map(str, self.reduction_layers))} rho={self.keep_ratio:g}"

    def stage_keep_ratio(self, layer: int) -> float:
        """rho^s, the fraction of the starting image tokens kept after ``layer`` (stage s)."""
        return self.keep_ratio ** (self.reduction_layers.index(layer) + 1)

    def token_schedule(self, num_image: int, num_protected: int = 1) -> list[int]:
        """Image tokens (protected included) leaving each reduction layer in eval mode."""
        v0 = num_image - num_protected
        return [num_protected + keep_count(v0, self.stage_keep_ratio(i)) for i in self.reduction_layers]


def keep_count(num_start: int, ratio: float) -> int:
    """Tokens kept at a stage: DynamicViT's ``int(init_n * token_ratio[s])``, float rounding included
    (``token_ratio = [rho, rho ** 2, rho ** 3]``, so 100 tokens at 0.7 ** 2 keep 48, not 49)."""
    return int(num_start * ratio)


DynamicViTConfig.register_preset(
    "vilt", "PuMer Sec. 5 ('original DynamicViT configurations'): DynamicViT rho = 0.7 at 3 stages; layers as "
    "csarron/PuMer conf/model/vilt.yaml prune_layers 3,6,9 (pruned after block i)",
    reduction_layers=(3, 6, 9), keep_ratio=0.7)
DynamicViTConfig.register_preset(
    "deit", "DynamicViT main.py (DeiT, 12 blocks): pruning_loc [3, 6, 9] before block i = after the attention of "
    "block i - 1 here", reduction_layers=(2, 5, 8), keep_ratio=0.7)
