"""``apply()`` and the handle that owns every hook, attribute and per-forward state it adds.

Lifecycle in the manner of peft's ``inject_adapter``/``unload`` and PyTorch's ``RemovableHandle``:
``apply`` injects forward hooks into an unmodified model; ``handle.remove()`` (idempotent, also
run on leaving a ``with`` block) takes every one of them out again, so the model has the same
classes, ``vars()``, ``state_dict()`` tensors and outputs as before.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from pumer_plug.method import ReductionMethod
from pumer_plug.registry import ADAPTERS, METHODS
from pumer_plug.stream import IMAGE, MIXED, TEXT, TokenStream

_PLUGGED: "weakref.WeakKeyDictionary[nn.Module, ReductionHandle]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class TokenCount:
    """Padded token counts leaving a reduction layer (the lengths the next layer computes on)."""

    text: int
    image: int
    mixed: int = 0

    @property
    def total(self) -> int:
        return self.text + self.image + self.mixed


class ReductionHandle:
    """What :func:`apply` returns: the attached reducers and the means to take them out.

    Attributes:
        model: the plugged model.
        adapter: the backbone adapter in use.
        method: the reduction method in use.
        config: the method's config.
        reduction_layers: 0-based reducible-layer indices that reduce tokens.
    """

    def __init__(self, model: nn.Module, adapter: Any, method: ReductionMethod, reduction_layers: tuple[int, ...]):
        self.model = model
        self.adapter = adapter
        self.method = method
        self.config = method.config
        self.reduction_layers = reduction_layers
        self.streams: dict[str, TokenStream] = {}
        self._counts: dict[int, dict[str, TokenCount]] = {}
        self._hooks: list[RemovableHandle] = []
        self._attributes: list[tuple[Any, str]] = []
        self._overrides: list[tuple[Any, str, Any]] = []
        self._removed = False
        #: set to True to accumulate the wall time spent inside this handle's hooks in ``hook_seconds``
        self.time_hooks = False
        self.hook_seconds = 0.0
        #: ``fn(layer, stream_name, plan, saliency)`` called after every reduction (source tracing); ``plan`` is
        #: None where the stream was not reduced, ``saliency`` the (B, H, V) text-saliency scores it used or None
        self.plan_observers: list[Callable[[int, str, Any, Any], None]] = []

    # -- results of the last forward -------------------------------------------------------
    @property
    def token_counts(self) -> dict[int, TokenCount]:
        """Token counts after each reduction layer in the last forward, summed over streams."""
        out = {}
        for layer, per_stream in sorted(self._counts.items()):
            counts = list(per_stream.values())
            out[layer] = TokenCount(*(sum(getattr(c, f) for c in counts) for f in ("text", "image", "mixed")))
        return out

    def record_counts(self, layer: int, stream_name: str, stream: TokenStream) -> None:
        """Stores the padded (text, image) lengths of ``stream`` after ``layer``."""
        count = TokenCount(stream.count(TEXT), stream.count(IMAGE), stream.count(MIXED))
        self._counts.setdefault(layer, {})[stream_name] = count
        plan, saliency = stream.last_plan, stream.last_saliency
        stream.last_plan = stream.last_saliency = None  # None: the stream was not reduced at this layer
        for observe in self.plan_observers:
            observe(layer, stream_name, plan, saliency)

    def start_forward(self) -> None:
        """Resets per-forward state; adapters call it where a forward pass begins."""
        self.streams.clear()
        self._counts.clear()
        self.method.on_forward_start()

    # -- what adapters use to attach -------------------------------------------------------
    def add_forward_pre_hook(self, module: nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        self._hooks.append(module.register_forward_pre_hook(self._timed(fn), with_kwargs=with_kwargs))

    def add_forward_hook(self, module: nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        self._hooks.append(module.register_forward_hook(self._timed(fn), with_kwargs=with_kwargs))

    def _timed(self, fn: Callable) -> Callable:
        """Wraps a hook so that, while ``time_hooks`` is on, its wall time adds to ``hook_seconds``.

        On CUDA the timing is only meaningful with ``CUDA_LAUNCH_BLOCKING=1``; benchmarks use it on CPU.
        """

        def hook(*args: Any) -> Any:
            if not self.time_hooks:
                return fn(*args)
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.hook_seconds += time.perf_counter() - start

        return hook

    def set_attribute(self, obj: Any, name: str, value: Any) -> None:
        """Sets an instance attribute on a foreign object; ``remove()`` deletes it again.

        Raises:
            RuntimeError: ``obj`` already has an instance attribute ``name``.
        """
        if name in vars(obj):
            raise RuntimeError(f"{type(obj).__name__}.{name} is already set on the instance; refusing to overwrite it")
        setattr(obj, name, value)
        self._attributes.append((obj, name))

    def override_attribute(self, obj: Any, name: str, value: Any) -> None:
        """Replaces an instance attribute that ``obj`` already has; ``remove()`` puts the original object back.

        Raises:
            RuntimeError: ``obj`` has no instance attribute ``name`` (use :meth:`set_attribute`).
        """
        if name not in vars(obj):
            raise RuntimeError(f"{type(obj).__name__}.{name} is not an instance attribute; nothing to override")
        self._overrides.append((obj, name, vars(obj)[name]))
        setattr(obj, name, value)

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def removed(self) -> bool:
        return self._removed

    def remove(self) -> None:
        """Takes every hook and attribute out of the model. Idempotent."""
        if self._removed:
            return
        for hook in reversed(self._hooks):
            hook.remove()
        for obj, name, original in reversed(self._overrides):
            setattr(obj, name, original)
        self._overrides.clear()
        for obj, name in reversed(self._attributes):
            if name in vars(obj):
                delattr(obj, name)
        self._hooks.clear()
        self._attributes.clear()
        self.streams.clear()
        if _PLUGGED.get(self.model) is self:
            del _PLUGGED[self.model]
        self._removed = True

    def __enter__(self) -> "ReductionHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "attached"
        return f"ReductionHandle(method={self.method.name!r}, adapter={self.adapter.name!r}, config={self.config}, {state})"


def detect_adapter(model: nn.Module) -> str:
    """Returns the name of the one registered adapter that recognises ``model``.

    Raises:
        ValueError: no adapter (or more than one) recognises the model; lists the registered ones.
    """
    matches = [name for name, cls in ADAPTERS.items() if cls.matches(model)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(ADAPTERS.list())
    if not matches:
        raise ValueError(
            f"adapter='auto' found no adapter for {type(model).__name__}; registered adapters: {known}. "
            "Pass adapter=<name> for a supported backbone."
        )
    raise ValueError(f"adapter='auto' is ambiguous for {type(model).__name__}: {matches} all match; pass adapter=<name>")


def apply(model: nn.Module, adapter: str = "auto", config: Any = None, method: str = "pumer") -> ReductionHandle:
    """Attaches token reducers to an unmodified model through forward hooks.

    Args:
        model: a supported backbone or a model with a task head around one.
        adapter: registered adapter name (``pumer_plug.list_adapters()``) or ``"auto"``.
        config: the method's config object, a preset name (PuMer: ``PumerConfig.list_presets()``),
            or None for the method's default config.
        method: registered method name (``pumer_plug.list_methods()``).

    Returns:
        A :class:`ReductionHandle`; ``handle.remove()`` (or leaving ``with handle:``) restores the model.

    Raises:
        ValueError: unknown adapter/method/preset, an adapter that does not fit the model, or a
            config that does not fit the model (e.g. a reduction layer beyond its depth).
        RuntimeError: the model already has reducers attached.

    Example:
        >>> handle = pumer_plug.apply(model, adapter="vilt", config=PumerConfig.preset("vilt-vqa"))
        >>> logits = model(**batch).logits
        >>> handle.token_counts, handle.remove()
    """
    if model in _PLUGGED:
        raise RuntimeError(
            f"{type(model).__name__} already has reducers attached ({_PLUGGED[model]!r}); call remove() on that handle first"
        )
    method_obj = make_method(method, config)
    adapter_name = detect_adapter(model) if adapter == "auto" else adapter
    adapter_obj = ADAPTERS.get(adapter_name)(model)
    adapter_obj.check_method(method_obj)
    layers = method_obj.reduction_layers(adapter_obj.num_layers)
    handle = ReductionHandle(model, adapter_obj, method_obj, layers)
    try:
        adapter_obj.attach(handle)
        method_obj.attach(handle)
    except BaseException:
        handle.remove()
        raise
    _PLUGGED[model] = handle
    return handle


def make_method(method: str, config: Any = None) -> ReductionMethod:
    """Builds a registered method from a config object, a preset name or None (defaults)."""
    method_cls = METHODS.get(method)
    config_cls = method_cls.config_class
    if config is None:
        config = config_cls()
    elif isinstance(config, str):
        if not hasattr(config_cls, "preset"):
            raise ValueError(f"method {method!r} has no presets; pass a {config_cls.__name__}")
        config = config_cls.preset(config)
    return method_cls(config)
