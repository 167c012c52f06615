"""Paired differences between methods with two-way (seed x question) bootstrap intervals.

The experiment runs every method from each seed's same warm start and evaluates every run on the
same held-out questions, so a method and the baseline form pairs: ``d[s, q] = em[method][s, q] -
em[baseline][s, q]`` for seed s = 1..S and question q = 1..N. The estimate is the mean of d over
the seed x question grid (= the mean over seeds of the per-seed EM differences).

Two random factors are crossed: the seed (warm start and RL sampling; pairing removes the warm
start's own effect, the method-by-seed interaction remains) and the question (a sample of the
world's questions, the same in every seed). ``paired_bootstrap`` resamples both (the
"pigeonhole" bootstrap of crossed designs, Owen 2007): each replicate draws S seeds with
replacement and, independently, within each stratum (hop count) that stratum's questions with
replacement, and takes the mean of d over the drawn grid. The 95% interval is the 2.5 and 97.5
percentiles of the replicates; the generator is ``numpy.random.default_rng(seed)``, so a report
rebuilds to the same digits. The scheme counts the interaction a little more than once, so it
is mildly conservative.

Shapes: S seeds, N questions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

REPLICATES = 10_000
"""Bootstrap replicates of the report."""
LEVEL = 0.95
"""Coverage of the report's intervals."""
_CHUNK = 2_000
"""Replicates computed at once (bounds memory to a few [chunk, N] arrays)."""


class PairedInterval(NamedTuple):
    """A paired difference and its bootstrap interval (all in the units of the scores, e.g. EM in [0, 1]).

    Attributes:
        estimate: mean of d over the seed x question grid.
        low, high: the percentile interval.
        per_seed: the mean of d over the questions, per seed (S values, in seed order).
    """

    estimate: float
    low: float
    high: float
    per_seed: tuple[float, ...]

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or entirely below 0 (a difference the data tell apart)."""
        return self.low > 0 or self.high < 0


def _check_inputs(differences: Any, strata: Any, replicates: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(differences, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 1:
        raise ValueError(f"differences must be [S, N] with S, N >= 1, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("differences must be finite, got NaN or inf")
    labels = np.asarray(strata)
    if labels.shape != (values.shape[1],):
        raise ValueError(f"strata must be [N] = [{values.shape[1]}] (one label per question), got shape {labels.shape}")
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
        raise ValueError(f"replicates must be an int >= 1, got {replicates!r}")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return values, labels


def paired_bootstrap(differences: Any, strata: Any, *, replicates: int = REPLICATES, seed: int = 0,
                     level: float = LEVEL) -> PairedInterval:
    r"""The mean paired difference and its two-way (seed x question) percentile bootstrap interval.

    .. math::
        \Delta = \frac{1}{S N} \sum_{s, q} d_{s,q}, \qquad
        \Delta^*_r = \frac{1}{S N} \sum_{s, q} a_{r,s}\, b_{r,q}\, d_{s,q}

    where replicate r's seed counts ``a_r ~ Multinomial(S, 1/S)`` (S seeds drawn with
    replacement) and, for every stratum h of N_h questions, its question counts
    ``b_{r,h} ~ Multinomial(N_h, 1/N_h)`` (each stratum keeps its size). The interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the ``Delta*_r``.

    Args:
        differences: [S, N] paired differences (e.g. per-question EM of a method minus the
            baseline's, in {-1, 0, 1}).
        strata: [N] a label per question (e.g. its hop count); questions are resampled within
            their stratum. One label everywhere resamples all questions together.
        replicates: bootstrap replicates.
        seed: seed of ``numpy.random.default_rng`` (the same seed gives the same interval).
        level: the interval's coverage.

    Raises:
        ValueError: a bad shape, a non-finite difference, ``replicates < 1`` or ``level``
            outside (0, 1).

    Example:
        One seed, two questions, the method right on the first only: a replicate draws the
        first question twice, once or never (probabilities 1/4, 1/2, 1/4), so the replicates are
        1, 0.5 or 0 and the 95% interval spans [0, 1].

        >>> result = paired_bootstrap([[1.0, 0.0]], [1, 1], replicates=2000)
        >>> result.estimate, result.low, result.high, result.per_seed
        (0.5, 0.0, 1.0, (0.5,))
    """
    values, labels = _check_inputs(differences, strata, replicates, level)
    num_seeds, num_questions = values.shape
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    statistics = np.empty(replicates)
    for first in range(0, replicates, _CHUNK):
        count = min(_CHUNK, replicates - first)
        seed_counts = rng.multinomial(num_seeds, np.full(num_seeds, 1.0 / num_seeds), size=count)  # [chunk, S]
        question_counts = np.zeros((count, num_questions))
        for members in groups:
            question_counts[:, members] = rng.multinomial(len(members), np.full(len(members), 1.0 / len(members)), size=count)
        statistics[first : first + count] = ((seed_counts @ values) * question_counts).sum(axis=1) / (num_seeds * num_questions)
    low, high = np.quantile(statistics, [(1 - level) / 2, (1 + level) / 2])
    per_seed = tuple(float(value) for value in values.mean(axis=1))
    return PairedInterval(float(values.mean()), float(low), float(high), per_seed)


def seed_multisets(num_seeds: int) -> int:
    """How many distinct multisets of seeds a replicate can draw: C(2S - 1, S) (126 for S = 5).

    Example:
        >>> seed_multisets(5)
        126
    """
    return math.comb(2 * num_seeds - 1, num_seeds)


def paired_differences(scores: Mapping[str, Any], hops: Sequence[int], *, baseline: str = "grpo",
                       replicates: int = REPLICATES, seed: int = 0, level: float = LEVEL) -> dict[str, dict[str, PairedInterval]]:
    """Each method's paired difference to ``baseline``, overall and per hop count.

    Args:
        scores: method -> [S, N] per-question scores (the same seeds, in the same order, and the
            same questions for every method).
        hops: [N] hop count of each question (the strata; per hop, only that hop's questions).
        baseline: the method every other one is compared with.

    Returns:
        method -> {"all": interval, "1": interval, "2": ...} for every method but ``baseline``
        (``paired_bootstrap`` with the same ``seed`` for each cell).

    Raises:
        ValueError: ``baseline`` missing from ``scores``, or a method whose scores do not have the
            baseline's shape.
    """
    if baseline not in scores:
        raise ValueError(f"scores must hold the baseline {baseline!r}, got methods {sorted(scores)}")
    reference = np.asarray(scores[baseline], dtype=np.float64)
    hops = np.asarray(hops)
    result = {}
    for method, values in scores.items():
        if method == baseline:
            continue
        values = np.asarray(values, dtype=np.float64)
        if values.shape != reference.shape:
            raise ValueError(f"scores[{method!r}] must have the shape of scores[{baseline!r}] {reference.shape}, got {values.shape}")
        difference = values - reference
        cells = {"all": paired_bootstrap(difference, hops, replicates=replicates, seed=seed, level=level)}
        for hop in np.unique(hops):
            members = hops == hop
            cells[str(hop)] = paired_bootstrap(difference[:, members], hops[members], replicates=replicates, seed=seed,
                                               level=level)
        result[method] = cells
    return result
