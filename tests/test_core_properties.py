"""Algebraic properties of the pipeline that hold whatever the data (rlax-style identities)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

import igpo_rewards as igpo
from igpo_rewards.testing import turn_batches

from .backend_support import given_on_each_backend, run

# Hypothesis draws batches whose groups are all single rollouts on purpose (an edge case of the
# equations); the warning that says so to users is tested in test_core_validation.py.
pytestmark = pytest.mark.filterwarnings("ignore::igpo_rewards.SingleRolloutGroupWarning")

TOLERANCE = dict(rtol=1e-9, atol=1e-9)
normalization = st.fixed_dictionaries(
    {
        "mode": st.sampled_from(["joint", "separate"]),
        "weighting": st.sampled_from(["turn", "trajectory"]),
        "scale": st.sampled_from(["std", "none"]),
    }
)


@given_on_each_backend(batch=turn_batches(), options=normalization)
def test_gamma_zero_gives_the_normalized_rewards(backend, batch, options):
    result = run(igpo.igpo_advantages, backend, *batch, gamma=0.0, **options)
    np.testing.assert_allclose(result.advantages, result.normalized_rewards, **TOLERANCE)


@given_on_each_backend(batch=turn_batches(), options=normalization)
def test_weighted_mean_of_every_pool_is_zero(backend, batch, options):
    result = run(igpo.igpo_advantages, backend, *batch, **options)
    turns = batch.turn_mask.sum(axis=1)
    is_final = batch.turn_mask & (np.arange(batch.turn_mask.shape[1]) == (turns - 1)[:, None])
    for group in np.unique(batch.group_ids):
        for final_pool in ([None] if options["mode"] == "joint" else [True, False]):
            in_pool = batch.turn_mask & (batch.group_ids == group)[:, None]
            if final_pool is not None:
                in_pool &= is_final == final_pool
            if not in_pool.any():
                continue
            per_rollout = in_pool.sum(axis=1, keepdims=True)
            weight = np.where(in_pool, 1.0 if options["weighting"] == "turn" else 1.0 / np.maximum(per_rollout, 1), 0.0)
            weighted_mean = (weight * result.normalized_rewards).sum() / weight.sum()
            assert abs(weighted_mean) < 1e-7


@given_on_each_backend(batch=turn_batches(), options=normalization, data=st.data())
def test_permuting_rollouts_permutes_the_result(backend, batch, options, data):
    permutation = np.array(data.draw(st.permutations(range(len(batch.outcome)))), dtype=np.int64)
    permuted = type(batch)(*(field[permutation] for field in batch))
    original = run(igpo.igpo_advantages, backend, *batch, **options)
    shuffled = run(igpo.igpo_advantages, backend, *permuted, **options)
    np.testing.assert_allclose(shuffled.advantages, original.advantages[permutation], **TOLERANCE)


@given_on_each_backend(batch=turn_batches(), options=normalization)
def test_splitting_the_batch_by_group_changes_nothing(backend, batch, options):
    whole = run(igpo.igpo_advantages, backend, *batch, **options)
    for group in np.unique(batch.group_ids):
        rows = np.flatnonzero(batch.group_ids == group)
        part = run(igpo.igpo_advantages, backend, *(field[rows] for field in batch), **options)
        np.testing.assert_allclose(part.advantages, whole.advantages[rows], **TOLERANCE)


@given_on_each_backend(batch=turn_batches(), shift=st.integers(-1000, 1000))
def test_group_ids_are_labels_only(backend, batch, shift):
    relabelled = batch._replace(group_ids=batch.group_ids * 3 + shift)
    np.testing.assert_allclose(
        run(igpo.igpo_advantages, backend, *relabelled).advantages,
        run(igpo.igpo_advantages, backend, *batch).advantages,
        **TOLERANCE,
    )


@given_on_each_backend(batch=turn_batches(allow_empty_rows=False))
def test_constant_groups_collapse_to_exact_zero(backend, batch):
    """All-equal rewards in a pool give exactly 0, not eps-amplified rounding noise (float32 too)."""
    rewards = np.full(batch.turn_mask.shape, 0.3)
    for float_dtype in ("float32", "float64"):
        out = run(igpo.group_normalize, backend, rewards, batch.turn_mask, batch.group_ids, float_dtype=float_dtype)
        assert np.all(out == 0.0)
    outcome = np.full(batch.outcome.shape, 0.7)
    assert np.all(run(igpo.grpo_advantages, backend, outcome, batch.group_ids, float_dtype="float32") == 0.0)
    assert float(run(igpo.zero_variance_group_fraction, backend, outcome, batch.group_ids)) == 1.0


@given_on_each_backend(batch=turn_batches())
def test_padding_rows_contribute_nothing(backend, batch):
    """Appending rows with no valid turn (batch padding) leaves every real row unchanged."""
    padded = type(batch)(
        answer_logprob=np.concatenate([batch.answer_logprob, np.full((2, batch.answer_logprob.shape[1]), -3.0)]),
        outcome=np.concatenate([batch.outcome, [5.0, -5.0]]),
        turn_mask=np.concatenate([batch.turn_mask, np.zeros((2, batch.turn_mask.shape[1]), dtype=bool)]),
        group_ids=np.concatenate([batch.group_ids, batch.group_ids[:1].repeat(2)]),
    )
    whole = run(igpo.igpo_advantages, backend, *padded)
    alone = run(igpo.igpo_advantages, backend, *batch)
    np.testing.assert_allclose(whole.advantages[: len(batch.outcome)], alone.advantages, **TOLERANCE)
    assert np.all(whole.advantages[len(batch.outcome):] == 0.0)
