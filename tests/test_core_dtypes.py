"""A dtype x backend sweep over every array function of ``igpo_rewards.__all__``.

The functions are found by introspection (every public function outside the pure-Python
``scoring`` module) and called with sample arrays chosen by parameter name, so a new public
function is swept automatically, or fails here until it has a sample. For each floating dtype
of each backend: the result keeps the library and the dtype, is finite, emits no warning
(warnings are errors here: NumPy float16 once warned about an underflowing 1e-30), and equals
the float64 oracle of ``igpo_rewards.testing.reference`` to the dtype's precision.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest

import igpo_rewards as igpo
from igpo_rewards.testing import reference

from .backend_support import library_of, precision, to_backend, to_numpy

TURN_MASK = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=bool)
ANSWER_LOGPROB = np.log(np.array([[0.05, 0.6, 0.7], [0.3, 0.05, 1.0], [0.2, 0.2, 0.9], [0.1, 0.3, 0.3], [0.5, 0.5, 0.5]]))
OUTCOME = np.array([1.0, 0.0, 0.5, -2.0, 0.0])
GROUP_IDS = np.array([3, 9, 3, 9, 9])
# Each valid turn: 2 generated tokens, then a 1-token observation.
RESPONSE_MASK = np.zeros((5, 9), dtype=np.int64)
for _row, _turns in enumerate(TURN_MASK.sum(axis=1)):
    for _turn in range(_turns):
        RESPONSE_MASK[_row, 3 * _turn: 3 * _turn + 2] = 1
TURN_REWARDS = reference.turn_rewards(ANSWER_LOGPROB, OUTCOME, TURN_MASK)
TOKEN_LOGPROBS = np.stack([ANSWER_LOGPROB, ANSWER_LOGPROB - 0.5], axis=-1)

SAMPLES = {
    "answer_logprob": ANSWER_LOGPROB,
    "token_logprobs": TOKEN_LOGPROBS,
    "token_mask": np.broadcast_to(TURN_MASK[..., None], TOKEN_LOGPROBS.shape).copy(),
    "outcome": OUTCOME,
    "values": OUTCOME,
    "turn_mask": TURN_MASK,
    "group_ids": GROUP_IDS,
    "rewards": TURN_REWARDS,
    "turn_values": TURN_REWARDS,
    "turn_rewards": TURN_REWARDS,
    "response_mask": RESPONSE_MASK,
    "token_turn_index": reference.turn_index_from_response_mask(RESPONSE_MASK),
    "token_level_rewards": reference.place_turn_rewards(TURN_REWARDS, RESPONSE_MASK),
    "ragged_turn_values": ANSWER_LOGPROB,  # a [B, T] array: B full rows
}

TOLERANCE = {"float16": 3e-2, "bfloat16": 6e-2, "float32": 1e-5, "float64": 1e-9}


def array_functions() -> list[str]:
    """The public functions that take arrays: all of ``__all__`` but the classes and scoring."""
    names = [
        name for name in igpo.__all__
        if inspect.isfunction(getattr(igpo, name)) and getattr(igpo, name).__module__ != "igpo_rewards.scoring"
    ]
    assert len(names) >= 12, names
    return names


def required_arguments(name: str) -> list[str]:
    """The positional parameters: the required ones, and optional ones with a sample (group_ids,
    which defaults to None because group_size may be given instead)."""
    parameters = inspect.signature(getattr(igpo, name)).parameters.values()
    return [p.name for p in parameters
            if p.kind is p.POSITIONAL_OR_KEYWORD and (p.default is p.empty or p.name in SAMPLES)]


def test_every_array_function_has_samples_and_an_oracle():
    for name in array_functions():
        missing = [argument for argument in required_arguments(name) if argument not in SAMPLES]
        assert not missing, f"{name}: add a sample array for {missing} to SAMPLES"
        assert name in reference.__all__, f"{name} has no float64 oracle in igpo_rewards.testing.reference"


def float_dtypes(backend: str) -> list[str]:
    return ["float16", "float32", "float64"] + (["bfloat16"] if backend == "torch" else [])


def outputs(result):
    return list(result) if isinstance(result, tuple) else [result]


@pytest.mark.parametrize("name", array_functions())
def test_dtype_sweep(backend, name):
    arguments = [SAMPLES[argument] for argument in required_arguments(name)]
    want = outputs(getattr(reference, name)(*arguments))
    for float_dtype in float_dtypes(backend):
        with precision(backend, float_dtype), warnings.catch_warnings():
            warnings.simplefilter("error")
            converted = [to_backend(np.asarray(a), backend, float_dtype=float_dtype) for a in arguments]
            got = outputs(getattr(igpo, name)(*converted))
        for index, (value, expected) in enumerate(zip(got, want)):
            where = f"{name} output {index} on {backend} {float_dtype}"
            assert library_of(value) == backend, where
            result = to_numpy(value.float() if str(value.dtype) == "torch.bfloat16" else value)
            if np.issubdtype(np.asarray(expected).dtype, np.integer) or np.asarray(expected).dtype == bool:
                kind = "b" if np.asarray(expected).dtype == bool else "iu"
                assert result.dtype.kind in kind, f"{where}: {result.dtype}"
                np.testing.assert_array_equal(result, expected, err_msg=where)
                continue
            assert str(value.dtype).endswith(float_dtype), f"{where}: {value.dtype}"
            assert np.all(np.isfinite(result)), where
            tolerance = TOLERANCE[float_dtype]
            np.testing.assert_allclose(result.astype(np.float64), expected, rtol=tolerance, atol=tolerance, err_msg=where)
