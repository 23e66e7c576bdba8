"""The configs of the keep-top-k decoder methods, FastV and Random, with their presets (torch-free,
so ``pumer-plug list`` reads them without importing the methods)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pumer_plug.config import MethodConfig
from pumer_plug.errors import UserError
from pumer_plug.ops.counts import prune_count


#: the budgets decoder-VLM papers report, image tokens kept of LLaVA-1.5's 576
KEEP_BUDGETS = (192, 128, 64)


@dataclass(frozen=True)
class KeepConfig(MethodConfig):
    """Where a keep-top-k method prunes image tokens and how many it keeps.

    Attributes:
        layer: K, the first decoder layer that runs on the kept tokens (>= 1); the scores come
            from layer K - 1.
        prune_ratio: R, the fraction of a sample's image tokens pruned, in [0, 1).
        keep_tokens: image tokens kept per sample; overrides ``prune_ratio`` when set (>= 1).

    Raises:
        UserError: a field of the wrong type or range; the message names the field.
    """

    layer: int = 2
    prune_ratio: float = 0.5
    keep_tokens: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.register_preset("default", "FastV Sec. 4: K = 2, R = 50%")
        for n in KEEP_BUDGETS:
            cls.register_preset(f"keep{n}", f"keep {n} of LLaVA-1.5's 576 image tokens", keep_tokens=n)

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise UserError(f"{name}.layer must be an int >= 1 (K, the first layer on the kept tokens), got {self.layer!r}")
        self._ratios("prune_ratio")
        k = self.keep_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise UserError(f"{name}.keep_tokens must be None or an int >= 1, got {k!r}")

    @property
    def is_identity(self) -> bool:
        return self.keep_tokens is None and self.prune_ratio == 0

    def summary(self) -> str:
        budget = f"keep={self.keep_tokens}" if self.keep_tokens is not None else f"R={self.prune_ratio:g}"
        return f"K={self.layer} {budget}"

    def num_pruned(self, num_image: int) -> int:
        """Image tokens pruned from a sample with ``num_image`` of them."""
        if self.keep_tokens is not None:
            return num_image - self.keep_tokens
        return prune_count(num_image, self.prune_ratio, 0)


@dataclass(frozen=True)
class FastVConfig(KeepConfig):
    """FastV: K = 2, R = 50% by default (FastV Sec. 4). See :class:`KeepConfig`."""

    LABEL: ClassVar[str] = "FastV"


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
