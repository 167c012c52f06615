"""Bad input gets a clear error naming the argument and what was seen, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import igpo_rewards as igpo
from igpo_rewards.testing import to_backend

from .backend_support import to_numpy

LOGPROB = np.log(np.array([[0.1, 0.5, 0.7], [0.2, 0.3, 0.3]]))
MASK = np.array([[1, 1, 1], [1, 1, 0]], dtype=bool)
OUTCOME = np.array([1.0, 0.0])
GROUPS = np.array([0, 0])


def conv(backend, array):
    return to_backend(np.asarray(array), backend)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda c: igpo.igpo_advantages(c(LOGPROB), c(OUTCOME), c(MASK[:, :2]), c(GROUPS)), ValueError,
         r"turn_mask must have the shape of answer_logprob \(2, 3\), got \(2, 2\)"),
        (lambda c: igpo.igpo_advantages(c(LOGPROB), c(OUTCOME[:1]), c(MASK), c(GROUPS)), ValueError,
         r"outcome must have shape \[B\] with B = 2"),
        (lambda c: igpo.igpo_advantages(c(LOGPROB), c(OUTCOME), c(MASK), c([0, 0, 1])), ValueError,
         r"group_ids must have shape \[B\] with B = 2 .*got shape \(3,\)"),
        (lambda c: igpo.igpo_advantages(c(LOGPROB), c(OUTCOME), c([[1, 0, 1], [1, 1, 0]]), c(GROUPS)), ValueError,
         r"turn_mask must be a prefix mask.*rows \[0\].*\[1, 0, 1\]"),
        (lambda c: igpo.igpo_advantages(c(LOGPROB), c(OUTCOME), c([[1, 2, 1], [1, 1, 0]]), c(GROUPS)), ValueError,
         r"turn_mask must hold only 0/1.*\[0, 1, 2\]"),
        (lambda c: igpo.igpo_advantages(c(LOGPROB), c(OUTCOME), c(MASK), c(GROUPS), gamma=1.5), ValueError,
         r"gamma must be in \[0, 1\], got 1.5"),
        (lambda c: igpo.discounted_returns(c(LOGPROB), c(MASK), gamma=-0.1), ValueError, r"gamma must be in \[0, 1\]"),
        (lambda c: igpo.igpo_advantages(c(LOGPROB), c(OUTCOME), c(MASK), c(GROUPS), mode="pooled"), ValueError,
         r"mode must be one of \['joint', 'separate'\], got 'pooled'"),
        (lambda c: igpo.group_normalize(c(LOGPROB), c(MASK), c(GROUPS), weighting="rollout"), ValueError,
         r"weighting must be one of"),
        (lambda c: igpo.group_normalize(c(LOGPROB), c(MASK), c(GROUPS), scale="mad"), ValueError, r"scale must be one of"),
        (lambda c: igpo.information_gain(c(LOGPROB), c(MASK), kind="entropy"), ValueError, r"kind must be one of"),
        (lambda c: igpo.group_normalize(c(LOGPROB), c(MASK), c(GROUPS), ddof=-1), ValueError, r"ddof must be"),
        (lambda c: igpo.igpo_advantages(c(np.where(MASK, np.nan, LOGPROB)), c(OUTCOME), c(MASK), c(GROUPS)), ValueError,
         r"answer_logprob must hold finite values or -inf at valid positions; found NaN/inf at indices \[\[0, 0\]"),
        (lambda c: igpo.igpo_advantages(c(LOGPROB), c([np.nan, 0.0]), c(MASK), c(GROUPS)), ValueError,
         r"outcome must hold finite values"),
        (lambda c: igpo.group_normalize(c([[1.0, -np.inf, 0.0], [0.0, 0.0, 0.0]]), c(MASK), c(GROUPS)), ValueError,
         r"rewards must hold finite values at valid positions"),
        (lambda c: igpo.answer_logprob(c(np.full((2, 3, 2), np.nan)), c(np.ones((2, 3, 2)))), ValueError,
         r"token_logprobs must hold finite values or -inf"),
        (lambda c: igpo.answer_logprob(c(np.zeros((2, 3))), c(np.ones((2, 3)))), ValueError,
         r"token_logprobs must have shape \[B, T, L\] \(3 dims\), got shape \(2, 3\)"),
        (lambda c: igpo.broadcast_to_tokens(c(LOGPROB), c([[0, 3, -1], [0, 1, -1]])), ValueError,
         r"token_turn_index must lie in \[-1, T = 3.*\[\[0, 1\]\]"),
        (lambda c: igpo.broadcast_to_tokens(c(LOGPROB), c([[0, 1, 2], [0, 1, 2]]), turn_mask=c(MASK)), ValueError,
         r"number of valid turns.*\[\[1, 2\]\]"),
        (lambda c: igpo.broadcast_to_tokens(c(LOGPROB), c([[0.0, 1.0]] * 2)), TypeError, r"token_turn_index must be an integer"),
        (lambda c: igpo.place_turn_rewards(c([[1.0, 2.0]]), c([[1, 0, 1, 0, 1]])), ValueError,
         r"more runs of 1s \(turns\) than turn_rewards has columns \(T = 2\)"),
        (lambda c: igpo.place_turn_rewards(c([[1.0, 2.0]]), c([[1, 1, 0, 0]])), ValueError,
         r"nonzero rewards at \(row, turn\) \[\[0, 1\]\].*would be lost"),
        (lambda c: igpo.place_turn_rewards(c([[1.0, 0.0]]), c([[1, 1, 0, 0]]), turn_mask=c([[1, 1]])), ValueError,
         r"runs must equal turn_mask's valid turns"),
        (lambda c: igpo.advantages_from_token_rewards(c([[0.0, 1.0, 0.5, 0.0, 1.0]]), c([[1, 1, 0, 1, 1]]), c([0])),
         ValueError, r"nonzero rewards on 0-mask tokens between turns at \(row, token\) \[\[0, 2\]\]"),
        (lambda c: igpo.advantages_from_token_rewards(c([[0.0, 1.0, 0.0, 1.0]]), c([[1, 1, 0, 1]]), c([0]), max_turns=1),
         ValueError, r"more runs of 1s than max_turns = 1"),
        (lambda c: igpo.advantages_from_token_rewards(c([[0.0, np.nan, 0.0]]), c([[1, 1, 0]]), c([0])), ValueError,
         r"token_level_rewards must hold finite values"),
        (lambda c: igpo.zero_variance_group_fraction(c([[1.0]]), c([0])), ValueError, r"values must have shape \[B\]"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(backend, call, error, message):
    with pytest.raises(error, match=message):
        call(lambda array: conv(backend, array))


def test_validate_false_skips_value_checks_but_not_shape_checks(backend):
    bad_mask = conv(backend, [[1, 0, 1], [1, 1, 0]])
    igpo.igpo_advantages(conv(backend, LOGPROB), conv(backend, OUTCOME), bad_mask, conv(backend, GROUPS), validate=False)
    with pytest.raises(ValueError, match="turn_mask must have the shape"):
        igpo.igpo_advantages(conv(backend, LOGPROB), conv(backend, OUTCOME), conv(backend, MASK[:, :1]),
                             conv(backend, GROUPS), validate=False)


def test_values_under_padding_are_ignored_not_refused(backend):
    """NaN and +inf in padded turns / masked-out answer tokens are junk, not errors."""
    logprob = np.where(MASK, LOGPROB, np.nan)
    out = igpo.igpo_advantages(conv(backend, logprob), conv(backend, OUTCOME), conv(backend, MASK), conv(backend, GROUPS))
    clean = igpo.igpo_advantages(conv(backend, LOGPROB), conv(backend, OUTCOME), conv(backend, MASK), conv(backend, GROUPS))
    np.testing.assert_array_equal(to_numpy(out.advantages), to_numpy(clean.advantages))
    tokens = np.array([[[-0.5, np.inf]]])
    assert float(to_numpy(igpo.answer_logprob(conv(backend, tokens), conv(backend, [[[1, 0]]])))[0, 0]) == -0.5


def test_unknown_array_types_are_refused():
    with pytest.raises(TypeError, match="NumPy arrays, torch Tensors, JAX arrays"):
        igpo.grpo_advantages({"a": 1.0}, [0])
