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

    def statistics_dtype(self, dtype):
        return np.promote_types(dtype, np.float32)

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

    def cummax(self, x, axis):
        return np.maximum.accumulate(x, axis=axis)

    def concat(self, arrays, axis):
        return np.concatenate(arrays, axis=axis)

    def stack(self, arrays, axis):
        return np.stack(arrays, axis=axis)

    def take_along_axis(self, x, index, axis):
        return np.take_along_axis(x, index, axis=axis)

    def clip(self, x, low, high):
        return np.clip(x, low, high)

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

    def prefix_count(self, flags):
        return np.cumsum(flags, axis=1, dtype=np.int32)

    def searchsorted_rows(self, sorted_rows, values):
        # One search over the concatenated rows: row b's keys are shifted by b * span, a gap
        # wider than any row's range, so no search crosses into another row.
        num_rows, length = sorted_rows.shape
        if num_rows == 0 or length == 0:
            return np.zeros(values.shape, dtype=np.int64)
        low, high = int(sorted_rows.min()), int(sorted_rows.max())
        span = high - low + 2
        shift = np.arange(num_rows, dtype=np.int64)[:, None] * span
        keys = (sorted_rows.astype(np.int64) - low + shift).reshape(-1)
        targets = (np.clip(values.astype(np.int64) - low, 0, span - 1) + shift).reshape(-1)
        found = np.searchsorted(keys, targets, side="left").reshape(values.shape)
        return found - np.arange(num_rows, dtype=np.int64)[:, None] * length

    def gather_rows(self, table, index):
        return np.take_along_axis(table, index, axis=1)

    def host_numpy(self, *arrays):
        return list(arrays)

    def from_host(self, array, *, like):
        return array

    def is_concrete(self, x):
        return True

    def any(self, x):
        return bool(np.any(x))

    def to_numpy(self, x):
        return np.asarray(x)
