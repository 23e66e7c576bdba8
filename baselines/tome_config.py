"""ToMe's config (torch-free, so ``pumer-plug list`` reads it without importing the method)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from pumer_plug.config import MethodConfig
from pumer_plug.errors import UserError


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class TomeConfig(MethodConfig):
    """ToMe's r schedule (``tome.utils.parse_r``) and where it applies.

    Attributes:
        r: tokens merged away per layer: an int (constant r, shaped by ``inflection``) or one
            count per layer (a list or tuple; missing trailing layers get 0, as in ToMe).
        inflection: ToMe's schedule shape in [-1, 1] for an int ``r``: 0 constant, -1 the paper's
            "decreasing schedule" (2r at the first layer down to 0), +1 increasing.
        reduction_layers: None (every layer whose scheduled r is > 0) or the 0-based layers that
            may merge (unique, ascending, below the model's depth; checked at ``apply``).
        proportional_attention: add ``log(size)`` of merged tokens to the attention logits
            (ToMe Sec. 3, on by default as in ToMe's off-the-shelf evaluation).

    Raises:
        ValueError: a field of the wrong type or range; the message names the field.

    Example:
        >>> TomeConfig(r=16)                      # ViT-B/16: 197 -> 181 -> ... -> 21 tokens
        >>> TomeConfig(r=8, inflection=-1.0)      # ToMe's decreasing schedule
        >>> TomeConfig.from_tome((8, -1.0))       # the same, written as ToMe's ``model.r``
    """

    r: int | tuple[int, ...] = 8
    inflection: float = 0.0
    reduction_layers: tuple[int, ...] | None = None
    proportional_attention: bool = True

    LABEL: ClassVar[str] = "ToMe"

    def __post_init__(self) -> None:
        r = self.r
        if isinstance(r, (list, tuple)):
            if not all(_is_count(v) for v in r):
                raise UserError(f"TomeConfig.r must hold token counts (ints >= 0) per layer, got {r!r}")
            object.__setattr__(self, "r", tuple(r))
        elif not _is_count(r):
            raise UserError(f"TomeConfig.r must be an int >= 0 or one int >= 0 per layer, got {r!r}")
        inflection = self.inflection
        if isinstance(inflection, bool) or not isinstance(inflection, (int, float)) or math.isnan(inflection):
            raise UserError(f"TomeConfig.inflection must be a number in [-1, 1], got {inflection!r}")
        if not -1.0 <= inflection <= 1.0:
            raise UserError(f"TomeConfig.inflection must be in [-1, 1], got {inflection!r}")
        if inflection and isinstance(self.r, tuple):
            raise UserError("TomeConfig.inflection shapes a constant int r; it cannot be combined with per-layer r")
        if self.reduction_layers is not None:
            self._layers()
        self._bools("proportional_attention")
        self._warn_if_inert()

    def summary(self) -> str:
        r = ",".join(map(str, self.r)) if isinstance(self.r, tuple) else str(self.r)
        parts = [f"r={r}"]
        if self.inflection:
            parts.append(f"inflection={self.inflection:g}")
        if self.reduction_layers is not None:
            parts.append(f"layers={','.join(map(str, self.reduction_layers)) or 'none'}")
        if not self.proportional_attention:
            parts.append("no-prop-attn")
        return " ".join(parts)

    @property
    def reduces_nothing(self) -> bool:
        return self.reduction_layers == ()

    @classmethod
    def from_tome(cls, r: int | list[int] | tuple[int, float], **overrides: Any) -> "TomeConfig":
        """Builds a config from ToMe's ``model.r`` forms: an int, a per-layer list, or ``(r, inflection)``."""
        if isinstance(r, tuple):
            if len(r) != 2:
                raise UserError(f"TomeConfig.from_tome: a tuple r must be ToMe's (r, inflection), got {r!r}")
            return cls(r=r[0], inflection=r[1], **overrides)
        return cls(r=r, **overrides)

    def schedule(self, num_layers: int) -> tuple[int, ...]:
        """Tokens to merge away at each of ``num_layers`` layers (``tome.utils.parse_r``).

        Layers outside explicit ``reduction_layers`` get 0.

        Raises:
            ValueError: a per-layer ``r`` longer than the model is deep.
        """
        if isinstance(self.r, tuple):
            if len(self.r) > num_layers:
                raise ValueError(
                    f"TomeConfig.r lists {len(self.r)} layers, beyond the model's {num_layers} reducible layers"
                )
            counts = list(self.r) + [0] * (num_layers - len(self.r))
        else:
            low = int(self.r * (1.0 - self.inflection))  # ToMe parse_r: min_val
            high = 2 * self.r - low  # max_val
            step = (high - low) / (num_layers - 1) if num_layers > 1 else 0.0
            counts = [int(low + step * i) for i in range(num_layers)]
        if self.reduction_layers is not None:
            counts = [n if i in self.reduction_layers else 0 for i, n in enumerate(counts)]
        return tuple(counts)

    @property
    def is_identity(self) -> bool:
        return not any(self.r) if isinstance(self.r, tuple) else self.r == 0

    def token_schedule(self, num_tokens: int, num_layers: int, num_protected: int = 1) -> list[int]:
        """Tokens leaving every layer for one row of ``num_tokens`` real tokens (ViT-B/16, r=16: 181, 165, ...)."""
        counts, n = [], num_tokens
        for r in self.schedule(num_layers):
            n -= merge_cap(n, r, num_protected)
            counts.append(n)
        return counts


def merge_cap(num_tokens: int, r: int, num_protected: int) -> int:
    """ToMe's effective r: at most half of the mergeable tokens (``r = min(r, (t - protected) // 2)``)."""
    return max(0, min(r, (num_tokens - num_protected) // 2))
