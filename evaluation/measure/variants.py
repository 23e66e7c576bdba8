"""What every measurement shares: the compared variants, moving batches, attaching, inference mode."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

Batch = Mapping[str, Any]
AttachFn = Callable[[nn.Module], Any]
#: the dtypes ``--dtype`` offers (``compare``, ``bench``)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Variant:
    """One compared model variant: the dense model (``attach=None``) or an attached method.

    Attributes:
        name: Unique label used as the result key, e.g. ``"dense"`` or ``"pumer"``.
        config: Human-readable method settings, e.g. ``"prune=0.1 merge=0.3"``.
        attach: ``attach(model)`` hooks the method in and returns a handle that is a context
            manager (or has ``remove()``); ``None`` for the unmodified model.
    """

    name: str
    config: str
    attach: AttachFn | None = None


def batch_size_of(batch: Batch) -> int:
    """Returns the batch size: the first dimension of the batch's first tensor.

    Raises:
        ValueError: if the batch holds no tensor or the first tensor is a scalar.
    """
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                raise ValueError("the first tensor in the batch is 0-dimensional; no batch size")
            return int(value.shape[0])
    raise ValueError(f"the batch holds no tensor (keys: {sorted(batch)}); no batch size")


def to_device(batch: Batch, device: torch.device | str, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Returns ``batch`` with its tensors on ``device``; floating-point ones cast to ``dtype`` if given
    (ids and masks keep their integer types)."""
    def move(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device)

    return {k: move(v) for k, v in batch.items()}


def _resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)



@contextlib.contextmanager
def attached(model: nn.Module, attach: AttachFn | None) -> Iterator[None]:
    """Context in which ``attach`` is applied to ``model`` (nothing for ``None``); the handle it
    returns is always removed (``handle.remove()``, as ``ReductionHandle`` and ``RemovableHandle`` have)."""
    if attach is None:
        yield
        return
    handle = attach(model)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Context with ``model.eval()`` and ``torch.inference_mode()``; restores the training flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)




def counting_attaches(variants: Sequence[Variant], tick: Callable[[], Any]) -> list[Variant]:
    """``variants`` whose attach calls ``tick()`` first (once per variant and timed round: a progress
    bar for ``measure_throughput``; attaching is outside the timed region)."""
    def counting(attach: AttachFn | None) -> AttachFn:
        def attach_and_tick(model: nn.Module) -> Any:
            tick()
            return attach(model) if attach is not None else _NoHandle()
        return attach_and_tick

    return [Variant(v.name, v.config, counting(v.attach)) for v in variants]


class _NoHandle:
    """The handle of the dense variant: nothing to remove."""

    def remove(self) -> None:
        pass
