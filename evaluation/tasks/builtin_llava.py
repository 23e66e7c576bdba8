"""The built-in decoder VLM: a small LLaVA trained from scratch on the digits VQA task, cached on disk.

``pumer-plug compare --task builtin-llava`` needs a trained decoder VLM without downloads. This
module defines it (:func:`builtin_llava_config`), trains it on this machine's CPU in a few minutes
(recipe in :mod:`~pumer_plug.evaluation.tasks.builtin_llava_training`) and keeps it in a cache that
is validated before every use and written atomically, like the built-in ViLT.

Model: ``LlavaForConditionalGeneration`` with transformers' classes only: a CLIP vision tower
(2 layers, C = 128, 16 px patches on the one-channel 192 px canvas: 144 image tokens, CLS
dropped), LLaVA's two-layer projector and a Llama decoder (6 layers, C = 128, 4 heads, RoPE) over
a word-level vocabulary. Prompts are ``<s> <image> x 144 question`` (<= 15 text tokens); the
answer is generated greedily as one word, then ``</s>``.

Example:
    >>> model, tokenizer = load_builtin_llava()  # trains on first use, then loads from the cache
    >>> generate_answers(model, tokenizer, DigitsVQA("test", 8, seed=0).examples)
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from .builtin import _quiet_transformers, _sha256, build_atomically, builtin_model_dir, library_versions, sincos_2d
from .builtin_llava_data import (SPECIAL, build_llava_tokenizer, collate_llava, normalize_answer, num_image_tokens,
                                 token_ids)
from .builtin_llava_training import LLAVA_CURRICULUM, curriculum_data, fit_llava
from .builtin_training import Stage
from .digits import CANVAS_PX, PATCH_PX, DigitsVQA, Example, majority_answer_accuracy, question_prior_accuracy

LLAVA_NAME = "builtin-llava-digits-vqa"
METADATA_FILE = "builtin.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 4  # 2: tower C = 128, longer curriculum (60.8% -> 75.8%); 3: "row r column c" place targets (77.0%);
# 4: small canvases trained at the task canvas's decoder positions (95.6%)
DEFAULT_BATCH_SIZE = 64
NUM_VAL_EXAMPLES = 1000
NUM_TEST_EXAMPLES = 1000
_CHECKED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                   "image_size", "patch_size", "num_channels")


def builtin_llava_config(vocab_size: int | None = None, hidden_size: int = 128, num_layers: int = 6,
                         vision_hidden: int = 128, vision_layers: int = 2, num_heads: int = 4,
                         mlp_ratio: int = 4) -> LlavaConfig:
    """The ``LlavaConfig`` of the built-in model (sdpa attention, weights init at std ``1 / sqrt(C)``).

    The tower is narrower than the decoder (as CLIP-L's 24 layers are small beside a 7B decoder's
    prefill), so that the decoder layers after the reduction point hold most prefill FLOPs.
    """
    tokenizer = build_llava_tokenizer()
    ids = token_ids(tokenizer)
    vocab_size = vocab_size or tokenizer.get_vocab_size()
    std = hidden_size**-0.5
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=mlp_ratio * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=max(1, vision_hidden // 32),
                              image_size=CANVAS_PX, patch_size=PATCH_PX, num_channels=1, projection_dim=vision_hidden,
                              initializer_range=vision_hidden**-0.5, initializer_factor=1.0)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=mlp_ratio * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                       max_position_embeddings=256, pad_token_id=ids["pad"], bos_token_id=ids["bos"],
                       eos_token_id=ids["eos"], initializer_range=std, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids["image"],
                         image_seq_length=num_image_tokens(CANVAS_PX), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", pad_token_id=ids["pad"],
                         projector_hidden_act="gelu", tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return config


def build_builtin_llava(seed: int = 0, **config_kwargs) -> LlavaForConditionalGeneration:
    """A randomly initialised built-in LLaVA (seeded), tower positions from ``sincos_2d``."""
    torch.manual_seed(seed)
    config = builtin_llava_config(**config_kwargs)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.bos_token_id = config.text_config.bos_token_id
    table = model.model.vision_tower.embeddings.position_embedding.weight  # (1 + V, C); 0: CLS
    with torch.no_grad():
        table[1:] = sincos_2d(CANVAS_PX // PATCH_PX, config.vision_config.hidden_size)
    return model.eval()


def generate_answers(model: nn.Module, tokenizer: Tokenizer, inputs: dict[str, torch.Tensor],
                     max_new_tokens: int = 2) -> list[str]:
    """Greedy answers (normalised words) of a prompt batch, under inference mode.

    ``<pad>``, ``<unk>``, ``<s>`` and ``<image>`` are never generated (an untrained model could
    emit ``<image>``, which a decode step must not hold).
    """
    was_training = model.training
    model.eval()
    ids = token_ids(tokenizer)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             suppress_tokens=[ids["pad"], ids["unk"], ids["bos"], ids["image"]])
    model.train(was_training)
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    return [normalize_answer(tokenizer.decode(row, skip_special_tokens=True)) for row in new]


def evaluate_llava(model: nn.Module, tokenizer: Tokenizer, data: DigitsVQA, batch_size: int = 64) -> dict[str, float]:
    """Exact-match accuracy of the generated answers, overall and per question type."""
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(data), batch_size):
        indices = list(range(start, min(start + batch_size, len(data))))
        chosen = [data.examples[i] for i in indices]
        inputs, answers = collate_llava(chosen, tokenizer, data.noise_std, [data._noise_base + i for i in indices])
        for e, got, want in zip(chosen, generate_answers(model, tokenizer, inputs), answers):
            hits.setdefault(e.question_type, []).append(got == want)
    every = [h for v in hits.values() for h in v]
    return {"accuracy": float(np.mean(every)) if every else 0.0,
            **{f"accuracy_{k}": float(np.mean(v)) for k, v in sorted(hits.items())}}


def train_builtin_llava(output_dir: str | Path, seed: int = 0, curriculum: tuple[Stage, ...] = LLAVA_CURRICULUM,
                        batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
                        num_val_examples: int = NUM_VAL_EXAMPLES, learning_rate: float = 2e-3,
                        **config_kwargs) -> dict:
    """Trains the built-in LLaVA from scratch into ``output_dir``; returns its metadata.

    Writes the model (``save_pretrained``: config, ``generation_config.json``, safetensors), the
    tokenizer (``tokenizer.json``, loadable by ``PreTrainedTokenizerFast``) and ``builtin.json``
    (seed, curriculum, val accuracy overall and per question type, baselines, timings, versions,
    weights checksum). ``output_dir`` is written in place; :func:`load_builtin_llava` makes it atomic.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_llava_tokenizer()
    model = build_builtin_llava(seed, **config_kwargs)
    stages = curriculum_data(curriculum, batch_size, seed)
    start_s = time.perf_counter()
    history = fit_llava(model, stages, tokenizer, batch_size, learning_rate=learning_rate, progress=progress)
    train_seconds = time.perf_counter() - start_s
    val = DigitsVQA("val", num_val_examples, seed)
    scores = evaluate_llava(model, tokenizer, val)
    with _quiet_transformers():
        model.save_pretrained(output_dir, safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=SPECIAL[2], eos_token=SPECIAL[3], pad_token=SPECIAL[0],
                            unk_token=SPECIAL[1], padding_side="left").save_pretrained(output_dir)
    train = stages[-1][0]
    metadata = {
        "format_version": FORMAT_VERSION, "name": LLAVA_NAME, "seed": seed,
        "curriculum": [dataclasses.asdict(stage) for stage in curriculum], "steps": len(history),
        "batch_size": batch_size, "learning_rate": learning_rate,
        "num_train_examples": sum(len(data) for data, _ in stages), "num_val_examples": len(val),
        "val_accuracy": scores["accuracy"],
        "val_accuracy_by_question_type": {k[len("accuracy_"):]: v for k, v in scores.items() if k != "accuracy"},
        "val_majority_accuracy": majority_answer_accuracy(val, train),
        "val_question_prior_accuracy": question_prior_accuracy(val, train),
        "final_train_losses": {k: float(np.mean([h[k] for h in history[-20:]])) for k in history[-1]},
        "train_seconds": train_seconds, "num_parameters": sum(p.numel() for p in model.parameters()),
        "config_kwargs": config_kwargs, "library_versions": library_versions(),
        "load_average_1min": os.getloadavg()[0], "weights_sha256": _sha256(output_dir / WEIGHTS_FILE),
    }
    (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return metadata


def builtin_llava_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the built-in LLaVA is cached: ``<root>/builtin-llava-digits-vqa`` (root as for the ViLT)."""
    return builtin_model_dir(cache_dir).parent / LLAVA_NAME


def _load_checked(model_dir: Path) -> tuple[LlavaForConditionalGeneration, Tokenizer]:
    """Loads a cached model after checking metadata, checksum, config, tokenizer and weight names.

    Raises:
        ValueError, OSError: with a one-line reason when anything is missing or does not match.
    """
    metadata = json.loads((model_dir / METADATA_FILE).read_text())
    if metadata.get("format_version") != FORMAT_VERSION or metadata.get("config_kwargs"):
        raise ValueError(f"metadata is not a default format-{FORMAT_VERSION} built-in LLaVA")
    if _sha256(model_dir / WEIGHTS_FILE) != metadata.get("weights_sha256"):
        raise ValueError(f"{WEIGHTS_FILE} does not match its recorded checksum")
    found, expected = LlavaConfig.from_pretrained(model_dir), builtin_llava_config()
    wrong = [f"{part}.{k}" for part in ("vision_config", "text_config") for k in _CHECKED_FIELDS
             if getattr(getattr(found, part), k, None) != getattr(getattr(expected, part), k, None)]
    if wrong or found.image_token_id != expected.image_token_id:
        raise ValueError(f"config differs from builtin_llava_config() in {wrong or ['image_token_id']}")
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    if tokenizer.get_vocab() != build_llava_tokenizer().get_vocab():
        raise ValueError("tokenizer.json vocabulary differs from the task's")
    with _quiet_transformers():
        model, info = LlavaForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True,
                                                                    attn_implementation="sdpa")
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise ValueError(f"weights do not fit the model: {bad}")
    return model.eval(), tokenizer


def _train_into_cache(model_dir: Path, progress: bool, seed: int = 0) -> None:
    """Trains the built-in LLaVA into the cache folder atomically (:func:`builtin.build_atomically`)."""
    build_atomically(model_dir, lambda staging: train_builtin_llava(staging, seed=seed, progress=progress))


def load_builtin_llava(cache_dir: str | Path | None = None, retrain: bool = False, progress: bool = True,
                       seed: int = 0) -> tuple[LlavaForConditionalGeneration, Tokenizer]:
    """The built-in digits-VQA LLaVA (eval mode) and its tokenizer, trained on first use.

    The cache is used only if it passes every check (metadata, weights checksum, config,
    tokenizer, weight names); otherwise a one-line warning says why and the model is retrained.
    Training writes a temporary directory that replaces the cache only when complete.

    Args:
        cache_dir: root of the pumer-plug cache (see ``builtin.builtin_model_dir``).
        retrain: train even if a valid cache exists.
        progress: show a progress bar while training.
        seed: seed of a training run; the cache holds one model.
    """
    model_dir = builtin_llava_dir(cache_dir)
    if model_dir.exists() and not retrain:
        try:
            return _load_checked(model_dir)
        except Exception as error:  # any defect means: do not trust, rebuild
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            warnings.warn(f"pumer-plug: built-in LLaVA cache {model_dir} is unusable ({reason}); retraining",
                          stacklevel=2)
    if progress:
        print(f"pumer-plug: training the built-in LLaVA into {model_dir} (once; about 9 minutes on 2 idle CPU cores)",
              file=sys.stderr)
    _train_into_cache(model_dir, progress, seed)
    return _load_checked(model_dir)
