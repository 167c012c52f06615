"""The normalization variants and the bias that varying turn counts bring (docs/algorithm.md, "Variants").

- ``mode="turn_index"`` (per-turn-index pools): locality, the property the mode exists for. A
  rollout that takes more turns changes no other rollout's normalized IG at the depths it had
  already reached (exactly), while "joint" and "separate" pools move every rollout's entries; and
  every depth's pool has mean 0 and variance 1.
- ``accumulation="sqrt_n"``: the magnitude of an IG advantage no longer grows with the number of
  IG terms it sums (seeded Monte Carlo), while the discounted sum's variance grows like that number.
- the variants compile (torch.compile fullgraph, jax.jit) and run on torch's meta device.

Their oracle agreement on drawn batches is in test_core_agreement.py, test_core_dense_groups.py
and test_core_targets.py; the clipped-gain growth is in test_core_targets.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

import igpo_rewards as igpo
from igpo_rewards.testing import reference, turn_batches

from .backend_support import given_on_each_backend, run_jitted, to_backend, to_numpy

pytestmark = pytest.mark.filterwarnings("ignore::igpo_rewards.SingleRolloutGroupWarning")

TOLERANCE = dict(rtol=1e-9, atol=1e-9)
EXTRA_TURNS = 3


def _normalize(rewards, turn_mask, group_ids, *, mode):
    return igpo.group_normalize(rewards, turn_mask, group_ids, mode=mode)


def _rewards_with_room(batch):
    """The batch's turn rewards, padded with EXTRA_TURNS empty turn slots."""
    rewards = reference.turn_rewards(batch.answer_logprob, batch.outcome, batch.turn_mask)
    pad = ((0, 0), (0, EXTRA_TURNS))
    return np.pad(rewards, pad), np.pad(batch.turn_mask, pad)


def _one_rollout_goes_deeper(rewards, turn_mask, row, added, gains):
    """Row ``row`` takes ``added`` more turns: its final (outcome) entry becomes an IG entry of value
    gains[0], more IG entries follow, and the outcome moves to the new final turn."""
    rewards, turn_mask = rewards.copy(), turn_mask.copy()
    n = int(turn_mask[row].sum())
    outcome = rewards[row, n - 1]
    rewards[row, n - 1 : n - 1 + added] = gains[:added]
    rewards[row, n - 1 + added] = outcome
    turn_mask[row, : n + added] = True
    return rewards, turn_mask


@given_on_each_backend(batch=turn_batches(allow_empty_rows=False), data=st.data())
def test_turn_index_pools_are_local_in_depth(backend, batch, data):
    """Per-turn-index pools: other rollouts' normalized IG at the depths j < n_r - 1 that rollout r
    had already reached are unchanged (the same bits) when r takes more turns, and so are their
    outcome entries (r's outcome keeps its value); deeper entries may move, nothing else."""
    rewards, turn_mask = _rewards_with_room(batch)
    row = data.draw(st.integers(0, len(batch.outcome) - 1))
    added = data.draw(st.integers(1, EXTRA_TURNS))
    gains = data.draw(st.lists(st.floats(-1.0, 1.0, allow_subnormal=False), min_size=EXTRA_TURNS,
                               max_size=EXTRA_TURNS))
    deeper, deeper_mask = _one_rollout_goes_deeper(rewards, turn_mask, row, added, gains)
    before = run_jitted(_normalize, backend, rewards, turn_mask, batch.group_ids, mode="turn_index")
    after = run_jitted(_normalize, backend, deeper, deeper_mask, batch.group_ids, mode="turn_index")
    n_r = int(turn_mask[row].sum())
    turns = turn_mask.sum(axis=1)
    others = np.arange(len(turns)) != row
    position = np.arange(turn_mask.shape[1])[None, :]
    shallow = others[:, None] & (position < np.minimum(n_r - 1, turns - 1)[:, None])
    np.testing.assert_array_equal(after[shallow], before[shallow])
    final = others[:, None] & (position == (turns - 1)[:, None])
    np.testing.assert_allclose(after[final], before[final], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(after, reference.group_normalize(deeper, deeper_mask, batch.group_ids, mode="turn_index"),
                               **TOLERANCE)


@pytest.mark.parametrize("mode", ["joint", "separate"])
def test_joint_and_separate_pools_move_every_rollout_when_one_goes_deeper(mode):
    """The turn-count bias "turn_index" removes: in a shared IG pool the deeper rollout's extra entries
    shift the mean and spread every other rollout's IG entries are scored against."""
    rewards = np.array([[0.2, 0.5, 1.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0], [0.4, -0.1, 0.0, 0.0, 0.0]])
    turn_mask = np.arange(5)[None, :] < np.array([3, 2, 3])[:, None]
    deeper, deeper_mask = _one_rollout_goes_deeper(rewards, turn_mask, 1, 2, [0.9, 0.8])
    group = [0, 0, 0]
    for name, moved in (("turn_index", False), (mode, True)):
        before = igpo.group_normalize(rewards, turn_mask, group, mode=name)
        after = igpo.group_normalize(deeper, deeper_mask, group, mode=name)
        change = np.abs(after[[0, 2], 0] - before[[0, 2], 0]).max()  # the other rollouts' first IG entry
        assert (change > 0.1) if moved else (change == 0.0), (name, change)


@given_on_each_backend(batch=turn_batches(), scale=st.sampled_from(["std", "none"]))
def test_every_depth_pool_has_mean_zero_and_unit_variance(backend, batch, scale):
    rewards = reference.turn_rewards(batch.answer_logprob, batch.outcome, batch.turn_mask)
    normalized = run_jitted(lambda r, m, g: igpo.group_normalize(r, m, g, mode="turn_index", scale=scale, eps=0.0),
                            backend, rewards, batch.turn_mask, batch.group_ids)
    turns = batch.turn_mask.sum(axis=1)
    position = np.arange(batch.turn_mask.shape[1])[None, :]
    is_final = batch.turn_mask & (position == (turns - 1)[:, None])
    depths = [("final", is_final)] + [(j, batch.turn_mask & ~is_final & (position == j))
                                      for j in range(batch.turn_mask.shape[1])]
    for group in np.unique(batch.group_ids):
        for depth, member in depths:
            pool = member & (batch.group_ids == group)[:, None]
            values, scores = rewards[pool], normalized[pool]
            if len(values) < 2 or np.all(values == values[0]):
                assert np.all(scores == 0.0), (group, depth)
                continue
            assert abs(scores.sum()) < 1e-9, (group, depth)
            if scale == "std":
                assert abs(np.mean(scores**2) - 1.0) < 1e-9, (group, depth)


def test_sqrt_n_accumulation_keeps_one_magnitude_at_every_depth(backend):
    """Seeded Monte Carlo: 80,000 rollouts with n_i uniform in 1..8, normalized IG entries i.i.d.
    N(0, 1), outcome entries 0, gamma = 1. Grouped by the number of IG terms m = n_i - 1 - j a turn's
    advantage sums, the variance of A is alpha^2 at every m with "sqrt_n", and m with "discounted" (the
    bias that "sqrt_n" removes: deep turns of long rollouts get the largest advantages)."""
    rng = np.random.default_rng(0)
    rollouts, max_turns, alpha = 80_000, 8, 0.3
    turns = rng.integers(1, max_turns + 1, rollouts)
    turn_mask = np.arange(max_turns)[None, :] < turns[:, None]
    is_final = turn_mask & (np.arange(max_turns)[None, :] == (turns - 1)[:, None])
    normalized = np.where(turn_mask & ~is_final, rng.standard_normal((rollouts, max_turns)), 0.0)
    terms = turns[:, None] - 1 - np.arange(max_turns)[None, :]

    def both(values, mask):
        return (igpo.variance_rescaled_returns(values, mask, ig_advantage_scale=alpha),
                igpo.discounted_returns(values, mask))

    rescaled, discounted = run_jitted(both, backend, normalized, turn_mask)
    for m in range(1, max_turns):
        at_depth = turn_mask & (terms == m)
        assert abs(rescaled[at_depth].var() / alpha**2 - 1.0) < 0.05, (m, rescaled[at_depth].var())
        assert abs(discounted[at_depth].var() / m - 1.0) < 0.05, (m, discounted[at_depth].var())
    np.testing.assert_allclose(rescaled[is_final], 0.0)


def test_sqrt_n_is_the_discounted_ig_sum_over_its_root_plus_the_discounted_outcome():
    """A_{i,j} sqrt(m_{i,j}) / alpha, less the outcome term, is the discounted IG sum of the oracle."""
    rng = np.random.default_rng(3)
    turn_mask = np.arange(5)[None, :] < np.array([5, 3, 1, 4, 0, 2])[:, None]
    normalized = np.where(turn_mask, rng.standard_normal((6, 5)), 0.0)
    turns = turn_mask.sum(axis=1)
    is_final = turn_mask & (np.arange(5)[None, :] == (turns - 1)[:, None])
    gamma, alpha = 0.9, 0.3
    got = igpo.variance_rescaled_returns(normalized, turn_mask, gamma=gamma, ig_advantage_scale=alpha)
    information = reference.discounted_returns(np.where(is_final, 0.0, normalized), turn_mask, gamma=gamma)
    outcome = reference.discounted_returns(np.where(is_final, normalized, 0.0), turn_mask, gamma=gamma)
    terms = np.maximum(turns[:, None] - 1 - np.arange(5)[None, :], 1)
    ig_turns = turn_mask & ~is_final
    np.testing.assert_allclose(((got - outcome) * np.sqrt(terms) / alpha)[ig_turns], information[ig_turns], rtol=1e-12)
    np.testing.assert_array_equal(got[is_final], normalized[is_final])
    assert np.all(got[~turn_mask] == 0)
    # the hand-computed rollout of the docstring: IG entries 1, 2 and the outcome 0.5
    np.testing.assert_allclose(igpo.variance_rescaled_returns(np.array([[1.0, 2.0, 0.5]]), [[1, 1, 1]]),
                               [[3 / np.sqrt(2) + 0.5, 2.5, 0.5]], rtol=1e-15)


def test_ig_advantage_scale_one_changes_no_bit_of_the_paper_accumulation():
    rng = np.random.default_rng(4)
    turn_mask = np.arange(4)[None, :] < np.array([4, 2, 3, 1])[:, None]
    logprob = np.where(turn_mask, np.log(rng.uniform(0.01, 1.0, (4, 4))), 0.0)
    outcome = np.array([1.0, 0.0, 0.5, 0.0])
    plain = igpo.igpo_advantages(logprob, outcome, turn_mask, group_size=2, gamma=0.9)
    scaled = igpo.igpo_advantages(logprob, outcome, turn_mask, group_size=2, gamma=0.9, ig_advantage_scale=1.0)
    np.testing.assert_array_equal(scaled.advantages, plain.advantages)
    half = igpo.igpo_advantages(logprob, outcome, turn_mask, group_size=2, gamma=0.9, ig_advantage_scale=0.5)
    want = reference.igpo_advantages(logprob, outcome, turn_mask, group_size=2, gamma=0.9, ig_advantage_scale=0.5)
    np.testing.assert_allclose(half.advantages, want.advantages, rtol=1e-12)
    assert not np.allclose(half.advantages, plain.advantages)


# --- compilation and shapes only --------------------------------------------------------------------

VARIANTS = dict(mode="turn_index", accumulation="sqrt_n", ig_advantage_scale=0.3, gain_clip="positive",
                subgoal_potential="running_max")
PROBES = np.log(np.array([[[0.1, 0.2], [0.6, 0.9], [1.0, 0.3]], [[0.3, 0.5], [1.0, 0.5], [1.0, 1.0]],
                          [[0.2, 0.1], [0.3, 0.8], [0.9, 0.2]], [[0.5, 0.5], [0.4, 0.5], [1.0, 1.0]]]))
PROBE_MASK = np.arange(3)[None, :] < np.array([3, 1, 3, 2])[:, None]
OUTCOME = np.array([1.0, 0.0, 0.5, 0.0])
TARGET_MASK = np.array([[1, 1], [1, 0], [1, 1], [1, 1]], dtype=bool)


@pytest.mark.backends("torch")
def test_the_variants_compile_without_graph_breaks(backend):
    import torch

    want = reference.igpo_advantages(PROBES, OUTCOME, PROBE_MASK, group_size=2, target_weights=[1.0, 0.5],
                                     target_mask=TARGET_MASK, **VARIANTS).advantages

    @torch.compile(backend="eager", fullgraph=True)
    def compiled(m, o, t, w, tm):
        return igpo.igpo_advantages(m, o, t, group_size=2, target_weights=w, target_mask=tm, validate=False,
                                    **VARIANTS).advantages

    arrays = [torch.tensor(a) for a in (PROBES, OUTCOME, PROBE_MASK, [1.0, 0.5], TARGET_MASK)]
    np.testing.assert_allclose(compiled(*arrays).numpy(), want, **TOLERANCE)


@pytest.mark.backends("jax")
def test_the_variants_run_under_jax_jit_with_static_options(backend):
    import jax

    want = reference.igpo_advantages(PROBES, OUTCOME, PROBE_MASK, group_size=2, target_weights=[1.0, 0.5],
                                     target_mask=TARGET_MASK, **VARIANTS).advantages
    jitted = jax.jit(igpo.igpo_advantages, static_argnames=("group_size", *VARIANTS))
    arrays = [to_backend(a, "jax") for a in (PROBES, OUTCOME, PROBE_MASK, np.array([1.0, 0.5]), TARGET_MASK)]
    got = jitted(*arrays[:3], group_size=2, target_weights=arrays[3], target_mask=arrays[4], **VARIANTS)
    np.testing.assert_allclose(to_numpy(got.advantages), want, rtol=1e-5, atol=1e-6)


@pytest.mark.backends("torch")
def test_the_variants_run_on_the_meta_device(backend):
    import torch

    meta = torch.device("meta")
    result = igpo.igpo_advantages(torch.empty(8, 3, 4, device=meta), torch.empty(8, device=meta),
                                  torch.ones(8, 3, dtype=torch.bool, device=meta), group_size=4,
                                  target_weights=torch.empty(4, device=meta),
                                  target_mask=torch.ones(8, 4, dtype=torch.bool, device=meta), validate=False, **VARIANTS)
    assert result.advantages.device == meta and result.advantages.shape == (8, 3)
