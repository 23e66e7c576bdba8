"""SmRes's config (torch-free, so ``pumer-plug list`` reads it without importing the method)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from pumer_plug.config import MethodConfig
from pumer_plug.errors import UserError


#: the side-length scale when neither ``scale`` nor ``image_size`` is set (384 -> 288)
DEFAULT_SCALE = 0.75


@dataclass(frozen=True)
class SmResConfig(MethodConfig):
    """The input size of the SmRes baseline: a scale or a fixed image size.

    Attributes:
        scale: side-length factor in (0, 1]; 1.0 is the identity. Used when ``image_size`` is
            None; if both are None it is ``DEFAULT_SCALE`` (0.75, e.g. 384 -> 288).
        image_size: (H, W) fed to the model (an int means square), instead of a scale.
        multiple_of: rounds each target side down to a multiple of this (e.g. the patch size, so
            no pixel row is cut off by the patch embedding); at least one multiple.
        antialias: antialiased bilinear downsampling (as PIL/torchvision resizing).

    Raises:
        ValueError: a field of the wrong type or range, or both ``scale`` and ``image_size``.

    Example:
        >>> SmResConfig(scale=0.5)                       # 384 x 640 -> 192 x 320
        >>> SmResConfig(image_size=(288, 480), multiple_of=32)
    """

    scale: float | None = None
    image_size: tuple[int, int] | None = None
    multiple_of: int = 1
    antialias: bool = True

    LABEL: ClassVar[str] = "SmRes"

    def __post_init__(self) -> None:
        scale, size = self.scale, self.image_size
        if scale is not None and size is not None:
            raise UserError("SmResConfig.scale and SmResConfig.image_size exclude each other; set one")
        if size is None:
            scale = DEFAULT_SCALE if scale is None else scale
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < scale <= 1.0:
                raise UserError(f"SmResConfig.scale must be a number in (0, 1], got {scale!r}")
            object.__setattr__(self, "scale", float(scale))
        else:
            size = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
            try:
                size = tuple(size)
            except TypeError:
                raise UserError(f"SmResConfig.image_size must be (H, W) or an int, got {self.image_size!r}") from None
            if len(size) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size):
                raise UserError(f"SmResConfig.image_size must be two ints > 0 (H, W), got {self.image_size!r}")
            object.__setattr__(self, "image_size", size)
        m = self.multiple_of
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise UserError(f"SmResConfig.multiple_of must be an int >= 1, got {m!r}")
        if not isinstance(self.antialias, bool):
            raise UserError(f"SmResConfig.antialias must be a bool, got {self.antialias!r}")

    @property
    def is_identity(self) -> bool:
        return self.image_size is None and self.scale == 1.0

    def summary(self) -> str:
        size = f"image_size={self.image_size[0]}x{self.image_size[1]}" if self.image_size else f"scale={self.scale:g}"
        return size if self.multiple_of == 1 else f"{size} multiple_of={self.multiple_of}"

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) fed to the model for an input of ``height`` x ``width`` pixels."""
        if self.is_identity:
            return height, width
        if self.image_size is not None:
            h, w = self.image_size
        else:
            h, w = (int(math.floor(n * self.scale + 0.5)) for n in (height, width))
        m = self.multiple_of
        return max(m, h // m * m), max(m, w // m * m)
