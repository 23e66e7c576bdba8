"""The built-in model: a small ViLT trained from scratch on the digits VQA task, cached on disk.

``pumer-plug compare`` needs a real trained vision-language model without downloads. This module
defines it (``builtin_vilt_config``), trains it on this machine's CPU in a few minutes
(``train_builtin_model``, recipe in :mod:`~pumer_plug.evaluation.tasks.builtin_training`), and keeps it
in a cache that is validated before every use and written atomically (``load_builtin_model``).
The package ships the model that ``pumer-plug train --seed 0`` produces (``PACKAGED_MODEL_DIR``);
it is used when its record matches :func:`builtin_recipe` and its checksum holds, so a fresh
install needs no training.

Model: ``ViltForQuestionAnswering`` with 6 layers, C = 128, 4 heads, patch 16 on a 192 px
one-channel canvas (144 image tokens + image CLS, <= 16 text tokens). Image position embeddings
start from a 2-D sine-cosine table (ViLT starts them at zero; from scratch that slows down learning
*where*). Loss: softmax cross-entropy over the answer vocabulary (each question has exactly one
correct answer, so VQAv2's soft-score BCE is not needed) plus the recipe's auxiliary heads, which
are dropped: the saved model is a plain ``ViltForQuestionAnswering``.

Example:
    >>> model, tokenizer = load_builtin_model()  # trains on first use, then loads from the cache
    >>> test = DigitsVQA("test", 1000, seed=0, tokenizer=tokenizer)
    >>> evaluate_accuracy(model, test, batch_size=64)
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import platformdirs
import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import ViltConfig, ViltForQuestionAnswering

from .builtin_training import CURRICULUM, Stage, curriculum_datasets, fit
from .digits import (ANSWER_VOCAB, CANVAS_PX, PATCH_PX, DigitsVQA, build_tokenizer, load_tokenizer,
                     majority_answer_accuracy, question_prior_accuracy, save_tokenizer)

BUILTIN_NAME = "builtin-digits-vqa"
CACHE_ENV_VAR = "PUMER_PLUG_CACHE"
METADATA_FILE = "builtin.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 2  # 2: curriculum recipe
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 1e-3
# The model `pumer-plug train --seed 0` wrote, shipped as package data (pyproject.toml).
PACKAGED_MODEL_DIR = Path(str(importlib.resources.files("pumer_plug"))) / "data" / BUILTIN_NAME
NUM_VAL_EXAMPLES = 1000
NUM_TEST_EXAMPLES = 1000
# Config fields that must match for a cached model to be trusted.
_CHECKED_CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                          "image_size", "patch_size", "num_channels", "vocab_size", "max_position_embeddings",
                          "id2label")  # id2label fixes the number of answers (to_dict has no num_labels in transformers 5)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hides transformers' per-file progress bars ("Loading weights") of our own small files."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def builtin_vilt_config(vocab_size: int | None = None, hidden_size: int = 128, num_layers: int = 6,
                        num_heads: int = 4, mlp_ratio: int = 4, initializer_range: float | None = None) -> ViltConfig:
    """Returns the ``ViltConfig`` of the built-in digits-VQA model (eager attention).

    Args:
        vocab_size: text vocabulary size; the task tokenizer's when None.
        hidden_size: C, channels per token.
        num_layers: transformer layers.
        num_heads: H, attention heads.
        mlp_ratio: MLP hidden size as a multiple of C.
        initializer_range: std of the normal weight init; ``1 / sqrt(C)`` when None (ViLT's 0.02 is
            tuned for C = 768 and makes every linear layer shrink signals ~5x at C = 128, which
            leaves a from-scratch model stuck at the answer prior).
    """
    if vocab_size is None:
        vocab_size = build_tokenizer().get_vocab_size()
    return ViltConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=mlp_ratio * hidden_size,
        image_size=CANVAS_PX, patch_size=PATCH_PX, num_channels=1, max_position_embeddings=40,
        max_image_length=-1, pad_token_id=0, num_labels=len(ANSWER_VOCAB),
        id2label=dict(enumerate(ANSWER_VOCAB)), label2id={a: i for i, a in enumerate(ANSWER_VOCAB)},
        initializer_range=initializer_range or hidden_size**-0.5,
        attn_implementation="eager",  # transformers 5 has no SDPA path for ViLT
    )


def sincos_2d(grid_size: int, channels: int) -> torch.Tensor:
    """Returns a 2-D sine-cosine position table (MAE, He et al. 2022, Appendix A).

    Shapes:
        returns (grid_size * grid_size, channels), row-major over the patch grid.
    """
    quarter = channels // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (C/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    parts = []
    for axis in (rows, cols):
        angle = axis.flatten().double()[:, None] * omega[None, :]  # (V, C/4)
        parts += [angle.sin(), angle.cos()]
    table = torch.cat(parts, dim=1).float()  # (V, 4 * C/4)
    return nn.functional.pad(table, (0, channels - table.shape[1]))


def build_builtin_model(seed: int = 0, **config_kwargs) -> ViltForQuestionAnswering:
    """Returns a randomly initialised built-in model (seeded), image positions from ``sincos_2d``."""
    torch.manual_seed(seed)
    config = builtin_vilt_config(**config_kwargs)
    model = ViltForQuestionAnswering(config)
    positions = model.vilt.embeddings.position_embeddings  # (1, 1 + V, C); index 0 is image CLS
    grid_size = config.image_size // config.patch_size
    with torch.no_grad():
        positions[0, 1:] = sincos_2d(grid_size, config.hidden_size)
    return model


def predict(model: nn.Module, dataset: DigitsVQA, batch_size: int = 64) -> torch.Tensor:
    """Returns the predicted answer id of every example, in eval mode under inference mode.

    Shapes:
        returns (len(dataset),) int64.
    """
    was_training = model.training
    model.eval()
    predictions = []
    with torch.inference_mode():
        for inputs, _ in dataset.batches(batch_size):
            predictions.append(model(**inputs).logits.argmax(dim=-1))
    model.train(was_training)
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def evaluate_accuracy(model: nn.Module, dataset: DigitsVQA, batch_size: int = 64) -> float:
    """Returns the fraction of ``dataset`` answered exactly right (argmax over the answer vocabulary)."""
    answers = torch.tensor([dataset.answer_vocab.index(e.answer) for e in dataset.examples])
    return float((predict(model, dataset, batch_size) == answers).float().mean()) if len(dataset) else 0.0


def accuracy_by_question_type(model: nn.Module, dataset: DigitsVQA, batch_size: int = 64) -> dict[str, float]:
    """Returns accuracy per question type (``Example.question_type``)."""
    hits = (predict(model, dataset, batch_size).tolist())
    totals: dict[str, list[int]] = {}
    for example, answer_id in zip(dataset.examples, hits):
        totals.setdefault(example.question_type, []).append(ANSWER_VOCAB[answer_id] == example.answer)
    return {kind: float(np.mean(v)) for kind, v in sorted(totals.items())}


def library_versions() -> dict[str, str]:
    """Returns the versions of the libraries that shape the trained weights."""
    names = ("torch", "transformers", "tokenizers", "scikit-learn", "numpy", "safetensors")
    return {n: importlib.metadata.version(n) for n in names}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_builtin_model(output_dir: str | Path, seed: int = 0, curriculum: tuple[Stage, ...] = CURRICULUM,
                        batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
                        num_val_examples: int = NUM_VAL_EXAMPLES, learning_rate: float = DEFAULT_LEARNING_RATE,
                        **config_kwargs) -> dict:
    """Trains the built-in model from scratch and saves it into ``output_dir``; returns its metadata.

    Writes ``config.json`` + ``model.safetensors`` (``save_pretrained``), ``tokenizer.json`` and
    ``builtin.json`` (seed, curriculum, data sizes, val accuracy overall and per question type,
    baselines, timings, library versions, weights checksum). ``output_dir`` is written in place;
    see :func:`load_builtin_model` for the atomic cache.

    Args:
        output_dir: directory to write (created if missing).
        seed: seed of the initialisation, the training examples and the val questions.
        curriculum: the canvas curriculum (:data:`~pumer_plug.evaluation.tasks.builtin_training.CURRICULUM`);
            every step sees ``batch_size`` fresh examples.
        batch_size: examples per step.
        progress: show a tqdm bar.
        num_val_examples: size of the val split used for the reported accuracy.
        learning_rate: peak AdamW learning rate.
        **config_kwargs: forwarded to :func:`builtin_vilt_config` (e.g. a tiny model for tests).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_builtin_model(seed, vocab_size=tokenizer.get_vocab_size(), **config_kwargs)
    stages = curriculum_datasets(curriculum, batch_size, seed, tokenizer)
    val = DigitsVQA("val", num_val_examples, seed, tokenizer=tokenizer)
    start_s = time.perf_counter()
    history = fit(model, stages, batch_size, learning_rate=learning_rate, progress=progress)
    train_seconds = time.perf_counter() - start_s
    train = stages[-1][0]  # the task's canvas; questions are drawn alike in every stage
    with _quiet_transformers():
        model.save_pretrained(output_dir, safe_serialization=True)
    save_tokenizer(tokenizer, output_dir)
    metadata = {
        "format_version": FORMAT_VERSION, "name": BUILTIN_NAME, "seed": seed,
        "curriculum": [dataclasses.asdict(stage) for stage in curriculum], "steps": len(history),
        "batch_size": batch_size, "learning_rate": learning_rate,
        "num_train_examples": sum(len(data) for data, _ in stages), "num_val_examples": len(val),
        "num_train_digit_images": int(len(train.image_indices)),
        "val_accuracy": evaluate_accuracy(model, val, batch_size=64),
        "val_accuracy_by_question_type": accuracy_by_question_type(model, val, batch_size=64),
        "val_majority_accuracy": majority_answer_accuracy(val, train),
        "val_question_prior_accuracy": question_prior_accuracy(val, train),
        "final_train_losses": {k: float(np.mean([h[k] for h in history[-20:]])) for k in history[-1]},
        "train_seconds": train_seconds, "num_parameters": sum(p.numel() for p in model.parameters()),
        "config_kwargs": config_kwargs, "library_versions": library_versions(),
        "weights_sha256": _sha256(output_dir / WEIGHTS_FILE),
    }
    (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return metadata


def builtin_recipe(seed: int = 0) -> dict:
    """Returns the recipe fields a saved ``builtin.json`` must hold to be the default model of ``seed``.

    These are the inputs of :func:`train_builtin_model` with its defaults; a change to any of them
    makes every saved model (the packaged one included) stale until it is retrained.
    """
    return {"format_version": FORMAT_VERSION, "name": BUILTIN_NAME, "seed": seed,
            "curriculum": [dataclasses.asdict(stage) for stage in CURRICULUM], "batch_size": DEFAULT_BATCH_SIZE,
            "learning_rate": DEFAULT_LEARNING_RATE, "num_val_examples": NUM_VAL_EXAMPLES, "config_kwargs": {}}


def recipe_differences(metadata: dict, seed: int | None = None) -> list[str]:
    """Returns the recipe fields in which ``metadata`` differs from :func:`builtin_recipe` (seed: any if None)."""
    expected = builtin_recipe(metadata.get("seed", 0) if seed is None else seed)
    return [key for key, value in expected.items() if metadata.get(key) != value]


def builtin_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Returns where the built-in model is cached: ``<root>/builtin-digits-vqa``.

    ``<root>`` is ``cache_dir`` if given, else ``$PUMER_PLUG_CACHE`` if set, else the user cache
    folder of the platform (``platformdirs.user_cache_dir("pumer-plug")``: ``~/.cache/pumer-plug``
    on Linux, ``$XDG_CACHE_HOME`` respected).
    """
    root = cache_dir or os.environ.get(CACHE_ENV_VAR) or platformdirs.user_cache_dir("pumer-plug")
    return Path(root).expanduser() / BUILTIN_NAME


def _expected_config_fields() -> dict:
    config = builtin_vilt_config().to_dict()
    return {k: config[k] for k in _CHECKED_CONFIG_FIELDS}


def _load_checked(model_dir: Path, seed: int | None = None) -> tuple[ViltForQuestionAnswering, Tokenizer]:
    """Loads a saved model after checking metadata, recipe (``seed``: any if None), checksum, config, tokenizer.

    Raises:
        ValueError, OSError: with a one-line reason when anything is missing or does not match.
    """
    metadata = json.loads((model_dir / METADATA_FILE).read_text())
    if metadata.get("format_version") != FORMAT_VERSION or metadata.get("config_kwargs"):
        raise ValueError(f"metadata is not a default format-{FORMAT_VERSION} built-in model")
    stale = recipe_differences(metadata, seed)
    if stale:
        raise ValueError(f"its record differs from the training recipe in the code in {stale}")
    if _sha256(model_dir / WEIGHTS_FILE) != metadata.get("weights_sha256"):
        raise ValueError(f"{WEIGHTS_FILE} does not match its recorded checksum")
    found = ViltConfig.from_pretrained(model_dir).to_dict()
    expected = _expected_config_fields()
    wrong = [k for k, v in expected.items() if found.get(k) != v]
    if wrong:
        raise ValueError(f"config differs from builtin_vilt_config() in {wrong}")
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.get_vocab() != build_tokenizer().get_vocab():
        raise ValueError("tokenizer.json vocabulary differs from the task's")
    with _quiet_transformers():
        model, info = ViltForQuestionAnswering.from_pretrained(
            model_dir, output_loading_info=True, attn_implementation="eager")
    bad = {k: v for k, v in info.items() if v}  # missing, unexpected, mismatched keys, errors
    if bad:
        raise ValueError(f"weights do not fit the model: {bad}")
    return model.eval(), tokenizer


def build_atomically(model_dir: Path, build: Callable[[Path], None]) -> None:
    """Runs ``build(staging)`` into a temporary sibling of ``model_dir``, then swaps it in with
    renames, so the cache folder is never half written (an interrupted build leaves the old one)."""
    name = model_dir.name
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=model_dir.parent))
    try:
        build(staging)
        if model_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=model_dir.parent))
            os.replace(model_dir, trash / name)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _train_into_cache(model_dir: Path, progress: bool, seed: int = 0) -> None:
    """Trains the built-in model into the cache folder atomically."""
    build_atomically(model_dir, lambda staging: train_builtin_model(staging, seed=seed, progress=progress))


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]


def _load_packaged(seed: int) -> tuple[tuple[ViltForQuestionAnswering, Tokenizer] | None, str]:
    """Returns the packaged model (None if unusable) and, if unusable, why."""
    if seed != 0:
        return None, f"the package ships seed 0 only, seed {seed} was asked for"
    if not (PACKAGED_MODEL_DIR / METADATA_FILE).exists():
        return None, f"no packaged model in {PACKAGED_MODEL_DIR}"
    try:
        return _load_checked(PACKAGED_MODEL_DIR, seed=0), ""
    except Exception as error:  # any defect means: do not trust, train
        reason = f"packaged model {PACKAGED_MODEL_DIR} is unusable ({_reason(error)})"
        warnings.warn(f"pumer-plug: {reason}; training it instead", stacklevel=3)
        return None, reason


def load_builtin_model(cache_dir: str | Path | None = None, retrain: bool = False, progress: bool = True,
                       seed: int = 0) -> tuple[ViltForQuestionAnswering, Tokenizer]:
    """Returns the built-in digits-VQA ViLT (eval mode) and its tokenizer, training it if needed.

    Sources, in order: the cache (a model ``pumer-plug train`` wrote), then the packaged model
    (seed 0), then training into the cache. A saved model is used only if it passes every check
    (recipe record, weights checksum, config, tokenizer, weight names and shapes); otherwise a
    one-line warning says why and the next source is tried. Training (about 8 minutes on a 2-core
    CPU) writes a temporary directory that replaces the cache only when complete, so an
    interrupted run leaves the old cache or none; when it ends, its val accuracy and folder are
    printed (with ``progress``).

    Args:
        cache_dir: root of the pumer-plug cache; see :func:`builtin_model_dir`.
        retrain: train even if a valid cache or packaged model exists.
        progress: show progress bars and the result while training.
        seed: seed of a training run (initialisation and training data); the cache holds one model.

    Example:
        >>> model, tokenizer = load_builtin_model()
        >>> inputs, answer_ids = next(DigitsVQA("test", 64, tokenizer=tokenizer).batches(64))
        >>> model(**inputs).logits.shape
        torch.Size([64, 13])
    """
    model_dir = builtin_model_dir(cache_dir)
    why = "retraining was asked for"
    if not retrain:
        if model_dir.exists():
            try:
                return _load_checked(model_dir)
            except Exception as error:  # any defect means: do not trust, rebuild
                warnings.warn(f"pumer-plug: built-in model cache {model_dir} is unusable ({_reason(error)}); "
                              "trying the packaged model", stacklevel=2)
        packaged, why = _load_packaged(seed)
        if packaged is not None:
            return packaged
    if progress:
        print(f"pumer-plug: training the built-in model into {model_dir} ({why}; about 8 minutes on 2 idle CPU "
              "cores, longer when they are shared; one progress bar per curriculum stage)", file=sys.stderr)
    _train_into_cache(model_dir, progress, seed)
    loaded = _load_checked(model_dir)
    if progress:
        info = json.loads((model_dir / METADATA_FILE).read_text())
        print(f"pumer-plug: trained the built-in model in {info['train_seconds'] / 60:.1f} min: val accuracy "
              f"{100 * info['val_accuracy']:.1f}% (question-only prior {100 * info['val_question_prior_accuracy']:.1f}%); "
              f"stored in {model_dir}", file=sys.stderr)
    return loaded
