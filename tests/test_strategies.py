"""The Hypothesis strategies of igpo_rewards.testing draw valid batches; to_backend round-trips."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st

from igpo_rewards.testing import strategies as igst
from igpo_rewards.testing.strategies import TargetBatch, TokenBatch, TurnBatch


def reaches(strategy, condition) -> None:
    """Some draw of ``strategy`` satisfies ``condition`` (deterministic search, no shrinking)."""
    find(
        strategy,
        condition,
        settings=settings(max_examples=500, phases=[Phase.generate], derandomize=True, database=None),
    )


def assert_prefix(mask: np.ndarray) -> None:
    """Every row is some Trues followed by Falses."""
    lengths = mask.sum(axis=1)
    expected = np.arange(mask.shape[1])[None, :] < lengths[:, None]
    np.testing.assert_array_equal(mask, expected)


def runs_of(row: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each maximal run of 1s, computed with np.diff (independent of the reference)."""
    padded = np.concatenate([[0], row.astype(np.int64), [0]])
    edges = np.diff(padded)
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


# --------------------------------------------------------------------------------------------
# turn_masks and group_ids


@given(st.data())
def test_turn_masks_are_prefix_masks(data):
    num_rollouts = data.draw(st.integers(0, 6))
    max_turns = data.draw(st.integers(1, 5))
    allow_empty_rows = data.draw(st.booleans())
    mask = data.draw(igst.turn_masks(num_rollouts, max_turns, allow_empty_rows=allow_empty_rows))
    assert mask.dtype == np.bool_
    assert mask.shape == (num_rollouts, max_turns)
    assert_prefix(mask)
    if not allow_empty_rows:
        assert mask[:, 0].all() if num_rollouts else True


@given(st.data())
def test_group_ids_sizes_within_bounds(data):
    num_rollouts = data.draw(st.integers(1, 12))
    max_group_size = data.draw(st.integers(1, 5))
    fewest = -(-num_rollouts // max_group_size)
    max_groups = data.draw(st.integers(fewest, fewest + 3))
    ids = data.draw(igst.group_ids(num_rollouts, max_groups=max_groups, max_group_size=max_group_size))
    assert ids.dtype == np.int64
    assert ids.shape == (num_rollouts,)
    sizes = Counter(ids.tolist())
    assert 1 <= len(sizes) <= max_groups
    assert all(1 <= size <= max_group_size for size in sizes.values())
    assert ids.min() >= -(2**31) and ids.max() < 2**31


def test_group_ids_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="max_group_size"):
        igst.group_ids(10, max_groups=2, max_group_size=3)
    with pytest.raises(TypeError, match="num_rollouts"):
        igst.group_ids(2.5, max_groups=2)
    with pytest.raises(ValueError, match="max_groups"):
        igst.group_ids(3, max_groups=0)


def test_group_ids_reach_non_contiguous_shuffled_ids():
    # some draw has a negative id, and some draw has its groups interleaved (not sorted runs)
    reaches(igst.group_ids(4, max_groups=3), lambda ids: (ids < 0).any())
    reaches(
        igst.group_ids(6, max_groups=3),
        lambda ids: any(ids[k] != ids[k + 1] and ids[k] in ids[k + 2 :] for k in range(4)),
    )


# --------------------------------------------------------------------------------------------
# turn_batches


def check_turn_batch(batch: TurnBatch, *, max_groups, max_group_size, max_turns, allow_neg_inf, allow_empty_rows):
    assert isinstance(batch, TurnBatch)
    num_rollouts, num_turns = batch.answer_logprob.shape
    assert 1 <= num_turns <= max_turns
    assert batch.answer_logprob.dtype == np.float64
    assert batch.outcome.dtype == np.float64 and batch.outcome.shape == (num_rollouts,)
    assert batch.turn_mask.dtype == np.bool_ and batch.turn_mask.shape == (num_rollouts, num_turns)
    assert batch.group_ids.dtype == np.int64 and batch.group_ids.shape == (num_rollouts,)
    assert_prefix(batch.turn_mask)
    if not allow_empty_rows:
        assert batch.turn_mask[:, 0].all()
    valid = batch.answer_logprob[batch.turn_mask]
    assert not np.isnan(valid).any() and (valid <= 0).all()
    if not allow_neg_inf:
        assert np.isfinite(valid).all()
    assert np.isfinite(batch.answer_logprob[~batch.turn_mask]).all()
    assert (((batch.outcome >= 0) & (batch.outcome <= 1)) | (batch.outcome == -2.0)).all()
    sizes = Counter(batch.group_ids.tolist())
    assert len(sizes) <= max_groups
    assert all(size <= max_group_size for size in sizes.values())


@given(igst.turn_batches())
def test_turn_batches_default_are_valid(batch):
    check_turn_batch(
        batch, max_groups=4, max_group_size=6, max_turns=6, allow_neg_inf=True, allow_empty_rows=True
    )


@given(igst.turn_batches(max_groups=2, max_group_size=3, max_turns=2, allow_neg_inf=False, allow_empty_rows=False, ties=False))
def test_turn_batches_options_are_respected(batch):
    check_turn_batch(
        batch, max_groups=2, max_group_size=3, max_turns=2, allow_neg_inf=False, allow_empty_rows=False
    )


def _has_zero_variance_joint_pool(batch: TurnBatch) -> bool:
    # all valid entries of some multi-entry group equal 0: constant probes in every row, outcome 0
    for group in np.unique(batch.group_ids):
        rows = batch.group_ids == group
        mask = batch.turn_mask[rows]
        if mask.sum() < 2:
            continue
        logprob = batch.answer_logprob[rows]
        constant = all(len(set(logprob[i][mask[i]].tolist())) <= 1 for i in range(len(mask)))
        if constant and (batch.outcome[rows][mask.any(axis=1)] == 0).all():
            return True
    return False


def test_turn_batches_reach_the_edge_cases():
    strategy = igst.turn_batches()
    reaches(strategy, lambda b: np.isneginf(b.answer_logprob[b.turn_mask]).any())
    reaches(strategy, lambda b: (~b.turn_mask.any(axis=1)).any())  # a padding row
    reaches(strategy, lambda b: (b.outcome == -2.0).any())
    reaches(strategy, lambda b: (b.answer_logprob[b.turn_mask] < -20).any())  # below the floor
    reaches(strategy, lambda b: any(c == 1 for c in Counter(b.group_ids.tolist()).values()))
    reaches(  # a group of several rollouts that all share one outcome
        strategy,
        lambda b: any(
            (b.group_ids == g).sum() >= 2 and len(set(b.outcome[b.group_ids == g].tolist())) == 1
            for g in np.unique(b.group_ids)
        ),
    )
    reaches(strategy, _has_zero_variance_joint_pool)


# --------------------------------------------------------------------------------------------
# token_batches


def read_turn_rewards(batch: TokenBatch) -> np.ndarray:
    """Turn j's reward at the last token of run j, plus whatever lies after the last run."""
    out = np.zeros(batch.turn_rewards.shape)
    for i, row in enumerate(batch.response_mask):
        runs = runs_of(row)
        for j, (_, stop) in enumerate(runs):
            out[i, j] = batch.token_level_rewards[i, stop - 1]
        if runs:
            out[i, len(runs) - 1] += batch.token_level_rewards[i, runs[-1][1] :].sum()
    return out


def check_token_batch(batch: TokenBatch, *, max_groups, max_group_size, max_turns, max_turn_tokens, max_observation_tokens):
    assert isinstance(batch, TokenBatch)
    num_rollouts, num_tokens = batch.response_mask.shape
    num_turns = batch.turn_rewards.shape[1]
    assert batch.response_mask.dtype == np.int64
    assert set(np.unique(batch.response_mask).tolist()) <= {0, 1}
    assert batch.turn_rewards.dtype == np.float64 and batch.turn_rewards.shape == (num_rollouts, num_turns)
    assert batch.turn_mask.dtype == np.bool_ and batch.turn_mask.shape == (num_rollouts, num_turns)
    assert batch.token_level_rewards.dtype == np.float64
    assert batch.token_level_rewards.shape == (num_rollouts, num_tokens)
    assert batch.group_ids.dtype == np.int64 and batch.group_ids.shape == (num_rollouts,)
    assert_prefix(batch.turn_mask)
    assert 1 <= num_turns <= max_turns
    most_runs = 0
    for i, row in enumerate(batch.response_mask):
        runs = runs_of(row)
        most_runs = max(most_runs, len(runs))
        assert len(runs) == batch.turn_mask[i].sum()
        if runs:
            assert runs[0][0] == 0  # a verl response starts with a generated turn
        for start, stop in runs:
            assert 1 <= stop - start <= max_turn_tokens
        for (_, stop), (start, _) in zip(runs, runs[1:]):
            assert 1 <= start - stop <= max_observation_tokens  # observation between turns
    assert most_runs == num_turns
    np.testing.assert_array_equal(batch.turn_rewards[~batch.turn_mask], 0.0)
    assert np.isfinite(batch.turn_rewards).all() and np.isfinite(batch.token_level_rewards).all()
    np.testing.assert_array_equal(batch.token_level_rewards[~batch.response_mask.any(axis=1)], 0.0)
    sizes = Counter(batch.group_ids.tolist())
    assert len(sizes) <= max_groups
    assert all(size <= max_group_size for size in sizes.values())


@given(igst.token_batches())
def test_token_batches_default_are_valid(batch):
    check_token_batch(
        batch, max_groups=3, max_group_size=4, max_turns=4, max_turn_tokens=3, max_observation_tokens=3
    )
    # rewards sit exactly at the last token of each run
    expected = np.zeros(batch.token_level_rewards.shape)
    for i, row in enumerate(batch.response_mask):
        for j, (_, stop) in enumerate(runs_of(row)):
            expected[i, stop - 1] = batch.turn_rewards[i, j]
    np.testing.assert_array_equal(batch.token_level_rewards, expected)


@given(
    igst.token_batches(
        max_groups=2,
        max_group_size=2,
        max_turns=2,
        max_turn_tokens=1,
        max_observation_tokens=2,
        exact_zero_rewards=False,
        allow_empty_rows=False,
        ties=False,
        final_reward_after_last_run=True,
    )
)
def test_token_batches_options_are_respected(batch):
    check_token_batch(
        batch, max_groups=2, max_group_size=2, max_turns=2, max_turn_tokens=1, max_observation_tokens=2
    )
    assert batch.response_mask.any(axis=1).all()  # no empty rows
    assert (batch.turn_rewards[batch.turn_mask] != 0).all()  # no exact zeros
    # moved or not, the turn rewards read back from the token layout are the turn rewards
    np.testing.assert_array_equal(read_turn_rewards(batch), batch.turn_rewards)
    # and only mask-0 tokens after the last run may carry a reward besides the run ends
    for i, row in enumerate(batch.response_mask):
        runs = runs_of(row)
        allowed = np.zeros(len(row), dtype=bool)
        allowed[[stop - 1 for _, stop in runs]] = True
        allowed[runs[-1][1] :] = True
        assert (batch.token_level_rewards[i][~allowed] == 0).all()


def assert_contiguous_equal_groups(group_ids: np.ndarray) -> None:
    """G contiguous rows per group, every group of the same size, distinct ids per block."""
    num_groups = len(set(group_ids.tolist()))
    assert len(group_ids) % num_groups == 0
    blocks = group_ids.reshape(num_groups, -1)
    assert (blocks == blocks[:, :1]).all()
    assert len(set(blocks[:, 0].tolist())) == num_groups


@given(igst.turn_batches(contiguous_groups=True))
def test_turn_batches_with_contiguous_groups(batch):
    check_turn_batch(
        batch, max_groups=4, max_group_size=6, max_turns=6, allow_neg_inf=True, allow_empty_rows=True
    )
    assert_contiguous_equal_groups(batch.group_ids)


@given(igst.token_batches(contiguous_groups=True, final_reward_after_last_run=True))
def test_token_batches_with_contiguous_groups(batch):
    check_token_batch(
        batch, max_groups=3, max_group_size=4, max_turns=4, max_turn_tokens=3, max_observation_tokens=3
    )
    assert_contiguous_equal_groups(batch.group_ids)
    np.testing.assert_array_equal(read_turn_rewards(batch), batch.turn_rewards)


def test_contiguous_groups_reach_several_groups_of_several_rollouts():
    reaches(igst.turn_batches(contiguous_groups=True),
            lambda b: len(set(b.group_ids.tolist())) >= 2 and len(b.group_ids) // len(set(b.group_ids.tolist())) >= 3)


def test_token_batches_reach_the_edge_cases():
    strategy = igst.token_batches()
    reaches(strategy, lambda b: (b.turn_rewards[b.turn_mask] == 0).any())  # exact-zero reward
    reaches(strategy, lambda b: (~b.response_mask.any(axis=1)).any())  # padding row
    reaches(  # a trailing observation run followed by padding columns
        strategy,
        lambda b: any(r and r[-1][1] < b.response_mask.shape[1] for r in map(runs_of, b.response_mask)),
    )
    reaches(strategy, lambda b: b.turn_rewards.shape[1] >= 3)
    reaches(
        igst.token_batches(final_reward_after_last_run=True),
        lambda b: (b.token_level_rewards[b.response_mask == 0] != 0).any(),
    )


# --------------------------------------------------------------------------------------------
# to_backend


def _namespace_checks(backend: str):
    """(array type, float64 name, int64 names) for the backend."""
    if backend == "numpy":
        return np.ndarray
    if backend == "torch":
        import torch

        return torch.Tensor
    import jax

    return jax.Array


def _dtype_name(array) -> str:
    return str(array.dtype).replace("torch.", "")


def _x64():
    import jax

    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older JAX releases

    return enable_x64()


@settings(max_examples=10)
@given(batch=igst.turn_batches(), token_batch=igst.token_batches())
def test_to_backend_round_trip_default_dtypes(backend, batch, token_batch):
    array_type = _namespace_checks(backend)
    if backend == "jax":
        import jax

        x64 = bool(jax.config.read("jax_enable_x64"))
        float_name, int_name = ("float64", "int64") if x64 else ("float32", "int32")
    else:
        float_name, int_name = "float64", "int64"
    for drawn in (batch, token_batch):
        converted = igst.to_backend(drawn, backend)
        assert type(converted) is type(drawn)
        for original, array in zip(drawn, converted):
            assert isinstance(array, array_type)
            assert tuple(array.shape) == original.shape
            expected_name = {"f": float_name, "b": "bool", "i": int_name}[original.dtype.kind]
            assert _dtype_name(array) == expected_name
            np.testing.assert_array_equal(np.asarray(array), original.astype(expected_name))


@settings(max_examples=10)
@given(batch=igst.turn_batches())
def test_to_backend_float32(backend, batch):
    converted = igst.to_backend(batch, backend, float_dtype="float32")
    assert _dtype_name(converted.answer_logprob) == "float32"
    assert _dtype_name(converted.outcome) == "float32"
    assert _dtype_name(converted.turn_mask) == "bool"
    assert _dtype_name(converted.group_ids) in ("int64", "int32")
    np.testing.assert_array_equal(np.asarray(converted.answer_logprob), batch.answer_logprob.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(converted.group_ids), batch.group_ids)
    # one array converts on its own too
    single = igst.to_backend(batch.outcome, backend, float_dtype="float32")
    np.testing.assert_array_equal(np.asarray(single), batch.outcome.astype(np.float32))


def test_to_backend_copies_and_keeps_64_bit(backend):
    original = np.array([[0.1, -np.inf], [1e-300, 2.0]])
    ids = np.array([-(2**31), 2**31 - 1], dtype=np.int64)
    if backend == "jax":
        with _x64():
            converted = igst.to_backend(original, backend)
            converted_ids = igst.to_backend(ids, backend)
            assert _dtype_name(converted) == "float64" and _dtype_name(converted_ids) == "int64"
            np.testing.assert_array_equal(np.asarray(converted), original)
        return
    converted = igst.to_backend(original, backend)
    assert _dtype_name(converted) == "float64"
    np.testing.assert_array_equal(np.asarray(converted), original)
    converted[0, 0] = 5.0
    assert original[0, 0] == 0.1  # a copy, not a view of the drawn batch
    assert _dtype_name(igst.to_backend(ids, backend)) == "int64"


def test_to_backend_jax_64_bit_needs_x64(backend):
    if backend != "jax":
        return
    import jax

    if jax.config.read("jax_enable_x64"):
        return
    with pytest.raises(ValueError, match="jax_enable_x64"):
        igst.to_backend(np.zeros(2), "jax", float_dtype="float64")
    with pytest.raises(ValueError, match="int32"):
        igst.to_backend(np.array([2**40]), "jax")


def test_to_backend_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        igst.to_backend(np.zeros(2), "tensorflow")
    with pytest.raises(TypeError, match="float_dtype"):
        igst.to_backend(np.zeros(2), "numpy", float_dtype=np.float32)
    with pytest.raises(ValueError, match="float_dtype"):
        igst.to_backend(np.zeros(2), "numpy", float_dtype="int8x")
    with pytest.raises(ValueError, match="device"):
        igst.to_backend(np.zeros(2), "numpy", device="cpu")


# --------------------------------------------------------------------------------------------
# target_batches


def check_target_batch(batch: TargetBatch, *, max_targets: int) -> None:
    assert isinstance(batch, TargetBatch)
    num_rollouts, num_turns, num_targets = batch.answer_logprob.shape
    assert 1 <= num_targets <= max_targets
    answer = TurnBatch(batch.answer_logprob[:, :, 0], batch.outcome, batch.turn_mask, batch.group_ids)
    check_turn_batch(answer, max_groups=4, max_group_size=6, max_turns=6, allow_neg_inf=True, allow_empty_rows=True)
    assert batch.target_mask.dtype == np.bool_ and batch.target_mask.shape == (num_rollouts, num_targets)
    assert batch.target_mask[:, 0].all()
    assert batch.target_weights.dtype == np.float64 and batch.target_weights.shape == (num_rollouts, num_targets)
    assert np.isfinite(batch.target_weights).all()
    present = batch.turn_mask[:, :, None] & batch.target_mask[:, None, :]
    valid = batch.answer_logprob[present]
    assert not np.isnan(valid).any() and (valid <= 0).all()
    padded = ~batch.turn_mask[:, :, None] & batch.target_mask[:, None, :]
    assert np.isfinite(batch.answer_logprob[padded]).all()
    absent = ~batch.target_mask[:, None, :] & np.ones((1, num_turns, 1), dtype=bool)
    assert np.isnan(batch.answer_logprob[absent]).all()


@given(igst.target_batches())
def test_target_batches_default_are_valid(batch):
    check_target_batch(batch, max_targets=4)


def test_target_batches_reach_the_edge_cases():
    strategy = igst.target_batches()
    reaches(strategy, lambda b: b.answer_logprob.shape[2] == 1)
    reaches(strategy, lambda b: b.answer_logprob.shape[2] == 4 and (~b.target_mask).any() and b.target_mask[:, 1:].any())
    reaches(strategy, lambda b: len(b.target_weights) > 1 and np.all(b.target_weights == b.target_weights[:1]))
    reaches(strategy, lambda b: len(b.target_weights) > 1 and not np.all(b.target_weights == b.target_weights[:1]))

    def falls_after_rising(batch):  # a sub-goal's probe that rises, then falls (what running max is for)
        for i, n in enumerate(batch.turn_mask.sum(axis=1)):
            for k in np.flatnonzero(batch.target_mask[i, 1:]) + 1:
                steps = np.diff(batch.answer_logprob[i, :n, k])
                if (steps > 0).any() and (steps < 0).any() and np.argmax(steps > 0) < len(steps) - 1:
                    return True
        return False

    reaches(strategy, falls_after_rising)
    with pytest.raises(ValueError, match="max_targets"):
        igst.target_batches(max_targets=0)


# --------------------------------------------------------------------------------------------
# import behaviour


def test_testing_package_imports_without_hypothesis():
    code = (
        "import sys\n"
        "sys.modules['hypothesis'] = None  # makes `import hypothesis` raise ImportError\n"
        "import igpo_rewards.testing as t\n"
        "assert t.reference.grpo_advantages([0.0, 1.0], [1, 1]).shape == (2,)\n"
        "try:\n"
        "    t.turn_batches\n"
        "except ImportError as error:\n"
        "    assert 'pip install hypothesis' in str(error), error\n"
        "    assert 'pip install \"igpo-rewards[test] @ git+$IGPO_GIT\"' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('no ImportError without hypothesis')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_strategies_are_exposed_lazily():
    import igpo_rewards.testing as testing

    assert testing.turn_batches is igst.turn_batches
    assert testing.to_backend is igst.to_backend
    assert set(testing.__all__) >= {"reference", "turn_batches", "target_batches", "token_batches", "turn_masks",
                                    "group_ids", "to_backend"}
    assert testing.target_batches is igst.target_batches
    with pytest.raises(AttributeError):
        testing.not_a_name  # noqa: B018
