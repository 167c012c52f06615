"""``igpo-train experiment``: methods compared in pairs, from the same warm starts, over several seeds.

For each seed s (training seed ``--seed + s``; the world, and so the questions, the corpus
and the held-out set, is the same for every seed):

    warm-start job:  tokenizer + tiny model + warm start, its held-out eval and the step-0
                     diagnostics (``diagnostics.measure_signal``)
    one RL job per method of ``--methods`` (``methods.METHODS``, default ``methods.DEFAULT_METHODS``) from that
    warm start, the same budget and every other setting identical, e.g.:
        grpo              GRPO (outcome only): the baseline of the paired differences
        igpo              IGPO, the paper (information gain of the answer + outcome)
        igpo_subgoals     IGPO whose probes also score the gold chain's bridge entities
        igpo_no_ig        IGPO with ig_weight = 0        (the paper's "w/o IG")
        igpo_no_outcome   IGPO with outcome_weight = 0   (the paper's "w/o F1")

Each job is an ``igpo-train warm-start`` / ``igpo-train train`` child process with one thread
(``jobs.run_jobs``, ``--workers`` at once), which evaluates held-out EM/F1 every
``rl.eval_every`` steps, question by question (its warm start's evaluation is every run's step
0). Then ``experiment.json`` collects one record per (method, seed, step), every run's
per-question EM and every job's CPU seconds, and ``experiment_report.write_experiment_report``
writes report.md with its plots (the paired differences to GRPO with bootstrap intervals among them).

Directory layout::

    DIR/experiment_config.json         the base config; a re-run must match it
    DIR/configs/seed_0.igpo.json       each job's resolved config (the fields its subcommand reads)
    DIR/logs/seed_0.igpo.log           each job's output
    DIR/logs/seed_0.igpo.usage.jsonl   each job's resource use, a line per invocation (``jobs.usage_record``)
    DIR/seed_0/warm_start/             model, eval.json, metrics.jsonl, diagnostics.json
    DIR/seed_0/igpo/ ...               run directories (metrics.jsonl, evaluations.jsonl, eval.json, checkpoints/)
    DIR/experiment.json                {"records": [...], "final": [...], "step0": [...], ...}
    DIR/report.md, DIR/*.png

Resume: run the same command again. Complete jobs (their last file exists) are skipped, an
RL job continues from its latest checkpoint (``rl.checkpoint_every``; ``train``'s resume is
bit-exact), an unfinished warm start starts over. ``--methods`` is not part of the settings a
re-run must match: the same command with more methods runs only the new methods' jobs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from igpo_rewards.reference_trainer.config import RunConfig, subcommand_values, to_dict, validate_config
from igpo_rewards.reference_trainer.evaluation import encode_em
from igpo_rewards.reference_trainer.files import read_jsonl, write_text_atomic
from igpo_rewards.reference_trainer.jobs import Job, run_jobs
from igpo_rewards.reference_trainer.methods import DEFAULT_METHODS, METHODS, check_methods
from igpo_rewards.reference_trainer.report import load_eval, load_metrics

RECORD_KEYS = {
    "heldout_em": "heldout_em",
    "heldout_f1": "heldout_f1",
    "outcome_zero_variance_fraction": "zero_variance_group_fraction",
    "turn_advantage_collapse_rate": "zero_advantage_group_fraction",
    "reward_mean": "reward_mean",
    "train_em": "train_em",
    "ig_mean": "ig_mean",
    "ig_answer_mean": "ig_answer_mean",
    "ig_subgoal_mean": "ig_subgoal_mean",
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
    """The RL job's config: the warm start's, from that warm start, with ``METHODS[method]``; no
    step-0 evaluation (the warm start's eval.json is the same greedy evaluation of the same weights)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    config = warm_start_config(base, out, seed_index)
    config.init, config.model = str(seed_dir(out, seed_index) / "warm_start"), None
    config.out = str(seed_dir(out, seed_index) / method)
    config.resume = True  # a fresh start when there is no checkpoint yet
    config.rl.eval_at_start = False  # step 0 is the warm start's own evaluation
    switches = dict(METHODS[method])
    config.rl.algorithm = switches.pop("algorithm")
    config.rl.igpo = dataclasses.replace(config.rl.igpo, **switches)
    return validate_config(config)


def _job_files(out: Path, seed_index: int, name: str) -> dict[str, Path]:
    stem = f"seed_{seed_index}.{name}"
    return {"log": out / "logs" / f"{stem}.log", "usage": out / "logs" / f"{stem}.usage.jsonl"}


def plan_jobs(base: RunConfig, out: Path, seeds: int, *, methods: Sequence[str] = DEFAULT_METHODS,
              diagnose_steps: int) -> list[Job]:
    """Every job of the experiment: the warm starts first (each unblocks one job per method), then the RL runs."""
    jobs, configs = [], out / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    for seed_index in range(seeds):
        config = warm_start_config(base, out, seed_index)
        path = configs / f"seed_{seed_index}.warm_start.json"
        write_text_atomic(path, json.dumps(subcommand_values(config, "warm-start"), indent=2))
        jobs.append(Job(name=f"seed_{seed_index}/warm_start",
                        argv=("warm-start", "--config", str(path), "--diagnose-steps", str(diagnose_steps)),
                        done=Path(config.out) / "eval.json", **_job_files(out, seed_index, "warm_start")))
    for seed_index in range(seeds):
        for method in methods:
            config = method_config(base, out, seed_index, method)
            path = configs / f"seed_{seed_index}.{method}.json"
            write_text_atomic(path, json.dumps(subcommand_values(config, "train"), indent=2))
            jobs.append(Job(name=f"seed_{seed_index}/{method}", argv=("train", "--config", str(path)),
                            done=Path(config.out) / "eval.json", progress_file=Path(config.out) / "metrics.jsonl",
                            total=config.rl.steps + 1, after=(f"seed_{seed_index}/warm_start",),
                            **_job_files(out, seed_index, method)))
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


def _questions(path: Path) -> dict[str, Any] | None:
    """The per-question results of an eval.json (``evaluation.summarize``'s ``questions``), or None
    for an eval.json written before they were recorded."""
    return load_eval(path).get("questions")


def _final(run_dir: Path, *, method: str, seed: int) -> dict[str, Any]:
    result = load_eval(run_dir / "eval.json")
    row = {"method": method, "seed": seed, "step": result.get("step"), "em": result["em"], "f1": result["f1"],
           "n": result.get("n"), "by_hops": result.get("by_hops") or {}}
    if result.get("questions") is not None:
        row["em_by_question"] = encode_em(result["questions"]["em"], where=f"{run_dir / 'eval.json'}: questions.em")
    return row


def _evaluations(run_dir: Path, *, method: str, seed: int) -> list[dict[str, Any]]:
    """Every RL-step evaluation of a run, question by question (``evaluations.jsonl``; step 0 is the warm start's)."""
    path = run_dir / "evaluations.jsonl"
    if not path.is_file():
        return []
    return [{"method": method, "seed": seed, "step": record["step"],
             "em_by_question": encode_em(record["em"], where=f"{path}:{line}: em")}
            for line, record in read_jsonl(path) if record["step"] > 0]


def _check_paired(reference: dict[str, Any], path: Path) -> None:
    """A run's held-out questions must be the reference's, in the same order (ValueError naming the file)."""
    questions = _questions(path)
    if questions is not None and questions["question"] != reference["question"]:
        raise ValueError(f"{path}: its held-out questions are not those of the seed-0 warm start, in the same order: "
                         "the runs cannot be compared question by question")


def job_usage(out: Path, seeds: int, methods: Sequence[str]) -> list[dict[str, Any]]:
    """Every job's resource use summed over its invocations (``DIR/logs/*.usage.jsonl``):
    ``job``, ``seed_index``, ``kind`` ("warm_start" or the method), ``cpu_seconds``, ``wall_seconds``,
    ``invocations`` (those that returned; one killed from outside is not counted)."""
    rows = []
    for seed_index in range(seeds):
        for kind in ("warm_start", *methods):
            path = _job_files(out, seed_index, kind)["usage"]
            if not path.is_file():
                continue
            lines = [record for _, record in read_jsonl(path)]
            rows.append({"job": f"seed_{seed_index}/{kind}", "seed_index": seed_index, "kind": kind,
                         "cpu_seconds": sum(line["cpu_seconds"] for line in lines),
                         "wall_seconds": sum(line["wall_seconds"] for line in lines), "invocations": len(lines)})
    return rows


def collect(out: Path, seeds: int, base: RunConfig, *, methods: Sequence[str] = DEFAULT_METHODS,
            wall_seconds: list[float]) -> dict[str, Any]:
    """The content of experiment.json from the run directories of a complete experiment.

    Keys: ``records`` (one per (method, seed, step); held-out EM/F1 are null between
    evaluations, at step 0 the seed's warm-start evaluation, the two fractions null at step 0,
    before any update), ``final`` (each run's final evaluation, with ``by_hops`` and
    ``em_by_question``), ``evaluations`` (each run's evaluations after step 0, question by
    question), ``warm_start`` (each seed's warm-start evaluation, with ``em_by_question``),
    ``heldout`` (``question`` and ``hops`` of the held-out questions, in the order of every
    ``em_by_question``: one ``encode_em`` digit per question), ``step0`` (each seed's
    ``diagnostics.json`` when it was measured), ``jobs`` (``job_usage``: CPU and wall seconds
    per job), ``methods``, ``seeds`` (the training seeds), ``config`` (the base config) and
    ``wall_seconds`` (one entry per invocation of the command that ran jobs).

    Raises:
        ValueError: a run evaluated on other held-out questions than the seed-0 warm start.
    """
    records, final, evaluations, warm, step0 = [], [], [], [], []
    heldout = _questions(seed_dir(out, 0) / "warm_start" / "eval.json")
    for seed_index in range(seeds):
        seed = base.seed + seed_index
        directory = seed_dir(out, seed_index)
        warm_path = directory / "warm_start" / "eval.json"
        warm_eval = load_eval(warm_path)
        warm.append({"seed": seed, "em": warm_eval["em"], "f1": warm_eval["f1"], "by_hops": warm_eval.get("by_hops") or {}})
        if heldout is not None:
            _check_paired(heldout, warm_path)
            warm[-1]["em_by_question"] = encode_em(warm_eval["questions"]["em"], where=f"{warm_path}: questions.em")
        diagnostics = directory / "warm_start" / "diagnostics.json"
        if diagnostics.is_file():
            step0.append({"seed": seed, **json.loads(diagnostics.read_text(encoding="utf-8"))})
        for method in methods:
            for record in method_records(directory / method, method=method, seed=seed):
                if record["step"] == 0 and record["heldout_em"] is None:  # the run started from this warm start
                    record["heldout_em"], record["heldout_f1"] = warm_eval["em"], warm_eval["f1"]
                records.append(record)
            if heldout is not None:
                _check_paired(heldout, directory / method / "eval.json")
                evaluations += _evaluations(directory / method, method=method, seed=seed)
            final.append(_final(directory / method, method=method, seed=seed))
    experiment = {"records": records, "final": final, "warm_start": warm, "step0": step0, "methods": list(methods),
                  "seeds": [base.seed + index for index in range(seeds)], "config": to_dict(base), "wall_seconds": wall_seconds,
                  "jobs": job_usage(out, seeds, methods)}
    if heldout is not None:
        experiment["heldout"] = {"question": heldout["question"], "hops": heldout["hops"]}
        experiment["evaluations"] = evaluations
    return experiment


def run_experiment(base: RunConfig, out: Path, *, seeds: int = 5, methods: Sequence[str] = DEFAULT_METHODS, workers: int = 2,
                   diagnose_steps: int = 4, progress: bool = True) -> Path:
    """Plan, run (or resume) and report the experiment; returns the path of report.md.

    Args:
        base: the shared config (world preset, budget, hyperparameters); ``base.seed`` is seed 0's.
        out: the experiment directory.
        seeds: S, warm starts (and RL runs per method).
        methods: names of ``METHODS`` to run from every warm start; ``BASELINE`` among them.
        workers: child processes at once (one thread each).
        diagnose_steps: RL steps' worth of rollouts measured at step 0 per warm start (0 = skip).
        progress: tqdm bars.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    methods = check_methods(methods)
    validate_config(base)
    out = Path(out)
    check_or_write_base(base, out)
    timing_path = out / "timing.json"
    wall_seconds = json.loads(timing_path.read_text(encoding="utf-8")) if timing_path.is_file() else []
    started = time.perf_counter()
    jobs = plan_jobs(base, out, seeds, methods=methods, diagnose_steps=diagnose_steps)
    ran = run_jobs(jobs, workers=workers, progress=progress)
    if ran:
        wall_seconds.append(time.perf_counter() - started)
        write_text_atomic(timing_path, json.dumps(wall_seconds))
    experiment = collect(out, seeds, base, methods=methods, wall_seconds=wall_seconds)
    write_text_atomic(out / "experiment.json", json.dumps(experiment, indent=2))

    from igpo_rewards.reference_trainer.experiment_report import write_experiment_report

    return write_experiment_report(experiment, out)
