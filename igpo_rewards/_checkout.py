"""Imports from a source checkout: the two subpackages that live beside ``igpo_rewards/``.

The wheel installs ``backends/`` as ``igpo_rewards.backends`` and ``reference_trainer/`` as
``igpo_rewards.reference_trainer`` (the ``package-dir`` mapping in pyproject.toml). In a checkout
they sit next to ``igpo_rewards/``, not inside it. When ``igpo_rewards`` is imported from a
checkout (the repository root on ``sys.path``, installed editable, as a wheel, or not at all),
``igpo_rewards/__init__.py`` calls ``install_if_checkout``, which puts ``CheckoutFinder`` first
on ``sys.meta_path``. The finder answers for exactly those two names, so a checkout imports what
the wheel ships and nothing else: ``igpo_rewards.tests``, ``igpo_rewards.docs`` or
``igpo_rewards.igpo_rewards`` are ``ModuleNotFoundError`` (tests/test_packaging.py).
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Sequence

#: Subpackage name -> its folder at the repository root (pyproject.toml's ``package-dir``).
CHECKOUT_SUBPACKAGES = {
    "igpo_rewards.backends": "backends",
    "igpo_rewards.reference_trainer": "reference_trainer",
}


class CheckoutFinder:
    """A meta path finder for the names of ``CHECKOUT_SUBPACKAGES`` in one checkout ``root``.

    Their own submodules (``igpo_rewards.backends._torch``) are found the ordinary way, through
    the package's ``__path__``.
    """

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: object = None) -> ModuleSpec | None:
        folder = CHECKOUT_SUBPACKAGES.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.root / folder / "__init__.py", submodule_search_locations=[str(self.root / folder)]
        )

    def __repr__(self) -> str:
        return f"CheckoutFinder({str(self.root)!r})"


def checkout_root(package_dir: str) -> Path | None:
    """The repository root when ``package_dir`` (the folder of ``igpo_rewards/__init__.py``) is a
    checkout's, else None (an installed wheel holds the subpackages inside the package)."""
    package = Path(package_dir)
    root = package.parent
    if (package / "backends").is_dir() or not (root / "pyproject.toml").is_file():
        return None
    if all((root / folder / "__init__.py").is_file() for folder in CHECKOUT_SUBPACKAGES.values()):
        return root
    return None


def install_if_checkout(package_dir: str) -> None:
    """Put a ``CheckoutFinder`` for this checkout first on ``sys.meta_path`` (once)."""
    root = checkout_root(package_dir)
    if root is None:
        return
    for finder in sys.meta_path:
        if isinstance(finder, CheckoutFinder) and finder.root == root:
            return
    sys.meta_path.insert(0, CheckoutFinder(root))
