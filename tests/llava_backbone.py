"""A tiny random-init LLaVA (CLIP tower, Llama decoder) and left-padded prompts for its tests."""
from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 3
PAD = 0
VOCAB = 64


def tiny_llava_config(num_layers: int = 4, image_size: int = 32, patch_size: int = 4, attn: str = "sdpa") -> LlavaConfig:
    """CLIP 32x32 images in 4x4 patches (V = 64 image tokens), Llama with C = 64, 4 heads (2 KV heads)."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD,
                       bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         image_seq_length=(image_size // patch_size) ** 2, vision_feature_layer=-1, pad_token_id=PAD)
    config._attn_implementation = attn
    return config


def build_llava(num_layers: int = 4, attn: str = "sdpa", seed: int = 0, **overrides) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(num_layers, attn=attn, **overrides))
    model.set_attn_implementation(attn)
    return model.eval()


def prompt(prefix: list[int], num_image: int, suffix: list[int]) -> list[int]:
    return [1, *prefix, *([IMAGE_TOKEN] * num_image), *suffix]


def llava_batch(rows=((5, 6), (7,)), suffixes=((8, 9, 10, 11), (12, 13)), num_image: int = 64, seed: int = 0) -> dict:
    """Left-padded prompts ``[pad | bos, text | image | text]`` and one 32x32 image per row."""
    ids = [prompt(list(p), num_image, list(s)) for p, s in zip(rows, suffixes)]
    n = max(len(r) for r in ids)
    input_ids = torch.tensor([[PAD] * (n - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in ids])
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(ids), 3, 32, 32, generator=g)
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels}


def split_rows(batch: dict) -> list[dict]:
    """One unpadded batch of one row per prompt."""
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][i].bool()
        rows.append({"input_ids": batch["input_ids"][i][keep][None], "attention_mask": batch["attention_mask"][i][keep][None],
                     "pixel_values": batch["pixel_values"][i : i + 1]})
    return rows


# -- method configs on the tiny LLaVA: method -> (reducing, zero-reduction), each (num_layers, modalities) -> config
def _pumer(prune: float, merge: float):
    from pumer_plug import PumerConfig

    return lambda num_layers, modalities: PumerConfig(reduction_layers=(1, 2), prune_ratio=prune, image_merge_ratio=merge,
                                                      text_merge_ratio=0.0)


def _keep(method: str, **values):
    def make(num_layers: int, modalities: tuple):
        from pumer_plug.registry import METHODS

        return METHODS.get(method).config_class(**values)

    return make


#: every method that runs on the llava adapter
LLAVA_METHOD_CONFIGS = {
    "pumer": (_pumer(0.4, 0.2), _pumer(0.0, 0.0)),
    "fastv": (_keep("fastv", layer=2, keep_tokens=24), _keep("fastv", layer=2, prune_ratio=0.0)),
    "random": (_keep("random", layer=2, prune_ratio=0.5, seed=3), _keep("random", layer=2, prune_ratio=0.0)),
    "pool": (_keep("pool", stride=2), _keep("pool", stride=1)),
}
#: the methods that only decoders can serve
DECODER_ONLY_METHODS = frozenset({"fastv", "random", "pool"})
