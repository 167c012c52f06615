"""The calls docs/backends.md recommends for training loops compile, and give the eager numbers.

- torch: ``torch.compile(fullgraph=True)`` of ``advantages_from_token_rewards(..., group_size=G,
  max_turns=T, validate=False)`` and ``igpo_advantages(..., group_size=G, validate=False)``.
  ``fullgraph=True`` fails on any graph break. On the CPU the graph is compiled with the
  ``aot_eager`` backend (AOT autograd tracing and decompositions, no code generation): inductor's
  C++ build of each graph takes a minute or more on the 2-core CI machines. In the device mode
  (``IGPO_TEST_DEVICE=cuda``) the default inductor backend compiles for the GPU.
  ``IGPO_TEST_COMPILE_BACKEND=inductor`` forces inductor anywhere;
  ``tests/benchmarks/gpu_compile_jit.py`` always uses it.
- JAX: ``jax.jit`` of the library functions themselves, with the hyperparameters as static
  arguments (``static_argnames``), and of a closure over them (eager JAX against the oracle is in
  tests/test_core_agreement.py).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import igpo_rewards as igpo
from igpo_rewards.testing import reference

from .backend_support import test_device, to_backend, to_numpy

# B = 6 rollouts, G = 3 contiguous rollouts per question, T = 3 turn slots, S = 8 response tokens.
RESPONSE_MASK = np.array([
    [1, 1, 0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 1, 0, 0, 0],
    [1, 0, 1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [1, 0, 0, 1, 1, 0, 0, 0],
], dtype=bool)
TURN_MASK = reference.turn_index_from_response_mask(RESPONSE_MASK).max(axis=1)[:, None] >= np.arange(3)[None, :]
ANSWER_LOGPROB = np.where(TURN_MASK, np.log([[0.1, 0.5, 0.9], [0.2, 1, 1], [0.3, 0.3, 1], [0.05, 0.4, 0.8],
                                            [0.6, 0.7, 0.9], [0.2, 0.1, 1]]), 0.0)
OUTCOME = np.array([1.0, 0.0, 0.5, 1.0, -2.0, 0.0])
TOKEN_LEVEL_REWARDS = reference.place_turn_rewards(reference.turn_rewards(ANSWER_LOGPROB, OUTCOME, TURN_MASK),
                                                   RESPONSE_MASK, turn_mask=TURN_MASK)
OPTIONS = [dict(), dict(gamma=0.9, mode="separate", weighting="trajectory")]
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def compile_backend() -> str:
    return os.environ.get("IGPO_TEST_COMPILE_BACKEND") or ("inductor" if test_device() == "cuda" else "aot_eager")


@pytest.mark.backends("torch")
@pytest.mark.parametrize("options", OPTIONS)
def test_torch_compile_fullgraph_of_the_token_path_equals_eager_and_the_oracle(backend, options):
    import torch

    rewards, mask = (to_backend(a, "torch", float_dtype="float32") for a in (TOKEN_LEVEL_REWARDS, RESPONSE_MASK))

    def advantages(token_level_rewards, response_mask):
        return igpo.advantages_from_token_rewards(token_level_rewards, response_mask, group_size=3, max_turns=3,
                                                  validate=False, **options)

    torch._dynamo.reset()
    compiled = torch.compile(advantages, fullgraph=True, backend=compile_backend())(rewards, mask)
    eager = advantages(rewards, mask)
    assert compiled.device == eager.device and compiled.dtype == eager.dtype == torch.float32
    np.testing.assert_allclose(to_numpy(compiled), to_numpy(eager), **TOLERANCE)
    want = reference.advantages_from_token_rewards(TOKEN_LEVEL_REWARDS, RESPONSE_MASK, group_size=3, **options)
    np.testing.assert_allclose(to_numpy(compiled), want, **TOLERANCE)


@pytest.mark.backends("torch")
@pytest.mark.parametrize("options", OPTIONS)
def test_torch_compile_fullgraph_of_the_turn_path_equals_eager_and_the_oracle(backend, options):
    import torch

    logprob, outcome = (to_backend(a, "torch", float_dtype="float32") for a in (ANSWER_LOGPROB, OUTCOME))
    turn_mask = to_backend(TURN_MASK, "torch")

    def advantages(answer_logprob, outcome, turn_mask):
        return igpo.igpo_advantages(answer_logprob, outcome, turn_mask, group_size=3, validate=False,
                                    **options).advantages

    torch._dynamo.reset()
    compiled = torch.compile(advantages, fullgraph=True, backend=compile_backend())(logprob, outcome, turn_mask)
    np.testing.assert_allclose(to_numpy(compiled), to_numpy(advantages(logprob, outcome, turn_mask)), **TOLERANCE)
    want = reference.igpo_advantages(ANSWER_LOGPROB, OUTCOME, TURN_MASK, group_size=3, **options).advantages
    np.testing.assert_allclose(to_numpy(compiled), want, **TOLERANCE)


TOKEN_STATIC = ("group_size", "max_turns", "gamma", "mode", "weighting", "scale", "eps", "ddof", "validate")
TURN_STATIC = ("group_size", "gamma", "kind", "mode", "weighting", "scale", "eps", "ddof", "ig_weight",
               "outcome_weight", "log_prob_floor", "validate")


@pytest.mark.backends("jax")
@pytest.mark.parametrize("options", OPTIONS)
def test_jax_jit_with_static_hyperparameters_equals_the_oracle(backend, options):
    import jax

    rewards, mask = (to_backend(a, "jax") for a in (TOKEN_LEVEL_REWARDS, RESPONSE_MASK))
    logprob, outcome, turn_mask = (to_backend(a, "jax") for a in (ANSWER_LOGPROB, OUTCOME, TURN_MASK))

    tokens = jax.jit(igpo.advantages_from_token_rewards, static_argnames=TOKEN_STATIC)
    turns = jax.jit(igpo.igpo_advantages, static_argnames=TURN_STATIC)
    closed = jax.jit(lambda r, m: igpo.advantages_from_token_rewards(r, m, group_size=3, max_turns=3, **options))

    want_tokens = reference.advantages_from_token_rewards(TOKEN_LEVEL_REWARDS, RESPONSE_MASK, group_size=3, **options)
    for jitted in (tokens(rewards, mask, group_size=3, max_turns=3, **options), closed(rewards, mask)):
        np.testing.assert_allclose(to_numpy(jitted), want_tokens, **TOLERANCE)
    want_turns = reference.igpo_advantages(ANSWER_LOGPROB, OUTCOME, TURN_MASK, group_size=3, **options).advantages
    np.testing.assert_allclose(to_numpy(turns(logprob, outcome, turn_mask, group_size=3, **options).advantages),
                               want_turns, **TOLERANCE)
