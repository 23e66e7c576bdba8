"""Pool's config and presets (torch-free, so ``pumer-plug list`` reads them without importing the method)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pumer_plug.config import MethodConfig
from pumer_plug.errors import UserError


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
