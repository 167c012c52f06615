"""No import cycles inside the package: the import graph of every module igpo_rewards ships is a DAG.

The graph is read from the source with ``ast`` (no module is imported): every ``import`` and
``from ... import`` anywhere in a module, inside functions, ``if TYPE_CHECKING:`` blocks and
module ``__getattr__`` hooks included, since a lazy import that closes a cycle is still a cycle
(two modules that can only be imported in one order). ``from pkg import name`` is an edge to
``pkg.name`` when that is a module of the package, else to ``pkg``. Module names are the
installed ones: ``backends/`` is ``igpo_rewards.backends``, ``reference_trainer/`` is
``igpo_rewards.reference_trainer`` (pyproject's package-dir).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"igpo_rewards": ROOT / "igpo_rewards", "igpo_rewards.backends": ROOT / "backends",
           "igpo_rewards.reference_trainer": ROOT / "reference_trainer"}


def package_modules() -> dict[str, Path]:
    """Installed module name -> source file, for every module the wheel ships."""
    modules = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            parts = [part for part in relative.parts if part != "__init__"]
            modules[".".join([prefix, *parts])] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` (at ``path``) imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else source)
    edges = set()
    for target in found:
        while target and target not in modules:  # `import a.b.c` of a module, or a name inside one
            target = target.rpartition(".")[0]
        if target and target != name:
            edges.add(target)
    return edges


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    modules = package_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def test_the_graph_sees_the_package():
    graph = import_graph()
    for module in ("igpo_rewards.turns", "igpo_rewards.integrations.trl.trainer", "igpo_rewards.integrations.trl.search",
                   "igpo_rewards.backends", "igpo_rewards.backends._torch", "igpo_rewards.reference_trainer.training"):
        assert module in graph, module
    assert "igpo_rewards.integrations.trl.trainer" in graph["igpo_rewards.integrations.trl.search"]
    assert "igpo_rewards.reference_trainer.metrics" in graph["igpo_rewards.reference_trainer.training"]


def test_no_import_cycles_inside_the_package():
    try:
        graphlib.TopologicalSorter(import_graph()).prepare()
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


def test_a_cycle_is_found():
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter({"a": {"b"}, "b": {"c"}, "c": {"a"}}).prepare()


@pytest.mark.parametrize("source", ["import igpo_rewards.a.b", "from . import b", "from .b import thing", "from .. import c"])
def test_edges_resolve_like_python(tmp_path, source):
    modules = {"igpo_rewards.a": tmp_path / "a" / "__init__.py", "igpo_rewards.a.b": tmp_path / "a" / "b.py",
               "igpo_rewards.c": tmp_path / "c.py", "igpo_rewards.a.d": tmp_path / "a" / "d.py"}
    path = modules["igpo_rewards.a.d"]
    path.parent.mkdir(parents=True)
    path.write_text(source + "\n")
    expected = {"import igpo_rewards.a.b": {"igpo_rewards.a.b"}, "from . import b": {"igpo_rewards.a.b"},
                "from .b import thing": {"igpo_rewards.a.b"}, "from .. import c": {"igpo_rewards.c"}}[source]
    assert imported_modules("igpo_rewards.a.d", path, modules) == expected
