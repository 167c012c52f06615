"""``igpo-train experiment``: IGPO vs GRPO vs the paper's two ablations, over several seeds.

For each seed s (training seed ``--seed + s``; the world, and so the questions, the corpus
and the held-out set, is the same for every seed):

    warm-start job:  tokenizer + tiny model + warm start, its held-out eval and the step-0
                     diagnostics (``diagnostics.measure_signal``)
    four RL jobs from that warm start, the same budget and every other setting identical:
        igpo              IGPO (information gain + outcome)
        grpo              GRPO (outcome only)
        igpo_no_ig        IGPO with ig_weight = 0        (the paper's "w/o IG")
        igpo_no_outcome   IGPO with outcome_weight = 0   (the paper's "w/o F1")

Each job is an ``igpo-train warm-start`` / ``igpo-train train`` child process with one thread
(``jobs.run_jobs``, ``--workers`` at once), which evaluates held-out EM/F1 every
``rl.eval_every`` steps. Then ``experiment.json`` collects one record per (method, seed, step)
and ``experiment_report.write_experiment_report`` writes report.md with its plots.

Directory layout::

    DIR/experiment_config.json         the base config; a re-run must match it
    DIR/configs/seed_0.igpo.json       each job's resolved config (the fields its subcommand reads)
    DIR/logs/seed_0.igpo.log           each job's output
    DIR/seed_0/warm_start/             model, eval.json, metrics.jsonl, diagnostics.json
    DIR/seed_0/igpo/ ...               run directories (metrics.jsonl, eval.json, checkpoints/)
    DIR/experiment.json                {"records": [...], "final": [...], "step0": [...], ...}
    DIR/report.md, DIR/*.png

Resume: run the same command again. Complete jobs (their last file exists) are skipped, an
RL job continues from its latest checkpoint (``rl.checkpoint_every``; ``train``'s resume is
bit-exact), an unfinished warm start starts over.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from igpo_rewards.reference_trainer.config import RunConfig, subcommand_values, to_dict, validate_config
from igpo_rewards.reference_trainer.files import write_text_atomic
from igpo_rewards.reference_trainer.jobs import Job, run_jobs
from igpo_rewards.reference_trainer.report import load_eval, load_metrics

METHODS: dict[str, dict[str, Any]] = {
    "igpo": {"algorithm": "igpo"},
    "grpo": {"algorithm": "grpo"},
    "igpo_no_ig": {"algorithm": "igpo", "ig_weight": 0.0},
    "igpo_no_outcome": {"algorithm": "igpo", "outcome_weight": 0.0},
}
"""Method name -> what defines it: ``rl.algorithm`` and the ``rl.igpo`` (``IGPOSettings``) values
it changes; everything else is the base config's."""

RECORD_KEYS = {
    "heldout_em": "heldout_em",
    "heldout_f1": "heldout_f1",
    "outcome_zero_variance_fraction": "zero_variance_group_fraction",
    "turn_advantage_collapse_rate": "zero_advantage_group_fraction",
    "reward_mean": "reward_mean",
    "train_em": "train_em",
    "ig_mean": "ig_mean",
}
"""experiment.json record key -> the metrics.jsonl key it is read from (None where not logged)."""

_IGNORED_WHEN_RESUMING = ("progress", "threads", "resume", "out")


def seed_dir(out: Path, seed_index: int) -> Path:
    return out / f"seed_{seed_index}"


def warm_start_config(base: RunConfig, out: Path, seed_index: int) -> RunConfig:
    """The warm-start job's config: the base with ``seed + seed_index``, one thread, no bars."""
    config = copy.deepcopy(base)
    config.seed = base.seed + seed_index
    config.out = str(seed_dir(out, seed_index) / "warm_start")
    config.threads, config.progress, config.resume = 1, False, False
    return config


def method_config(base: RunConfig, out: Path, seed_index: int, method: str) -> RunConfig:
    """The RL job's config: the warm start's, from that warm start, with ``METHODS[method]``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    config = warm_start_config(base, out, seed_index)
    config.init, config.model = str(seed_dir(out, seed_index) / "warm_start"), None
    config.out = str(seed_dir(out, seed_index) / method)
    config.resume = True  # a fresh start when there is no checkpoint yet
    switches = dict(METHODS[method])
    config.rl.algorithm = switches.pop("algorithm")
    config.rl.igpo = dataclasses.replace(config.rl.igpo, **switches)
    return validate_config(config)


def plan_jobs(base: RunConfig, out: Path, seeds: int, *, diagnose_steps: int) -> list[Job]:
    """Every job of the experiment: the warm starts first (they unblock four jobs each), then the RL runs."""
    jobs, configs = [], out / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    for seed_index in range(seeds):
        config = warm_start_config(base, out, seed_index)
        path = configs / f"seed_{seed_index}.warm_start.json"
        write_text_atomic(path, json.dumps(subcommand_values(config, "warm-start"), indent=2))
        jobs.append(Job(name=f"seed_{seed_index}/warm_start",
                        argv=("warm-start", "--config", str(path), "--diagnose-steps", str(diagnose_steps)),
                        log=out / "logs" / f"seed_{seed_index}.warm_start.log", done=Path(config.out) / "eval.json"))
    for seed_index in range(seeds):
        for method in METHODS:
            config = method_config(base, out, seed_index, method)
            path = configs / f"seed_{seed_index}.{method}.json"
            write_text_atomic(path, json.dumps(subcommand_values(config, "train"), indent=2))
            jobs.append(Job(name=f"seed_{seed_index}/{method}", argv=("train", "--config", str(path)),
                            log=out / "logs" / f"seed_{seed_index}.{method}.log", done=Path(config.out) / "eval.json",
                            progress_file=Path(config.out) / "metrics.jsonl", total=config.rl.steps + 1,
                            after=(f"seed_{seed_index}/warm_start",)))
    return jobs


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in _IGNORED_WHEN_RESUMING}


def check_or_write_base(base: RunConfig, out: Path) -> None:
    """Write DIR/experiment_config.json, or check that a re-run uses the same settings.

    Raises:
        ValueError: DIR holds an experiment with other settings (the message lists them).
    """
    path = out / "experiment_config.json"
    current = to_dict(base)
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        old, new = _comparable(previous), _comparable(current)
        differing = sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
        if differing:
            details = "; ".join(f"{key}: {json.dumps(old.get(key))[:200]} -> {json.dumps(new.get(key))[:200]}" for key in differing)
            raise ValueError(f"{out} holds an experiment with other settings ({details}); "
                             "give the same flags to resume it, or another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(current, indent=2))


def method_records(run_dir: Path, *, method: str, seed: int) -> list[dict[str, Any]]:
    """One record per logged step of a run: ``method``, ``seed``, ``step`` and ``RECORD_KEYS``."""
    records = []
    for metrics in load_metrics(Path(run_dir) / "metrics.jsonl"):
        record = {"method": method, "seed": seed, "step": metrics["step"]}
        record.update({key: metrics.get(source) for key, source in RECORD_KEYS.items()})
        records.append(record)
    return records


def _final(run_dir: Path, *, method: str, seed: int) -> dict[str, Any]:
    result = load_eval(run_dir / "eval.json")
    return {"method": method, "seed": seed, "step": result.get("step"), "em": result["em"], "f1": result["f1"],
            "n": result.get("n"), "by_hops": result.get("by_hops") or {}}


def collect(out: Path, seeds: int, base: RunConfig, *, wall_seconds: list[float]) -> dict[str, Any]:
    """The content of experiment.json from the run directories of a complete experiment.

    Keys: ``records`` (one per (method, seed, step); held-out EM/F1 are null between
    evaluations, the two fractions null at step 0, before any update), ``final`` (each run's
    final evaluation, with ``by_hops``), ``warm_start`` (each seed's warm-start evaluation),
    ``step0`` (each seed's ``diagnostics.json`` when it was measured), ``methods``, ``seeds``
    (the training seeds), ``config`` (the base config) and ``wall_seconds`` (one entry per
    invocation of the command that ran jobs).
    """
    records, final, warm, step0 = [], [], [], []
    for seed_index in range(seeds):
        seed = base.seed + seed_index
        directory = seed_dir(out, seed_index)
        warm_eval = load_eval(directory / "warm_start" / "eval.json")
        warm.append({"seed": seed, "em": warm_eval["em"], "f1": warm_eval["f1"], "by_hops": warm_eval.get("by_hops") or {}})
        diagnostics = directory / "warm_start" / "diagnostics.json"
        if diagnostics.is_file():
            step0.append({"seed": seed, **json.loads(diagnostics.read_text(encoding="utf-8"))})
        for method in METHODS:
            records += method_records(directory / method, method=method, seed=seed)
            final.append(_final(directory / method, method=method, seed=seed))
    return {"records": records, "final": final, "warm_start": warm, "step0": step0, "methods": list(METHODS),
            "seeds": [base.seed + index for index in range(seeds)], "config": to_dict(base), "wall_seconds": wall_seconds}


def run_experiment(base: RunConfig, out: Path, *, seeds: int = 3, workers: int = 2, diagnose_steps: int = 4,
                   progress: bool = True) -> Path:
    """Plan, run (or resume) and report the experiment; returns the path of report.md.

    Args:
        base: the shared config (world preset, budget, hyperparameters); ``base.seed`` is seed 0's.
        out: the experiment directory.
        seeds: S, warm starts (and RL runs per method).
        workers: child processes at once (one thread each).
        diagnose_steps: RL steps' worth of rollouts measured at step 0 per warm start (0 = skip).
        progress: tqdm bars.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    validate_config(base)
    out = Path(out)
    check_or_write_base(base, out)
    timing_path = out / "timing.json"
    wall_seconds = json.loads(timing_path.read_text(encoding="utf-8")) if timing_path.is_file() else []
    started = time.perf_counter()
    jobs = plan_jobs(base, out, seeds, diagnose_steps=diagnose_steps)
    ran = run_jobs(jobs, workers=workers, progress=progress)
    if ran:
        wall_seconds.append(time.perf_counter() - started)
        write_text_atomic(timing_path, json.dumps(wall_seconds))
    experiment = collect(out, seeds, base, wall_seconds=wall_seconds)
    write_text_atomic(out / "experiment.json", json.dumps(experiment, indent=2))

    from igpo_rewards.reference_trainer.experiment_report import write_experiment_report

    return write_experiment_report(experiment, out)
