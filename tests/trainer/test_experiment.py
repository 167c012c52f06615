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
from igpo_rewards.reference_trainer.evaluation import decode_em, encode_em
from igpo_rewards.reference_trainer.experiment import check_or_write_base, collect, method_config, plan_jobs
from igpo_rewards.reference_trainer.experiment_report import (
    COLLAPSE_PLOT,
    EM_PLOT,
    HOPS_PLOT,
    PAIRED_PLOT,
    mean_curve,
    paired_results,
    question_scores,
    steps_to_reach,
    targets,
    write_experiment_report,
)
from igpo_rewards.reference_trainer.paired import paired_bootstrap
from igpo_rewards.reference_trainer.jobs import Job, JobFailed, run_jobs
from igpo_rewards.reference_trainer.methods import DEFAULT_METHODS, METHODS, check_methods

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _flatten(values, prefix=""):
    if isinstance(values, dict):
        return {key: value for name, item in values.items() for key, value in _flatten(item, f"{prefix}{name}.").items()}
    return {prefix[:-1]: values}


# --- the methods ----------------------------------------------------------------------------------


def test_methods_differ_only_in_the_switch_that_defines_them(tmp_path):
    base = preset_config("credit")
    configs = {method: _flatten(to_dict(method_config(base, tmp_path, 1, method))) for method in METHODS}
    reference = configs["igpo"]
    a2tgpo = {"rl.igpo.mode", "rl.igpo.accumulation", "rl.igpo.ig_advantage_scale"}
    expected = {"grpo": {"rl.algorithm"}, "igpo_no_ig": {"rl.igpo.ig_weight"}, "igpo_no_outcome": {"rl.igpo.outcome_weight"},
                "igpo_subgoals": {"rl.igpo.subgoal_weight"},
                "igpo_subgoals_probe": {"rl.igpo.subgoal_weight", "rl.igpo.subgoal_potential"},
                "igpo_turn_index": {"rl.igpo.mode"}, "igpo_a2tgpo": a2tgpo,
                "igpo_subgoals_a2tgpo": a2tgpo | {"rl.igpo.subgoal_weight"}, "igpo_positive": {"rl.igpo.gain_clip"}}
    assert set(expected) | {"igpo"} == set(METHODS)
    for method, switches in expected.items():
        differing = {key for key in reference if reference[key] != configs[method][key]}
        assert differing == switches | {"out"}, method
    assert (configs["igpo_no_ig"]["rl.igpo.ig_weight"], configs["igpo_no_outcome"]["rl.igpo.outcome_weight"]) == (0.0, 0.0)
    assert (configs["igpo_subgoals"]["rl.igpo.subgoal_weight"], configs["igpo_subgoals"]["rl.igpo.subgoal_potential"]) == (1.0, "running_max")
    assert configs["igpo_subgoals_probe"]["rl.igpo.subgoal_potential"] == "probe"
    assert (configs["igpo_a2tgpo"]["rl.igpo.mode"], configs["igpo_a2tgpo"]["rl.igpo.accumulation"],
            configs["igpo_a2tgpo"]["rl.igpo.ig_advantage_scale"]) == ("turn_index", "sqrt_n", 0.3)
    assert configs["igpo_positive"]["rl.igpo.gain_clip"] == "positive"
    assert reference["seed"] == base.seed + 1 and reference["init"] == str(tmp_path / "seed_1" / "warm_start")
    assert reference["threads"] == 1 and reference["resume"] is True and reference["world.preset"] == "credit"
    assert reference["rl.eval_at_start"] is False  # step 0 is the warm start's evaluation
    with pytest.raises(ValueError, match="method must be one of"):
        method_config(base, tmp_path, 0, "ppo")


def test_method_lists_are_checked():
    assert check_methods(["grpo", "igpo"]) == ("grpo", "igpo") and DEFAULT_METHODS == ("grpo", "igpo", "igpo_subgoals")
    with pytest.raises(ValueError, match=r"methods: unknown method\(s\) \['ppo'\]; the methods are igpo, grpo, "):
        check_methods(["grpo", "ppo"])
    with pytest.raises(ValueError, match=r"methods: \['igpo'\] given more than once"):
        check_methods(["grpo", "igpo", "igpo"])
    with pytest.raises(ValueError, match=r"methods must include 'grpo', the baseline of the paired differences, got \['igpo'\]"):
        check_methods(["igpo"])
    with pytest.raises(ValueError, match="methods must be a non-empty sequence"):
        check_methods("grpo")


def test_plan_runs_warm_starts_first_and_each_method_after_its_seed(tmp_path):
    methods = ("grpo", "igpo")
    jobs = plan_jobs(quick_config(preset_config("sparse")), tmp_path, 2, methods=methods, diagnose_steps=3)
    assert [job.name for job in jobs] == ["seed_0/warm_start", "seed_1/warm_start"] + [
        f"seed_{seed}/{method}" for seed in (0, 1) for method in methods]
    assert all(job.after == (f"seed_{job.name[5]}/warm_start",) for job in jobs[2:])
    assert jobs[0].argv[-2:] == ("--diagnose-steps", "3")
    assert jobs[2].usage == tmp_path / "logs" / "seed_0.grpo.usage.jsonl" and jobs[0].log == tmp_path / "logs" / "seed_0.warm_start.log"
    written = json.loads(Path(jobs[2].argv[2]).read_text())
    assert written["rl"]["algorithm"] == "grpo" and written["seed"] == 0 and written["init"] == str(tmp_path / "seed_0" / "warm_start")
    assert written["rl"]["eval_at_start"] is False


def test_per_question_em_round_trips_through_its_digit_string():
    assert encode_em([1, 0, 0, 1, 1]) == "10011" and decode_em("10011") == [1, 0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"questions.em must hold 0 or 1 per question, got \[2\]"):
        encode_em([1, 2], where="questions.em")
    with pytest.raises(ValueError, match="per-question EM must be a string of 0s and 1s"):
        decode_em("1021")


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


# --- paired differences ------------------------------------------------------------------------------

HOPS = [1, 1, 2, 2]


def _by_hops(em):
    return {str(hop): {"em": sum(int(em[i]) for i in range(4) if HOPS[i] == hop) / 2, "f1": 0.0, "n": 2} for hop in (1, 2)}


def _paired_experiment(final, *, middle="0000", warm=("1000", "0000")):
    """2 seeds x 4 questions (hops 1, 1, 2, 2); ``final``: method -> per-seed final EM strings; every
    run evaluated at steps 5 (``middle``) and 10 (final); CPU seconds for every job."""
    seeds = [0, 1]
    records, rows, evaluations = [], [], []
    for method, strings in final.items():
        for seed, em in zip(seeds, strings):
            mean = sum(map(int, em)) / 4
            records += [{"method": method, "seed": seed, "step": 0, "heldout_em": sum(map(int, warm[seed])) / 4},
                        {"method": method, "seed": seed, "step": 5, "heldout_em": 0.0, "ig_answer_mean": None if method == "grpo" else 0.25,
                         "ig_subgoal_mean": 0.5 if method == "igpo_subgoals" else None},
                        {"method": method, "seed": seed, "step": 10, "heldout_em": mean,
                         "ig_answer_mean": None if method == "grpo" else 0.125,
                         "ig_subgoal_mean": 0.25 if method == "igpo_subgoals" else None}]
            rows.append({"method": method, "seed": seed, "step": 10, "em": mean, "f1": mean, "n": 4, "by_hops": _by_hops(em),
                         "em_by_question": em})
            evaluations += [{"method": method, "seed": seed, "step": 5, "em_by_question": middle},
                            {"method": method, "seed": seed, "step": 10, "em_by_question": em}]
    cpu = {"warm_start": (500.0, 520.0), "grpo": (100.0, 110.0), "igpo": (105.0, 115.0), "igpo_subgoals": (120.0, 130.0)}
    jobs = [{"job": f"seed_{index}/{kind}", "seed_index": index, "kind": kind, "cpu_seconds": values[index],
             "wall_seconds": values[index] + 5, "invocations": 1} for kind, values in cpu.items() if kind == "warm_start" or kind in final
            for index in (0, 1)]
    return {"records": records, "final": rows, "evaluations": evaluations, "methods": list(final), "seeds": seeds,
            "warm_start": [{"seed": seed, "em": sum(map(int, em)) / 4, "f1": 0.0, "by_hops": _by_hops(em), "em_by_question": em}
                           for seed, em in zip(seeds, warm)],
            "heldout": {"question": ["q1", "q2", "q3", "q4"], "hops": HOPS}, "step0": [], "jobs": jobs,
            "config": to_dict(preset_config("credit")), "wall_seconds": [600.0]}


PAIRED = _paired_experiment({"grpo": ["1000", "0100"], "igpo": ["1100", "0100"], "igpo_subgoals": ["1011", "0111"]})
"""IGPO = GRPO but right on question 2 in seed 0; IGPO + sub-goals = GRPO plus both 2-hop questions in both seeds."""


def test_question_scores_and_paired_results_by_hand():
    final = question_scores(PAIRED, "final")
    assert final["grpo"].tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]] and final["igpo_subgoals"].tolist() == [[1, 0, 1, 1], [0, 1, 1, 1]]
    curve = question_scores(PAIRED, "curve")  # the mean of steps 5 (all wrong) and 10
    assert curve["igpo_subgoals"].tolist() == [[0.5, 0, 0.5, 0.5], [0, 0.5, 0.5, 0.5]]
    results = paired_results(PAIRED, replicates=500)
    subgoals = results["final"]["igpo_subgoals"]
    # +1 on every 2-hop question of both seeds, 0 on 1-hop: every replicate keeps 2 questions per hop -> exactly +0.5
    assert (subgoals["all"].estimate, subgoals["all"].low, subgoals["all"].high, subgoals["all"].per_seed) == (0.5, 0.5, 0.5, (0.5, 0.5))
    assert (subgoals["2"].low, subgoals["2"].high, subgoals["1"].low, subgoals["1"].high) == (1.0, 1.0, 0.0, 0.0)
    assert results["curve"]["igpo_subgoals"]["all"][:3] == (0.25, 0.25, 0.25)
    # IGPO: +1 on one 1-hop question of seed 0: the interval is paired_bootstrap's on those differences
    assert results["final"]["igpo"]["1"] == paired_bootstrap([[0, 1], [0, 0]], [1, 1], replicates=500)
    assert results["final"]["igpo"]["all"] == paired_bootstrap([[0, 1, 0, 0], [0, 0, 0, 0]], HOPS, replicates=500)
    assert paired_results(WINNING) is None and question_scores(WINNING) is None  # no per-question EM recorded


def test_the_report_gives_paired_differences_with_intervals_and_says_which_exclude_zero(tmp_path):
    text = write_experiment_report(PAIRED, tmp_path).read_text()
    lines = text.splitlines()
    assert lines[0] == "# GRPO vs IGPO vs IGPO + sub-goals: 2 seeds" and "Smoke run" not in text
    assert (tmp_path / PAIRED_PLOT).read_bytes()[:8] == PNG_SIGNATURE and f"]({PAIRED_PLOT})" in text
    igpo_1hop = paired_bootstrap([[0, 1], [0, 0]], [1, 1])
    igpo_all = paired_bootstrap([[0, 1, 0, 0], [0, 0, 0, 0]], HOPS)
    cell = lambda value: f"{100 * value.estimate:+.1f} [{100 * value.low:+.1f}, {100 * value.high:+.1f}]"  # noqa: E731
    assert "| GRPO -> | overall | 1-hop | 2-hop |" in lines
    assert "| IGPO + sub-goals | **+50.0 [+50.0, +50.0]** | +0.0 [+0.0, +0.0] | **+100.0 [+100.0, +100.0]** |" in lines
    assert f"| IGPO | {cell(igpo_all)} | {cell(igpo_1hop)} | +0.0 [+0.0, +0.0] |" in lines
    assert "| IGPO + sub-goals | overall | +50.0 | +50.0 |" in lines and "| IGPO | 1-hop | +50.0 | +0.0 |" in lines
    assert ("- Final held-out EM: **interval excludes 0** (a difference to GRPO): IGPO + sub-goals overall +50.0 [+50.0, +50.0]; "
            "IGPO + sub-goals 2-hop +100.0 [+100.0, +100.0].") in lines
    assert ("- Final held-out EM: interval includes 0 (not told apart from GRPO): "
            f"IGPO overall {cell(igpo_all)}; IGPO 1-hop {cell(igpo_1hop)}; IGPO 2-hop +0.0 [+0.0, +0.0]; "
            "IGPO + sub-goals 1-hop +0.0 [+0.0, +0.0].") in lines
    assert "### Held-out EM averaged over the evaluations after step 0 (steps 5, 10)" in lines
    assert "| IGPO + sub-goals | **+25.0 [+25.0, +25.0]** | +0.0 [+0.0, +0.0] | **+50.0 [+50.0, +50.0]** |" in lines
    assert "With 2 seeds a replicate can draw only 3 distinct sets of seeds" in text
    assert "evaluated on the same 4 held-out questions (2 of 1 hop, 2 of 2 hops)" in text
    # the warm starts' spread, the CPU budget, the credit split
    assert "| 0 | 25.0 | 50.0 | 0.0 | 0.0 |" in lines and "| range | 0.0-25.0 | 0.0-50.0 | 0.0-0.0 | 0.0-0.0 |" in lines
    assert "| mean | 12.5 | 25.0 | 0.0 | 0.0 |" in lines and "| std | 12.5 | 25.0 | 0.0 | 0.0 |" in lines
    assert "| warm start | 2 | 510 | 500-520 | 515 |" in lines and "| IGPO + sub-goals | 2 | 125 | 120-130 | 130 |" in lines
    assert "Total: 1,700 CPU seconds (0.47 CPU hours;" in text
    # per seed: 510 + 105 + 110 + 125 = 850; per RL step: 113.3 / 100 steps (the credit config's)
    assert "- each further seed: about 850 CPU seconds (a warm start and one run of every method);" in lines
    assert ("- each further 10 RL steps of every run: about 68 CPU seconds (1.1 per step of 8 questions x G = 16, "
            "evaluations included);") in lines
    assert "about 227 CPU seconds each (2 seeds x the mean RL job;" in text
    assert "| IGPO + sub-goals | +0.1875 | +0.3750 |" in lines and "| IGPO | +0.1875 | n/a |" in lines
    assert not any(line.startswith("| GRPO | +") for line in lines)  # GRPO runs no probes
    assert "## The targets" not in text
    assert "| warm start | 25.0 | 0.0 | 12.5 |" in lines  # final EM by hop count: warm start, then each method
    assert "| IGPO + sub-goals | 50.0 | 100.0 | 75.0 |" in lines


def test_the_paired_plot_draws_each_interval_and_every_seed():
    from igpo_rewards.reference_trainer.experiment_report import paired_figure

    figure = paired_figure(PAIRED, paired_results(PAIRED, replicates=200))
    assert [ax.get_title() for ax in figure.axes] == ["final held-out EM",
                                                      "held-out EM\naveraged over the evaluations after step 0"]
    assert figure.axes[0].get_ylabel() == "paired difference to GRPO (EM points)"
    ax = figure.axes[0]
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["overall", "1-hop", "2-hop"]
    means = [line for line in ax.get_lines() if line.get_gid() == "paired:IGPO + sub-goals"]
    assert len(means) == 1 and list(means[0].get_ydata()) == [50.0, 0.0, 100.0]
    seeds = [list(line.get_ydata()) for line in ax.get_lines() if line.get_gid() == "paired-seeds:IGPO + sub-goals"]
    assert seeds == [[50.0, 50.0], [0.0, 0.0], [100.0, 100.0]]
    assert any(line.get_gid() == "zero" for line in ax.get_lines())
    low, high = ax.get_ylim()
    assert low < 0 < 100 < high


def _cell(turns, mean):
    return {"turns": turns, "mean": mean, "std": 0.0, "above_threshold_fraction": 0.0}


def test_the_step0_sub_goal_table_pools_the_seeds():
    """Two seeds' sub-goal signal: per (group, hops) the turns add up and the means are weighted by them."""
    from igpo_rewards.reference_trainer.experiment_report import _subgoal_table

    def signal(own_turns, own_raw, own_max):
        groups = {name: {"all": {}, "by_hops": {}} for name in ("answer_document_first", "other_bridge_document_first", "nothing_new")}
        groups["own_document_first"] = {"all": {}, "by_hops": {"3": {"probe": _cell(own_turns, own_raw), "running_max": _cell(own_turns, own_max)}}}
        groups["answer_on_bridge_document"] = {"all": {}, "by_hops": {"3": {"probe": _cell(own_turns, 0.01)}}}
        return groups

    experiment = json.loads(json.dumps(PAIRED))
    experiment["step0"] = [{"seed": 0, "subgoal_signal": signal(10, 0.5, 0.6)}, {"seed": 1, "subgoal_signal": signal(30, 0.1, 0.2)},
                           {"seed": 2, "subgoal_signal": None}]
    lines = _subgoal_table(experiment)
    # pooled: 40 turns, raw (10 * 0.5 + 30 * 0.1) / 40 = 0.2, running max (6 + 6) / 40 = 0.3
    assert "| bridge | that bridge's document | 3 | 40 | +0.200 | +0.300 |" in lines
    assert "| answer | a bridge's document | 3 | 40 | +0.010 | n/a |" in lines
    assert _subgoal_table(PAIRED) == []  # nothing measured: no table


def _write_run(directory, questions, em_by_step, *, warm=False):
    """A run directory as the trainer writes it: eval.json (with per-question results), metrics.jsonl,
    evaluations.jsonl (RL runs: no step-0 evaluation)."""
    directory.mkdir(parents=True)
    last = max(em_by_step)
    em = em_by_step[last]
    result = {"step": last, "em": sum(em) / len(em), "f1": sum(em) / len(em), "n": len(em), "by_hops": {},
              "questions": {"question": questions, "hops": HOPS, "em": em, "f1": [float(v) for v in em]}}
    (directory / "eval.json").write_text(json.dumps(result))
    if warm:
        return
    (directory / "metrics.jsonl").write_text("".join(json.dumps({"step": step} if step == 0 else
                                                                {"step": step, "heldout_em": sum(em_by_step[step]) / 4})
                                                     + "\n" for step in (0, *em_by_step)))
    (directory / "evaluations.jsonl").write_text("".join(json.dumps({"step": step, "em": values, "f1": values}) + "\n"
                                                         for step, values in em_by_step.items()))


def test_collect_pairs_the_runs_question_by_question(tmp_path):
    questions = ["q1", "q2", "q3", "q4"]
    base = preset_config("credit")
    _write_run(tmp_path / "seed_0" / "warm_start", questions, {0: [1, 0, 0, 0]}, warm=True)
    _write_run(tmp_path / "seed_0" / "grpo", questions, {2: [1, 1, 0, 0], 4: [1, 1, 1, 0]})
    _write_run(tmp_path / "seed_0" / "igpo", questions, {2: [0, 1, 0, 0], 4: [1, 1, 1, 1]})
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "seed_0.igpo.usage.jsonl").write_text(
        json.dumps({"cpu_seconds": 10.0, "wall_seconds": 12.0}) + "\n" + json.dumps({"cpu_seconds": 5.5, "wall_seconds": 6.0}) + "\n")
    experiment = collect(tmp_path, 1, base, methods=("grpo", "igpo"), wall_seconds=[30.0])
    assert experiment["heldout"] == {"question": questions, "hops": HOPS}
    assert experiment["warm_start"][0]["em_by_question"] == "1000"
    assert [(row["method"], row["em_by_question"]) for row in experiment["final"]] == [("grpo", "1110"), ("igpo", "1111")]
    assert [(row["method"], row["step"], row["em_by_question"]) for row in experiment["evaluations"]] == [
        ("grpo", 2, "1100"), ("grpo", 4, "1110"), ("igpo", 2, "0100"), ("igpo", 4, "1111")]
    step0 = [record for record in experiment["records"] if record["step"] == 0]
    assert [record["heldout_em"] for record in step0] == [0.25, 0.25]  # the warm start's evaluation
    assert experiment["jobs"] == [{"job": "seed_0/igpo", "seed_index": 0, "kind": "igpo", "cpu_seconds": 15.5,
                                   "wall_seconds": 18.0, "invocations": 2}]
    assert experiment["methods"] == ["grpo", "igpo"]
    _write_run(tmp_path / "other" / "igpo", ["q1", "q2", "q4", "q3"], {4: [1, 1, 1, 1]})
    (tmp_path / "seed_0" / "igpo" / "eval.json").write_text((tmp_path / "other" / "igpo" / "eval.json").read_text())
    with pytest.raises(ValueError, match=r"seed_0/igpo/eval.json: its held-out questions are not those of the seed-0 warm start"):
        collect(tmp_path, 1, base, methods=("grpo", "igpo"), wall_seconds=[])


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
    rows = lines[lines.index(header):]
    assert next(line for line in rows if line.startswith("| 0 |")).startswith("| 0 | 4 | 50.0 | 25.0 | 25.0 | 0.0 | 50.0 |")
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
    plots = (EM_PLOT, HOPS_PLOT, COLLAPSE_PLOT) + ((PAIRED_PLOT,) if "heldout" in experiment else ())
    for plot in plots:
        assert f"]({plot})" in rebuilt
        assert (directory / plot).read_bytes().startswith(PNG_SIGNATURE)
    methods = {record["method"] for record in experiment["records"]}
    assert methods == set(experiment["methods"]) and methods <= set(METHODS) and "grpo" in methods
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

    broken = _json_job("broken", tmp_path / "missing.json", tmp_path / "c.json", logs, usage=logs / "broken.usage.jsonl")
    with pytest.raises(JobFailed, match=r"(?s)job broken failed \(exit 2\).*can't open"):
        run_jobs([broken], progress=False, poll_seconds=0.05)
    measured = _json_job("measured", tmp_path / "input.json", tmp_path / "m.json", logs, usage=logs / "usage" / "m.jsonl")
    run_jobs([measured], progress=False, poll_seconds=0.05)
    (usage,) = [json.loads(line) for line in (logs / "usage" / "m.jsonl").read_text().splitlines()]
    assert set(usage) == {"cpu_seconds", "user_seconds", "system_seconds", "wall_seconds", "max_rss_mb", "status"}
    assert usage["status"] is None and usage["cpu_seconds"] == usage["user_seconds"] + usage["system_seconds"] >= 0
    (failed,) = [json.loads(line) for line in (logs / "broken.usage.jsonl").read_text().splitlines()]
    assert failed["status"] == 2  # argparse's exit status, recorded before the child exits
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
    methods = DEFAULT_METHODS  # grpo, igpo, igpo_subgoals on the credit preset's quick world
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    pointers = [out / f"seed_{seed}" / method / "checkpoints" / "latest" for seed in (0, 1) for method in methods]
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
    quick = quick_config(preset_config("credit"))
    steps = quick.rl.steps
    keys = {"method", "seed", "step", "heldout_em", "heldout_f1", "outcome_zero_variance_fraction", "turn_advantage_collapse_rate"}
    assert experiment["methods"] == list(methods) and experiment["config"]["world"]["preset"] == "credit"
    assert {(r["method"], r["seed"], r["step"]) for r in experiment["records"]} == {
        (method, seed, step) for method in methods for seed in (0, 1) for step in range(steps + 1)}
    assert len(experiment["records"]) == len(methods) * 2 * (steps + 1) and all(keys <= set(r) for r in experiment["records"])
    assert all(r["heldout_em"] is not None for r in experiment["records"])  # the quick budget evaluates every step
    assert len(experiment["final"]) == 6 and experiment["seeds"] == [0, 1]
    for seed in (0, 1):  # the same warm start (the step-0 EM) for every method of a seed
        starts = {r["heldout_em"] for r in experiment["records"] if r["seed"] == seed and r["step"] == 0}
        assert starts == {experiment["warm_start"][seed]["em"]}
    # the RL runs did not evaluate step 0 again: their evaluations are steps 1 .. steps, question by question
    questions = quick.eval.max_questions
    assert len(experiment["heldout"]["question"]) == len(experiment["heldout"]["hops"]) == questions
    assert sorted((row["method"], row["seed"], row["step"]) for row in experiment["evaluations"]) == sorted(
        (method, seed, step) for method in methods for seed in (0, 1) for step in range(1, steps + 1))
    for row in experiment["final"] + experiment["warm_start"]:  # per-question EM agrees with the EM
        assert len(row["em_by_question"]) == questions and row["em"] == pytest.approx(decode_em(row["em_by_question"]).count(1) / questions)
    # sub-goal targets: only the sub-goal method probes the bridges (its case studies hold their probabilities;
    # the quick warm start's rollouts are mostly one malformed turn, so there may be no non-final turn to log a gain on)
    assert all(r["ig_subgoal_mean"] is None for r in experiment["records"] if r["method"] != "igpo_subgoals")
    for method in ("igpo", "igpo_subgoals"):
        studies = [json.loads(line) for seed in (0, 1)
                   for line in (out / f"seed_{seed}" / method / "trajectories.jsonl").read_text().splitlines()]
        probed = {len(turn.get("subgoal_probs", {})) for study in studies for turn in study["turns"]}
        expected = {study["hops"] - 1 for study in studies} - {0} if method == "igpo_subgoals" else set()
        assert studies and probed - {0} == expected, method
    # every job's CPU seconds, from the invocation that completed it (one killed from outside writes none)
    jobs = {job["job"]: job for job in experiment["jobs"]}
    assert set(jobs) == {f"seed_{seed}/{kind}" for seed in (0, 1) for kind in ("warm_start", *methods)}
    assert all(job["cpu_seconds"] > 0 and job["invocations"] == 1 for job in jobs.values())
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
    assert "## Paired differences to GRPO" in report and "| GRPO -> | overall | 1-hop | 2-hop | 3-hop | 4-hop |" in report
    assert "### Which differences lie outside their intervals" in report and (out / PAIRED_PLOT).is_file()
    assert "## Warm starts" in report and "## Budget" in report and "## The targets" not in report
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
