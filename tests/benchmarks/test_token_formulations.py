"""Both formulations of the token layout agree with the float64 oracle, on every backend.

igpo_rewards.tokens computes the token layout two ways (see its module docstring): a
run-length formulation on NumPy memory (NumPy arrays, torch CPU tensors) and a static-shape one
(JAX, torch on accelerators / under torch.compile / with autograd). The backend picks one via
``Backend.host_numpy``; here the static-shape formulation is also forced on NumPy and torch
(``host_numpy`` patched to return None), so both formulations are compared with the oracle on
NumPy and torch, and their input errors carry the same message. JAX has only the static-shape
formulation, which tests/test_core_*.py already run on JAX.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import igpo_rewards as igpo
from igpo_rewards.backends import _load
from igpo_rewards.testing import reference, token_batches

from ..backend_support import run

TOLERANCE = dict(rtol=1e-9, atol=1e-9)
FORMULATIONS = ("run_length", "static_shape")


@pytest.fixture(params=FORMULATIONS)
def formulation(request, backend, monkeypatch):
    """Forces the formulation on NumPy and torch (tests taking it are marked ``backends("numpy", "torch")``:
    JAX has only the static-shape formulation, which tests/test_core_*.py run on JAX)."""
    if request.param == "static_shape":
        monkeypatch.setattr(type(_load(backend)), "host_numpy", lambda self, *arrays: None)
    return request.param


def test_backends_pick_the_expected_formulation(backend):
    """NumPy and torch CPU tensors take the run-length path; JAX and autograd do not."""
    chosen = _load(backend)
    sample = np.zeros((2, 3), dtype=np.float32)
    if backend == "numpy":
        assert chosen.host_numpy(sample) is not None
    elif backend == "torch":
        import torch

        assert chosen.host_numpy(torch.from_numpy(sample)) is not None
        assert chosen.host_numpy(torch.zeros(2, 3, requires_grad=True)) is None
        assert chosen.host_numpy(torch.zeros(2, 3, dtype=torch.bfloat16)) is None
    else:
        import jax.numpy as jnp

        assert chosen.host_numpy(jnp.zeros((2, 3))) is None


# The patched host_numpy (a function-scoped fixture) is meant to hold for every example.
@pytest.mark.backends("numpy", "torch")
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=token_batches(final_reward_after_last_run=True, max_turns=5, max_turn_tokens=4),
    gamma=st.sampled_from([1.0, 0.5]),
    mode=st.sampled_from(["joint", "separate"]),
    extra_turns=st.integers(0, 2),
)
def test_token_path_matches_the_oracle(backend, formulation, batch, gamma, mode, extra_turns):
    _check_token_path(backend, batch, gamma, mode, extra_turns)


def _check_token_path(backend, batch, gamma, mode, extra_turns):
    max_turns = batch.turn_mask.shape[1] + extra_turns
    options = dict(gamma=gamma, mode=mode, max_turns=max_turns)
    got = run(igpo.advantages_from_token_rewards, backend, batch.token_level_rewards, batch.response_mask,
              batch.group_ids, **options)
    want = reference.advantages_from_token_rewards(
        batch.token_level_rewards, batch.response_mask, batch.group_ids, **options)
    np.testing.assert_allclose(got, want, **TOLERANCE)

    index = run(igpo.turn_index_from_response_mask, backend, batch.response_mask)
    np.testing.assert_array_equal(index, reference.turn_index_from_response_mask(batch.response_mask))
    values = np.linspace(-1.0, 1.0, batch.turn_rewards.size).reshape(batch.turn_rewards.shape)
    spread = run(_broadcast_with_turn_mask, backend, values, index, batch.turn_mask)
    np.testing.assert_allclose(spread, reference.broadcast_to_tokens(values, index), **TOLERANCE)
    placed = run(igpo.place_turn_rewards, backend, batch.turn_rewards, batch.response_mask)
    np.testing.assert_allclose(placed, reference.place_turn_rewards(batch.turn_rewards, batch.response_mask),
                               **TOLERANCE)


@pytest.mark.backends("numpy", "torch")
def test_unvalidated_out_of_range_reads_zero(backend, formulation):
    """validate=False: an index >= T or < -1 reads 0; turns past max_turns get 0 and lose their reward."""
    values = np.array([[0.5, -1.0], [2.0, 3.0]])
    index = np.array([[0, 1, 2, -1, -7], [1, 5, 0, 0, -1]])
    got = run(igpo.broadcast_to_tokens, backend, values, index, validate=False)
    np.testing.assert_allclose(got, [[0.5, -1.0, 0.0, 0.0, 0.0], [3.0, 0.0, 2.0, 2.0, 0.0]])

    mask = np.array([[1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0]])
    rewards = np.array([[1.0, 0.0, 2.0, 0.0, 4.0, 8.0], [0.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    got = run(igpo.advantages_from_token_rewards, backend, rewards, mask, np.array([0, 0]),
              scale="none", max_turns=2, validate=False)
    # Turns 0, 1 of row 0 (rewards 1, 2) and turn 0 of row 1 (3) form the pool, mean 2; row 0's
    # third turn and its trailing reward 8 are past max_turns: dropped. A_00 = (1 - 2) + (2 - 2).
    np.testing.assert_allclose(got, [[-1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])


def _broadcast_with_turn_mask(turn_values, token_turn_index, turn_mask):
    return igpo.broadcast_to_tokens(turn_values, token_turn_index, turn_mask=turn_mask)


ERROR_CASES = {
    "nan_at_a_turn_end": (
        [[1, 1, 0, 1, 0]], [[0.0, np.nan, 0.0, 1.0, 0.0]], {}, "NaN/inf at indices \\[\\[0, 1\\]\\]"),
    "inf_after_the_last_turn": (
        [[1, 0, 1, 0, 0]], [[1.0, 0.0, 0.0, 0.0, np.inf]], {}, "NaN/inf at indices \\[\\[0, 4\\]\\]"),
    "reward_between_turns": (
        [[1, 0, 0, 1, 0]], [[1.0, 0.0, 0.5, 1.0, 0.0]], {}, "between turns at \\(row, token\\) \\[\\[0, 2\\]\\]"),
    "reward_before_the_first_turn": (
        [[0, 1, 1, 0, 0]], [[0.5, 0.0, 1.0, 0.0, 0.0]], {}, "between turns at \\(row, token\\) \\[\\[0, 0\\]\\]"),
    "more_runs_than_max_turns": (
        [[1, 0, 1, 0, 1]], [[1.0, 0.0, 1.0, 0.0, 1.0]], {"max_turns": 2}, "max_turns = 2 in rows \\[0\\]"),
}


@pytest.mark.backends("numpy", "torch")
@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_token_reward_errors_are_the_same(backend, formulation, case):
    mask, rewards, options, message = ERROR_CASES[case]
    with pytest.raises(ValueError, match=message):
        run(igpo.advantages_from_token_rewards, backend, np.array(rewards), np.array(mask), np.array([0]), **options)


@pytest.mark.backends("numpy", "torch")
def test_values_off_the_read_positions_are_refused_or_ignored(backend, formulation):
    """Only a run's last token is read. Under validate=True a value elsewhere in a turn (NaN
    too) or in a row without generated tokens would be lost, so both formulations refuse it with
    the same message; with validate=False they ignore it and read the same advantages."""
    mask = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]])
    inside_a_turn = np.array([[np.nan, 1.0, 0.0, 3.0, 0.0], [0.0] * 5])
    empty_row = np.array([[0.0, 1.0, 0.0, 3.0, 0.0], [5.0, 0.0, 0.0, 0.0, 2.0]])
    for rewards in (inside_a_turn, empty_row):
        with pytest.raises(ValueError, match="token_level_rewards"):
            run(igpo.advantages_from_token_rewards, backend, rewards, mask, np.array([0, 0]), scale="none")
        got = run(igpo.advantages_from_token_rewards, backend, rewards, mask, np.array([0, 0]), scale="none",
                  validate=False)
        np.testing.assert_allclose(got, [[0.0, 0.0, 0.0, 1.0, 0.0], [0.0] * 5])


@pytest.mark.backends("numpy", "torch")
@pytest.mark.parametrize("with_turn_mask", [False, True])
def test_index_errors_are_the_same(backend, formulation, with_turn_mask):
    values = np.array([[0.5, -1.0], [2.0, 3.0]])
    index = np.array([[0, 1, -1, -1], [0, 0, 1, -1]])
    if with_turn_mask:
        turn_mask = np.array([[1, 1], [1, 0]])
        pattern = "n_b .*out of range at \\(row, token\\) \\[\\[1, 2\\]\\]"
        with pytest.raises(ValueError, match=pattern):
            run(_broadcast_with_turn_mask, backend, values, index, turn_mask)
    else:
        index[0, 3] = -2
        index[1, 1] = 2
        with pytest.raises(ValueError, match="out of range at \\(row, token\\) \\[\\[0, 3\\], \\[1, 1\\]\\]"):
            run(igpo.broadcast_to_tokens, backend, values, index)
