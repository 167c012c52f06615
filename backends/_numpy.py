"""NumPy backend. Any hashable group ids (e.g. verl's object array of uid strings) work here."""

from __future__ import annotations

import numpy as np

from ._base import Backend


class NumpyBackend(Backend):
    name = "numpy"

    def asarray(self, value, *, like=None):
        return np.asarray(value)

    def float_dtype(self, *arrays):
        floats = [a.dtype for a in arrays if np.issubdtype(a.dtype, np.floating)]
        return np.result_type(*floats) if floats else np.dtype(np.float64)

    def is_floating(self, x):
        return np.issubdtype(x.dtype, np.floating)

    def is_bool(self, x):
        return x.dtype == np.bool_

    def is_integer(self, x):
        return np.issubdtype(x.dtype, np.integer)

    def astype(self, x, dtype):
        return x.astype(dtype, copy=False)

    def index_dtype(self):
        return np.int64

    def zeros(self, shape, dtype, *, like):
        return np.zeros(shape, dtype=dtype)

    def arange(self, stop, *, like):
        return np.arange(stop)

    def where(self, condition, x, y):
        return np.where(condition, x, y)

    def exp(self, x):
        return np.exp(x)

    def sqrt(self, x):
        return np.sqrt(x)

    def maximum(self, x, y):
        return np.maximum(x, y)

    def sum(self, x, axis=None):
        return np.sum(x, axis=axis)

    def cumsum(self, x, axis):
        return np.cumsum(x, axis=axis)

    def concat(self, arrays, axis):
        return np.concatenate(arrays, axis=axis)

    def stack(self, arrays, axis):
        return np.stack(arrays, axis=axis)

    def take_along_axis(self, x, index, axis):
        return np.take_along_axis(x, index, axis=axis)

    def isnan(self, x):
        return np.isnan(x)

    def isfinite(self, x):
        return np.isfinite(x)

    def segment_sum(self, values, segment_ids, num_segments):
        # bincount accumulates in float64; cast back so float32 stays float32.
        total = np.bincount(segment_ids, weights=values, minlength=num_segments)
        return total.astype(values.dtype, copy=False)

    def segment_max(self, values, segment_ids, num_segments):
        out = np.full(num_segments, -np.inf, dtype=values.dtype)
        np.maximum.at(out, segment_ids, values)
        return out

    def factorize(self, group_ids):
        uniques, inverse = np.unique(np.asarray(group_ids), return_inverse=True)
        return inverse.reshape(-1).astype(np.int64, copy=False), len(uniques)

    def is_concrete(self, x):
        return True

    def any(self, x):
        return bool(np.any(x))

    def to_numpy(self, x):
        return np.asarray(x)
