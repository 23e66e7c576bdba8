"""The adapter side of the plug-in: where things are in a backbone.

An adapter resolves, at ``apply()`` time, the modules a method needs (layers, attention
probabilities, keys, residual points, masks) and fails there with the module path and what was
expected. At forward time its hooks fill a :class:`~pumer_plug.stream.TokenStream`, call the
method at each reduction layer and apply the returned plan to hidden states, residuals and masks.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from pumer_plug.errors import UserError
from pumer_plug.method import ReductionMethod


class AdapterError(UserError):
    """A model does not have the structure an adapter expects (raised at ``apply()`` time)."""


def get_submodule(root: nn.Module, path: str, expected: type | tuple[type, ...], owner: str) -> nn.Module:
    """Returns ``root.get_submodule(path)``.

    Raises:
        AdapterError: naming the path and the expected type when it is missing or of another type.
    """
    try:
        module = root.get_submodule(path)
    except AttributeError:
        module = None
    if not isinstance(module, expected):
        names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
        found = "nothing" if module is None else type(module).__name__
        raise AdapterError(f"{owner} adapter: expected {names} at '{path}', found {found}")
    return module


def real_lengths(mask: torch.Tensor, bounds: list[tuple[int, int]]) -> list[tuple[int, ...]]:
    """Real tokens per row of each segment, with one host-device sync for all of them.

    Raises:
        ValueError: a segment's real tokens are not all before its padding (e.g. left padding).

    Shapes:
        mask (B, N) bool, bounds [(start, stop), ...] -> one tuple of B ints per segment
    """
    parts = [mask[:, a:b] for a, b in bounds]
    sums = torch.stack([p.sum(dim=1) for p in parts])  # (S, B)
    holes = torch.stack([(p[:, 1:] & ~p[:, :-1]).any() if p.shape[1] > 1 else p.new_zeros(()) for p in parts])
    sums, holes = sums.tolist(), holes.tolist()
    if any(holes):
        raise ValueError("padding must come after the real tokens of each segment (right padding); got a mask with holes")
    return [tuple(int(n) for n in row) for row in sums]


@dataclass(frozen=True)
class TokenLayout:
    """Where the image patches (and the text) of one example sit in the streams at the start of a forward.

    Attributes:
        image_stream: the stream holding the patches (a key of ``handle.streams``).
        image_start: index of the first patch token in that stream; the token before it is the image
            CLS (or the last prefix token), first in the image segment.
        grid: (rows, cols) of the patch grid; the patches follow in raster order.
        text_stream: the stream holding the text, or None (image-only backbones).
        text_start: index of the first text token in ``text_stream``.
        num_text: padded text length.
        image_input: the keyword argument of the model's forward that holds the image.
    """

    image_stream: str
    image_start: int
    grid: tuple[int, int]
    text_stream: str | None = None
    text_start: int = 0
    num_text: int = 0
    image_input: str = "pixel_values"


class Adapter:
    """Base class: subclasses set ``name``, implement ``matches``, ``__init__`` and ``attach``."""

    name: ClassVar[str] = ""
    #: number of layers that can hold a reducer (indices ``0 .. num_layers - 1``)
    num_layers: int = 0

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def check_method(self, method: ReductionMethod) -> None:
        """Raises ValueError when ``method`` cannot run correctly on this model (default: accepts)."""

    def attach(self, handle: Any) -> None:
        raise NotImplementedError

    def token_layout(self, inputs: Mapping[str, Any]) -> TokenLayout | None:
        """Where the patch grid and the text of the model inputs ``inputs`` (the forward's keyword
        arguments) sit in the streams (``pumer-plug show``); None: the backbone has no image grid
        this adapter can place (the default)."""
        return None
