"""No function of the package is over about 60 lines of code (issue 18's rule): a longer one is
split where it has more than one job.

Lines of code are the function's lines that are not blank, not only a comment, and not its
docstring (nested functions count in their parent too). The walk covers igpo_rewards/,
backends/ and reference_trainer/, the three folders the wheel ships.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("igpo_rewards", "backends", "reference_trainer")
MAX_LINES_OF_CODE = 60


def lines_of_code(source: str) -> dict[str, int]:
    """``name:line`` -> lines of code of every function and method in ``source``."""
    lines = source.splitlines()
    counts = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = set()
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            docstring = set(range(first.lineno, first.end_lineno + 1))
        counts[f"{node.name}:{node.lineno}"] = sum(
            1 for number in range(node.lineno, node.end_lineno + 1)
            if number not in docstring and lines[number - 1].strip() and not lines[number - 1].strip().startswith("#"))
    return counts


def test_the_count_skips_blanks_comments_and_the_docstring():
    source = 'def f(x):\n    """Doc.\n\n    More.\n    """\n    # a comment\n\n    y = x\n    return y\n\n\ndef g():\n    pass\n'
    assert lines_of_code(source) == {"f:1": 3, "g:12": 2}


def test_nested_functions_count_in_their_parent():
    source = "def outer():\n    def inner():\n        return 1\n    return inner\n"
    assert lines_of_code(source) == {"outer:1": 4, "inner:2": 2}


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_function_is_over_60_lines_of_code(folder):
    paths = sorted((ROOT / folder).rglob("*.py"))
    assert paths, f"no Python files under {folder}/"
    too_long = [f"{path.relative_to(ROOT)}:{name.partition(':')[2]} {name.partition(':')[0]} ({count} lines)"
                for path in paths
                for name, count in lines_of_code(path.read_text(encoding="utf-8")).items()
                if count > MAX_LINES_OF_CODE]
    assert not too_long, too_long
