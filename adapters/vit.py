"""Image-only vision transformers: timm ``VisionTransformer`` here, open_clip's visual tower in
:mod:`~pumer_plug.adapters.open_clip_vit` (its own module, so a timm user never imports open_clip,
which imports transformers).

One stream with one image segment, ``[prefix tokens | patches]``; every prefix token (CLS, the
DeiT distillation token, register tokens: timm's ``num_prefix_tokens``) is protected. Where things
are (timm 1.0 ``Block`` / ``Attention``; open_clip 3 ``ResidualAttentionBlock``):

- forward start: a pre-hook on the first block builds the stream (every row has the same tokens,
  so an image-only stream never carries padding).
- keys: timm: output of ``attn.k_norm`` (B, H, N, D), the key exactly as attention uses it (after
  optional QK-norm), produced before either attention path. open_clip: ``nn.MultiheadAttention``
  projects inside one functional call, so a pre-hook on ``attn`` recomputes the key slice of
  ``in_proj_weight`` from the attention input (one extra (N, C) x (C, C) matmul per reduction layer).
- proportional attention (``log(size)``, ToMe Sec. 3): passed as the attention module's
  ``attn_mask`` keyword by a pre-hook on every layer after the first reduction. timm hands it to
  ``F.scaled_dot_product_attention`` on its fused path and adds it to the logits on the other, so
  ``fused_attn`` is never touched; ``nn.MultiheadAttention`` takes it as (B*H, N, N). While every
  token size is 1 (proportional attention off, no merge yet, DynamicViT in eval) no mask is passed
  and fused kernels keep their fastest path.
- reduction point (ToMe: after the attention residual, before the MLP): both blocks add the
  second residual to ``x`` outside any submodule, so no hook can reach it. At reduction layers the
  adapter sets an instance ``forward`` on the block (deleted on ``remove()``): the upstream forward,
  three lines, with the merge between them (marked). ``apply`` refuses blocks whose class forward is
  not the mirrored one, and ``tests/test_vit_adapters.py`` checks the wrapper against upstream.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
from timm.layers import Attention as TimmAttention
from timm.layers import Format, PatchEmbed
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from pumer_plug.adapters.base import Adapter, AdapterError, TokenLayout, get_submodule, keys_catcher, same_lengths, stream_bias
from pumer_plug.method import HIDDEN, IMAGE_SIZE, KEYS
from pumer_plug.stream import IMAGE, Segment, TokenStream

STREAM = "vit"


class VitAdapter(Adapter):
    """Shared lifecycle of the image-only adapters; subclasses say where things are."""

    capabilities = frozenset({KEYS, HIDDEN, IMAGE_SIZE})  # no text, so no text-saliency score
    blocks: list[nn.Module]
    num_prefix_tokens: int
    batch_first: bool = True
    #: positional arguments of the attention module from which on a caller passes masks
    mask_args_from: ClassVar[int] = 1

    def attach(self, handle: Any) -> None:
        method, layers = handle.method, handle.reduction_layers
        handle.add_forward_pre_hook(self.blocks[0], self._starter(handle))
        first = min(layers, default=self.num_layers)
        for i, block in enumerate(self.blocks):
            if i > first and method.proportional_attention():
                handle.add_forward_pre_hook(block.attn, self._bias_setter(handle, block, i), with_kwargs=True)
            if i not in layers:
                continue
            if method.needs_keys:
                self.catch_keys(handle, block)
            handle.set_attribute(block, "forward", self.wrap_forward(block, handle.timed(self._reducer(handle, i))))

    # -- what subclasses provide -----------------------------------------------------------
    def checkpointing(self) -> bool:
        raise NotImplementedError

    def catch_keys(self, handle: Any, block: nn.Module) -> None:
        """Installs the hook that stores this block's keys (B, N, C) in the stream."""
        raise NotImplementedError

    def shape_bias(self, bias: torch.Tensor, block: nn.Module) -> torch.Tensor:
        """Turns an additive key bias (B, 1, 1, N) into what the block's attention takes."""
        return bias

    @staticmethod
    def wrap_forward(block: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        raise NotImplementedError

    # -- hooks -----------------------------------------------------------------------------
    def token_layout(self, inputs: Any) -> TokenLayout | None:
        """``[prefix tokens | patches]`` of the image ``x`` (B, 3, H, W), patches in raster order."""
        x = inputs.get("x")
        if x is None:
            return None
        ph, pw = self.patch_size()
        return TokenLayout(STREAM, self.num_prefix_tokens, (x.shape[-2] // ph, x.shape[-1] // pw), image_input="x")

    def patch_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def _starter(self, handle: Any):
        def hook(module: nn.Module, args: tuple) -> None:
            if self.checkpointing():
                raise RuntimeError(f"{self.name} adapter: gradient checkpointing recomputes blocks and would reduce "
                                   "twice; disable it")
            x = args[0]  # (B, N, C), or (N, B, C) when not batch-first
            B, N = (x.shape[0], x.shape[1]) if self.batch_first else (x.shape[1], x.shape[0])
            mask = torch.ones(B, N, dtype=torch.bool, device=x.device)
            protected = torch.zeros_like(mask)
            protected[:, : self.num_prefix_tokens] = True  # CLS, distillation and register tokens
            state = handle.start_forward()
            segment = Segment(IMAGE, N, self.num_prefix_tokens)
            state.streams[STREAM] = TokenStream(mask, protected, [segment], [same_lengths(N, B, x.device)])

        return hook

    def _reducer(self, handle: Any, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        batch_first = self.batch_first

        def reduce(x: torch.Tensor) -> torch.Tensor:
            stream = handle.streams[STREAM]
            size = stream.size  # None while every token has size 1
            stream.hidden = x if batch_first else x.transpose(0, 1)  # (B, N, C) token features (DynamicViT)
            plan = handle.method.reduce(layer, stream)
            handle.record_counts(layer, STREAM, stream)
            if min(stream.real_counts()) != stream.num_tokens:
                raise RuntimeError(f"{self.name} adapter: rows of an image batch were reduced to different lengths at layer {layer}")
            if plan.is_identity:
                return x
            if not batch_first:
                return plan.apply(x.transpose(0, 1), size).transpose(0, 1)  # (N, B, C) -> (N', B, C)
            return plan.apply(x, size)  # (B, N, C) -> (B, N', C)

        return reduce

    def _bias_setter(self, handle: Any, block: nn.Module, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            caller_mask = any(kwargs.get(k) is not None for k in ("attn_mask", "key_padding_mask"))
            if caller_mask or kwargs.get("is_causal") or len(args) > self.mask_args_from:
                raise RuntimeError(f"{self.name} adapter: layer {layer} got an attention mask from the caller; "
                                   "a mask over the input tokens cannot follow a token reduction")
            stream = handle.streams[STREAM]
            if stream.size is None:
                return None  # every size is 1: no mask, so fused attention keeps its fastest kernel
            bias = stream_bias(handle, stream, _compute_dtype(args[0]))  # (B, 1, 1, N), no padding here
            layer_bias = handle.state.layer(layer)
            if layer_bias.get("bias_of") is not bias:
                layer_bias["bias_of"], layer_bias["attn_mask"] = bias, self.shape_bias(bias, block)
            return args, {**kwargs, "attn_mask": layer_bias["attn_mask"]}

        return hook


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention computes in (autocast's, if on), which SDPA wants for a float mask."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


# -- timm ------------------------------------------------------------------------------------
# ADAPTERS entry "timm-vit" (declared in pumer_plug/catalog.py)
class TimmVitAdapter(VitAdapter):
    """Attaches a reduction method to a timm ``VisionTransformer`` (ViT, DeiT, DeiT-distilled, ...).

    Raises:
        AdapterError: the model is not a timm ViT, or a block is not a plain timm ``Block`` with a
            timm ``Attention`` (e.g. ``ResPostBlock``, parallel blocks), naming the module path.
        ValueError: gradient checkpointing is on.
    """

    name = "timm-vit"
    mask_args_from = 1  # Attention(x, attn_mask, is_causal)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, TimmVisionTransformer)

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, TimmVisionTransformer):
            raise AdapterError(f"timm-vit adapter: expected a timm VisionTransformer, got {type(model).__name__}")
        if model.grad_checkpointing:
            raise ValueError("timm-vit adapter: gradient checkpointing recomputes blocks and would reduce twice; disable it first")
        self.model = model
        self.blocks = list(get_submodule(model, "blocks", nn.Sequential, "timm-vit"))
        if not self.blocks:
            raise AdapterError("timm-vit adapter: expected at least one block at 'blocks', found none")
        for i, block in enumerate(self.blocks):
            check_forward(block, TimmBlock, f"blocks.{i}", "timm-vit")
            attn = get_submodule(model, f"blocks.{i}.attn", TimmAttention, "timm-vit")
            check_forward(attn, TimmAttention, f"blocks.{i}.attn", "timm-vit")
            get_submodule(model, f"blocks.{i}.attn.k_norm", nn.Module, "timm-vit")
        self.num_layers = len(self.blocks)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.hidden_size = int(model.embed_dim)

    def checkpointing(self) -> bool:
        return bool(self.model.grad_checkpointing)

    def patch_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.patch_size)

    def accept_image_size(self, handle: Any) -> None:
        """Lets the model take other image sizes (SmRes) through timm's own ``dynamic_img_size``
        path: ``pos_embed`` resampled to the input's patch grid at every forward."""
        model, embed = self.model, self.model.patch_embed
        if model.dynamic_img_size:
            return
        if not isinstance(embed, PatchEmbed) or not embed.flatten:
            raise AdapterError(f"timm-vit adapter: expected a flattening timm PatchEmbed at 'patch_embed', found {type(embed).__name__}")
        handle.override_attribute(model, "dynamic_img_size", True)
        handle.override_attribute(embed, "strict_img_size", False)
        handle.override_attribute(embed, "flatten", False)
        handle.override_attribute(embed, "output_fmt", Format.NHWC)

    def catch_keys(self, handle: Any, block: nn.Module) -> None:
        handle.add_forward_hook(block.attn.k_norm, keys_catcher(handle, STREAM))  # (B, H, N, D): ToMe's k.mean(1)

    @staticmethod
    def wrap_forward(block: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        """timm 1.0 ``Block.forward`` with ToMe's merge between attention and MLP."""

        def forward(x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
            x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
            x = reduce(x)  # differs from timm: ToMe Sec. 3 merges here, (B, N, C) -> (B, N - r, C)
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
            return x

        return forward


def check_forward(module: nn.Module, upstream: type, path: str, owner: str) -> None:
    """Raises AdapterError unless ``module`` runs ``upstream.forward`` (the code this adapter mirrors)."""
    if not isinstance(module, upstream) or type(module).forward is not upstream.forward or "forward" in vars(module):
        raise AdapterError(f"{owner} adapter: expected a {upstream.__module__}.{upstream.__name__} at '{path}' "
                           f"running its own forward, found {type(module).__name__}")
