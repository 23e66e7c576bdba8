"""Backbone-agnostic measurements for comparing token-reduction variants of one model.

A *variant* is a name, a config string and an ``attach`` callable that hooks a method into the
model and returns a removable handle; ``attach=None`` is the dense model. Every function here runs
``model(**batch)`` and never asks which backbone it holds.

Benchmark rules (docs: STYLE.md, Benchmarks): ``eval()`` under ``torch.inference_mode()``,
warm-up runs dropped, ``torch.cuda.synchronize()`` around timed regions on CUDA, compared variants
interleaved round-robin in one process, and an environment record kept with every result.

Modules: :mod:`.variants` (what they share), :mod:`.throughput`, :mod:`.flops`, :mod:`.memory`,
:mod:`.train_memory` (peak of a training step), :mod:`.batch_size` (``--find-batch-size``), :mod:`.environment`.

Example:
    >>> variants = [Variant("dense", "-", None), Variant("pumer", "r=0.1", my_attach)]
    >>> results = measure_throughput(model, batches, variants, rounds=5, warmup=1)
    >>> results["pumer"].throughput_per_s / results["dense"].throughput_per_s  # increase
"""
from .batch_size import find_batch_size, search_batch_size
from .environment import attention_kernel, environment_record
from .flops import measure_flops, measure_flops_by_module
from .memory import (CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD, MEMORY_METHODS, MIB, LiveStorageTracker, MemoryResult,
                     measure_peak_memory, weights_bytes)
from .throughput import ThroughputResult, measure_throughput
from .train_memory import measure_train_step_memory, step_loss
from .variants import DTYPES, AttachFn, Batch, Variant, attached, batch_size_of, inference, to_device

__all__ = [
    "attention_kernel", "find_batch_size", "search_batch_size", "environment_record", "measure_flops", "measure_flops_by_module",
    "CPU_MEMORY_METHOD", "CUDA_MEMORY_METHOD", "MEMORY_METHODS", "MIB", "LiveStorageTracker", "MemoryResult",
    "measure_peak_memory", "measure_train_step_memory", "step_loss", "weights_bytes", "ThroughputResult", "measure_throughput", "AttachFn", "Batch",
    "DTYPES", "Variant", "attached", "batch_size_of", "inference", "to_device",
]
