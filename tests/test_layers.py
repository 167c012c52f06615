"""The library stands without its reference trainer: reference_trainer imports the library, never the
reverse, and the library's own tests (tests/agent) build their data with igpo_rewards.testing.

An AST walk over every module of igpo_rewards/ (the folder; reference_trainer/ is installed as
igpo_rewards.reference_trainer but is not part of it) and tests/agent/, doctest examples in their
docstrings included: no ``import`` or ``from ... import`` may name igpo_rewards.reference_trainer,
absolutely or relatively.
"""

from __future__ import annotations

import ast
import doctest
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINER = "igpo_rewards.reference_trainer"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _doctest_sources(tree: ast.AST) -> list[tuple[int, str]]:
    """(line of the docstring, code of its doctest examples) for every docstring in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=True)
            examples = doctest.DocTestParser().get_examples(docstring or "")
            if examples:
                found.append((node.body[0].lineno, "".join(example.source for example in examples)))
    return found


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every module an import statement in ``source`` or in one of its
    doctests names; relative imports are resolved against ``package`` (the file's package), and
    ``from X import Y`` also yields ``X.Y``."""
    tree = ast.parse(source)
    names = []
    for line, example in _doctest_sources(tree):
        names += [(line, name) for _, name in imported_modules(example, package)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names.append((node.lineno, base))
            names += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return names


def trainer_imports(source: str, package: str) -> list[tuple[int, str]]:
    return [(line, name) for line, name in imported_modules(source, package)
            if name == TRAINER or name.startswith(TRAINER + ".")]


def trainer_imports_of_files(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
        found += [f"{path.relative_to(ROOT)}:{line} imports {name}"
                  for line, name in trainer_imports(path.read_text(encoding="utf-8"), package)]
    return found


def test_the_library_never_imports_the_reference_trainer():
    modules = sorted((ROOT / "igpo_rewards").rglob("*.py"))
    assert len(modules) > 20, modules
    assert not trainer_imports_of_files(modules)


def test_the_agent_tests_build_their_own_data():
    tests = sorted((ROOT / "tests" / "agent").rglob("*.py"))
    assert tests
    assert not trainer_imports_of_files(tests)


@pytest.mark.parametrize("source, expected", [
    ("from igpo_rewards.reference_trainer.world import build_world\n", True),
    ("import igpo_rewards.reference_trainer.modeling as modeling\n", True),
    ("from .. import reference_trainer\n", True),
    ("from ..reference_trainer import world\n", True),
    ("from igpo_rewards import reference_trainer\n", True),
    ("from igpo_rewards.agent import rollout\n", False),
    ("from . import reference\n", False),
    ('def f():\n    """Example:\n        >>> from igpo_rewards.reference_trainer.modeling import train_tokenizer\n    """\n', True),
    ('def f():\n    """Example:\n        >>> from igpo_rewards.testing.tiny import train_tokenizer\n    """\n', False),
])
def test_the_walk_sees_every_spelling_of_a_trainer_import(source, expected):
    assert bool(trainer_imports(source, "igpo_rewards.agent")) is expected
