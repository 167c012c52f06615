"""Shared pytest configuration: backend selection and Hypothesis settings.

Backends under test come from the ``IGPO_TEST_BACKENDS`` environment variable, a comma list
(default ``numpy,torch,jax``). Any test that takes a ``backend`` argument runs once per
requested backend; a requested backend that cannot be imported FAILS that test (it is never
skipped), so a CI job that asks for JAX cannot pass without JAX.
"""

from __future__ import annotations

import importlib
import os

import pytest
from hypothesis import settings

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
