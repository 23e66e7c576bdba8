"""The wheel's package list names every package folder of the tree (under its pumer_plug import name)."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_in_the_wheel():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folder_of = {name: ROOT / folder for name, folder in tool["package-dir"].items()}
    found = set()
    for name, folder in folder_of.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            if ".venv" not in init.parts and "tests" not in init.parts:
                found.add(".".join((name, *parts)))
    assert found == set(tool["packages"])
