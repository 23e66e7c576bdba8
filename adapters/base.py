"""The adapter side of the plug-in: where things are in a backbone.

An adapter resolves, at ``apply()`` time, the modules a method needs (layers, attention
probabilities, keys, residual points, masks) and fails there with the module path and what was
expected. At forward time its hooks fill a :class:`~pumer_plug.stream.TokenStream`, call the
method at each reduction layer and apply the returned plan to hidden states, residuals and masks.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from pumer_plug.errors import UserError
from pumer_plug.method import HIDDEN, KEYS, TEXT_SALIENCY, ReductionMethod
from pumer_plug.ops.counts import RowCounts
from pumer_plug.ops.reduce import attention_bias
from pumer_plug.ops.saliency import text_saliency_from_qk
from pumer_plug.stream import TEXT, TokenStream


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


def real_lengths(mask: torch.Tensor, bounds: list[tuple[int, int]]) -> list[RowCounts]:
    """Real tokens per row of each segment, with one device-to-host sync for all of them (the
    forward's only one); the counts keep their device copy (``RowCounts.tensor``).

    Raises:
        ValueError: a segment's real tokens are not all before its padding (e.g. left padding).

    Shapes:
        mask (B, N) bool, bounds [(start, stop), ...] -> one tuple of B ints per segment
    """
    parts = [mask[:, a:b] for a, b in bounds]
    sums = torch.stack([p.sum(dim=1) for p in parts])  # (S, B)
    holes = torch.stack([(p[:, 1:] & ~p[:, :-1]).any() if p.shape[1] > 1 else p.new_zeros(()) for p in parts])
    host = torch.cat([sums.flatten(), holes]).tolist()  # one transfer for counts and checks
    if any(host[sums.numel():]):
        raise ValueError("padding must come after the real tokens of each segment (right padding); got a mask with holes")
    B = mask.shape[0]
    return [RowCounts(host[i * B : (i + 1) * B], sums[i].to(torch.int64)) for i in range(len(parts))]


def same_lengths(num_tokens: int, batch: int, device: torch.device) -> RowCounts:
    """``num_tokens`` for every row of an unpadded batch (filled on the device, no copy)."""
    return RowCounts((num_tokens,) * batch, torch.full((batch,), num_tokens, dtype=torch.int64, device=device))


@dataclass(frozen=True)
class TokenLayout:
    """Where the image patches (and the text) of one example sit in the streams at the start of a forward.

    Attributes:
        image_stream: the stream holding the patches (a key of ``handle.streams``).
        image_start: index of the first patch token in that stream.
        grid: (rows, cols) of the patch grid; the patches follow in raster order.
        text_stream: the stream holding the text, or None (image-only backbones).
        text_start: index of the first text token in ``text_stream``.
        num_text: padded text length.
        image_input: the keyword argument of the model's forward that holds the image.
        image_prefix: tokens of the image segment before the first patch (an image CLS, kept at
            every layer, whose slot opens the segment); 0 when the stream's plans are over the
            patches alone (their slots start at 0).
    """

    image_stream: str
    image_start: int
    grid: tuple[int, int]
    text_stream: str | None = None
    text_start: int = 0
    num_text: int = 0
    image_input: str = "pixel_values"
    image_prefix: int = 1


class Adapter:
    """Base class of backbone adapters.

    Subclasses set ``name`` and ``capabilities``, implement :meth:`matches`, ``__init__`` (which
    resolves every module it needs and sets ``model``, ``num_layers`` and ``hidden_size``) and
    :meth:`attach`. Optional: :meth:`check_method` (model-specific refusals), :meth:`new_forward_state`
    (per-forward scratch beyond streams), :meth:`accept_image_size` and ``image_module`` (for
    methods that resize the input).
    """

    name: ClassVar[str] = ""
    #: what this adapter can hand a method (see ``pumer_plug.method``); ``apply()`` refuses a
    #: method whose ``requires`` is not a subset, naming both
    capabilities: ClassVar[frozenset[str]] = frozenset({KEYS, TEXT_SALIENCY, HIDDEN})
    model: nn.Module
    #: number of layers that can hold a reducer (indices ``0 .. num_layers - 1``)
    num_layers: int = 0
    #: where this backbone can reduce tokens (``ReductionMethod.placements``; see :mod:`pumer_plug.placement`)
    placements: ClassVar[frozenset[str]] = frozenset({"encoder-layer"})
    #: width C of the tokens handed to a method at a reduction layer (``stream.hidden`` (B, N, C))
    hidden_size: int = 0

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def check_method(self, method: ReductionMethod) -> None:
        """Raises ValueError when ``method`` cannot run correctly on this model (default: accepts)."""

    def attach(self, handle: Any) -> None:
        raise NotImplementedError

    def new_forward_state(self) -> Any:
        """A fresh per-forward scratch object for ``handle.state.adapter`` (default: None)."""
        return None

    @property
    def image_module(self) -> nn.Module:
        """The module whose ``forward`` takes the images (default: the plugged model)."""
        return self.model

    def accept_image_size(self, handle: Any) -> None:
        """Makes the backbone take images of another size while plugged (``image_size`` capability).

        Raises:
            NotImplementedError: the adapter does not declare the capability.
        """
        raise NotImplementedError(f"{self.name} adapter cannot take other image sizes")


    def token_layout(self, inputs: Mapping[str, Any]) -> TokenLayout | None:
        """Where the patch grid and the text of the model inputs ``inputs`` (the forward's keyword
        arguments) sit in the streams (``pumer-plug show``); None: the backbone has no image grid
        this adapter can place (the default)."""
        return None

# -- hook factories shared by the adapters -------------------------------------------------------
def keys_catcher(handle: Any, stream: str, num_heads: int | None = None) -> Callable:
    """Forward hook on a key projection storing the keys of ``stream``, averaged over heads
    (ToMe's and the released PuMer code's ``k.mean(1)``).

    Shapes:
        out (B, N, C) heads concatenated, with ``num_heads``, or (B, H, N, D) with ``num_heads=None``
        -> stored (B, N, C / H)
    """
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if num_heads is None:
            handle.streams[stream].keys = out.mean(dim=1)  # (B, H, N, D) -> (B, N, D)
        else:
            handle.streams[stream].set_keys(out, num_heads)

    return hook


def saliency_catcher(handle: Any, probs_of: Callable[[Any], torch.Tensor | None], where: str,
                     text: str = "text", image: str = "image", output: bool = False) -> Callable:
    """Hook storing PuMer Eq. (1) per-head scores from the attention probabilities of text queries
    over image keys: a pre-hook reading ``probs_of(args)``, or a forward hook (``output=True``)
    reading ``probs_of(out)``. With ``text == image`` the stream is one ``[text | image]`` sequence
    (ViLT) and the text-to-image block is sliced out of the full (B, H, N, N) probabilities.

    Shapes:
        probs (B, H, T, V) (two streams) or (B, H, N, N) (one stream) -> stream ``image``'s saliency (B, H, V)

    Raises:
        RuntimeError: the module returned no probabilities (a fused attention kernel).
    """
    def store(captured: Any) -> None:
        probs = probs_of(captured)
        if probs is None:
            raise RuntimeError(f"{handle.adapter.name} adapter: {where} returned no attention probabilities; "
                               "the text-saliency score needs eager attention")
        streams = handle.streams
        if text != image:
            streams[image].set_text_saliency(probs, streams[text].mask)
            return
        stream = streams[text]
        if stream.segments[0].modality != TEXT or len(stream.segments) < 2:
            return  # the stream no longer has a text segment first (a method merged across modalities)
        T = stream.segments[0].length
        stream.set_text_saliency(probs[:, :, :T, T:], stream.mask[:, :T])  # (B, H, T, V)

    if output:
        return lambda module, args, out: store(out)
    return lambda module, args: store(args)


def qk_saliency_catcher(handle: Any, layer: int, num_heads: int, bias_of: Callable[[tuple], torch.Tensor | None],
                        text: str = "text", image: str = "image") -> tuple[Callable, Callable, Callable]:
    """Hooks computing PuMer Eq. (1) per head from queries and keys, for attention that runs fused
    (SDPA) and returns no probabilities (:func:`~pumer_plug.ops.saliency.text_saliency_from_qk`).

    Returns three hooks: forward hooks for the query and the key projection (they keep their
    outputs in ``handle.state.layer(layer)``), and a forward hook for the attention module itself,
    which reads the additive key bias the module was called with (``bias_of(args)``, so the rows
    are normalised over the same keys with the same mask and ``log(size)`` as the model's) and
    stores the scores in stream ``image``. With ``text == image`` the stream is one
    ``[text | image]`` sequence: the text rows of the queries and the image columns are sliced out.

    Shapes:
        query out (B, Tq, C), key out (B, Nk, C), bias (B, 1, 1, Nk) -> stream ``image``'s saliency (B, H, V)
    """
    def catcher(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            handle.state.layer(layer)[name] = out

        return hook

    def compute(module: nn.Module, args: tuple, out: Any) -> None:
        scratch = handle.state.layer(layer)
        q, k = scratch.pop("saliency_q", None), scratch.pop("saliency_k", None)
        if q is None or k is None:
            raise RuntimeError(f"{handle.adapter.name} adapter: layer {layer}'s query/key projections did not run "
                               "inside its attention module")
        streams = handle.streams
        if text != image:
            streams[image].saliency = text_saliency_from_qk(q, k, streams[text].mask, num_heads, slice(None), bias_of(args))
            return
        stream = streams[text]
        if stream.segments[0].modality != TEXT or len(stream.segments) < 2:
            return  # the stream no longer has a text segment first (a method merged across modalities)
        T = stream.segments[0].length
        stream.saliency = text_saliency_from_qk(q[:, :T], k, stream.mask[:, :T], num_heads, slice(T, None), bias_of(args))

    return catcher("saliency_q"), catcher("saliency_k"), compute


def stream_bias(handle: Any, stream: TokenStream, dtype: torch.dtype, masked_value: float | None = None) -> torch.Tensor:
    """The stream's additive key bias (B, 1, 1, N), cached on the stream until its next reduction:
    padding masked out (``masked_value``, default the dtype's minimum), plus ``log(size)`` when
    the method uses proportional attention and some token size differs from 1."""
    cached = stream.bias_cache
    if cached is None or cached.dtype != dtype:
        proportional = handle.method.proportional_attention()
        stream.bias_cache = attention_bias(stream.mask, stream.size, dtype, proportional, masked_value)
    return stream.bias_cache


def residual_rewriter(handle: Any, layer: int, where: str) -> Callable:
    """Pre-hook on an FFN output module ``output(hidden_states, input_tensor)``: replaces the
    residual ``input_tensor`` by the reduced one the layer's reducer left in
    ``handle.state.layer(layer)["residual"]`` as ``(before, after)``.

    Raises:
        RuntimeError: the residual is not the tensor the reducer reduced (the host layer's
            forward differs from the one the adapter supports).
    """
    def hook(module: nn.Module, args: tuple):
        residual = handle.state.layer(layer).pop("residual", None)
        if residual is None:
            return None
        before, after = residual
        if args[1] is not before:
            raise RuntimeError(f"{handle.adapter.name} adapter: {where}'s residual is not the reduced hidden state; "
                               f"this {type(module).__name__} is not the one the adapter supports")
        return (args[0], after)

    return hook


def request_pos_interpolation(handle: Any, model: nn.Module) -> None:
    """Sets ``interpolate_pos_encoding=True`` on every module whose ``forward`` takes it
    (the transformers convention for vision models fed another image size)."""
    for module in model.modules():
        try:
            signature = inspect.signature(type(module).forward)
        except (TypeError, ValueError):
            continue
        if "interpolate_pos_encoding" not in signature.parameters:
            continue

        def hook(module: nn.Module, args: tuple, kwargs: dict, signature=signature):
            bound = signature.bind_partial(module, *args, **kwargs)
            bound.arguments["interpolate_pos_encoding"] = True
            return bound.args[1:], bound.kwargs

        handle.add_forward_pre_hook(module, hook, with_kwargs=True)
