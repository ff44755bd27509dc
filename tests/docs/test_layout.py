"""The README's repository layout names every module of the three packages, and nothing that is
not there: the table is how a newcomer finds a behaviour, so it must match the tree."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "teacher_server", "student_client")


def _modules() -> set[str]:
    """Package modules as repository paths, without `__init__.py` and generated code."""
    return {
        path.relative_to(REPO).as_posix()
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if path.name != "__init__.py" and "_pb2" not in path.name
    }


def _named_in_layout() -> set[str]:
    """Paths in the layout table's first column; `v1/grpc.py` after `teacher_server/...` in the
    same cell is read relative to that package."""
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Repository layout", 1)[1].split("\n\n", 2)[2]
    named = set()
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        cell = line.split("|")[1]
        package = ""
        for name in re.findall(r"`([^`]+)`", cell):
            if name.split("/")[0] in PACKAGES:
                package = name.split("/")[0]
            elif package:
                name = f"{package}/{name}"
            if name.endswith(".py"):
                named.add(name)
    return named


def test_the_layout_table_names_every_module() -> None:
    modules, named = _modules(), _named_in_layout()
    assert not modules - named, (
        f"modules missing from the README's layout: {sorted(modules - named)}"
    )
    assert not named - modules, (
        f"the README's layout names what is not there: {sorted(named - modules)}"
    )
