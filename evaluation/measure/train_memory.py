"""Peak memory of one training step (forward + backward) with a method attached.

Inference peak memory can sit before the first reduction layer (under ``inference_mode`` every
layer frees its activations), so it shows little of what a reduction saves. A training step keeps
every layer's activations for the backward pass, and reduced layers keep fewer of them: this is
the memory figure users feel when they fine-tune with a method attached.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .memory import CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD, MIB, LiveStorageTracker, MemoryResult, _storage_bytes, weights_bytes
from .variants import AttachFn, Batch, _resolve_device, attached, to_device


def step_loss(output: Any) -> torch.Tensor:
    """A scalar to back-propagate from any model output: the mean of its logits (``.logits``, or
    the tensor itself, or the first floating tensor it holds), in float32."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if logits is None:
        floats = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not floats:
            raise ValueError(f"the model returned no floating tensor to back-propagate from ({type(output).__name__})")
        logits = floats[0]
    return logits.float().mean()


def measure_train_step_memory(model: nn.Module, batch: Batch, attach: AttachFn | None = None,
                              device: torch.device | str | None = None) -> MemoryResult:
    """Returns the peak memory of one training step (train mode, forward + backward of
    :func:`step_loss`, parameter gradients included; no optimizer state), after one warm-up step.

    On CUDA ``torch.cuda.max_memory_allocated`` (``CUDA_MEMORY_METHOD``); elsewhere the live-storage
    count (``CPU_MEMORY_METHOD``). The model's mode and gradients are restored afterwards
    (``.grad`` set back to None).
    """
    device = _resolve_device(model, device)
    batch = to_device(batch, device)
    was_training = model.training
    model.train()
    try:
        with attached(model, attach):
            _step(model, batch)  # warm-up: lazy caches and kernel setup are not counted
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                baseline = torch.cuda.memory_allocated(device)
                _step(model, batch)
                torch.cuda.synchronize(device)
                peak, method = torch.cuda.max_memory_allocated(device), CUDA_MEMORY_METHOD
            else:
                inputs = (v for v in batch.values() if isinstance(v, torch.Tensor))
                baseline = weights_bytes(model) + _storage_bytes(inputs)
                with LiveStorageTracker() as tracker:
                    _step(model, batch)
                peak, method = baseline + tracker.peak_bytes, CPU_MEMORY_METHOD
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return MemoryResult(peak_memory_mib=peak / MIB, activation_memory_mib=(peak - baseline) / MIB,
                        weights_memory_mib=weights_bytes(model) / MIB, memory_method=method)


def _step(model: nn.Module, batch: Batch) -> None:
    with torch.enable_grad():
        step_loss(model(**batch)).backward()
