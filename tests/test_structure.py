"""Code-shape rules the project holds itself to: no function of fa4aot/ over 100 lines (generated
code is text, not a function here)."""

from __future__ import annotations

import ast
from pathlib import Path

MAX_FUNCTION_LINES = 100
ROOT = Path(__file__).resolve().parent.parent


def test_no_function_is_over_100_lines():
    long = []
    for path in sorted((ROOT / "fa4aot").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
