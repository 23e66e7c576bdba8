"""The one training loop of pumer-plug: the built-in model's recipe and ``finetune`` both step through it.

A step is: loss terms of a batch (the caller's function, already weighted), their sum backward,
gradient clipping, optimizer step, scheduler step, gradients cleared. Schedules are transformers'
(linear or cosine, with warm-up); optimizers are AdamW with weight decay on matrices only.

Example:
    >>> optimizer = adamw([(model, 0.01)], learning_rate=1e-4)
    >>> scheduler = schedule(optimizer, "linear", total_steps=1000, warmup_fraction=0.1)
    >>> for values in train_steps(batches, lambda b: {"task": loss_of(b)}, optimizer, scheduler, model.parameters()):
    ...     print(values["loss"])
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

SCHEDULES = ("linear", "cosine")


def decay_groups(module: nn.Module, weight_decay: float, **extra: Any) -> list[dict[str, Any]]:
    """Two AdamW parameter groups of ``module``: matrices with ``weight_decay`` (position tables
    excluded), everything else (biases, norms) without; ``extra`` (e.g. ``lr``) goes into both."""
    named = list(module.named_parameters())
    decayed = [p for n, p in named if p.ndim >= 2 and "position" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "position" not in n)]
    return [{"params": decayed, "weight_decay": weight_decay, **extra}, {"params": rest, "weight_decay": 0.0, **extra}]


def schedule(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_fraction: float,
             min_lr_rate: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of ``total_steps``, then linear or cosine decay
    (transformers' ``get_linear_schedule_with_warmup`` / ``get_cosine_with_min_lr_schedule_with_warmup``
    down to ``min_lr_rate`` times the peak).

    Raises:
        ValueError: an unknown ``kind``, or ``min_lr_rate`` with the linear schedule.
    """
    from transformers import get_cosine_with_min_lr_schedule_with_warmup, get_linear_schedule_with_warmup

    warmup = max(1, round(warmup_fraction * total_steps))
    if kind == "linear":
        if min_lr_rate:
            raise ValueError("the linear schedule decays to 0; min_lr_rate is for the cosine schedule")
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    if kind == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total_steps, min_lr_rate=min_lr_rate)
    raise ValueError(f"unknown schedule {kind!r}; choose from {SCHEDULES}")


def train_steps(batches: Iterable[Any], loss_terms: Callable[[Any], dict[str, torch.Tensor]],
                optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                parameters: Iterable[nn.Parameter], max_grad_norm: float | None = 1.0,
                accelerator: Any = None) -> Iterator[dict[str, float]]:
    """Takes one optimizer step per batch and yields its loss values as floats.

    Args:
        batches: anything ``loss_terms`` takes, one per step.
        loss_terms: batch -> already weighted loss terms; the step minimises their sum.
        parameters: what gradient clipping sees (clipping is off when ``max_grad_norm`` is None).
        accelerator: an ``accelerate.Accelerator`` whose ``backward``/``clip_grad_norm_`` are used
            (mixed precision, several processes); None: plain PyTorch.

    Yields:
        ``{"loss": sum, **terms}`` of every step, after the step.
    """
    parameters = list(parameters)
    for batch in batches:
        terms = loss_terms(batch)
        loss = sum(terms.values())
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        if max_grad_norm:
            clip = accelerator.clip_grad_norm_ if accelerator is not None else nn.utils.clip_grad_norm_
            clip(parameters, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        yield {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
