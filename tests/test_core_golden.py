"""Hand-computed cases for the library itself, on every backend (arithmetic in the comments)."""

from __future__ import annotations

import math

import numpy as np

import igpo_rewards as igpo

from .backend_support import run

SQRT2 = math.sqrt(2.0)
# eps = 1e-6 next to stds of ~0.2 moves results by ~5e-6 relative.
CLOSE = dict(rtol=2e-5, atol=1e-6)

# The paper's worked example shape. One question, two rollouts, both answer WRONG (R = 0):
#   rollout A: a search turn lifts p(answer) from 0.1 to 0.6, then a wrong answer.
#   rollout B: answers at once, wrong.
ANSWER_LOGPROB = np.log([[0.1, 0.6], [0.3, 1.0]])   # B's second probe slot is padding
OUTCOME = np.array([0.0, 0.0])
TURN_MASK = np.array([[1, 1], [1, 0]], dtype=bool)
GROUPS = np.array([4, 4])


def test_wrong_answer_with_a_good_search_turn_gets_a_positive_advantage(backend):
    result = run(igpo.igpo_advantages, backend, ANSWER_LOGPROB, OUTCOME, TURN_MASK, GROUPS)
    # rewards: A = [0.6 - 0.1, R_A] = [0.5, 0], B = [R_B] = [0]
    np.testing.assert_allclose(result.rewards, [[0.5, 0.0], [0.0, 0.0]], **CLOSE)
    # joint pool {0.5, 0, 0}: mean 1/6, population var ((1/3)^2 + 2 (1/6)^2) / 3 = 1/18
    # -> A^ = (1/3) / sqrt(1/18) = sqrt(2), and -(1/6) / sqrt(1/18) = -1/sqrt(2)
    np.testing.assert_allclose(result.normalized_rewards, [[SQRT2, -1 / SQRT2], [-1 / SQRT2, 0.0]], **CLOSE)
    # gamma = 1: A's search turn gets sqrt(2) - 1/sqrt(2) = 1/sqrt(2) > 0
    np.testing.assert_allclose(result.advantages, [[1 / SQRT2, -1 / SQRT2], [-1 / SQRT2, 0.0]], **CLOSE)
    # GRPO sees two equal outcomes: advantage collapse, no signal at all
    np.testing.assert_array_equal(run(igpo.grpo_advantages, backend, OUTCOME, GROUPS), [0.0, 0.0])


def test_trajectory_weighting(backend):
    result = run(igpo.igpo_advantages, backend, ANSWER_LOGPROB, OUTCOME, TURN_MASK, GROUPS, weighting="trajectory")
    # weights: A's two entries 1/2 each, B's one entry 1; W = 2
    # mean = (0.5 * 0.5) / 2 = 0.125; deviations 0.375, -0.125, -0.125
    # var = (0.5 * 0.375^2 + 0.5 * 0.125^2 + 0.125^2) / W = 0.09375 / 2 = 0.046875
    std = math.sqrt(0.046875)
    np.testing.assert_allclose(
        result.normalized_rewards, [[0.375 / std, -0.125 / std], [-0.125 / std, 0.0]], **CLOSE)


def test_separate_pools_and_ddof(backend):
    # rollout A: p 0.1 -> 0.6, R = 0;  B: p 0.2 -> 0.2 -> 0.4, R = 1;  C: one turn, R = 0.5
    logprob = np.log([[0.1, 0.6, 1.0], [0.2, 0.2, 0.4], [0.5, 1.0, 1.0]])
    mask = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=bool)
    outcome = np.array([0.0, 1.0, 0.5])
    result = run(igpo.igpo_advantages, backend, logprob, outcome, mask, np.array([0, 0, 0]), mode="separate", ddof=1)
    # IG pool {0.5, 0.0, 0.2}: mean 0.7/3, deviations 0.8/3, -0.7/3, -0.1/3; sample var (ddof 1)
    # = (0.64 + 0.49 + 0.01) / 9 / 2 = 0.0633333...
    ig_std = math.sqrt(1.14 / 18)
    # outcome pool {0, 1, 0.5}: mean 0.5, deviations -0.5, 0.5, 0; sample var 0.5 / 2 = 0.25
    np.testing.assert_allclose(
        result.normalized_rewards,
        [[0.8 / 3 / ig_std, -1.0, 0.0], [-0.7 / 3 / ig_std, -0.1 / 3 / ig_std, 1.0], [0.0, 0.0, 0.0]],
        **CLOSE,
    )


def test_log_prob_kind_floors_negative_infinity(backend):
    # probes: -inf (impossible) then log 0.5; floor -20 -> IG = log(0.5) + 20
    logprob = np.array([[-np.inf, math.log(0.5)]])
    gain = run(igpo.information_gain, backend, logprob, np.array([[1, 1]]), kind="log_prob")
    np.testing.assert_allclose(gain, [[math.log(0.5) + 20.0, 0.0]], rtol=1e-6)
    # the "prob" kind reads -inf as probability 0: IG = 0.5
    np.testing.assert_allclose(run(igpo.information_gain, backend, logprob, np.array([[1, 1]])), [[0.5, 0.0]])


def test_verl_layout_with_the_outcome_after_a_final_observation(backend):
    # row 0: turn 0 = tokens 0-1 (IG 0.0 at token 1: an exact zero is a real reward),
    # observation tokens 2-3, turn 1 = token 4, then an observation token 5 holding the outcome 1.0
    # row 1: one turn, tokens 0-2, outcome 0 at token 2
    mask = np.array([[1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0]])
    rewards = np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    got = run(igpo.advantages_from_token_rewards, backend, rewards, mask, np.array([1, 1]), gamma=0.5)
    # turn rewards: row 0 = [0.0, 1.0], row 1 = [0.0]; joint pool {0, 1, 0}: mean 1/3, std sqrt(2)/3
    low, high = (-1 / 3) / (SQRT2 / 3), (2 / 3) / (SQRT2 / 3)
    # row 0: turn 1 -> high; turn 0 -> low + 0.5 high
    want = [[low + 0.5 * high] * 2 + [0, 0, high, 0], [low] * 3 + [0, 0, 0]]
    np.testing.assert_allclose(got, want, **CLOSE)
