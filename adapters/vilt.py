"""ViLT (transformers ``ViltModel`` and every ``ViltFor*`` head).

Layout of the single stream: ``[text (T) | image CLS | patches (V - 1)]``; text CLS and image CLS
are protected. Where things are in ``ViltLayer`` (transformers 5, eager attention only):

- keys: output of ``attention.attention.key`` (B, N, C);
- attention probabilities: input of ``attention.attention.dropout`` (B, H, N, N);
- reduction point (PuMer: after attention, before the MLP): input of ``layernorm_after``, the
  hidden state after the first residual; the same plan is applied to the second residual,
  ``output``'s ``input_tensor`` argument;
- attention mask: the second positional argument of every layer, rewritten after a reduction.

ViLT samples its patches in a random order (``torch.multinomial`` in ``visual_embed``). Bipartite
matching depends on token order, so the adapter wraps ``visual_embed`` to put the patches back in
raster order (padding patches last); attention is permutation-equivariant and every ViLT head
reads text positions only, so outputs are unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from transformers import ViltForMaskedLM, ViltForTokenClassification, ViltModel

from pumer_plug.adapters.base import (Adapter, AdapterError, TokenLayout, get_submodule, keys_catcher, real_lengths, residual_rewriter,
                                      saliency_catcher, stream_bias)
from pumer_plug.method import HIDDEN, IMAGE_SIZE, KEYS, TEXT_SALIENCY
from pumer_plug.ops.plan import gather_rows
from pumer_plug.stream import IMAGE, TEXT, Segment, TokenStream

STREAM = "vilt"


def find_vilt(model: nn.Module) -> ViltModel | None:
    if isinstance(model, ViltModel):
        return model
    inner = getattr(model, "vilt", None)
    return inner if isinstance(inner, ViltModel) else None


# ADAPTERS entry "vilt" (declared in pumer_plug/catalog.py)
class ViltAdapter(Adapter):
    """Attaches a reduction method to a transformers ViLT model.

    Raises:
        AdapterError: the model is not a ViLT model or a layer lacks an expected module.
        ValueError: gradient checkpointing is on (its recomputation would run every hook twice),
            or a text-merging method meets a head that reads one output per text token.
    """

    name = "vilt"
    capabilities = frozenset({KEYS, TEXT_SALIENCY, HIDDEN, IMAGE_SIZE})

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return find_vilt(model) is not None

    def __init__(self, model: nn.Module) -> None:
        vilt = find_vilt(model)
        if vilt is None:
            raise AdapterError(f"vilt adapter: expected a ViltModel or a model with a '.vilt' ViltModel, got {type(model).__name__}")
        if getattr(vilt.encoder, "gradient_checkpointing", False):
            raise ValueError("vilt adapter: gradient checkpointing recomputes layers and would reduce twice; disable it first")
        self.model, self.vilt = model, vilt
        self.layers = list(vilt.encoder.layer)
        self.num_layers = len(self.layers)
        self.hidden_size = int(vilt.config.hidden_size)
        for i in range(self.num_layers):
            for path, kind in (("attention.attention.key", nn.Linear), ("attention.attention.dropout", nn.Dropout),
                               ("layernorm_after", nn.LayerNorm), ("output", nn.Module)):
                get_submodule(vilt, f"encoder.layer.{i}.{path}", kind, "vilt")
        self.token_level_head = isinstance(model, (ViltForMaskedLM, ViltForTokenClassification))

    def check_method(self, method: Any) -> None:
        if self.token_level_head and method.merges_text:
            raise ValueError(
                f"vilt adapter: {type(self.model).__name__} reads one output per input text token, "
                "so text tokens cannot be merged; set the text merge ratio to 0"
            )

    def attach(self, handle: Any) -> None:
        method, embeddings = handle.method, self.vilt.embeddings
        handle.set_attribute(embeddings, "visual_embed", _raster_order(embeddings.visual_embed, handle.timed))
        handle.add_forward_hook(embeddings, lambda m, args, out: self._start(handle, args, out))
        first = min(handle.reduction_layers, default=self.num_layers)
        for i, layer in enumerate(self.layers):
            if i > first:
                handle.add_forward_pre_hook(layer, self._mask_rewriter(handle), with_kwargs=True)
            if i not in handle.reduction_layers:
                continue
            self_attn = layer.attention.attention
            if method.needs_keys:
                handle.add_forward_hook(self_attn.key, keys_catcher(handle, STREAM, self_attn.num_attention_heads))
            if method.needs_text_saliency:
                where = f"encoder.layer.{i}.attention.attention"  # probabilities: the input of its dropout
                handle.add_forward_pre_hook(self_attn.dropout, saliency_catcher(handle, lambda a: a[0], where, STREAM, STREAM))
            handle.add_forward_pre_hook(layer.layernorm_after, _reducer(handle, i))
            handle.add_forward_pre_hook(layer.output, residual_rewriter(handle, i, f"encoder.layer.{i}.output"))

    def accept_image_size(self, handle: Any) -> None:
        """Nothing to do: ``visual_embed`` interpolates ViLT's position table to every patch grid."""

    def token_layout(self, inputs: Any) -> TokenLayout | None:
        """``[text (T) | image CLS | patches]``; patches in raster order (``_raster_order``). Exact when
        every patch is real and kept by ``visual_embed`` (no pixel-mask padding, ``max_image_length``
        at least the patch count)."""
        pixels, ids = inputs.get("pixel_values"), inputs.get("input_ids")
        if pixels is None or ids is None:
            return None
        p = self.vilt.config.patch_size
        T = ids.shape[1]
        return TokenLayout(STREAM, T + 1, (pixels.shape[-2] // p, pixels.shape[-1] // p), STREAM, 0, T)

    def _start(self, handle: Any, args: tuple, out: tuple) -> None:
        embeds, mask = out  # (B, N, C), (B, N)
        T = args[1].shape[1]  # ViltEmbeddings.forward(input_ids, attention_mask, ...)
        N = embeds.shape[1]
        mask = mask.bool()
        try:
            lengths = real_lengths(mask, [(0, T), (T, N)])
        except ValueError as err:
            raise ValueError(f"vilt adapter: {err}") from None
        protected = torch.zeros_like(mask)
        protected[:, [0, T]] = True  # text CLS, image CLS
        handle.start_forward()
        handle.streams[STREAM] = TokenStream(mask, protected, [Segment(TEXT, T, 1), Segment(IMAGE, N - T, 1)], lengths)

    @staticmethod
    def _mask_rewriter(handle: Any):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            bias = stream_bias(handle, handle.streams[STREAM], args[0].dtype)  # (B, 1, 1, N)
            if "attention_mask" in kwargs:
                return args, {**kwargs, "attention_mask": bias}
            return (args[0], bias, *args[2:]), kwargs

        return hook


def _reducer(handle: Any, layer: int):
    def hook(module: nn.Module, args: tuple):
        stream = handle.streams[STREAM]
        hidden = args[0]  # (B, N, C), after the attention residual
        size = stream.size  # None while every token has size 1
        stream.hidden = hidden  # token features (DynamicViT)
        plan = handle.method.reduce(layer, stream)
        handle.record_counts(layer, STREAM, stream)
        if plan.is_identity:
            return None
        reduced = plan.apply(hidden, size)  # (B, N', C)
        handle.state.layer(layer)["residual"] = (hidden, reduced)  # for the FFN's residual_rewriter
        return (reduced,)

    return hook


def _raster_order(visual_embed, timed):
    """Wraps ``ViltEmbeddings.visual_embed`` to return patches in raster order, padding last; the
    reordering runs through ``timed`` (the handle's hook timer), so it counts as the plugin's time."""

    def reorder(x, x_mask, patch_index, height, width):
        # x (B, 1 + M, C) with image CLS first; x_mask (B, 1 + M); patch_index (B, M, 2)
        key = patch_index[..., 0] * width + patch_index[..., 1]  # (B, M)
        key = key + (1 - x_mask[:, 1:].long()) * (height * width)  # padding patches last
        order = torch.cat([torch.zeros_like(key[:, :1]), 1 + key.argsort(dim=1, stable=True)], dim=1)  # (B, 1 + M), CLS first
        x = gather_rows(x, order)  # (B, 1 + M, C)
        x_mask = x_mask.gather(1, order)
        patch_index = patch_index.gather(1, order[:, 1:].sub(1).unsqueeze(-1).expand(-1, -1, 2))
        return x, x_mask, (patch_index, (height, width))

    reorder = timed(reorder)

    def wrapped(pixel_values, pixel_mask, max_image_length=200):
        x, x_mask, (patch_index, (height, width)) = visual_embed(pixel_values, pixel_mask, max_image_length=max_image_length)
        return reorder(x, x_mask, patch_index, height, width)

    return wrapped
