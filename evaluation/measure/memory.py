"""Peak memory of one forward: CUDA's allocator peak, or live tensor storages counted by a dispatch mode."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from .variants import AttachFn, Batch, _resolve_device, to_device, attached, inference

MIB = 2**20
CPU_MEMORY_METHOD = "dispatch_live_storages"
CUDA_MEMORY_METHOD = "cuda_max_memory_allocated"
MEMORY_METHODS = {
    CPU_MEMORY_METHOD: (
        "Peak of the bytes held by live tensor storages, tracked with a TorchDispatchMode: every "
        "storage an aten op creates is added when it appears and subtracted when it is freed "
        "(weakref finalizer); the peak over the forward is added to the model's parameter and "
        "buffer bytes and the input batch bytes. Deterministic and device-agnostic; it does not "
        "see scratch buffers allocated inside a kernel or allocator caching, so it is a lower "
        "bound on the process's resident memory."
    ),
    CUDA_MEMORY_METHOD: (
        "torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats around one "
        "forward (after one warm-up forward); includes weights, inputs and every CUDA tensor alive "
        "on the device, excludes the caching allocator's reserved-but-unused memory."
    ),
}


@dataclass(frozen=True)
class MemoryResult:
    """Peak memory of one forward; ``memory_method`` names how it was measured (``MEMORY_METHODS``).

    Attributes:
        peak_memory_mib: Peak bytes in use during the forward (weights + inputs + activations).
        activation_memory_mib: Peak above what was allocated before the forward started.
        weights_memory_mib: Bytes of the model's parameters and buffers.
        memory_method: A key of ``MEMORY_METHODS``.
    """

    peak_memory_mib: float
    activation_memory_mib: float
    weights_memory_mib: float
    memory_method: str


class LiveStorageTracker(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created by aten ops, and their peak.

    A storage counts when an op returns a tensor whose storage is new (not one of the op's
    inputs' storages, so views and in-place ops add nothing) and stops counting when it is freed.
    ``live_bytes`` and ``peak_bytes`` start at 0 on entry: pre-existing weights and inputs are
    not included. ``UntypedStorage.resize_`` is not seen by dispatch and is not tracked.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._tracked: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _release(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def _track(self, storage: torch.UntypedStorage) -> None:
        nbytes = storage.nbytes()
        self._tracked[storage] = nbytes
        weakref.finalize(storage, self._release, nbytes)
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if id(storage) not in inputs and storage not in self._tracked:
                    self._track(storage)
        return out


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Returns the bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values())


def weights_bytes(model: nn.Module) -> int:
    """Returns the bytes of the model's parameters and buffers (shared storages counted once)."""
    return _storage_bytes([*model.parameters(), *model.buffers()])


def measure_peak_memory(model: nn.Module, batch: Batch, attach: AttachFn | None = None,
                        device: torch.device | str | None = None) -> MemoryResult:
    """Returns the peak memory of one forward with ``attach`` applied, after one warm-up forward.

    On CUDA the allocator's own peak (``CUDA_MEMORY_METHOD``); elsewhere the dispatch-mode count
    of live tensor storages (``CPU_MEMORY_METHOD``). ``MEMORY_METHODS`` describes both.
    """
    device = _resolve_device(model, device)
    batch = to_device(batch, device)
    weights_mib = weights_bytes(model) / MIB
    with inference(model), attached(model, attach):
        model(**batch)  # warm-up: lazy caches and kernel setup are not counted
        if device.type == "cuda":
            peak, baseline = _cuda_peak_bytes(model, batch, device)
            method = CUDA_MEMORY_METHOD
        else:
            peak, baseline = _dispatch_peak_bytes(model, batch)
            method = CPU_MEMORY_METHOD
    return MemoryResult(peak_memory_mib=peak / MIB, activation_memory_mib=(peak - baseline) / MIB,
                        weights_memory_mib=weights_mib, memory_method=method)


def _cuda_peak_bytes(model: nn.Module, batch: Batch, device: torch.device) -> tuple[int, int]:
    """Returns (peak, baseline) allocated bytes on ``device`` around one forward."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    output = model(**batch)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del output
    return peak, baseline


def _dispatch_peak_bytes(model: nn.Module, batch: Batch) -> tuple[int, int]:
    """Returns (peak, baseline) bytes: weights + inputs, plus the live-storage peak of a forward."""
    inputs = (v for v in batch.values() if isinstance(v, torch.Tensor))
    baseline = weights_bytes(model) + _storage_bytes(inputs)
    with LiveStorageTracker() as tracker:
        output = model(**batch)
    del output
    return baseline + tracker.peak_bytes, baseline

