"""``igpo-train experiment``: the methods' configs, the analysis behind the targets, the report, the
job runner, and the quick pipeline end to end with a kill and a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from igpo_rewards.reference_trainer.config import preset_config, quick_config, to_dict
from igpo_rewards.reference_trainer.diagnostics import IG_GROUPS, outcome_groups
from igpo_rewards.reference_trainer.experiment import METHODS, check_or_write_base, method_config, plan_jobs
from igpo_rewards.reference_trainer.experiment_report import (
    COLLAPSE_PLOT,
    EM_PLOT,
    HOPS_PLOT,
    mean_curve,
    steps_to_reach,
    targets,
    write_experiment_report,
)
from igpo_rewards.reference_trainer.jobs import Job, JobFailed, run_jobs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _flatten(values, prefix=""):
    if isinstance(values, dict):
        return {key: value for name, item in values.items() for key, value in _flatten(item, f"{prefix}{name}.").items()}
    return {prefix[:-1]: values}


# --- the four methods --------------------------------------------------------------------------------


def test_methods_differ_only_in_the_switch_that_defines_them(tmp_path):
    base = preset_config("sparse")
    configs = {method: _flatten(to_dict(method_config(base, tmp_path, 1, method))) for method in METHODS}
    reference = configs["igpo"]
    expected = {"grpo": {"rl.algorithm"}, "igpo_no_ig": {"rl.igpo.ig_weight"}, "igpo_no_outcome": {"rl.igpo.outcome_weight"}}
    for method, switches in expected.items():
        differing = {key for key in reference if reference[key] != configs[method][key]}
        assert differing == switches | {"out"}, method
    assert (configs["igpo_no_ig"]["rl.igpo.ig_weight"], configs["igpo_no_outcome"]["rl.igpo.outcome_weight"]) == (0.0, 0.0)
    assert reference["seed"] == base.seed + 1 and reference["init"] == str(tmp_path / "seed_1" / "warm_start")
    assert reference["threads"] == 1 and reference["resume"] is True and reference["world.preset"] == "sparse"
    with pytest.raises(ValueError, match="method must be one of"):
        method_config(base, tmp_path, 0, "ppo")


def test_plan_runs_warm_starts_first_and_each_method_after_its_seed(tmp_path):
    jobs = plan_jobs(quick_config(preset_config("sparse")), tmp_path, 2, diagnose_steps=3)
    assert [job.name for job in jobs] == ["seed_0/warm_start", "seed_1/warm_start"] + [
        f"seed_{seed}/{method}" for seed in (0, 1) for method in METHODS]
    assert all(job.after == (f"seed_{job.name[5]}/warm_start",) for job in jobs[2:])
    assert jobs[0].argv[-2:] == ("--diagnose-steps", "3")
    written = json.loads(Path(jobs[3].argv[2]).read_text())
    assert written["rl"]["algorithm"] == "grpo" and written["seed"] == 0 and written["init"] == str(tmp_path / "seed_0" / "warm_start")


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    base = preset_config("sparse")
    check_or_write_base(base, tmp_path)
    again = preset_config("sparse")
    again.progress, again.threads = False, 4  # presentation and threads may change between invocations
    check_or_write_base(again, tmp_path)
    other = preset_config("sparse")
    other.rl.learning_rate = 3e-4
    with pytest.raises(ValueError, match=r"holds an experiment with other settings \(rl: .*0\.0003"):
        check_or_write_base(other, tmp_path)


# --- analysis ------------------------------------------------------------------------------------------


def _record(method, seed, step, em, collapse=None):
    return {"method": method, "seed": seed, "step": step, "heldout_em": em, "heldout_f1": em,
            "outcome_zero_variance_fraction": collapse, "turn_advantage_collapse_rate": collapse}


def _experiment(curves, finals_by_hops):
    """curves: method -> seed -> [em at steps 0, 5, 10]; finals_by_hops: method -> seed -> [em per hop 1..2]."""
    records = [_record(method, seed, 5 * index, em, None if index == 0 else 0.5)
               for method, seeds in curves.items() for seed, values in seeds.items() for index, em in enumerate(values)]
    records += [{**_record(method, seed, 7, None, 0.25)} for method, seeds in curves.items() for seed in seeds]
    final = [{"method": method, "seed": seed, "step": 10, "em": values[-1], "f1": values[-1], "n": 4,
              "by_hops": {str(hop + 1): {"em": em, "f1": em, "n": 2} for hop, em in enumerate(finals_by_hops[method][seed])}}
             for method, seeds in curves.items() for seed, values in seeds.items()]
    return {"records": records, "final": final, "methods": list(curves), "seeds": [0, 1],
            "warm_start": [{"seed": seed, "em": 0.25, "f1": 0.25, "by_hops": {}} for seed in (0, 1)],
            "step0": [], "config": to_dict(preset_config("sparse")), "wall_seconds": [61.0]}


WINNING = _experiment(
    {"igpo": {0: [0.25, 0.5, 0.75], 1: [0.25, 0.5, 0.5]},
     "grpo": {0: [0.25, 0.25, 0.5], 1: [0.25, 0.25, 0.25]},
     "igpo_no_ig": {0: [0.25, 0.25, 0.5], 1: [0.25, 0.5, 0.25]},
     "igpo_no_outcome": {0: [0.25, 0.25, 0.25], 1: [0.25, 0.25, 0.25]}},
    {"igpo": {0: [1.0, 0.5], 1: [0.75, 0.25]}, "grpo": {0: [0.75, 0.25], 1: [0.5, 0.0]},
     "igpo_no_ig": {0: [0.75, 0.25], 1: [0.5, 0.0]}, "igpo_no_outcome": {0: [0.5, 0.0], 1: [0.5, 0.0]}},
)


def test_mean_curve_and_steps_to_reach():
    assert mean_curve({0: {0: 0.25, 5: 0.5}, 1: {0: 0.75, 5: 1.0, 10: 1.0}}) == [(0, 0.5, 0.25, 0.75), (5, 0.75, 0.5, 1.0)]
    assert mean_curve({}) == []
    curve = [(0, 0.2, 0.0, 0.0), (5, 0.4, 0.0, 0.0), (10, 0.4, 0.0, 0.0)]
    assert steps_to_reach(curve, 0.4) == 5 and steps_to_reach(curve, 0.2) == 0 and steps_to_reach(curve, 0.5) is None


def test_targets_by_hand():
    result = targets(WINNING)
    # GRPO's final mean EM = (0.5 + 0.25) / 2 = 0.375; mean curves: IGPO 0.25, 0.5, 0.625; GRPO 0.25, 0.25, 0.375
    assert result["grpo_final_mean_em"] == 0.375
    assert result["steps_to_grpo_final"] == {"igpo": 5, "grpo": 10, "igpo_no_ig": 5, "igpo_no_outcome": None}
    assert result["half_steps"] == {"igpo_steps": 5, "grpo_steps": 10, "met": True, "reason": ""}
    assert result["above_every_seed"] == {"margins": {0: 0.25, 1: 0.25}, "met": True}
    assert result["beats_ablations"] == {"igpo": 0.625, "igpo_no_ig": 0.375, "igpo_no_outcome": 0.25, "met": True}

    tie = json.loads(json.dumps(WINNING))
    for row in tie["final"]:
        if row["method"] == "igpo" and row["seed"] == 1:
            row["em"] = 0.25  # level with GRPO in seed 1
    tied = targets(tie)
    assert tied["above_every_seed"]["met"] is False and tied["above_every_seed"]["margins"][1] == 0.0
    flat = json.loads(json.dumps(WINNING))
    for record in flat["records"]:
        if record["method"] == "grpo" and record["heldout_em"] is not None:
            record["heldout_em"] = 0.25
    for row in flat["final"]:
        row["em"] = 0.25 if row["method"] == "grpo" else row["em"]
    half = targets(flat)["half_steps"]  # GRPO never improved on the warm start: no step count to halve
    assert (half["igpo_steps"], half["grpo_steps"], half["met"]) == (0, 0, None)
    assert half["reason"].startswith("GRPO's final mean EM (25.0) is already reached at step 0, by the warm start")


def test_report_tables_and_plots(tmp_path):
    report = write_experiment_report(WINNING, tmp_path)
    text = report.read_text()
    for plot in (EM_PLOT, HOPS_PLOT, COLLAPSE_PLOT):
        assert (tmp_path / plot).read_bytes()[:8] == PNG_SIGNATURE and f"]({plot})" in text
    assert text.count("**met**") == 3 and "**not met**" not in text
    assert "(IGPO: step 5, GRPO: step 10; evaluation steps only)" in text
    assert "seed 0: +25.0, seed 1: +25.0 points" in text
    # the ablation table: final EM by hop count, mean over seeds, Avg. over hop columns
    assert "| IGPO (F1 + IG) | 87.5 | 37.5 | 62.5 |" in text
    assert "| w/o F1 (IG only) | 50.0 | 0.0 | 25.0 |" in text
    assert "| IGPO | 62.5 | 12.5 | 75.0 | 50.0 | 62.5 |" in text  # EM mean, std, per seed, F1 mean
    assert "| warm start | 25.0 | 0.0 | 25.0 | 25.0 | 25.0 |" in text
    assert "| IGPO | 25.0 | 50.0 | 62.5 |" in text  # the mean curve at steps 0, 5, 10 (step 7 has no EM)
    assert "Wall time: 1.0 min" in text
    assert "Smoke run" not in text


def _degenerate(em):
    """Every method, seed and step at the same EM ``em`` (a quick run's 0.0, or equal curves)."""
    flat = json.loads(json.dumps(WINNING))
    for record in flat["records"]:
        if record["heldout_em"] is not None:
            record["heldout_em"] = em
    for row in flat["final"]:
        row["em"] = em
        row["by_hops"] = {hop: {**scores, "em": em} for hop, scores in row["by_hops"].items()}
    return flat


@pytest.mark.parametrize("em", [0.0, 0.25])
def test_degenerate_targets_do_not_contradict_themselves(tmp_path, em):
    """When every curve is flat at the warm start (every EM 0.0 in a quick run, or equal curves),
    "half the steps" has no step count to halve: the line says why instead of "not met (IGPO:
    step 0, GRPO: step 0)"; ties are not "above" and say so."""
    experiment = _degenerate(em)
    result = targets(experiment)
    assert result["half_steps"]["met"] is None and result["above_every_seed"]["met"] is False
    assert result["beats_ablations"]["met"] is False
    lines = write_experiment_report(experiment, tmp_path).read_text().splitlines()
    half = next(line for line in lines if line.startswith("- IGPO reaches GRPO's final mean EM"))
    assert half == (f"- IGPO reaches GRPO's final mean EM ({100 * em:.1f}) in at most half of GRPO's steps: **not applicable**: "
                    f"GRPO's final mean EM ({100 * em:.1f}) is already reached at step 0, by the warm start: RL did not raise "
                    "it, so there is no step count to halve.")
    above = next(line for line in lines if line.startswith("- IGPO ends above GRPO in every seed"))
    assert above.startswith("- IGPO ends above GRPO in every seed: **not met** (tied in every seed) (IGPO - GRPO final EM by seed: "
                            "seed 0: +0.0, seed 1: +0.0 points)")
    never = json.loads(json.dumps(WINNING))  # GRPO's curve never reaches its own final mean (the final is off the curve)
    never["final"] = [{**row, "em": 0.9} if row["method"] == "grpo" else row for row in never["final"]]
    assert targets(never)["half_steps"]["met"] is None and "never reaches its own final mean EM" in targets(never)["half_steps"]["reason"]


def test_a_quick_experiment_report_says_it_is_a_smoke_run(tmp_path):
    quick = json.loads(json.dumps(_degenerate(0.0)))
    quick["config"] = to_dict(quick_config(preset_config("sparse")))
    lines = write_experiment_report(quick, tmp_path).read_text().splitlines()
    assert lines[2].startswith("> **Smoke run** (2 RL steps, 150 SFT steps of a model built from scratch: the quick budget, "
                               "too small to learn; the numbers only show that the pipeline runs): every number below")


def _step0_row(seed, outcomes):
    gains = {name: {"turns": 0, "mean": None} for name in IG_GROUPS}
    return {"seed": seed, "groups": [{"hops": 1, "outcomes": group} for group in outcomes], "information_gain": gains,
            # what the diagnostics of the time wrote: "all wrong" = every outcome <= 0, wider than zero-variance
            "outcome_zero_variance_fraction": 0.5, "all_wrong_group_fraction": 0.75, "all_right_group_fraction": 0.25}


def test_the_step0_table_splits_zero_variance_groups_and_defines_its_columns(tmp_path):
    experiment = json.loads(json.dumps(WINNING))
    experiment["step0"] = [_step0_row(0, [[0.0, 0.0], [-2.0, 0.0], [1.0, 1.0], [-2.0, 0.0]])]
    lines = write_experiment_report(experiment, tmp_path).read_text().splitlines()
    header = next(line for line in lines if line.startswith("| seed | groups |"))
    assert header.startswith("| seed | groups | zero-variance (%) | all wrong (%) | all right (%) | equal partial (%) | "
                             "all failed, outcomes differ (%) |")
    # recomputed from the groups: zero-variance 2 of 4 = all wrong 1 + all right 1; the two mixed failures apart
    assert next(line for line in lines if line.startswith("| 0 |")).startswith("| 0 | 4 | 50.0 | 25.0 | 25.0 | 0.0 | 50.0 |")
    for name in ("zero-variance (%)", "all wrong (%)", "all right (%)", "equal partial (%)", "all failed, outcomes differ (%)"):
        assert any(line.startswith(f"- **{name}**: ") for line in lines), name


def _data(line):
    return list(line.get_xdata()), list(line.get_ydata())


def test_the_experiment_plots_show_every_seed_a_band_per_method_and_fit_the_data():
    """Inspected as matplotlib objects: per method a min-max band, its mean, and each seed as a
    labelled thin line of the method's colour; y-limits fitted to the data; integer step ticks."""
    from matplotlib.colors import to_rgba

    from igpo_rewards.reference_trainer.experiment_report import LABELS, collapse_figure, em_figure, hops_figure

    figure = em_figure(WINNING)
    assert [ax.get_title() for ax in figure.axes] == [LABELS[method] for method in WINNING["methods"]]  # one panel each
    for ax, method in zip(figure.axes, WINNING["methods"]):
        label = LABELS[method]
        bands = [artist for artist in ax.collections if artist.get_gid() == f"band:{label}"]
        assert len(bands) == 1 and bands[0].get_label() == f"{label}: min-max of 2 seeds"
        mean = [line for line in ax.get_lines() if line.get_gid() == f"mean:{label}"]
        seeds = [line for line in ax.get_lines() if str(line.get_gid()).startswith(f"seed:{label}:")]
        assert len(mean) == 1 and [line.get_label() for line in seeds] == [f"{label}, seed 0", f"{label}, seed 1"]
        for line in seeds:  # the method's colour, thinner and lighter than its mean
            assert to_rgba(line.get_color())[:3] == to_rgba(mean[0].get_color())[:3]
            assert line.get_linewidth() < mean[0].get_linewidth() and line.get_alpha() < 1
        values = [100 * v for seed in (0, 1) for v in {"igpo": [0.25, 0.5, 0.75, 0.5], "grpo": [0.25, 0.5]}.get(method, [])]
        assert ax.get_ylim()[0] > 15 and ax.get_ylim()[1] < 80  # the data are 25-75 %: not a 0-100 axis
        if method == "igpo":
            assert _data(seeds[0]) == ([0, 5, 10], [25.0, 50.0, 75.0]) and _data(mean[0]) == ([0, 5, 10], [25.0, 50.0, 62.5])
            low, high = ax.get_ylim()
            assert low < min(values) and high > max(values)
        ticks = [tick for tick in ax.get_xticks() if ax.get_xlim()[0] <= tick <= ax.get_xlim()[1]]
        assert ticks == [0, 5, 10]
    assert len({ax.get_ylim() for ax in figure.axes}) == 1  # one y-axis for the row: panels compare at a glance
    collapse = collapse_figure(WINNING)
    assert len(collapse.axes) == 2 * len(WINNING["methods"])  # a row per quantity
    assert all(any(str(c.get_gid()).startswith("band:") for c in ax.collections) for ax in collapse.axes)
    hops = hops_figure(WINNING)
    dots = [line for line in hops.axes[0].get_lines() if line.get_gid() == "seeds:IGPO"]
    assert sorted(value for line in dots for value in line.get_ydata()) == [25.0, 50.0, 75.0, 100.0]
    assert hops.axes[0].get_ylim()[1] < 110


# --- the job runner ------------------------------------------------------------------------------------


def _json_job(name, source, target, logs, **kwargs):
    """A light child: ``python -m json.tool SOURCE TARGET`` (fails when SOURCE is missing)."""
    return Job(name, (str(source), str(target)), logs / f"{name}.log", done=target, module="json.tool", **kwargs)


DOCS_EXPERIMENTS = Path(__file__).resolve().parents[2] / "docs" / "experiments"


@pytest.mark.parametrize("name", sorted(path.name for path in DOCS_EXPERIMENTS.iterdir() if path.is_dir()))
def test_the_reports_in_docs_are_what_their_experiment_json_gives(name, tmp_path):
    """docs/experiments/NAME/report.md (below its header comment) is the report that
    write_experiment_report writes from the experiment.json committed next to it, and every
    plot it shows is there: the published tables cannot drift from the measured records."""
    directory = DOCS_EXPERIMENTS / name
    experiment = json.loads((directory / "experiment.json").read_text(encoding="utf-8"))
    rebuilt = write_experiment_report(experiment, tmp_path).read_text(encoding="utf-8")
    published = (directory / "report.md").read_text(encoding="utf-8")
    assert published.startswith("<!--"), "the published report keeps its header (the command that made it)"
    assert published.split("-->", 1)[1].lstrip("\n") == rebuilt
    for plot in (EM_PLOT, HOPS_PLOT, COLLAPSE_PLOT):
        assert f"]({plot})" in rebuilt
        assert (directory / plot).read_bytes().startswith(PNG_SIGNATURE)
    methods = {record["method"] for record in experiment["records"]}
    assert methods == set(METHODS)
    for row in experiment["step0"]:  # the outcome split is that of the recorded groups: all wrong within zero-variance
        split = outcome_groups([group["outcomes"] for group in row["groups"]])
        assert {key: row[key] for key in split} == split
        assert row["all_wrong_group_fraction"] + row["all_right_group_fraction"] <= row["outcome_zero_variance_fraction"]
    assert {record["seed"] for record in experiment["records"]} == set(experiment["seeds"])


def test_run_jobs_order_skip_and_failure(tmp_path):
    logs = tmp_path / "logs"
    (tmp_path / "input.json").write_text('{"a": [1, 2]}')
    first = _json_job("first", tmp_path / "input.json", tmp_path / "a.json", logs)
    second = _json_job("second", tmp_path / "a.json", tmp_path / "b.json", logs, after=("first",))  # reads first's output
    assert run_jobs([second, first], workers=2, progress=False, poll_seconds=0.05) == ["first", "second"]
    assert json.loads((tmp_path / "b.json").read_text()) == {"a": [1, 2]}
    assert run_jobs([first, second], workers=2, progress=False) == []  # complete jobs are skipped
    assert (logs / "first.log").read_text().startswith(f"$ python -m json.tool {tmp_path / 'input.json'}")
    assert Job("x", ("report",), logs / "x.log", tmp_path / "x").module == "igpo_rewards.reference_trainer.cli"

    broken = _json_job("broken", tmp_path / "missing.json", tmp_path / "c.json", logs)
    with pytest.raises(JobFailed, match=r"(?s)job broken failed \(exit 2\).*can't open"):
        run_jobs([broken], progress=False, poll_seconds=0.05)
    silent = Job("silent", (str(tmp_path / "input.json"),), logs / "silent.log", done=tmp_path / "never.json", module="json.tool")
    with pytest.raises(JobFailed, match=r"job silent failed \(exit 0\)"):  # exited without writing its done file
        run_jobs([silent], progress=False, poll_seconds=0.05)
    with pytest.raises(ValueError, match=r"job 'x' waits for unknown job\(s\) \['nope'\]"):
        run_jobs([Job("x", ("report",), tmp_path / "x.log", tmp_path / "x", after=("nope",))])
    with pytest.raises(ValueError, match=r"job names must be unique"):
        run_jobs([first, first])
    with pytest.raises(ValueError, match="workers must be an int >= 1, got 0"):
        run_jobs([], workers=0)


# --- end to end: experiment --quick, killed, resumed ---------------------------------------------------


def _processes_writing_into(directory):
    """PIDs of processes with a file under ``directory`` open (the jobs hold their log open)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                targets = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
            except OSError:
                continue
            if any(target.startswith(str(directory) + os.sep) for target in targets):
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="looks for orphans through /proc")
def test_quick_experiment_killed_then_resumed(tmp_path):
    out = tmp_path / "experiment"
    command = [sys.executable, "-m", "igpo_rewards.reference_trainer.cli", "experiment", "--quick", "--seeds", "2",
               "--out", str(out), "--no-progress", "--diagnose-steps", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    pointers = [out / f"seed_{seed}" / method / "checkpoints" / "latest" for seed in (0, 1) for method in METHODS]
    while not any(pointer.is_file() for pointer in pointers):
        assert process.poll() is None, "the experiment ended before it could be killed"
        assert time.monotonic() < deadline, "no RL checkpoint after 600 s"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)  # the parent only: its children must die with it
    process.wait()
    killed_at = time.time()
    for _ in range(200):
        if not _processes_writing_into(out):
            break
        time.sleep(0.05)
    assert _processes_writing_into(out) == [], "a child outlived the killed experiment"
    unfinished = [pointer.parents[1] for pointer in pointers if pointer.is_file() and not (pointer.parents[1] / "eval.json").is_file()]
    assert unfinished, "every started RL run had finished before the kill"
    assert not (out / "experiment.json").exists()

    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    experiment = json.loads((out / "experiment.json").read_text())
    steps = quick_config(preset_config("sparse")).rl.steps
    keys = {"method", "seed", "step", "heldout_em", "heldout_f1", "outcome_zero_variance_fraction", "turn_advantage_collapse_rate"}
    assert {(r["method"], r["seed"], r["step"]) for r in experiment["records"]} == {
        (method, seed, step) for method in METHODS for seed in (0, 1) for step in range(steps + 1)}
    assert len(experiment["records"]) == len(METHODS) * 2 * (steps + 1) and all(keys <= set(r) for r in experiment["records"])
    assert all(r["heldout_em"] is not None for r in experiment["records"])  # the quick budget evaluates every step
    assert len(experiment["final"]) == 8 and experiment["seeds"] == [0, 1]
    for seed in (0, 1):  # the same warm start (the step-0 EM) for every method of a seed
        starts = {r["heldout_em"] for r in experiment["records"] if r["seed"] == seed and r["step"] == 0}
        assert starts == {experiment["warm_start"][seed]["em"]}
    # step 0 from each warm start: the zero-variance fraction is that of the recorded outcomes
    for row in experiment["step0"]:
        same = [len(set(group["outcomes"])) == 1 for group in row["groups"]]
        assert row["outcome_zero_variance_fraction"] == pytest.approx(sum(same) / len(same))
        parts = row["all_wrong_group_fraction"] + row["all_right_group_fraction"] + row["equal_partial_group_fraction"]
        assert parts == pytest.approx(row["outcome_zero_variance_fraction"])
        assert row["outcome_zero_variance_fraction"] >= 0.5
    assert len(experiment["step0"]) == 2
    # resumed, not redone: the interrupted runs continued from their checkpoint, one record per step
    for run_dir in unfinished:
        log = out / "logs" / f"{run_dir.parent.name}.{run_dir.name}.log"
        assert log.read_text().count("$ igpo-train train") == 2
        assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == list(range(steps + 1))
        assert (run_dir / "checkpoints" / "step_000001" / "model.safetensors").stat().st_mtime < killed_at  # not redone
    assert (out / "logs" / "seed_0.warm_start.log").read_text().count("$ igpo-train warm-start") == 1
    report = (out / "report.md").read_text()
    assert "## The targets" in report and "| IGPO (F1 + IG) |" in report
    assert report.splitlines()[2].startswith("> **Smoke run** (2 RL steps, 150 SFT steps of a model built from scratch")
    for name in ("warm_start", "igpo"):  # each child's config file holds only what its subcommand reads
        child = json.loads((out / "configs" / f"seed_0.{name}.json").read_text())
        assert ("tiny" in child) == (name == "warm_start") and ("init" in child) == (name == "igpo")


@pytest.mark.parametrize("name", sorted(path.name for path in DOCS_EXPERIMENTS.iterdir() if path.is_dir()))
def test_igpo_train_report_rebuilds_a_published_report(name, tmp_path):
    """`igpo-train report --experiment DIR/experiment.json` (the documented command) rebuilds the
    published report.md, its header comment kept, and writes the three plots next to it."""
    from igpo_rewards.reference_trainer.cli import main

    for file in ("experiment.json", "report.md"):
        (tmp_path / file).write_bytes((DOCS_EXPERIMENTS / name / file).read_bytes())
    assert main(["report", "--experiment", str(tmp_path / "experiment.json")]) == 0
    assert (tmp_path / "report.md").read_text() == (DOCS_EXPERIMENTS / name / "report.md").read_text()
    for plot in (EM_PLOT, HOPS_PLOT, COLLAPSE_PLOT):
        assert (tmp_path / plot).read_bytes().startswith(PNG_SIGNATURE)
