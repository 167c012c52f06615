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
    def statistics_dtype(self, dtype: Any) -> Any:
        """The dtype pool statistics accumulate in: float32 for half-precision (float16,
        bfloat16) data, ``dtype`` itself otherwise. Results are cast back to ``dtype``."""

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
    def cummax(self, x: Array, axis: int) -> Array:
        """Running maximum along ``axis`` (out[..., j, ...] = max of x[..., :j + 1, ...]); keeps the dtype."""

    @abc.abstractmethod
    def concat(self, arrays: Sequence[Array], axis: int) -> Array: ...

    @abc.abstractmethod
    def stack(self, arrays: Sequence[Array], axis: int) -> Array: ...

    @abc.abstractmethod
    def take_along_axis(self, x: Array, index: Array, axis: int) -> Array: ...

    @abc.abstractmethod
    def clip(self, x: Array, low: int, high: int) -> Array:
        """Elementwise min(max(x, low), high) for Python int bounds; keeps the dtype of ``x``."""

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

    # -- token layout (igpo_rewards.tokens) ------------------------------------------------
    @abc.abstractmethod
    def prefix_count(self, flags: Array) -> Array:
        """[B, S] bool -> [B, S] int32: out[b, s] = number of True in flags[b, : s + 1]."""

    @abc.abstractmethod
    def searchsorted_rows(self, sorted_rows: Array, values: Array) -> Array:
        """Row-wise left search: [B, S] non-decreasing ints, [B, Q] ints -> [B, Q] ints.

        out[b, q] = the first s with sorted_rows[b, s] >= values[b, q], S when there is none.
        """

    @abc.abstractmethod
    def gather_rows(self, table: Array, index: Array) -> Array:
        """out[b, s] = table[b, index[b, s]] for [B, K] table and [B, S] ints in [0, K).

        Indices must be in range (callers clip first); nothing is checked.
        """

    def host_numpy(self, *arrays: Array) -> list[Any] | None:
        """Zero-copy NumPy views of ``arrays`` when the token layout may be computed on them.

        The run-length formulation in igpo_rewards.tokens has data-dependent sizes and runs
        on NumPy. A backend returns views when that is both possible and faster (host memory,
        concrete values, no autograd), and None to keep the static-shape formulation (jit,
        accelerators, gradients). Default: None.
        """
        return None

    def from_host(self, array: Any, *, like: Array) -> Array:
        """A NumPy result of the run-length formulation as an array of this library (zero-copy
        where possible), on the device of ``like``."""
        return self.asarray(array, like=like)

    # -- host interaction (validation only) ----------------------------------------------
    @abc.abstractmethod
    def is_concrete(self, x: Array) -> bool:
        """False while tracing (jax.jit/vmap, torch.compile): value checks are skipped then."""

    @abc.abstractmethod
    def any(self, x: Array) -> bool:
        """Python bool of ``x.any()``; a host sync on accelerators. Raises ValueError, saying to
        pass ``validate=False``, for arrays that hold no values (torch's meta device)."""

    @abc.abstractmethod
    def to_numpy(self, x: Array) -> Any:
        """A NumPy copy, for error messages and host-side counts only (same error as ``any``)."""
