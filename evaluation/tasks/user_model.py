"""Loading the user's own model (``--model``): an HF model directory, an id in the local HF cache, or
a METER model folder / checkpoint (:mod:`.meter_checkpoint`).

Nothing is downloaded (``local_files_only=True``) and a model directory's own code never runs
unless the user says so (``--trust-remote-code``). The model's class must have the head the task
needs; otherwise the error names the heads that fit.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from pumer_plug.errors import UserError

#: task -> model classes (HF ``architectures`` names) whose head fits it, and the adapter of each
#: (transformers has no BridgeTower VQA/NLVR2/SNLI-VE heads; METER checkpoints are not HF models)
TASK_HEADS: dict[str, dict[str, str]] = {
    "vqa": {"ViltForQuestionAnswering": "vilt"},
    "nlvr2": {"ViltForImagesAndTextClassification": "vilt"},
    "classification": {"ViltForQuestionAnswering": "vilt"},
    "retrieval": {"ViltForImageAndTextRetrieval": "vilt", "BridgeTowerForImageAndTextRetrieval": "bridgetower"},
}


@dataclass
class UserModel:
    """A loaded model and what evaluating it needs.

    Attributes:
        model: the model in eval mode (CPU).
        processor: its processor (tokenizer + image processor).
        adapter: the registered adapter of its backbone.
        architecture: the model class name.
    """

    model: nn.Module
    processor: Any
    adapter: str
    architecture: str


def _resolve(model: str | None) -> str:
    """The directory or cache id to load, refusing what is clearly not there."""
    if not model:
        raise UserError("this task needs --model: an HF model directory (model + processor) or an id in the local HF cache")
    path = Path(model).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(f"--model {model}: no config.json there; expected an HF model directory saved with save_pretrained "
                        "(or a METER model folder with meter_config.json, docs/reproduce.md)")
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_like_path and not path.exists():
        raise UserError(f"--model {model}: no such directory")
    return str(path) if path.exists() else model


def load_user_model(model: str | None, head: str, trust_remote_code: bool = False) -> UserModel:
    """Loads ``--model`` with its processor and checks that its head fits the task.

    Args:
        model: an HF model directory, an id already in the local HF cache, or a METER model folder or
            checkpoint (:mod:`.meter_checkpoint`).
        head: the task's head kind, a key of ``TASK_HEADS``.
        trust_remote_code: let a model directory's own code run.

    Returns:
        The model (eval mode, CPU), its processor, adapter and class name.

    Raises:
        UserError: no such directory or cached id, a model whose class does not fit ``head`` (naming
            the classes that do), or a missing processor.
    """
    from .meter_checkpoint import is_meter_model, load_meter_model

    if is_meter_model(model):
        meter, processor, description = load_meter_model(str(model), head)
        return UserModel(meter, processor, "meter", description)

    import transformers
    from transformers import AutoConfig, AutoProcessor

    name = _resolve(model)
    fits = TASK_HEADS[head]
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--model {model}: cannot load it offline (a directory or an id in the local HF cache): {first}") from None
    architecture = next(iter(config.architectures or []), None)
    if architecture not in fits:
        raise UserError(f"--model {model} is a {architecture or config.model_type} model, whose head does not fit this task; "
                        f"heads that fit: {', '.join(fits)}")
    cls = getattr(transformers, architecture)
    try:
        loaded = cls.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0]
        raise UserError(f"--model {model}: cannot load its weights or processor: {first}") from None
    return UserModel(loaded.eval(), processor, fits[architecture], architecture)


def max_text_length(model: nn.Module) -> int:
    """The longest text the model embeds (ViLT: ``max_position_embeddings``, 40)."""
    config = model.config
    text_config = getattr(config, "text_config", None) or config  # BridgeTower nests its text config
    return min(int(getattr(text_config, "max_position_embeddings", 512)), 512)


def id2label(model: nn.Module) -> dict[int, str]:
    """The model's label names by id (``config.id2label``)."""
    return {int(k): v for k, v in model.config.id2label.items()}


def heads_for(head: str) -> Sequence[str]:
    """The model classes that fit a head kind."""
    return tuple(TASK_HEADS[head])
