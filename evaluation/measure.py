"""Backbone-agnostic measurements for comparing token-reduction variants of one model.

A *variant* is a name, a config string and an ``attach`` callable that hooks a method into the
model and returns a removable handle (a context manager); ``attach=None`` is the dense model.
Every function here runs ``model(**batch)`` and never asks which backbone it holds.

Benchmark rules (docs: STYLE.md, Benchmarks): ``eval()`` under ``torch.inference_mode()``,
warm-up runs dropped, ``torch.cuda.synchronize()`` around timed regions on CUDA, compared variants
interleaved round-robin in one process, and an environment record kept with every result.

Example:
    >>> variants = [Variant("dense", "-", None), Variant("pumer", "r=0.1", my_attach)]
    >>> results = measure_throughput(model, batches, variants, rounds=5, warmup=1)
    >>> results["pumer"].throughput_per_s / results["dense"].throughput_per_s  # increase
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import platform
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

Batch = Mapping[str, Any]
AttachFn = Callable[[nn.Module], Any]

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


@dataclass(frozen=True)
class ThroughputResult:
    """Timing of one variant over the measured (non-warm-up) rounds.

    Attributes:
        throughput_per_s: Median over rounds of examples per second.
        latency_ms: Median over rounds of the mean wall time per batch, in milliseconds.
        throughput_per_s_rounds: Examples per second of every measured round, in order.
        latency_ms_rounds: Mean per-batch latency of every measured round, in order.
    """

    name: str
    config: str
    throughput_per_s: float
    latency_ms: float
    throughput_per_s_rounds: tuple[float, ...]
    latency_ms_rounds: tuple[float, ...]
    examples_per_round: int
    batches_per_round: int
    rounds: int
    warmup: int


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


def _to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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
    """Context in which ``attach`` is applied to ``model`` (nothing for ``None``); always removed."""
    if attach is None:
        yield
        return
    handle = attach(model)
    if hasattr(handle, "__enter__") and hasattr(handle, "__exit__"):
        with handle:
            yield
    else:
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


def _check_throughput_args(batches: Sequence[Batch], variants: Sequence[Variant], rounds: int,
                           warmup: int) -> None:
    if not batches:
        raise ValueError("batches is empty; pass at least one batch of model inputs")
    if not variants:
        raise ValueError("variants is empty; pass at least one Variant")
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"variant names must be unique; repeated: {duplicates}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")


def _time_variant(model: nn.Module, batches: Sequence[Batch], variant: Variant,
                  device: torch.device, clock: Callable[[], float]) -> float:
    """Returns the seconds one pass over ``batches`` takes with ``variant`` attached."""
    with attached(model, variant.attach):
        _synchronize(device)
        start = clock()
        for batch in batches:
            model(**batch)
        _synchronize(device)
        return clock() - start


def measure_throughput(
    model: nn.Module,
    batches: Sequence[Batch],
    variants: Sequence[Variant],
    rounds: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, ThroughputResult]:
    """Times every variant over the same batches, interleaved round-robin in this process.

    Each of ``warmup + rounds`` rounds runs, for each variant in order: attach, forward every
    batch, remove. Warm-up rounds are dropped; attaching and removing are outside the timed region.

    Args:
        model: Any module called as ``model(**batch)``; it is not moved.
        batches: Dicts of model kwargs; batch size = first dim of each batch's first tensor.
        variants: Compared variants with unique names.
        rounds: Measured rounds (>= 1); the result is the median over them.
        warmup: Dropped rounds run first (>= 0).
        device: Where batches are moved before timing; default: the model's parameter device.
        clock: Seconds counter (``time.perf_counter``); injectable for tests.

    Returns:
        ``{variant.name: ThroughputResult}`` in the order of ``variants``.

    Raises:
        ValueError: on empty ``batches`` or ``variants``, repeated names, ``rounds < 1``,
            ``warmup < 0``, or a batch without tensors.
    """
    _check_throughput_args(batches, variants, rounds, warmup)
    device = _resolve_device(model, device)
    batches = [_to_device(b, device) for b in batches]
    examples = sum(batch_size_of(b) for b in batches)
    seconds: dict[str, list[float]] = {v.name: [] for v in variants}
    with inference(model):
        for round_index in range(warmup + rounds):
            for variant in variants:
                elapsed = _time_variant(model, batches, variant, device, clock)
                if round_index >= warmup:
                    seconds[variant.name].append(elapsed)
    return {v.name: _throughput_result(v, seconds[v.name], examples, len(batches), warmup)
            for v in variants}


def _throughput_result(variant: Variant, seconds: list[float], examples: int, num_batches: int,
                       warmup: int) -> ThroughputResult:
    per_s = tuple(examples / s if s > 0 else float("inf") for s in seconds)
    latency_ms = tuple(1000.0 * s / num_batches for s in seconds)
    return ThroughputResult(
        name=variant.name, config=variant.config,
        throughput_per_s=statistics.median(per_s), latency_ms=statistics.median(latency_ms),
        throughput_per_s_rounds=per_s, latency_ms_rounds=latency_ms,
        examples_per_round=examples, batches_per_round=num_batches,
        rounds=len(seconds), warmup=warmup,
    )


def _count_flops(model: nn.Module, batch: Batch, attach: AttachFn | None,
                 device: torch.device | str | None) -> tuple[FlopCounterMode, int]:
    batch = _to_device(batch, _resolve_device(model, device))
    # FlopCounterMode has no formula for the fused CPU/flash SDPA kernels and would silently skip
    # attention; the math backend is counted op by op.
    with inference(model), attached(model, attach), sdpa_kernel([SDPBackend.MATH]), \
            FlopCounterMode(display=False) as counter:
        model(**batch)
    return counter, batch_size_of(batch)


def measure_flops(model: nn.Module, batch: Batch, attach: AttachFn | None = None,
                  device: torch.device | str | None = None) -> float:
    """Returns GFLOPs per example of one real forward with ``attach`` applied (dense if ``None``).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` over the ops that actually run, so
    a method that shrinks the token count shows up here. A multiply-add counts as 2 FLOPs;
    element-wise ops count 0 (PyTorch's formulas cover matmuls, convolutions and attention).
    """
    counter, batch_size = _count_flops(model, batch, attach, device)
    return counter.get_total_flops() / batch_size / 1e9


def measure_flops_by_module(model: nn.Module, batch: Batch, attach: AttachFn | None = None,
                            device: torch.device | str | None = None) -> dict[str, float]:
    """Returns ``{module path: GFLOPs per example}`` of one forward, including ``"Global"``.

    Paths are FlopCounterMode's (``"<ModelClass>.layers.0.attention"``); a parent includes its
    children.
    """
    counter, batch_size = _count_flops(model, batch, attach, device)
    return {name: sum(ops.values()) / batch_size / 1e9
            for name, ops in counter.get_flop_counts().items()}


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
    batch = _to_device(batch, device)
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


def search_batch_size(fits: Callable[[int], bool], start: int = 1,
                      max_batch_size: int = 4096) -> int:
    """Returns the largest batch size in ``[start, max_batch_size]`` for which ``fits`` is true.

    Doubles from ``start`` until a size does not fit (or the cap), then binary-searches between
    the last size that fit and the first that did not. Assumes ``fits`` is monotone.

    Raises:
        ValueError: if ``start < 1``, ``max_batch_size < start``, or ``start`` does not fit.
    """
    if start < 1 or max_batch_size < start:
        raise ValueError(f"need 1 <= start <= max_batch_size, got {start} and {max_batch_size}")
    if not fits(start):
        raise ValueError(f"batch size {start} (the start) does not fit; lower --batch-size")
    good, bad = start, max_batch_size + 1
    while good < max_batch_size:
        trial = min(2 * good, max_batch_size)
        if not fits(trial):
            bad = trial
            break
        good = trial
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def _oom_probe(model: nn.Module, make_batch: Callable[[int], Batch], attach: AttachFn | None,
               device: torch.device) -> Callable[[int], bool]:
    """Returns ``fits(batch_size)``: one forward that is False on ``torch.OutOfMemoryError``."""

    def fits(batch_size: int) -> bool:
        out_of_memory = False
        try:
            with inference(model), attached(model, attach):
                model(**_to_device(make_batch(batch_size), device))
            _synchronize(device)
        except torch.OutOfMemoryError:
            out_of_memory = True  # free outside the except block: the traceback holds tensors
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return not out_of_memory

    return fits


def find_batch_size(model: nn.Module, make_batch: Callable[[int], Batch],
                    attach: AttachFn | None = None, start: int = 1, max_batch_size: int = 4096,
                    device: torch.device | str | None = None) -> int:
    """Returns the largest batch size whose forward fits in CUDA memory (``--find-batch-size``).

    Pass the most memory-hungry variant (usually the dense model, ``attach=None``) so that every
    compared variant can run at the returned size.

    Args:
        make_batch: ``make_batch(batch_size)`` returns a batch dict of that size.

    Raises:
        ValueError: if the device is not CUDA (a CPU process is killed rather than told it is
            out of memory), or as ``search_batch_size``.
    """
    device = _resolve_device(model, device)
    if device.type != "cuda":
        raise ValueError(f"find_batch_size needs a CUDA device, got {device}; pass --batch-size")
    return search_batch_size(_oom_probe(model, make_batch, attach, device), start, max_batch_size)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_record(device: torch.device | str, dtype: torch.dtype | str, batch_size: int,
                       num_threads: int | None = None,
                       attention_kernel: str = "unspecified") -> dict[str, Any]:
    """Returns the facts a result depends on, to store with every result row.

    Args:
        device: Device the measurement ran on.
        dtype: Model dtype, e.g. ``torch.float16``.
        batch_size: Examples per batch.
        num_threads: Intra-op CPU threads; default ``torch.get_num_threads()``.
        attention_kernel: Attention implementation, e.g. ``"sdpa"`` or ``"eager"``.
    """
    device = torch.device(device)
    is_cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if is_cuda else _cpu_model(),
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": int(batch_size),
        "num_threads": int(num_threads if num_threads is not None else torch.get_num_threads()),
        "attention_kernel": attention_kernel,
        "torch_version": torch.__version__,
        "transformers_version": _version("transformers"),
        "python_version": platform.python_version(),
        "cuda_version": torch.version.cuda if is_cuda else None,
        "cpu_model": _cpu_model(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
