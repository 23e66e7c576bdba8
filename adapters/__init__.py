"""Backbone adapters: each file knows where one backbone family keeps what a method needs."""
from pumer_plug.adapters import vilt  # noqa: F401
from pumer_plug.adapters import vit  # noqa: F401
from pumer_plug.adapters import bridgetower  # noqa: F401
from pumer_plug.adapters import meter  # noqa: F401
from pumer_plug.adapters import llava  # noqa: F401
from pumer_plug.adapters.base import Adapter, AdapterError

__all__ = ["Adapter", "AdapterError"]
