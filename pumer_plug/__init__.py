"""pumer-plug: plug-in token reduction for vision-language transformers.

Example:
    >>> import pumer_plug
    >>> handle = pumer_plug.apply(model, adapter="auto", config=pumer_plug.PumerConfig.preset("vilt-vqa"))
    >>> model(**batch)          # runs with PuMer's token reducers
    >>> handle.remove()         # the model is exactly as before
"""
from pumer_plug.config import MethodConfig, PumerConfig
from pumer_plug.handle import ReductionHandle, apply, compile, detect_adapter, make_method
from pumer_plug.method import ReductionMethod
from pumer_plug.pumer import Pumer
from pumer_plug.registry import ADAPTERS, METHODS
from pumer_plug.state import ForwardState, TokenCount

__version__ = "0.1.0"


def list_adapters(pattern: str = "*") -> list[str]:
    """Names of the registered backbone adapters matching a wildcard."""
    return ADAPTERS.list(pattern)


def list_methods(pattern: str = "*") -> list[str]:
    """Names of the registered reduction methods matching a wildcard."""
    return METHODS.list(pattern)


# Importing the plug-in packages fills the registries.
from pumer_plug import adapters as _adapters  # noqa: E402,F401
from pumer_plug import baselines as _baselines  # noqa: E402,F401
from pumer_plug.baselines.dynamicvit import DynamicViTConfig  # noqa: E402
from pumer_plug.baselines.fastv import FastVConfig  # noqa: E402
from pumer_plug.baselines.pool import PoolConfig  # noqa: E402
from pumer_plug.baselines.random_prune import RandomConfig  # noqa: E402
from pumer_plug.baselines.smres import SmResConfig  # noqa: E402
from pumer_plug.baselines.tome import TomeConfig  # noqa: E402

__all__ = [
    "MethodConfig", "PumerConfig", "TomeConfig", "DynamicViTConfig", "SmResConfig", "FastVConfig", "RandomConfig",
    "PoolConfig",
    "ForwardState", "ReductionHandle", "ReductionMethod", "TokenCount", "Pumer",
    "apply", "compile", "detect_adapter", "make_method", "list_adapters", "list_methods",
]
