"""``group_size=G``: G contiguous rollouts per group (verl's and TRL's layout), the einops path.

On Hypothesis batches in that layout, on every backend: the dense path equals the
``group_ids`` path and the float64 oracle for every function that takes groups and every
normalization mode; under ``jax.jit`` and ``torch.compile`` (fullgraph) it equals eager; on
torch's meta device it runs on shapes alone; permuting rows inside a group permutes the
output; bad ``group_size`` arguments are refused. On JAX the drawn batches run jitted (one
compilation per batch); eager JAX is compared with jit on a fixed batch.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from hypothesis import strategies as st

import igpo_rewards as igpo
from igpo_rewards.testing import reference, token_batches, turn_batches

from .backend_support import given_on_each_backend, run, run_jitted, to_backend

# Hypothesis draws batches whose groups are all single rollouts on purpose (an edge case of the
# equations); the warning that says so to users is tested in test_core_validation.py.
pytestmark = pytest.mark.filterwarnings("ignore::igpo_rewards.SingleRolloutGroupWarning")

TOLERANCE = dict(rtol=1e-9, atol=1e-9)

normalization = st.fixed_dictionaries(
    {
        "mode": st.sampled_from(["joint", "separate", "turn_index"]),
        "weighting": st.sampled_from(["turn", "trajectory"]),
        "scale": st.sampled_from(["std", "none"]),
        "ddof": st.sampled_from([0, 1]),
        "eps": st.sampled_from([1e-6, 0.0]),
    }
)
contiguous_turn_batches = turn_batches(contiguous_groups=True)


def group_size_of(group_ids: np.ndarray) -> int:
    return len(group_ids) // len(np.unique(group_ids))


def test_every_function_with_group_ids_takes_group_size():
    takes_ids = [name for name in igpo.__all__ if inspect.isfunction(getattr(igpo, name))
                 and "group_ids" in inspect.signature(getattr(igpo, name)).parameters]
    assert sorted(takes_ids) == sorted(["group_normalize", "igpo_advantages", "grpo_advantages",
                                        "advantages_from_token_rewards", "zero_variance_group_fraction"])
    for name in takes_ids:
        parameters = inspect.signature(getattr(igpo, name)).parameters
        assert parameters["group_ids"].default is None
        assert parameters["group_size"].kind is inspect.Parameter.KEYWORD_ONLY


@given_on_each_backend(batch=contiguous_turn_batches, options=normalization, gamma=st.sampled_from([1.0, 0.5]))
def test_dense_path_equals_group_ids_path_and_the_oracle(backend, batch, options, gamma):
    size = group_size_of(batch.group_ids)
    scale_options = {key: options[key] for key in ("scale", "ddof", "eps")}

    def both_paths(logprob, outcome, turn_mask, group_ids):
        dense = igpo.igpo_advantages(logprob, outcome, turn_mask, group_size=size, gamma=gamma, **options)
        by_ids = igpo.igpo_advantages(logprob, outcome, turn_mask, group_ids, gamma=gamma, **options)
        grpo = igpo.grpo_advantages(outcome, group_size=size, **scale_options)
        return dense, by_ids, grpo

    dense, by_ids, grpo = run_jitted(both_paths, backend, *batch)
    want = reference.igpo_advantages(*batch, gamma=gamma, **options)
    oracle_dense = reference.igpo_advantages(*batch[:3], group_size=size, gamma=gamma, **options).advantages
    np.testing.assert_array_equal(oracle_dense, want.advantages)  # the oracle's own group_size reading
    for field in want._fields:
        np.testing.assert_allclose(getattr(dense, field), getattr(want, field), err_msg=field, **TOLERANCE)
        np.testing.assert_allclose(getattr(dense, field), getattr(by_ids, field), err_msg=field, **TOLERANCE)
    np.testing.assert_allclose(grpo, reference.grpo_advantages(batch.outcome, batch.group_ids, **scale_options),
                               **TOLERANCE)
    rate = run(lambda v: igpo.zero_variance_group_fraction(v, group_size=size), backend, batch.outcome)
    assert float(rate) == reference.zero_variance_group_fraction(batch.outcome, batch.group_ids)


@given_on_each_backend(batch=token_batches(contiguous_groups=True, final_reward_after_last_run=True),
                       options=normalization)
def test_dense_token_path_equals_the_oracle(backend, batch, options):
    size = group_size_of(batch.group_ids)
    max_turns = batch.turn_mask.shape[1]
    got = run_jitted(lambda r, m: igpo.advantages_from_token_rewards(r, m, group_size=size, max_turns=max_turns,
                                                                     **options),
                     backend, batch.token_level_rewards, batch.response_mask)
    want = reference.advantages_from_token_rewards(batch.token_level_rewards, batch.response_mask,
                                                   batch.group_ids, **options)
    np.testing.assert_allclose(got, want, **TOLERANCE)


@given_on_each_backend(batch=contiguous_turn_batches, options=normalization, data=st.data())
def test_permuting_rows_inside_a_group_permutes_the_output(backend, batch, options, data):
    size = group_size_of(batch.group_ids)
    groups = len(batch.group_ids) // size
    permutation = np.concatenate(
        [group * size + np.array(data.draw(st.permutations(range(size)))) for group in range(groups)])
    arrays = (batch.answer_logprob, batch.outcome, batch.turn_mask)

    def original_and_permuted(logprob, outcome, turn_mask, order):
        def call(*a):
            return igpo.igpo_advantages(*a, group_size=size, **options).advantages

        return call(logprob, outcome, turn_mask), call(logprob[order], outcome[order], turn_mask[order])

    original, permuted = run_jitted(original_and_permuted, backend, *arrays, permutation)
    np.testing.assert_allclose(permuted, original[permutation], **TOLERANCE)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        (dict(), TypeError, r"pass exactly one of group_ids .* and group_size .*; got neither"),
        (dict(group_ids=[0, 0, 1, 1, 2, 2], group_size=2), TypeError, r"exactly one of .*; got both"),
        (dict(group_size=4), ValueError, r"group_size = 4 must divide the number of rollouts B = 6"),
        (dict(group_size=0), ValueError, r"group_size must be >= 1, got 0"),
        (dict(group_size=-2), ValueError, r"group_size must be >= 1, got -2"),
        (dict(group_size=2.0), TypeError, r"group_size must be an int, got float 2.0"),
        (dict(group_size=True), TypeError, r"group_size must be an int, got bool True"),
    ],
)
def test_bad_group_size_is_refused(backend, arguments, error, message):
    outcome = to_backend(np.array([1.0, 0.0, 0.5, 0.5, 0.0, 1.0]), backend)
    mask = to_backend(np.ones((6, 2), dtype=bool), backend)
    calls = [
        lambda: igpo.grpo_advantages(outcome, **arguments),
        lambda: igpo.zero_variance_group_fraction(outcome, **arguments),
        lambda: igpo.group_normalize(mask * 1.0, mask, **arguments),
        lambda: igpo.igpo_advantages(mask * -1.0, outcome, mask, **arguments),
        lambda: igpo.advantages_from_token_rewards(mask * 1.0, mask, **arguments),
    ]
    for call in calls:
        with pytest.raises(error, match=message):
            call()


def test_numpy_integer_group_size_and_an_empty_batch(backend):
    outcome = to_backend(np.array([1.0, 0.0, 0.0, 0.0]), backend)
    np.testing.assert_allclose(run(lambda o: igpo.grpo_advantages(o, group_size=np.int64(2)), backend, outcome),
                               [1.0, -1.0, 0.0, 0.0], rtol=1e-5)
    empty = to_backend(np.zeros(0), backend)
    assert run(lambda o: igpo.grpo_advantages(o, group_size=3), backend, empty).shape == (0,)
    assert float(run(lambda o: igpo.zero_variance_group_fraction(o, group_size=3), backend, empty)) == 0.0


@pytest.mark.backends("jax")
def test_eager_jax_equals_jit_on_the_dense_path(backend):
    import jax

    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=bool)
    logprob = np.log(np.array([[0.1, 0.6, 1.0], [0.3, 1.0, 1.0], [0.2, 0.2, 0.9], [0.5, 0.4, 1.0], [1, 1, 1],
                               [0.7, 1.0, 1.0]]))
    outcome = np.array([1.0, 0.0, 0.5, 0.0, 0.0, 1.0])
    arrays = [to_backend(a, "jax") for a in (logprob, outcome, mask)]
    for options in (dict(), dict(mode="separate", weighting="trajectory", gamma=0.9), dict(scale="none", ddof=1)):
        def call(*a):
            return igpo.igpo_advantages(*a, group_size=3, **options).advantages

        eager = np.asarray(call(*arrays))
        np.testing.assert_allclose(np.asarray(jax.jit(call)(*arrays)), eager, rtol=1e-5, atol=1e-6)
        want = reference.igpo_advantages(logprob, outcome, mask, group_size=3, **options).advantages
        np.testing.assert_allclose(eager, want, rtol=1e-5, atol=1e-6)


@pytest.mark.backends("jax")
def test_dense_token_path_under_jax_jit_and_vmap(backend):
    import jax
    import jax.numpy as jnp

    mask = np.array([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 0, 1, 0]])
    rewards = reference.place_turn_rewards(np.array([[0.5, 1.0], [0.0, 0.0], [0.25, 0.0], [-0.5, 1.0]]), mask)
    want = reference.advantages_from_token_rewards(rewards, mask, group_size=2)

    def call(r, m):
        return igpo.advantages_from_token_rewards(r, m, group_size=2, max_turns=2)

    jitted = jax.jit(call)(jnp.asarray(rewards, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(jitted), want, rtol=1e-5, atol=1e-6)
    stacked = jax.vmap(call)(jnp.stack([jnp.asarray(rewards, jnp.float32)] * 2), jnp.stack([jnp.asarray(mask)] * 2))
    np.testing.assert_allclose(np.asarray(stacked[1]), want, rtol=1e-5, atol=1e-6)


@pytest.mark.backends("torch")
def test_dense_path_under_torch_compile_has_no_graph_break(backend):
    """``fullgraph=True`` fails on any graph break or host sync. The "eager" compile backend runs
    the captured graph without code generation: inductor's C++ build of the same graph took about
    three minutes on this 2-core CI machine (checked by hand, same result), too long for the suite."""
    import torch

    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=bool)
    logprob = np.log(np.array([[0.1, 0.6, 1.0], [0.3, 1.0, 1.0], [0.2, 0.2, 0.9], [0.5, 0.4, 1.0]]))
    outcome = np.array([1.0, 0.0, 0.5, 0.0])
    want = reference.igpo_advantages(logprob, outcome, mask, group_size=2, mode="separate").advantages

    @torch.compile(backend="eager", fullgraph=True)
    def compiled(m, o, t):
        return igpo.igpo_advantages(m, o, t, group_size=2, mode="separate", validate=False).advantages

    np.testing.assert_allclose(compiled(torch.tensor(logprob), torch.tensor(outcome), torch.tensor(mask)).numpy(),
                               want, **TOLERANCE)


@pytest.mark.backends("torch")
def test_dense_path_on_the_meta_device_needs_no_values(backend):
    import torch

    meta = torch.device("meta")
    result = igpo.igpo_advantages(torch.empty(8, 3, device=meta), torch.empty(8, device=meta),
                                  torch.ones(8, 3, dtype=torch.bool, device=meta), group_size=4, validate=False)
    assert result.advantages.device == meta and result.advantages.shape == (8, 3)
    tokens = igpo.advantages_from_token_rewards(torch.empty(8, 6, device=meta),
                                                torch.ones(8, 6, dtype=torch.bool, device=meta),
                                                group_size=4, max_turns=3, validate=False)
    assert tokens.device == meta and tokens.shape == (8, 6)
    rate = igpo.zero_variance_group_fraction(torch.empty(8, device=meta), group_size=4, validate=False)
    assert rate.device == meta and rate.shape == ()
