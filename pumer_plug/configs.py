"""Reading a method's config from a preset name, a JSON/YAML file, or a mapping."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pumer_plug.registry import METHODS


def config_from_mapping(config_cls: type, values: Any, source: str) -> Any:
    """Builds ``config_cls`` from a mapping; unknown fields raise ValueError naming them and ``source``."""
    if not isinstance(values, dict):
        raise ValueError(f"{source}: expected a mapping of {config_cls.__name__} fields, got {type(values).__name__}")
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{source}: unknown {config_cls.__name__} field(s) {unknown}; fields: {sorted(fields)}")
    return config_cls(**values)


def read_config_file(path: Path) -> Any:
    """Parses a JSON or YAML file.

    Raises:
        ValueError: the file cannot be read or parsed (one line naming the file and the problem).
    """
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"cannot parse config file {path}: {first}") from None


def load_method_config(method: str, spec: Any = None) -> Any:
    """Returns the config of ``method`` from a preset name, a JSON/YAML path, a mapping, or None.

    Raises:
        ValueError: unknown method, unknown preset that is not a file either, unreadable file,
            or fields the method's config does not take.
    """
    config_cls = METHODS.get(method).config_class
    if spec is None:
        return config_cls()
    if isinstance(spec, config_cls):
        return spec
    if isinstance(spec, dict):
        return config_from_mapping(config_cls, spec, f"{method} config")
    spec = str(spec)
    presets = getattr(config_cls, "PRESETS", {})
    if spec in presets:
        return config_cls.preset(spec)
    path = Path(spec)
    if path.suffix.lower() in (".json", ".yaml", ".yml") or path.exists():
        return config_from_mapping(config_cls, read_config_file(path), str(path))
    known = ", ".join(sorted(presets)) or "(none)"
    raise ValueError(f"{spec!r} is neither a {method} preset ({known}) nor a .json/.yaml config file")
