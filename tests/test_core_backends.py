"""Backend behaviour: dtype and library preserved, promotion, mixing, jit/vmap, import isolation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings

import igpo_rewards as igpo
from igpo_rewards.testing import reference, token_batches, turn_batches

from .backend_support import library_of, precision, run, to_backend, to_numpy

# Hypothesis draws batches whose groups are all single rollouts on purpose; the warning that says
# so to users is tested in test_core_validation.py.
pytestmark = pytest.mark.filterwarnings("ignore::igpo_rewards.SingleRolloutGroupWarning")

# A small fixed batch: 2 groups, padding turns, a one-turn rollout, a -inf probe.
ANSWER_LOGPROB = np.log(np.array([[0.05, 0.6, 0.7], [0.05, 0.05, 1.0], [0.2, 0.2, 0.9], [0.0, 0.3, 0.3]]))
TURN_MASK = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=bool)
OUTCOME = np.array([1.0, 0.0, 1.0, 0.0])
GROUP_IDS = np.array([10, 10, -3, -3])
RESPONSE_MASK = np.array([[1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
TOKEN_REWARDS = np.array([[0, 0.5, 0, 1.0, 0, 0], [0.1, 0, 0, 0, 0.0, 0], [0, 0, 1.0, 0, 0, 0], [0] * 6])


def float_outputs(backend, float_dtype):
    """Every public function with a floating output, called on ``float_dtype`` inputs."""
    def conv(array):
        return to_backend(np.asarray(array), backend, float_dtype=float_dtype)

    token_logprobs = np.repeat(ANSWER_LOGPROB[..., None], 2, axis=-1)
    result = igpo.igpo_advantages(conv(ANSWER_LOGPROB), conv(OUTCOME), conv(TURN_MASK), conv(GROUP_IDS))
    return {
        "answer_logprob": igpo.answer_logprob(conv(token_logprobs), conv(np.ones_like(token_logprobs, dtype=bool))),
        "information_gain": igpo.information_gain(conv(ANSWER_LOGPROB), conv(TURN_MASK)),
        "turn_rewards": igpo.turn_rewards(conv(ANSWER_LOGPROB), conv(OUTCOME), conv(TURN_MASK)),
        "group_normalize": igpo.group_normalize(conv(ANSWER_LOGPROB.clip(-5)), conv(TURN_MASK), conv(GROUP_IDS)),
        "discounted_returns": igpo.discounted_returns(conv(OUTCOME[:, None] * TURN_MASK), conv(TURN_MASK), gamma=0.9),
        "igpo_advantages.advantages": result.advantages,
        "igpo_advantages.information_gain": result.information_gain,
        "grpo_advantages": igpo.grpo_advantages(conv(OUTCOME), conv(GROUP_IDS)),
        "zero_variance_group_fraction": igpo.zero_variance_group_fraction(conv(OUTCOME), conv(GROUP_IDS)),
        "broadcast_to_tokens": igpo.broadcast_to_tokens(
            result.advantages, igpo.turn_index_from_response_mask(conv(RESPONSE_MASK))),
        "place_turn_rewards": igpo.place_turn_rewards(conv(np.array([[1.0, 2.0]] * 4)), conv(RESPONSE_MASK[:, :3] * 0 + [1, 0, 1])),
        "advantages_from_token_rewards": igpo.advantages_from_token_rewards(
            conv(TOKEN_REWARDS), conv(RESPONSE_MASK), conv(GROUP_IDS)),
    }


@pytest.mark.parametrize("float_dtype", ["float32", "float64"])
def test_outputs_keep_library_and_float_dtype(backend, float_dtype):
    with precision(backend, float_dtype):
        for name, output in float_outputs(backend, float_dtype).items():
            assert library_of(output) == backend, name
            assert str(output.dtype).endswith(float_dtype), f"{name}: {output.dtype}"


@pytest.mark.backends("torch")
def test_torch_bfloat16_and_float16_are_kept(backend):
    for float_dtype in ("bfloat16", "float16"):
        for name, output in float_outputs("torch", float_dtype).items():
            assert str(output.dtype) == f"torch.{float_dtype}", name


def test_int_and_bool_rewards_promote_to_the_default_float(backend):
    expected = {"numpy": "float64", "torch": "float32", "jax": "float32"}[backend]
    rewards = to_backend(np.array([[1, 0], [0, 0]]), backend)
    mask = to_backend(np.array([[1, 1], [1, 0]]), backend)
    out = igpo.group_normalize(rewards, mask, to_backend(np.array([0, 0]), backend))
    assert str(out.dtype).endswith(expected)
    outcome = to_backend(np.array([True, False]), backend)
    assert str(igpo.grpo_advantages(outcome, to_backend(np.array([4, 4]), backend)).dtype).endswith(expected)
    np.testing.assert_allclose(to_numpy(out), reference.group_normalize([[1, 0], [0, 0]], [[1, 1], [1, 0]], [0, 0]),
                               rtol=1e-6)


def test_lists_go_the_numpy_way_and_take_the_other_arguments_library(backend):
    out = igpo.grpo_advantages([1.0, 0.0, 0.5], [0, 0, 0])
    assert isinstance(out, np.ndarray)
    outcome = to_backend(np.array([1.0, 0.0]), backend)
    assert library_of(igpo.grpo_advantages(outcome, [3, 3])) == backend


def test_mixing_libraries_is_a_type_error(backend):
    for other in {"numpy", "torch", "jax"} - {backend}:
        with pytest.raises(TypeError, match="same library"):
            igpo.igpo_advantages(
                to_backend(ANSWER_LOGPROB, backend), to_backend(OUTCOME, other), TURN_MASK.tolist(), GROUP_IDS.tolist())


@pytest.mark.backends("torch")
def test_torch_keeps_the_device_and_never_syncs_without_validation(backend):
    import torch

    device = torch.device("meta")  # shapes only: any host read would raise
    batch = [torch.empty(4, 3, device=device), torch.empty(4, device=device),
             torch.ones(4, 3, dtype=torch.bool, device=device), torch.zeros(4, dtype=torch.int64, device=device)]
    result = igpo.igpo_advantages(*batch, validate=False)
    assert result.advantages.device == device
    tokens = igpo.advantages_from_token_rewards(
        torch.empty(4, 6, device=device), torch.ones(4, 6, dtype=torch.int64, device=device),
        batch[3], max_turns=3, validate=False)
    assert tokens.device == device and tokens.shape == (4, 6)


# Every drawn shape compiles anew (~1 s each): fewer examples keep the suite fast.
@pytest.mark.backends("jax")
@settings(max_examples=20)
@given(batch=turn_batches())
def test_jax_jit_equals_eager(backend, batch):
    import jax

    arrays = to_backend(batch, "jax")
    eager = igpo.igpo_advantages(*arrays, gamma=0.9, mode="separate")
    jitted = jax.jit(lambda *a: igpo.igpo_advantages(*a, gamma=0.9, mode="separate"))(*arrays)
    for field in eager._fields:
        np.testing.assert_allclose(np.asarray(getattr(jitted, field)), np.asarray(getattr(eager, field)),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.backends("jax")
@settings(max_examples=20)
@given(batch=token_batches())
def test_jax_jit_token_path_equals_eager(backend, batch):
    import jax

    arrays = to_backend(batch, "jax")
    num_turns = batch.turn_mask.shape[1]
    eager = igpo.advantages_from_token_rewards(arrays.token_level_rewards, arrays.response_mask, arrays.group_ids)
    jitted = jax.jit(lambda r, m, g: igpo.advantages_from_token_rewards(r, m, g, max_turns=num_turns))(
        arrays.token_level_rewards, arrays.response_mask, arrays.group_ids)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)


@pytest.mark.backends("jax")
def test_jax_vmap_over_stacked_batches(backend):
    import jax
    import jax.numpy as jnp

    logprobs = jnp.stack([jnp.asarray(ANSWER_LOGPROB, jnp.float32), jnp.asarray(ANSWER_LOGPROB[::-1], jnp.float32)])
    outcome = jnp.stack([jnp.asarray(OUTCOME, jnp.float32), jnp.asarray(OUTCOME[::-1], jnp.float32)])
    mask = jnp.stack([jnp.asarray(TURN_MASK), jnp.asarray(TURN_MASK[::-1])])
    groups = jnp.stack([jnp.asarray(GROUP_IDS), jnp.asarray(GROUP_IDS)])
    mapped = jax.vmap(lambda *a: igpo.igpo_advantages(*a).advantages)(logprobs, outcome, mask, groups)
    for i in range(2):
        want = reference.igpo_advantages(
            np.asarray(logprobs[i]), np.asarray(outcome[i]), np.asarray(mask[i]), np.asarray(groups[i])).advantages
        np.testing.assert_allclose(np.asarray(mapped[i]), want, rtol=1e-5, atol=1e-5)


@pytest.mark.backends("jax")
def test_jit_without_max_turns_is_refused(backend):
    import jax

    with pytest.raises(ValueError, match="max_turns"):
        jax.jit(igpo.advantages_from_token_rewards)(
            to_backend(TOKEN_REWARDS, "jax"), to_backend(RESPONSE_MASK, "jax"), to_backend(GROUP_IDS, "jax"))


def test_importing_igpo_rewards_imports_neither_torch_nor_jax():
    code = (
        "import sys, igpo_rewards, igpo_rewards.testing; import numpy as np\n"
        "igpo_rewards.igpo_advantages(np.zeros((2, 2)), [1.0, 0.0], [[1, 1], [1, 0]], [0, 0])\n"
        "igpo_rewards.igpo_advantages(np.zeros((2, 2)), [1.0, 0.0], [[1, 1], [1, 0]], group_size=2)  # einops\n"
        "assert 'einops' in sys.modules\n"
        "bad = [m for m in ('torch', 'jax', 'jaxlib', 'hypothesis') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.backends("torch")
def test_torch_autograd_flows_through_the_advantages(backend):
    """Advantages are usually detached, but nothing in the math breaks a gradient."""
    import torch

    logprobs = torch.tensor(np.where(np.isinf(ANSWER_LOGPROB), -30.0, ANSWER_LOGPROB), requires_grad=True)
    result = igpo.igpo_advantages(logprobs, torch.tensor(OUTCOME), torch.tensor(TURN_MASK), torch.tensor(GROUP_IDS))
    result.advantages.sum().backward()
    assert torch.isfinite(logprobs.grad).all()
