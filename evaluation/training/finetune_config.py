"""Settings and result of a ``pumer-plug finetune`` run (see :mod:`~pumer_plug.evaluation.training.finetune`)."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pumer_plug.errors import UserError

DENSE = ("none", "dense")
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class FinetuneConfig:
    """Settings of one finetuning run (defaults: the PuMer recipe scaled to a CPU).

    Attributes:
        method: registered method name, or "none"/"dense" to finetune the dense model.
        method_config: config object, preset name, JSON/YAML path or mapping; None takes the
            task's ``default_config(method)``. A method's own loss weights (DynamicViT's
            ``keep_ratio_weight``) live in its config.
        epochs: maximum epochs (PuMer: 20).
        patience: stop after this many epochs without a better val accuracy (PuMer: 5).
        batch_size: training examples per step and process.
        steps_per_epoch: cap on the steps of an epoch (None: the whole train split).
        num_train_examples: train split size (passed to ``Task.train_batches``).
        num_val_examples: val examples used for early stopping.
        distill: distil from the frozen dense model; ``distill_weight`` scales the KL term,
            ``temperature`` softens both logits; ``hidden_distill_weight`` scales the hidden term.
        checkpoint_every: also checkpoint every this many steps (0: at epoch ends only).
    """

    method: str = "pumer"
    method_config: Any = None
    epochs: int = 4
    patience: int = 2
    batch_size: int = 32
    steps_per_epoch: int | None = None
    num_train_examples: int = 2048
    num_val_examples: int = 500
    eval_batch_size: int = 64
    learning_rate: float = 1e-4
    predictor_learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_grad_norm: float | None = 1.0
    distill: bool = True
    distill_weight: float = 1.0
    temperature: float = 1.0
    hidden_distill_weight: float = 0.0
    seed: int = 0
    checkpoint_every: int = 0
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v < math.inf

        rules = [
            (("epochs", "patience", "batch_size", "num_train_examples", "num_val_examples", "eval_batch_size"),
             lambda v: isinstance(v, int) and v >= 1, "an int >= 1"),
            (("seed", "checkpoint_every"), lambda v: isinstance(v, int) and v >= 0, "an int >= 0"),
            (("steps_per_epoch",), lambda v: v is None or (isinstance(v, int) and v >= 1), "None or an int >= 1"),
            (("learning_rate", "predictor_learning_rate", "temperature"), lambda v: number(v) and v > 0, "a number > 0"),
            (("weight_decay", "distill_weight", "hidden_distill_weight"),
             lambda v: number(v) and v >= 0, "a number >= 0"),
            (("max_grad_norm",), lambda v: v is None or (number(v) and v > 0), "None or a number > 0"),
            (("warmup_fraction",), lambda v: number(v) and 0 <= v < 1, "in [0, 1)"),
            (("mixed_precision",), lambda v: v in MIXED_PRECISION, f"one of {MIXED_PRECISION}"),
            (("method",), lambda v: isinstance(v, str) and v != "", "a method name"),
        ]
        for names, ok, expected in rules:
            for name in names:
                value = getattr(self, name)
                if isinstance(value, bool) or not ok(value):
                    raise UserError(f"FinetuneConfig.{name} must be {expected}, got {value!r}")
        if not isinstance(self.distill, bool):
            raise UserError(f"FinetuneConfig.distill must be a bool, got {self.distill!r}")

    @property
    def method_name(self) -> str | None:
        """The registered method, None for the dense model."""
        return None if self.method in DENSE else self.method

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["method_config"] = config_to_dict(self.method_config) if self.method_config is not None else None
        return values


def config_to_dict(config: Any) -> Any:
    """A method config as plain JSON values (``config.to_dict()``; tuples become lists); None stays None."""
    return None if config is None else json.loads(json.dumps(config.to_dict()))


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: best epoch (0-based), its val accuracy, the per-epoch history."""

    output_dir: Path
    best_val_accuracy: float
    best_epoch: int
    epochs_run: int
    steps: int
    stopped_early: bool
    initial_val_accuracy: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
