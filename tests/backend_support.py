"""Test helpers: run a function on one backend at a chosen precision and device, read results back.

JAX computes in float32 unless x64 is enabled, so float64 runs on JAX happen inside
``jax.enable_x64(True)``; everything else is plain conversion through
``igpo_rewards.testing.to_backend``.

The device mode: ``IGPO_TEST_DEVICE=cuda`` puts every torch array that ``to_backend`` / ``run``
make on the GPU (``"cuda"``) and every JAX array on JAX's GPU, and ``run`` checks that results
stay there. NumPy runs as always. The default, ``cpu``, leaves arrays where the libraries put
them. tests/conftest.py skips, with the reason, the torch and JAX tests of the core files when the
mode asks for a GPU that is not there.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable

import numpy as np
from hypothesis import given, settings

from igpo_rewards.testing import to_backend as _to_backend

DEVICE_ENV = "IGPO_TEST_DEVICE"
DEVICES = ("cpu", "cuda")


def test_device() -> str:
    """The device mode, ``IGPO_TEST_DEVICE`` (``cpu`` unless set); anything else is an error."""
    value = os.environ.get(DEVICE_ENV, "cpu").strip().lower() or "cpu"
    if value not in DEVICES:
        raise ValueError(f"{DEVICE_ENV} must be one of {DEVICES}, got {value!r}")
    return value


test_device.__test__ = False  # a helper, not a test


def device_of(backend: str) -> str | None:
    """What ``igpo_rewards.testing.to_backend`` gets as ``device`` for ``backend`` in this mode."""
    if test_device() == "cpu" or backend == "numpy":
        return None
    return "cuda" if backend == "torch" else "gpu"


def to_backend(batch_or_array: Any, backend: str, **options: Any) -> Any:
    """``igpo_rewards.testing.to_backend`` on the device of the mode (``device_of``)."""
    return _to_backend(batch_or_array, backend, device=device_of(backend), **options)


#: Hypothesis examples per test on JAX (``IGPO_JAX_EXAMPLES``). Eager JAX compiles every
#: operation for every new shape, 1.5-4 s per drawn batch on these 2-core machines against
#: milliseconds on NumPy and torch, so JAX draws fewer batches; the other backends keep the
#: profile's count (100 by default).
JAX_EXAMPLES = int(os.environ.get("IGPO_JAX_EXAMPLES", "12"))


def given_on_each_backend(**strategies: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``hypothesis.given(**strategies)`` for a test taking the ``backend`` fixture, with at most
    ``JAX_EXAMPLES`` examples when ``backend == "jax"``.

    Two Hypothesis tests are built from the same body and strategies; the backend picks one at
    call time. pytest sees the signature of the first (the fixtures only).
    """

    def decorate(test: Callable[..., Any]) -> Callable[..., Any]:
        every = given(**strategies)(test)
        fewer = settings(max_examples=JAX_EXAMPLES)(given(**strategies)(test))

        @functools.wraps(every)
        def on_backend(*args: Any, backend: str, **fixtures: Any) -> Any:
            return (fewer if backend == "jax" else every)(*args, backend=backend, **fixtures)

        return on_backend

    return decorate


def precision(backend: str, float_dtype: str):
    """Context in which ``backend`` can hold ``float_dtype`` arrays (x64 for JAX float64)."""
    if backend == "jax" and float_dtype == "float64":
        import jax

        return jax.enable_x64(True)
    return contextlib.nullcontext()


def run(function: Callable[..., Any], backend: str, *arrays: Any, float_dtype: str = "float64", **options: Any) -> Any:
    """Calls ``function`` on the arrays converted to ``backend``; returns NumPy results."""
    with precision(backend, float_dtype):
        converted = [to_backend(np.asarray(a), backend, float_dtype=float_dtype) for a in arrays]
        result = function(*converted, **options)
        check_device(result, backend)
        return to_numpy(result)


def run_jitted(function: Callable[..., Any], backend: str, *arrays: Any, float_dtype: str = "float64",
               **options: Any) -> Any:
    """``run``, but on JAX the call is one ``jax.jit`` program (options closed over, static): a
    drawn batch then costs one compilation instead of one per eager operation (seconds each
    on a busy 2-core machine). NumPy and torch run eagerly, as in ``run``."""
    if backend != "jax":
        return run(function, backend, *arrays, float_dtype=float_dtype, **options)
    import jax

    return run(jax.jit(lambda *a: function(*a, **options)), backend, *arrays, float_dtype=float_dtype)


def check_device(result: Any, backend: str) -> None:
    """In the device mode, every array of ``result`` is on the mode's device (the library keeps the
    input's device)."""
    wanted = device_of(backend)
    if wanted is None:
        return
    for array in (result if isinstance(result, tuple) else (result,)):
        if backend == "torch":
            assert array.device.type == wanted, f"result on {array.device}, inputs on {wanted}"
        else:
            platforms = {device.platform for device in array.devices()}
            assert platforms == {wanted}, f"result on {platforms}, inputs on {wanted}"


def to_numpy(result: Any) -> Any:
    if type(result) is tuple:
        return tuple(to_numpy(r) for r in result)
    if isinstance(result, tuple):  # a NamedTuple such as IGPOAdvantages
        return type(result)(*[to_numpy(r) for r in result])
    if hasattr(result, "detach"):
        return result.detach().cpu().numpy()
    return np.asarray(result)


def library_of(array: Any) -> str:
    module = type(array).__module__.split(".")[0]
    return {"jaxlib": "jax", "numpy": "numpy", "torch": "torch", "jax": "jax"}[module]
