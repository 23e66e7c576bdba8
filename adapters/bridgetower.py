"""BridgeTower (transformers ``BridgeTowerModel`` and its ITM, MLM and contrastive heads).

BridgeTower is two-stream: unimodal text (RoBERTa) and image (CLIP ViT) encoders feed a stack of
cross-modal layer pairs ``cross_modal_text_layers[i]`` / ``cross_modal_image_layers[i]``
(``BridgeTowerBertCrossLayer``: self-attention, cross-attention to the other stream, MLP). Before
every pair ``i >= 1`` the link towers (``cross_modal_{text,image}_link_tower``) add the projected
output of a *full-length* unimodal layer to the cross stream. The adapter keeps one
:class:`~pumer_plug.stream.TokenStream` per stream, ``handle.streams["text"]`` (one TEXT segment,
text CLS protected) and ``handle.streams["image"]`` (one IMAGE segment, image CLS protected).

Hook points in cross pair ``i`` (transformers 5, eager attention only):

- pair start: a pre-hook on the text layer records the masks both layers of the pair see (both
  attend to the *other stream's pair input*, so the image layer must see the text mask from
  before the text layer reduced) and, after the first reduction layer, rewrites the self- and
  cross-attention masks of both layers (``pumer_plug.ops.reduce.attention_bias``); the same
  pre-hooks check that every stream and its mask have matching lengths;
- keys: output of ``attention.self.key`` of each layer (B, N, C);
- text-saliency (PuMer Eq. 1): the probabilities (B, H, T, V) that the text layer's
  ``crossattention.self`` returns (text queries over image keys), averaged over real text tokens
  into the image stream;
- reduction point (PuMer: after attention, before the MLP): input of ``intermediate``, i.e. after
  self- and cross-attention; the plan is also applied to the MLP residual (``output``'s
  ``input_tensor``). The text layer reduces the text stream, then the image layer reduces the
  image stream (pruned by the text layer's saliency, then merged);
- link towers: their full-length unimodal input is reduced with the composition of every plan
  applied to that stream so far (``plan_a.then(plan_b)``); a merged slot gets the mean of the
  unimodal tokens merged into it, matching the size-weighted mean in the cross stream.

FLOPs consequence: only the cross-modal pairs shrink. The unimodal encoders, and the per-layer
``ln_post`` + ``cross_modal_*_transform`` projections that feed the link towers, still run on
every token, because the model computes them before any hook can see the link tower's input.
With the default config (12 + 12 unimodal layers, 6 cross pairs) the unimodal encoders hold most
of the FLOPs, so the FLOPs ratio is far smaller than on ViLT or METER.

``BridgeTowerForMaskedLM`` reads one output per text token: text merging is refused, and the text
stream is never reduced (not even the padding compaction that a zero text merge ratio allows).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from transformers import BridgeTowerForMaskedLM, BridgeTowerModel
from transformers.models.bridgetower.modeling_bridgetower import (
    BridgeTowerBertCrossLayer,
    BridgeTowerCrossAttention,
    BridgeTowerIntermediate,
    BridgeTowerLinkTower,
    BridgeTowerOutput,
)

from pumer_plug.adapters.base import Adapter, AdapterError, get_submodule, real_lengths
from pumer_plug.ops.plan import ReductionPlan
from pumer_plug.ops.reduce import attention_bias
from pumer_plug.registry import ADAPTERS
from pumer_plug.stream import IMAGE, TEXT, Segment, TokenStream

STREAMS = ("text", "image")


def find_bridgetower(model: nn.Module) -> BridgeTowerModel | None:
    if isinstance(model, BridgeTowerModel):
        return model
    inner = getattr(model, "bridgetower", None)
    return inner if isinstance(inner, BridgeTowerModel) else None


@dataclass
class PairState:
    """Per-forward bookkeeping besides the streams, reset where the model's forward begins.

    Attributes:
        plans: per stream, the composition of every plan applied so far, from the unimodal tokens.
        pair: the cross pair whose text layer ran last (-1 before the first pair).
        text_mask: (B, T) text mask at the pair's input (the text layer may reduce mid-pair).
        biases: per stream, the additive mask (B, 1, 1, N) at the pair's input, or None.
    """

    plans: dict[str, ReductionPlan] = field(default_factory=dict)
    pair: int = -1
    text_mask: torch.Tensor | None = None
    biases: dict[str, torch.Tensor] | None = None


@ADAPTERS.register("bridgetower")
class BridgeTowerAdapter(Adapter):
    """Attaches a reduction method to a transformers BridgeTower model (reduction layers = cross pairs).

    Raises:
        AdapterError: the model is not a BridgeTower model, a module is missing, or its attention
            is not eager (the text-saliency scores need the attention probabilities).
        ValueError: a text-merging method meets ``BridgeTowerForMaskedLM``.
    """

    name = "bridgetower"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return find_bridgetower(model) is not None

    def __init__(self, model: nn.Module) -> None:
        bt = find_bridgetower(model)
        if bt is None:
            raise AdapterError(
                f"bridgetower adapter: expected a BridgeTowerModel or a model with a '.bridgetower' BridgeTowerModel, "
                f"got {type(model).__name__}"
            )
        self.model, self.bt = model, bt
        self.num_layers = len(bt.cross_modal_text_layers)
        self.layers: dict[str, list[nn.Module]] = {}
        for name in STREAMS:
            self.layers[name] = [get_submodule(bt, f"cross_modal_{name}_layers.{i}", BridgeTowerBertCrossLayer, self.name)
                                 for i in range(self.num_layers)]
            for i in range(self.num_layers):
                for path, kind in (("attention.self.key", nn.Linear), ("crossattention.self", BridgeTowerCrossAttention),
                                   ("intermediate", BridgeTowerIntermediate), ("output", BridgeTowerOutput)):
                    get_submodule(bt, f"cross_modal_{name}_layers.{i}.{path}", kind, self.name)
                if self.layers[name][i].chunk_size_feed_forward:
                    raise AdapterError(f"bridgetower adapter: cross_modal_{name}_layers.{i} chunks its feed-forward; "
                                       "set chunk_size_feed_forward=0")
        self.link_towers = {name: self._link_towers(bt, name) for name in STREAMS}
        attn = getattr(bt.config, "_attn_implementation", None)
        if attn not in (None, "eager"):
            raise AdapterError(f"bridgetower adapter: attention implementation {attn!r} returns no attention "
                               "probabilities; load the model with attn_implementation='eager'")
        self.token_level_head = isinstance(model, BridgeTowerForMaskedLM)
        self.state = PairState()

    def _link_towers(self, bt: BridgeTowerModel, name: str) -> list[nn.Module]:
        path = f"cross_modal_{name}_link_tower"
        towers = getattr(bt, path, None)
        if isinstance(towers, nn.ModuleList):
            return [get_submodule(bt, f"{path}.{j}", BridgeTowerLinkTower, self.name) for j in range(len(towers))]
        return [get_submodule(bt, path, BridgeTowerLinkTower, self.name)]  # shared across pairs

    def check_method(self, method: Any) -> None:
        if self.token_level_head and method.merges_text:
            raise ValueError(
                f"bridgetower adapter: {type(self.model).__name__} reads one output per input text token, "
                "so text tokens cannot be merged; set the text merge ratio to 0"
            )

    def attach(self, handle: Any) -> None:
        method = handle.method
        handle.add_forward_pre_hook(self.bt, self._start(handle), with_kwargs=True)
        first = min(handle.reduction_layers, default=self.num_layers)
        for i in range(self.num_layers):
            text_layer, image_layer = self.layers["text"][i], self.layers["image"][i]
            handle.add_forward_pre_hook(text_layer, self._pair_start(handle, i, rewrite=i > first), with_kwargs=True)
            handle.add_forward_pre_hook(image_layer, self._pair_image(handle, i, rewrite=i > first), with_kwargs=True)
            if i not in handle.reduction_layers:
                continue
            if method.needs_text_saliency:
                handle.add_forward_hook(text_layer.crossattention.self, self._saliency_catcher(handle, i))
            for name, layer in (("text", text_layer), ("image", image_layer)):
                if method.needs_keys:
                    handle.add_forward_hook(layer.attention.self.key, _keys_catcher(handle, name))
                cache: dict[str, torch.Tensor] = {}
                handle.add_forward_pre_hook(layer.intermediate, self._reducer(handle, name, i, cache))
                handle.add_forward_pre_hook(layer.output, _residual_rewriter(cache, name, i))
        for name in STREAMS:
            for tower in self.link_towers[name]:
                handle.add_forward_pre_hook(tower, self._link_reducer(name))

    # -- hooks ---------------------------------------------------------------------------------
    def _start(self, handle: Any):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            # BridgeTowerModel.forward(input_ids, attention_mask, ...)
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            if input_ids is None:
                raise ValueError("bridgetower adapter: the model needs input_ids")
            B, T = input_ids.shape
            mask = torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if mask is None else mask.bool()
            try:
                lengths = real_lengths(mask, [(0, T)])
            except ValueError as err:
                raise ValueError(f"bridgetower adapter: {err}") from None
            protected = torch.zeros_like(mask)
            protected[:, 0] = True  # text CLS
            handle.start_forward()
            handle.streams["text"] = TokenStream(mask, protected, [Segment(TEXT, T, 1)], lengths)
            self.state = PairState(plans={"text": ReductionPlan.identity(T)})

        return hook

    def _pair_start(self, handle: Any, i: int, rewrite: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            # BridgeTowerBertCrossLayer.forward(hidden_states, encoder_hidden_states, attention_mask, ...)
            state, text_x, image_x = self.state, args[0], args[1]  # (B, T, C), (B, V, C)
            if i == 0:
                B, V = image_x.shape[:2]
                mask = torch.ones(B, V, dtype=torch.bool, device=image_x.device)  # the image stream is never padded
                protected = torch.zeros_like(mask)
                protected[:, 0] = True  # image CLS
                handle.streams["image"] = TokenStream(mask, protected, [Segment(IMAGE, V, 1)], [(V,) * B])
                state.plans["image"] = ReductionPlan.identity(V)
            streams = handle.streams
            _check_length(streams["text"], text_x, f"cross_modal_text_layers.{i} input")
            _check_length(streams["image"], image_x, f"cross_modal_text_layers.{i} encoder input")
            state.pair, state.text_mask, state.biases = i, streams["text"].mask, None
            if not rewrite:
                return None
            state.biases = {name: _bias(streams[name], text_x.dtype, handle) for name in STREAMS}
            return _with_masks(args, kwargs, state.biases["text"], state.biases["image"])

        return hook

    def _pair_image(self, handle: Any, i: int, rewrite: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            state = self.state
            if state.pair != i:
                raise RuntimeError(f"bridgetower adapter: cross_modal_image_layers.{i} ran before cross_modal_text_layers.{i}; "
                                   "the installed transformers BridgeTowerModel differs from the one this adapter supports")
            _check_length(handle.streams["image"], args[0], f"cross_modal_image_layers.{i} input")
            if args[1].shape[1] != state.text_mask.shape[1]:
                raise RuntimeError(f"bridgetower adapter: cross_modal_image_layers.{i} attends to {args[1].shape[1]} text "
                                   f"tokens, but the pair's text input has {state.text_mask.shape[1]}")
            if not rewrite:
                return None
            return _with_masks(args, kwargs, state.biases["image"], state.biases["text"])

        return hook

    def _saliency_catcher(self, handle: Any, i: int):
        def hook(module: nn.Module, args: tuple, out: tuple) -> None:
            probs = out[1]  # (B, H, T, V), text queries over image keys
            if probs is None:
                raise RuntimeError(f"bridgetower adapter: cross_modal_text_layers.{i}.crossattention returned no attention "
                                   "probabilities; the text-saliency score needs eager attention")
            handle.streams["image"].set_text_saliency(probs, self.state.text_mask)  # PuMer Eq. (1) -> (B, V)

        return hook

    def _reducer(self, handle: Any, name: str, layer: int, cache: dict):
        keep_text = name == "text" and self.token_level_head

        def hook(module: nn.Module, args: tuple):
            stream = handle.streams[name]
            cache.clear()
            if keep_text:
                handle.record_counts(layer, name, stream)
                return None
            hidden = args[0]  # (B, N, C), after self- and cross-attention
            size = stream.sizes()
            plan = handle.method.reduce(layer, stream)
            handle.record_counts(layer, name, stream)
            self.state.plans[name] = self.state.plans[name].then(plan)
            if plan.is_identity:
                return None
            reduced = plan.apply(hidden, size)  # (B, N', C)
            cache["input"], cache["output"] = hidden, reduced
            return (reduced,)

        return hook

    def _link_reducer(self, name: str):
        def hook(module: nn.Module, args: tuple):
            # BridgeTowerLinkTower.forward(hidden_states (B, N0, C) unimodal, cross_modal_hidden_states (B, N, C), mask)
            unimodal, cross = args[0], args[1]
            reduced = self.state.plans[name].apply(unimodal)  # (B, N0, C) -> (B, N, C)
            if reduced.shape[1] != cross.shape[1]:
                raise RuntimeError(f"bridgetower adapter: the {name} link tower got {reduced.shape[1]} unimodal tokens "
                                   f"after reduction for {cross.shape[1]} cross-modal tokens")
            return None if reduced is unimodal else (reduced, *args[1:])

        return hook


def _keys_catcher(handle: Any, name: str):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        handle.streams[name].keys = out  # (B, N, C)

    return hook


def _residual_rewriter(cache: dict, name: str, layer: int):
    def hook(module: nn.Module, args: tuple):
        if not cache:
            return None
        if args[1] is not cache["input"]:
            raise RuntimeError(f"bridgetower adapter: cross_modal_{name}_layers.{layer}.output's residual is not the reduced "
                               "hidden state; the installed transformers BridgeTowerBertCrossLayer differs from the supported one")
        reduced = cache["output"]
        cache.clear()
        return (args[0], reduced)

    return hook


def _bias(stream: TokenStream, dtype: torch.dtype, handle: Any) -> torch.Tensor:
    if stream.bias_cache is None or stream.bias_cache.dtype != dtype:
        stream.bias_cache = attention_bias(stream.mask, stream.size, dtype, handle.method.proportional_attention())
    return stream.bias_cache  # (B, 1, 1, N)


def _with_masks(args: tuple, kwargs: dict, self_bias: torch.Tensor, cross_bias: torch.Tensor) -> tuple[tuple, dict]:
    """Cross-layer arguments with the self-attention and cross-attention masks replaced."""
    # BridgeTowerBertCrossLayer.forward(hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask, cache)
    positional = dict(zip(("attention_mask", "encoder_attention_mask", "cache"), args[2:]))
    return args[:2], {**kwargs, **positional, "attention_mask": self_bias, "encoder_attention_mask": cross_bias}


def _check_length(stream: TokenStream, x: torch.Tensor, where: str) -> None:
    if x.shape[1] != stream.num_tokens:
        raise RuntimeError(f"bridgetower adapter: {where} has {x.shape[1]} tokens but its stream's mask has "
                           f"{stream.num_tokens}; the installed transformers BridgeTowerModel differs from the supported one")
