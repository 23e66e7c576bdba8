"""Registries: lazy built-in declarations (pumer_plug/catalog.py) and a `list` that imports no torch."""
from __future__ import annotations

import importlib
import json
import pkgutil
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from pumer_plug.config import MethodConfig
from pumer_plug.errors import UserError
from pumer_plug.registry import ADAPTERS, BENCH_MODELS, METHODS, TASKS, LazyEntry, Registry, docstring_summary

REGISTRIES = {"method": METHODS, "adapter": ADAPTERS, "task": TASKS, "bench model": BENCH_MODELS}
HEAVY = ("torch", "transformers", "timm", "open_clip", "pumer_plug.adapters.base", "pumer_plug.method")



def declared(registry: Registry) -> list[str]:
    """The built-in names (declared in pumer_plug/catalog.py; other test modules register their own)."""
    return [name for name in registry.list() if isinstance(registry._entries[name], LazyEntry)]


_LIST_IN_FRESH_INTERPRETER = """
import contextlib, io, json, sys
from pumer_plug.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(["list"])
print(json.dumps({"code": code, "out": out.getvalue(), "heavy": [m for m in HEAVY if m in sys.modules]}))
"""


def test_list_imports_no_torch_and_names_every_method_adapter_task_and_bench_setup():
    script = f"HEAVY = {HEAVY!r}\n" + _LIST_IN_FRESH_INTERPRETER
    result = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert result["code"] == 0 and result["heavy"] == []
    out = result["out"]
    for name in declared(METHODS):
        config_cls = METHODS.get(name).config_class
        assert f"  {name}: {config_cls.__name__}\n" in out
        block = re.search(rf"^  {name}: .*?(?=^  \S|^\S)", out, re.M | re.S).group(0)
        assert all(f"{field_name}=" in block for field_name in config_cls.field_names()), block
        for preset in config_cls.list_presets():
            assert f"preset {preset:16s} {config_cls.preset(preset).describe()}" in out
    for registry in (ADAPTERS, TASKS, BENCH_MODELS):
        for name in declared(registry):
            assert f"  {name:16s} {docstring_summary(registry.get(name))[:40]}" in out


@pytest.mark.parametrize("kind, name", [(kind, name) for kind, reg in REGISTRIES.items() for name in declared(reg)])
def test_every_declaration_imports_and_agrees_with_the_object(kind, name):
    registry = REGISTRIES[kind]
    entry = registry._entries[name]
    obj = registry.get(name)
    assert f"{obj.__module__}:{obj.__qualname__}" == entry.target
    assert registry.summary(name) == docstring_summary(obj), "the catalog's summary drifted from the docstring"
    if registry is METHODS:
        assert registry.attribute(name, "config_class") is obj.config_class and obj.name == name
    elif registry is ADAPTERS:
        assert obj.name == name


def test_importing_every_built_in_module_registers_nothing_beyond_the_catalog():
    before = {kind: reg.list() for kind, reg in REGISTRIES.items()}
    for package in ("pumer_plug.adapters", "pumer_plug.baselines", "pumer_plug.evaluation"):
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
            importlib.import_module(info.name)
    importlib.import_module("pumer_plug.pumer")
    assert {kind: reg.list() for kind, reg in REGISTRIES.items()} == before
    for registry in REGISTRIES.values():  # whatever the package itself registers is declared in the catalog
        eager = [name for name in registry.list() if name not in declared(registry)]
        assert not [name for name in eager if getattr(registry.get(name), "__module__", "").startswith("pumer_plug.")]


def test_get_imports_only_the_module_of_the_entry():
    script = ("import sys\nfrom pumer_plug.registry import METHODS\nMETHODS.get('tome')\n"
              "print(sorted(m for m in sys.modules if m.startswith(('pumer_plug.baselines.', 'pumer_plug.adapters.'))))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "pumer_plug.baselines.tome'" in loaded and "dynamicvit'" not in loaded and "adapters.vilt" not in loaded


@dataclass(frozen=True)
class _ShiftConfig(MethodConfig):
    shift: int = 1
    LABEL = "Shift"


_ShiftConfig.register_preset("two", "a test preset", shift=2)


class _Shift:
    """A user's method (registered with the decorator)."""

    name = "shift"
    config_class = _ShiftConfig


def test_user_registered_entries_are_listed_and_built(monkeypatch, capsys):
    from pumer_plug.cli import main

    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))
    METHODS.register("shift")(_Shift)
    assert METHODS.get("shift") is _Shift and METHODS.attribute("shift", "config_class") is _ShiftConfig
    assert METHODS.summary("shift") == "A user's method (registered with the decorator)."
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "  shift: _ShiftConfig\n    fields: shift=1\n    preset two" in out
    with pytest.raises(ValueError, match="already registered"):
        METHODS.register("tome")(_Shift)
    with pytest.raises(UserError, match=r"unknown method 'nosuch'; registered methods: .*shift.*tome"):
        METHODS.get("nosuch")


def test_a_declared_entry_is_imported_on_first_get_only():
    registry = Registry("thing")
    registry.declare("json-dumps", "json:dumps", "Serialize obj to a JSON formatted str.", doc="json:__doc__")
    assert registry.list("json-*") == ["json-dumps"] and registry.summary("json-dumps").startswith("Serialize")
    assert registry._loaded == {}
    assert registry.get("json-dumps") is json.dumps and registry._loaded == {"json-dumps": json.dumps}
    assert registry.attribute("json-dumps", "doc") == json.__doc__
    with pytest.raises(ValueError, match="already registered"):
        registry.declare("json-dumps", "json:loads", "")
