"""The experiment's report: report.md with plots and tables from experiment.json.

``write_experiment_report(experiment, out_dir)`` reads only the dict that ``experiment.collect``
writes to experiment.json (so a report can be rebuilt from that one file) and writes:

- ``experiment_paired.png`` (when experiment.json holds per-question EM): each method's paired
  difference to GRPO, overall and per hop count, with its 95% bootstrap interval and a dot per
  seed (``plots.paired_differences_figure``), for the final EM and for the EM averaged over the
  evaluations after step 0;
- ``experiment_em.png``: held-out EM vs RL step, one axes per method: the mean over seeds, the
  min-max band of the seeds, every seed as a thin line, the other methods' means in grey
  (``plots.seed_curves_figure``);
- ``experiment_hops.png``: final held-out EM by hop count per method (bars: mean over seeds;
  whiskers: lowest to highest seed; a dot per seed);
- ``experiment_collapse.png``: the turn-advantage collapse rate and the outcome zero-variance
  fraction over RL steps, the same way as the EM plot (a row each);
- ``report.md``: a smoke-run notice when the budget is the quick one (``config.budget_note``),
  the setup and the budget (CPU seconds per job), the paired differences to GRPO (``paired``:
  two-way bootstrap over seeds and questions within hop count) with a plain list of the
  differences whose interval excludes 0 and of those whose interval does not, the warm starts'
  spread, the sparse experiment's targets (when its four methods ran), the step-0 sparsity
  (``diagnostics.outcome_groups``, each column defined) and probe signal, final EM/F1 per method
  (mean, std, every seed), EM by hop count, the ablation table in the paper's layout (when the
  ablations ran), where the information gain went (answer vs sub-goal targets) and the plots.

The analysis functions (``mean_curve``, ``steps_to_reach``, ``targets``, ``question_scores``,
``paired_results``) are pure and tested.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from igpo_rewards.reference_trainer import plots
from igpo_rewards.reference_trainer.config import budget_note
from igpo_rewards.reference_trainer.evaluation import decode_em
from igpo_rewards.reference_trainer.methods import BASELINE, METHODS
from igpo_rewards.reference_trainer.paired import LEVEL, REPLICATES, PairedInterval, paired_differences, seed_multisets
from igpo_rewards.reference_trainer.diagnostics import IG_GROUPS, outcome_groups
from igpo_rewards.reference_trainer.report import _table

EM_PLOT = "experiment_em.png"
HOPS_PLOT = "experiment_hops.png"
COLLAPSE_PLOT = "experiment_collapse.png"
PAIRED_PLOT = "experiment_paired.png"

LABELS = {"igpo": "IGPO", "grpo": "GRPO", "igpo_no_ig": "IGPO w/o IG", "igpo_no_outcome": "IGPO w/o outcome",
          "igpo_subgoals": "IGPO + sub-goals", "igpo_subgoals_probe": "IGPO + sub-goals (raw probe)",
          "igpo_turn_index": "IGPO, turn-index pools", "igpo_a2tgpo": "IGPO, A2TGPO normalization",
          "igpo_subgoals_a2tgpo": "IGPO + sub-goals, A2TGPO normalization", "igpo_positive": "IGPO, positive IG"}
"""Display names of the methods (every name of ``methods.METHODS``)."""

TARGET_METHODS = ("igpo", "grpo", "igpo_no_ig", "igpo_no_outcome")
"""The methods the sparse experiment's targets compare (their section appears when all four ran)."""

ABLATION_ROWS = (("igpo", "IGPO (F1 + IG)"), ("igpo_no_ig", "w/o IG (F1 only)"), ("igpo_no_outcome", "w/o F1 (IG only)"),
                 ("grpo", "GRPO (F1, outcome only)"))
"""The ablation table's rows, in the paper's order, then the GRPO baseline."""


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------


def per_seed_curves(records: Sequence[dict], key: str) -> dict[str, dict[int, dict[int, float]]]:
    """method -> seed -> step -> value, for the records where ``key`` is not null."""
    curves: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for record in records:
        if record.get(key) is not None:
            curves[record["method"]][record["seed"]][record["step"]] = float(record[key])
    return curves


def mean_curve(seed_curves: dict[int, dict[int, float]]) -> list[tuple[int, float, float, float]]:
    """``(step, mean, min, max)`` over seeds at every step that every seed logged (``plots.mean_band``).

    Example:
        >>> mean_curve({0: {0: 0.2, 5: 0.4}, 1: {0: 0.4, 5: 0.8, 7: 1.0}})
        [(0, 0.30000000000000004, 0.2, 0.4), (5, 0.6000000000000001, 0.4, 0.8)]
    """
    return plots.mean_band(seed_curves)


def steps_to_reach(curve: Sequence[tuple[int, float, float, float]], target: float, *, tolerance: float = 1e-9) -> int | None:
    """The first step of a ``mean_curve`` whose mean is at least ``target`` (None if none is).

    Example:
        >>> steps_to_reach([(0, 0.1, 0, 0), (5, 0.3, 0, 0), (10, 0.5, 0, 0)], 0.3)
        5
    """
    for step, mean, _, _ in curve:
        if mean >= target - tolerance:
            return step
    return None


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _std(values: Sequence[float]) -> float:
    mean = _mean(values)
    return math.sqrt(sum((value - mean) ** 2 for value in values) / len(values))


def final_scores(experiment: dict, metric: str = "em") -> dict[str, dict[int, float]]:
    """method -> seed -> final held-out ``metric`` ("em" or "f1")."""
    scores: dict[str, dict[int, float]] = defaultdict(dict)
    for row in experiment["final"]:
        scores[row["method"]][row["seed"]] = float(row[metric])
    return scores


def _half_steps(igpo_steps: int | None, grpo_steps: int | None, grpo_final: float) -> dict[str, Any]:
    """The "half the steps" target: ``met`` True / False, or None (not applicable) with the reason."""
    result = {"igpo_steps": igpo_steps, "grpo_steps": grpo_steps, "met": None, "reason": ""}
    if grpo_steps is None:
        result["reason"] = ("GRPO's mean curve never reaches its own final mean EM (its final evaluation is not on the "
                            "curve), so there is no step count to halve")
    elif grpo_steps == 0:
        result["reason"] = (f"GRPO's final mean EM ({100 * grpo_final:.1f}) is already reached at step 0, by the warm "
                            "start: RL did not raise it, so there is no step count to halve")
    else:
        result["met"] = igpo_steps is not None and igpo_steps <= grpo_steps / 2
    return result


def targets(experiment: dict) -> dict[str, Any]:
    """The issue's three targets, measured on held-out EM.

    - ``half_steps``: IGPO reaches GRPO's final mean EM (mean over seeds) in at most half of
      the steps GRPO needs to reach it (``igpo_steps <= grpo_steps / 2``). Not applicable
      (``met`` None, with a ``reason``) when GRPO reaches its final mean at step 0 (RL did not
      raise it: equal curves, or every EM 0) or never on its curve: there is no count to halve;
    - ``above_every_seed``: IGPO's final EM is above GRPO's in every seed (a tie is not above);
    - ``beats_ablations``: IGPO's final mean EM is above both ablations' (F1 + IG beats F1 only
      and IG only; a tie does not beat).

    Returns a dict with the numbers behind each check and ``met`` for each.
    """
    em = final_scores(experiment, "em")
    curves = {method: mean_curve(seeds) for method, seeds in per_seed_curves(experiment["records"], "heldout_em").items()}
    grpo_final = _mean(list(em["grpo"].values()))
    reach = {method: steps_to_reach(curves.get(method, []), grpo_final) for method in experiment["methods"]}
    seeds = sorted(em["igpo"])
    margins = {seed: em["igpo"][seed] - em["grpo"][seed] for seed in seeds}
    means = {method: _mean(list(values.values())) for method, values in em.items()}
    ablations = {method: means[method] for method in ("igpo_no_ig", "igpo_no_outcome") if method in means}
    return {
        "grpo_final_mean_em": grpo_final,
        "steps_to_grpo_final": reach,
        "half_steps": _half_steps(reach.get("igpo"), reach.get("grpo"), grpo_final),
        "above_every_seed": {"margins": margins, "met": bool(margins) and all(margin > 0 for margin in margins.values())},
        "beats_ablations": {"igpo": means["igpo"], **ablations,
                            "met": bool(ablations) and all(means["igpo"] > value for value in ablations.values())},
        "final_mean_em": means,
    }


ENDPOINTS = {
    "final": "final held-out EM",
    "curve": "held-out EM averaged over the evaluations after step 0",
}
"""The paired comparison's endpoints: the primary (the final evaluation) and the secondary (the mean
over a run's evaluations after step 0, an area under the learning curve: a method that learns
faster shows there even when every method ends at the same ceiling)."""


def question_scores(experiment: dict, endpoint: str = "final") -> dict[str, np.ndarray] | None:
    """method -> [S, N] per-question EM of ``endpoint`` (seeds in ``experiment["seeds"]`` order,
    questions in ``experiment["heldout"]`` order), or None when experiment.json holds no
    per-question EM (experiments run before it was recorded).

    ``"final"``: each run's final evaluation. ``"curve"``: the mean over the evaluation steps after
    step 0 that every run logged (step 0 is the shared warm start).
    """
    if "heldout" not in experiment:
        return None
    seeds, methods = experiment["seeds"], experiment["methods"]
    if endpoint == "final":
        rows = {(row["method"], row["seed"]): decode_em(row["em_by_question"]) for row in experiment["final"]}
        return {method: np.array([rows[method, seed] for seed in seeds], dtype=np.float64) for method in methods}
    if endpoint != "curve":
        raise ValueError(f"endpoint must be one of {tuple(ENDPOINTS)}, got {endpoint!r}")
    steps = curve_steps(experiment)
    if not steps:
        return None
    per_run: dict[tuple[str, int], dict[int, list[int]]] = defaultdict(dict)
    for row in experiment["evaluations"]:
        if row["step"] in steps:
            per_run[row["method"], row["seed"]][row["step"]] = decode_em(row["em_by_question"])
    return {method: np.array([np.mean([per_run[method, seed][step] for step in steps], axis=0) for seed in seeds])
            for method in methods}


def curve_steps(experiment: dict) -> list[int]:
    """The evaluation steps after step 0 that every run logged (the ``"curve"`` endpoint's)."""
    per_run: dict[tuple[str, int], set[int]] = defaultdict(set)
    for row in experiment.get("evaluations") or []:
        per_run[row["method"], row["seed"]].add(row["step"])
    runs = [per_run[method, seed] for method in experiment["methods"] for seed in experiment["seeds"]]
    return sorted(set.intersection(*runs)) if runs and all(runs) else []


def paired_results(experiment: dict, *, replicates: int = REPLICATES) -> dict[str, dict[str, dict[str, PairedInterval]]] | None:
    """endpoint -> method -> cell ("all", "1", ...) -> ``paired.PairedInterval`` of the method's
    paired difference to ``BASELINE`` (``paired.paired_differences``: two-way bootstrap, seed 0),
    or None when experiment.json holds no per-question EM or no baseline."""
    if "heldout" not in experiment or BASELINE not in experiment["methods"]:
        return None
    hops = experiment["heldout"]["hops"]
    results = {}
    for endpoint in ENDPOINTS:
        scores = question_scores(experiment, endpoint)
        if scores is not None:
            results[endpoint] = paired_differences(scores, hops, baseline=BASELINE, replicates=replicates)
    return results


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _percent_series(experiment: dict, key: str) -> dict[str, dict[int, dict[int, float]]]:
    """method -> seed -> step -> 100 * ``key`` (a fraction in the records)."""
    curves = per_seed_curves(experiment["records"], key)
    return {method: {seed: {step: 100 * value for step, value in curve.items()} for seed, curve in seeds.items()}
            for method, seeds in curves.items()}


def em_figure(experiment: dict) -> Any:
    """Held-out EM over RL steps per method (``plots.seed_curves_figure``)."""
    panel = plots.Panel(_percent_series(experiment, "heldout_em"), "held-out EM", "EM (%)", empty="no held-out evaluation logged")
    return plots.seed_curves_figure([panel], methods=experiment["methods"], labels=LABELS)


def hops_figure(experiment: dict) -> Any:
    """Final held-out EM by hop count per method: bars, seed range, a dot per seed."""
    scores: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in experiment["final"]:
        for hop, values in row["by_hops"].items():
            scores[row["method"]][str(hop)][row["seed"]] = 100 * float(values["em"])
    return plots.hop_bars_figure(scores, methods=experiment["methods"], labels=LABELS)


def collapse_figure(experiment: dict) -> Any:
    """The turn-advantage collapse rate and the outcome zero-variance fraction over RL steps per method."""
    panels = [plots.Panel(_percent_series(experiment, "turn_advantage_collapse_rate"), "turn advantages all 0", "groups (%)",
                          empty="no collapse rate logged"),
              plots.Panel(_percent_series(experiment, "outcome_zero_variance_fraction"), "outcomes all equal", "groups (%)",
                          empty="no zero-variance fraction logged")]
    return plots.seed_curves_figure(panels, methods=experiment["methods"], labels=LABELS)


def _label(method: str) -> str:
    return LABELS.get(method, method)


def paired_figure(experiment: dict, results: dict[str, dict[str, dict[str, PairedInterval]]]) -> Any:
    """The paired differences to GRPO in EM points, one panel per endpoint (``plots.paired_differences_figure``)."""
    panels = []
    for endpoint, methods in results.items():
        cells = {method: {cell: (100 * value.estimate, 100 * value.low, 100 * value.high, [100 * v for v in value.per_seed])
                          for cell, value in by_cell.items()} for method, by_cell in methods.items()}
        panels.append(plots.PairedPanel(cells, ENDPOINTS[endpoint].replace(" averaged over", "\naveraged over"),
                                        f"paired difference to {_label(BASELINE)} (EM points)"))
    return plots.paired_differences_figure(panels, labels=LABELS, baseline=_label(BASELINE))


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _hop_scores(experiment: dict) -> dict[str, dict[str, list[float]]]:
    """method -> hop count -> final EM of every seed."""
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in experiment["final"]:
        for hop, values in row["by_hops"].items():
            scores[row["method"]][str(hop)].append(float(values["em"]))
    return scores


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _final_table(experiment: dict) -> list[str]:
    em, f1 = final_scores(experiment, "em"), final_scores(experiment, "f1")
    seeds = experiment["seeds"]
    header = ["method", "EM mean", "EM std", *[f"EM seed {seed}" for seed in seeds], "F1 mean"]
    rows = []
    for method in experiment["methods"]:
        values = [em[method][seed] for seed in seeds if seed in em[method]]
        rows.append([LABELS.get(method, method), _pct(_mean(values)), _pct(_std(values)),
                     *[_pct(em[method].get(seed)) for seed in seeds], _pct(_mean(list(f1[method].values())))])
    warm = experiment.get("warm_start") or []
    if warm:
        values = {row["seed"]: row["em"] for row in warm}
        rows.insert(0, ["warm start", _pct(_mean(list(values.values()))), _pct(_std(list(values.values()))),
                        *[_pct(values.get(seed)) for seed in seeds], _pct(_mean([row["f1"] for row in warm]))])
    return _table(header, rows)


def _curve_table(experiment: dict) -> list[str]:
    curves = {method: mean_curve(seeds) for method, seeds in per_seed_curves(experiment["records"], "heldout_em").items()}
    steps = sorted({point[0] for curve in curves.values() for point in curve})
    rows = []
    for method in experiment["methods"]:
        means = {point[0]: point[1] for point in curves.get(method, [])}
        rows.append([LABELS.get(method, method), *[_pct(means.get(step)) for step in steps]])
    return _table(["mean held-out EM (%) at step", *[str(step) for step in steps]], rows)


def _ablation_table(experiment: dict) -> list[str]:
    scores = _hop_scores(experiment)
    hops = sorted({hop for table in scores.values() for hop in table}, key=int)
    rows = []
    for method, label in ABLATION_ROWS:
        if method not in experiment["methods"]:
            continue
        means = [_mean(scores[method][hop]) if scores[method][hop] else None for hop in hops]
        present = [value for value in means if value is not None]
        rows.append([label, *[_pct(value) for value in means], _pct(_mean(present) if present else None)])
    return _table(["Method (EM)", *[f"{hop}-hop" for hop in hops], "Avg."], rows)


STEP0_COLUMNS = (
    ("groups", "questions of the first RL steps, G rollouts each"),
    ("zero-variance (%)", "groups whose G outcomes are all equal: GRPO's advantages are 0 for the whole group; "
                          "= all wrong + all right + equal partial F1"),
    ("all wrong (%)", "zero-variance groups whose common outcome is <= 0: every rollout scored F1 0, or every rollout "
                      "got the format penalty -2.0"),
    ("all right (%)", "zero-variance groups whose common outcome is 1: every rollout answered perfectly"),
    ("equal partial (%)", "zero-variance groups whose common outcome is strictly between 0 and 1"),
    ("all failed, outcomes differ (%)", "every outcome <= 0 but not all equal (F1 0 next to the format penalty): no "
                                        "rollout answered right, yet GRPO's advantages are not 0; not zero-variance"),
)
"""The step-0 table's outcome columns and their definitions (``diagnostics.outcome_groups``), printed under the table."""


def _step0_row(row: dict) -> list[str]:
    """One seed's cells: the outcome split recomputed from its groups' outcomes, then the IG groups."""
    split = outcome_groups([group["outcomes"] for group in row["groups"]])
    cells = [str(row["seed"]), str(len(row["groups"]))]
    cells += [_pct(split[key]) for key in ("outcome_zero_variance_fraction", "all_wrong_group_fraction",
                                           "all_right_group_fraction", "equal_partial_group_fraction",
                                           "all_failed_outcomes_differ_fraction")]
    for name in IG_GROUPS:
        group = row["information_gain"][name]
        cells.append("n/a" if not group["turns"] else f"{group['mean']:+.3f} (n = {group['turns']})")
    return cells


def _step0_table(experiment: dict) -> list[str]:
    rows = [_step0_row(row) for row in experiment.get("step0") or []]
    if not rows:
        return ["Not measured (the warm starts ran without --diagnose-steps)."]
    header = ["seed", *[name for name, _ in STEP0_COLUMNS], *[f"IG: {name.replace('_', ' ')}" for name in IG_GROUPS]]
    definitions = ["", "Columns (fractions of the groups; an outcome is the answer's F1, or -2.0 for a malformed response):", ""]
    definitions += [f"- **{name}**: {meaning}." for name, meaning in STEP0_COLUMNS]
    return _table(header, rows) + definitions


def _count(number: int, noun: str) -> str:
    """``"1 seed"``, ``"5 seeds"``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _interval(value: PairedInterval) -> str:
    text = f"{_points(value.estimate)} [{_points(value.low)}, {_points(value.high)}]"
    return f"**{text}**" if value.excludes_zero else text


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _cell_name(cell: str) -> str:
    return "overall" if cell == "all" else f"{cell}-hop"


def _paired_tables(experiment: dict, results: dict[str, dict[str, PairedInterval]]) -> list[str]:
    """The differences with intervals (one row per method, a column per cell) and the per-seed differences."""
    cells = list(next(iter(results.values())))
    rows = [[_label(method), *[_interval(by_cell[cell]) for cell in cells]] for method, by_cell in results.items()]
    lines = _table([f"{_label(BASELINE)} ->", *[_cell_name(cell) for cell in cells]], rows)
    seeds = experiment["seeds"]
    per_seed = [[_label(method), _cell_name(cell), *[_points(value) for value in by_cell[cell].per_seed]]
                for method, by_cell in results.items() for cell in cells]
    return lines + ["", "Per seed (the method's EM minus GRPO's in that seed, points):", "",
                    *_table(["method", "questions", *[f"seed {seed}" for seed in seeds]], per_seed)]


def _verdict_lines(results: dict[str, dict[str, dict[str, PairedInterval]]]) -> list[str]:
    """Which differences lie outside their interval's reach of 0 and which do not, for every endpoint."""
    lines = []
    for endpoint, methods in results.items():
        outside = [f"{_label(method)} {_cell_name(cell)} {_interval(value).strip('*')}"
                   for method, by_cell in methods.items() for cell, value in by_cell.items() if value.excludes_zero]
        inside = [f"{_label(method)} {_cell_name(cell)} {_interval(value)}"
                  for method, by_cell in methods.items() for cell, value in by_cell.items() if not value.excludes_zero]
        name = _sentence(ENDPOINTS[endpoint])
        lines += [f"- {name}: **interval excludes 0** (a difference to GRPO): "
                  + ("; ".join(outside) if outside else "none") + ".",
                  f"- {name}: interval includes 0 (not told apart from GRPO): "
                  + ("; ".join(inside) if inside else "none") + "."]
    return lines


def _paired_section(experiment: dict, results: dict[str, dict[str, dict[str, PairedInterval]]] | None) -> list[str]:
    if results is None:
        return ["Not recorded: this experiment.json holds no per-question EM (it was run before the experiment recorded "
                "it), so the runs cannot be paired question by question; the tables below compare means over seeds.", ""]
    seeds, count = len(experiment["seeds"]), len(experiment["heldout"]["hops"])
    per_hop = defaultdict(int)
    for hop in experiment["heldout"]["hops"]:
        per_hop[hop] += 1
    steps = curve_steps(experiment)
    lines = [f"Every method starts from each seed's warm start and is evaluated on the same {count} held-out questions ("
             + ", ".join(f"{per_hop[hop]} of {_count(hop, 'hop')}" for hop in sorted(per_hop)) + "), so each (seed, question) pairs a "
             "method's EM with GRPO's. A cell is the method's EM minus GRPO's in points (mean over the "
             f"{_count(seeds, 'seed')} x the questions) and, in brackets, its {100 * LEVEL:.0f}% interval from a two-way bootstrap "
             f"({REPLICATES:,} replicates, each drawing {_count(seeds, 'seed')} with replacement and, independently, the questions of "
             "each hop count with replacement; numpy `default_rng(0)`; `paired.paired_bootstrap`). **A difference is "
             "reported as a difference when its interval excludes 0** (bold); no correction for the "
             f"{sum(len(by_cell) for by_cell in next(iter(results.values())).values())} comparisons per endpoint is made. "
             f"With {_count(seeds, 'seed')} a replicate can draw only {_count(seed_multisets(seeds), 'distinct set')} of seeds, so the seed "
             "part of an interval is coarse: read the per-seed differences too.", ""]
    for endpoint, methods in results.items():
        title = _sentence(ENDPOINTS[endpoint])
        if endpoint == "curve":
            title += f" (steps {', '.join(map(str, steps))})"
        lines += [f"### {title}", "", *_paired_tables(experiment, methods), ""]
    lines += ["### Which differences lie outside their intervals", "", *_verdict_lines(results), "",
              f"![paired differences to GRPO]({PAIRED_PLOT})", ""]
    return lines


def _hop_keys(rows: Sequence[dict]) -> list[str]:
    return sorted({hop for row in rows for hop in row["by_hops"]}, key=int)


def _spread(values: Sequence[float]) -> list[str]:
    return [_pct(_mean(values)), _pct(_std(values)), f"{_pct(min(values))}-{_pct(max(values))}"]


def _warm_start_table(experiment: dict) -> list[str]:
    """Each seed's warm start (EM overall and per hop count), then the mean, std and range over seeds."""
    warm = experiment.get("warm_start") or []
    if not warm:
        return ["Not recorded."]
    hops = _hop_keys(warm)
    rows = [[str(row["seed"]), _pct(row["em"]), *[_pct(row["by_hops"][hop]["em"]) if hop in row["by_hops"] else "n/a"
                                                  for hop in hops], _pct(row["f1"])] for row in warm]
    columns = [[row["em"] for row in warm], *[[row["by_hops"][hop]["em"] for row in warm if hop in row["by_hops"]]
                                              for hop in hops], [row["f1"] for row in warm]]
    stats = [_spread(values) for values in columns]
    for index, name in enumerate(("mean", "std", "range")):
        rows.append([name, *[cells[index] for cells in stats]])
    return _table(["seed", "EM", *[f"{hop}-hop" for hop in hops], "F1"], rows)


def _budget_lines(experiment: dict) -> list[str]:
    """CPU seconds per kind of job (``experiment.job_usage``), and what each method that did not run would cost."""
    jobs = experiment.get("jobs") or []
    if not jobs:
        return ["CPU seconds: not recorded (the experiment ran before they were)."]
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for job in jobs:
        by_kind[job["kind"]].append(job)
    rows = []
    for kind in ("warm_start", *experiment["methods"]):
        if by_kind.get(kind):
            cpu = [job["cpu_seconds"] for job in by_kind[kind]]
            rows.append(["warm start" if kind == "warm_start" else _label(kind), str(len(cpu)), f"{_mean(cpu):,.0f}",
                         f"{min(cpu):,.0f}-{max(cpu):,.0f}", f"{_mean([job['wall_seconds'] for job in by_kind[kind]]):,.0f}"])
    total = sum(job["cpu_seconds"] for job in jobs)
    rl = [job["cpu_seconds"] for job in jobs if job["kind"] != "warm_start"]
    lines = _table(["job", "jobs", "CPU s (mean)", "CPU s (min-max)", "wall s (mean)"], rows)
    lines += ["", f"Total: {total:,.0f} CPU seconds ({total / 3600:.2f} CPU hours; each job on one thread; an invocation "
                  "killed from outside is not counted)."]
    rl_config, seeds = experiment["config"]["rl"], len(experiment["seeds"])
    if rl and rl_config["steps"]:
        per_seed = sum(_mean([job["cpu_seconds"] for job in by_kind[kind]]) for kind in by_kind)
        lines += ["", "What this budget leaves out, at this experiment's measured costs:",
                  f"- each further seed: about {per_seed:,.0f} CPU seconds (a warm start and one run of every method);",
                  f"- each further 10 RL steps of every run: about {10 * seeds * len(experiment['methods']) * _mean(rl) / rl_config['steps']:,.0f} "
                  f"CPU seconds ({_mean(rl) / rl_config['steps']:.1f} per step of {rl_config['questions_per_step']} questions x "
                  f"G = {rl_config['group_size']}, evaluations included);"]
        missing = [name for name in METHODS if name not in experiment["methods"]]
        if missing:
            lines.append(f"- the methods not run ({', '.join(f'`{name}`' for name in missing)}): about "
                         f"{seeds * _mean(rl):,.0f} CPU seconds each ({_count(seeds, 'seed')} x the mean RL job; more for a "
                         "sub-goal method, whose probes score more targets); the same command with the method added to "
                         "--methods runs only its jobs.")
    return lines


def _credit_table(experiment: dict) -> list[str]:
    """Mean information gain of non-final turns per target kind (answer, sub-goals), per method that
    logged it; shown when a sub-goal method ran."""
    rows = []
    for method in experiment["methods"]:
        values = {key: [r[key] for r in experiment["records"] if r["method"] == method and r.get(key) is not None]
                  for key in ("ig_answer_mean", "ig_subgoal_mean")}
        if values["ig_answer_mean"]:
            rows.append([_label(method), *[f"{_mean(v):+.4f}" if v else "n/a" for v in values.values()]])
    if not any(r.get("ig_subgoal_mean") is not None for r in experiment["records"]):
        return []
    return ["## Where the information gain went", "",
            "Mean over RL steps (and seeds) of the per-step mean gain of non-final turns: of the answer's probe, and of the "
            "sub-goal probes (each bridge entity of the question's gold chain, unweighted; with the running-max potential "
            "a sub-goal's gain is paid once, when first reached).", "",
            *_table(["method", "answer", "sub-goals"], rows), ""]


SUBGOAL_ROWS = (
    ("bridge", "own_document_first", "that bridge's document"),
    ("bridge", "answer_document_first", "the answer's document"),
    ("bridge", "other_bridge_document_first", "another bridge's document"),
    ("bridge", "nothing_new", "nothing new on the chain"),
    ("answer", "answer_on_bridge_document", "a bridge's document"),
)
"""The sub-goal table's rows: (probe, ``diagnostics.SUBGOAL_GROUPS`` entry, what the turn's search newly retrieved)."""


def _pooled(cells: Sequence[dict]) -> tuple[int, float | None]:
    turns = sum(cell["turns"] for cell in cells)
    return turns, (sum(cell["turns"] * cell["mean"] for cell in cells if cell["turns"]) / turns if turns else None)


def _subgoal_table(experiment: dict) -> list[str]:
    """The step-0 sub-goal signal (``diagnostics.measure_signal``'s ``subgoal_signal``), pooled over
    seeds, by hop count: the gain of a bridge's probe (raw and running max) and of the answer's."""
    signals = [row["subgoal_signal"] for row in experiment.get("step0") or [] if row.get("subgoal_signal")]
    if not signals:
        return []
    hops = sorted({hop for signal in signals for group in signal.values() for hop in group["by_hops"]}, key=int)
    rows = []
    for probe, group, retrieved in SUBGOAL_ROWS:
        for hop in hops:
            cells = {potential: [signal[group]["by_hops"][hop][potential] for signal in signals
                                 if hop in signal.get(group, {}).get("by_hops", {}) and potential in signal[group]["by_hops"][hop]]
                     for potential in ("probe", "running_max")}
            turns, raw = _pooled(cells["probe"])
            if not turns:
                continue
            _, running = _pooled(cells["running_max"])
            rows.append([probe, retrieved, hop, str(turns), f"{raw:+.3f}", "n/a" if running is None else f"{running:+.3f}"])
    return ["", "Sub-goal probes at step 0 (the same rollouts, every target scored in one K-target probe forward), "
            "pooled over the seeds: the mean change of a bridge entity's probe over a non-final turn, by what the "
            "turn's search newly retrieved along the question's gold chain, with the raw probe as potential and with the "
            "running max; and the answer's probe on turns that newly retrieved a bridge's document (IGPO's credit "
            "for progress along the chain).", "",
            *_table(["probe", "turn's search newly retrieved", "hops", "turns", "mean gain (raw probe)",
                     "mean gain (running max)"], rows)]


def _mark(met: bool | None, reason: str = "") -> str:
    if met is None:
        return f"**not applicable**: {reason}"
    return "**met**" if met else "**not met**"


def _targets_lines(result: dict) -> list[str]:
    reach = result["steps_to_grpo_final"]
    half = result["half_steps"]
    margins = result["above_every_seed"]["margins"]
    ablation = result["beats_ablations"]
    steps = ("" if half["met"] is None else
             f" (IGPO: step {half['igpo_steps'] if half['igpo_steps'] is not None else 'never'}, "
             f"GRPO: step {half['grpo_steps']}; evaluation steps only)")
    tied = " (tied in every seed)" if margins and all(margin == 0 for margin in margins.values()) else ""
    return [
        f"- IGPO reaches GRPO's final mean EM ({_pct(result['grpo_final_mean_em'])}) in at most half of GRPO's steps: "
        f"{_mark(half['met'], half.get('reason', ''))}{steps}.",
        f"- IGPO ends above GRPO in every seed: {_mark(result['above_every_seed']['met'])}{tied} (IGPO - GRPO final EM by seed: "
        + ", ".join(f"seed {seed}: {100 * margin:+.1f}" for seed, margin in margins.items()) + " points).",
        f"- F1 + IG beats both ablations: {_mark(ablation['met'])} (final mean EM: IGPO {_pct(ablation['igpo'])}, "
        + ", ".join(f"{LABELS[m]} {_pct(ablation[m])}" for m in ("igpo_no_ig", "igpo_no_outcome") if m in ablation) + ").",
        "",
        "Steps to reach GRPO's final mean EM (first evaluation step whose mean over seeds gets there): "
        + ", ".join(f"{LABELS.get(method, method)} {step if step is not None else 'never'}" for method, step in reach.items()) + ".",
    ]


def _setup_lines(experiment: dict) -> list[str]:
    config = experiment["config"]
    world, rl, warm = config["world"], config["rl"], config["warm_start"]
    wall = experiment.get("wall_seconds") or []
    runs = len(experiment["methods"])
    lines = [
        f"- World: preset `{world['preset']}`, {world['num_train']} training and {world['num_heldout']} held-out "
        f"questions of 1-{world['max_hops']} hops (world seed {world['seed']}); the warm start demonstrates "
        + (f"questions of at most {warm['max_hops']} hops" if warm["max_hops"] else "every question")
        + f" ({warm['pretrain_steps']} language-model + {warm['steps']} SFT steps).",
        f"- RL, identical for every method but the switches that define it: {rl['steps']} steps of "
        f"{rl['questions_per_step']} questions x G = {rl['group_size']} rollouts, at most {rl['max_turns']} turns, "
        f"lr {rl['learning_rate']}, {rl['minibatches']} minibatches, IG kind `{rl['igpo']['kind']}`, normalization scale `{rl['igpo']['scale']}`, "
        f"held-out evaluation every {rl['eval_every']} steps.",
        f"- Methods: {', '.join(f'{_label(method)} (`{method}`)' for method in experiment['methods'])}.",
        f"- Seeds (training seed of each warm start and its {runs} runs): {', '.join(map(str, experiment['seeds']))}.",
    ]
    if wall:
        lines.append(f"- Wall time: {' + '.join(f'{s / 60:.1f}' for s in wall)} min (one entry per invocation that ran jobs).")
    return lines


def smoke_lines(config: dict) -> list[str]:
    """The notice at the top of a report whose budget is too small to learn (``config.budget_note``), or nothing."""
    note = budget_note(config)
    if note is None:
        return []
    return [f"> **Smoke run** ({note}): every number below, and every target, says nothing about the methods.", ""]


def _hop_table(experiment: dict) -> list[str]:
    """Final held-out EM by hop count, mean over seeds, for the warm start and every method."""
    scores = _hop_scores(experiment)
    hops = sorted({hop for table in scores.values() for hop in table}, key=int)
    warm = experiment.get("warm_start") or []
    rows = []
    if warm and _hop_keys(warm):
        rows.append(["warm start", *[_pct(_mean([row["by_hops"][hop]["em"] for row in warm if hop in row["by_hops"]]))
                                     if any(hop in row["by_hops"] for row in warm) else "n/a" for hop in hops],
                     _pct(_mean([row["em"] for row in warm]))])
    em = final_scores(experiment, "em")
    for method in experiment["methods"]:
        rows.append([_label(method), *[_pct(_mean(scores[method][hop])) if scores[method][hop] else "n/a" for hop in hops],
                     _pct(_mean(list(em[method].values())))])
    return _table(["final held-out EM (%), mean over seeds", *[f"{hop}-hop" for hop in hops], "all"], rows)


def write_experiment_report(experiment: dict, out_dir: str | Path) -> Path:
    """Write ``out_dir/report.md`` and its PNG plots (the paired plot when per-question EM was
    recorded); returns the path of report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = paired_results(experiment)
    if results:
        plots.save(paired_figure(experiment, results), out_dir / PAIRED_PLOT)
    plots.save(em_figure(experiment), out_dir / EM_PLOT)
    plots.save(hops_figure(experiment), out_dir / HOPS_PLOT)
    plots.save(collapse_figure(experiment), out_dir / COLLAPSE_PLOT)
    methods = experiment["methods"]
    lines = [f"# {' vs '.join(_label(method) for method in methods)}: {_count(len(experiment['seeds']), 'seed')}", "",
             *smoke_lines(experiment["config"]), *_setup_lines(experiment), "",
             "## Paired differences to GRPO", "", *_paired_section(experiment, results or None),
             "## Warm starts", "",
             "Every method of a seed starts from that seed's warm start (and its step-0 EM is the warm start's); the "
             "warm starts differ by seed. Held-out EM (%) by hop count:", "",
             *_warm_start_table(experiment), "",
             "## Budget", "", *_budget_lines(experiment), ""]
    if all(method in methods for method in TARGET_METHODS):
        lines += ["## The targets", "", *_targets_lines(targets(experiment)), ""]
    lines += ["## Step 0: reward sparsity and probe signal", "",
              "Rollouts of the first RL steps' questions from each warm start (`diagnostics.measure_signal`): how the "
              "groups' outcomes split (columns defined below the table), and the mean information gain of non-final "
              "turns split by what the turn's search returned: the document the gold chain reads the answer from (first "
              "time, again), only other documents mentioning the answer, or nothing about it.", "",
              *_step0_table(experiment), *_subgoal_table(experiment), "",
              "## Held-out EM over RL steps", "",
              "One panel per method: the mean over seeds (thick line), the lowest to highest seed (band), every seed "
              "(thin lines); the other methods' means in grey.", "",
              f"![held-out EM over RL steps]({EM_PLOT})", "",
              *_curve_table(experiment), "",
              "## Final held-out results", "", *_final_table(experiment), "",
              "## Final EM by hop count", "", f"![final EM by hop count]({HOPS_PLOT})", "", *_hop_table(experiment), ""]
    if any(method in methods for method in ("igpo_no_ig", "igpo_no_outcome")):
        lines += ["## Ablation (the paper's layout; final held-out EM, mean over seeds)", "", *_ablation_table(experiment), ""]
    lines += [*_credit_table(experiment),
              "## Groups without signal", "",
              "Turn-advantage collapse: groups whose turn advantages are all exactly 0 (no gradient from the group); "
              "outcome zero-variance: groups whose outcomes are all equal. Mean over seeds with the min-max band and "
              "every seed, as above.", "",
              f"![collapse over RL steps]({COLLAPSE_PLOT})", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report
