"""LLaVA (transformers ``LlavaForConditionalGeneration`` / ``LlavaModel``, Llama-style decoder).

A prompt row is ``[left padding | text | image (V) | text]``; the image run is found per row from
``input_ids == config.image_token_id`` (any offset, one image per sample). Only image tokens are
reduced; the text after the image gives the saliency queries. Two placements:

- ``decoder-layer`` (PuMer, FastV, random): reduction point ``i`` lies *between* decoder layers
  ``i`` and ``i + 1``. A Llama layer adds its residuals inline, so no hook reaches the point
  between its attention and MLP; the layer's output is reduced by a forward hook instead (FastV's
  placement: layers ``0..i`` see every token). Scores are recomputed from the captured
  ``q_proj``/``k_proj`` outputs of layer ``i`` and its RoPE (cos, sin): only the needed query rows
  against all keys, so the model keeps its attention kernel (sdpa) and eager gives the same scores.
  Every later layer gets the reduced ``position_embeddings``, ``position_ids`` and attention mask
  through a pre-hook: surviving tokens keep their RoPE positions; a merged token takes the
  position of its last constituent, and causality follows those positions.
- ``decoder-input`` (pool): the projected image tokens are reduced before the decoder; the prompt
  (``input_ids``, ``attention_mask``, ``position_ids``) loses the same number of image tokens.

Generation: tokens are reduced in the prefill only. Layers up to the first reduction point cache
every token, later layers the reduced ones; ``cache.get_seq_length()`` reads layer 0, so decode
positions continue from the unreduced length. At decode steps the pre-hooks gather the kept
columns of the 4-D mask for the reduced layers (transformers 5.x sizes it from layer 0's cache).
"""
from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from transformers import LlavaForConditionalGeneration, LlavaModel
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from pumer_plug.adapters.base import Adapter, AdapterError, TokenLayout, get_submodule
from pumer_plug.adapters.decoder_ops import reduce_mask, row_plan, scatter_image
from pumer_plug.ops.plan import ReductionPlan
from pumer_plug.method import KEYS, TEXT_SALIENCY
from pumer_plug.ops.reduce import text_saliency_per_head
from pumer_plug.placement import placement
from pumer_plug.stream import IMAGE, TEXT, Segment, TokenStream

STREAM = "llava"


@dataclass
class LlavaState:
    """One prompt's reduction, from its prefill through the decode steps that follow it.

    Shapes (current lengths: N tokens, V image tokens per row):
        starts (B,) first image token per row (never moves: only image tokens are reduced);
        orig_index (B, N) original prompt position of every token; real (B, N) bool;
        size (B, V, 1) image token sizes or None; q, k (B, N, H*D) captured projections.
    """

    starts: torch.Tensor
    starts_host: tuple[int, ...]
    num_image: int
    num_tokens: int
    input_tokens: int
    input_image: int  # V of the prompt as given (before any reduction)
    orig_index: torch.Tensor
    real: torch.Tensor
    in_prefill: bool = True
    size: torch.Tensor | None = None
    layer_kwargs: dict = field(default_factory=dict)  # current attention_mask, position_embeddings, position_ids
    reduced: bool = False
    stages: list = field(default_factory=list)  # (after layer, orig_index (B, N_stage)) per reduction
    captured: dict = field(default_factory=dict)  # "q", "k" of the reduction layer
    cache: Any = None  # weakref to the cache the prefill filled
    input_keep: torch.Tensor | None = None  # decoder-input: kept prompt columns (B, N')
    input_plan: ReductionPlan | None = None


def find_llava(model: nn.Module) -> LlavaModel | None:
    if isinstance(model, LlavaModel):
        return model
    inner = getattr(model, "model", None)
    return inner if isinstance(model, LlavaForConditionalGeneration) and isinstance(inner, LlavaModel) else None


# ADAPTERS entry "llava" (declared in pumer_plug/catalog.py)
class LlavaAdapter(Adapter):
    """Attaches a reduction method to a transformers LLaVA model (one image per sample).

    Raises:
        AdapterError: the model is not a LLaVA model or its decoder lacks an expected module.
        ValueError: gradient checkpointing is on, or the method cannot act on a decoder (names both).
    """

    name = "llava"
    capabilities = frozenset({KEYS, TEXT_SALIENCY})
    placements = frozenset({"decoder-layer", "decoder-input"})

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return find_llava(model) is not None

    def __init__(self, model: nn.Module) -> None:
        llava = find_llava(model)
        if llava is None:
            raise AdapterError(f"llava adapter: expected a LlavaForConditionalGeneration or LlavaModel, got {type(model).__name__}")
        lm = llava.language_model
        if getattr(lm, "gradient_checkpointing", False):
            raise ValueError("llava adapter: gradient checkpointing recomputes layers and would reduce twice; disable it first")
        self.model, self.llava = model, llava
        self.layers = list(get_submodule(lm, "layers", nn.ModuleList, "llava"))
        for i in range(len(self.layers)):
            for path in ("self_attn.q_proj", "self_attn.k_proj"):
                get_submodule(lm, f"layers.{i}.{path}", nn.Linear, "llava")
        get_submodule(llava, "multi_modal_projector", nn.Module, "llava")
        self.num_layers = len(self.layers) - 1  # reduction points between layers i and i + 1
        self.image_token_id = llava.config.image_token_id
        text = llava.config.text_config
        self.num_heads, self.num_kv_heads = text.num_attention_heads, text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self._handle: Any = None
        self.placement = "decoder-layer"
        self._check_attention(text)

    def token_layout(self, inputs: Any) -> TokenLayout | None:
        """The last prompt's image run as a square grid in raster order (LLaVA's CLIP patches without
        CLS). The plans this adapter reports under ``"llava"`` are over that run alone (B, V), and
        text is never reduced. None before a prompt with image tokens, or for a run that is not square."""
        st = self.state
        side = 0 if st is None else math.isqrt(st.input_image)
        if side == 0 or side * side != st.input_image:
            return None
        return TokenLayout(STREAM, 0, (side, side), image_prefix=0)

    @staticmethod
    def _check_attention(text_config: Any) -> None:
        """Raises ValueError unless the decoder runs sdpa or eager attention (4-D masks this adapter reduces)."""
        kind = text_config._attn_implementation
        if kind not in ("sdpa", "eager"):
            raise ValueError(f"llava adapter: the decoder runs {kind!r} attention; supported: 'sdpa' and 'eager' "
                             "(their 4-D masks are what the adapter reduces)")

    def check_method(self, method: Any) -> None:
        self.placement = placement(self, method)
        if method.proportional_attention():
            raise ValueError(f"llava adapter: proportional attention (method {method.name!r}) needs a log-size bias "
                             "inside the decoder's attention, which this adapter does not add; turn it off")
        if method.merges_text:
            raise ValueError(
                f"llava adapter: method {method.name!r} merges text tokens, which a decoder VLM cannot take "
                "(every prompt token is a cached, causally ordered position and the last one predicts the "
                "answer); set the text merge ratio to 0, e.g. PumerConfig.preset('llava-keep128')"
            )

    @property
    def state(self) -> LlavaState | None:
        """The prompt's state, kept in the handle's per-forward state (``handle.state.adapter``).

        A prefill starts a new forward state; decode steps on the cache it filled keep it, since
        they need what the prefill reduced (a decoder's "forward" is the whole prompt).
        """
        return None if self._handle is None else self._handle.state.adapter

    @state.setter
    def state(self, value: LlavaState | None) -> None:
        self._handle.state.adapter = value

    def attach(self, handle: Any) -> None:
        self._handle = handle
        handle.add_forward_pre_hook(self.model, lambda m, a, k: self._start(handle, a, k), with_kwargs=True)
        for i, layer in enumerate(self.layers):
            handle.add_forward_pre_hook(layer, self._layer_kwargs(i), with_kwargs=True)
        if self.placement == "decoder-input":
            return
        method = handle.method
        for i in handle.reduction_layers:
            attn = self.layers[i].self_attn
            if method.needs_text_saliency:
                handle.add_forward_hook(attn.q_proj, self._catcher("q"))
            if method.needs_text_saliency or method.needs_keys:
                handle.add_forward_hook(attn.k_proj, self._catcher("k"))
            handle.add_forward_hook(self.layers[i], self._reducer(handle, i), with_kwargs=True)

    # -- start of a forward ------------------------------------------------------------------
    def _start(self, handle: Any, args: tuple, kwargs: dict):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        state = self.state
        if input_ids is None:
            if kwargs.get("pixel_values") is not None:
                raise ValueError("llava adapter: pass input_ids (the image tokens are located by config.image_token_id)")
            handle.start_forward()
            return None
        is_image = input_ids == self.image_token_id  # (B, N)
        if cache is not None and cache.get_seq_length() > 0:  # not a prefill: the cache holds earlier tokens
            return self._continue(handle, state, cache, is_image, args, kwargs)
        has_image = bool(is_image.any())
        handle.start_forward()
        if not has_image:
            return None  # no image: the forward runs unreduced
        if kwargs.get("labels") is not None:
            raise ValueError("llava adapter: labels= in a reduced prefill: its logits cover the kept positions only "
                             "(fewer than input_ids), so they cannot be aligned with the labels; compute a loss "
                             "without the handle attached, or from the logits of the last position")
        self.state = self._new_state(handle, input_ids, is_image, kwargs)
        if self.placement == "decoder-input":
            return self._shrink_prompt(handle, args, kwargs, is_image)
        return None

    def _continue(self, handle: Any, state: LlavaState | None, cache: Any, is_image: torch.Tensor,
                  args: tuple, kwargs: dict):
        """A forward on a non-empty cache (a decode step), told apart from a prefill by the cache, as
        transformers' Llama does (``cache.get_seq_length()`` past tokens), never by its token ids: a
        decode step whose token is the image token id is still a decode step.

        Raises:
            ValueError: image tokens continue a cache this handle did not fill (they are reduced in a prefill only).
        """
        if state is not None and state.cache is not None and state.cache() is cache:
            state.in_prefill = False  # a decode step on the reduced cache
            return self._decode_inputs(args, kwargs)
        handle.start_forward()
        has_pixels = kwargs.get("pixel_values") is not None or (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None
        if has_pixels and bool(is_image.any()):
            raise ValueError(f"llava adapter: image tokens continue a cache of {cache.get_seq_length()} tokens that this "
                             "handle did not fill; images are reduced in a prefill (a forward on an empty cache)")
        return None  # a continuation of an unreduced cache runs unreduced

    def _new_state(self, handle: Any, input_ids: torch.Tensor, is_image: torch.Tensor, kwargs: dict) -> LlavaState:
        B, N = input_ids.shape
        pos = torch.arange(N, device=input_ids.device)
        first = torch.where(is_image, pos, N).amin(dim=1)
        last = torch.where(is_image, pos, -1).amax(dim=1)
        counts = is_image.sum(dim=1)
        mask = kwargs.get("attention_mask")
        real = torch.ones_like(is_image) if mask is None else mask.bool()
        after = (real & (pos >= last[:, None])).sum(dim=1) - 1  # real text tokens after the image
        first_h, last_h, counts_h, after_h = torch.stack([first, last, counts, after]).tolist()
        for b in range(B):
            if counts_h[b] == 0:
                raise ValueError(f"llava adapter: row {b} holds no image tokens; every row of a batch needs one image")
            if last_h[b] - first_h[b] + 1 != counts_h[b]:
                raise ValueError(
                    f"llava adapter: row {b} holds several image-token runs; one image per sample is supported"
                )
        if len(set(counts_h)) > 1:
            raise ValueError(f"llava adapter: rows hold different image-token counts {counts_h}; one image per sample is supported")
        pixels = kwargs.get("pixel_values")
        if pixels is not None and pixels.shape[0] != B:
            raise ValueError(f"llava adapter: {pixels.shape[0]} images for {B} prompts; one image per sample is supported")
        self._check_attention(self.llava.config.text_config)
        method = handle.method
        V = counts_h[0]
        method.check_image_tokens(V)
        if method.needs_text_saliency and method.saliency_queries == "text" and min(after_h) < 1:
            raise ValueError(f"llava adapter: method {method.name!r} scores image tokens by the text after the image; "
                             "a row has no text after its image")
        return LlavaState(first, tuple(first_h), V, N, N, V, pos.expand(B, N), real)

    # -- decoder-input placement (pool) -------------------------------------------------------
    def _shrink_prompt(self, handle: Any, args: tuple, kwargs: dict, is_image: torch.Tensor):
        st = self.state
        B, N = is_image.shape
        stream = _image_stream(B, st.num_image, is_image.device)
        plan = handle.method.reduce(0, stream)
        _check_uniform(plan, handle.method)
        handle.record_counts(0, STREAM, _count_stream(stream, N - st.num_image, B))
        kept = plan.num_out
        rel = torch.arange(N, device=is_image.device) - st.starts[:, None]  # (B, N)
        keep = ~(is_image & (rel >= kept))  # the first `kept` image slots take the pooled tokens
        cols = torch.arange(N, device=is_image.device).expand(B, N)[keep].view(B, -1)  # (B, N')
        st.input_keep, st.input_plan = cols, plan
        kwargs = dict(kwargs)
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None:
            input_ids, args = args[0], args[1:]
        kwargs["input_ids"] = input_ids.gather(1, cols)
        for name in ("attention_mask", "position_ids"):
            if kwargs.get(name) is not None and kwargs[name].dim() == 2:
                kwargs[name] = kwargs[name].expand(B, -1).gather(1, cols)
        kwargs["mm_encoder_outputs"] = {**(kwargs.get("mm_encoder_outputs") or {}), "image": self._pooled_features(kwargs, plan)}
        kwargs["pixel_values"] = None
        return args, kwargs

    def _pooled_features(self, kwargs: dict, plan: ReductionPlan) -> Any:
        """The projected image tokens with ``plan`` applied: encodes ``pixel_values`` unless the
        caller (e.g. ``generate``) passed them encoded in ``mm_encoder_outputs``."""
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None:
            encoded = self.llava.get_image_features(
                pixel_values=kwargs["pixel_values"], vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                image_sizes=kwargs.get("image_sizes"), return_dict=True)
        encoded = copy.copy(encoded)
        features = torch.stack(list(encoded.pooler_output))  # (B, V, C), one image per sample
        encoded.pooler_output = list(plan.apply(features))  # B x (V', C)
        return encoded

    def _decode_inputs(self, args: tuple, kwargs: dict):
        st = self.state
        mask = kwargs.get("attention_mask")
        if st.input_keep is None or mask is None or mask.dim() != 2:
            return None
        B, L = mask.shape
        new = torch.arange(st.input_tokens, L, device=mask.device).expand(B, -1)
        return args, {**kwargs, "attention_mask": mask.gather(1, torch.cat([st.input_keep, new], dim=1))}

    # -- decoder-layer placement ---------------------------------------------------------------
    def _layer_kwargs(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            st = self.state
            if st is None:
                return None
            if st.in_prefill:
                if st.cache is None and kwargs.get("cache") is not None:
                    st.cache = weakref.ref(kwargs["cache"])
                if not st.reduced:
                    st.layer_kwargs = {k: kwargs.get(k) for k in ("attention_mask", "position_embeddings", "position_ids")}
                    return None
                return args, {**kwargs, **st.layer_kwargs}
            return _decode_mask(st, index, args, kwargs)

        return hook

    def _catcher(self, name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if self.state is not None and self.state.in_prefill:
                self.state.captured[name] = out  # (B, N, H*D)

        return hook

    def _reducer(self, handle: Any, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any):
            st = self.state
            if st is None or not st.in_prefill:
                return None
            hidden = out[0] if isinstance(out, tuple) else out  # (B, N, C)
            B, N, _ = hidden.shape
            V, method = st.num_image, handle.method
            stream = _image_stream(B, V, hidden.device)
            stream.size = st.size
            image_index = st.starts[:, None] + torch.arange(V, device=hidden.device)  # (B, V)
            if "k" in st.captured and method.needs_keys:
                keys = st.captured["k"].gather(1, image_index[..., None].expand(-1, -1, st.captured["k"].shape[-1]))
                stream.set_keys(keys, self.num_kv_heads)  # (B, V, Hkv*D) -> (B, V, D)
            if method.needs_text_saliency:
                stream.saliency = self._saliency(module.self_attn, image_index, method.saliency_queries)
            st.captured.clear()
            plan = method.reduce(layer, stream)
            _check_uniform(plan, method)
            handle.record_counts(layer, STREAM, _count_stream(stream, N - V, B))
            full = row_plan(plan, st.starts, V, N)
            size = None if st.size is None else scatter_image(st.size, st.starts, N)
            reduced = full.apply(hidden, size)  # (B, N', C)
            self._advance(st, full, plan, stream, layer)
            return (reduced, *out[1:]) if isinstance(out, tuple) else reduced

        return hook

    def _saliency(self, attn: nn.Module, image_index: torch.Tensor, queries: str) -> torch.Tensor:
        """Attention of the query rows over the image keys, recomputed from q_proj/k_proj and RoPE.

        Shapes:
            captured q (B, N, H*D), k (B, N, Hkv*D) -> scores per head (B, H, V), PuMer Eq. (1) over the queries
        """
        st = self.state
        q, k = st.captured["q"], st.captured["k"]
        cos, sin = st.layer_kwargs["position_embeddings"]  # (B or 1, N, D)
        B, N, _ = q.shape
        D = self.head_dim
        with torch.no_grad():
            pos = torch.arange(N, device=q.device)
            if queries == "last":
                last = torch.where(st.real, pos, -1).amax(dim=1)  # (B,) the last prompt token
                q_index, q_mask = last[:, None], torch.ones(B, 1, dtype=torch.bool, device=q.device)
            else:
                T = N - min(s + st.num_image for s in st.starts_host)  # longest text run after an image
                q_index = (N - T + torch.arange(T, device=q.device)).expand(B, T)  # (B, T)
                q_mask = (q_index >= (st.starts[:, None] + st.num_image)) & st.real.gather(1, q_index)
            cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)
            gather = lambda x, idx: x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
            qh = gather(q, q_index).view(B, -1, self.num_heads, D).transpose(1, 2)  # (B, H, T, D)
            cq, sq = gather(cos, q_index)[:, None], gather(sin, q_index)[:, None]
            qh = qh * cq + rotate_half(qh) * sq
            kh = k.view(B, N, self.num_kv_heads, D).transpose(1, 2)  # (B, Hkv, N, D)
            kh = kh * cos[:, None] + rotate_half(kh) * sin[:, None]
            kh = repeat_kv(kh, self.num_heads // self.num_kv_heads)  # (B, H, N, D)
            logits = (qh.float() @ kh.float().transpose(-1, -2)) * attn.scaling  # (B, H, T, N)
            q_pos = st.orig_index.gather(1, q_index)  # causality follows the original positions
            allowed = st.real[:, None, None, :] & (st.orig_index[:, None, None, :] <= q_pos[:, None, :, None])
            probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            probs = probs.gather(-1, image_index[:, None, None, :].expand(-1, probs.shape[1], probs.shape[2], -1))
            return text_saliency_per_head(probs, q_mask)  # (B, H, T, V) -> (B, H, V), heads combined by the method

    def _advance(self, st: LlavaState, full: ReductionPlan, plan: ReductionPlan, stream: TokenStream, layer: int) -> None:
        """Moves the state to the reduced sequence: positions, RoPE, mask and sizes of the survivors."""
        B, N = full.dest.shape if full.dest is not None else (st.real.shape[0], st.num_tokens)
        pos = torch.arange(N, device=st.real.device).expand(B, N)
        if full.dest is None:
            rep = pos
        else:  # the last constituent of every output slot
            rep = torch.full((B, full.num_out + 1), -1, device=pos.device, dtype=torch.long)
            rep = rep.scatter_reduce(1, full.dest, pos, reduce="amax")[:, : full.num_out]  # (B, N')
        old_index = st.orig_index
        st.orig_index = old_index.gather(1, rep)
        st.real = st.real.gather(1, rep)
        kw = st.layer_kwargs
        cos, sin = kw["position_embeddings"]
        take = lambda x: x.expand(B, *x.shape[1:]).gather(1, rep.view(B, -1, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))  # noqa: E731
        kw["position_embeddings"] = (take(cos), take(sin))  # (B, N', D)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = take(kw["position_ids"])  # (B, N')
        kw["attention_mask"] = reduce_mask(kw.get("attention_mask"), rep, st.orig_index)
        st.size = stream.size
        st.num_image, st.num_tokens = plan.num_out, full.num_out
        st.reduced = True
        st.stages.append((layer, st.orig_index))


def _decode_mask(st: LlavaState, index: int, args: tuple, kwargs: dict):
    """At a decode step, gathers the mask columns that a reduced layer's cache holds."""
    stage = [idx for after, idx in st.stages if after < index]
    mask = kwargs.get("attention_mask")
    if not stage or mask is None or mask.dim() != 4:
        return None
    kept = stage[-1]  # (B, N_stage) original positions cached by this layer
    B = kept.shape[0]
    L = mask.shape[-1]
    new = torch.arange(st.input_tokens, L, device=mask.device).expand(B, -1)
    cols = torch.cat([kept, new], dim=1)  # (B, N_stage + t)
    mask = mask.expand(B, *mask.shape[1:])
    mask = mask.gather(3, cols[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
    return args, {**kwargs, "attention_mask": mask}


def _image_stream(B: int, V: int, device: torch.device) -> TokenStream:
    mask = torch.ones(B, V, dtype=torch.bool, device=device)
    return TokenStream(mask, torch.zeros_like(mask), [Segment(IMAGE, V, 0)], [(V,) * B])


def _count_stream(stream: TokenStream, num_text: int, B: int) -> TokenStream:
    """A stream of the same image count plus the prompt's text, for ``handle.record_counts``; it
    hands the plan observers (``pumer-plug show``) the image run's plan (B, V) and scores."""
    V = stream.count(IMAGE)
    mask = torch.ones(B, num_text + V, dtype=torch.bool, device=stream.mask.device)
    counts = TokenStream(mask, torch.zeros_like(mask), [Segment(TEXT, num_text, 0), Segment(IMAGE, V, 0)],
                         [(num_text,) * B, (V,) * B])
    counts.last_plan, counts.last_saliency = stream.last_plan, stream.last_saliency
    return counts


def _check_uniform(plan: ReductionPlan, method: Any) -> None:
    if plan.removed and len(set(plan.removed)) > 1:
        raise RuntimeError(f"llava adapter: method {method.name!r} removed {plan.removed} tokens per row; "
                           "rows with equal image tokens must lose equal numbers")
