"""Turn bookkeeping (igpo_rewards.turns): hand-computed cases, the float64 oracle on every backend,
Hypothesis properties, and the errors that name the argument."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

import igpo_rewards as igpo
from igpo_rewards.testing import reference, to_backend, token_batches, turn_masks

from .backend_support import given_on_each_backend, library_of, precision, to_numpy

# Three rollouts of 3, 1 and 0 turns (the last is batch padding), hand-written.
RAGGED = [[-2.3, -0.1, -0.4], [-1.2], []]
PADDED = np.array([[-2.3, -0.1, -0.4], [-1.2, 0.0, 0.0], [0.0, 0.0, 0.0]])
PADDED_MASK = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=bool)
RESPONSE_MASK = np.array([
    [1, 1, 0, 0, 1, 0, 1, 1, 0],  # three runs
    [0, 0, 1, 1, 1, 1, 0, 0, 0],  # one run that starts after observation tokens
    [0, 0, 0, 0, 0, 0, 0, 0, 0],  # no generated token
    [1, 0, 1, 0, 1, 0, 1, 0, 1],  # five one-token runs
])
FINAL = np.array([[0, 0, 1], [1, 0, 0], [0, 0, 0]], dtype=bool)


def rows_on(backend, rows, float_dtype="float64"):
    """Each row as a 1-D array of ``backend`` (the device path), or the lists as they are (NumPy)."""
    if backend == "numpy":
        return [list(row) for row in rows]
    return [to_backend(np.asarray(row, dtype=np.float64), backend, float_dtype=float_dtype) for row in rows]


def test_pad_turns_by_hand(backend):
    with precision(backend, "float64"):
        values, turn_mask = igpo.pad_turns(rows_on(backend, RAGGED))
        assert library_of(values) == library_of(turn_mask) == backend
        np.testing.assert_allclose(to_numpy(values), PADDED, rtol=1e-6)
        np.testing.assert_array_equal(to_numpy(turn_mask), PADDED_MASK)
        wider = igpo.pad_turns(rows_on(backend, RAGGED), max_turns=5)
        assert to_numpy(wider.values).shape == (3, 5)
        np.testing.assert_array_equal(to_numpy(wider.turn_mask).sum(axis=1), [3, 1, 0])


def test_pad_turns_edge_cases():
    empty = igpo.pad_turns([])
    assert empty.values.shape == (0, 0) and empty.turn_mask.shape == (0, 0) and empty.values.dtype == np.float64
    assert igpo.pad_turns([], max_turns=4).values.shape == (0, 4)
    only_empty_rows = igpo.pad_turns([[], []])  # rows of zeros: batch padding
    assert only_empty_rows.values.shape == (2, 0)
    assert igpo.pad_turns([[], []], max_turns=2).turn_mask.tolist() == [[False, False], [False, False]]
    # verl's non_tensor_batch column: a NumPy object array of lists; ints promote to the default float.
    column = np.empty(2, dtype=object)
    column[:] = [[0, -1], [-3]]
    assert igpo.pad_turns(column).values.tolist() == [[0.0, -1.0], [-3.0, 0.0]]
    assert igpo.pad_turns([np.array([-1.0], dtype=np.float32), [-2.0, -3.0]]).values.dtype == np.float32


def test_pad_turns_dtype_and_placement_follow_the_library():
    import torch

    on_torch = igpo.pad_turns(RAGGED, like=torch.zeros(1))  # Python floats: torch's default float
    assert on_torch.values.dtype == torch.get_default_dtype() and on_torch.turn_mask.dtype == torch.bool
    torch.testing.assert_close(on_torch.values, torch.as_tensor(PADDED, dtype=torch.get_default_dtype()))
    rows = [torch.tensor([-0.5], dtype=torch.float16), torch.tensor([-0.25, -1.0], dtype=torch.float16)]
    assert igpo.pad_turns(rows).values.dtype == torch.float16
    assert igpo.pad_turns([np.array([-1.0]), [-2.0]], like=torch.zeros(1)).values.dtype == torch.float64


def test_pad_turns_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"max_turns = 2 \(the most turns a rollout may have\), but ragged_turn_values "
                                         r"rows \[0\] have \[3\] turns"):
        igpo.pad_turns(RAGGED, max_turns=2)
    with pytest.raises(ValueError, match=r"ragged_turn_values\[1\] must be 1-D \[n_i\].*got shape \(2, 1\)"):
        igpo.pad_turns([[-1.0], np.zeros((2, 1))])
    with pytest.raises(TypeError, match=r"ragged_turn_values\[0\] must be a sequence or 1-D array.*got float -1.0"):
        igpo.pad_turns([-1.0, -2.0])
    with pytest.raises(TypeError, match=r"ragged_turn_values must be a sequence of B rows.*got str"):
        igpo.pad_turns("abc")
    with pytest.raises(TypeError, match=r"ragged_turn_values\[0\] must hold real numbers, got dtype <U1"):
        igpo.pad_turns([["a"]])
    with pytest.raises(TypeError, match=r"max_turns must be an int, got float 2.0"):
        igpo.pad_turns(RAGGED, max_turns=2.0)
    with pytest.raises(ValueError, match=r"max_turns must be >= 0, got -1"):
        igpo.pad_turns(RAGGED, max_turns=-1)


def test_num_turns_from_response_mask_by_hand(backend):
    counts = igpo.num_turns_from_response_mask(to_backend(RESPONSE_MASK, backend))
    assert library_of(counts) == backend
    np.testing.assert_array_equal(to_numpy(counts), [3, 1, 0, 5])
    as_bool = igpo.num_turns_from_response_mask(to_backend(RESPONSE_MASK.astype(bool), backend))
    np.testing.assert_array_equal(to_numpy(as_bool), [3, 1, 0, 5])
    assert to_numpy(igpo.num_turns_from_response_mask(to_backend(np.zeros((2, 0), dtype=np.int64), backend))).tolist() == [0, 0]


def test_final_turn_mask_by_hand(backend):
    final = igpo.final_turn_mask(to_backend(PADDED_MASK, backend))
    assert library_of(final) == backend
    np.testing.assert_array_equal(to_numpy(final), FINAL)
    np.testing.assert_array_equal(to_numpy(igpo.final_turn_mask(to_backend(PADDED_MASK.astype(np.int64), backend))), FINAL)


def test_turn_errors_name_the_argument(backend):
    with pytest.raises(ValueError, match=r"response_mask must hold only 0/1"):
        igpo.num_turns_from_response_mask(to_backend(np.array([[1, 2, 0]]), backend))
    with pytest.raises(ValueError, match=r"response_mask must have shape \[B, S\]"):
        igpo.num_turns_from_response_mask(to_backend(np.array([1, 0, 1]), backend))
    with pytest.raises(ValueError, match=r"turn_mask must be a prefix mask.*rows \[0\]"):
        igpo.final_turn_mask(to_backend(np.array([[1, 0, 1]]), backend))
    with pytest.raises(ValueError, match=r"turn_mask must have shape \[B, T\]"):
        igpo.final_turn_mask(to_backend(np.array([1, 1, 0]), backend))


ragged_rows = st.lists(st.lists(st.floats(-40.0, 0.0, allow_nan=False), max_size=5), max_size=7)


@given_on_each_backend(rows=ragged_rows, extra=st.integers(0, 2))
def test_pad_turns_matches_the_oracle(backend, rows, extra):
    longest = max((len(row) for row in rows), default=0)
    with precision(backend, "float64"):
        got = igpo.pad_turns(rows_on(backend, rows), max_turns=longest + extra)
        values, turn_mask = to_numpy(got.values), to_numpy(got.turn_mask)
    want = reference.pad_turns(rows, max_turns=longest + extra)
    np.testing.assert_allclose(values, want.values, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(turn_mask, want.turn_mask)
    # properties: row sums are the lengths, a prefix mask, the valid values are the rows in order
    assert turn_mask.sum(axis=1).tolist() == [len(row) for row in rows]
    assert np.all(turn_mask[:, 1:] <= turn_mask[:, :-1])
    np.testing.assert_allclose(values[turn_mask], [value for row in rows for value in row], rtol=1e-12)
    assert np.all(values[~turn_mask] == 0)


@given_on_each_backend(batch=token_batches())
def test_num_turns_from_response_mask_matches_the_oracle_and_the_turn_index(backend, batch):
    counts = to_numpy(igpo.num_turns_from_response_mask(to_backend(batch.response_mask, backend)))
    np.testing.assert_array_equal(counts, reference.num_turns_from_response_mask(batch.response_mask))
    np.testing.assert_array_equal(counts, batch.turn_mask.sum(axis=1))  # the drawn batch's own turn counts
    index = reference.turn_index_from_response_mask(batch.response_mask)
    np.testing.assert_array_equal(counts, index.max(axis=1, initial=-1) + 1)  # identity with the turn index


@given_on_each_backend(turn_mask=st.integers(0, 6).flatmap(lambda rows: turn_masks(rows, 5)))
def test_final_turn_mask_matches_the_oracle(backend, turn_mask):
    final = to_numpy(igpo.final_turn_mask(to_backend(turn_mask, backend)))
    np.testing.assert_array_equal(final, reference.final_turn_mask(turn_mask))
    # properties: one final turn per non-empty row, inside the mask, at n_i - 1
    assert np.all(final <= turn_mask)
    np.testing.assert_array_equal(final.sum(axis=1), turn_mask.any(axis=1).astype(int))
    rows = np.flatnonzero(turn_mask.any(axis=1))
    np.testing.assert_array_equal(final[rows].argmax(axis=1), turn_mask[rows].sum(axis=1) - 1)


@pytest.mark.backends("jax")
def test_turn_bookkeeping_under_jax_jit(backend):
    import jax
    import jax.numpy as jnp

    counts = jax.jit(igpo.num_turns_from_response_mask)(jnp.asarray(RESPONSE_MASK))
    np.testing.assert_array_equal(np.asarray(counts), [3, 1, 0, 5])
    final = jax.jit(igpo.final_turn_mask)(jnp.asarray(PADDED_MASK))
    np.testing.assert_array_equal(np.asarray(final), FINAL)
    padded = jax.jit(lambda a, b: igpo.pad_turns([a, b], max_turns=3))(jnp.asarray([-1.0, -2.0]), jnp.asarray([-3.0]))
    np.testing.assert_allclose(np.asarray(padded.values), [[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(padded.turn_mask), [[1, 1, 0], [1, 0, 0]])
