"""The shape rules of the four packages that ruff does not check: no function over 60 lines
(ruff's C901 bounds their complexity at 12, pyproject.toml)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("streamer", "learners", "replay", "deploy", "safefiles")
MAX_LINES = 60


def long_functions(root: Path = ROOT) -> list[str]:
    """`path:line name (N lines)` of every function or method longer than MAX_LINES."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_LINES:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_over_60_lines():
    assert long_functions() == []


def test_a_long_function_is_found(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "deploy" / "long.py").write_text(f"def too_long():\n{body}\n")
    assert long_functions(tmp_path) == ["deploy/long.py:1 too_long (61 lines)"]
