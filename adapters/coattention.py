"""What the two-stream adapters (METER, BridgeTower) share: PuMer's reduction inside a co-attention block.

Both models run co-attention block ``i`` as a text layer, then an image layer, each reading the
block's inputs ``x`` (text, (B, T, C)) and ``y`` (image, (B, V, C)). PuMer reduces both streams
inside the TEXT layer of a reduction block, after its cross-attention and before its FFN
(``csarron/PuMer`` ``modules_meter.BertCrossLayer``): the plan of the text stream is applied to
that layer's hidden state and to its FFN residual, and the plans of both streams are applied to
the block inputs, which the image layer of the same block then reads. This module holds that
part: the per-forward scratch (:class:`BlockState`, kept in ``handle.state.adapter``), the
reducer hook and the length check; keys, saliency, masks and the FFN residual use the shared hook
factories of ``adapters/base.py``. Where a model keeps its layers, how its masks look and how a forward starts stay in the
subclasses (``adapters/meter.py``, ``adapters/bridgetower.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from pumer_plug.adapters.base import Adapter, TokenLayout, keys_catcher, residual_rewriter
from pumer_plug.method import HIDDEN, KEYS, TEXT_SALIENCY
from pumer_plug.ops.plan import ReductionPlan
from pumer_plug.stream import TokenStream

STREAMS = ("text", "image")


@dataclass
class BlockState:
    """Per-forward scratch besides the streams (``handle.state.adapter``), new at every forward.

    Attributes:
        block: the co-attention block whose text layer ran last (-1 before the first block).
        inputs: the block's inputs ``x`` (B, T, C) and ``y`` (B, V, C), as the model passed them.
        reduced: ``x`` and ``y`` reduced at this block, for its image layer (empty if not reduced).
        plans: per stream, the composition of every plan so far (only if the adapter composes plans).
    """

    block: int = -1
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    reduced: dict[str, torch.Tensor] = field(default_factory=dict)
    plans: dict[str, ReductionPlan] = field(default_factory=dict)


class CoAttentionAdapter(Adapter):
    """Base of the two-stream adapters; reduction layers are co-attention blocks.

    Subclasses set ``name``, ``patch_size`` (of the CLIP vision tower), ``compose_plans`` (keep the
    composed plans of both streams, e.g. for BridgeTower's link towers), ``token_level_head`` (the
    text stream must not be reduced) and ``mismatch_hint`` (the end of the error a length mismatch
    raises), and register the hooks below.
    """

    patch_size: int

    capabilities = frozenset({KEYS, TEXT_SALIENCY, HIDDEN})
    compose_plans = False
    token_level_head = False
    mismatch_hint = "the co-attention blocks must run in order on the model's outputs"

    def token_layout(self, inputs: Any) -> TokenLayout | None:
        """``handle.streams["image"]`` is ``[image CLS | patches]`` (the CLIP vision tower's tokens, patches in
        raster order) and ``handle.streams["text"]`` the padded text ``[text (T)]``. None for two images per
        example (METER NLVR2's (B, 2, 3, H, W) pixels, run as one 2B batch)."""
        pixels, ids = inputs.get("pixel_values"), inputs.get("input_ids")
        if pixels is None or ids is None or pixels.dim() != 4:
            return None
        p = self.patch_size
        return TokenLayout("image", 1, (pixels.shape[-2] // p, pixels.shape[-1] // p), "text", 0, ids.shape[1])

    def new_forward_state(self) -> BlockState:
        return BlockState()

    def attach(self, handle: Any) -> None:
        """Hooks every block's two layers and, at reduction blocks, the text layer's keys,
        text-saliency, FFN input (the reducer) and FFN residual."""
        method = handle.method
        first = min(handle.reduction_layers, default=self.num_layers)
        for i in range(self.num_layers):
            text_layer, image_layer = self.layers["text"][i], self.layers["image"][i]
            handle.add_forward_pre_hook(text_layer, self._block_start(handle, i, rewrite=i > first), with_kwargs=True)
            handle.add_forward_pre_hook(image_layer, self._image_layer(handle, i, rewrite=i >= first), with_kwargs=True)
            if i not in handle.reduction_layers:
                continue
            if method.needs_keys:
                for name, attention in (("text", text_layer.attention), ("image", text_layer.crossattention)):
                    catcher = keys_catcher(handle, name, attention.self.num_attention_heads)
                    handle.add_forward_hook(attention.self.key, catcher)  # cross: image tokens, text layer's projection
            if method.needs_text_saliency:
                self.catch_saliency(handle, text_layer, i)
            handle.add_forward_pre_hook(text_layer.intermediate, self._reducer(handle, i))
            where = f"cross_modal_text_layers.{i}.output"
            handle.add_forward_pre_hook(text_layer.output, residual_rewriter(handle, i, where))

    # -- what subclasses provide ---------------------------------------------------------------
    def _block_start(self, handle: Any, i: int, rewrite: bool):
        """Pre-hook (with kwargs) on block ``i``'s text layer: checks lengths, rewrites masks if ``rewrite``."""
        raise NotImplementedError

    def _image_layer(self, handle: Any, i: int, rewrite: bool):
        """Pre-hook (with kwargs) on block ``i``'s image layer: swaps in the reduced inputs if ``rewrite``."""
        raise NotImplementedError

    def catch_saliency(self, handle: Any, text_layer: nn.Module, i: int) -> None:
        """Installs the hook that stores the text-to-image attention probabilities of block ``i``."""
        raise NotImplementedError

    def _reducer(self, handle: Any, i: int):
        """Pre-hook on the text layer's FFN input (``intermediate``) of reduction block ``i``."""
        def hook(module: nn.Module, args: tuple):
            state, streams = handle.state.adapter, handle.streams
            if state.block != i:
                raise RuntimeError(f"{self.name} adapter: cross_modal_text_layers.{i}.intermediate ran outside its layer")
            hidden = args[0]  # (B, T, C), after self- and cross-attention
            for name in STREAMS:
                stream = streams[name]
                if name == "text" and self.token_level_head:
                    handle.record_counts(i, name, stream)
                    continue
                size = stream.size  # None while every token has size 1
                stream.hidden = hidden if name == "text" else state.inputs[name]  # token features (DynamicViT)
                plan: ReductionPlan = handle.method.reduce(i, stream)
                stream.hidden = None
                handle.record_counts(i, name, stream)
                if self.compose_plans:
                    state.plans[name] = state.plans[name].then(plan)
                if plan.is_identity:
                    continue
                state.reduced[name] = plan.apply(state.inputs[name], size)  # block input, (B, N', C)
                if name == "text":
                    handle.state.layer(i)["residual"] = (hidden, plan.apply(hidden, size))  # (B, T', C)
            residual = handle.state.layer(i).get("residual")
            return None if residual is None else (residual[1],)

        return hook

    def _check_length(self, stream: TokenStream, x: torch.Tensor, where: str) -> None:
        if x.shape[1] != stream.num_tokens:
            raise RuntimeError(f"{self.name} adapter: {where} has {x.shape[1]} tokens but its stream's mask has "
                               f"{stream.num_tokens}; {self.mismatch_hint}")
