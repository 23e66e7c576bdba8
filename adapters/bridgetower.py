"""BridgeTower (transformers ``BridgeTowerModel`` and its ITM, MLM and contrastive heads).

BridgeTower is METER plus bridge layers: unimodal text (RoBERTa) and image (CLIP ViT) encoders
feed a stack of cross-modal pairs ``cross_modal_text_layers[i]`` / ``cross_modal_image_layers[i]``
(``BridgeTowerBertCrossLayer``: self-attention, cross-attention to the other stream, MLP), and
both layers of a pair read the pair's inputs of both streams::

    x1 = text_layer(x, y, attention_mask=mx)                # cross-attends to the pair's image input y
    y1 = image_layer(y, x, encoder_attention_mask=mx)       # cross-attends to the pair's text input x
    x, y = text_link_tower(T(u_text), x1), image_link_tower(T(u_image), y1)   # before every pair i >= 1

where the link towers add the projected output ``T(u)`` of a *full-length* unimodal layer. The
adapter keeps one :class:`~pumer_plug.stream.TokenStream` per stream, ``handle.streams["text"]``
(one TEXT segment, text CLS protected) and ``handle.streams["image"]`` (one IMAGE segment, image
CLS protected), so both poolers (token 0 of each stream) keep working. Reduction layers are the
cross-modal pairs ``0 .. num_hidden_layers - 1``.

Placement (as PuMer's official METER code, ``modules_meter.BertCrossLayer``): both streams are
reduced inside the TEXT layer of a reduction pair, after its cross-attention and before its MLP;
the image layer of the same pair then runs entirely on the reduced tokens. Hook points of pair i
(transformers 5, eager attention only):

- pair start: a pre-hook on the text layer checks that ``x`` and ``y`` match their streams and,
  after the first reduction pair, rewrites its self- and cross-attention masks
  (``pumer_plug.ops.reduce.attention_bias``; the image stream, never padded by the model, gets a
  mask too once reduced);
- keys (mean over heads, ``TokenStream.set_keys``): ``text_layer.attention.self.key`` (text) and
  ``text_layer.crossattention.self.key`` (the image tokens projected by the text layer's
  cross-attention; PuMer's image merging metric);
- text-saliency (PuMer Eq. 1): the probabilities (B, H, T, V) that ``text_layer.crossattention.self``
  returns (text queries over image keys), averaged over real text tokens. transformers applies
  attention dropout functionally before returning them, so in train mode the scores come from
  dropped-out probabilities (an unbiased, noisier estimate); eval is exact;
- reduction point: input of ``text_layer.intermediate``. The method reduces the text stream (the
  plan is applied to the hidden state, to the MLP residual ``output``'s ``input_tensor``, and to
  the pair's text input ``x``) and the image stream (the plan is applied to ``y``);
- image layer: a pre-hook swaps in the reduced ``y`` as hidden states and the reduced ``x`` as
  cross-attention keys/values (merged slots hold the size-weighted mean of the tokens merged into
  them), with both masks rewritten to the reduced lengths;
- link towers: their full-length unimodal input is reduced with the composition of every plan
  applied to that stream so far (``plan_a.then(plan_b)``); a merged slot gets the mean of the
  unimodal tokens merged into it, matching the size-weighted mean in the cross stream.

FLOPs consequence: the unimodal encoders are not reduced (PuMer Table 7), and neither are the
per-pair ``ln_post`` + ``cross_modal_*_transform`` projections feeding the link towers (the model
computes them on every token before a hook can see them). In a reduction pair the text layer runs
self- and cross-attention on all tokens and its MLP on the reduced text; the image layer runs
wholly on reduced tokens. BridgeTower-base (12 + 12 unimodal layers, 6 pairs) at 288 x 288 with 40
text tokens and k = r = t = 0.2 at pairs 0-3: image tokens 325 -> 208 -> 133 -> 85 -> 54, text
40 -> 32 -> 26 -> 21 -> 17; the unimodal encoders hold most of the FLOPs, so the FLOPs ratio is
far below METER's.

``BridgeTowerForMaskedLM`` reads one output per text token: text merging is refused, and the text
stream is never reduced (not even the padding compaction that a zero text merge ratio allows).
"""
from __future__ import annotations

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

from pumer_plug.adapters.base import (AdapterError, get_submodule, real_lengths, request_pos_interpolation,
                                      saliency_catcher, same_lengths, stream_bias)
from pumer_plug.adapters.coattention import STREAMS, CoAttentionAdapter
from pumer_plug.method import HIDDEN, IMAGE_SIZE, KEYS, TEXT_SALIENCY
from pumer_plug.ops.plan import ReductionPlan
from pumer_plug.stream import IMAGE, TEXT, Segment, TokenStream

def find_bridgetower(model: nn.Module) -> BridgeTowerModel | None:
    if isinstance(model, BridgeTowerModel):
        return model
    inner = getattr(model, "bridgetower", None)
    return inner if isinstance(inner, BridgeTowerModel) else None


# ADAPTERS entry "bridgetower" (declared in pumer_plug/catalog.py)
class BridgeTowerAdapter(CoAttentionAdapter):
    """Attaches a reduction method to a transformers BridgeTower model (reduction layers = cross pairs).

    Raises:
        AdapterError: the model is not a BridgeTower model, a module is missing, or its attention
            is not eager (the text-saliency scores need the attention probabilities).
        ValueError: a text-merging method meets ``BridgeTowerForMaskedLM``.
    """

    name = "bridgetower"
    capabilities = frozenset({KEYS, TEXT_SALIENCY, HIDDEN, IMAGE_SIZE})
    compose_plans = True  # the link towers take the unimodal tokens through every plan so far
    mismatch_hint = "the installed transformers BridgeTowerModel differs from the supported one"

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
        self.patch_size = int(bt.config.vision_config.patch_size)
        self.num_layers = len(bt.cross_modal_text_layers)
        self.hidden_size = int(bt.config.hidden_size)
        self.layers: dict[str, list[nn.Module]] = {}
        for name in STREAMS:
            self.layers[name] = [get_submodule(bt, f"cross_modal_{name}_layers.{i}", BridgeTowerBertCrossLayer, self.name)
                                 for i in range(self.num_layers)]
            for i, layer in enumerate(self.layers[name]):
                for path, kind in (("attention.self.key", nn.Linear), ("crossattention.self.key", nn.Linear),
                                   ("crossattention.self", BridgeTowerCrossAttention),
                                   ("intermediate", BridgeTowerIntermediate), ("output", BridgeTowerOutput)):
                    get_submodule(bt, f"cross_modal_{name}_layers.{i}.{path}", kind, self.name)
                if layer.chunk_size_feed_forward:
                    raise AdapterError(f"bridgetower adapter: cross_modal_{name}_layers.{i} chunks its feed-forward; "
                                       "set chunk_size_feed_forward=0")
        self.link_towers = {name: self._link_towers(bt, name) for name in STREAMS}
        attn = getattr(bt.config, "_attn_implementation", None)
        if attn not in (None, "eager"):
            raise AdapterError(f"bridgetower adapter: attention implementation {attn!r} returns no attention "
                               "probabilities; load the model with attn_implementation='eager'")
        self.token_level_head = isinstance(model, BridgeTowerForMaskedLM)

    def accept_image_size(self, handle: Any) -> None:
        """The CLIP tower interpolates its position embeddings when asked (``interpolate_pos_encoding``)."""
        request_pos_interpolation(handle, self.model)

    def _link_towers(self, bt: BridgeTowerModel, name: str) -> list[nn.Module]:
        path = f"cross_modal_{name}_link_tower"
        towers = getattr(bt, path, None)
        if isinstance(towers, nn.ModuleList):
            return [get_submodule(bt, f"{path}.{j}", BridgeTowerLinkTower, self.name) for j in range(len(towers))]
        return [get_submodule(bt, path, BridgeTowerLinkTower, self.name)]  # share_link_tower_layers

    def check_method(self, method: Any) -> None:
        if self.token_level_head and method.merges_text:
            raise ValueError(
                f"bridgetower adapter: {type(self.model).__name__} reads one output per input text token, "
                "so text tokens cannot be merged; set the text merge ratio to 0"
            )

    def attach(self, handle: Any) -> None:
        handle.add_forward_pre_hook(self.bt, self._start(handle), with_kwargs=True)
        super().attach(handle)
        for name in STREAMS:
            for tower in self.link_towers[name]:
                handle.add_forward_pre_hook(tower, self._link_reducer(handle, name))

    def catch_saliency(self, handle: Any, text_layer: nn.Module, i: int) -> None:
        where = f"cross_modal_text_layers.{i}.crossattention.self"  # returns (output, probs (B, H, T, V))
        handle.add_forward_hook(text_layer.crossattention.self, saliency_catcher(handle, lambda out: out[1], where, output=True))

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
            protected[:, 0] = True  # text CLS (<s>)
            state = handle.start_forward()
            state.streams["text"] = TokenStream(mask, protected, [Segment(TEXT, T, 1)], lengths)
            state.adapter.plans["text"] = ReductionPlan.identity(T)

        return hook

    def _block_start(self, handle: Any, i: int, rewrite: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            # BridgeTowerBertCrossLayer.forward(hidden_states, encoder_hidden_states, attention_mask, ...)
            state, streams = handle.state.adapter, handle.streams
            x, y = args[0], args[1]  # (B, T, C), (B, V, C)
            if i == 0:
                B, V = y.shape[:2]
                mask = torch.ones(B, V, dtype=torch.bool, device=y.device)  # the model never pads images
                protected = torch.zeros_like(mask)
                protected[:, 0] = True  # image CLS (CLIP class embedding)
                streams["image"] = TokenStream(mask, protected, [Segment(IMAGE, V, 1)], [same_lengths(V, B, y.device)])
                state.plans["image"] = ReductionPlan.identity(V)
            self._check_length(streams["text"], x, f"cross_modal_text_layers.{i} hidden_states")
            self._check_length(streams["image"], y, f"cross_modal_text_layers.{i} encoder_hidden_states")
            state.block, state.inputs, state.reduced, state.residual = i, {"text": x, "image": y}, {}, {}
            if not rewrite:
                return None
            return _with_masks(args, kwargs, stream_bias(handle, streams["text"], x.dtype), stream_bias(handle, streams["image"], x.dtype))

        return hook

    def _image_layer(self, handle: Any, i: int, rewrite: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            state, streams = handle.state.adapter, handle.streams
            y, x = args[0], args[1]
            if state.block != i or y is not state.inputs["image"] or x is not state.inputs["text"]:
                raise RuntimeError(f"bridgetower adapter: cross_modal_image_layers.{i} must run right after "
                                   f"cross_modal_text_layers.{i} on the same pair inputs (BridgeTower's order)")
            if not rewrite:
                return None
            y, x = state.reduced.get("image", y), state.reduced.get("text", x)
            self._check_length(streams["image"], y, f"cross_modal_image_layers.{i} hidden_states")
            self._check_length(streams["text"], x, f"cross_modal_image_layers.{i} encoder_hidden_states")
            state.reduced = {}
            args = (y, x, *args[2:])
            return _with_masks(args, kwargs, stream_bias(handle, streams["image"], y.dtype), stream_bias(handle, streams["text"], y.dtype))

        return hook

    def _link_reducer(self, handle: Any, name: str):
        def hook(module: nn.Module, args: tuple):
            # BridgeTowerLinkTower.forward(hidden_states (B, N0, C) unimodal, cross_modal_hidden_states (B, N, C), mask)
            unimodal, cross = args[0], args[1]
            reduced = handle.state.adapter.plans[name].apply(unimodal)  # (B, N0, C) -> (B, N, C)
            if reduced.shape[1] != cross.shape[1]:
                raise RuntimeError(f"bridgetower adapter: the {name} link tower got {reduced.shape[1]} unimodal tokens "
                                   f"after reduction for {cross.shape[1]} cross-modal tokens")
            return None if reduced is unimodal else (reduced, *args[1:])

        return hook


def _with_masks(args: tuple, kwargs: dict, self_bias: torch.Tensor, cross_bias: torch.Tensor) -> tuple[tuple, dict]:
    """Cross-layer arguments with the self-attention and cross-attention masks replaced."""
    # BridgeTowerBertCrossLayer.forward(hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask, cache)
    positional = dict(zip(("attention_mask", "encoder_attention_mask", "cache"), args[2:]))
    return args[:2], {**kwargs, **positional, "attention_mask": self_bias, "encoder_attention_mask": cross_bias}
