"""Workloads, library conversion and the results summary of the advantage-pipeline benchmarks.

Mode: ``IGPO_BENCH=quick`` (the default, what CI runs inside the normal suite: W3 only, a few
rounds) or ``IGPO_BENCH=full`` (W1, W2, W3). ``IGPO_BENCH_WORKLOADS=W1,W3`` picks a subset in
either mode. Timings are never asserted; results are.

Shapes: B rollouts, G group size, T turns, S response tokens.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

MODE_ENV = "IGPO_BENCH"
WORKLOADS_ENV = "IGPO_BENCH_WORKLOADS"
SUMMARY_ENV = "IGPO_BENCH_SUMMARY"
TORCH_THREADS_ENV = "IGPO_BENCH_TORCH_THREADS"


@dataclass(frozen=True)
class Workload:
    """One benchmark size: B rollouts in groups of G, T turn slots, S response tokens."""

    name: str
    rollouts: int
    turns: int
    tokens: int
    group_size: int = 16

    def __str__(self) -> str:
        return f"{self.name} (B={self.rollouts}, T={self.turns}, S={self.tokens})"


WORKLOADS = {
    "W1": Workload("W1", 512, 10, 8192),  # the paper's batch: 32 questions x 16 rollouts
    "W2": Workload("W2", 4096, 10, 4096),
    "W3": Workload("W3", 64, 4, 512),
}


def mode() -> str:
    """"quick" (default) or "full"; anything else is an error, not a silent default."""
    value = os.environ.get(MODE_ENV, "quick").strip().lower()
    if value not in ("quick", "full"):
        raise ValueError(f"{MODE_ENV} must be 'quick' or 'full', got {value!r}")
    return value


def selected_workloads() -> list[Workload]:
    names = os.environ.get(WORKLOADS_ENV, "")
    if names.strip():
        chosen = [name.strip().upper() for name in names.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in WORKLOADS]
        if unknown:
            raise ValueError(f"{WORKLOADS_ENV} names unknown workloads {unknown}; known: {sorted(WORKLOADS)}")
        return [WORKLOADS[name] for name in chosen]
    return [WORKLOADS[name] for name in (("W1", "W2", "W3") if mode() == "full" else ("W3",))]


def rounds(kind: str) -> int:
    """Timed rounds per benchmark: few in quick mode (the code must run, the numbers don't matter)."""
    if mode() == "quick":
        return 1 if kind.startswith("probe") else 3
    return {"copy": 40, "pipeline": 25, "loop": 9, "probe": 9, "probe_paired": 15}[kind]


class Batch(NamedTuple):
    """A batch in both layouts (NumPy): the turn layout of ``igpo_advantages`` and verl's token layout."""

    answer_logprob: np.ndarray  # [B, T] float32, probe log-probs (0 at padded turns)
    outcome: np.ndarray  # [B] float32, answer F1 in {0, 0.5, 1} or the format penalty -2
    turn_mask: np.ndarray  # [B, T] bool prefix mask
    group_ids: np.ndarray  # [B] int64, G consecutive rollouts per question
    response_mask: np.ndarray  # [B, S] bool, verl's response mask
    token_turn_index: np.ndarray  # [B, S] int64, turn of each generated token, -1 elsewhere
    token_level_rewards: np.ndarray  # [B, S] float32, verl's token-level rewards


def make_batch(workload: Workload, seed: int = 0) -> Batch:
    """A realistic verl-layout batch.

    Each rollout has n ~ U{1..T} turns and fills a random 40-100% of S (the rest is padding).
    Generated runs (think + search call, or the answer) alternate with observation runs
    (retrieved documents, on average twice as long). One rollout in ten is truncated: it ends
    on an observation (the turn budget ran out), and its outcome reward sits on that
    observation's last token, where verl's reward managers put it; every other turn's reward
    sits on the last token of its run.
    """
    rng = np.random.default_rng(seed)
    num_rollouts, num_turns, num_tokens = workload.rollouts, workload.turns, workload.tokens
    if num_rollouts % workload.group_size:
        raise ValueError(f"{workload}: B must be a multiple of G = {workload.group_size}")
    turns = rng.integers(1, num_turns + 1, size=num_rollouts)
    truncated = rng.random(num_rollouts) < 0.1
    turn_mask = np.arange(num_turns)[None, :] < turns[:, None]
    answer_logprob = np.where(turn_mask, -rng.exponential(2.0, size=(num_rollouts, num_turns)), 0.0)
    outcome = rng.choice(np.array([0.0, 0.5, 1.0, -2.0]), size=num_rollouts, p=[0.4, 0.2, 0.3, 0.1])
    answer_logprob, outcome = answer_logprob.astype(np.float32), outcome.astype(np.float32)

    import igpo_rewards

    rewards = igpo_rewards.turn_rewards(answer_logprob, outcome, turn_mask)
    response_mask = np.zeros((num_rollouts, num_tokens), dtype=bool)
    token_turn_index = np.full((num_rollouts, num_tokens), -1, dtype=np.int64)
    token_level_rewards = np.zeros((num_rollouts, num_tokens), dtype=np.float32)
    for row in range(num_rollouts):
        n = int(turns[row])
        observations = n if truncated[row] else n - 1
        weights = np.concatenate([rng.uniform(0.5, 1.5, n), rng.uniform(1.0, 3.0, observations)])
        used = int(num_tokens * rng.uniform(0.4, 1.0))
        lengths = np.maximum(1, np.floor(weights / weights.sum() * used)).astype(int)
        position = 0
        for turn in range(n):
            end = position + lengths[turn]
            response_mask[row, position:end] = True
            token_turn_index[row, position:end] = turn
            token_level_rewards[row, end - 1] = rewards[row, turn]
            position = end
            if turn < observations:
                position += lengths[n + turn]
        if truncated[row]:  # the outcome moves to the last observation token
            last_end = np.flatnonzero(response_mask[row])[-1]
            token_level_rewards[row, position - 1] = token_level_rewards[row, last_end]
            token_level_rewards[row, last_end] = 0.0
    group_ids = np.repeat(np.arange(num_rollouts // workload.group_size), workload.group_size).astype(np.int64)
    return Batch(answer_logprob, outcome, turn_mask, group_ids, response_mask, token_turn_index, token_level_rewards)


def to_library(batch: Batch, backend: str) -> Batch:
    """The batch as arrays of ``backend`` (CPU). JAX gets int32 ids and indices (its default int)."""
    if backend == "numpy":
        return batch
    if backend == "torch":
        import torch

        return Batch(*[torch.from_numpy(np.ascontiguousarray(array)) for array in batch])
    import jax.numpy as jnp

    return Batch(*[jnp.asarray(array.astype(np.int32) if array.dtype == np.int64 else array) for array in batch])


def to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def block(result: Any) -> Any:
    """Waits for JAX's asynchronous dispatch (a no-op for NumPy and torch CPU)."""
    if hasattr(result, "block_until_ready"):
        result.block_until_ready()
    return result


# -- results summary ------------------------------------------------------------------------------


class Recorder:
    """Collects benchmark medians during the session and writes a JSON + markdown summary."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.settings: dict[str, Any] = {}  # e.g. the torch thread count the benchmarks ran with

    def record(self, benchmark: Any, *, suite: str, workload: str, backend: str, name: str, **extra: Any) -> None:
        stats = getattr(benchmark, "stats", None)
        if stats is None or getattr(stats, "stats", None) is None:
            return  # --benchmark-disable: the code ran once, there is nothing to report
        self.rows.append(
            dict(suite=suite, workload=workload, backend=backend, name=name,
                 median_s=stats.stats.median, min_s=stats.stats.min, rounds=stats.stats.rounds, **extra)
        )

    def write(self, directory: Path) -> list[Path]:
        if not self.rows:
            return []
        directory.mkdir(parents=True, exist_ok=True)
        summary = dict(machine={**machine(), **self.settings}, mode=mode(), rows=self.rows,
                       pipelines=pipeline_table(self.rows), probes=probe_table(self.rows))
        json_path = directory / "summary.json"
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
        markdown_path = directory / "summary.md"
        markdown_path.write_text(markdown(summary))
        return [json_path, markdown_path]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = dict(
        python=sys.version.split()[0], platform=platform.platform(), processor=platform.processor(),
        cpu_count=os.cpu_count(), numpy=np.__version__,
    )
    try:
        info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__
    if "jax" in sys.modules:
        info["jax"] = sys.modules["jax"].__version__
    return info


DENSE_SUFFIX = ", group_size"
PIPELINES = (
    "igpo_advantages + broadcast_to_tokens", "igpo_advantages + broadcast_to_tokens" + DENSE_SUFFIX,
    "advantages_from_token_rewards", "advantages_from_token_rewards" + DENSE_SUFFIX,
    "igpo_advantages", "igpo_advantages" + DENSE_SUFFIX,
    "turn_index_from_response_mask",
)
LOOP_OF = {
    "igpo_advantages + broadcast_to_tokens": "loop: igpo_advantages + broadcast_to_tokens",
    "advantages_from_token_rewards": "loop: advantages_from_token_rewards",
}


def pipeline_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per workload, backend and pipeline: median, ratio to that backend's copy, speed-up over
    the loop style (scaled to the whole batch), for torch and JAX the ratio to NumPy, and for the
    ``group_size`` pipelines the ratio to the same pipeline with ``group_ids``."""
    def find(workload: str, backend: str, name: str) -> dict[str, Any] | None:
        for row in rows:
            if row["workload"] == workload and row["backend"] == backend and row["name"] == name:
                return row
        return None

    table = []
    for row in rows:
        if row["name"] not in PIPELINES:
            continue
        entry = dict(workload=row["workload"], backend=row["backend"], pipeline=row["name"],
                     median_ms=1e3 * row["median_s"])
        copy = find(row["workload"], row["backend"], "copy")
        if copy is not None:
            entry["copy_ms"] = 1e3 * copy["median_s"]
            entry["x_copy"] = row["median_s"] / copy["median_s"]
        if row["name"].endswith(DENSE_SUFFIX):
            by_ids = find(row["workload"], row["backend"], row["name"][: -len(DENSE_SUFFIX)])
            if by_ids is not None:
                entry["x_group_ids"] = row["median_s"] / by_ids["median_s"]
        loop = find(row["workload"], "python", LOOP_OF.get(row["name"], ""))
        if loop is not None:
            entry["loop_ms_whole_batch"] = 1e3 * loop["median_s"] * loop["scale"]
            entry["speedup_over_loop"] = loop["median_s"] * loop["scale"] / row["median_s"]
        numpy_row = find(row["workload"], "numpy", row["name"])
        if row["backend"] != "numpy" and numpy_row is not None:
            entry["x_numpy"] = row["median_s"] / numpy_row["median_s"]
        table.append(entry)
    order = {name: i for i, name in enumerate(PIPELINES)}
    table.sort(key=lambda e: (e["workload"], order[e["pipeline"]], e["backend"]))
    return table


WAY_C = "(c) probes folded into the old-log-prob forward (probe_layout='packed', the default)"
WAY_D = "(d) old-log-prob forward, then the probes over its KV cache (probe_layout='kv_cache')"
PROBE_WAYS = ("(a) one forward per probe", "(b) one packed forward, probes only", WAY_C, WAY_D,
              "old-log-prob forward alone")
PROBE_TOKENS = dict(zip(PROBE_WAYS, ("naive", "packed_probes", "folded", "two_pass", "old_logprob")))


def probe_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per turn count: time and tokens of each way; the extra cost of (c) and (d) over the old-log-prob
    forward against the ideal extra tokens (T x P) relative to that forward's tokens."""
    table = []
    for workload in sorted({r["workload"] for r in rows if r["suite"] == "probes"}):
        found = {r["name"]: r for r in rows if r["suite"] == "probes" and r["workload"] == workload}
        for way in PROBE_WAYS:
            if way in found:
                row = found[way]
                key = PROBE_TOKENS[way]
                table.append(dict(workload=workload, way=way, median_ms=1e3 * row["median_s"],
                                  tokens=row[key], padded_tokens=row[key + "_padded"]))
        alone = found.get(PROBE_WAYS[4])
        for way in PROBE_WAYS[2:4]:
            if way in found and alone:
                extra_time = found[way]["median_s"] / alone["median_s"] - 1.0
                ideal = alone["ideal_extra"] / alone["old_logprob"]
                table.append(dict(workload=workload, way=way.split()[0], extra_time_fraction=extra_time,
                                  ideal_extra_token_fraction=ideal, ratio_to_ideal=extra_time / ideal,
                                  probe_length=alone["probe_length"]))
        for row in rows:
            if row["suite"] == "probes_paired" and row["workload"] == workload:
                ideal = row["ideal_extra"] / row["old_logprob"]
                table.append(dict(workload=workload, way=row["name"].split()[0] + " (interleaved rounds)",
                                  extra_time_fraction=row["paired_extra_fraction"],
                                  ideal_extra_token_fraction=ideal,
                                  ratio_to_ideal=row["paired_extra_fraction"] / ideal,
                                  probe_length=row["probe_length"]))
    return table


def markdown(summary: dict[str, Any]) -> str:
    def number(value: Any, digits: int = 2) -> str:
        return "" if value is None else f"{value:,.{digits}f}"

    lines = [f"# Advantage pipeline benchmark ({summary['mode']} mode)", "", "Machine: " + ", ".join(
        f"{key} {value}" for key, value in summary["machine"].items()), ""]
    lines += ["## Advantage pipeline", "",
              "| workload | pipeline | backend | median ms | copy ms | x copy | speed-up over loop | x NumPy "
              "| x group_ids path |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for e in summary["pipelines"]:
        lines.append(
            f"| {e['workload']} | {e['pipeline']} | {e['backend']} | {number(e['median_ms'])} | "
            f"{number(e.get('copy_ms'))} | {number(e.get('x_copy'), 1)} | {number(e.get('speedup_over_loop'), 0)} | "
            f"{number(e.get('x_numpy'))} | {number(e.get('x_group_ids'))} |"
        )
    if summary["probes"]:
        lines += ["", "## Probes", "", "| turns | way | median ms | tokens | padded tokens |", "|---|---|---:|---:|---:|"]
        for e in summary["probes"]:
            if "median_ms" in e:
                lines.append(f"| {e['workload']} | {e['way']} | {number(e['median_ms'])} | {e['tokens']:,} | "
                             f"{e['padded_tokens']:,} |")
        for e in summary["probes"]:
            if "ratio_to_ideal" in e:
                lines.append(
                    f"\n{e['workload']}: {e['way']} costs {100 * e['extra_time_fraction']:.1f}% more than the old-log-prob "
                    f"forward alone; the ideal extra tokens (T x P, P = {e['probe_length']}) are "
                    f"{100 * e['ideal_extra_token_fraction']:.1f}% of its tokens: {e['ratio_to_ideal']:.2f}x the ideal.")
    targets = [r for r in summary["rows"] if r["suite"] == "probe_targets"]
    if targets:
        lines += ["", "## Probes of several targets per turn (interleaved rounds)", "",
                  "| turns | way | K | extra over the forward alone, K targets | the same, one target "
                  "| extra over one target |", "|---|---|---:|---:|---:|---:|"]
        for r in targets:
            lines.append(f"| {r['workload']} | {r['name'].split()[0]} | {r['num_targets']} | "
                         f"{100 * r['extra_over_alone']:.1f}% | {100 * r['one_target_extra_over_alone']:.1f}% | "
                         f"{100 * r['extra_over_one_target']:.1f}% |")
    loops = [r for r in summary["rows"] if r["backend"] == "python"]
    if loops:
        lines += ["", "Loop style (the float64 oracle) on one group, scaled by B / rows:", ""]
        for r in loops:
            lines.append(f"- {r['workload']} {r['name']}: {1e3 * r['median_s']:,.1f} ms on {r['rows']} rows, "
                         f"x{r['scale']:g} = {1e3 * r['median_s'] * r['scale']:,.0f} ms for the batch")
    return "\n".join(lines) + "\n"
