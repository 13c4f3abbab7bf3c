"""The package's import graph goes one way, as README.md describes:

    config -> model -> engine;  chat beside them;  llm over engine + chat -> serve / cli;  train -> model + chat;
    rl over train + engine + llm -> cli

Every import in every module (relative or absolute, at the top or inside a function, under TYPE_CHECKING too) is
read with ``ast`` and checked against the layers each part may use.  Nothing imports serve or cli.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qwen35"

# Which top-level parts of qwen35 a part may import ("base" = config, presets, memory).  The kernels' dispatch
# (kernels/ops.py) belongs to the model layer: its PyTorch references reuse the model's own maths.
BASE = {"config", "presets", "memory"}
MODEL = {"model", "checkpoint", "quant", "kernels"}
ALLOWED: dict[str, set[str]] = {
    "base": BASE,
    "model": BASE | MODEL,
    "engine": BASE | MODEL | {"engine"},
    "chat": {"chat"},
    "llm": BASE | MODEL | {"engine", "chat", "llm"},
    "train": BASE | MODEL | {"chat", "train"},
    "serve": BASE | MODEL | {"engine", "chat", "llm", "serve"},
    "agent": BASE | MODEL | {"engine", "chat", "llm", "agent"},
    "rl": BASE | MODEL | {"engine", "chat", "llm", "train", "rl"},  # nothing imports rl but cli
    "cli": BASE | MODEL | {"engine", "chat", "llm", "serve", "train", "agent", "rl", "cli"},
    "root": {"checkpoint", "config", "engine", "llm"},  # qwen35/__init__.py: lazy re-exports only
}


def layer_of(part: str) -> str:
    if part in BASE:
        return "base"
    if part in MODEL:
        return "model"
    if part == "__init__":
        return "root"
    return part


def imported_parts(path: Path) -> set[tuple[str, int]]:
    """(top-level qwen35 part, line) of every import of the package in a module."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    package_parts = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found: set[tuple[str, int]] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split(".")
                if names[0] == "qwen35":
                    found.add((names[1] if len(names) > 1 else "__init__", node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = (node.module or "").split(".")
                if names[0] != "qwen35":
                    continue
                absolute = names[1:]
            else:
                base = package_parts[: len(package_parts) - (node.level - 1)] if node.level > 1 else package_parts
                absolute = base + (node.module.split(".") if node.module else [])
            if absolute:
                found.add((absolute[0], node.lineno))
            else:  # "from . import x" at the package root, or "from qwen35 import x"
                found.update((alias.name, node.lineno) for alias in node.names)
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path: Path) -> None:
    rel = path.relative_to(PACKAGE)
    part = rel.parts[0].removesuffix(".py") if len(rel.parts) == 1 else rel.parts[0]
    if part == "__main__":
        part = "cli"
    allowed = ALLOWED[layer_of(part)] | {part}
    wrong = sorted((name, line) for name, line in imported_parts(path)
                   if name not in allowed and name != "__version__")
    assert not wrong, f"{rel} imports {', '.join(f'qwen35.{n} (line {l})' for n, l in wrong)}: not allowed for " \
                      f"the '{layer_of(part)}' layer"


def test_the_checker_sees_violations(tmp_path) -> None:
    # the walker must find relative imports at depth, absolute ones and function-level ones
    fake = PACKAGE / "engine" / "_layering_probe.py"
    assert not fake.exists()
    code = "from ..chat import Tokenizer\nimport qwen35.serve\ndef f():\n    from ...qwen35 import x\n"
    fake.write_text(code)
    try:
        parts = {name for name, _ in imported_parts(fake)}
    finally:
        fake.unlink()
    assert {"chat", "serve"} <= parts


def test_only_cli_imports_rl() -> None:
    for path in MODULES:
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("rl", "cli.py", "__main__.py"):
            continue
        assert "rl" not in {name for name, _ in imported_parts(path)}, f"{rel} imports rl"


def test_nothing_imports_serve_or_cli() -> None:
    for path in MODULES:
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("serve", "cli.py", "__main__.py"):
            continue
        names = {name for name, _ in imported_parts(path)}
        assert not names & {"serve", "cli"}, f"{rel} imports serve or cli"
