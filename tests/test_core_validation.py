"""Bad input gets a clear error naming the argument and what was seen, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import igpo_rewards as igpo

from .backend_support import to_backend, to_numpy

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
         r"mode must be one of \['joint', 'separate', 'turn_index'\], got 'pooled'"),
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
@pytest.mark.filterwarnings("ignore::igpo_rewards.SingleRolloutGroupWarning")  # one-row batches, on purpose
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


# -- hyperparameters: TypeError for a wrong type, ValueError for a wrong value, on every function --

HYPERPARAMETER_CALLS = {
    "gamma": lambda c, **kw: igpo.igpo_advantages(c(LOGPROB), c(OUTCOME), c(MASK), GROUPS, **kw),
    "eps": lambda c, **kw: igpo.grpo_advantages(c(OUTCOME), GROUPS, **kw),
    "ddof": lambda c, **kw: igpo.group_normalize(c(LOGPROB), c(MASK), GROUPS, **kw),
    "ig_weight": lambda c, **kw: igpo.turn_rewards(c(LOGPROB), c(OUTCOME), c(MASK), **kw),
    "outcome_weight": lambda c, **kw: igpo.igpo_advantages(c(LOGPROB), c(OUTCOME), c(MASK), GROUPS, **kw),
    "log_prob_floor": lambda c, **kw: igpo.information_gain(c(LOGPROB), c(MASK), kind="log_prob", **kw),
    "max_turns": lambda c, **kw: igpo.advantages_from_token_rewards(c([[0.0, 1.0]]), c([[1, 1]]), [0], **kw),
    "mode": lambda c, **kw: igpo.group_normalize(c(LOGPROB), c(MASK), GROUPS, **kw),
    "validate": lambda c, **kw: igpo.discounted_returns(c(LOGPROB), c(MASK), **kw),
}

WRONG_VALUES = [
    ("gamma", float("nan"), r"gamma must be finite, got nan"),
    ("gamma", float("inf"), r"gamma must be finite, got inf"),
    ("eps", float("inf"), r"eps must be finite, got inf"),
    ("eps", -1e-6, r"eps must be >= 0, got -1e-06"),
    ("eps", float("nan"), r"eps must be finite, got nan"),
    ("ig_weight", float("-inf"), r"ig_weight must be finite, got -inf"),
    ("outcome_weight", float("inf"), r"outcome_weight must be finite, got inf"),
    ("outcome_weight", float("nan"), r"outcome_weight must be finite, got nan"),
    ("log_prob_floor", float("-inf"), r"log_prob_floor must be finite, got -inf"),
    ("ddof", -1, r"ddof must be >= 0, got -1"),
    ("max_turns", -2, r"max_turns must be >= 0, got -2"),
    ("mode", "pooled", r"mode must be one of \['joint', 'separate', 'turn_index'\], got 'pooled'"),
]

WRONG_TYPES = [
    ("gamma", "0.9", r"gamma must be a real number \(a Python or NumPy scalar\), got str '0.9'"),
    ("gamma", True, r"gamma must be a real number.*got bool True"),
    ("eps", None, r"eps must be a real number.*got NoneType None"),
    ("ig_weight", [1.0], r"ig_weight must be a real number.*got list"),
    ("outcome_weight", np.array([1.0, 2.0]), r"outcome_weight must be a real number.*got ndarray"),
    ("ddof", 1.0, r"ddof must be an int, got float 1.0"),
    ("ddof", True, r"ddof must be an int, got bool True"),
    ("max_turns", 2.5, r"max_turns must be an int, got float 2.5"),
    ("mode", 1, r"mode must be a str, one of \['joint', 'separate', 'turn_index'\], got int 1"),
    ("validate", "yes", r"validate must be a bool, got str 'yes'"),
]


@pytest.mark.parametrize("argument, value, message", WRONG_VALUES)
def test_out_of_range_hyperparameters_are_value_errors(backend, argument, value, message):
    with pytest.raises(ValueError, match=message):
        HYPERPARAMETER_CALLS[argument](lambda array: conv(backend, array), **{argument: value})


@pytest.mark.parametrize("argument, value, message", WRONG_TYPES)
def test_wrongly_typed_hyperparameters_are_type_errors(backend, argument, value, message):
    with pytest.raises(TypeError, match=message):
        HYPERPARAMETER_CALLS[argument](lambda array: conv(backend, array), **{argument: value})


def test_numpy_scalars_are_accepted_like_python_numbers(backend):
    c = lambda array: conv(backend, array)  # noqa: E731
    numpy_scalars = dict(gamma=np.float32(0.9), eps=np.float64(1e-6), ddof=np.int64(0), ig_weight=np.float32(0.5),
                         outcome_weight=np.float16(2.0), log_prob_floor=np.float32(-20.0), kind="log_prob")
    python_numbers = {key: value.item() if hasattr(value, "item") else value for key, value in numpy_scalars.items()}
    got = igpo.igpo_advantages(c(LOGPROB), c(OUTCOME), c(MASK), GROUPS, **numpy_scalars)
    want = igpo.igpo_advantages(c(LOGPROB), c(OUTCOME), c(MASK), GROUPS, **python_numbers)
    for field in got._fields:
        assert getattr(got, field).dtype == getattr(want, field).dtype, field  # no promotion by a NumPy scalar
        np.testing.assert_array_equal(to_numpy(getattr(got, field)), to_numpy(getattr(want, field)))


# -- the bugs of issue 8 -------------------------------------------------------------------------


def test_eps_zero_keeps_zero_variance_pools_exactly_zero(backend):
    """The docs promise exactly 0 for a zero-variance pool; with eps=0 that was 0/0 = NaN."""
    out = to_numpy(igpo.grpo_advantages(conv(backend, [1.0, 1.0, 0.0, 1.0]), [0, 0, 1, 1], eps=0.0))
    np.testing.assert_array_equal(out[:2], [0.0, 0.0])
    np.testing.assert_allclose(out[2:], [-1.0, 1.0])
    constant = np.where(MASK, 0.25, 0.0)
    normalized = to_numpy(igpo.group_normalize(conv(backend, constant), conv(backend, MASK), GROUPS, eps=0.0))
    np.testing.assert_array_equal(normalized, np.zeros_like(constant))
    result = igpo.igpo_advantages(conv(backend, np.log(np.full((2, 3), 0.5))), conv(backend, [0.0, 0.0]),
                                  conv(backend, MASK), GROUPS, eps=0.0)
    np.testing.assert_array_equal(to_numpy(result.advantages), 0.0)


def test_errors_name_the_callers_argument(backend):
    with pytest.raises(ValueError, match=r"^outcome must hold finite values everywhere; found NaN/inf at indices \[0\]$"):
        igpo.grpo_advantages(conv(backend, [np.nan, 0.0, 1.0, 0.0]), [0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"^outcome must have shape \[B\]"):
        igpo.grpo_advantages(conv(backend, [[1.0, 0.0]]), [0])
    with pytest.raises(ValueError, match=r"^values must hold finite values or -inf everywhere; found NaN/inf at indices \[1\]"):
        igpo.zero_variance_group_fraction(conv(backend, [0.0, np.nan]), [0, 0])


def test_mixing_libraries_names_the_users_arguments(backend):
    for other in sorted({"numpy", "torch", "jax"} - {backend}):
        with pytest.raises(TypeError, match=rf"'answer_logprob' is {backend}, 'outcome' is {other}"):
            igpo.igpo_advantages(conv(backend, LOGPROB), to_backend(OUTCOME, other), MASK.tolist(), GROUPS)
        with pytest.raises(TypeError, match=rf"'answer_logprob' is {backend}, 'outcome' is {other}"):
            igpo.turn_rewards(conv(backend, LOGPROB), to_backend(OUTCOME, other), MASK.tolist())


def test_a_valid_probe_without_answer_tokens_is_an_error_not_probability_one(backend):
    logprobs = np.log(np.full((1, 3, 2), 0.5))
    lost_middle = np.array([[[1, 1], [0, 0], [1, 1]]])  # probe 1 lost its answer, probe 2 has one
    with pytest.raises(ValueError, match=r"no answer token at valid turns \(row, turn\) \[\[0, 1\]\]"):
        igpo.answer_logprob(conv(backend, logprobs), conv(backend, lost_middle))
    lost_last = np.array([[[1, 1], [1, 1], [0, 0]]])
    with pytest.raises(ValueError, match=r"\[\[0, 2\]\]"):
        igpo.answer_logprob(conv(backend, logprobs), conv(backend, lost_last), turn_mask=conv(backend, [[1, 1, 1]]))
    # Unvalidated, the slot is NaN, which the next function refuses at a valid turn.
    m = igpo.answer_logprob(conv(backend, logprobs), conv(backend, lost_middle), validate=False)
    assert np.isnan(to_numpy(m)[0, 1])
    with pytest.raises(ValueError, match=r"answer_logprob must hold finite values or -inf at valid positions"):
        igpo.igpo_advantages(m, conv(backend, [1.0]), conv(backend, [[1, 1, 1]]), [0])
    # A padded slot stays a 0.0 placeholder, with or without turn_mask.
    padded = igpo.answer_logprob(conv(backend, logprobs), conv(backend, lost_last), turn_mask=conv(backend, [[1, 1, 0]]))
    np.testing.assert_allclose(to_numpy(padded), [[np.log(0.5), np.log(0.5), 0.0]], rtol=1e-6)


@pytest.mark.backends("torch")
def test_validate_on_the_meta_device_says_to_pass_validate_false(backend):
    import torch

    meta = torch.device("meta")
    with pytest.raises(ValueError, match=r"meta tensor.*pass validate=False"):
        igpo.igpo_advantages(torch.empty(2, 3, device=meta), torch.empty(2, device=meta),
                             torch.ones(2, 3, dtype=torch.bool, device=meta), torch.zeros(2, dtype=torch.long, device=meta))
    with pytest.raises(ValueError, match=r"meta tensor.*max_turns"):
        igpo.advantages_from_token_rewards(torch.empty(2, 4, device=meta), torch.ones(2, 4, device=meta, dtype=torch.bool),
                                           [0, 0], validate=False)


# -- issue 18/23: the silent slips, now errors or warnings ------------------------------------------


PROBABILITIES = np.exp(LOGPROB)  # what a user who forgot the log would pass


@pytest.mark.parametrize(
    "call",
    [
        lambda c: igpo.igpo_advantages(c(PROBABILITIES), c(OUTCOME), c(MASK), GROUPS),
        lambda c: igpo.turn_rewards(c(PROBABILITIES), c(OUTCOME), c(MASK)),
        lambda c: igpo.information_gain(c(PROBABILITIES), c(MASK), kind="log_prob"),
        lambda c: igpo.IGPOSettings().igpo_advantages(c(PROBABILITIES), c(OUTCOME), c(MASK), group_size=2),
        lambda c: igpo.IGPOSettings().turn_rewards(c(PROBABILITIES), c(OUTCOME), c(MASK)),
    ],
)
def test_probabilities_passed_as_log_probabilities_are_refused(backend, call):
    with pytest.raises(ValueError, match=r"answer_logprob must hold log-probabilities \(<= 0\) at valid positions; "
                                         r"found positive values at \[\[0, 0\].*probabilities passed instead of "
                                         r"log-probabilities"):
        call(lambda array: conv(backend, array))


def test_positive_token_logprobs_are_refused_and_padding_is_not_checked(backend):
    with pytest.raises(ValueError, match=r"token_logprobs must hold log-probabilities \(<= 0\).*\[\[0, 1, 0\]\]"):
        igpo.answer_logprob(conv(backend, [[[-0.5], [0.4]]]), conv(backend, [[[1], [1]]]))
    junk_under_padding = np.where(MASK, LOGPROB, 3.0)  # padded turns may hold anything
    igpo.igpo_advantages(conv(backend, junk_under_padding), conv(backend, OUTCOME), conv(backend, MASK), GROUPS)
    igpo.igpo_advantages(conv(backend, PROBABILITIES), conv(backend, OUTCOME), conv(backend, MASK), GROUPS,
                         validate=False)  # the value checks are off


def test_a_transposed_argument_is_named(backend):
    logprob = np.log(np.full((4, 3), 0.5))  # B = 4 rollouts, T = 3 turns
    mask, outcome = np.ones((4, 3), dtype=bool), np.zeros(4)
    with pytest.raises(ValueError, match=r"answer_logprob must be \[B, T\] = \(4, 3\) like turn_mask \(B = 4 from "
                                         r"outcome\), got \(3, 4\): answer_logprob looks transposed"):
        igpo.igpo_advantages(conv(backend, logprob.T), conv(backend, outcome), conv(backend, mask), group_size=2)
    with pytest.raises(ValueError, match=r"turn_mask must be \[B, T\] = \(4, 3\).*turn_mask looks transposed"):
        igpo.turn_rewards(conv(backend, logprob), conv(backend, outcome), conv(backend, mask.T))
    with pytest.raises(ValueError, match=r"turn_mask must have the shape of answer_logprob \(3, 4\), got \(4, 3\): "
                                         r"one of them is transposed"):
        igpo.information_gain(conv(backend, logprob.T), conv(backend, mask))


def test_igpo_advantages_refuses_rollouts_longer_than_max_turns(backend):
    with pytest.raises(ValueError, match=r"max_turns = 1 \(the most turns a rollout may have\), but rollouts \[0, 1\] "
                                         r"have \[3, 2\] turns"):
        igpo.igpo_advantages(conv(backend, LOGPROB), conv(backend, OUTCOME), conv(backend, MASK), GROUPS, max_turns=1)
    capped = igpo.igpo_advantages(conv(backend, LOGPROB), conv(backend, OUTCOME), conv(backend, MASK), GROUPS, max_turns=3)
    free = igpo.igpo_advantages(conv(backend, LOGPROB), conv(backend, OUTCOME), conv(backend, MASK), GROUPS)
    np.testing.assert_array_equal(to_numpy(capped.advantages), to_numpy(free.advantages))
    wide = np.concatenate([MASK, np.zeros((2, 2), dtype=bool)], axis=1)  # 5 slots, rows of 3 and 2 turns: fine
    igpo.igpo_advantages(conv(backend, np.pad(LOGPROB, ((0, 0), (0, 2)))), conv(backend, OUTCOME), conv(backend, wide),
                         GROUPS, max_turns=3)


@pytest.mark.parametrize(
    "rewards, mask, message",
    [
        ([[0.3, 1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0, 0.0]], [[1, 1, 0, 1, 1], [1, 1, 0, 1, 0]],
         r"nonzero rewards on generated tokens before the last token of their turn at \(row, token\) \[\[0, 0\]\]"),
        ([[0.0, 1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.5, 0.0]], [[1, 1, 0, 1, 1], [0, 0, 0, 0, 0]],
         r"nonzero rewards in rows \[1\] whose response_mask has no generated token"),
    ],
)
def test_token_rewards_that_would_be_dropped_are_refused(backend, rewards, mask, message):
    c = lambda array: conv(backend, array)  # noqa: E731
    with pytest.raises(ValueError, match=message):
        igpo.advantages_from_token_rewards(c(rewards), c(mask), group_size=2)
    with pytest.raises(ValueError, match=message):  # the static-shape formulation checks the same
        igpo.advantages_from_token_rewards(c(rewards), c(mask), group_size=2, max_turns=2)
    igpo.advantages_from_token_rewards(c(rewards), c(mask), group_size=2, validate=False)


@pytest.mark.parametrize(
    "groups",
    [dict(group_size=1), dict(group_ids=["a", "b"]), dict(group_ids=[7, 3]), dict(group_ids="device")],
    ids=["group_size=1", "distinct str ids", "distinct int ids", "distinct device ids"],
)
def test_groups_of_one_rollout_warn(backend, groups):
    if groups.get("group_ids") == "device":
        groups = dict(group_ids=conv(backend, np.array([7, 3])))
    with pytest.warns(igpo.SingleRolloutGroupWarning, match=r"every group of this batch of 2 rollouts holds a single "
                                                            r"rollout"):
        advantages = igpo.grpo_advantages(conv(backend, OUTCOME), **groups)
    np.testing.assert_array_equal(to_numpy(advantages), [0.0, 0.0])  # what the warning is about
    with pytest.warns(igpo.SingleRolloutGroupWarning):
        igpo.igpo_advantages(conv(backend, LOGPROB), conv(backend, OUTCOME), conv(backend, MASK), **groups)


def test_a_batch_with_one_real_group_does_not_warn(backend):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        igpo.grpo_advantages(conv(backend, [1.0, 0.0, 0.5]), [0, 0, 1])  # group 1 alone is fine: group 0 is not
        igpo.grpo_advantages(conv(backend, [1.0, 0.0]), group_size=2)


@pytest.mark.backends("jax")
def test_a_traced_hyperparameter_says_to_close_over_it(backend):
    import jax
    import jax.numpy as jnp

    with pytest.raises(TypeError, match=r"group_size must be an int, got DynamicJaxprTracer.*under jax.jit close over "
                                        r"it .*or mark it static \(jax.jit\(f, static_argnames=\['group_size'\]\)\)"):
        jax.jit(lambda r, g: igpo.grpo_advantages(r, group_size=g))(jnp.ones(4), 2)
    with pytest.raises(TypeError, match=r"gamma must be a real number.*under jax.jit close over it"):
        jax.jit(lambda r, m, g: igpo.discounted_returns(r, m, gamma=g))(jnp.ones((1, 2)), jnp.ones((1, 2)), 0.5)
    works = jax.jit(lambda r: igpo.grpo_advantages(r, group_size=2))(jnp.asarray([1.0, 0.0]))  # closed over
    np.testing.assert_allclose(np.asarray(works), [1.0, -1.0], rtol=1e-5)


def test_an_array_hyperparameter_says_to_pass_a_number():
    with pytest.raises(TypeError, match=r"group_size must be an int, got ndarray.*pass group_size.item\(\)"):
        igpo.grpo_advantages(OUTCOME, group_size=np.array(2))
