"""The environment record stored with every result: device, dtype, batch size, kernel, library versions."""
from __future__ import annotations

import datetime
import importlib.metadata
import platform
from typing import Any

import torch


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


def attention_kernel(model: Any) -> str:
    """The attention implementation ``model`` runs: transformers' ``config._attn_implementation``
    (``"eager"``, ``"sdpa"``, ...), METER's ``config.attn_implementation``, else ``"unspecified"``."""
    config = getattr(model, "config", None)
    kernel = getattr(config, "_attn_implementation", None) or getattr(config, "attn_implementation", None)
    return str(kernel) if kernel else "unspecified"


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
