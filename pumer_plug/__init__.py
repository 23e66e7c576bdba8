"""pumer-plug: plug-in token reduction for vision-language transformers.

The public names below are imported on first use (PEP 562), so ``import pumer_plug`` and the
``pumer-plug`` command line start without torch; the built-in adapters and methods are declared
in :mod:`pumer_plug.catalog` and each is imported on its first ``get`` (:mod:`pumer_plug.registry`).

Example:
    >>> import pumer_plug
    >>> handle = pumer_plug.apply(model, adapter="auto", config=pumer_plug.PumerConfig.preset("vilt-vqa"))
    >>> model(**batch)          # runs with PuMer's token reducers
    >>> handle.remove()         # the model is exactly as before
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pumer_plug.registry import ADAPTERS, METHODS

if TYPE_CHECKING:
    from pumer_plug.baselines.dynamicvit_config import DynamicViTConfig
    from pumer_plug.baselines.keep_config import FastVConfig
    from pumer_plug.baselines.pool_config import PoolConfig
    from pumer_plug.baselines.keep_config import RandomConfig
    from pumer_plug.baselines.smres_config import SmResConfig
    from pumer_plug.baselines.tome_config import TomeConfig
    from pumer_plug.config import MethodConfig, PumerConfig
    from pumer_plug.handle import ReductionHandle, apply, compile, detect_adapter, make_method
    from pumer_plug.method import ReductionMethod
    from pumer_plug.pumer import Pumer
    from pumer_plug.state import ForwardState, TokenCount

__version__ = "0.1.0"

# Public name -> the module that defines it; add a new export here (and to __all__).
_EXPORTS = {
    "MethodConfig": "pumer_plug.config", "PumerConfig": "pumer_plug.config",
    "TomeConfig": "pumer_plug.baselines.tome_config", "DynamicViTConfig": "pumer_plug.baselines.dynamicvit_config",
    "SmResConfig": "pumer_plug.baselines.smres_config", "FastVConfig": "pumer_plug.baselines.keep_config",
    "RandomConfig": "pumer_plug.baselines.keep_config", "PoolConfig": "pumer_plug.baselines.pool_config",
    "ReductionHandle": "pumer_plug.handle", "apply": "pumer_plug.handle", "compile": "pumer_plug.handle",
    "detect_adapter": "pumer_plug.handle", "make_method": "pumer_plug.handle",
    "ForwardState": "pumer_plug.state", "TokenCount": "pumer_plug.state",
    "ReductionMethod": "pumer_plug.method", "Pumer": "pumer_plug.pumer",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'pumer_plug' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def list_adapters(pattern: str = "*") -> list[str]:
    """Names of the registered backbone adapters matching a wildcard."""
    return ADAPTERS.list(pattern)


def list_methods(pattern: str = "*") -> list[str]:
    """Names of the registered reduction methods matching a wildcard."""
    return METHODS.list(pattern)


__all__ = [*_EXPORTS, "list_adapters", "list_methods"]
