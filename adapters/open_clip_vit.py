"""open_clip's visual tower (``VisionTransformer``, or a CLIP model's ``.visual``): the image-only
stream of :mod:`~pumer_plug.adapters.vit` with open_clip 3's ``ResidualAttentionBlock`` over
``nn.MultiheadAttention``. Keys: the attention projects inside one functional call, so a pre-hook on
``attn`` recomputes the key slice of ``in_proj_weight`` from the attention input (one extra (N, C) x
(C, C) matmul per reduction layer); proportional attention goes in as ``attn_mask`` (B*H, N, N).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from open_clip.transformer import _expand_token
from timm.layers import resample_abs_pos_embed

from pumer_plug.adapters.base import AdapterError, get_submodule
from pumer_plug.adapters.vit import STREAM, VitAdapter, check_forward


def find_open_clip_visual(model: nn.Module) -> OpenClipVisionTransformer | None:
    if isinstance(model, OpenClipVisionTransformer):
        return model
    visual = getattr(model, "visual", None)
    return visual if isinstance(visual, OpenClipVisionTransformer) else None


# ADAPTERS entry "open-clip-vit" (declared in pumer_plug/catalog.py)
class OpenClipVitAdapter(VitAdapter):
    """Attaches a reduction method to open_clip's ``VisionTransformer`` (or a CLIP model's ``.visual``).

    Only the image tower is reduced; ``encode_text`` runs as before.

    Raises:
        AdapterError: no open_clip ``VisionTransformer``, or a block is not a self-attention
            ``ResidualAttentionBlock`` over ``nn.MultiheadAttention`` (e.g. the ``custom`` block
            type for QK-norm / scaled-cosine attention), naming the module path.
        ValueError: gradient checkpointing is on.
    """

    name = "open-clip-vit"
    mask_args_from = 3  # nn.MultiheadAttention(query, key, value, key_padding_mask, need_weights, attn_mask)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return find_open_clip_visual(model) is not None

    def __init__(self, model: nn.Module) -> None:
        visual = find_open_clip_visual(model)
        if visual is None:
            raise AdapterError(f"open-clip-vit adapter: expected an open_clip VisionTransformer or a model with a "
                               f"'.visual' one, got {type(model).__name__}")
        if visual.transformer.grad_checkpointing:
            raise ValueError("open-clip-vit adapter: gradient checkpointing recomputes blocks and would reduce twice; disable it first")
        self.model, self.visual = model, visual
        self.blocks = list(get_submodule(visual, "transformer.resblocks", nn.ModuleList, "open-clip-vit"))
        if not self.blocks:
            raise AdapterError("open-clip-vit adapter: expected at least one block at 'transformer.resblocks', found none")
        for i, block in enumerate(self.blocks):
            path = f"transformer.resblocks.{i}"
            check_forward(block, ResidualAttentionBlock, path, "open-clip-vit")
            attn = get_submodule(visual, f"{path}.attn", nn.MultiheadAttention, "open-clip-vit")
            if hasattr(block, "ln_1_kv") or not attn._qkv_same_embed_dim:
                raise AdapterError(f"open-clip-vit adapter: expected self-attention with a packed in_proj at '{path}.attn'")
            if attn.batch_first != visual.transformer.batch_first:
                raise AdapterError(f"open-clip-vit adapter: '{path}.attn' batch_first differs from the transformer's")
        self.num_layers = len(self.blocks)
        self.num_prefix_tokens = 1  # class embedding
        self.batch_first = bool(visual.transformer.batch_first)
        self.hidden_size = int(visual.transformer.width)

    @property
    def image_module(self) -> nn.Module:
        """The visual tower: reached by a CLIP model's forward and by ``encode_image`` alike."""
        return self.visual

    def checkpointing(self) -> bool:
        return bool(self.visual.transformer.grad_checkpointing)

    def patch_size(self) -> tuple[int, int]:
        return tuple(self.visual.conv1.kernel_size)

    def accept_image_size(self, handle: Any) -> None:
        """Lets the tower take other image sizes (SmRes): an instance ``_embeds`` resamples
        ``positional_embedding`` to the input's patch grid."""
        visual = self.visual
        old_grid = tuple(visual.grid_size)

        def embeds(x: torch.Tensor) -> torch.Tensor:
            """open_clip 3 ``VisionTransformer._embeds`` with a resampled position embedding."""
            x = visual.conv1(x)  # (B, C, h, w)
            grid = tuple(x.shape[-2:])
            x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, h * w, C)
            x = torch.cat([_expand_token(visual.class_embedding, x.shape[0]).to(x.dtype), x], dim=1)
            pos = visual.positional_embedding[None]  # (1, 1 + H0 * W0, C)
            if grid != old_grid:  # differs from open_clip: resampled to the input grid
                pos = resample_abs_pos_embed(pos, new_size=grid, old_size=old_grid, num_prefix_tokens=1)
            x = x + pos[0].to(x.dtype)
            x = visual.patch_dropout(x)
            return visual.ln_pre(x)

        handle.set_attribute(visual, "_embeds", embeds)

    def catch_keys(self, handle: Any, block: nn.Module) -> None:
        batch_first = self.batch_first

        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
            key = args[1] if len(args) > 1 else kwargs["key"]  # (B, N, C) or (N, B, C)
            C = module.embed_dim
            bias = None if module.in_proj_bias is None else module.in_proj_bias[C : 2 * C]
            with torch.no_grad():
                keys = F.linear(key, module.in_proj_weight[C : 2 * C], bias)  # key slice of in_proj
            keys = keys if batch_first else keys.transpose(0, 1)  # (B, N, C)
            handle.streams[STREAM].set_keys(keys, module.num_heads)  # mean over heads (B, N, C/H)

        handle.add_forward_pre_hook(block.attn, hook, with_kwargs=True)

    def shape_bias(self, bias: torch.Tensor, block: nn.Module) -> torch.Tensor:
        B, N, H = bias.shape[0], bias.shape[-1], block.attn.num_heads
        rows = bias[:, 0].repeat_interleave(H, dim=0)  # (B * H, 1, N), batch-major as MHA views it
        return rows.expand(B * H, N, N)  # (B * H, N, N), a broadcast view

    @staticmethod
    def wrap_forward(block: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        """open_clip 3 ``ResidualAttentionBlock.forward`` (self-attention) with ToMe's merge."""

        def forward(q_x: torch.Tensor, k_x: torch.Tensor | None = None, v_x: torch.Tensor | None = None,
                    attn_mask: torch.Tensor | None = None) -> torch.Tensor:
            if k_x is not None or v_x is not None:
                raise RuntimeError("open-clip-vit adapter: a reducing block got cross-attention inputs")
            x = q_x + block.ls_1(block.attention(q_x=block.ln_1(q_x), attn_mask=attn_mask))
            x = reduce(x)  # differs from open_clip: ToMe Sec. 3 merges here
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
            return x

        return forward
