"""The comparison table of IGPO's two TRL paths: held-out EM before and after, per run and per path.

    python examples/trl_paths_table.py runs/trl_tools_s0 runs/trl_tools_s1 ... runs/trl_rollout_s0 ...

Each argument is an ``--output_dir`` of examples/trl_tools_igpo.py or examples/trl_search_igpo.py
(its ``heldout_em.json``). Runs are grouped by path (the script, and ``--environment`` for the
tool loop's environment variant). Printed in Markdown:

1. one row per path: the EM of each run (by seed), their mean and standard deviation (n - 1),
   the mean gain over the warm start, the mean EM by hop count and the mean F1, the rollouts;
   and the warm start's row (every run must start from the same warm start: its scores must be
   equal in every file, else the table is refused);
2. per seed that both paths ran: whether their TRL log histories (loss, reward, ``igpo/turns_mean``,
   ``igpo/information_gain_mean`` of every logged step) are identical, and else the first step
   where they differ.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

COMPARED = ("loss", "reward", "igpo/turns_mean", "igpo/information_gain_mean")


def path_of(result: dict) -> str:
    command = result["command"].split()
    script = Path(command[1]).stem
    if script == "trl_tools_igpo":
        return "TRL's tool loop (environment_factory)" if "--environment" in command else "TRL's tool loop (tools)"
    if script == "trl_search_igpo":
        return "rollout function"
    raise ValueError(f"{result['command']!r} is not a run of examples/trl_tools_igpo.py or examples/trl_search_igpo.py")


def seed_of(result: dict) -> int:
    """The run's seed (written by the examples; in older files the command's --seed, default 0)."""
    if "seed" in result:
        return int(result["seed"])
    command = result["command"].split()
    return int(command[command.index("--seed") + 1]) if "--seed" in command else 0


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _mean_std(values: list[float]) -> str:
    spread = f" ({100 * statistics.stdev(values):.1f})" if len(values) > 1 else ""
    return f"**{100 * statistics.mean(values):.1f}**{spread}"


def em_table(runs: dict[str, list[dict]], warm_start: dict) -> list[str]:
    hops = sorted(warm_start["by_hops"], key=int)
    lines = [
        f"| policy | EM by seed | EM mean (std) | EM gain | {' | '.join(f'{hop}-hop' for hop in hops)} | F1 | rollouts |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in hops) + " | --- | --- |",
        f"| warm start | | {_pct(warm_start['em'])} | | {' | '.join(_pct(warm_start['by_hops'][h]['em']) for h in hops)} | "
        f"{_pct(warm_start['f1'])} | |",
    ]
    for path, results in runs.items():
        results = sorted(results, key=seed_of)
        ems = [result["trained"]["em"] for result in results]
        by_seed = ", ".join(f"{_pct(result['trained']['em'])} (seed {seed_of(result)})" for result in results)
        by_hop = " | ".join(_pct(statistics.mean(r["trained"]["by_hops"][h]["em"] for r in results)) for h in hops)
        rollouts = sorted({result["rollouts"] for result in results})
        lines.append(
            f"| {path} | {by_seed} | {_mean_std(ems)} | {100 * (statistics.mean(ems) - warm_start['em']):+.1f} | {by_hop} | "
            f"{_pct(statistics.mean(r['trained']['f1'] for r in results))} | {', '.join(map(str, rollouts))} |"
        )
    return lines


def first_difference(a: dict, b: dict) -> str:
    logged_a = [record for record in a["log_history"] if "loss" in record]
    logged_b = [record for record in b["log_history"] if "loss" in record]
    if len(logged_a) != len(logged_b):
        return f"different numbers of logged steps ({len(logged_a)} and {len(logged_b)})"
    for record_a, record_b in zip(logged_a, logged_b):
        for key in COMPARED:
            if record_a.get(key) != record_b.get(key):
                return f"differ from step {record_a.get('step')} on ({key}: {record_a.get(key)} vs {record_b.get(key)})"
    return f"identical ({len(logged_a)} logged steps: {', '.join(COMPARED)})"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    results = [json.loads((directory / "heldout_em.json").read_text()) for directory in args.output_dirs]
    warm_starts = {json.dumps(result["warm_start"], sort_keys=True) for result in results}
    if len(warm_starts) != 1:
        raise SystemExit("the runs start from different warm starts (their warm_start scores differ); compare runs of one")
    runs: dict[str, list[dict]] = {}
    for result in results:
        runs.setdefault(path_of(result), []).append(result)
    lines = em_table(runs, results[0]["warm_start"])
    rollout = {seed_of(result): result for result in runs.get("rollout function", [])}
    pairs = [(path, result) for path, group in runs.items() if path != "rollout function" for result in group
             if seed_of(result) in rollout]
    if pairs:
        lines += ["", "| seed | path | TRL log history against the rollout function's |", "| --- | --- | --- |"]
        lines += [f"| {seed_of(result)} | {path} | {first_difference(result, rollout[seed_of(result)])} |"
                  for path, result in sorted(pairs, key=lambda pair: (seed_of(pair[1]), pair[0]))]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
