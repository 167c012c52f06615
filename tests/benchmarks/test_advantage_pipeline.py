"""How close the advantage pipeline comes to the memory-bandwidth floor (issue 5).

For each workload and backend (NumPy, torch CPU, JAX CPU jitted and warm), one pytest-benchmark
group holds:

* ``copy``: the floor, a copy of one [B, S] float32 array (np.copyto, Tensor.copy_, a jitted
  copy), since every pipeline must at least write its [B, S] float32 output;
* ``igpo_advantages + broadcast_to_tokens``: turn advantages from probe log-probs, then onto
  the tokens (with the turn mask check, as reference_trainer does);
* ``advantages_from_token_rewards``: the verl path, from token-level rewards and the
  response mask;
* ``turn_index_from_response_mask``: the token -> turn index the first pipeline consumes;
* ``igpo_advantages``: the turn-level part alone ([B, T], no tokens), where the group
  normalization is;
* the same three pipelines with ``group_size=G`` (the contiguous layout of the batch, the einops
  path) instead of ``group_ids`` (host factorization on NumPy, a sort on the device for torch
  and JAX), each with its ratio to the ``group_ids`` path in the summary.

A ``python`` group times the loop style of released IGPO code (the float64 oracle of
igpo_rewards.testing.reference) on one group of rollouts; the summary scales it by B / rows.
Every benchmark checks its result against the oracle on the first and the last group of
rollouts (whole groups, so group normalization sees the same pools), so the benchmarks fail
on a wrong answer; timings are never asserted.

Run (docs/benchmarks.md): ``IGPO_BENCH=full .venv/bin/python -m pytest tests/benchmarks --benchmark-only``.
The default (quick) mode runs W3 for a few rounds inside the normal suite.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest

import igpo_rewards as igpo
from igpo_rewards.testing import reference

from .bench_support import Workload, block, make_batch, rounds, selected_workloads, to_library, to_numpy

WORKLOADS = selected_workloads()
TOLERANCE = dict(rtol=1e-4, atol=2e-4)  # float32 pipelines against the float64 oracle


@pytest.fixture(scope="module", params=WORKLOADS, ids=[w.name for w in WORKLOADS])
def workload(request) -> Workload:
    return request.param


@functools.lru_cache(maxsize=1)
def _batch(workload: Workload):
    return make_batch(workload)


def _checked_rows(workload: Workload) -> list[slice]:
    """The first and the last group of rollouts."""
    size = workload.group_size
    return [slice(0, size), slice(workload.rollouts - size, workload.rollouts)]


@functools.lru_cache(maxsize=4)
def _oracle(workload: Workload, rows: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The oracle's [rows, S] token advantages by both paths, and its turn index."""
    batch = _batch(workload)
    part = slice(*rows)
    turn = reference.igpo_advantages(
        batch.answer_logprob[part], batch.outcome[part], batch.turn_mask[part], batch.group_ids[part]
    ).advantages
    from_turns = reference.broadcast_to_tokens(turn, batch.token_turn_index[part], turn_mask=batch.turn_mask[part])
    from_tokens = reference.advantages_from_token_rewards(
        batch.token_level_rewards[part], batch.response_mask[part], batch.group_ids[part],
        max_turns=workload.turns,
    )
    return from_turns, from_tokens


def _check_against_oracle(workload: Workload, result, which: int) -> None:
    result = to_numpy(result)
    assert result.shape == (workload.rollouts, workload.tokens) and result.dtype == np.float32
    for rows in _checked_rows(workload):
        want = _oracle(workload, (rows.start, rows.stop))[which]
        np.testing.assert_allclose(result[rows], want, err_msg=f"rows {rows}", **TOLERANCE)


DENSE = ", group_size"  # suffix of the pipelines that pass group_size=G instead of group_ids


def _pipelines(backend: str, workload: Workload) -> dict[str, Any]:
    """Pipeline name -> callable on the library's arrays (JAX: jitted). The ``group_size`` ones
    take the same arguments and ignore ``group_ids``."""
    num_turns, size = workload.turns, workload.group_size

    def groups(group_ids, dense):
        return dict(group_size=size) if dense else dict(group_ids=group_ids)

    def turn_level(dense):
        def call(logprob, outcome, turn_mask, group_ids):
            return igpo.igpo_advantages(logprob, outcome, turn_mask, **groups(group_ids, dense)).advantages
        return call

    def turn_path(dense):
        def call(logprob, outcome, turn_mask, group_ids, token_turn_index):
            advantages = igpo.igpo_advantages(logprob, outcome, turn_mask, **groups(group_ids, dense)).advantages
            return igpo.broadcast_to_tokens(advantages, token_turn_index, turn_mask=turn_mask)
        return call

    def token_path(dense):
        def call(token_level_rewards, response_mask, group_ids):
            return igpo.advantages_from_token_rewards(token_level_rewards, response_mask, max_turns=num_turns,
                                                      **groups(group_ids, dense))
        return call

    pipelines = {"turn_index_from_response_mask": igpo.turn_index_from_response_mask}
    for dense, suffix in ((False, ""), (True, DENSE)):
        pipelines["igpo_advantages + broadcast_to_tokens" + suffix] = turn_path(dense)
        pipelines["advantages_from_token_rewards" + suffix] = token_path(dense)
        pipelines["igpo_advantages" + suffix] = turn_level(dense)
    if backend == "jax":
        import jax

        pipelines = {name: jax.jit(function) for name, function in pipelines.items()}
    return pipelines


def _arguments(data, name: str) -> tuple:
    if name.startswith("igpo_advantages + broadcast_to_tokens"):
        return data.answer_logprob, data.outcome, data.turn_mask, data.group_ids, data.token_turn_index
    if name.startswith("advantages_from_token_rewards"):
        return data.token_level_rewards, data.response_mask, data.group_ids
    if name.startswith("igpo_advantages"):
        return data.answer_logprob, data.outcome, data.turn_mask, data.group_ids
    return (data.response_mask,)


@pytest.fixture(scope="module")
def library(backend, workload, request):
    """The batch on the backend, the pipelines (JAX: compiled and run once), and the copy."""
    if backend == "torch":
        request.getfixturevalue("torch_threads")
    data = to_library(_batch(workload), backend)
    pipelines = {}
    for name, function in _pipelines(backend, workload).items():
        args = _arguments(data, name)
        block(function(*args))  # warm: JAX compiles here, torch/NumPy touch their buffers
        pipelines[name] = (function, args)
    if backend == "numpy":
        source = data.token_level_rewards
        target = np.empty_like(source)
        copy = functools.partial(np.copyto, target, source)
    elif backend == "torch":
        source = data.token_level_rewards
        target = source.clone()
        copy = functools.partial(target.copy_, source)
    else:
        import jax
        import jax.numpy as jnp

        jitted = jax.jit(jnp.copy)
        copy = functools.partial(jitted, data.token_level_rewards)
        block(copy())
    return dict(pipelines=pipelines, copy=copy)


def _time(benchmark, function, args, kind: str):
    return benchmark.pedantic(lambda: block(function(*args)), rounds=rounds(kind), warmup_rounds=1, iterations=1)


def _group(benchmark, workload: Workload, backend: str) -> None:
    benchmark.group = f"{workload.name} {backend}: advantage pipeline vs copy"


def test_copy(benchmark, backend, workload, library, recorder):
    _group(benchmark, workload, backend)
    _time(benchmark, library["copy"], (), "copy")
    recorder.record(benchmark, suite="pipeline", workload=workload.name, backend=backend, name="copy")


@pytest.mark.parametrize("groups", ["group_ids", "group_size"])
def test_igpo_advantages_then_broadcast(benchmark, backend, workload, library, recorder, groups):
    _group(benchmark, workload, backend)
    name = "igpo_advantages + broadcast_to_tokens" + (DENSE if groups == "group_size" else "")
    result = _time(benchmark, *library["pipelines"][name], "pipeline")
    _check_against_oracle(workload, result, 0)
    recorder.record(benchmark, suite="pipeline", workload=workload.name, backend=backend, name=name)


@pytest.mark.parametrize("groups", ["group_ids", "group_size"])
def test_advantages_from_token_rewards(benchmark, backend, workload, library, recorder, groups):
    _group(benchmark, workload, backend)
    name = "advantages_from_token_rewards" + (DENSE if groups == "group_size" else "")
    result = _time(benchmark, *library["pipelines"][name], "pipeline")
    _check_against_oracle(workload, result, 1)
    recorder.record(benchmark, suite="pipeline", workload=workload.name, backend=backend, name=name)


@pytest.mark.parametrize("groups", ["group_ids", "group_size"])
def test_igpo_advantages_turn_level(benchmark, backend, workload, library, recorder, groups):
    """The [B, T] part alone, where the two ways of giving the groups differ."""
    _group(benchmark, workload, backend)
    name = "igpo_advantages" + (DENSE if groups == "group_size" else "")
    result = to_numpy(_time(benchmark, *library["pipelines"][name], "pipeline"))
    batch = _batch(workload)
    for rows in _checked_rows(workload):
        want = reference.igpo_advantages(batch.answer_logprob[rows], batch.outcome[rows], batch.turn_mask[rows],
                                         batch.group_ids[rows]).advantages
        np.testing.assert_allclose(result[rows], want, err_msg=f"rows {rows}", **TOLERANCE)
    recorder.record(benchmark, suite="pipeline", workload=workload.name, backend=backend, name=name)


def test_turn_index_from_response_mask(benchmark, backend, workload, library, recorder):
    _group(benchmark, workload, backend)
    result = to_numpy(_time(benchmark, *library["pipelines"]["turn_index_from_response_mask"], "pipeline"))
    np.testing.assert_array_equal(result, _batch(workload).token_turn_index)
    recorder.record(benchmark, suite="pipeline", workload=workload.name, backend=backend,
                    name="turn_index_from_response_mask")


@pytest.mark.parametrize("path", ["igpo_advantages + broadcast_to_tokens", "advantages_from_token_rewards"])
def test_loop_style(benchmark, workload, path, recorder):
    """The per-rollout, per-token Python loops of released IGPO code, on the first group."""
    benchmark.group = f"{workload.name} python: loop style on one group (scale by B / G)"
    batch = _batch(workload)
    rows = _checked_rows(workload)[0]
    if path == "advantages_from_token_rewards":
        args = (batch.token_level_rewards[rows], batch.response_mask[rows], batch.group_ids[rows])

        def loop():
            return reference.advantages_from_token_rewards(*args, max_turns=workload.turns)
    else:
        part = [array[rows] for array in (batch.answer_logprob, batch.outcome, batch.turn_mask, batch.group_ids)]

        def loop():
            turn = reference.igpo_advantages(*part).advantages
            return reference.broadcast_to_tokens(turn, batch.token_turn_index[rows], turn_mask=batch.turn_mask[rows])

    result = benchmark.pedantic(loop, rounds=rounds("loop"), iterations=1)
    # The loop style is the oracle: check it against the library on the same rows instead.
    library_result = (
        igpo.advantages_from_token_rewards(*args, max_turns=workload.turns)
        if path == "advantages_from_token_rewards"
        else igpo.broadcast_to_tokens(
            igpo.igpo_advantages(*part).advantages, batch.token_turn_index[rows], turn_mask=batch.turn_mask[rows])
    )
    np.testing.assert_allclose(library_result, result, **TOLERANCE)
    num_rows = rows.stop - rows.start
    recorder.record(benchmark, suite="pipeline", workload=workload.name, backend="python", name=f"loop: {path}",
                    rows=num_rows, scale=workload.rollouts / num_rows)
