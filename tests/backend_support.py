"""Test helpers: run a function on one backend at a chosen precision, read results back.

JAX computes in float32 unless x64 is enabled, so float64 runs on JAX happen inside
``jax.enable_x64(True)``; everything else is plain conversion through
``igpo_rewards.testing.to_backend``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable

import numpy as np
from hypothesis import given, settings

from igpo_rewards.testing import to_backend


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
