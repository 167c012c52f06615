"""The two-way paired bootstrap (``reference_trainer.paired``): hand-checkable cases, the strata,
synthetic experiments with a known difference, and the errors."""

from __future__ import annotations

import numpy as np
import pytest

from igpo_rewards.reference_trainer.paired import paired_bootstrap, paired_differences, seed_multisets


def test_one_seed_two_questions_by_hand():
    """d = [[1, 0]]: a replicate draws question 1 twice, once or never (1/4, 1/2, 1/4), so its mean is
    1, 0.5 or 0; the 2.5% and 97.5% percentiles are 0 and 1, and about half the replicates are 0.5."""
    result = paired_bootstrap([[1.0, 0.0]], [1, 1], replicates=4000, seed=3)
    assert (result.estimate, result.low, result.high, result.per_seed) == (0.5, 0.0, 1.0, (0.5,))
    assert not result.excludes_zero


def test_seeds_are_resampled_too():
    """Each seed constant over its questions (seed 1 +1, seed 2 0): question draws change nothing,
    seed draws give 1, 0.5 or 0 as above. Without resampling seeds the interval would be [0.5, 0.5]."""
    result = paired_bootstrap([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], [2, 2, 2], replicates=4000)
    assert (result.estimate, result.low, result.high, result.per_seed) == (0.5, 0.0, 1.0, (1.0, 0.0))


def test_questions_are_resampled_within_their_stratum():
    """Stratum 1 all +1, stratum 2 all 0 (two questions each): every replicate keeps two questions of
    each stratum, so its mean is exactly 0.5; one stratum for all would let it range over 0 .. 1."""
    differences = [[1.0, 1.0, 0.0, 0.0]]
    stratified = paired_bootstrap(differences, [1, 1, 2, 2], replicates=2000)
    assert (stratified.low, stratified.high) == (0.5, 0.5) and stratified.excludes_zero
    pooled = paired_bootstrap(differences, [1, 1, 1, 1], replicates=2000)
    assert pooled.low < 0.25 and pooled.high > 0.75


def test_the_same_seed_gives_the_same_interval_and_another_seed_another():
    rng = np.random.default_rng(5)
    differences = rng.integers(-1, 2, size=(5, 40)).astype(float)
    strata = np.repeat([1, 2, 3, 4], 10)
    first, again = paired_bootstrap(differences, strata, seed=1), paired_bootstrap(differences, strata, seed=1)
    assert first == again
    assert paired_bootstrap(differences, strata, seed=2)[1:3] != first[1:3]
    assert first.estimate == pytest.approx(differences.mean()) and first.per_seed == tuple(differences.mean(axis=1))


def _synthetic(rng, effect, *, shared, seeds=5, questions=400):
    """A paired experiment shaped like ours: per-question difficulty shared by seeds and methods, a
    seed effect shared by both methods of a seed (the warm start), a small method x seed interaction
    (0.1 logits), and the two methods' outcomes drawn from common (``shared``) or independent random
    numbers. Returns (differences [S, N], the realized expected difference of these seeds and questions)."""
    difficulty = rng.normal(-1.0, 1.5, questions)
    warm_start = rng.normal(0.0, 0.6, seeds)[:, None]
    interaction = rng.normal(0.0, 0.1, seeds)[:, None]
    p_base = 1 / (1 + np.exp(-(difficulty + warm_start)))
    p_method = 1 / (1 + np.exp(-(difficulty + warm_start + interaction + effect)))
    base_draws = rng.random((seeds, questions))
    method_draws = base_draws if shared else rng.random((seeds, questions))
    differences = (method_draws < p_method).astype(float) - (base_draws < p_base).astype(float)
    return differences, float((p_method - p_base).mean())


@pytest.mark.parametrize("shared", [True, False])
def test_synthetic_experiments_with_a_known_difference(shared):
    """40 synthetic experiments (5 seeds x 400 questions, 100 per hop) per effect size: the interval
    covers the realized expected difference at least 90% of the time at the 95% level (the two-way
    bootstrap is conservative for it), and a clear effect (+0.8 logits, about +10 EM points) is told
    apart every time, with the estimate within 3 points of the truth."""
    rng = np.random.default_rng(0)
    hops = np.repeat([1, 2, 3, 4], 100)
    for effect in (0.0, 0.8):
        covered = separated = 0
        for trial in range(40):
            differences, truth = _synthetic(rng, effect, shared=shared)
            result = paired_bootstrap(differences, hops, replicates=400, seed=trial)
            covered += result.low <= truth <= result.high
            separated += result.excludes_zero
            if effect:
                assert result.estimate == pytest.approx(truth, abs=0.03)
        assert covered >= 36, (effect, covered)
        if effect:
            assert separated == 40


def test_no_effect_is_rarely_a_difference():
    """No effect and no interaction, independent outcomes: the interval excludes 0 in at most 2 of 40
    experiments (about 5% expected, fewer for a conservative interval)."""
    rng = np.random.default_rng(1)
    hops = np.repeat([1, 2, 3, 4], 100)
    separated = 0
    for trial in range(40):
        difficulty = rng.normal(-1.0, 1.5, 400)
        p = 1 / (1 + np.exp(-(difficulty + rng.normal(0.0, 0.6, 5)[:, None])))
        differences = (rng.random((5, 400)) < p).astype(float) - (rng.random((5, 400)) < p).astype(float)
        separated += paired_bootstrap(differences, hops, replicates=400, seed=trial).excludes_zero
    assert separated <= 2


def test_paired_differences_overall_and_per_hop():
    """Method a is right on every 2-hop question where the baseline is wrong, equal elsewhere: +0.5
    overall (2 hops of equal size), +1 on 2-hop with a degenerate interval, 0 on 1-hop."""
    hops = [1, 1, 2, 2]
    baseline = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=float)
    scores = {"grpo": baseline, "a": baseline + np.array([0, 0, 1, 1])}
    result = paired_differences(scores, hops, replicates=500)
    assert set(result) == {"a"} and set(result["a"]) == {"all", "1", "2"}
    assert (result["a"]["all"].estimate, result["a"]["all"].low, result["a"]["all"].high) == (0.5, 0.5, 0.5)
    assert (result["a"]["2"].estimate, result["a"]["2"].low, result["a"]["2"].high) == (1.0, 1.0, 1.0)
    assert (result["a"]["1"].estimate, result["a"]["1"].low, result["a"]["1"].high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"scores must hold the baseline 'grpo', got methods \['a'\]"):
        paired_differences({"a": baseline}, hops)
    with pytest.raises(ValueError, match=r"scores\['a'\] must have the shape of scores\['grpo'\] \(2, 4\), got \(1, 4\)"):
        paired_differences({"grpo": baseline, "a": baseline[:1]}, hops)


def test_bad_input_is_refused_with_the_argument_named():
    with pytest.raises(ValueError, match=r"differences must be \[S, N\] with S, N >= 1, got shape \(3,\)"):
        paired_bootstrap([1.0, 0.0, 1.0], [1, 1, 1])
    with pytest.raises(ValueError, match="differences must be finite"):
        paired_bootstrap([[1.0, float("nan")]], [1, 1])
    with pytest.raises(ValueError, match=r"strata must be \[N\] = \[2\] \(one label per question\), got shape \(3,\)"):
        paired_bootstrap([[1.0, 0.0]], [1, 1, 1])
    with pytest.raises(ValueError, match="replicates must be an int >= 1, got 0"):
        paired_bootstrap([[1.0, 0.0]], [1, 1], replicates=0)
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\), got 1.0"):
        paired_bootstrap([[1.0, 0.0]], [1, 1], level=1.0)


def test_seed_multisets():
    assert [seed_multisets(s) for s in (1, 2, 3, 5)] == [1, 3, 10, 126]
