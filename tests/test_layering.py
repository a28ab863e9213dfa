"""The package graph runs one way: each core package imports only packages below it (also lazily, inside
functions), so teachers never reach up into mining and evaluation never into training. ``cli`` and ``ablation``
are the application layer on top and may use everything (``nvr ablate`` drives ``nvr fit``)."""

from __future__ import annotations

import ast
from pathlib import Path

LAYERS = ["utils", "data", "search", "config", "modeling", "teachers", "mining", "evaluation", "training"]
APPS = {"cli", "ablation", "testing", "__main__"}
ROOT = Path(__file__).resolve().parents[1] / "nvr"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nvr."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("nvr.")}
    return found


def test_core_packages_import_only_lower_layers() -> None:
    rank = {name: i for i, name in enumerate(LAYERS)}
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(LAYERS) | APPS, f"place new packages in LAYERS: {packages - set(LAYERS) - APPS}"
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        pkg = path.relative_to(ROOT).parts[0].removesuffix(".py")
        if pkg in APPS or pkg not in rank:
            continue
        for target in _imports(path) - {pkg}:
            if target in APPS or rank.get(target, -1) > rank[pkg]:
                upward.append(f"{path.relative_to(ROOT.parent)} imports nvr.{target}")
    assert not upward, "\n".join(upward)
