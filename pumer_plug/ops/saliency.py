"""Text-saliency (PuMer Eq. 1) from queries and keys, for models whose attention runs fused.

A fused kernel (``torch.nn.functional.scaled_dot_product_attention``) returns no probabilities.
PuMer Eq. (1) needs only the rows of real text queries, so they are recomputed from the hooked
query and key projections: ``softmax(q_text k^T / sqrt(d) + bias)``, normalised over the same keys
(and with the same additive bias) the model normalises over, then the text-to-image columns are
averaged over real text tokens. The cost is T x N per head, not N x N.
"""
from __future__ import annotations

import math

import torch

from pumer_plug.ops.reduce import text_saliency_per_head


def attention_rows(q: torch.Tensor, k: torch.Tensor, num_heads: int, bias: torch.Tensor | None = None,
                   scale: float | None = None) -> torch.Tensor:
    """Attention probabilities of the given query rows over all keys, computed in float32.

    Args:
        q: queries, heads concatenated along C.
        k: keys, heads concatenated along C.
        num_heads: H.
        bias: additive bias over the keys broadcastable to (B, H, Tq, Nk) (padding masked out,
            ``+ log(size)`` under proportional attention), as the model adds it; None for none.
        scale: logit scale, default ``1 / sqrt(C / H)``.

    Shapes:
        q (B, Tq, C), k (B, Nk, C), bias (B, 1, 1, Nk) -> (B, H, Tq, Nk) float32
    """
    with torch.no_grad():
        B, Tq, C = q.shape
        D = C // num_heads
        qh = q.float().view(B, Tq, num_heads, D).transpose(1, 2)  # (B, H, Tq, D)
        kh = k.float().view(B, k.shape[1], num_heads, D).transpose(1, 2)  # (B, H, Nk, D)
        logits = qh @ kh.transpose(-1, -2) * (1.0 / math.sqrt(D) if scale is None else scale)  # (B, H, Tq, Nk)
        if bias is not None:
            logits = logits + bias.float()
        return logits.softmax(dim=-1)


def text_saliency_from_qk(q_text: torch.Tensor, k: torch.Tensor, text_mask: torch.Tensor, num_heads: int,
                          image: slice, bias: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """PuMer Eq. (1) per head from text queries and the keys the model attends over.

    Args:
        q_text: the text queries (only the rows of the text segment).
        k: every key the model normalises over (a whole ``[text | image]`` stream, or the image
            stream of a cross-attention).
        text_mask: real text tokens of ``q_text``'s rows.
        image: the image columns among the keys (``slice(T, N)`` in one stream, ``slice(None)`` in
            a cross-attention).
        bias: the model's additive key bias (B, 1, 1, Nk), or None.

    Shapes:
        q_text (B, T, C), k (B, Nk, C), text_mask (B, T) -> (B, H, V) float32
    """
    probs = attention_rows(q_text, k, num_heads, bias, scale)  # (B, H, T, Nk)
    return text_saliency_per_head(probs[..., image], text_mask)  # PuMer Eq. (1) per head, (B, H, V)
