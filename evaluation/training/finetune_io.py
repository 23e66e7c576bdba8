"""Finetuning outputs on disk: checkpoint RNG states and trainer state, and loading a finished run.

See :mod:`~pumer_plug.evaluation.training.finetune` for the layout of an output directory.
"""
from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pumer_plug.errors import UserError
from pumer_plug.evaluation.tasks.base import attach_method, load_config

CHECKPOINT = "checkpoint"
#: the method's ``state_dict()`` (DynamicViT's predictors; the name older runs used)
METHOD_STATE = "predictors.safetensors"


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain tensors and numbers (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": torch.tensor(internal, dtype=torch.int64),
             "python_version": version, "python_gauss": gauss,
             "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
             "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_trainer_state(output_dir: Path) -> dict[str, Any] | None:
    path = output_dir / CHECKPOINT / "trainer_state.json"
    return json.loads(path.read_text()) if path.exists() else None


def check_same_settings(saved: dict[str, Any], current: dict[str, Any], output_dir: Path) -> None:
    ignored = {"checkpoint_every"}
    differ = sorted(k for k in set(saved) | set(current) if k not in ignored and saved.get(k) != current.get(k))
    if differ:
        raise UserError(f"the checkpoint in {output_dir} was made with other settings ({', '.join(differ)}); "
                         "resume with the same options or choose another --output")


def read_method(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "method.json").read_text())
    except OSError:
        raise UserError(f"{path} holds no finetuned model (no method.json)") from None


def load_finetuned(path: str | Path, model: nn.Module | None = None, device: str = "cpu") -> tuple[nn.Module, str, Any]:
    """Returns ``(model, method, config)`` of a :func:`finetune` output directory.

    ``method`` is the registered method name or "dense" (then ``config`` is None). The model comes
    back unplugged, in eval mode; :func:`attach_finetuned` attaches the method with its learned
    state.

    Args:
        model: a model to load the weights into; needed unless the model is a transformers class.

    Raises:
        UserError: ``path`` is not a finetune output, or holds a model that is not a transformers
            class and no ``model`` was given.
    """
    path = Path(path)
    spec = read_method(path)
    if model is None:
        import transformers

        name = json.loads((path / "finetune.json").read_text())["model_class"]
        model_cls = getattr(transformers, name, None)
        if model_cls is None:
            raise UserError(f"{path} holds a {name}, not a transformers class; pass model= to load the weights into")
        model = model_cls.from_pretrained(path)
    else:
        from safetensors.torch import load_model

        load_model(model, str(path / "model.safetensors"))
    config = None if spec["method"] == "dense" else load_config(spec["method"], spec["config"])
    return model.to(device).eval(), spec["method"], config


def attach_finetuned(model: nn.Module, path: str | Path, adapter: str | None = None) -> Any:
    """Attaches the method saved in ``path`` to ``model`` with its learned state (``load_state_dict``).

    Returns:
        The :class:`~pumer_plug.handle.ReductionHandle`, or a no-op context manager for a dense run.
    """
    path = Path(path)
    spec = read_method(path)
    if spec["method"] == "dense":
        return contextlib.nullcontext()
    config = load_config(spec["method"], spec["config"])
    handle = attach_method(model, adapter or spec["adapter"], spec["method"], config)
    if spec["state"]:
        from safetensors.torch import load_file

        first = next(model.parameters(), None)
        modules = handle.method.modules()
        if first is not None and modules is not None:
            modules.to(device=first.device, dtype=first.dtype)
        handle.method.load_state_dict(load_file(str(path / spec["state"])))
    return handle
