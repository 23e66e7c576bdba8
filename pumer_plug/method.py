"""The method side of the plug-in: what to do with the tokens an adapter hands over.

A method never asks which backbone it runs on. At each of its reduction layers the adapter
captures what the method asks for (``needs_keys``, ``needs_text_saliency``) into a
:class:`~pumer_plug.stream.TokenStream` and calls :meth:`ReductionMethod.reduce`, which returns the
plan that the adapter then applies to hidden states and residuals.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn

from pumer_plug.config import MethodConfig
from pumer_plug.errors import UserError
from pumer_plug.state import ForwardState
from pumer_plug.stream import TokenStream

#: what a method can ask of an adapter (``ReductionMethod.requires`` / ``Adapter.capabilities``)
KEYS, TEXT_SALIENCY, HIDDEN, IMAGE_SIZE = "keys", "text_saliency", "hidden", "image_size"
#: how errors name each capability
CAPABILITY_NAMES = {
    KEYS: "attention keys at the reduction layers",
    TEXT_SALIENCY: "text-saliency scores (text-to-image attention)",
    HIDDEN: "the token features at the reduction layers",
    IMAGE_SIZE: "input images of another size (position embeddings resampled to the new patch grid)",
}


class ReductionMethod:
    """Base class of token-reduction methods (PuMer, ToMe, DynamicViT, SmRes).

    Subclasses set ``name``, ``display_name``, ``config_class`` (a :class:`MethodConfig`) and
    ``requires`` and implement :meth:`reduce`. Optional: :meth:`attach` (hooks or modules of its
    own), :meth:`new_forward_state` (per-forward scratch), :meth:`modules`,
    :meth:`training_losses`, :meth:`state_dict`/:meth:`load_state_dict`.

    Per-forward scratch lives in the handle's :class:`~pumer_plug.state.ForwardState`:
    :meth:`on_forward_start` puts a fresh :meth:`new_forward_state` into ``state.method`` and
    :attr:`scratch` reads it back, so a method object holds no per-forward data of its own.
    """

    name: ClassVar[str] = ""
    #: how tables and figures name the method ("PuMer", "ToMe")
    display_name: ClassVar[str] = ""
    config_class: ClassVar[type] = MethodConfig
    #: what the adapter must provide (``KEYS``, ``TEXT_SALIENCY``, ``HIDDEN``, ``IMAGE_SIZE``); checked by ``apply()``
    requires: ClassVar[frozenset[str]] = frozenset()
    #: merges tokens within a segment; heads that read one output per input text token break.
    merges_text: bool = False
    #: where the method can act; an adapter serves the methods that share one of its placements
    #: (see :mod:`pumer_plug.placement`): ``"encoder-layer"`` inside the layers of an encoder
    #: (ViLT, METER, ViT), ``"decoder-layer"`` between the layers of a causal decoder during the
    #: prefill (LLaVA), ``"decoder-input"`` on the projected image tokens before the decoder.
    placements: ClassVar[frozenset[str]] = frozenset({"encoder-layer"})
    #: decoders: the query rows of the saliency score, ``"text"`` (every text token after the
    #: image, PuMer Eq. 1) or ``"last"`` (the last prompt token, FastV)
    saliency_queries: ClassVar[str] = "text"

    def __init__(self, config: Any) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"method {self.name!r} takes a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self._state = ForwardState(method=self.new_forward_state())  # until a forward starts

    @property
    def needs_keys(self) -> bool:
        """The adapter must capture attention keys at the reduction layers."""
        return KEYS in self.requires

    @property
    def needs_text_saliency(self) -> bool:
        """The adapter must capture text-to-image attention at the reduction layers."""
        return TEXT_SALIENCY in self.requires

    def reduction_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers (0-based, below ``num_layers``) that reduce tokens.

        Raises:
            UserError: a configured layer is beyond the model's reducible depth.
        """
        layers = tuple(self.config.reduction_layers)
        bad = [i for i in layers if i >= num_layers]
        if bad:
            raise UserError(
                f"{type(self.config).__name__}.reduction_layers {list(layers)} has layer(s) {bad} beyond "
                f"the model's {num_layers} reducible layers (allowed: 0..{num_layers - 1})"
            )
        return layers

    def check_image_tokens(self, num_image: int) -> None:
        """Raises ValueError when the method's budget does not fit ``num_image`` image tokens per
        sample (called by adapters at the start of a forward; default: accepts)."""

    def proportional_attention(self) -> bool:
        """Whether later attention may need ``log(size)`` of the tokens (adapters add it only
        where some size differs from 1, i.e. ``stream.size`` is set). Default: False."""
        return False

    @classmethod
    def suggest_config(cls, trial: Any, num_layers: int, placement: str = "encoder-layer") -> Any:
        """A config drawn for one search trial of ``pumer-plug tune``: the method's knobs through the
        ``suggest_*`` calls of an Optuna ``trial``, for a backbone of ``num_layers`` reducible layers
        where the method acts at ``placement`` (one of its ``placements``, the backbone's choice:
        :func:`~pumer_plug.placement.placement`), so a space can leave out what a backbone refuses.

        Raises:
            NotImplementedError: the method defines no search space (the default).
        """
        raise NotImplementedError(f"method {cls.name!r} defines no search space (ReductionMethod.suggest_config)")

    def reduce(self, layer: int, stream: TokenStream):
        """Reduces ``stream`` at ``layer`` and returns the plan over the whole stream."""
        raise NotImplementedError

    def modules(self) -> nn.Module | None:
        """Learned parameters the method owns (DynamicViT's predictors); None for parameter-free ones.

        Built by ``attach()``, so they exist (and can go to an optimizer) right after ``apply()``.
        """
        return None

    def training_losses(self) -> dict[str, torch.Tensor]:
        """The method's own loss terms from the last training forward, already weighted by its
        config (DynamicViT: ``{"keep_ratio": ...}``); empty for methods without any."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's learned state, for saving beside a finetuned backbone (empty if none)."""
        modules = self.modules()
        return {} if modules is None else dict(modules.state_dict())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Loads what :meth:`state_dict` returned.

        Raises:
            ValueError: ``state`` is not empty and the method has no learned state, or keys differ.
        """
        modules = self.modules()
        if modules is None:
            if state:
                raise ValueError(f"method {self.name!r} has no learned state; got {len(state)} tensors")
            return
        missing, unexpected = modules.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"method {self.name!r} state: missing keys {list(missing)}, unexpected keys {list(unexpected)}")

    def attach(self, handle) -> None:
        """Called by ``apply()`` after the adapter attached; a method that acts outside the
        reduction layers (e.g. SmRes resizing the input) registers its hooks here through
        ``handle.add_forward_pre_hook`` so that ``remove()`` takes them out. Default: nothing."""

    def new_forward_state(self) -> Any:
        """A fresh per-forward scratch object (a small dataclass), or None if the method needs none."""
        return None

    def on_forward_start(self, state: ForwardState) -> None:
        """Called by the handle once per model forward before any layer runs: puts a fresh
        :meth:`new_forward_state` into ``state.method`` and binds the state for :attr:`scratch`."""
        state.method = self.new_forward_state()
        self._state = state

    @property
    def scratch(self) -> Any:
        """This method's part of the current forward's state (``state.method``)."""
        return self._state.method

    @property
    def training(self) -> bool:
        """Whether the current forward runs in train mode (the plugged model's flag at its start)."""
        return self._state.training


def suggest_layers(trial: Any, num_layers: int) -> tuple[int, ...]:
    """Reduction layers for a search trial: ``count`` layers from ``first_layer`` every ``layer_stride`` layers."""
    first = trial.suggest_int("first_layer", 0, num_layers - 1)
    count = trial.suggest_int("num_reduction_layers", 1, num_layers)
    stride = trial.suggest_int("layer_stride", 1, 2)
    return tuple(range(first, num_layers, stride))[:count]
