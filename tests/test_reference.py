"""Hand-computed golden cases for the float64 loop reference (igpo_rewards.testing.reference).

Every expected value is worked out by hand in the comments next to it, from docs/algorithm.md and
the API contract, never by calling the reference itself. The last tests check identities
between reference functions over drawn batches.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given

from igpo_rewards.testing import reference as ref
from igpo_rewards.testing import strategies as igst

EPS = 1e-6
LOG = math.log


def assert_close(actual, expected, *, rtol=1e-12, atol=1e-12):
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.dtype == np.float64
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# answer_logprob


def test_answer_logprob_masks_tokens_and_keeps_neg_inf():
    token_logprobs = [
        [[-1.0, -3.0, 99.0], [-2.0, -math.inf, 0.0], [5.0, 5.0, 5.0]],
        [[-0.5, np.nan, np.nan], [-0.25, -0.75, -2.0], [-1.0, -1.0, -1.0]],
    ]
    token_mask = [
        [[1, 1, 0], [1, 1, 0], [0, 0, 0]],
        [[1, 0, 0], [1, 1, 1], [True, False, True]],
    ]
    expected = [
        # (-1 - 3) / 2 = -2;  -2 + -inf = -inf;  no answer token -> 0
        [-2.0, -math.inf, 0.0],
        # -0.5 / 1 (NaN under mask 0 ignored);  (-0.25 - 0.75 - 2) / 3 = -1;  (-1 - 1) / 2 = -1
        [-0.5, -1.0, -1.0],
    ]
    out = ref.answer_logprob(token_logprobs, token_mask)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, expected)


def test_answer_logprob_of_an_empty_probe_is_nan_at_a_valid_turn_and_zero_at_padding():
    token_logprobs = np.full((2, 3, 2), -0.5)
    token_mask = [[[1, 1], [0, 0], [1, 0]], [[1, 1], [1, 1], [0, 0]]]
    # row 0: slot 1 is empty but slot 2 has a token, so slot 1 is a valid turn without answer: NaN;
    # row 1: the trailing empty slot is padding: 0.0
    np.testing.assert_array_equal(ref.answer_logprob(token_logprobs, token_mask),
                                  [[-0.5, math.nan, -0.5], [-0.5, -0.5, 0.0]])
    # with turn_mask, row 1's slot 2 is a valid turn: NaN; row 0's slot 2 is padding: its token is still read
    turn_mask = [[1, 1, 0], [1, 1, 1]]
    np.testing.assert_array_equal(ref.answer_logprob(token_logprobs, token_mask, turn_mask=turn_mask),
                                  [[-0.5, math.nan, -0.5], [-0.5, -0.5, math.nan]])


def test_answer_logprob_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="token_mask"):
        ref.answer_logprob(np.zeros((2, 3, 4)), np.ones((2, 3, 5)))
    with pytest.raises(ValueError, match="token_logprobs"):
        ref.answer_logprob(np.zeros((2, 3)), np.ones((2, 3)))


# --------------------------------------------------------------------------------------------
# information_gain and turn_rewards


def test_information_gain_prob_kind():
    answer_logprob = [
        [LOG(0.1), LOG(0.5), LOG(0.2), 7.0],  # n = 3, last slot is padding junk
        [-math.inf, LOG(0.25), 3.0, 3.0],  # n = 2, probe 0 has probability 0
        [LOG(0.9), 1.0, 1.0, 1.0],  # n = 1: answered at once, no information gain
        [5.0, 5.0, 5.0, 5.0],  # n = 0: batch padding
    ]
    turn_mask = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    expected = [
        [0.5 - 0.1, 0.2 - 0.5, 0.0, 0.0],  # IG_j = p_{j+1} - p_j, final turn 0
        [0.25 - 0.0, 0.0, 0.0, 0.0],  # exp(-inf) = 0
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
    assert_close(ref.information_gain(answer_logprob, turn_mask), expected, atol=1e-15)
    assert_close(ref.information_gain(answer_logprob, turn_mask, kind="prob"), expected, atol=1e-15)


def test_information_gain_log_prob_kind_uses_the_floor():
    answer_logprob = [[-math.inf, -2.0, -30.0, -1.0], [-math.inf, -math.inf, 0.0, 0.0]]
    turn_mask = [[1, 1, 1, 1], [1, 1, 0, 0]]
    # floor -20: beliefs row 0 = [-20, -2, -20, -1] -> IG = [18, -18, 19, 0 (final)]
    #            beliefs row 1 = [-20, -20]          -> IG = [0, 0]
    assert_close(
        ref.information_gain(answer_logprob, turn_mask, kind="log_prob"),
        [[18.0, -18.0, 19.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
    )
    # floor -10: beliefs row 0 = [-10, -2, -10, -1] -> IG = [8, -8, 9, 0]
    assert_close(
        ref.information_gain(answer_logprob, turn_mask, kind="log_prob", log_prob_floor=-10.0),
        [[8.0, -8.0, 9.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
    )


def test_information_gain_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        ref.information_gain([[0.0]], [[1]], kind="logprob")


def test_turn_rewards_outcome_on_final_turn_and_weights():
    answer_logprob = [[LOG(0.1), LOG(0.5), -3.0], [LOG(0.3), 9.0, 9.0], [0.0, 0.0, 0.0]]
    turn_mask = [[1, 1, 0], [1, 0, 0], [0, 0, 0]]
    outcome = [0.8, -2.0, 4.0]
    # row 0: IG_0 = 0.5 - 0.1 = 0.4, final turn 1 gets R = 0.8
    # row 1: one turn, only the outcome (format penalty) -2.0
    # row 2: padding, zeros (its outcome 4.0 is ignored)
    assert_close(
        ref.turn_rewards(answer_logprob, outcome, turn_mask),
        [[0.4, 0.8, 0.0], [-2.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        atol=1e-15,
    )
    # ig_weight 0.5: 0.5 * 0.4 = 0.2;  outcome_weight 2: 2 * 0.8 = 1.6, 2 * -2 = -4
    assert_close(
        ref.turn_rewards(answer_logprob, outcome, turn_mask, ig_weight=0.5, outcome_weight=2.0),
        [[0.2, 1.6, 0.0], [-4.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        atol=1e-15,
    )


def test_turn_rewards_rejects_outcome_of_wrong_length():
    with pytest.raises(ValueError, match="outcome"):
        ref.turn_rewards([[0.0, 0.0]], [1.0, 2.0], [[1, 1]])


# --------------------------------------------------------------------------------------------
# group_normalize
#
# Shared case: group 1000 holds rollout 0 with rewards [1, 3] (n = 2) and rollout 2 with [5]
# (n = 1, slot 1 is junk 100); group -7 holds rollout 1 with one entry [7] (slot 1 junk).

REWARDS = [[1.0, 3.0], [7.0, -50.0], [5.0, 100.0]]
MASK = [[True, True], [True, False], [True, False]]
IDS = [1000, -7, 1000]


def test_group_normalize_joint_turn_weighting():
    # joint pool {1, 3, 5}: mean 3, var = (4 + 0 + 4) / 3 = 8/3
    std = math.sqrt(8 / 3)
    expected = [[-2 / (std + EPS), 0.0], [0.0, 0.0], [2 / (std + EPS), 0.0]]
    assert_close(ref.group_normalize(REWARDS, MASK, IDS), expected)
    # single-entry pool {7} of group -7: std := 1, (7 - 7) / (1 + eps) = 0
    assert ref.group_normalize(REWARDS, MASK, IDS)[1, 0] == 0.0


def test_group_normalize_separate_pools():
    # final pool {3 (rollout 0, turn 1), 5 (rollout 2)}: mean 4, std 1
    # non-final pool {1 (rollout 0, turn 0)}: single entry -> 0
    expected = [[0.0, -1 / (1 + EPS)], [0.0, 0.0], [1 / (1 + EPS), 0.0]]
    assert_close(ref.group_normalize(REWARDS, MASK, IDS, mode="separate"), expected)


def test_group_normalize_trajectory_weighting():
    # rollout 0 has 2 entries (w = 1/2 each), rollout 2 has 1 (w = 1); W = 2, N = 3
    # mean = (0.5*1 + 0.5*3 + 1*5) / 2 = 3.5
    # var = (0.5*2.5^2 + 0.5*0.5^2 + 1*1.5^2) / (W * (N - 0) / N) = 5.5 / 2 = 2.75
    std = math.sqrt(2.75)
    expected = [[-2.5 / (std + EPS), -0.5 / (std + EPS)], [0.0, 0.0], [1.5 / (std + EPS), 0.0]]
    assert_close(ref.group_normalize(REWARDS, MASK, IDS, weighting="trajectory"), expected)
    # ddof=1: var = 5.5 / (2 * (3 - 1) / 3) = 4.125
    std = math.sqrt(4.125)
    expected = [[-2.5 / (std + EPS), -0.5 / (std + EPS)], [0.0, 0.0], [1.5 / (std + EPS), 0.0]]
    assert_close(ref.group_normalize(REWARDS, MASK, IDS, weighting="trajectory", ddof=1), expected)


def test_group_normalize_ddof_and_scale_none():
    # ddof=1 on {1, 3, 5}: var = 8 / (3 - 1) = 4, std = 2
    expected = [[-2 / (2 + EPS), 0.0], [0.0, 0.0], [2 / (2 + EPS), 0.0]]
    assert_close(ref.group_normalize(REWARDS, MASK, IDS, ddof=1), expected)
    # scale="none": r - mean only
    assert_close(
        ref.group_normalize(REWARDS, MASK, IDS, scale="none"),
        [[-2.0, 0.0], [0.0, 0.0], [2.0, 0.0]],
    )
    # eps enters the denominator: eps = 1 on {1, 3, 5} -> -2 / (sqrt(8/3) + 1)
    out = ref.group_normalize(REWARDS, MASK, IDS, eps=1.0)
    assert out[0, 0] == pytest.approx(-2 / (math.sqrt(8 / 3) + 1.0), rel=1e-12)


def test_group_normalize_ddof_at_least_pool_size_uses_unit_std():
    # pool {1, 3} with ddof=2: N - ddof = 0 -> std := 1, mean 2
    out = ref.group_normalize([[1.0, 3.0]], [[1, 1]], [0], ddof=2)
    assert_close(out, [[-1 / (1 + EPS), 1 / (1 + EPS)]])


def test_group_normalize_zero_variance_pool_is_exactly_zero():
    # 0.1 is not exact in binary: a naive mean of three 0.1s leaves a rounding residue
    rewards = [[0.1, 0.1], [0.1, 0.0], [2.0, 2.0]]
    mask = [[1, 1], [1, 0], [1, 1]]
    for mode in ("joint", "separate"):
        for weighting in ("turn", "trajectory"):
            for scale in ("std", "none"):
                out = ref.group_normalize(
                    rewards, mask, [4, 4, 9], mode=mode, weighting=weighting, scale=scale
                )
                np.testing.assert_array_equal(out, np.zeros((3, 2)))


def test_group_normalize_string_uids_and_padded_rows():
    # verl's uid strings in an object array; rollout 3 is batch padding of group "q1"
    rewards = [[1.0, 3.0], [7.0, -50.0], [5.0, 100.0], [123.0, 456.0]]
    mask = [[1, 1], [1, 0], [1, 0], [0, 0]]
    uids = np.array(["q1", "q2", "q1", "q1"], dtype=object)
    std = math.sqrt(8 / 3)  # pool {1, 3, 5} as above: the padded row adds nothing
    expected = [[-2 / (std + EPS), 0.0], [0.0, 0.0], [2 / (std + EPS), 0.0], [0.0, 0.0]]
    assert_close(ref.group_normalize(rewards, mask, uids), expected)
    assert_close(ref.group_normalize(rewards, mask, ["q1", "q2", "q1", "q1"]), expected)


def test_group_normalize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="group_ids"):
        ref.group_normalize(REWARDS, MASK, [1, 2])
    with pytest.raises(ValueError, match="turn_mask"):
        ref.group_normalize(REWARDS, [[1, 1]], IDS)
    with pytest.raises(ValueError, match="mode"):
        ref.group_normalize(REWARDS, MASK, IDS, mode="pooled")
    with pytest.raises(ValueError, match="weighting"):
        ref.group_normalize(REWARDS, MASK, IDS, weighting="rollout")
    with pytest.raises(ValueError, match="scale"):
        ref.group_normalize(REWARDS, MASK, IDS, scale="mad")


# --------------------------------------------------------------------------------------------
# discounted_returns


def test_discounted_returns_gammas_and_padding():
    rewards = [[1.0, 2.0, 4.0, 9.0], [3.0, 8.0, 8.0, 8.0], [5.0, 5.0, 5.0, 5.0]]
    mask = [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    # gamma = 1: suffix sums 1+2+4 = 7, 2+4 = 6, 4
    assert_close(
        ref.discounted_returns(rewards, mask),
        [[7.0, 6.0, 4.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0] * 4],
    )
    # gamma = 0.5: A_2 = 4, A_1 = 2 + 0.5*4 = 4, A_0 = 1 + 0.5*2 + 0.25*4 = 3
    assert_close(
        ref.discounted_returns(rewards, mask, gamma=0.5),
        [[3.0, 4.0, 4.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0] * 4],
    )
    # gamma = 0: 0^0 = 1, so the rewards themselves (padded slots -> 0)
    assert_close(
        ref.discounted_returns(rewards, mask, gamma=0.0),
        [[1.0, 2.0, 4.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0] * 4],
    )


# --------------------------------------------------------------------------------------------
# igpo_advantages
#
# The paper's worked example shape, one question, G = 4 rollouts, gamma = 1, prob kind:
#   rollout 0: searches once; the retrieved text lifts the probe from p = 0.1 to p = 0.6, but
#              the final answer is wrong (F1 = 0).        r = [0.6 - 0.1, 0] = [0.5, 0]
#   rollout 1: answers at once, correctly (F1 = 1).      r = [1]
#   rollout 2: a useless search, p 0.2 -> 0.1, wrong.    r = [-0.1, 0]
#   rollout 3: answers at once, wrong.                   r = [0]
# joint pool {0.5, 0, 1, -0.1, 0, 0}: N = 6, mean = 1.4 / 6 = 7/30
# deviations (x 1/30): 8, -7, 23, -10, -7, -7; squares sum = (64+49+529+100+49+49)/900 = 840/900
# var = 840 / 900 / 6 = 7/45, std = sqrt(7/45)

WORKED_LOGPROB = [[LOG(0.1), LOG(0.6)], [LOG(0.9), 4.0], [LOG(0.2), LOG(0.1)], [LOG(0.3), -8.0]]
WORKED_OUTCOME = [0.0, 1.0, 0.0, 0.0]
WORKED_MASK = [[1, 1], [1, 0], [1, 1], [1, 0]]
WORKED_IDS = ["q", "q", "q", "q"]


def _worked_example_expected():
    d = math.sqrt(7 / 45) + EPS
    normalized = [[(8 / 30) / d, (-7 / 30) / d], [(23 / 30) / d, 0.0], [(-10 / 30) / d, (-7 / 30) / d], [(-7 / 30) / d, 0.0]]
    # gamma = 1: A_0 = A^_0 + A^_1
    advantages = [
        [(8 / 30 - 7 / 30) / d, (-7 / 30) / d],
        [(23 / 30) / d, 0.0],
        [(-10 / 30 - 7 / 30) / d, (-7 / 30) / d],
        [(-7 / 30) / d, 0.0],
    ]
    return normalized, advantages


def test_igpo_advantages_worked_example_credits_the_good_search_of_a_wrong_answer():
    out = ref.igpo_advantages(WORKED_LOGPROB, WORKED_OUTCOME, WORKED_MASK, WORKED_IDS, gamma=1.0)
    normalized, advantages = _worked_example_expected()
    assert_close(out.information_gain, [[0.5, 0.0], [0.0, 0.0], [-0.1, 0.0], [0.0, 0.0]], atol=1e-15)
    assert_close(out.rewards, [[0.5, 0.0], [1.0, 0.0], [-0.1, 0.0], [0.0, 0.0]], atol=1e-15)
    assert_close(out.normalized_rewards, normalized, atol=1e-12)
    assert_close(out.advantages, advantages, atol=1e-12)
    # the retrieval turn of the wrong rollout gets a positive advantage (1/30 / 0.3944 = 0.0845)
    assert out.advantages[0, 0] > 0.08
    # while outcome-only GRPO gives that whole rollout a negative one: (0 - 0.25) / sqrt(0.1875)
    assert ref.grpo_advantages(WORKED_OUTCOME, WORKED_IDS)[0] < -0.5


def test_igpo_advantages_worked_example_separate_pools():
    out = ref.igpo_advantages(
        WORKED_LOGPROB, WORKED_OUTCOME, WORKED_MASK, WORKED_IDS, mode="separate"
    )
    # IG pool {0.5, -0.1}: mean 0.2, std 0.3
    # final pool {0, 1, 0, 0}: mean 0.25, var = (3 * 0.0625 + 0.5625) / 4 = 0.1875
    s_ig = 0.3 + EPS
    s_out = math.sqrt(0.1875) + EPS
    normalized = [
        [0.3 / s_ig, -0.25 / s_out],
        [0.75 / s_out, 0.0],
        [-0.3 / s_ig, -0.25 / s_out],
        [-0.25 / s_out, 0.0],
    ]
    assert_close(out.normalized_rewards, normalized, atol=1e-12)
    # A_0 of rollout 0 = 0.3/0.3 - 0.25/0.433 = 0.42 > 0
    assert_close(out.advantages[0], [0.3 / s_ig - 0.25 / s_out, -0.25 / s_out], atol=1e-12)
    assert out.advantages[0, 0] > 0.4


def test_igpo_advantages_padded_rows_change_nothing():
    logprob = WORKED_LOGPROB + [[3.0, 3.0]]
    outcome = WORKED_OUTCOME + [5.0]
    mask = WORKED_MASK + [[0, 0]]
    out = ref.igpo_advantages(logprob, outcome, mask, WORKED_IDS + ["q"])
    normalized, advantages = _worked_example_expected()
    assert_close(out.advantages, advantages + [[0.0, 0.0]], atol=1e-12)
    assert_close(out.normalized_rewards, normalized + [[0.0, 0.0]], atol=1e-12)
    np.testing.assert_array_equal(out.rewards[4], [0.0, 0.0])


def test_igpo_advantages_log_prob_kind_with_neg_inf_and_gamma_half():
    # rollout 0: m = [-inf, -1], floor -20 -> IG_0 = -1 - (-20) = 19, R = 1 -> r = [19, 1]
    # rollout 1: one turn, R = 0 -> r = [0]
    # pool {19, 1, 0}: mean 20/3; deviations 37/3, -17/3, -20/3
    # var = (1369 + 289 + 400) / 9 / 3 = 2058/27
    d = math.sqrt(2058 / 27) + EPS
    out = ref.igpo_advantages(
        [[-math.inf, -1.0], [-2.0, 0.0]],
        [1.0, 0.0],
        [[1, 1], [1, 0]],
        [3, 3],
        kind="log_prob",
        gamma=0.5,
    )
    assert_close(out.rewards, [[19.0, 1.0], [0.0, 0.0]])
    # gamma 0.5: A_0 = 37/3/d + 0.5 * (-17/3)/d = (57/6)/d
    assert_close(out.advantages, [[(57 / 6) / d, (-17 / 3) / d], [(-20 / 3) / d, 0.0]])


def test_igpo_advantages_gamma_zero_returns_normalized_rewards():
    out = ref.igpo_advantages(WORKED_LOGPROB, WORKED_OUTCOME, WORKED_MASK, WORKED_IDS, gamma=0.0)
    normalized, _ = _worked_example_expected()
    assert_close(out.advantages, normalized, atol=1e-12)


def test_igpo_advantages_prob_kind_neg_inf_and_weights():
    # m = [-inf, log 0.5]: IG_0 = 0.5 - 0 = 0.5; ig_weight 2 -> 1.0; outcome_weight 0.5 * 1 = 0.5
    # second rollout: one turn, R = 0.5 * 0.0 = 0 -> pool {1.0, 0.5, 0.0}: mean 0.5, var 1/6
    d = math.sqrt(1 / 6) + EPS
    out = ref.igpo_advantages(
        [[-math.inf, LOG(0.5)], [LOG(0.5), 0.0]],
        [1.0, 0.0],
        [[1, 1], [1, 0]],
        [1, 1],
        ig_weight=2.0,
        outcome_weight=0.5,
    )
    assert_close(out.rewards, [[1.0, 0.5], [0.0, 0.0]], atol=1e-15)
    assert_close(out.normalized_rewards, [[0.5 / d, 0.0], [-0.5 / d, 0.0]], atol=1e-12)
    assert_close(out.advantages, [[0.5 / d, 0.0], [-0.5 / d, 0.0]], atol=1e-12)


# --------------------------------------------------------------------------------------------
# grpo_advantages


def test_grpo_advantages_groups_single_and_zero_variance():
    outcome = [0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.7]
    ids = ["a", "a", "a", "a", "b", "b", "c"]
    # group a: mean 0.25, var = (3 * 0.0625 + 0.5625) / 4 = 0.1875
    # group b: all equal -> exactly 0 (advantage collapse); group c: single rollout -> 0
    s = math.sqrt(0.1875) + EPS
    expected = [-0.25 / s, 0.75 / s, -0.25 / s, -0.25 / s, 0.0, 0.0, 0.0]
    out = ref.grpo_advantages(outcome, ids)
    assert_close(out, expected)
    assert out[4] == 0.0 and out[5] == 0.0 and out[6] == 0.0
    # ddof=1 on group a: var = 0.75 / 3 = 0.25, std = 0.5
    s = 0.5 + EPS
    assert_close(ref.grpo_advantages(outcome, ids, ddof=1)[:4], [-0.25 / s, 0.75 / s, -0.25 / s, -0.25 / s])
    # scale="none": R - mean
    assert_close(
        ref.grpo_advantages(outcome, ids, scale="none"), [-0.25, 0.75, -0.25, -0.25, 0.0, 0.0, 0.0]
    )


# --------------------------------------------------------------------------------------------
# token layout: turn index, broadcast, placement


def test_turn_index_from_response_mask_verl_layout():
    mask = [
        [1, 1, 0, 0, 1, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # padding row
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # one turn filling the row
        [1, 0, 1, 0, 1, 0, 1, 0, 1, 0],  # five one-token turns
    ]
    out = ref.turn_index_from_response_mask(mask)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(
        out,
        [
            [0, 0, -1, -1, 1, -1, 2, 2, -1, -1],
            [-1] * 10,
            [0] * 10,
            [0, -1, 1, -1, 2, -1, 3, -1, 4, -1],
        ],
    )
    np.testing.assert_array_equal(
        ref.turn_index_from_response_mask(np.asarray(mask, dtype=bool)), out
    )


def test_broadcast_to_tokens():
    values = [[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]]
    index = [[0, 0, -1, 1, -1, 2], [-1, -1, -1, -1, -1, -1]]
    assert_close(
        ref.broadcast_to_tokens(values, index),
        [[10.0, 10.0, 0.0, 20.0, 0.0, 30.0], [0.0] * 6],
    )
    # with turn_mask, tokens of a masked-out turn get 0
    assert_close(
        ref.broadcast_to_tokens(values, index, turn_mask=[[1, 1, 0], [0, 0, 0]]),
        [[10.0, 10.0, 0.0, 20.0, 0.0, 0.0], [0.0] * 6],
    )
    with pytest.raises(ValueError, match="token_turn_index"):
        ref.broadcast_to_tokens(values, [[3, -1, -1, -1, -1, -1], [-1] * 6])


def test_place_turn_rewards_and_round_trip():
    response_mask = [[1, 1, 0, 0, 1, 0, 1, 1, 0, 0], [0] * 10, [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]]
    rewards = [[0.5, 0.0, -0.2], [9.0, 9.0, 9.0], [1.0, 0.0, 0.0]]
    # runs of row 0 end at tokens 1, 4, 7; the exact-zero reward of turn 1 stays a zero
    expected = [
        [0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, -0.2, 0.0, 0.0],
        [0.0] * 10,
        [0.0, 0.0, 1.0] + [0.0] * 7,
    ]
    placed = ref.place_turn_rewards(rewards, response_mask)
    assert_close(placed, expected)
    # round trip: summing the placed rewards over each turn's tokens gives back the turn reward,
    # and broadcasting the turn rewards matches the placement at the run's last token
    index = ref.turn_index_from_response_mask(response_mask)
    for j, reward in enumerate(rewards[0]):
        assert placed[0][index[0] == j].sum() == reward
    broadcast = ref.broadcast_to_tokens(rewards, index)
    last_token = np.zeros((3, 10), dtype=bool)
    last_token[0, [1, 4, 7]] = True
    last_token[2, 2] = True
    np.testing.assert_array_equal(np.where(last_token, broadcast, 0.0), placed)
    # with turn_mask, masked-out turns are not placed
    assert_close(
        ref.place_turn_rewards(rewards, response_mask, turn_mask=[[1, 1, 0], [0, 0, 0], [1, 0, 0]]),
        [[0.0, 0.5] + [0.0] * 8, [0.0] * 10, [0.0, 0.0, 1.0] + [0.0] * 7],
    )
    with pytest.raises(ValueError, match="turn_rewards"):
        ref.place_turn_rewards([[1.0, 2.0]], [[1, 0, 1, 0, 1]])


def test_advantages_from_token_rewards_reads_last_tokens_and_trailing_reward():
    # group "u1": row 0 has two turns; its information gain 0.0 is exact (at token 1) and its
    #             outcome 1.0 sits on an observation token after the last run (token 6);
    #             row 1 has one turn, outcome 0.0 at its last token.
    # group "u2": row 2 is padding (no generated token); its stray 5.0 is ignored.
    response_mask = [
        [1, 1, 0, 0, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ]
    token_level_rewards = [
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ]
    ids = np.array(["u1", "u1", "u2"], dtype=object)
    # turn rewards: row 0 [0, 1], row 1 [0]; joint pool {0, 1, 0}: mean 1/3,
    # var = (1/9 + 4/9 + 1/9) / 3 = 2/9, std = sqrt(2)/3
    d = math.sqrt(2) / 3 + EPS
    # gamma = 1: row 0 A = [-1/3 + 2/3, 2/3] / d = [1/3, 2/3] / d, row 1 A = [-1/3] / d
    b, c = (1 / 3) / d, (2 / 3) / d
    expected = [
        [b, b, 0.0, 0.0, c, 0.0, 0.0],
        [-b, -b, -b, 0.0, 0.0, 0.0, 0.0],
        [0.0] * 7,
    ]
    out = ref.advantages_from_token_rewards(token_level_rewards, response_mask, ids)
    assert_close(out, expected)
    assert_close(
        ref.advantages_from_token_rewards(token_level_rewards, response_mask, ids, max_turns=3), expected
    )
    # gamma = 0: each turn keeps its own normalized reward: row 0 [-1/3, 2/3] / d
    assert_close(
        ref.advantages_from_token_rewards(token_level_rewards, response_mask, ids, gamma=0.0),
        [[-b, -b, 0.0, 0.0, c, 0.0, 0.0], [-b, -b, -b, 0.0, 0.0, 0.0, 0.0], [0.0] * 7],
    )
    # separate: final pool {1, 0}: mean 0.5, std 0.5; IG pool {0} alone -> 0
    h = 0.5 / (0.5 + EPS)
    assert_close(
        ref.advantages_from_token_rewards(token_level_rewards, response_mask, ids, mode="separate"),
        [[h, h, 0.0, 0.0, h, 0.0, 0.0], [-h, -h, -h, 0.0, 0.0, 0.0, 0.0], [0.0] * 7],
    )
    with pytest.raises(ValueError, match="max_turns"):
        ref.advantages_from_token_rewards(token_level_rewards, response_mask, ids, max_turns=1)


# --------------------------------------------------------------------------------------------
# zero_variance_group_fraction


def test_zero_variance_group_fraction():
    # group 7 {1, 1}: equal; group 3 {0, 1}: not; group 9 {0.5}: single -> counts. 2 of 3.
    out = ref.zero_variance_group_fraction([1.0, 1.0, 0.0, 1.0, 0.5], [7, 7, 3, 3, 9])
    assert isinstance(out, float)
    assert out == pytest.approx(2 / 3, rel=1e-15)
    assert ref.zero_variance_group_fraction([0.0, 1.0], ["x", "x"]) == 0.0
    assert ref.zero_variance_group_fraction([0.2, 0.2], np.array(["x", "x"], dtype=object)) == 1.0
    assert ref.zero_variance_group_fraction([], []) == 0.0


# --------------------------------------------------------------------------------------------
# Identities between the reference functions, over drawn batches (rlax-style cross-checks)

@given(igst.token_batches(final_reward_after_last_run=True))
def test_token_path_equals_turn_path(batch):
    # reading turn rewards from the token layout, normalizing and discounting, then
    # broadcasting == doing the same on the turn rewards directly
    normalized = ref.group_normalize(batch.turn_rewards, batch.turn_mask, batch.group_ids)
    advantages = ref.discounted_returns(normalized, batch.turn_mask, gamma=0.9)
    index = ref.turn_index_from_response_mask(batch.response_mask)
    np.testing.assert_array_equal(
        ref.advantages_from_token_rewards(
            batch.token_level_rewards, batch.response_mask, batch.group_ids, gamma=0.9
        ),
        ref.broadcast_to_tokens(advantages, index),
    )


@given(igst.token_batches())
def test_place_turn_rewards_rebuilds_the_token_layout(batch):
    np.testing.assert_array_equal(
        ref.place_turn_rewards(batch.turn_rewards, batch.response_mask), batch.token_level_rewards
    )
    np.testing.assert_array_equal(
        ref.place_turn_rewards(batch.turn_rewards, batch.response_mask, turn_mask=batch.turn_mask),
        batch.token_level_rewards,
    )


@given(igst.turn_batches())
def test_gamma_zero_and_grpo_as_a_one_turn_pool(batch):
    out = ref.igpo_advantages(
        batch.answer_logprob, batch.outcome, batch.turn_mask, batch.group_ids, gamma=0.0
    )
    np.testing.assert_array_equal(out.advantages, out.normalized_rewards)
    assert np.isfinite(out.advantages).all()
    np.testing.assert_array_equal(out.advantages[~batch.turn_mask], 0.0)
    # GRPO == joint normalization of a single always-valid turn
    one_turn = np.ones((len(batch.outcome), 1), dtype=bool)
    np.testing.assert_array_equal(
        ref.grpo_advantages(batch.outcome, batch.group_ids),
        ref.group_normalize(batch.outcome[:, None], one_turn, batch.group_ids)[:, 0],
    )
