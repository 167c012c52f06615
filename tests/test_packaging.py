"""The wheel users install: what it contains, and that a NON-editable install imports cleanly.

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
