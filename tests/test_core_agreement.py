"""Every public formula agrees with the float64 loop oracle, on every requested backend.

Inputs are drawn by the Hypothesis strategies users get in ``igpo_rewards.testing`` (ties,
zero-variance pools, -inf log-probs, exact-zero rewards, padding rows included); computations
run in float64 here so the comparison is tight. dtype handling is tested in test_core_backends.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

import igpo_rewards as igpo
from igpo_rewards.testing import reference, token_batches, turn_batches

from .backend_support import given_on_each_backend, run, run_jitted

# Hypothesis draws batches whose groups are all single rollouts on purpose (an edge case of the
# equations); the warning that says so to users is tested in test_core_validation.py.
pytestmark = pytest.mark.filterwarnings("ignore::igpo_rewards.SingleRolloutGroupWarning")

TOLERANCE = dict(rtol=1e-9, atol=1e-9)

options = st.fixed_dictionaries(
    {
        "gamma": st.sampled_from([1.0, 0.0, 0.5, 0.9]),
        "kind": st.sampled_from(["prob", "log_prob"]),
        "mode": st.sampled_from(["joint", "separate", "turn_index"]),
        "weighting": st.sampled_from(["turn", "trajectory"]),
        "scale": st.sampled_from(["std", "none"]),
        "ddof": st.sampled_from([0, 1]),
        "eps": st.sampled_from([1e-6, 1e-3]),
        "ig_weight": st.sampled_from([1.0, 0.5]),
        "outcome_weight": st.sampled_from([1.0, 2.0]),
        "accumulation": st.sampled_from(["discounted", "sqrt_n"]),
        "ig_advantage_scale": st.sampled_from([1.0, 0.3]),
        "gain_clip": st.sampled_from(["none", "positive"]),
    }
)


@given_on_each_backend(batch=turn_batches(), options=options)
def test_igpo_advantages_match_the_oracle(backend, batch, options):
    got = run(igpo.igpo_advantages, backend, *batch, **options)
    want = reference.igpo_advantages(*batch, **options)
    for field in ("information_gain", "rewards", "normalized_rewards", "advantages"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), err_msg=field, **TOLERANCE)


@given_on_each_backend(batch=turn_batches(), kind=st.sampled_from(["prob", "log_prob"]), floor=st.sampled_from([-20.0, -5.0]),
                       clip=st.sampled_from(["none", "positive"]))
def test_information_gain_and_turn_rewards_match_the_oracle(backend, batch, kind, floor, clip):
    gain = run(igpo.information_gain, backend, batch.answer_logprob, batch.turn_mask, kind=kind, log_prob_floor=floor,
               gain_clip=clip)
    np.testing.assert_allclose(
        gain, reference.information_gain(batch.answer_logprob, batch.turn_mask, kind=kind, log_prob_floor=floor,
                                         gain_clip=clip),
        **TOLERANCE,
    )
    rewards = run(igpo.turn_rewards, backend, batch.answer_logprob, batch.outcome, batch.turn_mask, kind=kind)
    np.testing.assert_allclose(
        rewards, reference.turn_rewards(batch.answer_logprob, batch.outcome, batch.turn_mask, kind=kind), **TOLERANCE
    )


@given_on_each_backend(
    logprobs=st.lists(st.sampled_from([0.0, -0.1, -2.5, -30.0, -np.inf]), min_size=24, max_size=24),
    mask=st.lists(st.booleans(), min_size=24, max_size=24),
    turns=st.one_of(st.none(), st.lists(st.integers(0, 3), min_size=2, max_size=2)),
)
def test_answer_logprob_matches_the_oracle(backend, logprobs, mask, turns):
    """Empty probe slots: NaN at valid turns (and an error when validated), 0.0 at padded ones."""
    token_logprobs = np.array(logprobs).reshape(2, 3, 4)
    token_mask = np.array(mask).reshape(2, 3, 4)
    turn_mask = None if turns is None else np.arange(3)[None, :] < np.array(turns)[:, None]
    masks = () if turn_mask is None else (turn_mask,)
    want = reference.answer_logprob(token_logprobs, token_mask, turn_mask=turn_mask)

    def call(logprobs, token_mask, *turn_mask, validate):
        return igpo.answer_logprob(logprobs, token_mask, turn_mask=turn_mask[0] if turn_mask else None,
                                   validate=validate)

    got = run(call, backend, token_logprobs, token_mask, *masks, validate=False)
    np.testing.assert_allclose(got, want, **TOLERANCE)  # NaN where the oracle has NaN
    if np.isnan(want).any():
        with pytest.raises(ValueError, match="no answer token at valid turns"):
            run(call, backend, token_logprobs, token_mask, *masks, validate=True)
    else:
        np.testing.assert_allclose(run(call, backend, token_logprobs, token_mask, *masks, validate=True), want,
                                   **TOLERANCE)


@given_on_each_backend(batch=turn_batches(), scale=st.sampled_from(["std", "none"]), ddof=st.sampled_from([0, 1]))
def test_grpo_and_collapse_rate_match_the_oracle(backend, batch, scale, ddof):
    got = run(igpo.grpo_advantages, backend, batch.outcome, batch.group_ids, scale=scale, ddof=ddof)
    np.testing.assert_allclose(
        got, reference.grpo_advantages(batch.outcome, batch.group_ids, scale=scale, ddof=ddof), **TOLERANCE
    )
    rate = run(igpo.zero_variance_group_fraction, backend, batch.outcome, batch.group_ids)
    assert float(rate) == reference.zero_variance_group_fraction(batch.outcome, batch.group_ids)


@given_on_each_backend(
    batch=token_batches(final_reward_after_last_run=True),
    options=options.map(lambda o: {k: o[k] for k in ("gamma", "mode", "weighting", "scale", "ddof", "eps", "accumulation",
                                                     "ig_advantage_scale")}),
)
def test_token_level_advantages_match_the_oracle(backend, batch, options):
    got = run(igpo.advantages_from_token_rewards, backend, batch.token_level_rewards, batch.response_mask,
              batch.group_ids, **options)
    want = reference.advantages_from_token_rewards(
        batch.token_level_rewards, batch.response_mask, batch.group_ids, **options
    )
    np.testing.assert_allclose(got, want, **TOLERANCE)


@given_on_each_backend(batch=token_batches())
def test_token_layout_functions_match_the_oracle(backend, batch):
    index = run(igpo.turn_index_from_response_mask, backend, batch.response_mask)
    np.testing.assert_array_equal(index, reference.turn_index_from_response_mask(batch.response_mask))
    placed = run(igpo.place_turn_rewards, backend, batch.turn_rewards, batch.response_mask, turn_mask=None)
    np.testing.assert_array_equal(placed, reference.place_turn_rewards(batch.turn_rewards, batch.response_mask))
    np.testing.assert_array_equal(placed, batch.token_level_rewards)
    spread = run(igpo.broadcast_to_tokens, backend, batch.turn_rewards, index)
    np.testing.assert_array_equal(spread, reference.broadcast_to_tokens(batch.turn_rewards, index))


@given_on_each_backend(batch=turn_batches(), options=options)
def test_token_path_equals_turn_path(backend, batch, options):
    """Placing turn rewards into verl's layout and reading them back changes nothing."""
    options = {k: options[k] for k in ("gamma", "mode", "weighting", "scale", "ddof", "eps")}
    rewards = reference.turn_rewards(batch.answer_logprob, batch.outcome, batch.turn_mask)
    turns = batch.turn_mask.sum(axis=1)
    # Every turn gets 2 generated tokens and is followed by a 1-token observation.
    response_mask = np.zeros((len(turns), 3 * batch.turn_mask.shape[1] + 1), dtype=np.int64)
    for row, count in enumerate(turns):
        for turn in range(count):
            response_mask[row, 3 * turn: 3 * turn + 2] = 1
    token_rewards = reference.place_turn_rewards(rewards, response_mask)
    got = run(igpo.advantages_from_token_rewards, backend, token_rewards, response_mask, batch.group_ids, **options)
    turn_advantages = reference.discounted_returns(
        reference.group_normalize(rewards, batch.turn_mask, batch.group_ids,
                                  **{k: v for k, v in options.items() if k != "gamma"}),
        batch.turn_mask, gamma=options["gamma"],
    )
    want = reference.broadcast_to_tokens(turn_advantages, reference.turn_index_from_response_mask(response_mask))
    np.testing.assert_allclose(got, want, **TOLERANCE)


@given_on_each_backend(batch=token_batches(), data=st.data())
def test_turn_mask_means_the_same_in_the_library_and_the_oracle(backend, batch, data):
    """``turn_mask`` marks the valid turns: tokens of other turns read 0 and their rewards are not
    placed, in both. The library also refuses (validate=True) a layout that disagrees with it
    (on JAX, which runs the drawn batches jitted, the refusals are tested on fixed batches in
    test_core_validation)."""
    runs = batch.turn_mask.sum(axis=1)
    kept = np.array([data.draw(st.integers(0, int(n))) for n in runs], dtype=np.int64)
    index = reference.turn_index_from_response_mask(batch.response_mask)

    def both(values, token_index, response_mask, turn_mask, *, validate):
        return (igpo.broadcast_to_tokens(values, token_index, turn_mask=turn_mask, validate=validate),
                igpo.place_turn_rewards(values, response_mask, turn_mask=turn_mask, validate=validate))

    for turns in (runs, kept):
        turn_mask = np.arange(batch.turn_mask.shape[1])[None, :] < turns[:, None]
        arrays = (batch.turn_rewards, index, batch.response_mask, turn_mask)
        want = (reference.broadcast_to_tokens(batch.turn_rewards, index, turn_mask=turn_mask),
                reference.place_turn_rewards(batch.turn_rewards, batch.response_mask, turn_mask=turn_mask))
        for got, expected in zip(run_jitted(both, backend, *arrays, validate=False), want):
            np.testing.assert_array_equal(got, expected)
        if backend == "jax":
            continue
        if np.array_equal(turns, runs):
            for got, expected in zip(run(both, backend, *arrays, validate=True), want):
                np.testing.assert_array_equal(got, expected)
        else:
            with pytest.raises(ValueError, match="number of valid turns n_b|runs must equal turn_mask's valid turns"):
                run(both, backend, *arrays, validate=True)
