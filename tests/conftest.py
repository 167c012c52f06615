"""Shared pytest configuration: backend and device selection, Hypothesis settings.

Backends under test come from the ``IGPO_TEST_BACKENDS`` environment variable, a comma list
(default ``numpy,torch,jax``). Any test that takes a ``backend`` argument runs once per
requested backend; a requested backend that cannot be imported FAILS that test (it is never
skipped), so a CI job that asks for JAX cannot pass without JAX.

The device mode, ``IGPO_TEST_DEVICE=cuda`` (default ``cpu``), runs the core tests
(tests/test_core_*.py: agreement with the oracle, properties, dtypes, group ids, validation) on
CUDA tensors and on JAX's GPU (tests/backend_support.py). Where torch sees no GPU, or JAX has no
GPU device, their tests of those files are skipped at collection with that reason: the mode
never passes by running on the CPU instead.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
from hypothesis import settings

from .backend_support import DEVICE_ENV, test_device

BACKENDS_ENV = "IGPO_TEST_BACKENDS"
KNOWN_BACKENDS = ("numpy", "torch", "jax")
DEFAULT_BACKENDS = "numpy,torch,jax"

# JAX compiles on first call and Torch warms up lazily: wall-clock deadlines would be flaky.
settings.register_profile("default", deadline=None)
settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def requested_backends() -> list[str]:
    """The backend names listed in IGPO_TEST_BACKENDS (order kept, duplicates dropped)."""
    raw = os.environ.get(BACKENDS_ENV, DEFAULT_BACKENDS)
    names: list[str] = []
    for name in raw.split(","):
        name = name.strip().lower()
        if name and name not in names:
            names.append(name)
    return names


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backends(*names): run the test only on these of the requested backends"
    )
    try:
        test_device()
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None


def missing_gpu(backend: str) -> str | None:
    """Why ``backend`` cannot run the device mode here, or None when it has a GPU."""
    if backend == "torch":
        import torch

        return None if torch.cuda.is_available() else "torch.cuda.is_available() is False"
    import jax

    platforms = sorted({device.platform for device in jax.devices()})
    return None if "gpu" in platforms else f"JAX has no GPU device (its devices: {platforms})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if test_device() != "cuda":
        return
    reasons: dict[str, str | None] = {}
    for item in items:
        backend = getattr(item, "callspec", None) and item.callspec.params.get("backend")
        if not Path(str(item.fspath)).name.startswith("test_core_") or backend not in ("torch", "jax"):
            continue
        if backend not in reasons:
            try:
                reasons[backend] = missing_gpu(backend)
            except ImportError as error:
                reasons[backend] = f"{backend} cannot be imported: {error}"
        if reasons[backend]:
            item.add_marker(pytest.mark.skip(reason=f"{DEVICE_ENV}=cuda asks for a GPU: {reasons[backend]}"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        names = requested_backends()
        marker = metafunc.definition.get_closest_marker("backends")
        if marker is not None:
            names = [name for name in names if name in marker.args]
        metafunc.parametrize("backend", names, indirect=True, scope="session")


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> str:
    """One requested backend name; fails (not skips) when it is unknown or not importable."""
    name = request.param
    if name not in KNOWN_BACKENDS:
        pytest.fail(f"{BACKENDS_ENV} names unknown backend {name!r}; known: {KNOWN_BACKENDS}")
    if name != "numpy":
        try:
            importlib.import_module(name)
        except ImportError as error:
            pytest.fail(
                f"backend {name!r} was requested ({BACKENDS_ENV}="
                f"{os.environ.get(BACKENDS_ENV, DEFAULT_BACKENDS)!r}) but cannot be imported: {error}"
            )
    return name
