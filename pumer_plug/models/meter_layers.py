"""Building blocks of METER (Dou et al., CVPR 2022) with the official module and parameter names.

Two groups, each named so that ``state_dict()`` keys equal those of the official checkpoints:

* the CLIP image tower of METER's ``meter/modules/clip_model.py`` (``ClipVisionTower`` = ``vit_model``):
  ``visual.conv1``, ``visual.class_embedding``, ``visual.positional_embedding``, ``visual.ln_pre``,
  ``visual.transformer.resblocks.N.{attn,ln_1,mlp.c_fc,mlp.c_proj,ln_2}``, ``visual.ln_post``, plus
  CLIP's unused text leftovers ``positional_embedding`` and ``ln_final``. METER builds one block
  fewer than CLIP has (``Transformer`` makes ``layers - 1`` resblocks) and has no ``visual.proj``.
* the co-attention layer of METER's ``meter/modules/bert_model.py`` (``CrossLayer`` =
  ``BertCrossLayer``): ``attention.self.{query,key,value}``, ``attention.output.{dense,LayerNorm}``,
  ``crossattention.self.*``, ``crossattention.output.*``, ``intermediate.dense``,
  ``output.{dense,LayerNorm}``.

Masks are additive, as in transformers 4.6 (which METER pinned): shape (B, 1, 1, Tk), 0.0 where a
key may be attended and -10000.0 where it may not (see ``extend_attention_mask``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MASKED_SCORE = -10000.0  # transformers 4.6 get_extended_attention_mask, used by METER


def extend_attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Returns the additive attention mask for a 0/1 key mask.

    Shapes:
        mask (B, Tk) with 1 = attend, 0 = padding -> (B, 1, 1, Tk) with 0.0 / -10000.0.
    """
    keep = mask[:, None, None, :].to(dtype)  # (B, 1, 1, Tk)
    return (1.0 - keep) * MASKED_SCORE


# ----------------------------------------------------------------------------------- CLIP image


class ClipLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (CLIP's fp16-safe LayerNorm); the affine
    parameters are cast to float32 too, so a model cast to fp16/bf16 runs on every device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """CLIP's activation x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ClipMlp(nn.Module):
    """CLIP block MLP with the official child names ``c_fc``, ``gelu``, ``c_proj``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, width * 4)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(width * 4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ClipResidualBlock(nn.Module):
    """Pre-norm CLIP block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); x is (B, N, C)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        # Sequence-first like CLIP. This also keeps out PyTorch's fused batch-first inference
        # kernel, which hides even the projections from FlopCounterMode; attention then runs
        # through F.multi_head_attention_forward (linear + SDPA).
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = ClipLayerNorm(width)
        self.mlp = ClipMlp(width)
        self.ln_2 = ClipLayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x).transpose(0, 1)  # (N, B, C)
        x = x + self.attn(h, h, h, need_weights=False)[0].transpose(0, 1)  # (B, N, C)
        return x + self.mlp(self.ln_2(x))


class ClipTransformer(nn.Module):
    """Stack of ``ClipResidualBlock`` under the official name ``resblocks``."""

    def __init__(self, width: int, num_blocks: int, heads: int) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.Sequential(*[ClipResidualBlock(width, heads) for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class ClipVisualTransformer(nn.Module):
    """CLIP ViT trunk as METER uses it: all tokens after ``ln_post``, no projection.

    Images of another size than the model's (e.g. the SmRes baseline) get the position table
    interpolated to their (H / P, W / P) patch grid, bicubic as METER's ``adapt_position_encoding``;
    at the model's size the table is used as stored.

    Shapes:
        pixel_values (B, 3, H, W) -> (B, 1 + (H / P) * (W / P), width); token 0 is the image CLS.
    """

    def __init__(self, image_size: int, patch_size: int, width: int, num_blocks: int, heads: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        grid = image_size // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = ClipLayerNorm(width)
        self.transformer = ClipTransformer(width, num_blocks, heads)
        self.ln_post = ClipLayerNorm(width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))  # (B, C, Gh, Gw)
        pos = interpolate_positional_embedding(self.positional_embedding, tuple(x.shape[-2:]))  # (V, C)
        x = x.flatten(2).transpose(1, 2)  # (B, V - 1, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)  # (B, V, C)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)


class ClipVisionTower(nn.Module):
    """METER's ``vit_model`` (clip_model.CLIP): the visual trunk plus CLIP's unused text leftovers.

    ``positional_embedding`` (context_length, text_width) and ``ln_final`` belong to CLIP's text
    tower; METER never uses them but they are in every official checkpoint, so they are kept.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        num_blocks: int,
        heads: int,
        context_length: int,
        text_width: int,
    ) -> None:
        super().__init__()
        self.visual = ClipVisualTransformer(image_size, patch_size, width, num_blocks, heads)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, text_width))
        self.ln_final = ClipLayerNorm(text_width)
        self._init_like_clip()

    def _init_like_clip(self) -> None:
        # clip_model.CLIP.initialize_parameters
        nn.init.normal_(self.positional_embedding, std=0.01)
        width = self.visual.transformer.width
        blocks = self.visual.transformer.resblocks
        proj_std = width**-0.5 * (2 * max(len(blocks), 1)) ** -0.5
        for block in blocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values)


def interpolate_positional_embedding(pos: torch.Tensor, grid: int | tuple[int, int]) -> torch.Tensor:
    """Returns CLIP's positional embedding resized to a ``grid`` x ``grid`` (or (h, w)) patch grid.

    Bicubic interpolation of the patch part; the CLS row is kept as is (METER's
    ``clip_model.adapt_position_encoding``). The stored grid returns ``pos`` itself.

    Shapes:
        pos (1 + G0 * G0, C) -> (1 + h * w, C)
    """
    h, w = (grid, grid) if isinstance(grid, int) else grid
    grid_before = int(round(math.sqrt(pos.shape[0] - 1)))
    if grid_before * grid_before + 1 != pos.shape[0]:
        raise ValueError(f"positional_embedding of {pos.shape[0]} rows is not 1 + a square grid")
    if (h, w) == (grid_before, grid_before):
        return pos
    channels = pos.shape[1]
    patches = pos[1:].float().reshape(grid_before, grid_before, channels).permute(2, 0, 1)  # (C, G0, G0)
    patches = F.interpolate(patches[None], size=(h, w), mode="bicubic")[0]  # (C, h, w)
    patches = patches.permute(1, 2, 0).reshape(h * w, channels).to(pos.dtype)  # (h * w, C)
    return torch.cat([pos[:1], patches], dim=0)


# ---------------------------------------------------------------------------- co-attention layer


ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


class CrossSelfAttention(nn.Module):
    """Multi-head attention scores and context (bert_model.BertSelfAttention, absolute positions).

    ``attn_implementation`` as transformers names it: ``"sdpa"`` (default) runs
    ``F.scaled_dot_product_attention`` (fused, no probabilities); ``"eager"`` computes the
    probabilities, which go through ``self.dropout`` before they weight the values, so a forward
    pre-hook on ``dropout`` sees them as its first argument, shape (B, H, Tq, Tk).
    """

    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float,
                 attn_implementation: str = "sdpa") -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of {num_heads} heads")
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
        self.attn_implementation = attn_implementation
        self.num_attention_heads = num_heads
        self.attention_head_size = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(attention_dropout)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_attention_heads, self.attention_head_size).transpose(1, 2)  # (B, H, N, C/H)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Returns the attention context (B, Tq, C).

        Keys and values come from ``context`` (B, Tk, C) when given (cross-attention), else from
        ``hidden_states`` (B, Tq, C). ``attention_mask`` is additive over the keys, (B, 1, 1, Tk).
        """
        source = hidden_states if context is None else context
        q = self._split_heads(self.query(hidden_states))  # (B, H, Tq, C/H)
        k = self._split_heads(self.key(source))  # (B, H, Tk, C/H)
        v = self._split_heads(self.value(source))  # (B, H, Tk, C/H)
        if self.attn_implementation == "sdpa":
            mask = None if attention_mask is None else attention_mask.to(q.dtype)  # (B, 1, 1, Tk) additive
            p = self.dropout.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, Tq, C/H)
            out = out.transpose(1, 2)  # (B, Tq, H, C/H)
            return out.reshape(out.shape[0], out.shape[1], -1)  # (B, Tq, C)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size)  # (B, H, Tq, Tk)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = self.dropout(scores.softmax(dim=-1))  # (B, H, Tq, Tk)
        out = (probs @ v).transpose(1, 2)  # (B, Tq, H, C/H)
        return out.reshape(out.shape[0], out.shape[1], -1)  # (B, Tq, C)


class CrossSelfOutput(nn.Module):
    """Post-norm residual: LayerNorm(dropout(dense(x)) + input) (BertSelfOutput / BertOutput)."""

    def __init__(self, in_features: int, hidden_size: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class CrossAttentionBlock(nn.Module):
    """Attention plus its residual output, children ``self`` and ``output`` (BertAttention)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, eps: float,
                 attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.self = CrossSelfAttention(hidden_size, num_heads, dropout, attn_implementation)
        self.output = CrossSelfOutput(hidden_size, hidden_size, dropout, eps)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.output(self.self(hidden_states, attention_mask, context), hidden_states)


class CrossIntermediate(nn.Module):
    """``dense`` then exact GELU (BertIntermediate with hidden_act="gelu")."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class CrossLayer(nn.Module):
    """One METER co-attention layer of one stream (bert_model.BertCrossLayer).

    Self-attention over the stream, cross-attention from the stream to the other stream, FFN;
    each sub-block post-norm with residual. ``MeterModel`` calls it with keywords only::

        layer(hidden_states=x, encoder_hidden_states=y,
              attention_mask=mask_x, encoder_attention_mask=mask_y)

    so a ``register_forward_pre_hook(..., with_kwargs=True)`` can rewrite any of the four.
    Under eager attention the probabilities pass through ``attention.self.dropout`` (self,
    (B, H, Tq, Tq)) and ``crossattention.self.dropout`` (cross, (B, H, Tq, Tk)).
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float, eps: float,
                 attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.attention = CrossAttentionBlock(hidden_size, num_heads, dropout, eps, attn_implementation)
        self.crossattention = CrossAttentionBlock(hidden_size, num_heads, dropout, eps, attn_implementation)
        self.intermediate = CrossIntermediate(hidden_size, intermediate_size)
        self.output = CrossSelfOutput(intermediate_size, hidden_size, dropout, eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns this stream's new hidden states (B, Tq, C).

        Args:
            hidden_states: this stream's tokens (B, Tq, C).
            encoder_hidden_states: the other stream's tokens (B, Tk, C), keys/values of the
                cross-attention.
            attention_mask: additive mask over this stream's tokens (B, 1, 1, Tq), used by the
                self-attention.
            encoder_attention_mask: additive mask over the other stream's tokens (B, 1, 1, Tk),
                used by the cross-attention.

        Unlike upstream, which returns a 1-tuple, the tensor itself is returned.
        """
        x = self.attention(hidden_states, attention_mask)
        x = self.crossattention(x, encoder_attention_mask, encoder_hidden_states)
        return self.output(self.intermediate(x), x)


class Pooler(nn.Module):
    """tanh(dense(token 0)) (heads.Pooler). Shapes: (B, N, C) -> (B, C)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class ITMHead(nn.Module):
    """Image-text matching logits, child ``fc`` (heads.ITMHead). Shapes: (B, 2C) -> (B, 2)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)
