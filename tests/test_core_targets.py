"""Information gain over K weighted targets (igpo_rewards.targets), on every requested backend.

- the K-target path agrees with the float64 loop oracle (Hypothesis, ``target_batches``);
- one target with weight 1 is the paper's computation bit for bit (``array_equal``), on every
  backend and floating dtype, eager and under ``jax.jit``;
- the potential-based shaping identity: with ``gain_clip="none"`` a rollout's IG sums to the
  change of its weighted potential between the first probe and the probe before the answer,
  for either sub-goal potential;
- positive clipping pays at least that, more the more the potential wobbles (the oscillation
  case, and the growth with the turn count under noise);
- the probe log-probs of K targets (``answer_logprob`` on [B, T, K, L]) and the refusals.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

import igpo_rewards as igpo
from igpo_rewards.testing import reference, target_batches, turn_batches

from .backend_support import given_on_each_backend, precision, run, run_jitted, to_backend, to_numpy

pytestmark = pytest.mark.filterwarnings("ignore::igpo_rewards.SingleRolloutGroupWarning")

TOLERANCE = dict(rtol=1e-9, atol=1e-9)
FIELDS = ("information_gain", "rewards", "normalized_rewards", "advantages")

options = st.fixed_dictionaries(
    {
        "gamma": st.sampled_from([1.0, 0.0, 0.9]),
        "kind": st.sampled_from(["prob", "log_prob"]),
        "mode": st.sampled_from(["joint", "separate", "turn_index"]),
        "weighting": st.sampled_from(["turn", "trajectory"]),
        "scale": st.sampled_from(["std", "none"]),
        "ig_weight": st.sampled_from([1.0, 0.5]),
        "subgoal_potential": st.sampled_from(["running_max", "probe"]),
        "gain_clip": st.sampled_from(["none", "positive"]),
        "accumulation": st.sampled_from(["discounted", "sqrt_n"]),
        "ig_advantage_scale": st.sampled_from([1.0, 0.3]),
    }
)


def _weights(batch, shared_form: bool):
    """The batch's [B, K] weights, or its [K] row when every row has the same weights."""
    weights = batch.target_weights
    if shared_form and len(weights) and np.all(weights == weights[:1]):
        return weights[0]
    return weights


def _advantages(answer_logprob, outcome, turn_mask, group_ids, target_mask, target_weights, **options):
    return igpo.igpo_advantages(answer_logprob, outcome, turn_mask, group_ids, target_mask=target_mask,
                                target_weights=target_weights, **options)


@given_on_each_backend(batch=target_batches(), options=options, shared_form=st.booleans())
def test_igpo_advantages_over_targets_match_the_oracle(backend, batch, options, shared_form):
    weights = _weights(batch, shared_form)
    got = run_jitted(_advantages, backend, batch.answer_logprob, batch.outcome, batch.turn_mask, batch.group_ids,
                     batch.target_mask, weights, **options)
    want = reference.igpo_advantages(batch.answer_logprob, batch.outcome, batch.turn_mask, batch.group_ids,
                                     target_mask=batch.target_mask, target_weights=weights, **options)
    for field in FIELDS:
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), err_msg=field, **TOLERANCE)


def _target_gains(answer_logprob, turn_mask, target_mask, **options):
    return igpo.target_information_gain(answer_logprob, turn_mask, target_mask=target_mask, **options)


@given_on_each_backend(
    batch=target_batches(),
    kind=st.sampled_from(["prob", "log_prob"]),
    potential=st.sampled_from(["running_max", "probe"]),
    clip=st.sampled_from(["none", "positive"]),
)
def test_target_information_gain_matches_the_oracle(backend, batch, kind, potential, clip):
    options = dict(kind=kind, subgoal_potential=potential, gain_clip=clip)
    got = run_jitted(_target_gains, backend, batch.answer_logprob, batch.turn_mask, batch.target_mask, **options)
    want = reference.target_information_gain(batch.answer_logprob, batch.turn_mask, target_mask=batch.target_mask,
                                             **options)
    np.testing.assert_allclose(got, want, **TOLERANCE)
    assert np.all(got[~batch.target_mask[:, None, :].repeat(got.shape[1], axis=1)] == 0)  # absent targets gain 0


# --- one target is the paper's computation, bit for bit -------------------------------------------


def _one_target_pairs(answer_logprob, outcome, turn_mask, group_ids, **options):
    """Every output of the [B, T] call next to the same output of the [B, T, 1] call with weight 1."""
    column = answer_logprob[:, :, None]
    gain_options = {key: options[key] for key in ("kind", "gain_clip")}
    reward_options = {**gain_options, "ig_weight": options["ig_weight"]}
    plain = igpo.igpo_advantages(answer_logprob, outcome, turn_mask, group_ids, **options)
    targets = igpo.igpo_advantages(column, outcome, turn_mask, group_ids, target_weights=[1.0], **options)
    return (
        *plain, igpo.information_gain(answer_logprob, turn_mask, **gain_options),
        igpo.turn_rewards(answer_logprob, outcome, turn_mask, **reward_options),
        igpo.target_information_gain(answer_logprob, turn_mask, **gain_options)[:, :, 0],
    ), (
        *targets, igpo.information_gain(column, turn_mask, target_weights=[1.0], **gain_options),
        igpo.turn_rewards(column, outcome, turn_mask, target_weights=[1.0], **reward_options),
        igpo.target_information_gain(column, turn_mask, **gain_options)[:, :, 0],
    )


def _assert_same_bits(pairs, where):
    plain, targets = pairs
    for index, (want, got) in enumerate(zip(plain, targets)):
        assert got.dtype == want.dtype, f"{where} output {index}: {got.dtype} != {want.dtype}"
        want, got = (to_numpy(x.float() if str(x.dtype) == "torch.bfloat16" else x) for x in (want, got))
        np.testing.assert_array_equal(got, want, err_msg=f"{where} output {index}")


def float_dtypes(backend: str) -> list[str]:
    return ["float16", "float32", "float64"] + (["bfloat16"] if backend == "torch" else [])


def _fixed_batch():
    rng = np.random.default_rng(7)
    turn_mask = np.arange(4)[None, :] < np.array([4, 2, 1, 3, 0, 4])[:, None]
    answer_logprob = np.where(turn_mask, np.log(rng.uniform(1e-3, 1.0, (6, 4))), 0.0)
    answer_logprob[0, 2] = -np.inf
    return answer_logprob, np.array([1.0, 0.0, 0.5, -2.0, 0.0, 1.0]), turn_mask, np.array([4, 4, 4, 9, 9, 9])


@pytest.mark.parametrize("variant", [
    dict(),
    dict(kind="log_prob", mode="separate", gain_clip="positive", accumulation="sqrt_n", ig_advantage_scale=0.3),
    dict(mode="turn_index", weighting="trajectory", gamma=0.9),
])
def test_one_target_is_the_paper_bit_for_bit_in_every_dtype(backend, variant):
    """Eager on every backend and dtype, and under jax.jit (one program per call): [B, T, 1] probes with
    weight 1 give every array of the [B, T] call, the same bits."""
    options = {"gamma": 1.0, "kind": "prob", "mode": "joint", "weighting": "turn", "ig_weight": 1.0,
               "gain_clip": "none", "accumulation": "discounted", "ig_advantage_scale": 1.0, **variant}
    arrays = _fixed_batch()
    for float_dtype in float_dtypes(backend):
        with precision(backend, float_dtype):
            converted = [to_backend(np.asarray(a), backend, float_dtype=float_dtype) for a in arrays]
            _assert_same_bits(_one_target_pairs(*converted, **options), f"{backend} {float_dtype}")
            if backend == "jax":
                import jax

                jitted = jax.jit(lambda *a: _one_target_pairs(*a, **options))
                _assert_same_bits(jitted(*converted), f"jax.jit {float_dtype}")


@given_on_each_backend(batch=turn_batches(), options=options.map(lambda o: {k: v for k, v in o.items()
                                                                            if k != "subgoal_potential"}))
def test_one_target_is_the_paper_bit_for_bit_on_drawn_batches(backend, batch, options):
    for float_dtype in ("float64", "float32"):
        with precision(backend, float_dtype):
            converted = [to_backend(np.asarray(a), backend, float_dtype=float_dtype) for a in batch]
            if backend == "jax":
                import jax

                pairs = jax.jit(lambda *a: _one_target_pairs(*a, **options))(*converted)
            else:
                pairs = _one_target_pairs(*converted, **options)
            _assert_same_bits(pairs, f"{backend} {float_dtype}")


# --- potential-based shaping ----------------------------------------------------------------------


def _potentials(batch, kind, potential, floor=-20.0):
    """phi [B, T, K] computed here with NumPy: the belief, or its running max along the turns for k >= 1."""
    logprob = np.where(batch.turn_mask[:, :, None] & batch.target_mask[:, None, :], batch.answer_logprob, 0.0)
    belief = np.exp(logprob) if kind == "prob" else np.maximum(logprob, floor)
    if potential == "running_max":
        belief[:, :, 1:] = np.maximum.accumulate(belief[:, :, 1:], axis=1)
    return belief


def _gains(answer_logprob, turn_mask, target_mask, target_weights, **options):
    return igpo.information_gain(answer_logprob, turn_mask, target_mask=target_mask, target_weights=target_weights,
                                 **options)


@given_on_each_backend(batch=target_batches(), kind=st.sampled_from(["prob", "log_prob"]),
                       potential=st.sampled_from(["running_max", "probe"]))
def test_the_information_gain_telescopes_to_the_change_of_the_weighted_potential(backend, batch, kind, potential):
    """sum_{j < n_i - 1} IG_{i,j} = sum_k tau_{i,k} w_{i,k} (phi_{i,n_i-1,k} - phi_{i,0,k}): reward shaping
    with the potential Phi_i = sum_k tau w phi (Ng, Harada, Russell 1999), for any weights and masks."""
    gains = run_jitted(_gains, backend, batch.answer_logprob, batch.turn_mask, batch.target_mask,
                       batch.target_weights, kind=kind, subgoal_potential=potential)
    phi = _potentials(batch, kind, potential)
    turns = batch.turn_mask.sum(axis=1)
    for i, n in enumerate(turns):
        if n == 0:
            assert np.all(gains[i] == 0)
            continue
        change = phi[i, n - 1] - phi[i, 0]
        expected = np.sum(np.where(batch.target_mask[i], batch.target_weights[i] * change, 0.0))
        scale = 1.0 + np.sum(np.abs(batch.target_weights[i]) * np.abs(phi[i, :n]).max(axis=0))
        assert abs(gains[i].sum() - expected) <= 1e-12 * scale, (i, gains[i], expected)


# --- positive clipping ----------------------------------------------------------------------------


@given_on_each_backend(batch=target_batches(), kind=st.sampled_from(["prob", "log_prob"]),
                       potential=st.sampled_from(["running_max", "probe"]))
def test_clipped_gains_pay_at_least_the_potential_change_and_more_when_it_falls(backend, batch, kind, potential):
    """sum_j max(g, 0) >= phi(n - 1) - phi(0) per target, equal exactly when the potential never falls."""
    clipped = run_jitted(_target_gains, backend, batch.answer_logprob, batch.turn_mask, batch.target_mask,
                         kind=kind, subgoal_potential=potential, gain_clip="positive")
    phi = _potentials(batch, kind, potential)
    for i, n in enumerate(batch.turn_mask.sum(axis=1)):
        for k in np.flatnonzero(batch.target_mask[i]):
            if n == 0:
                continue
            steps = np.diff(phi[i, :n, k])
            paid, change = clipped[i, : max(n - 1, 0), k].sum(), phi[i, n - 1, k] - phi[i, 0, k]
            tolerance = 1e-12 * (1.0 + np.abs(phi[i, :n, k]).max() * n)
            assert paid >= change - tolerance
            if np.all(steps >= 0):
                assert abs(paid - change) <= tolerance
            else:
                assert abs(paid - (change - steps[steps < 0].sum())) <= tolerance  # every fall paid back


def test_clipping_pays_again_for_what_was_lost_and_found():
    beliefs = np.log([[0.1, 0.9, 0.1, 0.9]])
    mask = np.ones((1, 4), dtype=bool)
    np.testing.assert_allclose(igpo.information_gain(beliefs, mask), [[0.8, -0.8, 0.8, 0.0]], atol=1e-15)
    np.testing.assert_allclose(igpo.information_gain(beliefs, mask, gain_clip="positive"), [[0.8, 0.0, 0.8, 0.0]],
                               atol=1e-15)
    # a sub-goal's running max pays the first find once and never takes it back
    both = np.stack([np.log([[0.2, 0.2, 0.2, 0.2]]), beliefs], axis=-1)
    np.testing.assert_allclose(igpo.target_information_gain(both, mask)[0, :, 1], [0.8, 0.0, 0.0, 0.0], atol=1e-15)


def test_clipped_gains_grow_with_the_turn_count_under_noise():
    """The turn-count bias clipping adds: beliefs that only wobble (i.i.d. noise around 0.5) earn
    clipped IG in proportion to n - 1, while the unclipped IG sums to about 0 whatever n (seeded)."""
    rng = np.random.default_rng(0)
    per_count = 20_000
    clipped_sums, plain_sums = {}, {}
    for n in range(2, 9):
        probabilities = 0.5 + 0.1 * rng.uniform(-1.0, 1.0, (per_count, n))
        mask = np.ones((per_count, n), dtype=bool)
        clipped_sums[n] = igpo.information_gain(np.log(probabilities), mask, gain_clip="positive").sum(axis=1).mean()
        plain_sums[n] = igpo.information_gain(np.log(probabilities), mask).sum(axis=1).mean()
    per_step = 0.1 / 3  # E[max(X - Y, 0)] for X, Y uniform on [-0.1, 0.1]: 2 * 0.1 / 6
    for n in range(2, 9):
        assert abs(clipped_sums[n] / (n - 1) - per_step) < 0.03 * per_step, (n, clipped_sums[n])
        assert abs(plain_sums[n]) < 0.003, (n, plain_sums[n])
    assert clipped_sums[8] > 6 * clipped_sums[2]


# --- K-target probe log-probs -------------------------------------------------------------------


@given_on_each_backend(
    logprobs=st.lists(st.sampled_from([0.0, -0.1, -2.5, -np.inf]), min_size=72, max_size=72),
    mask=st.lists(st.booleans(), min_size=72, max_size=72),
    absent=st.lists(st.booleans(), min_size=6, max_size=6),
    turns=st.one_of(st.none(), st.lists(st.integers(0, 3), min_size=2, max_size=2)),
)
def test_answer_logprob_of_k_targets_matches_the_oracle(backend, logprobs, mask, absent, turns):
    """[B, T, K, L] -> [B, T, K]: each target over its own tokens; a target with no token in any slot
    of a row is absent (0.0, never an error); an empty slot of a present target at a valid turn is."""
    token_logprobs = np.array(logprobs).reshape(2, 3, 3, 4)
    token_mask = np.array(mask).reshape(2, 3, 3, 4) & ~np.array(absent).reshape(2, 1, 3, 1)
    turn_mask = None if turns is None else np.arange(3)[None, :] < np.array(turns)[:, None]
    masks = () if turn_mask is None else (turn_mask,)
    want = reference.answer_logprob(token_logprobs, token_mask, turn_mask=turn_mask)
    for k in range(3):  # each target is the one-target computation on its own tokens (absent: zeros)
        alone = reference.answer_logprob(token_logprobs[:, :, k], token_mask[:, :, k], turn_mask=turn_mask)
        present = token_mask[:, :, k].any(axis=(1, 2))
        np.testing.assert_array_equal(want[present, :, k], alone[present])
        assert np.all(want[~present, :, k] == 0.0)

    def call(logprobs, token_mask, *turn_mask, validate):
        return igpo.answer_logprob(logprobs, token_mask, turn_mask=turn_mask[0] if turn_mask else None,
                                   validate=validate)

    got = run(call, backend, token_logprobs, token_mask, *masks, validate=False)
    np.testing.assert_allclose(got, want, **TOLERANCE)
    if np.isnan(want).any():
        with pytest.raises(ValueError, match=r"no answer token at valid turns \(row, turn, target\)"):
            run(call, backend, token_logprobs, token_mask, *masks, validate=True)
    else:
        np.testing.assert_allclose(run(call, backend, token_logprobs, token_mask, *masks, validate=True), want,
                                   **TOLERANCE)


# --- refusals ---------------------------------------------------------------------------------------

LOGPROB = np.log([[[0.1, 0.2], [0.5, 0.6]], [[0.3, 0.4], [0.2, 0.9]]])  # B=2, T=2, K=2
MASK = np.array([[1, 1], [1, 0]], dtype=bool)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda c: igpo.information_gain(c(LOGPROB[:, :, 0]), c(MASK), target_weights=c([1.0])), ValueError,
         r"target_weights describe K targets, but answer_logprob has shape \(2, 2\)"),
        (lambda c: igpo.information_gain(c(LOGPROB[:, :, 0]), c(MASK), target_mask=c([[1], [1]])), ValueError,
         r"target_mask describe K targets"),
        (lambda c: igpo.information_gain(c(LOGPROB), c(MASK)), ValueError,
         r"answer_logprob holds K = 2 targets, so target_weights \(\[K\] or \[B, K\].*is required"),
        (lambda c: igpo.information_gain(c(LOGPROB), c(MASK), target_weights=c([1.0, 0.5, 0.5])), ValueError,
         r"target_weights must have shape \[K\] = \(2,\) or \[B, K\] = \(2, 2\).*got \(3,\)"),
        (lambda c: igpo.information_gain(c(LOGPROB), c(MASK), target_weights=c([1.0, np.nan])), ValueError,
         r"target_weights must hold finite values"),
        (lambda c: igpo.information_gain(c(LOGPROB), c(MASK), target_weights=["a", "b"]), TypeError,
         r"target_weights must hold real numbers"),
        (lambda c: igpo.information_gain(c(LOGPROB), c(MASK), target_weights=[1.0, 1.0], target_mask=c([[1, 1]])),
         ValueError, r"target_mask must have shape \[B, K\] = \(2, 2\).*got \(1, 2\)"),
        (lambda c: igpo.information_gain(c(LOGPROB), c(MASK), target_weights=[1.0, 1.0],
                                         target_mask=c([[1, 2], [1, 1]])), ValueError,
         r"target_mask must hold only 0/1"),
        (lambda c: igpo.information_gain(c(LOGPROB), c(MASK), target_weights=[1.0, 1.0],
                                         target_mask=c([[1, 1], [0, 1]])), ValueError,
         r"target_mask\[:, 0\] must be True \(target 0 is the answer\).*rows \[1\]"),
        (lambda c: igpo.information_gain(c(np.where([[[0, 1], [0, 0]], [[0, 0], [0, 0]]], np.nan, LOGPROB)), c(MASK),
                                         target_weights=[1.0, 1.0]), ValueError,
         r"answer_logprob must hold finite values or -inf at valid positions; found NaN/inf at indices \[\[0, 0, 1\]\]"),
        (lambda c: igpo.information_gain(c(-LOGPROB), c(MASK), target_weights=[1.0, 1.0]), ValueError,
         r"answer_logprob must hold log-probabilities \(<= 0\)"),
        (lambda c: igpo.information_gain(c(LOGPROB), c(MASK[:1]), target_weights=[1.0, 1.0]), ValueError,
         r"turn_mask must have shape \[B, T\] = \(2, 2\) \(from answer_logprob \[B, T, K\] = \(2, 2, 2\)\)"),
        (lambda c: igpo.information_gain(c(LOGPROB[..., None]), c(MASK)), ValueError,
         r"answer_logprob must have shape \[B, T\] \(the answer's probes\) or \[B, T, K\]"),
        (lambda c: igpo.information_gain(c(LOGPROB), c(MASK), target_weights=[1.0, 1.0], subgoal_potential="max"),
         ValueError, r"subgoal_potential must be one of \['running_max', 'probe'\], got 'max'"),
        (lambda c: igpo.information_gain(c(LOGPROB), c(MASK), target_weights=[1.0, 1.0], gain_clip=True), TypeError,
         r"gain_clip must be a str, one of \['none', 'positive'\]"),
        (lambda c: igpo.igpo_advantages(c(LOGPROB), c([1.0, 0.0]), c(MASK), [0, 0], target_weights=[1.0, 1.0],
                                        accumulation="sqrt"), ValueError,
         r"accumulation must be one of \['discounted', 'sqrt_n'\], got 'sqrt'"),
        (lambda c: igpo.variance_rescaled_returns(c(LOGPROB[:, :, 0]), c(MASK), ig_advantage_scale=float("inf")),
         ValueError, r"ig_advantage_scale must be finite"),
        (lambda c: igpo.advantages_from_token_rewards(c([[0.5, 1.0]]), c([[1, 1]]), [0], ig_advantage_scale="0.3"),
         TypeError, r"ig_advantage_scale must be a real number"),
    ],
)
def test_bad_target_input_is_refused_with_a_clear_message(backend, call, error, message):
    with pytest.raises(error, match=message):
        call(lambda value: to_backend(np.asarray(value), backend))


@pytest.mark.backends("numpy")
def test_target_arrays_of_another_library_are_refused(backend):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"'answer_logprob' is numpy, 'target_weights' is torch"):
        igpo.information_gain(LOGPROB, MASK, target_weights=torch.tensor([1.0, 0.5]))


def test_absent_targets_are_ignored_even_when_they_hold_nan():
    probes = LOGPROB.copy()
    probes[1, :, 1] = np.nan
    present = np.array([[1, 1], [1, 0]], dtype=bool)
    gains = igpo.target_information_gain(probes, MASK, target_mask=present)
    assert np.isfinite(gains).all() and np.all(gains[1, :, 1] == 0)
    np.testing.assert_allclose(igpo.information_gain(probes, MASK, target_weights=[1.0, 3.0], target_mask=present),
                               reference.information_gain(probes, MASK, target_weights=[1.0, 3.0], target_mask=present),
                               atol=1e-15)
