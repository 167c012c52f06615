"""Profile of RL steps of the reference trainer on the demo's configuration (a script, not a test).

    python tests/benchmarks/step_profile.py --init RUN/warm_start --steps 4 --algorithm igpo --seed 0

Loads the warm start twice (policy and frozen reference, as ``igpo-train train`` does), builds the
demo's world (``RunConfig().world``) and BM25 retriever, and runs ``training.rl_step`` ``--steps``
times on ``training.examples_for_step`` with the demo's ``RLConfig`` (one torch thread). For
every step it prints one JSON line: wall seconds per phase (generation, retrieval, probes + old
log-probs, reference forward, PPO update, the step) and the process's CPU seconds per phase
(``time.process_time``, which the other jobs of a shared machine disturb far less than wall
time), then the peak resident memory.

It also runs on an older checkout (``PYTHONPATH=OLD_CHECKOUT python tests/benchmarks/step_profile.py``):
the phases are found by the names each version's ``training`` module calls (the generation
function, the scoring forward, whose first call of a step is the probes + old log-probs and
the second the reference, and ``ppo_update``). docs/benchmarks.md gives the before/after numbers
this script measured, and how.

    python tests/benchmarks/step_profile.py --summarize before=before_1.jsonl,before_2.jsonl after=after_1.jsonl,after_2.jsonl

prints the median over all steps of each group's files (per phase, CPU and wall) and the ratios
of the first group to the others.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from igpo_rewards.agent.bm25 import BM25Retriever
from igpo_rewards.reference_trainer import training
from igpo_rewards.reference_trainer.config import RLConfig, RunConfig
from igpo_rewards.reference_trainer.modeling import load_pretrained
from igpo_rewards.reference_trainer.world import build_world

# (phase, name in training): this version's names, then the previous version's
PHASES = (
    ("generation", ("rollout_examples", "generate_rollouts")),
    ("scoring", ("score_batch", "score_trajectories")),
    ("update", ("ppo_update",)),
)


def instrument(cpu: dict[str, list[float]]) -> None:
    """Wrap the phase functions of ``training`` so each call adds its CPU seconds to ``cpu``."""
    for phase, names in PHASES:
        name = next(name for name in names if hasattr(training, name))
        function = getattr(training, name)

        def timed(*args, _function=function, _phase=phase, **kwargs):
            started = time.process_time()
            try:
                return _function(*args, **kwargs)
            finally:
                cpu[_phase].append(time.process_time() - started)

        setattr(training, name, timed)


def summarize(groups: list[str]) -> None:
    """Print, for each ``LABEL=FILE,FILE,...`` group of this script's outputs, the median over all
    their steps of every phase (CPU and wall seconds), the median peak RSS, and the ratios of the
    first group to each other (the docs/benchmarks.md table)."""
    medians: dict[str, dict[str, float]] = {}
    for group in groups:
        label, _, files = group.partition("=")
        lines = [json.loads(line) for path in files.split(",") for line in open(path, encoding="utf-8")]
        steps = [line for line in lines if "step" in line]
        row = {}
        for kind in ("cpu", "wall"):
            for phase in ("generation", "probes", "reference", "update", "reference_and_update", "step"):
                values = [step[kind].get(phase) for step in steps]
                if all(value is not None for value in values):
                    row[f"{kind} {phase}"] = statistics.median(values)
        row["peak_rss_mib"] = statistics.median(line["peak_rss_mib"] for line in lines if "peak_rss_mib" in line)
        medians[label] = row
        print(label, f"({len(steps)} steps)", json.dumps({key: round(value, 2) for key, value in row.items()}))
    first, *others = medians
    for other in others:
        ratios = {key: round(value / medians[other][key], 2) for key, value in medians[first].items() if key in medians[other]}
        print(f"{first} / {other}", json.dumps(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summarize", nargs="+", metavar="LABEL=FILE,...", help="summarize earlier outputs and exit")
    parser.add_argument("--init", help="warm-start model directory (save_pretrained layout)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--algorithm", default="igpo", choices=("igpo", "grpo"))
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    if arguments.summarize:
        summarize(arguments.summarize)
        return
    if not arguments.init:
        parser.error("--init is required (unless --summarize)")
    torch.set_num_threads(1)
    run = RunConfig()
    world = build_world(run.world.seed, num_train=run.world.num_train, num_heldout=run.world.num_heldout,
                        num_countries=run.world.num_countries, cities_per_country=run.world.cities_per_country,
                        num_organisations=run.world.num_organisations)
    retriever = BM25Retriever(world.corpus)
    policy, tokenizer = load_pretrained(arguments.init)
    reference, _ = load_pretrained(arguments.init)
    reference.requires_grad_(False)
    config = RLConfig(algorithm=arguments.algorithm)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    cpu: dict[str, list[float]] = {phase: [] for phase, _ in PHASES}
    instrument(cpu)
    torch.manual_seed(arguments.seed)
    for step in range(1, arguments.steps + 1):
        for values in cpu.values():
            values.clear()
        examples = training.examples_for_step(world.train, step, config.questions_per_step, arguments.seed)
        started = time.process_time()
        metrics = training.rl_step(policy, reference, tokenizer, optimizer, retriever, examples, config).metrics
        step_cpu = time.process_time() - started
        reference_wall = metrics.get("seconds_reference")  # older versions counted it in seconds_update
        print(json.dumps({
            "step": step,
            "wall": {
                "generation": metrics["seconds_rollout"], "retrieval": metrics["seconds_retrieval"],
                "probes": metrics["seconds_probes"], "reference": reference_wall,
                "update": metrics["seconds_update"] if reference_wall is not None else None,
                "reference_and_update": metrics["seconds_update"] + (reference_wall or 0.0), "step": metrics["seconds_step"],
            },
            "cpu": {
                "generation": sum(cpu["generation"]), "probes": cpu["scoring"][0],
                "reference": sum(cpu["scoring"][1:]), "update": sum(cpu["update"]), "step": step_cpu,
            },
            "turns_mean": metrics["turns_mean"], "reward_mean": metrics["reward_mean"],
        }), flush=True)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


if __name__ == "__main__":
    main()
