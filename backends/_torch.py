"""Torch backend.

Written for CUDA tensors as well as CPU ones: nothing here reads a value back to the host
(no ``.item()``, no ``torch.unique``, no data-dependent output size), so a call issues its
kernels without synchronising. Only ``any``/``to_numpy`` sync, and igpo_rewards calls them for
value checks alone, which ``validate=False`` turns off.
"""

from __future__ import annotations

import torch

from ._base import Backend


_NUMPY_DTYPES = frozenset(
    {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
     torch.float16, torch.float32, torch.float64}
)


class TorchBackend(Backend):
    name = "torch"

    def asarray(self, value, *, like=None):
        device = like.device if isinstance(like, torch.Tensor) else None
        return torch.as_tensor(value, device=device)

    def float_dtype(self, *arrays):
        floats = [a.dtype for a in arrays if a.dtype.is_floating_point]
        if not floats:
            return torch.get_default_dtype()
        dtype = floats[0]
        for other in floats[1:]:
            dtype = torch.promote_types(dtype, other)
        return dtype

    def is_floating(self, x):
        return x.dtype.is_floating_point

    def is_bool(self, x):
        return x.dtype == torch.bool

    def is_integer(self, x):
        return not x.dtype.is_floating_point and not x.dtype.is_complex and x.dtype != torch.bool

    def astype(self, x, dtype):
        return x.to(dtype)

    def statistics_dtype(self, dtype):
        return torch.promote_types(dtype, torch.float32)

    def index_dtype(self):
        return torch.int64

    def zeros(self, shape, dtype, *, like):
        return torch.zeros(tuple(shape), dtype=dtype, device=like.device)

    def arange(self, stop, *, like):
        return torch.arange(stop, device=like.device)

    def where(self, condition, x, y):
        return torch.where(condition, x, y)

    def exp(self, x):
        return torch.exp(x)

    def sqrt(self, x):
        return torch.sqrt(x)

    def maximum(self, x, y):
        if not isinstance(y, torch.Tensor):
            return torch.clamp(x, min=y)
        return torch.maximum(x, y)

    def sum(self, x, axis=None):
        return torch.sum(x) if axis is None else torch.sum(x, dim=axis)

    def cumsum(self, x, axis):
        return torch.cumsum(x, dim=axis)

    def cummax(self, x, axis):
        return torch.cummax(x, dim=axis).values

    def concat(self, arrays, axis):
        return torch.cat(list(arrays), dim=axis)

    def stack(self, arrays, axis):
        return torch.stack(list(arrays), dim=axis)

    def take_along_axis(self, x, index, axis):
        return torch.take_along_dim(x, index, dim=axis)

    def clip(self, x, low, high):
        return torch.clamp(x, low, high)

    def isnan(self, x):
        return torch.isnan(x)

    def isfinite(self, x):
        return torch.isfinite(x)

    def segment_sum(self, values, segment_ids, num_segments):
        out = torch.zeros(num_segments, dtype=values.dtype, device=values.device)
        return out.index_add_(0, segment_ids, values)

    def segment_max(self, values, segment_ids, num_segments):
        out = torch.full((num_segments,), float("-inf"), dtype=values.dtype, device=values.device)
        return out.scatter_reduce_(0, segment_ids, values, reduce="amax", include_self=True)

    def factorize(self, group_ids):
        # Rank of each id among the sorted distinct ids, without torch.unique (a host sync).
        sorted_ids, order = torch.sort(group_ids, stable=True)
        is_new = torch.ones_like(sorted_ids, dtype=torch.int64)
        is_new[1:] = (sorted_ids[1:] != sorted_ids[:-1]).to(torch.int64)
        rank_in_sorted = torch.cumsum(is_new, dim=0) - 1
        dense = torch.empty_like(rank_in_sorted)
        dense[order] = rank_in_sorted
        return dense, max(group_ids.shape[0], 1)

    def prefix_count(self, flags):
        return torch.cumsum(flags, dim=1, dtype=torch.int32)

    def searchsorted_rows(self, sorted_rows, values):
        return torch.searchsorted(sorted_rows.contiguous(), values.to(sorted_rows.dtype).contiguous())

    def gather_rows(self, table, index):
        # One flat index_select with int32 indices (differentiable in table): an int64 [B, S]
        # index, as take_along_dim needs, would double the memory traffic.
        num_rows, width = table.shape
        if table.shape[0] * max(width, 1) >= 2**31 or index.numel() == 0:
            return torch.take_along_dim(table, index.to(torch.int64), dim=1)
        offsets = torch.arange(num_rows, dtype=torch.int32, device=table.device)[:, None] * width
        flat = (index.to(torch.int32) + offsets).reshape(-1)
        return table.reshape(-1).index_select(0, flat).reshape(index.shape)

    def host_numpy(self, *arrays):
        # CPU tensors outside torch.compile and autograd: NumPy's run-length kernels over
        # shared memory are several times faster than torch's CPU kernels here, and NumPy's
        # large allocations avoid the page faults torch's allocator takes on every new
        # [B, S] buffer above glibc's mmap threshold.
        if torch.compiler.is_compiling():
            return None
        for array in arrays:
            if (type(array) is not torch.Tensor or array.device.type != "cpu" or array.requires_grad
                    or array.dtype not in _NUMPY_DTYPES):
                return None
        try:
            return [array.numpy() for array in arrays]
        except RuntimeError:  # e.g. a functorch-transformed tensor: no plain memory to view
            return None

    def from_host(self, array, *, like):
        return torch.from_numpy(array)

    def is_concrete(self, x):
        return not torch.compiler.is_compiling()

    def any(self, x):
        _require_values(x)
        return bool(torch.any(x))

    def to_numpy(self, x):
        _require_values(x)
        return x.detach().cpu().numpy()


def _require_values(x: torch.Tensor) -> None:
    if x.device.type == "meta":
        raise ValueError(
            "igpo_rewards needs the values of a meta tensor here, and meta tensors have none: pass "
            "validate=False (value checks read the data), and max_turns to advantages_from_token_rewards"
        )
