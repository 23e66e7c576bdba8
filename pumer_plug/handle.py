"""``apply()`` and the handle that owns every hook, attribute and per-forward state it adds.

Lifecycle in the manner of peft's ``inject_adapter``/``unload`` and PyTorch's ``RemovableHandle``:
``apply`` injects forward hooks into an unmodified model; ``handle.remove()`` (idempotent, also
run on leaving a ``with`` block) takes every one of them out again, so the model has the same
classes, ``vars()``, ``state_dict()`` tensors and outputs as before.
"""
from __future__ import annotations

import inspect

import time
import weakref
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from pumer_plug.errors import UserError
from pumer_plug.method import CAPABILITY_NAMES, ReductionMethod
from pumer_plug.placement import placement
from pumer_plug.registry import ADAPTERS, METHODS
from pumer_plug.state import ForwardState, TokenCount
from pumer_plug.stream import TokenStream

__all__ = ["ForwardState", "ReductionHandle", "TokenCount", "apply", "detect_adapter", "make_method"]

_PLUGGED: "weakref.WeakKeyDictionary[nn.Module, ReductionHandle]" = weakref.WeakKeyDictionary()


class ReductionHandle:
    """What :func:`apply` returns: the attached reducers and the means to take them out.

    Attributes:
        model: the plugged model.
        adapter: the backbone adapter in use.
        method: the reduction method in use.
        config: the method's config.
        reduction_layers: 0-based reducible-layer indices that reduce tokens.
        state: the :class:`~pumer_plug.state.ForwardState` of the current (or last) forward:
            streams, counts, per-layer scratch (``state.layer(i)``), the adapter's scratch
            (``state.adapter``, from ``adapter.new_forward_state()``) and the method's
            (``state.method``, set by ``method.on_forward_start(state)``). Hooks read it through
            the handle at every call (``handle.state``), never keep it: a new one replaces it
            at the start of each forward, in :meth:`start_forward` only.

    An adapter with per-forward scratch beyond streams and per-layer dicts (e.g. a decoder
    adapter's prefill flag and cached lengths) declares one small dataclass, returns a fresh one
    from ``new_forward_state()`` and reads ``handle.state.adapter`` in its hooks.
    """

    def __init__(self, model: nn.Module, adapter: Any, method: ReductionMethod, reduction_layers: tuple[int, ...]):
        self.model = model
        self.adapter = adapter
        self.method = method
        self.config = method.config
        self.reduction_layers = reduction_layers
        self.state = ForwardState(adapter=adapter.new_forward_state())
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
    def streams(self) -> dict[str, TokenStream]:
        """The token streams of the current (or last) forward, by name (``state.streams``)."""
        return self.state.streams

    @property
    def token_counts(self) -> dict[int, TokenCount]:
        """Token counts after each reduction layer in the last forward, summed over streams."""
        return self.state.token_counts()

    def record_counts(self, layer: int, stream_name: str, stream: TokenStream) -> None:
        """Stores the padded (text, image, mixed) lengths of ``stream`` after ``layer``."""
        self.state.record_counts(layer, stream_name, stream)
        plan, saliency = stream.last_plan, stream.last_saliency
        stream.last_plan = stream.last_saliency = None  # None: the stream was not reduced at this layer
        for observe in self.plan_observers:
            observe(layer, stream_name, plan, saliency)

    def start_forward(self) -> ForwardState:
        """Replaces the per-forward state with a fresh one; adapters call it where a forward begins.

        The only place where per-forward state is reset: the adapter's scratch comes from
        ``adapter.new_forward_state()``, the method's from ``method.on_forward_start(state)``.
        """
        self.state = ForwardState(training=self.model.training, adapter=self.adapter.new_forward_state())
        self.method.on_forward_start(self.state)
        return self.state

    # -- what adapters use to attach -------------------------------------------------------
    def add_forward_pre_hook(self, module: nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        self._hooks.append(module.register_forward_pre_hook(self.timed(fn), with_kwargs=with_kwargs))

    def add_forward_hook(self, module: nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        self._hooks.append(module.register_forward_hook(self.timed(fn), with_kwargs=with_kwargs))

    def timed(self, fn: Callable) -> Callable:
        """Wraps a hook so that, while ``time_hooks`` is on, its wall time adds to ``hook_seconds``.

        On CUDA the timing is only meaningful with ``CUDA_LAUNCH_BLOCKING=1``; benchmarks use it on CPU.
        Under ``torch.compile`` the hook runs eagerly (``torch.compiler.disable``): the graph breaks
        at every hook, and the host-side counts and plans work exactly as without compile.
        """

        def hook(*args: Any) -> Any:
            if not self.time_hooks:
                return fn(*args)
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.hook_seconds += time.perf_counter() - start

        return torch.compiler.disable(hook)

    def watch_reduction_layers(self) -> None:
        """Hooks the model's own forward to raise when a forward reduced at some of its reduction
        layers but skipped others: what ``torch.compile`` does with its default
        ``skip_nnmodule_hook_guards=True``, reusing a layer's graph compiled without the hooks of
        the next one (use :func:`pumer_plug.compile`)."""
        seen: dict[str, Any] = {}

        def before(module: nn.Module, args: tuple) -> None:
            seen["state"] = self.state

        def after(module: nn.Module, args: tuple, out: Any) -> None:
            state = self.state
            if state is seen.pop("state", None) or not state.counts:
                return  # no forward started here (a decode step), or nothing reduced (no image)
            missing = sorted(set(self.reduction_layers) - set(state.counts))
            if missing:
                raise RuntimeError(
                    f"{self.adapter.name} adapter: this forward reduced at layers {sorted(state.counts)} but its "
                    f"reducers at layers {missing} never ran. Under torch.compile this happens when dynamo does not "
                    "guard on hooks (torch._dynamo.config.skip_nnmodule_hook_guards, True by default) and reuses a "
                    "layer compiled without them: compile with pumer_plug.compile(model, ...) instead")

        self.add_forward_pre_hook(self.model, before)
        self.add_forward_hook(self.model, after)

    def set_attribute(self, obj: Any, name: str, value: Any) -> None:
        """Sets an instance attribute on a foreign object; ``remove()`` deletes it again.

        Raises:
            RuntimeError: ``obj`` already has an instance attribute ``name``.
        """
        if name in vars(obj):
            raise RuntimeError(f"{type(obj).__name__}.{name} is already set on the instance; refusing to overwrite it")
        setattr(obj, name, _eager(value))
        self._attributes.append((obj, name))

    def override_attribute(self, obj: Any, name: str, value: Any) -> None:
        """Replaces an instance attribute that ``obj`` already has; ``remove()`` puts the original object back.

        Raises:
            RuntimeError: ``obj`` has no instance attribute ``name`` (use :meth:`set_attribute`).
        """
        if name not in vars(obj):
            raise RuntimeError(f"{type(obj).__name__}.{name} is not an instance attribute; nothing to override")
        self._overrides.append((obj, name, vars(obj)[name]))
        setattr(obj, name, _eager(value))

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
        self.state = ForwardState(counts=self.state.counts)  # drops the tensors; token_counts stay readable
        if _PLUGGED.get(self.model) is self:
            del _PLUGGED[self.model]
        self._removed = True

    def __enter__(self) -> "ReductionHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "attached"
        return f"ReductionHandle(method={self.method.name!r}, adapter={self.adapter.name!r}, config={self.config.describe()!r}, {state})"


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
        config: the method's config object, a mapping of its fields, a preset name
            (``<ConfigClass>.list_presets()``), or None for the method's default config.
        method: registered method name (``pumer_plug.list_methods()``).

    Returns:
        A :class:`ReductionHandle`; ``handle.remove()`` (or leaving ``with handle:``) restores the model.

    Raises:
        ValueError: unknown adapter/method/preset, an adapter that does not fit the model, a
            method the adapter cannot serve (naming both), or a config that does not fit the
            model (e.g. a reduction layer beyond its depth).
        RuntimeError: the model, a module inside it or a model around it already has reducers attached.

    Example:
        >>> handle = pumer_plug.apply(model, adapter="vilt", config=PumerConfig.preset("vilt-vqa"))
        >>> logits = model(**batch).logits
        >>> handle.token_counts, handle.remove()
    """
    _check_not_plugged(model)
    method_obj = make_method(method, config)
    adapter_name = detect_adapter(model) if adapter == "auto" else adapter
    adapter_obj = ADAPTERS.get(adapter_name)(model)
    missing = sorted(method_obj.requires - adapter_obj.capabilities)
    if missing:
        needs = "; ".join(CAPABILITY_NAMES.get(c, c) for c in missing)
        raise UserError(f"{adapter_obj.name} adapter: method {method_obj.name!r} needs {needs}, which the "
                         f"{adapter_obj.name} adapter does not provide; this pair is not supported")
    placement(adapter_obj, method_obj)  # raises, naming both, when they share no place to reduce at
    adapter_obj.check_method(method_obj)
    layers = method_obj.reduction_layers(adapter_obj.num_layers)
    handle = ReductionHandle(model, adapter_obj, method_obj, layers)
    try:
        adapter_obj.attach(handle)
        method_obj.attach(handle)
        handle.watch_reduction_layers()
    except BaseException:
        handle.remove()
        raise
    _PLUGGED[model] = handle
    return handle


def _check_not_plugged(model: nn.Module) -> None:
    """Raises RuntimeError when ``model``, a module inside it, or a model around it carries a handle."""
    if model in _PLUGGED:
        raise RuntimeError(
            f"{type(model).__name__} already has reducers attached ({_PLUGGED[model]!r}); call remove() on that handle first"
        )
    for path, module in model.named_modules():
        if module in _PLUGGED:
            raise RuntimeError(f"{type(model).__name__} already has reducers attached lower down, on its submodule "
                               f"'{path}' ({_PLUGGED[module]!r}); call remove() on that handle first")
    for other, handle in list(_PLUGGED.items()):
        for path, module in other.named_modules():
            if module is model:
                raise RuntimeError(f"{type(model).__name__} already has reducers attached higher up: it is '{path}' "
                                   f"of a plugged {type(other).__name__} ({handle!r}); call remove() on that handle first")


def compile(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Returns ``torch.compile(model, **kwargs)`` for a plugged model, with dynamo guarding on hooks.

    The reducers run as hooks, eagerly (a graph break at each; ``torch.compiler.disable``). By
    default dynamo does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``),
    so a layer's graph compiled without reducer hooks would be reused for a reduction layer of the
    same class. This sets that option to False for the process, then compiles.

    Example:
        >>> handle = pumer_plug.apply(model, config=PumerConfig.preset("vilt-vqa"))
        >>> fast = pumer_plug.compile(model, backend="inductor")
    """
    import torch._dynamo

    torch._dynamo.config.skip_nnmodule_hook_guards = False
    return torch.compile(model, **kwargs)


def make_method(method: str, config: Any = None) -> ReductionMethod:
    """Builds a registered method from a config object, a mapping of its fields, a preset name or None.

    Raises:
        ValueError: unknown method or preset, or a mapping the method's config class rejects
            (unknown or out-of-range fields, named).
    """
    config_cls = METHODS.get(method).config_class
    if config is None:
        config = config_cls()
    elif isinstance(config, str):
        config = config_cls.preset(config)
    elif isinstance(config, Mapping):
        config = config_cls.from_dict(dict(config))
    return METHODS.get(method)(config)


def _eager(value: Any) -> Any:
    """A function set on a foreign module runs eagerly under ``torch.compile`` (a graph break), as hooks do."""
    return torch.compiler.disable(value) if inspect.isfunction(value) or inspect.ismethod(value) else value
