"""The wheel users install, and a checkout that imports exactly what the wheel ships.

A checkout keeps ``backends/`` and ``reference_trainer/`` beside ``igpo_rewards/``; the wheel
installs them as ``igpo_rewards.backends`` and ``igpo_rewards.reference_trainer``
(igpo_rewards/_checkout.py). The checkout tests run a copy of the checkout in a fresh
interpreter started with ``-S`` and the test environment's site-packages on PYTHONPATH: numpy and
einops import, but no ``.pth`` file runs, so no installed igpo-rewards (editable or not) is seen.

Builds the wheel with ``pip wheel . --no-deps`` from a copy of the package sources (so no
``build/`` folder is left in the checkout), installs it with ``pip install --target`` into a
throwaway folder and imports it in fresh interpreters: from another directory (the installed
copy) and from the repository root, where the source folder ``igpo_rewards/`` shadows the
installed package (a plain ``python -c "import igpo_rewards"`` after ``pip install .`` in a
clone). About 20-30 s, most of it pip's isolated build environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "igpo_rewards", "backends", "reference_trainer")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(path, source / name)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--quiet", "-w", str(dist)],
                   check=True, timeout=600, capture_output=True)
    (built,) = dist.glob("igpo_rewards-*.whl")
    return built


def test_wheel_holds_one_igpo_rewards_package_with_its_subpackages(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"igpo_rewards", wheel.name.split("-py3")[0] + ".dist-info"}, top_level
    for expected in ("igpo_rewards/py.typed", "igpo_rewards/backends/_base.py", "igpo_rewards/backends/_torch.py",
                     "igpo_rewards/reference_trainer/training.py", "igpo_rewards/testing/reference.py",
                     "igpo_rewards/integrations/verl.py", "igpo_rewards/integrations/trl/search.py"):
        assert expected in names, expected
    entry_points = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/entry_points.txt").decode()
    assert "igpo-train = igpo_rewards._console:igpo_train" in entry_points
    assert "igpo = igpo_rewards.integrations.verl" in entry_points
    assert "igpo_actor = igpo_rewards.integrations.verl_actor" in entry_points


def _python(code: str, *, cwd: Path, site: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


IMPORTS = (
    "import importlib.util, igpo_rewards, igpo_rewards.backends, igpo_rewards.reference_trainer\n"
    "import numpy as np\n"
    "out = igpo_rewards.grpo_advantages(np.array([1.0, 0.0]), ['q', 'q'])\n"
    "assert np.round(out, 4).tolist() == [1.0, -1.0], out\n"
    "print(igpo_rewards.__file__); print(igpo_rewards.backends.__file__)\n"
)
NO_GENERIC_NAMES = "import importlib.util\nassert importlib.util.find_spec('reference_trainer') is None\n"


def test_non_editable_install_imports_from_anywhere_and_from_the_repository_root(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    assert (site / "igpo_rewards" / "py.typed").is_file()
    assert not (site / "reference_trainer").exists() and not (site / "backends").exists()

    elsewhere = _python(IMPORTS + NO_GENERIC_NAMES, cwd=tmp_path, site=site).split()
    assert elsewhere == [str(site / "igpo_rewards" / "__init__.py"), str(site / "igpo_rewards" / "backends" / "__init__.py")]

    at_root = _python(IMPORTS, cwd=ROOT, site=site).split()  # the checkout's folder shadows the install
    assert at_root == [str(ROOT / "igpo_rewards" / "__init__.py"), str(ROOT / "backends" / "__init__.py")]


# The checkout's own folders, copied for the checkout tests (the project's top level).
CHECKOUT = ("pyproject.toml", "README.md", "igpo_rewards", "backends", "reference_trainer", "docs", "tests", "examples",
            "scripts")
SKIPPED_FOLDERS = {"__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks"}

# Every dotted name a file or folder of the checkout could be imported under: "igpo_rewards." + its
# path (tests/test_docs.py -> igpo_rewards.tests.test_docs, igpo_rewards/settings.py ->
# igpo_rewards.igpo_rewards.settings, backends/_torch.py -> igpo_rewards.backends._torch) and, inside
# igpo_rewards/, its own path (igpo_rewards.settings). It prints those that resolve
# (importlib.util.find_spec, which imports the parent packages) and where the two subpackages are.
PROBE = """
import importlib.util, json, os, sys
root = os.getcwd()
candidates = {"igpo_rewards"}
for folder, subfolders, files in os.walk(root):
    subfolders[:] = sorted(name for name in subfolders if name.isidentifier())
    relative = os.path.relpath(folder, root)
    parts = [] if relative == "." else relative.split(os.sep)
    names = [parts] if parts else []
    names += [parts + [name[:-3]] for name in files if name.endswith(".py") and name[:-3].isidentifier()]
    for dotted in names:
        if dotted[-1] == "__init__":
            dotted = dotted[:-1]
        if not dotted:
            continue
        candidates.add(".".join(["igpo_rewards", *dotted]))
        if dotted[0] == "igpo_rewards":
            candidates.add(".".join(dotted))
importable, missing = [], {}
for name in sorted(candidates):
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError as error:
        found, missing[name] = False, str(error)
    (importable.append(name) if found else None)
for name in ("igpo_rewards.tests", "igpo_rewards.docs", "igpo_rewards.igpo_rewards"):
    try:
        importlib.import_module(name)
        missing[name] = "imported"
    except ModuleNotFoundError as error:
        missing[name] = type(error).__name__
import igpo_rewards.backends, igpo_rewards.reference_trainer
files = {name: sys.modules[name].__file__ for name in ("igpo_rewards", "igpo_rewards.backends", "igpo_rewards.reference_trainer")}
print(json.dumps({"importable": importable, "missing": missing, "files": files}))
"""


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("checkout")
    for name in CHECKOUT:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, copy / name, ignore=shutil.ignore_patterns(*SKIPPED_FOLDERS, "*.egg-info"))
        else:
            shutil.copy(path, copy / name)
    return copy


def _probe(cwd: Path, *, isolated: bool) -> dict:
    """PROBE's report from a fresh interpreter in ``cwd``; ``isolated``: no site (no installed
    igpo-rewards), the environment's site-packages on PYTHONPATH for numpy and einops."""
    import json
    import site

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    command = [sys.executable]
    if isolated:
        env["PYTHONPATH"] = os.pathsep.join(site.getsitepackages())
        command.append("-S")
    done = subprocess.run([*command, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _wheel_modules(wheel: Path) -> list[str]:
    modules = []
    for name in zipfile.ZipFile(wheel).namelist():
        if name.endswith(".py"):
            dotted = name[: -len(".py")].split("/")
            modules.append(".".join(dotted[:-1] if dotted[-1] == "__init__" else dotted))
    return sorted(modules)


@pytest.fixture(scope="module")
def uninstalled_checkout(checkout) -> dict:
    return _probe(checkout, isolated=True)


def test_a_checkout_without_install_resolves_the_two_subpackages_and_nothing_else(checkout, uninstalled_checkout):
    files = uninstalled_checkout["files"]
    assert files == {"igpo_rewards": str(checkout / "igpo_rewards" / "__init__.py"),
                     "igpo_rewards.backends": str(checkout / "backends" / "__init__.py"),
                     "igpo_rewards.reference_trainer": str(checkout / "reference_trainer" / "__init__.py")}
    for name in ("igpo_rewards.tests", "igpo_rewards.docs", "igpo_rewards.igpo_rewards"):
        assert uninstalled_checkout["missing"][name] == "ModuleNotFoundError", name
    importable = set(uninstalled_checkout["importable"])
    assert {"igpo_rewards.backends._torch", "igpo_rewards.reference_trainer.cli", "igpo_rewards.settings"} <= importable
    assert not {name for name in importable if name.startswith(("igpo_rewards.tests", "igpo_rewards.igpo_rewards",
                                                                 "igpo_rewards.docs", "igpo_rewards.examples"))}


def test_the_wheel_ships_exactly_what_a_checkout_imports(wheel, uninstalled_checkout):
    importable, shipped = set(uninstalled_checkout["importable"]), set(_wheel_modules(wheel))
    assert importable == shipped, f"a checkout only: {sorted(importable - shipped)}; the wheel only: {sorted(shipped - importable)}"


def test_an_editable_install_imports_the_same_names_from_anywhere(tmp_path, uninstalled_checkout):
    """This test environment's own install (scripts/setup.sh installs the checkout editable), from
    a folder outside the checkout: the editable finder plus the checkout finder."""
    import json
    import site
    from importlib import metadata

    installed = list(metadata.distributions(name="igpo-rewards", path=site.getsitepackages()))
    direct_url = installed[0].read_text("direct_url.json") if installed else None
    info = json.loads(direct_url) if direct_url else {}
    if not info.get("dir_info", {}).get("editable") or info.get("url") != ROOT.as_uri():
        pytest.skip(f"igpo-rewards is not installed editable from {ROOT} in this environment ({info or 'no direct_url'})")
    elsewhere = _probe(tmp_path, isolated=False)
    assert elsewhere["files"]["igpo_rewards.backends"] == str(ROOT / "backends" / "__init__.py")
    assert elsewhere["files"]["igpo_rewards.reference_trainer"] == str(ROOT / "reference_trainer" / "__init__.py")
    for name in ("igpo_rewards.tests", "igpo_rewards.docs", "igpo_rewards.igpo_rewards"):
        assert elsewhere["missing"][name] == "ModuleNotFoundError", name


# What the starlette imports come from: fastapi requires (and pins) it.
PROVIDED_BY = {"starlette": "fastapi"}


def test_the_server_extra_holds_what_igpo_retrieve_imports():
    """`pip install "igpo-rewards[server] @ git+$IGPO_GIT"` is enough for `igpo-retrieve`: every third-party module
    that igpo_rewards.agent.retrieval_server and the BM25 index it serves import (at the top or
    inside a function) is a requirement of the `server` extra or of the package itself."""
    import ast
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.match(r"[A-Za-z0-9_.-]+", requirement).group().lower().replace("-", "_") for requirement in requirements}

    declared = names(project["optional-dependencies"]["server"]) | names(project["dependencies"])
    imported = set()
    for module in ("retrieval_server", "bm25", "retrieval"):
        tree = ast.parse((ROOT / "igpo_rewards" / "agent" / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    third_party = {PROVIDED_BY.get(name, name) for name in imported
                   if name not in sys.stdlib_module_names and name not in ("igpo_rewards", "__future__")}
    assert {"bm25s", "fastapi", "uvicorn", "pydantic"} <= third_party, third_party
    assert third_party <= declared, third_party - declared


def _script_globs(script: str, pattern: str) -> set[str]:
    return set(__import__("re").findall(pattern, (ROOT / "scripts" / script).read_text(encoding="utf-8")))


def test_the_verl_tests_the_main_suite_skips_run_in_the_verl_pins_job():
    """scripts/test.sh leaves every verl test file and verl module (doctests) to
    scripts/test_verl_pins.sh, which runs exactly those on verl's own pins."""
    skipped = _script_globs("test.sh", r"--ignore-glob='([^']+)'")
    run = _script_globs("test_verl_pins.sh", r"(?<=\s)((?:tests|igpo_rewards)/[\w/*]+\.py)")
    assert skipped == run == {"tests/integrations/test_verl*.py", "igpo_rewards/integrations/*verl*.py"}
    files = {path.relative_to(ROOT).as_posix() for glob in run for path in ROOT.glob(glob)}
    assert {"tests/integrations/test_verl.py", "tests/integrations/test_verl_agent_loop.py",
            "igpo_rewards/integrations/verl.py", "igpo_rewards/integrations/_verl_v1.py"} <= files
    # The globs must really leave those files out of the main suite's collection (pytest's matching
    # of --ignore-glob has changed between releases), and leave the other integration tests in.
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-n", "0",
         *(f"--ignore-glob={glob}" for glob in sorted(skipped)), "tests/integrations", "igpo_rewards/integrations"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    collected_files = {line.split("::")[0] for line in collected.stdout.splitlines() if "::" in line}
    assert collected.returncode == 0, collected.stdout[-2000:] + collected.stderr[-2000:]
    assert not collected_files & files, sorted(collected_files & files)
    assert "tests/integrations/test_trl.py" in collected_files, sorted(collected_files)
    assert ".venv-verl-pins/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert (ROOT / ".ci" / "run").read_text(encoding="utf-8").rstrip().endswith("bash scripts/test_verl_pins.sh")
