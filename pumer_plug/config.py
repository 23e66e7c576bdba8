"""Method configs: the :class:`MethodConfig` base every method's config derives from, PuMer's
config with the paper's presets, and how any method's config is read from a preset name, a
JSON/YAML file or a mapping."""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from pumer_plug.errors import UserError
from pumer_plug.ops import SALIENCY_HEADS
from pumer_plug.ops.counts import merge_count, prune_count
from pumer_plug.registry import METHODS


def check_ratio(owner: str, name: str, value: float) -> None:
    """Raises ValueError unless ``value`` is a ratio in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise UserError(f"{owner}.{name} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise UserError(f"{owner}.{name} must be in [0, 1), got {value!r}")


def check_layers(owner: str, name: str, layers: Any) -> tuple[int, ...]:
    """Returns ``layers`` as a tuple; raises ValueError unless they are unique, sorted ints >= 0."""
    try:
        layers = tuple(layers)
    except TypeError:
        raise UserError(f"{owner}.{name} must be a sequence of layer indices, got {layers!r}") from None
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise UserError(f"{owner}.{name} must hold layer indices (ints >= 0), got {layers!r}")
    if list(layers) != sorted(set(layers)):
        raise UserError(f"{owner}.{name} must be unique and sorted ascending, got {layers!r}")
    return layers


def check_bool(owner: str, name: str, value: Any) -> None:
    """Raises ValueError unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise UserError(f"{owner}.{name} must be a bool, got {value!r}")


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config (a frozen dataclass): validation helpers, presets, a short
    description, and conversion from and to plain mappings.

    A subclass declares its fields, sets ``LABEL`` (how :meth:`describe` names the method),
    validates in ``__post_init__`` (a bad value raises ValueError naming ``Class.field``), and
    may override :meth:`summary`, :attr:`is_identity` and :attr:`reduces_nothing`. Presets are
    registered with :meth:`register_preset`; every subclass has its own ``PRESETS`` and
    ``PRESET_SOURCES``.

    Example:
        >>> TomeConfig.from_dict({"r": 12}).describe()
        'ToMe r=12'
    """

    LABEL: ClassVar[str] = ""
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    PRESET_SOURCES: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "PRESETS" not in vars(cls):
            cls.PRESETS, cls.PRESET_SOURCES = {}, {}

    # -- presets -------------------------------------------------------------------------------
    @classmethod
    def register_preset(cls, name: str, source: str, **values: Any) -> None:
        """Adds a named preset and where its values come from (paper table, released code)."""
        cls.PRESETS[name] = values
        cls.PRESET_SOURCES[name] = source

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "MethodConfig":
        """Returns a named preset (see ``PRESET_SOURCES``), with fields overridden.

        Raises:
            ValueError: unknown preset, listing the known ones.
        """
        if name not in cls.PRESETS:
            known = ", ".join(sorted(cls.PRESETS)) or "(none)"
            raise UserError(f"unknown {cls.LABEL or cls.__name__} preset {name!r}; known presets: {known}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @classmethod
    def list_presets(cls) -> list[str]:
        return sorted(cls.PRESETS)

    # -- mappings ------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MethodConfig":
        """Builds a config from a mapping (e.g. parsed JSON/YAML).

        Raises:
            ValueError: unknown keys (named), or a value out of range (the field is named).
        """
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise UserError(f"unknown {cls.__name__} field(s) {unknown}; fields: {sorted(cls.field_names())}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (tuples become lists), so ``from_dict(to_dict())`` round-trips through JSON."""
        return json.loads(json.dumps(asdict(self)))

    # -- description ---------------------------------------------------------------------------
    def summary(self) -> str:
        """The fields that differ from the defaults, ``name=value`` (subclasses write shorter forms)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return " ".join(f"{k}={v}" for k, v in asdict(self).items() if defaults.get(k) != v)

    def describe(self) -> str:
        """A short human form for tables and logs: ``"ToMe r=12"``, ``"PuMer layers=2,5,8 k=0.1 r=0.3 t=0.2"``."""
        return " ".join(part for part in (self.LABEL, self.summary()) if part)

    @property
    def is_identity(self) -> bool:
        """True when the config reduces nothing by its ratios/counts (the dense model's outputs)."""
        return False

    @property
    def reduces_nothing(self) -> bool:
        """True when the config's placement makes it a no-op whatever its ratios (e.g. no reduction layers)."""
        return False

    # -- validation helpers for __post_init__ --------------------------------------------------
    def _owner(self) -> str:
        return type(self).__name__

    def _ratios(self, *names: str) -> None:
        for name in names:
            check_ratio(self._owner(), name, getattr(self, name))

    def _layers(self, name: str = "reduction_layers") -> None:
        object.__setattr__(self, name, check_layers(self._owner(), name, getattr(self, name)))

    def _bools(self, *names: str) -> None:
        for name in names:
            check_bool(self._owner(), name, getattr(self, name))

    def _warn_if_inert(self) -> None:
        """Warns when the config would reduce nothing although its ratios ask for a reduction."""
        if self.reduces_nothing and not self.is_identity:
            warnings.warn(f"{self.describe()}: no reduction layer is set, so nothing will be reduced", UserWarning,
                          stacklevel=4)


@dataclass(frozen=True)
class PumerConfig(MethodConfig):
    """PuMer token reducers (PuMer Sec. 4, Alg. 1).

    Attributes:
        reduction_layers: 0-based indices of the cross-modal layers that hold a token reducer;
            unique, ascending, and below the model's cross-modal depth (checked at ``apply``).
        prune_ratio: k, the fraction of image tokens pruned by text-saliency score per reducer.
        image_merge_ratio: r, merged image tokens per reducer as a fraction of the image tokens
            *before* pruning (``round(r|V|)``, as the released code and the paper's Table 7 FLOPs).
        text_merge_ratio: t, fraction of text tokens merged away per reducer.
        proportional_attention: add ``log(size)`` of merged tokens to attention logits (ToMe).
            Off by default: PuMer's released code does not use it.
        saliency_heads: how the text-saliency score combines attention heads: ``"sum"`` (PuMer
            Eq. 1) or ``"first"`` (the first head only, the released code's ViLT VQA default).

    Raises:
        ValueError: a ratio outside [0, 1) or bad reduction layers; the message names the field.

    Example:
        >>> PumerConfig(reduction_layers=(2, 5, 8), prune_ratio=0.1, image_merge_ratio=0.3)
    """

    reduction_layers: tuple[int, ...] = (2, 5, 8)
    prune_ratio: float = 0.1
    image_merge_ratio: float = 0.3
    text_merge_ratio: float = 0.2
    proportional_attention: bool = False
    saliency_heads: str = "sum"

    LABEL: ClassVar[str] = "PuMer"

    def __post_init__(self) -> None:
        self._layers()
        self._ratios("prune_ratio", "image_merge_ratio", "text_merge_ratio")
        self._bools("proportional_attention")
        if self.saliency_heads not in SALIENCY_HEADS:
            raise UserError(f"PumerConfig.saliency_heads must be one of {SALIENCY_HEADS}, got {self.saliency_heads!r}")
        self._warn_if_inert()

    @property
    def is_identity(self) -> bool:
        return not (self.prune_ratio or self.image_merge_ratio or self.text_merge_ratio)

    @property
    def reduces_nothing(self) -> bool:
        return not self.reduction_layers

    def summary(self) -> str:
        layers = ",".join(map(str, self.reduction_layers)) or "none"
        heads = "" if self.saliency_heads == "sum" else f" heads={self.saliency_heads}"
        prop = " prop-attn" if self.proportional_attention else ""
        return f"layers={layers} k={self.prune_ratio:g} r={self.image_merge_ratio:g} t={self.text_merge_ratio:g}{heads}{prop}"

    def token_schedule(self, num_text: int, num_image: int, num_layers: int) -> list[tuple[int, int]]:
        """Real (text, image) token counts leaving every layer, for one row without padding.

        Assumes one protected token per segment (text CLS, image CLS), as in ViLT and METER.
        """
        counts, t, v = [], num_text, num_image
        for layer in range(num_layers):
            if layer in self.reduction_layers:
                r = merge_count(v, self.image_merge_ratio, 1)  # of the image tokens before pruning
                v -= prune_count(v, self.prune_ratio, 1)
                v -= min(r, (v - 1) // 2)
                t -= merge_count(t, self.text_merge_ratio, 1)
            counts.append((t, v))
        return counts


_register = PumerConfig.register_preset


_OFFICIAL = "csarron/PuMer notes/cmd.md"
# The released ViLT VQA run keeps vilt.yaml's first-head saliency (``fh``); VE/NLVR2 pass ``mh``.
_register("vilt-vqa", f"{_OFFICIAL} (vilt-vqa2-pumer)", reduction_layers=(2, 5, 8), prune_ratio=0.1, image_merge_ratio=0.3, text_merge_ratio=0.2, saliency_heads="first")
_register("vilt-ve", "PuMer Table 4 (PuMer row) / released vilt-ve-p0.1r0.3t0.2-2468", reduction_layers=(2, 4, 6, 8), prune_ratio=0.1, image_merge_ratio=0.3, text_merge_ratio=0.2)
_register("vilt-nlvr2", f"{_OFFICIAL} (vilt-nlvr2-pumer reuses l=2,5,8 k=0.1 r=0.3 t=0.2)", reduction_layers=(2, 5, 8), prune_ratio=0.1, image_merge_ratio=0.3, text_merge_ratio=0.2)
# METER: the official code counts two layer indices per cross-modal block (text layer, image
# layer: ``layer_idx += 2``), so its reduce_layers 0,2,4,6 are our cross-modal blocks 0,1,2,3.
_register("meter-vqa", "PuMer Table 6 (METER VQAv2: official layers 0,2,4,6)", reduction_layers=(0, 1, 2, 3), prune_ratio=0.2, image_merge_ratio=0.2, text_merge_ratio=0.2)
_register("meter-nlvr2", "PuMer Table 6 (METER NLVR2: official layers 2,4,6)", reduction_layers=(1, 2, 3), prune_ratio=0.3, image_merge_ratio=0.5, text_merge_ratio=0.2)
_register("meter-ve", "PuMer Table 6 (METER SNLI-VE: official layers 0,2,4,6)", reduction_layers=(0, 1, 2, 3), prune_ratio=0.3, image_merge_ratio=0.5, text_merge_ratio=0.2)
_register("meter-retrieval", "PuMer Table 6 (METER retrieval: official layers 2,4,6)", reduction_layers=(1, 2, 3), prune_ratio=0.2, image_merge_ratio=0.5, text_merge_ratio=0.2)
# The built-in digits-VQA ViLT has 6 layers. Chosen on its val split for the shipped model by
# `pumer-plug tune --method pumer --target-speedup 1.5 --measure throughput --budget 60
# --num-val-examples 1000` (docs/benchmarks.md): light pruning (k=0.05) and strong image merging
# (r=0.4) from layer 1. The preset chosen for an earlier training run (layers 2,3,4, k=0.5, r=0.3,
# t=0) costs 7.7 points on the shipped model.
_register("builtin-digits", "chosen on the built-in model's val split by pumer-plug tune (docs/benchmarks.md)", reduction_layers=(1, 3, 5), prune_ratio=0.05, image_merge_ratio=0.4, text_merge_ratio=0.05)
# LLaVA-1.5 budgets (image tokens kept of 576, as decoder-VLM papers report): one reduction point
# after decoder layer 1 (layers 2.. run on the kept tokens, FastV's K = 2); prune to 1.5x the budget
# by text saliency, then merge a third of the survivors; no text merging on decoders.
for _keep in (192, 128, 64):
    _register(f"llava-keep{_keep}", f"keep {_keep} of LLaVA-1.5's 576 image tokens from decoder layer 2",
              reduction_layers=(1,), prune_ratio=(576 - 1.5 * _keep) / 576, image_merge_ratio=(0.5 * _keep) / 576,
              text_merge_ratio=0.0)


# -- reading any method's config ---------------------------------------------------------------

def config_from_mapping(config_cls: type, values: Any, source: str) -> Any:
    """Builds ``config_cls`` from a mapping; unknown fields raise ValueError naming them and ``source``."""
    if not isinstance(values, dict):
        raise UserError(f"{source}: expected a mapping of {config_cls.__name__} fields, got {type(values).__name__}")
    unknown = sorted(set(values) - set(config_cls.field_names()))
    if unknown:
        raise UserError(f"{source}: unknown {config_cls.__name__} field(s) {unknown}; fields: {sorted(config_cls.field_names())}")
    try:
        return config_cls.from_dict(values)
    except (TypeError, ValueError) as err:  # a field's validation: name where the value came from
        raise UserError(f"{source}: {err}") from None


def _finetuned_config(saved: dict, method: str, path: Path) -> dict:
    """The config fields of a ``finetune`` output's ``method.json``; refuses another method or learned state."""
    if saved["method"] != method:
        raise UserError(f"{path} is the method.json of a {saved['method']} finetune, not of {method}")
    if saved.get("state"):
        raise UserError(f"{path}: the finetuned {method} has learned state ({saved['state']}) that --config does not "
                        "load; attach it with pumer_plug.evaluation.training.finetune_io.attach_finetuned")
    return saved["config"] or {}


def read_config_file(path: Path, kind: str = "config file") -> Any:
    """Parses a JSON or YAML file; ``kind`` names it in errors ("config file", "grid file").

    Raises:
        UserError: the file cannot be read or parsed (one line naming the file and the problem).
    """
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"cannot read {kind} {path}: {err.strerror or err}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError
        raise UserError(f"cannot parse {kind} {path}: {parse_error_text(err)}") from None


def parse_error_text(err: Exception) -> str:
    """One line of a JSON or YAML parse error with its line and column (1-based)."""
    mark = getattr(err, "problem_mark", None)  # yaml.MarkedYAMLError; JSONDecodeError has .lineno/.colno
    if mark is not None:
        problem = getattr(err, "problem", None) or type(err).__name__
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    if isinstance(err, json.JSONDecodeError):
        return f"line {err.lineno}, column {err.colno}: {err.msg}"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def load_method_config(method: str, spec: Any = None) -> Any:
    """Returns the config of ``method`` from a preset name, a JSON/YAML path, inline JSON
    (``'{"r": 12}'``), a mapping, or None.

    Raises:
        ValueError: unknown method, unknown preset that is not a file either, unreadable file,
            inline JSON that does not parse to an object, or fields the method's config does not take.
    """
    config_cls = METHODS.get(method).config_class
    if spec is None:
        return config_cls()
    if isinstance(spec, config_cls):
        return spec
    if isinstance(spec, dict):
        return config_from_mapping(config_cls, spec, f"{method} config")
    spec = str(spec)
    if spec.lstrip().startswith("{"):
        try:
            fields = json.loads(spec)
        except json.JSONDecodeError as err:
            raise UserError(f"inline {method} config {spec!r} is not valid JSON: {err.msg} at column {err.colno}") from None
        return config_from_mapping(config_cls, fields, f"inline {method} config")
    presets = config_cls.PRESETS
    if spec in presets:
        return config_cls.preset(spec)
    path = Path(spec)
    if path.suffix.lower() in (".json", ".yaml", ".yml") or path.exists():
        data = read_config_file(path)
        if isinstance(data, dict) and {"method", "config", "adapter"} <= set(data):  # a finetune's method.json
            data = _finetuned_config(data, method, path)
        return config_from_mapping(config_cls, data, str(path))
    known = ", ".join(sorted(presets)) or "(none)"
    raise UserError(f"{spec!r} is neither a {method} preset ({known}), a .json/.yaml config file nor inline JSON")
