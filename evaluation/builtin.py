"""The built-in model: a small ViLT trained from scratch on the digits VQA task, cached on disk.

``pumer-plug compare`` needs a real trained vision-language model without downloads. This module
defines it (``builtin_vilt_config``), trains it on this machine's CPU in a few minutes
(``train_builtin_model``), and keeps it in a cache that is validated before every use and written
atomically (``load_builtin_model``).

Recipe (measured on a 2-core CPU, see ``builtin.json`` in the cache for the figures of a run):
``ViltForQuestionAnswering`` with 6 layers, C = 128, 4 heads, patch 16 on a 192 px one-channel
canvas (144 image tokens + image CLS, <= 16 text tokens). Image position embeddings start from a
2-D sine-cosine table (ViLT starts them at zero; from scratch that slows down learning *where*).
Loss: softmax cross-entropy over the answer vocabulary (each question has exactly one correct
answer, so VQAv2's soft-score BCE is not needed). AdamW, linear warm-up, cosine decay, gradient
clipping at 1.0, a fresh training example for every step (no epochs).

Example:
    >>> model, tokenizer = load_builtin_model()  # trains on first use, then loads from the cache
    >>> test = DigitsVQA("test", 1000, seed=0, tokenizer=tokenizer)
    >>> evaluate_accuracy(model, test, batch_size=64)
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn
from tqdm.auto import tqdm
from transformers import ViltConfig, ViltForQuestionAnswering

from .digits import (ANSWER_VOCAB, CANVAS_PX, EMPTY, GRID_CELLS, PATCH_PX, REGION_PATCHES, DigitsVQA, Example,
                     build_tokenizer, load_tokenizer, majority_answer_accuracy, question_prior_accuracy,
                     save_tokenizer)

BUILTIN_NAME = "builtin-digits-vqa"
CACHE_ENV_VAR = "PUMER_PLUG_CACHE"
METADATA_FILE = "builtin.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
DEFAULT_STEPS = 700
DEFAULT_BATCH_SIZE = 64
NUM_VAL_EXAMPLES = 1000
NUM_TEST_EXAMPLES = 1000
# Config fields that must match for a cached model to be trusted.
_CHECKED_CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                          "image_size", "patch_size", "num_channels", "vocab_size", "max_position_embeddings",
                          "id2label")  # id2label fixes the number of answers (to_dict has no num_labels in transformers 5)


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


def _learning_rate_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.05."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms, embeddings' position rows)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "position" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "position" not in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.98))


class AuxiliaryHeads(nn.Module):
    """Training-only heads that give dense targets, dropped after training.

    ``layout`` names the digit (or "empty") in each of the 9 grid cells from the pooled output;
    ``patch`` names the digit (or "background") under every final image token. Together they give
    ~150 targets per example instead of one answer, which is what lets a from-scratch ViLT learn to
    read the canvas within a CPU budget. The saved model is a plain ``ViltForQuestionAnswering``.

    Shapes:
        pooled (B, C) -> (B, 9, 11); image_tokens (B, V, C) -> (B, V, 11). Class 10 = nothing.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.layout = nn.Linear(hidden_size, GRID_CELLS**2 * 11)
        self.patch = nn.Linear(hidden_size, 11)


def layout_targets(examples: list[Example]) -> torch.Tensor:
    """Returns the digit class per grid cell, 10 for an empty cell.

    Shapes:
        returns (B, 9) int64.
    """
    labels = torch.tensor([e.cell_labels for e in examples], dtype=torch.long)  # (B, 9)
    return torch.where(labels == EMPTY, torch.full_like(labels, 10), labels)


def patch_targets(examples: list[Example]) -> torch.Tensor:
    """Returns the digit class under every patch of the canvas, 10 for background.

    Shapes:
        returns (B, P, P) int64 with P = CANVAS_PX // PATCH_PX.
    """
    grid = CANVAS_PX // PATCH_PX
    targets = torch.full((len(examples), grid, grid), 10, dtype=torch.long)
    for b, e in enumerate(examples):
        for cell, (label, (dy, dx)) in enumerate(zip(e.cell_labels, e.offsets)):
            if label != EMPTY:
                targets[b, (cell // GRID_CELLS) * REGION_PATCHES + dy, (cell % GRID_CELLS) * REGION_PATCHES + dx] = label
    return targets


@contextlib.contextmanager
def _capture(model: ViltForQuestionAnswering) -> Iterator[dict[str, torch.Tensor]]:
    """Records the pooled output, the final sequence and ViLT's image-token order during a forward.

    ViLT's ``visual_embed`` shuffles image tokens (``torch.multinomial``) and returns their grid
    positions, which ``ViltEmbeddings.forward`` drops; a wrapper set on the instance keeps them and
    is deleted on exit, restoring the class method.
    """
    captured: dict[str, torch.Tensor] = {}
    embeddings = model.vilt.embeddings
    visual_embed = embeddings.visual_embed

    def recording_visual_embed(*args, **kwargs):
        x, x_mask, (patch_index, hw) = visual_embed(*args, **kwargs)
        captured["patch_index"] = patch_index  # (B, V, 2): grid (row, col) of each image token
        return x, x_mask, (patch_index, hw)

    def keep(name: str, use_input: bool):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            captured[name] = args[0] if use_input else output  # returning None keeps the output
        return hook

    handles = [model.classifier.register_forward_hook(keep("pooled", True)),  # (B, C)
               model.vilt.layernorm.register_forward_hook(keep("sequence", False))]  # (B, N, C)
    embeddings.visual_embed = recording_visual_embed
    try:
        yield captured
    finally:
        del embeddings.visual_embed
        for handle in handles:
            handle.remove()


def _step_losses(model: ViltForQuestionAnswering, heads: AuxiliaryHeads, inputs: dict,
                 answer_ids: torch.Tensor, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Returns the answer, layout and patch cross-entropies of one batch."""
    with _capture(model) as captured:
        logits = model(**inputs).logits  # (B, answers)
    num_text = inputs["input_ids"].shape[1]
    image_tokens = captured["sequence"][:, num_text + 1:]  # (B, V, C), after the image CLS
    rows, cols = captured["patch_index"].unbind(-1)  # (B, V) each
    grid = patch_targets(examples)  # (B, P, P)
    patch = grid[torch.arange(len(examples))[:, None], rows, cols]  # (B, V)
    patch_ce = nn.functional.cross_entropy(heads.patch(image_tokens).flatten(0, 1), patch.flatten(),
                                           reduction="none")
    ink = patch.flatten() != 10
    layout_logits = heads.layout(captured["pooled"]).view(len(examples), GRID_CELLS**2, 11)  # (B, 9, 11)
    return {
        "answer": nn.functional.cross_entropy(logits, answer_ids),
        "layout": nn.functional.cross_entropy(layout_logits.flatten(0, 1), layout_targets(examples).flatten()),
        "patch": patch_ce[ink].mean() + patch_ce[~ink].mean(),  # digits and background weigh the same
    }


def fit(model: ViltForQuestionAnswering, train: DigitsVQA, steps: int, batch_size: int,
        learning_rate: float = 1e-3, warmup_fraction: float = 0.06, weight_decay: float = 0.01,
        aux_weights: tuple[float, float] = (1.0, 1.0), progress: bool = True) -> list[dict[str, float]]:
    """Trains ``model`` in place on ``steps`` consecutive batches of ``train``; returns per-step losses.

    Loss: answer cross-entropy + ``aux_weights`` x (layout, patch) cross-entropies of
    :class:`AuxiliaryHeads`.

    Raises:
        ValueError: if ``train`` holds fewer than ``steps * batch_size`` examples.
    """
    if len(train) < steps * batch_size:
        raise ValueError(f"train has {len(train)} examples, need steps * batch_size = {steps * batch_size}")
    heads = AuxiliaryHeads(model.config.hidden_size)
    optimizer = _optimizer(nn.ModuleList([model, heads]), learning_rate, weight_decay)
    warmup_steps = max(1, round(warmup_fraction * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _learning_rate_factor(s, steps, warmup_steps))
    model.train()
    history: list[dict[str, float]] = []
    bar = tqdm(range(steps), disable=not progress, desc="training built-in ViLT", unit="step")
    for step in bar:
        indices = list(range(step * batch_size, (step + 1) * batch_size))
        inputs, answer_ids = train.collate(indices)
        parts = _step_losses(model, heads, inputs, answer_ids, [train.examples[i] for i in indices])
        loss = parts["answer"] + aux_weights[0] * parts["layout"] + aux_weights[1] * parts["patch"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history.append({k: v.item() for k, v in parts.items()})
        if step % 10 == 0:
            bar.set_postfix({k: f"{np.mean([h[k] for h in history[-20:]]):.3f}" for k in parts})
    model.eval()
    return history


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


def train_builtin_model(output_dir: str | Path, seed: int = 0, steps: int = DEFAULT_STEPS,
                        batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
                        num_val_examples: int = NUM_VAL_EXAMPLES, learning_rate: float = 1e-3,
                        **config_kwargs) -> dict:
    """Trains the built-in model from scratch and saves it into ``output_dir``; returns its metadata.

    Writes ``config.json`` + ``model.safetensors`` (``save_pretrained``), ``tokenizer.json`` and
    ``builtin.json`` (seed, steps, data sizes, val accuracy, baselines, timings, library versions,
    weights checksum). ``output_dir`` is written in place; see :func:`load_builtin_model` for the
    atomic cache.

    Args:
        output_dir: directory to write (created if missing).
        seed: seed of the initialisation, training examples and ViLT's patch sampling.
        steps: optimizer steps; every step sees ``batch_size`` fresh examples.
        batch_size: examples per step.
        progress: show a tqdm bar.
        num_val_examples: size of the val split used for the reported accuracy.
        learning_rate: peak AdamW learning rate.
        **config_kwargs: forwarded to :func:`builtin_vilt_config` (e.g. a tiny model for tests).
    """
    torch.set_num_threads(min(2, torch.get_num_threads()))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_builtin_model(seed, vocab_size=tokenizer.get_vocab_size(), **config_kwargs)
    train = DigitsVQA("train", steps * batch_size, seed, tokenizer=tokenizer)
    val = DigitsVQA("val", num_val_examples, seed, tokenizer=tokenizer)
    start_s = time.perf_counter()
    history = fit(model, train, steps, batch_size, learning_rate=learning_rate, progress=progress)
    train_seconds = time.perf_counter() - start_s
    val_accuracy = evaluate_accuracy(model, val, batch_size=64)
    model.save_pretrained(output_dir, safe_serialization=True)
    save_tokenizer(tokenizer, output_dir)
    metadata = {
        "format_version": FORMAT_VERSION, "name": BUILTIN_NAME, "seed": seed, "steps": steps,
        "batch_size": batch_size, "learning_rate": learning_rate, "num_train_examples": len(train),
        "num_val_examples": len(val), "num_train_digit_images": int(len(train.image_indices)),
        "val_accuracy": val_accuracy, "val_majority_accuracy": majority_answer_accuracy(val, train),
        "val_question_prior_accuracy": question_prior_accuracy(val, train),
        "final_train_losses": {k: float(np.mean([h[k] for h in history[-20:]])) for k in history[-1]},
        "train_seconds": train_seconds, "num_parameters": sum(p.numel() for p in model.parameters()),
        "config_kwargs": config_kwargs, "library_versions": library_versions(),
        "weights_sha256": _sha256(output_dir / WEIGHTS_FILE),
    }
    (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return metadata


def builtin_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Returns where the built-in model is cached: ``<root>/builtin-digits-vqa``.

    ``<root>`` is ``cache_dir`` if given, else ``$PUMER_PLUG_CACHE`` if set, else
    ``~/.cache/pumer-plug``.
    """
    root = cache_dir or os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "pumer-plug"
    return Path(root).expanduser() / BUILTIN_NAME


def _expected_config_fields() -> dict:
    config = builtin_vilt_config().to_dict()
    return {k: config[k] for k in _CHECKED_CONFIG_FIELDS}


def _load_checked(model_dir: Path) -> tuple[ViltForQuestionAnswering, Tokenizer]:
    """Loads a cached model after checking metadata, checksum, config and tokenizer.

    Raises:
        ValueError, OSError: with a one-line reason when anything is missing or does not match.
    """
    metadata = json.loads((model_dir / METADATA_FILE).read_text())
    if metadata.get("format_version") != FORMAT_VERSION or metadata.get("config_kwargs"):
        raise ValueError(f"metadata is not a default format-{FORMAT_VERSION} built-in model")
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
    model, info = ViltForQuestionAnswering.from_pretrained(
        model_dir, output_loading_info=True, attn_implementation="eager")
    bad = {k: v for k, v in info.items() if v}  # missing, unexpected, mismatched keys, errors
    if bad:
        raise ValueError(f"weights do not fit the model: {bad}")
    return model.eval(), tokenizer


def _train_into_cache(model_dir: Path, progress: bool) -> None:
    """Trains into a temporary sibling directory, then swaps it in with renames (never half written)."""
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_NAME}.tmp-", dir=model_dir.parent))
    try:
        train_builtin_model(staging, seed=0, progress=progress)
        if model_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_NAME}.old-", dir=model_dir.parent))
            os.replace(model_dir, trash / BUILTIN_NAME)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_builtin_model(cache_dir: str | Path | None = None, retrain: bool = False,
                       progress: bool = True) -> tuple[ViltForQuestionAnswering, Tokenizer]:
    """Returns the built-in digits-VQA ViLT (eval mode) and its tokenizer, training it if needed.

    The cache is used only if it passes every check (metadata, weights checksum, config, tokenizer,
    weight names and shapes); otherwise a one-line warning says why and the model is retrained
    (about 8 minutes on a 2-core CPU). Training writes a temporary directory that replaces the
    cache only when complete, so an interrupted run leaves the old cache or none.

    Args:
        cache_dir: root of the pumer-plug cache; see :func:`builtin_model_dir`.
        retrain: train even if a valid cache exists.
        progress: show a progress bar while training.

    Example:
        >>> model, tokenizer = load_builtin_model()
        >>> inputs, answer_ids = next(DigitsVQA("test", 64, tokenizer=tokenizer).batches(64))
        >>> model(**inputs).logits.shape
        torch.Size([64, 13])
    """
    model_dir = builtin_model_dir(cache_dir)
    if model_dir.exists() and not retrain:
        try:
            return _load_checked(model_dir)
        except Exception as error:  # any defect means: do not trust, rebuild
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            warnings.warn(f"pumer-plug: built-in model cache {model_dir} is unusable ({reason}); retraining",
                          stacklevel=2)
    _train_into_cache(model_dir, progress)
    return _load_checked(model_dir)
