"""Array backends behind the igpo_rewards API (installed as ``igpo_rewards.backends``).

The math in ``igpo_rewards`` is written once against the small :class:`Backend` interface
defined in :mod:`._base`; each array library supplies only what differs between them:
segment (scatter) reductions, gathers, group-id factorisation, dtype rules and how to tell
a traced value from a concrete one. The backend is chosen from the *types* of the arrays in
a call, einops-style: a framework is looked up in ``sys.modules`` and never imported just to
check, so ``import igpo_rewards`` pulls in neither torch nor jax.

Python lists, tuples and scalars are neutral: they take the backend of the other arguments
(NumPy when every argument is neutral). Two different array libraries in one call are a
``TypeError``.
"""

from __future__ import annotations

import sys
from typing import Any

from ._base import Backend

__all__ = ["Backend", "get_backend", "backend_name_of"]

_NEUTRAL_TYPES = (list, tuple, int, float, bool)


def backend_name_of(value: Any, *, argument: str | None = None) -> str | None:
    """Returns "numpy", "torch" or "jax" for an array of that library, None for neutral values.

    ``argument`` names the value in the TypeError raised for anything else.
    """
    if value is None or isinstance(value, _NEUTRAL_TYPES):
        return None
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, (numpy.ndarray, numpy.generic)):
        return "numpy"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return "torch"
    jax = sys.modules.get("jax")
    if jax is not None and (isinstance(value, jax.Array) or isinstance(value, jax.core.Tracer)):
        return "jax"
    named = f"{argument}: " if argument else ""
    raise TypeError(
        f"{named}igpo_rewards takes NumPy arrays, torch Tensors, JAX arrays, or Python lists/scalars; "
        f"got {type(value).__module__}.{type(value).__qualname__}"
    )


_BACKENDS: dict[str, Backend] = {}


def _load(name: str) -> Backend:
    if name not in _BACKENDS:
        if name == "numpy":
            from ._numpy import NumpyBackend as backend_class
        elif name == "torch":
            from ._torch import TorchBackend as backend_class
        else:
            from ._jax import JaxBackend as backend_class
        _BACKENDS[name] = backend_class()
    return _BACKENDS[name]


def get_backend(**arrays: Any) -> Backend:
    """Picks the backend of the arrays passed by keyword (the keywords name them in errors).

    Raises:
      TypeError: when two array libraries are mixed, or a value is not an array at all.
    """
    found: dict[str, str] = {}
    for argument, value in arrays.items():
        name = backend_name_of(value, argument=argument)
        if name is not None:
            found.setdefault(name, argument)
    if len(found) > 1:
        seen = ", ".join(f"{argument!r} is {name}" for name, argument in found.items())
        raise TypeError(
            f"all arrays of one call must come from the same library; {seen}. "
            f"Convert them first (e.g. torch.as_tensor(x), jnp.asarray(x), np.asarray(x))."
        )
    return _load(next(iter(found), "numpy"))
