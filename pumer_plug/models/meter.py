"""METER (Dou et al., "An Empirical Study of Training End-to-End Vision-and-Language Transformers",
CVPR 2022): RoBERTa text encoder, CLIP ViT image encoder, co-attention fusion, task heads.

The module tree and parameter names follow the official ``meter/modules/meter_module.py``
(``METERTransformerSS``) so that ``state_dict()`` keys equal those of the released checkpoints,
e.g. ``text_transformer.embeddings.word_embeddings.weight``,
``vit_model.visual.transformer.resblocks.0.attn.in_proj_weight``,
``cross_modal_text_layers.0.crossattention.self.query.weight``, ``vqa_classifier.0.weight``.
``MeterModel.infer`` follows ``METERTransformerSS.infer`` step by step.

Fusion and hooks: layer i of both streams reads the outputs of layer i - 1 of both streams,
``x, y = text_layer(x, y, ...), image_layer(y, x, ...)`` with the *old* ``x`` fed to the image
layer. Every call passes all four arguments as keywords (see ``CrossLayer.forward``), and the
masks are handed in at every call, so a forward pre-hook can swap tokens or masks and a forward
hook can return fewer tokens, which the next layer of both streams then sees.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import RobertaConfig, RobertaModel

from pumer_plug.models.meter_layers import (
    ClipVisionTower,
    CrossLayer,
    ITMHead,
    Pooler,
    extend_attention_mask,
    interpolate_positional_embedding,
)

TASKS = ("vqa", "nlvr2", "snli", "itm")
HEAD_NAMES = {
    "vqa": ("vqa_classifier",),
    "nlvr2": ("nlvr2_classifier",),
    "snli": ("snli_classifier",),
    "itm": ("itm_score", "rank_output"),
}
# Persistent buffers of transformers 4.6 (METER's pin) that newer transformers no longer save.
LEGACY_BUFFER_KEYS = ("text_transformer.embeddings.position_ids", "text_transformer.embeddings.token_type_ids")
VISION_POS_KEY = "vit_model.visual.positional_embedding"


@dataclass
class MeterConfig:
    """Sizes of METER-CLIP16-RoBERTa; the defaults are the released base model (meter/config.py
    with ``clip16 text_roberta`` and a fine-tuning resolution of 384)."""

    # text encoder: roberta-base (METER loads it with RobertaModel.from_pretrained("roberta-base"))
    vocab_size: int = 50265
    text_hidden_size: int = 768  # input_text_embed_size
    text_num_layers: int = 12
    text_num_heads: int = 12
    text_intermediate_size: int = 3072
    text_max_position_embeddings: int = 514
    text_type_vocab_size: int = 1
    text_layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    max_text_len: int = 50  # tokenizer length of the fine-tuning configs (40 in pre-training); no parameter
    # image encoder: CLIP ViT-B/16
    image_size: int = 384
    patch_size: int = 16
    vision_width: int = 768  # input_image_embed_size
    vision_layers: int = 12  # CLIP's depth; METER's clip_model keeps vision_layers - 1 blocks
    vision_heads: int = 12
    clip_context_length: int = 77  # CLIP text leftovers kept in the checkpoints, unused
    clip_text_width: int = 512
    # co-attention fusion (BertCrossLayer built from a RobertaConfig: LayerNorm eps 1e-12, exact GELU)
    hidden_size: int = 768
    num_top_layer: int = 6
    num_heads: int = 12
    mlp_ratio: int = 4
    drop_rate: float = 0.1
    layer_norm_eps: float = 1e-12
    # attention kernel of the co-attention layers and the RoBERTa encoder, as transformers names it:
    # "sdpa" (fused F.scaled_dot_product_attention) or "eager" (probabilities computed, hookable)
    attn_implementation: str = "sdpa"
    # heads
    vqav2_label_size: int = 3129

    @property
    def num_vision_blocks(self) -> int:
        """Number of CLIP resblocks METER builds (clip_model.Transformer makes layers - 1)."""
        return self.vision_layers - 1

    @classmethod
    def tiny(cls) -> MeterConfig:
        """A ~170k-parameter METER for tests: 2 cross layers per stream, 2 blocks per encoder."""
        return cls(vocab_size=100, text_hidden_size=48, text_num_layers=2, text_num_heads=4, text_intermediate_size=96,
                   text_max_position_embeddings=40, max_text_len=16, image_size=32, patch_size=8, vision_width=40,
                   vision_layers=3, vision_heads=4, clip_context_length=8, clip_text_width=16, hidden_size=32,
                   num_top_layer=2, num_heads=4, drop_rate=0.1, vqav2_label_size=10)


@dataclass
class MeterOutput:
    """Task logits and fused features. For NLVR2 the features hold both passes stacked on the
    batch axis, image 1 first: text_feats (2B, T, C), image_feats (2B, V, C), cls_feats (2B, 2C)."""

    logits: torch.Tensor | None
    text_feats: torch.Tensor
    image_feats: torch.Tensor
    cls_feats: torch.Tensor
    rank_scores: torch.Tensor | None = None  # itm task: retrieval score rank_output(cls)[:, 0], (B,)


def _init_weights(module: nn.Module) -> None:
    """meter/modules/objectives.init_weights."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


def _mlp_head(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    layers = [nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_features)]
    return nn.Sequential(*layers)  # meter_module: vqa/nlvr2/snli_classifier, children 0, 1, 3


class MeterModel(nn.Module):
    """METER-CLIP-RoBERTa with one task head.

    Args:
        config: model sizes; ``MeterConfig()`` (the released base model) when None.
        task: "vqa" (``vqa_classifier``, 3129 answers), "nlvr2" (``nlvr2_classifier``; fusion run
            once per image with image token types 1 and 2, ``token_type_embeddings`` of 3 rows),
            "snli" (``snli_classifier``, 3 classes) or "itm" (``itm_score`` and ``rank_output``).

    Shapes:
        input_ids (B, T), attention_mask (B, T), pixel_values (B, 3, H, W) or (B, 2, 3, H, W) for
        NLVR2 -> logits (B, num_classes); V = 1 + (H / P) * (W / P) image tokens.

    Raises:
        ValueError: for an unknown task.

    Example:
        >>> model = MeterModel(MeterConfig.tiny(), task="vqa").eval()
        >>> ids = torch.randint(3, 100, (2, 6)); mask = torch.ones(2, 6, dtype=torch.long)
        >>> model(ids, mask, torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, config: MeterConfig | None = None, task: str = "vqa") -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown METER task {task!r}; expected one of {TASKS}")
        self.config = config = config or MeterConfig()
        self.task = task
        hs = config.hidden_size
        self.cross_modal_text_transform = nn.Linear(config.text_hidden_size, hs)
        self.cross_modal_image_transform = nn.Linear(config.vision_width, hs)
        self.token_type_embeddings = nn.Embedding(3 if task == "nlvr2" else 2, hs)
        self.vit_model = ClipVisionTower(config.image_size, config.patch_size, config.vision_width,
                                         config.num_vision_blocks, config.vision_heads,
                                         config.clip_context_length, config.clip_text_width)
        self.text_transformer = RobertaModel(self._roberta_config(config))

        def cross_layers() -> nn.ModuleList:
            return nn.ModuleList(CrossLayer(hs, config.num_heads, hs * config.mlp_ratio, config.drop_rate,
                                            config.layer_norm_eps, config.attn_implementation)
                                 for _ in range(config.num_top_layer))

        self.cross_modal_image_layers = cross_layers()
        self.cross_modal_text_layers = cross_layers()
        self.cross_modal_image_pooler = Pooler(hs)
        self.cross_modal_text_pooler = Pooler(hs)
        if task == "vqa":
            self.vqa_classifier = _mlp_head(hs * 2, hs * 2, config.vqav2_label_size)
        elif task == "nlvr2":
            self.nlvr2_classifier = _mlp_head(hs * 4, hs * 2, 2)
        elif task == "snli":
            self.snli_classifier = _mlp_head(hs * 2, hs * 2, 3)
        else:
            self.itm_score = ITMHead(hs * 2)
            # Upstream declares nn.Linear(hs, 1) and then overwrites its weight with
            # itm_score.fc.weight[1:], so the checkpoints hold a (1, 2 * hs) weight.
            self.rank_output = nn.Linear(hs * 2, 1)
        for name in ("cross_modal_text_transform", "cross_modal_image_transform", "token_type_embeddings",
                     "cross_modal_image_layers", "cross_modal_text_layers", "cross_modal_image_pooler",
                     "cross_modal_text_pooler", *HEAD_NAMES[task]):
            getattr(self, name).apply(_init_weights)
        with torch.no_grad():
            if task == "nlvr2":  # the third token type starts as a copy of the image type
                self.token_type_embeddings.weight[2] = self.token_type_embeddings.weight[1]
            if task == "itm":
                self.rank_output.weight.copy_(self.itm_score.fc.weight[1:])
                self.rank_output.bias.copy_(self.itm_score.fc.bias[1:])

    @staticmethod
    def _roberta_config(config: MeterConfig) -> RobertaConfig:
        return RobertaConfig(
            vocab_size=config.vocab_size, hidden_size=config.text_hidden_size,
            num_hidden_layers=config.text_num_layers, num_attention_heads=config.text_num_heads,
            intermediate_size=config.text_intermediate_size,
            max_position_embeddings=config.text_max_position_embeddings,
            type_vocab_size=config.text_type_vocab_size, layer_norm_eps=config.text_layer_norm_eps,
            pad_token_id=config.pad_token_id, bos_token_id=0, eos_token_id=2,
            hidden_dropout_prob=config.drop_rate, attention_probs_dropout_prob=config.drop_rate,
            attn_implementation=config.attn_implementation,
        )

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Returns RoBERTa's last hidden states, run layer by layer as METER does. (B, T) -> (B, T, C_text)."""
        x = self.text_transformer.embeddings(input_ids=input_ids)  # (B, T, C_text)
        mask = extend_attention_mask(attention_mask, x.dtype)  # (B, 1, 1, T)
        for layer in self.text_transformer.encoder.layer:
            out = layer(x, mask)
            x = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
        return x

    def infer(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_token_type_idx: int | torch.Tensor = 1,
        image_attention_mask: torch.Tensor | None = None,
    ) -> MeterOutput:
        """Returns the fused features of one image per text (meter_module.infer), ``logits`` None.

        Args:
            input_ids: (B, T) token ids, padded with ``pad_token_id``.
            attention_mask: (B, T), 1 for real tokens, 0 for padding.
            pixel_values: (B, 3, H, W), CLIP-normalized.
            image_token_type_idx: token type of the image tokens, an int or a (B,) tensor.
            image_attention_mask: (B, V) 0/1 mask over image tokens; all ones (METER) when None.
        """
        text = self.cross_modal_text_transform(self.encode_text(input_ids, attention_mask))  # (B, T, C)
        image = self.cross_modal_image_transform(self.vit_model(pixel_values))  # (B, V, C)
        if image_attention_mask is None:
            image_attention_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        text_mask = extend_attention_mask(attention_mask, text.dtype)  # (B, 1, 1, T)
        image_mask = extend_attention_mask(image_attention_mask, image.dtype)  # (B, 1, 1, V)
        image_types = torch.as_tensor(image_token_type_idx, device=image.device).long()
        if image_types.dim() == 1:
            image_types = image_types[:, None]  # (B, 1)
        image_types = image_types.expand(image.shape[:2])  # (B, V)
        x = text + self.token_type_embeddings(torch.zeros_like(attention_mask, dtype=torch.long))
        y = image + self.token_type_embeddings(image_types)
        for text_layer, image_layer in zip(self.cross_modal_text_layers, self.cross_modal_image_layers):
            x1 = text_layer(hidden_states=x, encoder_hidden_states=y,
                            attention_mask=text_mask, encoder_attention_mask=image_mask)
            y1 = image_layer(hidden_states=y, encoder_hidden_states=x,
                             attention_mask=image_mask, encoder_attention_mask=text_mask)
            x, y = x1, y1
        cls_feats = torch.cat([self.cross_modal_text_pooler(x), self.cross_modal_image_pooler(y)], dim=-1)
        return MeterOutput(logits=None, text_feats=x, image_feats=y, cls_feats=cls_feats)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_attention_mask: torch.Tensor | None = None,
        return_features: bool = False,
    ) -> torch.Tensor | MeterOutput:
        """Returns the task logits (B, num_classes), or a ``MeterOutput`` if ``return_features``.

        NLVR2 takes pixel_values (B, 2, 3, H, W) (and image_attention_mask (B, 2, V) if given) and
        runs both images in one fused batch of 2B, which equals the two ``infer`` calls of
        objectives.compute_nlvr2 (every sample is independent); each layer is called once.

        Raises:
            ValueError: if pixel_values does not have the shape the task needs.
        """
        want = 5 if self.task == "nlvr2" else 4
        if pixel_values.dim() != want or (want == 5 and pixel_values.shape[1] != 2):
            raise ValueError(f"task {self.task!r} expects pixel_values of {want} dims"
                             f"{' (B, 2, 3, H, W)' if want == 5 else ' (B, 3, H, W)'}, got {tuple(pixel_values.shape)}")
        if self.task != "nlvr2":
            out = self.infer(input_ids, attention_mask, pixel_values, 1, image_attention_mask)
            head = self.itm_score if self.task == "itm" else getattr(self, HEAD_NAMES[self.task][0])
            out.logits = head(out.cls_feats)
            if self.task == "itm":
                out.rank_scores = self.rank_output(out.cls_feats)[:, 0]
            return out if return_features else out.logits
        b = input_ids.shape[0]
        types = torch.tensor([1, 2], device=input_ids.device).repeat_interleave(b)  # (2B,)
        images = pixel_values.transpose(0, 1).flatten(0, 1)  # (2B, 3, H, W), image 1 first
        image_mask = None if image_attention_mask is None else image_attention_mask.transpose(0, 1).flatten(0, 1)
        out = self.infer(input_ids.repeat(2, 1), attention_mask.repeat(2, 1), images, types, image_mask)
        out.logits = self.nlvr2_classifier(torch.cat([out.cls_feats[:b], out.cls_feats[b:]], dim=-1))  # (B, 2)
        return out if return_features else out.logits


# ------------------------------------------------------------------------------------ checkpoints


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path, device="cpu"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # a global outside the weights_only allowlist
        raise ValueError(
            f"cannot read {path} with torch.load(weights_only=True): {err}\n"
            "If you trust the file, extract its weights once, e.g. "
            "torch.save(torch.load(path, weights_only=False)['state_dict'], 'meter.pt')") from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # PyTorch Lightning checkpoint
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds neither a state_dict nor a Lightning checkpoint with one")
    return dict(obj)


def adapt_meter_state_dict(state: Mapping[str, torch.Tensor], model: MeterModel) -> dict[str, torch.Tensor]:
    """Returns a copy of an official METER state_dict fitted to ``model``.

    * drops the buffers transformers 4.6 saved (``text_transformer.embeddings.position_ids``);
    * resizes ``vit_model.visual.positional_embedding`` to the model's image size by bicubic
      interpolation of the patch grid (METER's clip_model.adapt_position_encoding), e.g. the
      288-pixel checkpoints (18 x 18 + 1 rows) for a 384-pixel model (24 x 24 + 1 rows);
    * for NLVR2, grows a 2-row ``token_type_embeddings`` to 3 rows, row 2 a copy of row 1
      (meter_module: the NLVR2 head starts from the pre-trained image type);
    * for ITM/retrieval, derives a missing ``rank_output`` from ``itm_score.fc`` row 1 (meter_module).
    """
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k in LEGACY_BUFFER_KEYS and k not in own)}
    pos = state.get(VISION_POS_KEY)
    if pos is not None and pos.shape != own[VISION_POS_KEY].shape and pos.dim() == 2:
        grid = model.config.image_size // model.config.patch_size
        state[VISION_POS_KEY] = interpolate_positional_embedding(pos, grid)
    tte = state.get("token_type_embeddings.weight")
    if tte is not None and model.task == "nlvr2" and tte.shape[0] == 2:
        state["token_type_embeddings.weight"] = torch.cat([tte, tte[1:2]], dim=0)
    if model.task == "itm" and "rank_output.weight" not in state and "itm_score.fc.weight" in state:
        state["rank_output.weight"] = state["itm_score.fc.weight"][1:].clone()
        state["rank_output.bias"] = state["itm_score.fc.bias"][1:].clone()
    return state


def _key_report(kind: str, keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
    return f"{len(keys)} {kind} key(s): {shown}"


def load_meter_checkpoint(
    model: MeterModel, path: str | os.PathLike, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Loads an official METER checkpoint into ``model`` and returns (missing, unexpected) keys.

    Reads a Lightning ``.ckpt`` (weights under ``"state_dict"``), a plain state_dict saved with
    ``torch.save`` or a ``.safetensors`` file, always with ``weights_only=True``, then adapts it
    with ``adapt_meter_state_dict`` (image-size change, NLVR2 token types, legacy buffers).

    Raises:
        ValueError: if a tensor's shape differs from the model's, or, with ``strict``, if keys
            are missing or unexpected; the message gives the count and the first keys of each.
            Also if the file cannot be read with ``weights_only=True``.

    Example:
        >>> model = MeterModel(MeterConfig(image_size=576), task="vqa")
        >>> load_meter_checkpoint(model, "meter_clip16_288_roberta_vqa.ckpt")  # doctest: +SKIP
    """
    state = adapt_meter_state_dict(_read_state_dict(path), model)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                    if k in own and v.shape != own[k].shape)
    problems = [_key_report("mismatched-shape", shapes)] if shapes else []
    if strict:
        problems += [_key_report(kind, keys) for kind, keys in (("missing", missing), ("unexpected", unexpected))
                     if keys]
    if problems:
        raise ValueError(f"cannot load {os.fspath(path)} into MeterModel(task={model.task!r}): " + "; ".join(problems))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing, unexpected


def save_meter_checkpoint(model: MeterModel, path: str | os.PathLike) -> None:
    """Saves ``model.state_dict()`` to ``path``: safetensors for ``.safetensors``, else a
    Lightning-style ``{"state_dict": ...}`` for ``.ckpt`` and a plain state_dict otherwise."""
    path = os.fspath(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, path, metadata={"task": model.task, "config": repr(dataclasses.asdict(model.config))})
    else:
        torch.save({"state_dict": state} if path.endswith(".ckpt") else state, path)
