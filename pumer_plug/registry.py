"""Named registries for adapters (where things are in a backbone) and methods (what to do with tokens).

One decorator registers a thing, one getter builds it, one lister finds it with a wildcard, in the
manner of timm's ``register_model`` / ``create_model`` / ``list_models``.

The built-in entries are *declared* in :mod:`pumer_plug.catalog` as lazy entries: a name, where the
object lives (``"module:attribute"``), the one-line summary ``pumer-plug list`` prints and, for
methods, the torch-free module that holds the config class. Listing names, summaries and configs
imports none of the heavy modules (torch, transformers, timm, open_clip); :meth:`Registry.get`
imports an entry's module on first use. Entries a user registers with :meth:`Registry.register`
are ordinary objects and behave the same.
"""
from __future__ import annotations

import fnmatch
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Mapping, TypeVar

from pumer_plug.errors import UserError

T = TypeVar("T")


def docstring_summary(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring on one line, without reStructuredText's double backticks."""
    paragraph = inspect.cleandoc(obj.__doc__ or "").split("\n\n")[0]
    return " ".join(paragraph.split()).replace("``", "")


def import_target(target: str) -> Any:
    """The object a ``"package.module:attribute"`` reference names (imports the module)."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class LazyEntry:
    """A registry entry declared without importing it.

    Attributes:
        target: ``"module:attribute"`` of the object :meth:`Registry.get` returns.
        summary: what ``pumer-plug list`` prints: the first paragraph of the object's docstring
            (``tests/test_registry.py`` checks that they agree).
        attributes: attributes of the object that can be read without importing ``target``,
            each a ``"module:attribute"`` in a light module (a method's ``config_class``).
    """

    target: str
    summary: str
    attributes: Mapping[str, str] = field(default_factory=dict)


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
        self._entries: dict[str, T | LazyEntry] = {}
        self._loaded: dict[str, T] = {}  # lazy entries imported so far
        self._modules = modules  # imported on first lookup: they declare the built-in entries

    def _load(self) -> None:
        """Imports the modules that declare the built-in entries (once; they import nothing heavy)."""
        modules, self._modules = self._modules, ()
        for module in modules:
            importlib.import_module(module)

    def _check_new(self, name: str) -> None:
        self._load()
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")

    def register(self, name: str) -> Callable[[T], T]:
        """Returns a decorator that stores its argument under ``name``.

        Raises:
            ValueError: if ``name`` is already registered.
        """

        def decorator(obj: T) -> T:
            self._check_new(name)
            self._entries[name] = obj
            return obj

        return decorator

    def declare(self, name: str, target: str, summary: str, **attributes: str) -> None:
        """Adds a lazy entry: ``target`` (``"module:attribute"``) is imported by the first :meth:`get`.

        Raises:
            ValueError: if ``name`` is already registered.
        """
        self._check_new(name)
        self._entries[name] = LazyEntry(target, summary, attributes)

    def get(self, name: str) -> T:
        """Returns the entry called ``name``, importing its module if it was declared lazily.

        Raises:
            UserError: naming the unknown entry and listing the registered ones.
        """
        self._load()
        try:
            entry = self._entries[name]
        except KeyError:
            known = ", ".join(self.list()) or "(none)"
            raise UserError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {known}") from None
        if not isinstance(entry, LazyEntry):
            return entry
        if name not in self._loaded:
            self._loaded[name] = import_target(entry.target)
        return self._loaded[name]

    def summary(self, name: str) -> str:
        """One line on the entry (the first paragraph of its docstring), without importing a lazy entry."""
        self._load()
        entry = self._entries.get(name)
        return entry.summary if isinstance(entry, LazyEntry) else docstring_summary(self.get(name))

    def attribute(self, name: str, attribute: str) -> Any:
        """``get(name).<attribute>``, read from the light module a lazy entry declares for it when it does."""
        self._load()
        entry = self._entries.get(name)
        if isinstance(entry, LazyEntry) and attribute in entry.attributes:
            return import_target(entry.attributes[attribute])
        return getattr(self.get(name), attribute)

    def list(self, pattern: str = "*") -> list[str]:
        """Returns the sorted names matching a shell-style wildcard ``pattern`` (imports no entry)."""
        self._load()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def items(self) -> list[tuple[str, T]]:
        """Every ``(name, entry)``, sorted; imports every lazy entry."""
        return [(name, self.get(name)) for name in self.list()]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries


ADAPTERS: Registry = Registry("adapter", ("pumer_plug.catalog",))
METHODS: Registry = Registry("method", ("pumer_plug.catalog",))
#: evaluation tasks (``pumer_plug.evaluation.tasks``): classes built as ``TASKS.get(name)(options)``
TASKS: Registry = Registry("task", ("pumer_plug.catalog",))
#: ``pumer-plug bench`` setups (``pumer_plug.evaluation.studies.bench``): ``BENCH_MODELS.get(name)(batch_size=...)``
BENCH_MODELS: Registry = Registry("bench model", ("pumer_plug.catalog",))
