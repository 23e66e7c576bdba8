"""Backbone adapters: each file knows where one backbone family keeps what a method needs.

The built-in adapters are declared in :mod:`pumer_plug.catalog` and imported one by one on first
use (``ADAPTERS.get(name)``), so using the timm adapter does not import ViLT's transformers code.
"""
from pumer_plug.adapters.base import Adapter, AdapterError

__all__ = ["Adapter", "AdapterError"]
