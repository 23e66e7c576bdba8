"""Tiny backbones built from configs (random init) and method configs for the test matrix.

Every adapter registers a ``TinyBackbone`` here and every method a config factory, so that
``test_lifecycle.py`` runs each method x adapter pair for free (timm's registry-driven tests).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from pumer_plug import PumerConfig


@dataclass
class TinyBackbone:
    """A tiny model of one backbone family and the inputs it takes.

    Attributes:
        adapter: the adapter name.
        build: returns the model in eval mode (seeded, random init).
        make_batch: returns padded model kwargs for a batch of 3 rows with mixed text lengths.
        split: turns that batch into one kwargs dict per row, padding removed.
        logits: picks the tensor to compare from the model's output.
        num_layers: reducible layers of the tiny model.
        modalities: which of "text"/"image" it carries (image-only ViTs have no text).
    """

    adapter: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[], dict]
    split: Callable[[dict], list[dict]]
    logits: Callable[[Any], torch.Tensor]
    num_layers: int
    modalities: tuple[str, ...] = ("text", "image")
    tags: dict = field(default_factory=dict)


BACKBONES: dict[str, TinyBackbone] = {}
# method name -> (reducing config factory(num_layers, modalities), zero-reduction config factory or None)
METHOD_CONFIGS: dict[str, tuple[Callable[[int, tuple], Any], Callable[[int, tuple], Any] | None]] = {}


def text_batch(batch_size: int = 3, max_len: int = 9, vocab: int = 90, lengths=(9, 6, 4), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch_size, max_len), generator=g)
    mask = (torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    return ids, mask


def split_text_rows(batch: dict, text_keys=("input_ids", "attention_mask", "token_type_ids")) -> list[dict]:
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        row = {}
        for k, v in batch.items():
            if not torch.is_tensor(v):
                row[k] = v
            elif k in text_keys:
                row[k] = v[i : i + 1, :n]
            else:
                row[k] = v[i : i + 1]
        rows.append(row)
    return rows


# -- ViLT -------------------------------------------------------------------------------------
def tiny_vilt_config(**overrides):
    from transformers import ViltConfig

    values = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                  image_size=64, patch_size=16, max_position_embeddings=40, num_labels=5, vocab_size=100)
    values.update(overrides)
    return ViltConfig(**values)


def build_vilt(cls_name: str = "ViltForQuestionAnswering", **overrides) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, cls_name)(tiny_vilt_config(**overrides)).eval()


def vilt_batch() -> dict:
    ids, mask = text_batch()
    g = torch.Generator().manual_seed(1)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(3, 3, 64, 96, generator=g)}


BACKBONES["vilt"] = TinyBackbone("vilt", build_vilt, vilt_batch, split_text_rows, lambda out: out.logits, num_layers=4)


def pumer_reducing(num_layers: int, modalities: tuple) -> PumerConfig:
    layers = (0, num_layers // 2) if num_layers > 2 else (0,)
    return PumerConfig(reduction_layers=layers, prune_ratio=0.2, image_merge_ratio=0.3, text_merge_ratio=0.2)


def pumer_zero(num_layers: int, modalities: tuple) -> PumerConfig:
    return PumerConfig(reduction_layers=(0,), prune_ratio=0.0, image_merge_ratio=0.0, text_merge_ratio=0.0)


METHOD_CONFIGS["pumer"] = (pumer_reducing, pumer_zero)


# -- BridgeTower ------------------------------------------------------------------------------
def tiny_bridgetower_config(**overrides):
    """3 cross-modal pairs over 4 + 4 unimodal layers, C = 64, 64x64 images in 16x16 patches (V = 17)."""
    from transformers import BridgeTowerConfig

    text = dict(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=40)
    vision = dict(hidden_size=64, num_hidden_layers=4, image_size=64, patch_size=16)  # 64 // 64 = 1 head (CLIP rule)
    values = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, text_config=text, vision_config=vision)
    values.update(overrides)
    return BridgeTowerConfig(**values)


def build_bridgetower(cls_name: str = "BridgeTowerForImageAndTextRetrieval", **overrides) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, cls_name)(tiny_bridgetower_config(**overrides)).eval()


def bridgetower_batch() -> dict:
    ids, mask = text_batch()
    g = torch.Generator().manual_seed(1)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(3, 3, 64, 64, generator=g)}


BACKBONES["bridgetower"] = TinyBackbone(
    "bridgetower", build_bridgetower, bridgetower_batch, split_text_rows, lambda out: out.logits, num_layers=3
)


# -- image-only ViTs (timm, open_clip) and ToMe ------------------------------------------------
def build_timm_vit(**overrides) -> nn.Module:
    """timm ViT: 32x32 images in 8x8 patches (N = 1 + 16), C = 32, 4 blocks of 4 heads."""
    from timm.models.vision_transformer import VisionTransformer

    values = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=5)
    values.update(overrides)
    torch.manual_seed(0)
    return VisionTransformer(**values).eval()


def build_open_clip_vit(**overrides) -> nn.Module:
    """open_clip visual tower: 32x32 images in 8x8 patches (N = 1 + 16), C = 32, 4 blocks of 4 heads."""
    from open_clip.transformer import VisionTransformer

    values = dict(image_size=32, patch_size=8, width=32, layers=4, heads=4, mlp_ratio=4.0, output_dim=16)
    values.update(overrides)
    torch.manual_seed(0)
    return VisionTransformer(**values).eval()


def image_batch(batch_size: int = 3, image_size: int = 32) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(batch_size, 3, image_size, image_size, generator=g)}


def split_image_rows(batch: dict) -> list[dict]:
    return [{"x": batch["x"][i : i + 1]} for i in range(batch["x"].shape[0])]


IMAGE_ONLY_METHODS = {"tome"}  # methods that need no text (PuMer's text-saliency score does)
for _name, _build in (("timm-vit", build_timm_vit), ("open-clip-vit", build_open_clip_vit)):
    BACKBONES[_name] = TinyBackbone(_name, _build, image_batch, split_image_rows, lambda out: out, num_layers=4,
                                    modalities=("image",), tags={"methods": IMAGE_ONLY_METHODS})


def tome_reducing(num_layers: int, modalities: tuple):
    from pumer_plug.baselines.tome import TomeConfig

    return TomeConfig(r=2)


def tome_zero(num_layers: int, modalities: tuple):
    from pumer_plug.baselines.tome import TomeConfig

    return TomeConfig(r=0)


METHOD_CONFIGS["tome"] = (tome_reducing, tome_zero)


# -- METER ------------------------------------------------------------------------------------
def tiny_meter_config(**overrides):
    """``MeterConfig.tiny()`` with 4 co-attention blocks (the meter-* presets reduce up to block 3);
    32x32 images in 8x8 patches (V = 1 + 16), C = 32."""
    import dataclasses

    from pumer_plug.models.meter import MeterConfig

    return dataclasses.replace(MeterConfig.tiny(), **{"num_top_layer": 4, **overrides})


def build_meter(task: str = "vqa", **overrides) -> nn.Module:
    from pumer_plug.models.meter import MeterModel

    torch.manual_seed(0)
    return MeterModel(tiny_meter_config(**overrides), task=task).eval()


def meter_batch(task: str = "vqa") -> dict:
    ids, mask = text_batch()
    ids = ids.masked_fill(mask == 0, 1)  # RoBERTa's pad_token_id
    g = torch.Generator().manual_seed(1)
    shape = (3, 2, 3, 32, 32) if task == "nlvr2" else (3, 3, 32, 32)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(*shape, generator=g)}


BACKBONES["meter"] = TinyBackbone("meter", build_meter, meter_batch, split_text_rows, lambda out: out, num_layers=4)


# -- DynamicViT ---------------------------------------------------------------------------------
def dynamicvit_reducing(num_layers: int, modalities: tuple):
    from pumer_plug.baselines.dynamicvit import DynamicViTConfig

    layers = (0, num_layers // 2) if num_layers > 2 else (0,)
    # rho = 0.5: on two-stream models the test sums both streams' counts against the longest
    # single dense sequence, and DynamicViT never shrinks text
    return DynamicViTConfig(reduction_layers=layers, keep_ratio=0.5)


def dynamicvit_zero(num_layers: int, modalities: tuple):
    from pumer_plug.baselines.dynamicvit import DynamicViTConfig

    return DynamicViTConfig(reduction_layers=(0,), keep_ratio=1.0)


METHOD_CONFIGS["dynamicvit"] = (dynamicvit_reducing, dynamicvit_zero)
IMAGE_ONLY_METHODS.add("dynamicvit")  # prunes the image segment; needs no text


# -- SmRes --------------------------------------------------------------------------------------
def smres_reducing(num_layers: int, modalities: tuple):
    from pumer_plug.baselines.smres import SmResConfig

    return SmResConfig(scale=0.5)


def smres_zero(num_layers: int, modalities: tuple):
    from pumer_plug.baselines.smres import SmResConfig

    return SmResConfig(scale=1.0)


METHOD_CONFIGS["smres"] = (smres_reducing, smres_zero)


# SmRes needs a backbone that takes smaller images (see baselines/smres.py): every adapter
# declares the ``image_size`` capability (METER's CLIP trunk interpolates its position table).
IMAGE_ONLY_METHODS.add("smres")


# -- decoder VLMs: the llava matrix (left-padded prompts, generation, last-token logits) is in
# tests/test_llava.py; methods that only decoders serve stay out of the encoder backbones' matrix.
from tests.llava_backbone import DECODER_ONLY_METHODS, LLAVA_METHOD_CONFIGS, build_llava, llava_batch, split_rows  # noqa: E402



class _AllMethodsBut(frozenset):
    """Every method except the listed ones (``in`` answers for method names)."""

    def __contains__(self, name: object) -> bool:
        return not frozenset.__contains__(self, name)


for _name in DECODER_ONLY_METHODS:
    METHOD_CONFIGS[_name] = LLAVA_METHOD_CONFIGS[_name]
BACKBONES["llava"] = TinyBackbone("llava", build_llava, llava_batch, split_rows, lambda out: out.logits[:, -1],
                                  num_layers=3, tags={"methods": frozenset()})
for _backbone in BACKBONES.values():
    _backbone.tags.setdefault("methods", _AllMethodsBut(DECODER_ONLY_METHODS))
