"""METER (``pumer_plug.models.meter.MeterModel``, every task head, NLVR2 included).

METER is two-stream: a RoBERTa text encoder and a CLIP ViT image encoder feed a stack of
co-attention blocks; block ``i`` is ``cross_modal_text_layers[i]`` / ``cross_modal_image_layers[i]``
(``CrossLayer``: self-attention, cross-attention to the other stream, FFN), and both layers of a
block read the *previous* outputs of both streams::

    x1 = text_layer(hidden_states=x, encoder_hidden_states=y, attention_mask=mx, encoder_attention_mask=my)
    y1 = image_layer(hidden_states=y, encoder_hidden_states=x, attention_mask=my, encoder_attention_mask=mx)

The adapter keeps one :class:`~pumer_plug.stream.TokenStream` per stream,
``handle.streams["text"]`` (one TEXT segment, text CLS protected) and ``handle.streams["image"]``
(one IMAGE segment, image CLS protected), so both poolers (token 0 of each stream) keep working.
Reduction layers are co-attention blocks, ``0 .. num_top_layer - 1``. PuMer's official METER code
(``csarron/PuMer`` ``modeling_meter.py``) counts two layer indices per block (``layer_idx += 2``),
so its ``reduce_layers`` 0, 2, 4, 6 are our blocks 0, 1, 2, 3 (the ``meter-*`` presets).

Placement (as PuMer's ``modules_meter.BertCrossLayer``): both streams are reduced inside the TEXT
layer of a reduction block, after its cross-attention and before its FFN; the image layer of the
same block then runs entirely on the reduced image tokens. Hook points of block ``i``:

- block start: a pre-hook on the text layer (all four arguments are keywords) starts the forward
  at block 0 (streams built from the masks the block receives, so NLVR2's fused 2B batch and
  direct ``infer`` calls work alike), checks that both inputs match their streams, and, after the
  first reduction block, rewrites both masks;
- keys (mean over heads, ``TokenStream.set_keys``, PuMer's ``key_layer.mean(1)``):
  ``text_layer.attention.self.key`` (text) and ``text_layer.crossattention.self.key`` (the image
  tokens projected by the text layer's cross-attention; PuMer's image merging metric);
- text-saliency (PuMer Eq. 1): under ``attn_implementation="eager"`` the input of
  ``text_layer.crossattention.self.dropout``, the probabilities (B, H, T, V) of text queries over
  image keys, averaged over real text tokens; under ``"sdpa"`` (the default) the same rows
  recomputed from the outputs of ``crossattention.self.query`` / ``.key`` and the mask the module
  gets (``qk_saliency_catcher``);
- reduction point: input of ``text_layer.intermediate``. The method reduces the text stream (the
  plan is applied to the hidden state and to the FFN residual, ``output``'s ``input_tensor``) and
  the image stream (the plan is applied to ``y``, the block's image input);
- image layer: a pre-hook swaps in the reduced ``y`` as ``hidden_states`` and, as keys/values of
  its cross-attention, the block's old text input ``x`` reduced by the same text plan (merged
  slots get the size-weighted mean of the old tokens merged into them), with both masks rewritten.

Masks are rewritten in the model's additive convention (0.0 / -10000.0 via ``extend_attention_mask``,
plus ``log(size)`` under proportional attention), so outputs are bit-identical at zero reduction.
Every rewritten call gets masks whose length equals that of the tensors they cover.

Differences from the official code: PuMer feeds the image layer the text layer's *output* (new
``x``) in every block, which changes METER's data flow even without reduction; we keep METER's
flow (old ``x``) and reduce it with the text plan. Token counts are the method's
(``pumer_plug.pumer``: per-row real lengths, image merges ``round(r * |V|)`` of the pre-prune
length as in PuMer's code); PuMer's code also counts padded text.

FLOPs consequence: the vision and text encoders are not reduced (PuMer Table 7). In a reduction
block the text layer runs self- and cross-attention on all tokens (its cross-attention keys and
values over all image tokens) and its FFN on the reduced text; the image layer runs wholly on the
reduced image tokens and attends to the reduced text. METER-B at 384 x 384 with 40 text tokens and
``meter-vqa`` (blocks 0-3, k = r = t = 0.2): 186.3 -> 131.1 GFLOPs per example, i.e. 93.1 -> 65.6
GMACs (1.42x; FlopCounterMode), the paper's 92 -> 64.7 (Table 7); see docs/benchmarks.md.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from pumer_plug.adapters.base import (AdapterError, get_submodule, qk_saliency_catcher, real_lengths, saliency_catcher,
                                      stream_bias)
from pumer_plug.adapters.coattention import STREAMS, CoAttentionAdapter
from pumer_plug.method import HIDDEN, IMAGE_SIZE, KEYS, TEXT_SALIENCY
from pumer_plug.models.meter import MeterModel
from pumer_plug.models.meter_layers import (
    MASKED_SCORE,
    CrossIntermediate,
    CrossLayer,
    CrossSelfOutput,
)
from pumer_plug.stream import IMAGE, TEXT, Segment, TokenStream

# ADAPTERS entry "meter" (declared in pumer_plug/catalog.py)
class MeterAdapter(CoAttentionAdapter):
    """Attaches a reduction method to a METER model (reduction layers = co-attention blocks).

    Raises:
        AdapterError: the model is not a ``MeterModel`` or a block lacks an expected module.
    """

    name = "meter"
    capabilities = frozenset({KEYS, TEXT_SALIENCY, HIDDEN, IMAGE_SIZE})

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, MeterModel)

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, MeterModel):
            raise AdapterError(
                f"meter adapter: expected a pumer_plug.models.meter.MeterModel, got {type(model).__name__}"
            )
        self.model = model
        self.patch_size = int(model.config.patch_size)
        self.num_layers = len(model.cross_modal_text_layers)
        self.hidden_size = int(model.config.hidden_size)
        if len(model.cross_modal_image_layers) != self.num_layers:
            raise AdapterError(f"meter adapter: {self.num_layers} text but {len(model.cross_modal_image_layers)} image "
                               "co-attention layers")
        self.layers = {name: [get_submodule(model, f"cross_modal_{name}_layers.{i}", CrossLayer, self.name)
                              for i in range(self.num_layers)] for name in STREAMS}
        for i in range(self.num_layers):
            prefix = f"cross_modal_text_layers.{i}"
            for path, kind in (("attention.self.key", nn.Linear), ("crossattention.self.key", nn.Linear),
                               ("crossattention.self.query", nn.Linear),
                               ("crossattention.self.dropout", nn.Dropout), ("intermediate", CrossIntermediate),
                               ("output", CrossSelfOutput)):
                get_submodule(model, f"{prefix}.{path}", kind, self.name)

    def catch_saliency(self, handle: Any, text_layer: nn.Module, i: int) -> None:
        attention = text_layer.crossattention.self
        if attention.attn_implementation == "eager":
            where = f"cross_modal_text_layers.{i}.crossattention.self"  # probabilities (B, H, T, V): its dropout's input
            handle.add_forward_pre_hook(attention.dropout, saliency_catcher(handle, lambda a: a[0], where))
            return
        # SDPA: the text rows recomputed from the hooked queries (text) and keys (image), with the
        # additive image mask the module gets (its second argument)
        on_q, on_k, compute = qk_saliency_catcher(handle, i, attention.num_attention_heads, lambda args: args[1])
        handle.add_forward_hook(attention.query, on_q)
        handle.add_forward_hook(attention.key, on_k)
        handle.add_forward_hook(attention, compute)

    def accept_image_size(self, handle: Any) -> None:
        """Nothing to do: METER's CLIP trunk interpolates its position table to every patch grid."""

    # -- hooks ---------------------------------------------------------------------------------
    def _block_start(self, handle: Any, i: int, rewrite: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            _check_keywords(args, f"cross_modal_text_layers.{i}")
            x, y = kwargs["hidden_states"], kwargs["encoder_hidden_states"]  # (B, T, C), (B, V, C)
            if i == 0:
                self._start(handle, x, y, kwargs.get("attention_mask"), kwargs.get("encoder_attention_mask"))
            elif handle.state.adapter.block != i - 1:
                raise RuntimeError(f"meter adapter: cross_modal_text_layers.{i} ran after block {handle.state.adapter.block}; "
                                   "the co-attention blocks must run in order, starting at block 0")
            streams = handle.streams
            self._check_length(streams["text"], x, f"cross_modal_text_layers.{i} hidden_states")
            self._check_length(streams["image"], y, f"cross_modal_text_layers.{i} encoder_hidden_states")
            state = handle.state.adapter
            state.block, state.inputs, state.reduced = i, {"text": x, "image": y}, {}
            if not rewrite:
                return None
            return args, {**kwargs, "attention_mask": stream_bias(handle, streams["text"], x.dtype, MASKED_SCORE),
                          "encoder_attention_mask": stream_bias(handle, streams["image"], x.dtype, MASKED_SCORE)}

        return hook

    def _start(self, handle: Any, x: torch.Tensor, y: torch.Tensor, text_bias: torch.Tensor | None,
               image_bias: torch.Tensor | None) -> None:
        state = handle.start_forward()
        masks = []
        for hidden, bias in ((x, text_bias), (y, image_bias)):
            B, N = hidden.shape[:2]
            if bias is None:
                masks.append(torch.ones(B, N, dtype=torch.bool, device=hidden.device))
            else:
                masks.append(bias.reshape(B, -1) > MASKED_SCORE / 2)  # additive (B, 1, 1, N) -> (B, N) bool
        T, V = x.shape[1], y.shape[1]
        try:
            lengths = real_lengths(torch.cat(masks, dim=1), [(0, T), (T, T + V)])  # one sync for both streams
        except ValueError as err:
            raise ValueError(f"meter adapter: {err}") from None
        for name, mask, modality, n in zip(STREAMS, masks, (TEXT, IMAGE), lengths):
            protected = torch.zeros_like(mask)
            protected[:, 0] = True  # text CLS (<s>) / image CLS (CLIP class embedding)
            state.streams[name] = TokenStream(mask, protected, [Segment(modality, mask.shape[1], 1)], [n])

    def _image_layer(self, handle: Any, i: int, rewrite: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            _check_keywords(args, f"cross_modal_image_layers.{i}")
            state = handle.state.adapter
            y, x = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
            if state.block != i or y is not state.inputs["image"] or x is not state.inputs["text"]:
                raise RuntimeError(f"meter adapter: cross_modal_image_layers.{i} must run right after "
                                   f"cross_modal_text_layers.{i} on the same block inputs (METER's co-attention order)")
            if not rewrite:
                return None
            new = {**kwargs, "hidden_states": state.reduced.get("image", y),
                   "encoder_hidden_states": state.reduced.get("text", x)}
            streams = handle.streams
            where = f"cross_modal_image_layers.{i}"
            self._check_length(streams["image"], new["hidden_states"], f"{where} hidden_states")
            self._check_length(streams["text"], new["encoder_hidden_states"], f"{where} encoder_hidden_states")
            new["attention_mask"] = stream_bias(handle, streams["image"], y.dtype, MASKED_SCORE)
            new["encoder_attention_mask"] = stream_bias(handle, streams["text"], y.dtype, MASKED_SCORE)
            state.reduced = {}
            return args, new

        return hook


def _check_keywords(args: tuple, where: str) -> None:
    if args:
        raise RuntimeError(f"meter adapter: {where} was called with {len(args)} positional argument(s); MeterModel "
                           "passes hidden_states, encoder_hidden_states and both masks as keywords")
