"""The interface every array backend implements.

Only operations whose spelling differs between NumPy, Torch and JAX live here. Element-wise
arithmetic, comparisons, ``&``/``|``/``~`` on bool arrays, slicing and integer-array
indexing (``values[index]``) are written directly in igpo_rewards, since they mean the same in
all three libraries.
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

Array = Any


class Backend(abc.ABC):
    """Array operations that differ between libraries. One instance per library."""

    name: str

    # -- conversion and dtypes ------------------------------------------------------------
    @abc.abstractmethod
    def asarray(self, value: Any, *, like: Array | None = None) -> Array:
        """Converts lists/scalars/arrays to this library, on the device of ``like`` if given."""

    @abc.abstractmethod
    def float_dtype(self, *arrays: Array) -> Any:
        """The floating dtype results take: the promoted dtype of the floating inputs, or the
        library's default float when no input is floating (int/bool rewards)."""

    @abc.abstractmethod
    def is_floating(self, x: Array) -> bool: ...

    @abc.abstractmethod
    def is_bool(self, x: Array) -> bool: ...

    @abc.abstractmethod
    def is_integer(self, x: Array) -> bool: ...

    @abc.abstractmethod
    def astype(self, x: Array, dtype: Any) -> Array: ...

    @abc.abstractmethod
    def index_dtype(self) -> Any:
        """Integer dtype of turn indices (int64 on NumPy/Torch, JAX's default int)."""

    # -- creation -----------------------------------------------------------------------
    @abc.abstractmethod
    def zeros(self, shape: Sequence[int], dtype: Any, *, like: Array) -> Array: ...

    @abc.abstractmethod
    def arange(self, stop: int, *, like: Array) -> Array: ...

    # -- math -----------------------------------------------------------------------------
    @abc.abstractmethod
    def where(self, condition: Array, x: Array, y: Array | float) -> Array: ...

    @abc.abstractmethod
    def exp(self, x: Array) -> Array: ...

    @abc.abstractmethod
    def sqrt(self, x: Array) -> Array: ...

    @abc.abstractmethod
    def maximum(self, x: Array, y: Array | float) -> Array: ...

    @abc.abstractmethod
    def sum(self, x: Array, axis: int | None = None) -> Array: ...

    @abc.abstractmethod
    def cumsum(self, x: Array, axis: int) -> Array: ...

    @abc.abstractmethod
    def concat(self, arrays: Sequence[Array], axis: int) -> Array: ...

    @abc.abstractmethod
    def stack(self, arrays: Sequence[Array], axis: int) -> Array: ...

    @abc.abstractmethod
    def take_along_axis(self, x: Array, index: Array, axis: int) -> Array: ...

    @abc.abstractmethod
    def isnan(self, x: Array) -> Array: ...

    @abc.abstractmethod
    def isfinite(self, x: Array) -> Array: ...

    # -- segment reductions ---------------------------------------------------------------
    @abc.abstractmethod
    def segment_sum(self, values: Array, segment_ids: Array, num_segments: int) -> Array:
        """out[k] = sum of values[n] with segment_ids[n] == k; shapes [N], [N] -> [num_segments]."""

    @abc.abstractmethod
    def segment_max(self, values: Array, segment_ids: Array, num_segments: int) -> Array:
        """out[k] = max of values[n] with segment_ids[n] == k (-inf for an empty segment)."""

    @abc.abstractmethod
    def factorize(self, group_ids: Array) -> tuple[Array, int]:
        """Maps arbitrary group ids [B] to dense ids in [0, num_segments).

        Returns (dense_ids [B] integer array, num_segments). ``num_segments`` is an upper bound
        known without looking at the data where the library needs static sizes (Torch, JAX: B),
        so no host sync and no recompilation happens; segments no id maps to stay empty.
        """

    # -- host interaction (validation only) ----------------------------------------------
    @abc.abstractmethod
    def is_concrete(self, x: Array) -> bool:
        """False while tracing (jax.jit/vmap, torch.compile): value checks are skipped then."""

    @abc.abstractmethod
    def any(self, x: Array) -> bool:
        """Python bool of ``x.any()``; a host sync on accelerators."""

    @abc.abstractmethod
    def to_numpy(self, x: Array) -> Any:
        """A NumPy copy, for error messages only."""
