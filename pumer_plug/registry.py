"""Named registries for adapters (where things are in a backbone) and methods (what to do with tokens).

One decorator registers a thing, one getter builds it, one lister finds it with a wildcard, in the
manner of timm's ``register_model`` / ``create_model`` / ``list_models``.
"""
from __future__ import annotations

import fnmatch
import importlib
from typing import Callable, Generic, TypeVar

from pumer_plug.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table with helpful errors.

    Example:
        >>> ADAPTERS = Registry("adapter")
        >>> @ADAPTERS.register("vilt")
        ... class ViltAdapter: ...
        >>> ADAPTERS.get("vilt") is ViltAdapter
        True
    """

    def __init__(self, kind: str, modules: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._modules = modules  # imported on first lookup: they register the built-in entries

    def _load(self) -> None:
        """Imports the modules that register the built-in entries (once; lazily, so that importing
        ``pumer_plug`` or the CLI does not import torch and transformers)."""
        modules, self._modules = self._modules, ()
        for module in modules:
            importlib.import_module(module)

    def register(self, name: str) -> Callable[[T], T]:
        """Returns a decorator that stores its argument under ``name``.

        Raises:
            ValueError: if ``name`` is already registered.
        """

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """Returns the entry called ``name``.

        Raises:
            UserError: naming the unknown entry and listing the registered ones.
        """
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.list()) or "(none)"
            raise UserError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {known}") from None

    def list(self, pattern: str = "*") -> list[str]:
        """Returns the sorted names matching a shell-style wildcard ``pattern``."""
        self._load()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries


ADAPTERS: Registry = Registry("adapter", ("pumer_plug.adapters",))
METHODS: Registry = Registry("method", ("pumer_plug.pumer", "pumer_plug.baselines"))
#: evaluation tasks (``pumer_plug.evaluation.tasks``): classes built as ``TASKS.get(name)(options)``
TASKS: Registry = Registry("task", ("pumer_plug.evaluation.tasks",))
#: ``pumer-plug bench`` setups (``pumer_plug.evaluation.studies.bench``): ``BENCH_MODELS.get(name)(batch_size=...)``
BENCH_MODELS: Registry = Registry("bench model", ("pumer_plug.evaluation.studies.bench",))
