"""Group ids are host metadata: every form an RL stack holds them in works on every backend.

Lists, NumPy int arrays and NumPy string/object arrays (verl's ``uid``) are factorized on the
host next to NumPy, torch or JAX values; integer arrays of the values' own library stay on
their device (and may be traced under jit). Every function of ``igpo_rewards.__all__`` that
takes ``group_ids`` is called (found by introspection) and compared with the float64 oracle.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import igpo_rewards as igpo
from igpo_rewards.testing import reference

from .backend_support import library_of, to_backend, to_numpy

ANSWER_LOGPROB = np.log(np.array([[0.05, 0.6, 0.7], [0.3, 0.05, 1.0], [0.2, 0.2, 0.9], [0.1, 0.3, 0.3], [0.5, 0.5, 0.5]]))
TURN_MASK = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=bool)
OUTCOME = np.array([1.0, 0.0, 0.5, 0.0, 1.0])
UIDS = ["7f3a", "b2c1", "7f3a", "b2c1", "0d9e"]  # verl's uid: one uuid string per prompt
INT_IDS = [30, -4, 30, -4, 12]
RESPONSE_MASK = np.array([[1, 1, 0, 1, 0, 1], [1, 0, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 0, 1, 0, 1, 0], [1, 0, 1, 1, 0, 0]])
TOKEN_REWARDS = reference.place_turn_rewards(reference.turn_rewards(ANSWER_LOGPROB, OUTCOME, TURN_MASK), RESPONSE_MASK[:, :5])
TOKEN_REWARDS = np.concatenate([TOKEN_REWARDS, np.zeros((5, 1))], axis=1)


def functions_taking_group_ids():
    names = [name for name in igpo.__all__ if inspect.isfunction(getattr(igpo, name))]
    found = [name for name in names if "group_ids" in inspect.signature(getattr(igpo, name)).parameters]
    assert len(found) >= 5, found
    return found


def call(name, backend, group_ids):
    """``igpo.<name>`` on the fixed batch converted to ``backend``, with ``group_ids`` as given."""
    def conv(array):
        return to_backend(np.asarray(array), backend)

    calls = {
        "igpo_advantages": lambda: igpo.igpo_advantages(conv(ANSWER_LOGPROB), conv(OUTCOME), conv(TURN_MASK),
                                                        group_ids).advantages,
        "group_normalize": lambda: igpo.group_normalize(conv(ANSWER_LOGPROB), conv(TURN_MASK), group_ids),
        "grpo_advantages": lambda: igpo.grpo_advantages(conv(OUTCOME), group_ids),
        "zero_variance_group_fraction": lambda: igpo.zero_variance_group_fraction(conv(OUTCOME), group_ids),
        "advantages_from_token_rewards": lambda: igpo.advantages_from_token_rewards(
            conv(TOKEN_REWARDS), conv(RESPONSE_MASK), group_ids),
    }
    return calls[name]()


def expected(name):
    keys = UIDS
    return {
        "igpo_advantages": lambda: reference.igpo_advantages(ANSWER_LOGPROB, OUTCOME, TURN_MASK, keys).advantages,
        "group_normalize": lambda: reference.group_normalize(ANSWER_LOGPROB, TURN_MASK, keys),
        "grpo_advantages": lambda: reference.grpo_advantages(OUTCOME, keys),
        "zero_variance_group_fraction": lambda: reference.zero_variance_group_fraction(OUTCOME, keys),
        "advantages_from_token_rewards": lambda: reference.advantages_from_token_rewards(
            TOKEN_REWARDS, RESPONSE_MASK, keys),
    }[name]()


HOST_FORMS = {
    "list of str": UIDS,
    "tuple of str": tuple(UIDS),
    "object array of str (verl uid)": np.array(UIDS, dtype=object),
    "unicode array": np.array(UIDS),
    "list of int": INT_IDS,
    "int64 array": np.array(INT_IDS, dtype=np.int64),
    "uint8 array": np.array(INT_IDS, dtype=np.int64) % 200,
    "np.unique inverse": np.unique(np.array(UIDS, dtype=object), return_inverse=True)[1],
}


@pytest.mark.parametrize("name", functions_taking_group_ids())
@pytest.mark.parametrize("form", list(HOST_FORMS))
def test_host_group_ids_work_on_every_backend(backend, name, form):
    got = call(name, backend, HOST_FORMS[form])
    assert library_of(got) == backend
    np.testing.assert_allclose(to_numpy(got), expected(name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", functions_taking_group_ids())
def test_integer_ids_of_the_backend_stay_on_its_device(backend, name):
    got = call(name, backend, to_backend(np.array(INT_IDS), backend))
    np.testing.assert_allclose(to_numpy(got), expected(name), rtol=1e-5, atol=1e-6)


@pytest.mark.backends("torch", "jax")
def test_float_device_ids_say_what_to_pass_instead(backend):
    ids = to_backend(np.array(INT_IDS, dtype=np.float32), backend, float_dtype="float32")
    with pytest.raises(TypeError, match=r"group_ids given as a \w+ array must hold integers.*list or a NumPy array"):
        call("grpo_advantages", backend, ids)


@pytest.mark.parametrize("form", ["list", "numpy float64", "numpy float32", "backend array"])
def test_float_ids_are_refused_in_every_form(backend, form):
    """Float ids were refused as tensors but accepted as lists and NumPy arrays: now refused everywhere."""
    floats = [float(uid) for uid in INT_IDS]  # integral values: still not ids
    ids = {
        "list": floats,
        "numpy float64": np.array(floats),
        "numpy float32": np.array(floats, dtype=np.float32),
        "backend array": to_backend(np.array(floats, dtype=np.float32), backend, float_dtype="float32"),
    }[form]
    for name in functions_taking_group_ids():
        with pytest.raises(TypeError, match=r"group_ids (must be integer or string ids|given as a \w+ array must hold "
                                            r"integers).*(float32|float64)"):
            call(name, backend, ids)


def test_ids_of_another_array_library_are_refused_naming_them(backend):
    other = {"numpy": "torch", "torch": "jax", "jax": "torch"}[backend]
    ids = to_backend(np.array(INT_IDS), other)
    with pytest.raises(TypeError, match=r"same library.*'group_ids' is " + other):
        call("grpo_advantages", backend, ids)


@pytest.mark.parametrize(
    "group_ids, error, message",
    [
        ([1, "a", 1, "a", 2], TypeError, r"group_ids must be ids that sort together"),
        ([0.0, np.nan, 0.0, 1.0, 1.0], TypeError, r"group_ids must be integer or string ids.*got dtype float64"),
        ([0, 0, 1], ValueError, r"group_ids must have shape \[B\] with B = 5 .*got shape \(3,\)"),
        (np.zeros((5, 1), dtype=int), ValueError, r"group_ids must have shape \[B\]"),
        ({"q": 1}, TypeError, r"group_ids: igpo_rewards takes NumPy arrays"),
    ],
)
def test_bad_group_ids(backend, group_ids, error, message):
    with pytest.raises(error, match=message):
        call("grpo_advantages", backend, group_ids)


@pytest.mark.backends("jax")
def test_host_ids_under_jax_jit_are_constants_and_traced_int_ids_work(backend):
    import jax

    logprob, outcome, mask = (to_backend(a, "jax") for a in (ANSWER_LOGPROB, OUTCOME, TURN_MASK))
    want = reference.igpo_advantages(ANSWER_LOGPROB, OUTCOME, TURN_MASK, UIDS).advantages
    uids = np.array(UIDS, dtype=object)
    with_host_ids = jax.jit(lambda m, r, t: igpo.igpo_advantages(m, r, t, uids).advantages)
    np.testing.assert_allclose(np.asarray(with_host_ids(logprob, outcome, mask)), want, rtol=1e-5, atol=1e-6)
    traced = jax.jit(lambda m, r, t, g: igpo.igpo_advantages(m, r, t, g).advantages)
    np.testing.assert_allclose(np.asarray(traced(logprob, outcome, mask, to_backend(np.array(INT_IDS), "jax"))),
                               want, rtol=1e-5, atol=1e-6)


@pytest.mark.backends("torch")
def test_host_ids_next_to_meta_tensors_need_no_values(backend):
    """Factorizing host ids reads only the host: the device computation stays sync-free."""
    import torch

    meta = torch.device("meta")
    result = igpo.igpo_advantages(torch.empty(5, 3, device=meta), torch.empty(5, device=meta),
                                  torch.ones(5, 3, dtype=torch.bool, device=meta), np.array(UIDS, dtype=object),
                                  validate=False)
    assert result.advantages.device == meta and result.advantages.shape == (5, 3)
