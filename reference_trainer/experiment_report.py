"""The experiment's report: report.md with plots and tables from experiment.json.

``write_experiment_report(experiment, out_dir)`` reads only the dict that ``experiment.collect``
writes to experiment.json (so a report can be rebuilt from that one file) and writes:

- ``experiment_em.png``: held-out EM vs RL step per method, the mean over seeds (line) and
  every seed (thin lines);
- ``experiment_hops.png``: final held-out EM by hop count per method (mean over seeds, with the
  per-seed range as error bars);
- ``experiment_collapse.png``: the turn-advantage collapse rate (solid) and the outcome
  zero-variance fraction (dotted) over RL steps, mean over seeds;
- ``report.md``: the issue's targets with the measured values, the step-0 sparsity and probe
  signal, final EM/F1 per method (mean, std, every seed), steps to reach GRPO's final mean EM,
  EM by hop count, the ablation table in the paper's layout and the plots.

The analysis functions (``mean_curve``, ``steps_to_reach``, ``targets``) are pure and tested.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from igpo_rewards.reference_trainer.diagnostics import IG_GROUPS
from igpo_rewards.reference_trainer.report import _finish_step_axes, _new_figure, _table

EM_PLOT = "experiment_em.png"
HOPS_PLOT = "experiment_hops.png"
COLLAPSE_PLOT = "experiment_collapse.png"

LABELS = {"igpo": "IGPO", "grpo": "GRPO", "igpo_no_ig": "IGPO w/o IG", "igpo_no_outcome": "IGPO w/o outcome"}
"""Display names of the methods."""

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
    """``(step, mean, min, max)`` over seeds at every step that every seed logged.

    Example:
        >>> mean_curve({0: {0: 0.2, 5: 0.4}, 1: {0: 0.4, 5: 0.8, 7: 1.0}})
        [(0, 0.30000000000000004, 0.2, 0.4), (5, 0.6000000000000001, 0.4, 0.8)]
    """
    if not seed_curves:
        return []
    steps = sorted(set.intersection(*(set(curve) for curve in seed_curves.values())))
    points = []
    for step in steps:
        values = [curve[step] for curve in seed_curves.values()]
        points.append((step, sum(values) / len(values), min(values), max(values)))
    return points


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


def targets(experiment: dict) -> dict[str, Any]:
    """The issue's three targets, measured on held-out EM.

    - ``half_steps``: IGPO reaches GRPO's final mean EM (mean over seeds) in at most half of
      the steps GRPO needs to reach it (``igpo_steps <= grpo_steps / 2``); not met when GRPO's
      final mean is reached at step 0 already (RL did not improve on the warm start);
    - ``above_every_seed``: IGPO's final EM is above GRPO's in every seed;
    - ``beats_ablations``: IGPO's final mean EM is above both ablations' (F1 + IG beats F1 only
      and IG only).

    Returns a dict with the numbers behind each check and a bool ``met`` for each.
    """
    em = final_scores(experiment, "em")
    curves = {method: mean_curve(seeds) for method, seeds in per_seed_curves(experiment["records"], "heldout_em").items()}
    grpo_final = _mean(list(em["grpo"].values()))
    reach = {method: steps_to_reach(curves.get(method, []), grpo_final) for method in experiment["methods"]}
    igpo_steps, grpo_steps = reach.get("igpo"), reach.get("grpo")
    seeds = sorted(em["igpo"])
    margins = {seed: em["igpo"][seed] - em["grpo"][seed] for seed in seeds}
    means = {method: _mean(list(values.values())) for method, values in em.items()}
    ablations = {method: means[method] for method in ("igpo_no_ig", "igpo_no_outcome") if method in means}
    return {
        "grpo_final_mean_em": grpo_final,
        "steps_to_grpo_final": reach,
        "half_steps": {"igpo_steps": igpo_steps, "grpo_steps": grpo_steps,
                       "met": igpo_steps is not None and bool(grpo_steps) and igpo_steps <= grpo_steps / 2},
        "above_every_seed": {"margins": margins, "met": bool(margins) and all(margin > 0 for margin in margins.values())},
        "beats_ablations": {"igpo": means["igpo"], **ablations,
                            "met": bool(ablations) and all(means["igpo"] > value for value in ablations.values())},
        "final_mean_em": means,
    }


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _plot_em(experiment: dict, path: Path) -> None:
    figure = _new_figure(8, 4.5)
    ax = figure.subplots()
    for index, method in enumerate(experiment["methods"]):
        seeds = per_seed_curves(experiment["records"], "heldout_em").get(method, {})
        for curve in seeds.values():
            steps = sorted(curve)
            ax.plot(steps, [100 * curve[step] for step in steps], color=f"C{index}", alpha=0.25, linewidth=0.8)
        points = mean_curve(seeds)
        if points:
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", markersize=3, color=f"C{index}",
                    linewidth=2, label=f"{LABELS.get(method, method)} (mean of {len(seeds)})")
    _finish_step_axes(ax, title="held-out EM over RL steps (thin lines: single seeds)", ylabel="EM (%)",
                      empty="no held-out evaluation logged")
    figure.savefig(path)


def _plot_hops(experiment: dict, path: Path) -> None:
    by_method = _hop_scores(experiment)
    hops = sorted({hop for table in by_method.values() for hop in table}, key=int)
    figure = _new_figure(8, 4)
    ax = figure.subplots()
    width = 0.8 / max(len(experiment["methods"]), 1)
    for index, method in enumerate(experiment["methods"]):
        values = [by_method.get(method, {}).get(hop, []) for hop in hops]
        means = [100 * _mean(v) if v else 0.0 for v in values]
        low = [mean - 100 * min(v) if v else 0.0 for mean, v in zip(means, values)]
        high = [100 * max(v) - mean if v else 0.0 for mean, v in zip(means, values)]
        positions = [h + (index - (len(experiment["methods"]) - 1) / 2) * width for h in range(len(hops))]
        ax.bar(positions, means, width, yerr=[low, high], capsize=2, color=f"C{index}", label=LABELS.get(method, method))
    ax.set_xticks(range(len(hops)), [f"{hop}-hop" for hop in hops])
    ax.set_ylabel("final held-out EM (%)")
    ax.set_ylim(0, 102)
    ax.set_title("final held-out EM by hop count (bars: mean over seeds; whiskers: seed range)")
    ax.grid(alpha=0.3, axis="y")
    if hops:
        ax.legend(fontsize=8)
    figure.savefig(path)


def _plot_collapse(experiment: dict, path: Path) -> None:
    figure = _new_figure(8, 4)
    ax = figure.subplots()
    for key, style, suffix in (("turn_advantage_collapse_rate", "-", "turn advantages all 0"),
                               ("outcome_zero_variance_fraction", ":", "outcomes all equal")):
        for index, method in enumerate(experiment["methods"]):
            points = mean_curve(per_seed_curves(experiment["records"], key).get(method, {}))
            if points:
                ax.plot([p[0] for p in points], [100 * p[1] for p in points], style, color=f"C{index}",
                        label=f"{LABELS.get(method, method)}: {suffix}")
    _finish_step_axes(ax, title="groups without signal over RL steps (mean over seeds)", ylabel="groups (%)",
                      empty="no collapse rate logged", fontsize=7, ncol=2)
    figure.savefig(path)


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


def _step0_table(experiment: dict) -> list[str]:
    rows = []
    for row in experiment.get("step0") or []:
        gains = row["information_gain"]
        cells = [str(row["seed"]), _pct(row["outcome_zero_variance_fraction"]), _pct(row["all_wrong_group_fraction"]),
                 _pct(row["all_right_group_fraction"])]
        for name in IG_GROUPS:
            group = gains[name]
            cells.append("n/a" if not group["turns"] else f"{group['mean']:+.3f} (n = {group['turns']})")
        rows.append(cells)
    if not rows:
        return ["Not measured (the warm starts ran without --diagnose-steps)."]
    return _table(["seed", "outcome zero-variance groups (%)", "all wrong (%)", "all right (%)",
                   *[f"IG: {name.replace('_', ' ')}" for name in IG_GROUPS]], rows)


def _targets_lines(result: dict) -> list[str]:
    def mark(met: bool) -> str:
        return "**met**" if met else "**not met**"

    reach = result["steps_to_grpo_final"]
    half = result["half_steps"]
    margins = result["above_every_seed"]["margins"]
    ablation = result["beats_ablations"]
    return [
        f"- IGPO reaches GRPO's final mean EM ({_pct(result['grpo_final_mean_em'])}) in at most half of GRPO's steps: "
        f"{mark(half['met'])} (IGPO: step {half['igpo_steps'] if half['igpo_steps'] is not None else 'never'}, "
        f"GRPO: step {half['grpo_steps'] if half['grpo_steps'] is not None else 'never'}; evaluation steps only).",
        f"- IGPO ends above GRPO in every seed: {mark(result['above_every_seed']['met'])} (IGPO - GRPO final EM by seed: "
        + ", ".join(f"seed {seed}: {100 * margin:+.1f}" for seed, margin in margins.items()) + " points).",
        f"- F1 + IG beats both ablations: {mark(ablation['met'])} (final mean EM: IGPO {_pct(ablation['igpo'])}, "
        + ", ".join(f"{LABELS[m]} {_pct(ablation[m])}" for m in ("igpo_no_ig", "igpo_no_outcome") if m in ablation) + ").",
        "",
        "Steps to reach GRPO's final mean EM (first evaluation step whose mean over seeds gets there): "
        + ", ".join(f"{LABELS.get(method, method)} {step if step is not None else 'never'}" for method, step in reach.items()) + ".",
    ]


def _setup_lines(experiment: dict) -> list[str]:
    config = experiment["config"]
    world, rl, warm = config["world"], config["rl"], config["warm_start"]
    wall = experiment.get("wall_seconds") or []
    lines = [
        f"- World: preset `{world['preset']}`, {world['num_train']} training and {world['num_heldout']} held-out "
        f"questions of 1-{world['max_hops']} hops (world seed {world['seed']}); the warm start demonstrates "
        + (f"questions of at most {warm['max_hops']} hops" if warm["max_hops"] else "every question")
        + f" ({warm['pretrain_steps']} language-model + {warm['steps']} SFT steps).",
        f"- RL, identical for every method but the one switch that defines it: {rl['steps']} steps of "
        f"{rl['questions_per_step']} questions x G = {rl['group_size']} rollouts, at most {rl['max_turns']} turns, "
        f"lr {rl['learning_rate']}, {rl['minibatches']} minibatches, IG kind `{rl['igpo']['kind']}`, normalization scale `{rl['igpo']['scale']}`, "
        f"held-out evaluation every {rl['eval_every']} steps.",
        f"- Seeds (training seed of each warm start and its four runs): {', '.join(map(str, experiment['seeds']))}.",
    ]
    if wall:
        lines.append(f"- Wall time: {' + '.join(f'{s / 60:.1f}' for s in wall)} min (one entry per invocation that ran jobs).")
    return lines


def write_experiment_report(experiment: dict, out_dir: str | Path) -> Path:
    """Write ``out_dir/report.md`` and the three PNG plots; returns the path of report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot_em(experiment, out_dir / EM_PLOT)
    _plot_hops(experiment, out_dir / HOPS_PLOT)
    _plot_collapse(experiment, out_dir / COLLAPSE_PLOT)
    result = targets(experiment)
    lines = [f"# IGPO vs GRPO and the ablations, {len(experiment['seeds'])} seeds", "", *_setup_lines(experiment), "",
             "## The targets", "", *_targets_lines(result), "",
             "## Step 0: reward sparsity and probe signal", "",
             "Rollouts of the first RL steps' questions from each warm start (`diagnostics.measure_signal`): groups "
             "whose outcomes are all equal (GRPO's advantages are zero there), and the mean information gain of "
             "non-final turns split by what the turn's search returned: the document the gold chain reads the answer "
             "from (first time, again), only other documents mentioning the answer, or nothing about it.", "",
             *_step0_table(experiment), "",
             "## Held-out EM over RL steps", "", f"![held-out EM over RL steps]({EM_PLOT})", "",
             *_curve_table(experiment), "",
             "## Final held-out results", "", *_final_table(experiment), "",
             "## Final EM by hop count", "", f"![final EM by hop count]({HOPS_PLOT})", "",
             "## Ablation (the paper's layout; final held-out EM, mean over seeds)", "", *_ablation_table(experiment), "",
             "## Groups without signal", "",
             "Turn-advantage collapse: groups whose turn advantages are all exactly 0 (no gradient from the group); "
             "outcome zero-variance: groups whose outcomes are all equal.", "",
             f"![collapse over RL steps]({COLLAPSE_PLOT})", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report
