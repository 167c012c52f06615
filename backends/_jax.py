"""JAX backend. Every operation has a static output shape, so it runs under jax.jit and vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._base import Backend


class JaxBackend(Backend):
    name = "jax"

    def asarray(self, value, *, like=None):
        return jnp.asarray(value)

    def float_dtype(self, *arrays):
        floats = [a.dtype for a in arrays if jnp.issubdtype(a.dtype, jnp.floating)]
        return jnp.result_type(*floats) if floats else jnp.result_type(float)

    def is_floating(self, x):
        return jnp.issubdtype(x.dtype, jnp.floating)

    def is_bool(self, x):
        return x.dtype == jnp.bool_

    def is_integer(self, x):
        return jnp.issubdtype(x.dtype, jnp.integer)

    def astype(self, x, dtype):
        return x.astype(dtype)

    def statistics_dtype(self, dtype):
        return jnp.promote_types(dtype, jnp.float32)

    def index_dtype(self):
        return jnp.result_type(int)

    def zeros(self, shape, dtype, *, like):
        return jnp.zeros(shape, dtype=dtype)

    def arange(self, stop, *, like):
        return jnp.arange(stop)

    def where(self, condition, x, y):
        return jnp.where(condition, x, y)

    def exp(self, x):
        return jnp.exp(x)

    def sqrt(self, x):
        return jnp.sqrt(x)

    def maximum(self, x, y):
        return jnp.maximum(x, y)

    def sum(self, x, axis=None):
        return jnp.sum(x, axis=axis)

    def cumsum(self, x, axis):
        return jnp.cumsum(x, axis=axis)

    def cummax(self, x, axis):
        return jax.lax.cummax(x, axis=axis)

    def concat(self, arrays, axis):
        return jnp.concatenate(arrays, axis=axis)

    def stack(self, arrays, axis):
        return jnp.stack(arrays, axis=axis)

    def take_along_axis(self, x, index, axis):
        return jnp.take_along_axis(x, index, axis=axis)

    def clip(self, x, low, high):
        return jnp.clip(x, low, high)

    def isnan(self, x):
        return jnp.isnan(x)

    def isfinite(self, x):
        return jnp.isfinite(x)

    def segment_sum(self, values, segment_ids, num_segments):
        return jax.ops.segment_sum(values, segment_ids, num_segments=num_segments)

    def segment_max(self, values, segment_ids, num_segments):
        return jax.ops.segment_max(values, segment_ids, num_segments=num_segments)

    def factorize(self, group_ids):
        # Rank of each id among the sorted distinct ids; static shapes, so jit-compatible.
        order = jnp.argsort(group_ids, stable=True)
        sorted_ids = group_ids[order]
        is_new = jnp.concatenate(
            [jnp.ones((min(group_ids.shape[0], 1),), dtype=jnp.int32),
             (sorted_ids[1:] != sorted_ids[:-1]).astype(jnp.int32)]
        )
        rank_in_sorted = jnp.cumsum(is_new) - 1
        dense = jnp.zeros_like(rank_in_sorted).at[order].set(rank_in_sorted)
        return dense, max(group_ids.shape[0], 1)

    def prefix_count(self, flags):
        # XLA's CPU cumsum over a long axis is slow (tens of ns per element). Count in words
        # instead: pack each block of 32 flags into a uint32, count the bits up to every
        # position with population_count, and add the counts of the earlier blocks, a cumsum
        # over S / 32 entries only. Every step is elementwise or a short reduction, so XLA fuses it.
        num_rows, length = flags.shape
        padding = (-length) % 32
        if padding:
            flags = jnp.pad(flags, ((0, 0), (0, padding)))
        num_blocks = flags.shape[1] // 32
        bit = jnp.arange(32, dtype=jnp.uint32)
        words = jnp.sum(
            flags.reshape(num_rows, num_blocks, 32).astype(jnp.uint32) << bit, axis=2, dtype=jnp.uint32
        )
        up_to = jnp.uint32(0xFFFFFFFF) >> (31 - bit)  # bits 0..i set
        within = jax.lax.population_count(words[:, :, None] & up_to).astype(jnp.int32)
        block_counts = jax.lax.population_count(words).astype(jnp.int32)
        before = jnp.cumsum(block_counts, axis=1) - block_counts
        counts = (within + before[:, :, None]).reshape(num_rows, num_blocks * 32)
        return counts[:, :length]

    def searchsorted_rows(self, sorted_rows, values):
        search = jax.vmap(lambda row, targets: jnp.searchsorted(row, targets, side="left"))
        return search(sorted_rows, values.astype(sorted_rows.dtype))

    def gather_rows(self, table, index):
        # A short table (turn slots) reads fastest as a chain of selects that XLA fuses into one
        # loop over the tokens; on CPU its gather is about twice as slow.
        if table.shape[1] > 32:
            return jnp.take_along_axis(table, index, axis=1, mode="promise_in_bounds")
        # Materialise the small table: fused into the loop, its producers would run per token.
        table = jax.lax.optimization_barrier(table)
        out = jnp.broadcast_to(table[:, :1], index.shape)
        for column in range(1, table.shape[1]):
            out = jnp.where(index == column, table[:, column : column + 1], out)
        return out

    def is_concrete(self, x):
        return not isinstance(x, jax.core.Tracer)

    def any(self, x):
        return bool(jnp.any(x))

    def to_numpy(self, x):
        return np.asarray(x)
