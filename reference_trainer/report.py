"""The report: report.md with PNG plots comparing runs (IGPO vs GRPO) that share a warm start.

``write_report(run_dirs, out_dir, warm_start_eval=...)`` reads the files below and writes
``out_dir/report.md`` plus ``heldout_em_f1.png``, ``advantage_collapse.png`` and (when a run
recorded trajectories) ``case_study.png``. The curve plots come from ``plots`` (fitted y-axis,
integer step ticks, a marker per evaluation, runs offset slightly so that equal curves stay
visible; a min-max band when a label holds several seeds); matplotlib's object API, no pyplot.
A run whose budget is too small to learn (``config.budget_note``) is announced as a smoke run
at the top of report.md.

File schemas (what the training code writes into a run directory; EM, F1 and fractions are
numbers in [0, 1], the report shows them in percent):

``config.json`` (required): the resolved run configuration, one JSON object. The report lists
the settings (dotted keys, e.g. ``rl.algorithm``) whose values differ between runs, each whole.

``metrics.jsonl`` (required): one JSON object per line, in step order.

    "step"                           int, required: RL updates done (0 = the starting policy).
    "zero_advantage_group_fraction"  fraction of the step's groups in which every turn advantage
                                     is 0 (GRPO: all outcomes equal; IGPO: all pooled turn rewards
                                     equal): the advantage-collapse rate. Every training step.
    "zero_variance_group_fraction"   fraction of groups whose outcomes are all equal
                                     (``igpo_rewards.zero_variance_group_fraction`` of the
                                     outcomes, GRPO's collapse condition), logged by both methods.
    "heldout_em", "heldout_f1"       only on evaluation steps: greedy held-out EM and F1.
    other numbers, shown by the summary table when present: "reward_mean", "train_f1",
    "train_em", "ig_mean", "ig_std", "zero_advantage_token_fraction", "kl", "entropy",
    "clip_fraction", "tokens_per_second", "seconds_rollout", "seconds_retrieval",
    "seconds_probes", "seconds_reference", "seconds_update". Values may be null; unknown keys are
    ignored.

``eval.json`` (optional, final evaluation of the run; also the ``warm_start_eval`` file):

    {"step": int, "em": float, "f1": float, "n": int,
     "by_hops": {"1": {"em": float, "f1": float, "n": int}, "2": {...}, ...},     # optional
     "by_data_source": {"nq": {"em": float, "f1": float, "n": int}, ...}}        # optional

Without eval.json the run's last held-out EM/F1 in metrics.jsonl stands in (overall only).

``trajectories.jsonl`` (optional): case-study trajectories, one JSON object per line.

    {"step": int (optional), "question": str, "answers": [str, ...], "hops": int (optional),
     "outcome": float,
     "turns": [{"text": str,                  # the generated text of the turn
                "observation": str | null,    # optional: the retrieved text that followed it
                "probe_prob": float,          # p(answer) measured by the probe BEFORE this turn
                "subgoal_probs": {str: float},  # optional (sub-goal targets): p(bridge entity) before it
                "information_gain": float | null,   # null (or absent) on the final turn
                "advantage": float}, ...]}

The case study draws one trajectory of the first run whose label contains "igpo" (else the
first run that has trajectories): a multi-turn one with a positive outcome when there is one,
latest step first. Each turn is a box colored by the sign of its advantage.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

from igpo_rewards.reference_trainer import plots
from igpo_rewards.reference_trainer.config import budget_note
from igpo_rewards.reference_trainer.files import read_jsonl

EM_F1_PLOT = "heldout_em_f1.png"
COLLAPSE_PLOT = "advantage_collapse.png"
CASE_STUDY_PLOT = "case_study.png"

SUMMARY_KEYS = ("reward_mean", "train_f1", "train_em", "ig_mean", "ig_std", "zero_advantage_group_fraction",
                "zero_variance_group_fraction", "zero_advantage_token_fraction", "kl", "entropy", "clip_fraction",
                "tokens_per_second", "seconds_rollout", "seconds_retrieval", "seconds_probes", "seconds_reference",
                "seconds_update")
"""metrics.jsonl keys shown (last logged value, and mean over steps) in the training summary table."""

PAPER_COLUMNS = (
    ("NQ", ("nq",)),
    ("TQ", ("tq", "triviaqa")),
    ("HotpotQA", ("hotpotqa",)),
    ("2Wiki", ("2wiki", "2wikimultihopqa")),
    ("MuSiQue", ("musique",)),
    ("Bamboogle", ("bamboogle",)),
    ("PopQA", ("popqa",)),
)
"""The paper's columns and the ``data_source`` names (lowercase) each one collects."""

_POSITIVE, _NEGATIVE, _NEUTRAL = ("#d9f2d9", "#2e7d32"), ("#f8d7d7", "#c62828"), ("#eeeeee", "#757575")


# ---------------------------------------------------------------------------------------------
# Reading run files
# ---------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fraction(value: Any, where: str) -> float:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{where} must be a number in [0, 1] (a fraction, not a percentage), got {value!r}")
    return float(value)


def load_metrics(path: str | Path) -> list[dict]:
    """Read metrics.jsonl: a list of per-step dicts, each with an int "step".

    Raises FileNotFoundError for a missing file and ValueError (with the line number) for a
    line that is not a JSON object, lacks an int "step", or has held-out EM/F1 or
    a group fraction outside [0, 1]. An empty file gives [].
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    metrics = []
    for line_number, record in read_jsonl(path):
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{path}:{line_number}: 'step' must be a non-negative int, got {step!r}")
        for key in ("heldout_em", "heldout_f1", "zero_advantage_group_fraction", "zero_variance_group_fraction"):
            if record.get(key) is not None:
                _check_fraction(record[key], f"{path}:{line_number}: {key!r}")
        metrics.append(record)
    return metrics


def _check_scores(scores: Any, where: str) -> dict:
    if not isinstance(scores, dict):
        raise ValueError(f"{where} must be an object with 'em' and 'f1', got {scores!r:.120}")
    for key in ("em", "f1"):
        if key not in scores:
            raise ValueError(f"{where} lacks {key!r}; keys present: {sorted(scores)}")
        _check_fraction(scores[key], f"{where}[{key!r}]")
    return scores


def load_eval(path: str | Path) -> dict:
    """Read an eval.json (a file, or a directory holding eval.json); schema in the module docstring.

    Raises FileNotFoundError for a missing file, ValueError for bad JSON or scores that are
    missing or outside [0, 1].
    """
    path = Path(path)
    if path.is_dir():
        path = path / "eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"evaluation file not found: {path}")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    _check_scores(result, str(path))
    for group in ("by_hops", "by_data_source"):
        breakdown = result.get(group)
        if breakdown is None:
            continue
        if not isinstance(breakdown, dict):
            raise ValueError(f"{path}: {group!r} must be an object, got {breakdown!r:.120}")
        for key, scores in breakdown.items():
            _check_scores(scores, f"{path}: {group}[{key!r}]")
    return result


def load_trajectories(path: str | Path) -> list[dict]:
    """Read trajectories.jsonl; every line needs "question", "outcome" and a non-empty "turns"
    list whose items have "text", "probe_prob" and "advantage" (ValueError naming the line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trajectories file not found: {path}")
    trajectories = []
    for line_number, record in read_jsonl(path):
        where = f"{path}:{line_number}"
        if not isinstance(record.get("question"), str) or not _is_number(record.get("outcome")):
            raise ValueError(f"{where}: needs a string 'question' and a number 'outcome'; keys present: {sorted(record)}")
        turns = record.get("turns")
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: 'turns' must be a non-empty list, got {turns!r:.120}")
        for index, turn in enumerate(turns):
            if (not isinstance(turn, dict) or not isinstance(turn.get("text"), str)
                    or not _is_number(turn.get("probe_prob")) or not _is_number(turn.get("advantage"))):
                raise ValueError(f"{where}: turns[{index}] needs a string 'text' and numbers 'probe_prob' and "
                                 f"'advantage', got {turn!r:.160}")
            gain = turn.get("information_gain")
            if gain is not None and not _is_number(gain):
                raise ValueError(f"{where}: turns[{index}]['information_gain'] must be a number or null, got {gain!r}")
        trajectories.append(record)
    return trajectories


def _load_run(label: str, run_dir: Path) -> dict:
    if not isinstance(run_dir, (str, Path)):
        raise TypeError(f"run_dirs[{label!r}] must be a path, got {type(run_dir).__name__}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory for {label!r} not found: {run_dir}")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"run {label!r}: {config_path} not found (every run directory has its config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    run = {"label": label, "dir": run_dir, "config": config, "metrics": load_metrics(run_dir / "metrics.jsonl"),
           "eval": None, "trajectories": []}
    if (run_dir / "eval.json").is_file():
        run["eval"] = load_eval(run_dir / "eval.json")
    else:  # fall back on the last evaluation logged during training
        evaluated = [record for record in run["metrics"]
                     if record.get("heldout_em") is not None and record.get("heldout_f1") is not None]
        if evaluated:
            last = evaluated[-1]
            run["eval"] = {"step": last["step"], "em": last["heldout_em"], "f1": last["heldout_f1"]}
    if (run_dir / "trajectories.jsonl").is_file():
        run["trajectories"] = load_trajectories(run_dir / "trajectories.jsonl")
    return run


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _run_series(runs: list[dict], key: str, *, start: float | None = None) -> dict[str, dict[int, dict[int, float]]]:
    """label -> {seed: {step: 100 * value}} of a metrics.jsonl key (one seed per run: its config's seed),
    with ``start`` (a fraction) at step 0 where the run logged none (every RL run starts from the warm start)."""
    series = {}
    for run in runs:
        curve = {record["step"]: 100 * record[key] for record in run["metrics"] if record.get(key) is not None}
        if start is not None and curve and 0 not in curve:
            curve[0] = 100 * start
        if curve:
            seed = run["config"].get("seed", 0)
            series[run["label"]] = {seed if isinstance(seed, int) else 0: dict(sorted(curve.items()))}
    return series


def heldout_figure(runs: list[dict], warm: dict | None) -> Any:
    """Held-out EM and F1 over RL steps, one panel each, the warm start as a dashed line (``plots.seed_curves_figure``)."""
    panels = [plots.Panel(_run_series(runs, f"heldout_{name}", start=warm[name] if warm else None), f"held-out {name.upper()}",
                          f"{name.upper()} (%)", reference=("warm start", 100 * warm[name]) if warm else None,
                          empty="no held-out evaluation logged") for name in ("em", "f1")]
    return plots.seed_curves_figure(panels, methods=[run["label"] for run in runs])


def collapse_figure(runs: list[dict]) -> Any:
    """Groups whose advantages are all 0, and groups whose outcomes are all equal, over RL steps."""
    panels = [plots.Panel(_run_series(runs, "zero_advantage_group_fraction"), "advantages all 0 (advantage collapse)",
                          "groups (%)", empty="no zero_advantage_group_fraction logged"),
              plots.Panel(_run_series(runs, "zero_variance_group_fraction"), "outcomes all equal (GRPO's collapse condition)",
                          "groups (%)", empty="no zero_variance_group_fraction logged")]
    return plots.seed_curves_figure(panels, methods=[run["label"] for run in runs])


def _excerpt(text: str, width: int, max_lines: int) -> str:
    """Model text for a plot or a table cell: control characters become spaces, runs of white
    space one space, then at most ``max_lines`` lines of ``width`` (the last one cut with ...)."""
    printable = "".join(character if character.isprintable() else " " for character in text)
    lines = textwrap.wrap(" ".join(printable.split()), width=width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 3] + "..."
    return "\n".join(lines)


def _turn_header(number: int, turn: dict) -> str:
    gain = turn.get("information_gain")
    gain_text = "final turn (outcome)" if gain is None else f"IG = {gain:+.3f}"
    return f"Turn {number}   p(answer) before = {turn['probe_prob']:.3f}   {gain_text}   advantage = {turn['advantage']:+.3f}"


def case_study_figure(trajectory: dict, label: str) -> Any:
    """One trajectory drawn like the paper's case study: a box per turn, coloured by the sign of its advantage."""
    from matplotlib.patches import FancyBboxPatch

    turns = trajectory["turns"]
    box_height, gap, header = 1.5, 0.3, 1.2
    total = header + len(turns) * (box_height + gap)
    figure = plots.new_figure(11, 0.55 * total + 0.3)
    ax = figure.subplots()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, total)
    ax.axis("off")
    answers = ", ".join(trajectory.get("answers") or [])
    ax.text(0.0, total - 0.3, _excerpt(f"{label} case study: {trajectory['question']}", 110, 1),
            fontsize=11, weight="bold", va="top", parse_math=False)
    ax.text(0.0, total - 0.85, f"gold answer: {answers}    outcome reward: {trajectory['outcome']:+.3f}",
            fontsize=9, va="top", parse_math=False)
    for index, turn in enumerate(turns):
        top = total - header - index * (box_height + gap)
        fill, edge = _POSITIVE if turn["advantage"] > 0 else _NEGATIVE if turn["advantage"] < 0 else _NEUTRAL
        ax.add_patch(FancyBboxPatch((0.005, top - box_height), 0.99, box_height, boxstyle="round,pad=0,rounding_size=0.1",
                                    facecolor=fill, edgecolor=edge, linewidth=1.5, mutation_aspect=1 / 0.55))
        ax.text(0.02, top - 0.2, _turn_header(index + 1, turn), fontsize=9, weight="bold", color=edge, va="top",
                parse_math=False)
        body = _excerpt(turn["text"], 120, 2)
        if turn.get("observation"):
            body += "\n" + _excerpt("[information] " + turn["observation"], 120, 1)
        ax.text(0.02, top - 0.75, body, fontsize=8, family="monospace", va="top", parse_math=False)
    return figure


def _pick_case_study(runs: list[dict]) -> tuple[str, dict] | None:
    with_trajectories = [run for run in runs if run["trajectories"]]
    if not with_trajectories:
        return None
    igpo = [run for run in with_trajectories if "igpo" in run["label"].lower()]
    run = (igpo or with_trajectories)[0]
    ranked = max(enumerate(run["trajectories"]),
                 key=lambda item: (len(item[1]["turns"]) >= 2, item[1]["outcome"] > 0,
                                   item[1].get("step") or 0, len(item[1]["turns"]), item[0]))
    return run["label"], ranked[1]


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _percent(scores: dict | None, key: str) -> str:
    return "n/a" if scores is None or scores.get(key) is None else f"{100 * scores[key]:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(_cell, row)) + " |" for row in rows)]


def _results_table(policies: list[tuple[str, dict | None]], warm: dict | None) -> list[str]:
    hops = sorted({key for _, result in policies if result for key in (result.get("by_hops") or {})},
                  key=lambda key: (not str(key).isdigit(), int(key) if str(key).isdigit() else 0, str(key)))
    header = ["policy"] + [f"{hop}-hop {name}" for hop in hops for name in ("EM", "F1")] + ["EM", "F1", "n"]
    if warm is not None:
        header.append("EM vs warm start")
    rows = []
    for label, result in policies:
        by_hops = (result or {}).get("by_hops") or {}
        row = [label] + [_percent(by_hops.get(hop), name) for hop in hops for name in ("em", "f1")]
        row += [_percent(result, "em"), _percent(result, "f1"), str((result or {}).get("n", "n/a"))]
        if warm is not None:
            row.append("n/a" if result is None else f"{100 * (result['em'] - warm['em']):+.1f}")
        rows.append(row)
    return _table(header, rows)


def _source_columns(results: list[dict | None]) -> list[tuple[str, tuple[str, ...]]]:
    """The paper's columns that some result has questions for, in its order, then every other source."""
    present = {str(source).lower() for result in results if result for source in result.get("by_data_source") or {}}
    known = {name for _, names in PAPER_COLUMNS for name in names}
    columns = [(title, names) for title, names in PAPER_COLUMNS if present & set(names)]
    return columns + [(source, (source,)) for source in sorted(present - known)]


def _column_score(result: dict | None, names: tuple[str, ...], metric: str) -> float | None:
    """A column's score: its sources pooled by question count (TQ and TriviaQA together)."""
    by_source = {str(source).lower(): scores for source, scores in ((result or {}).get("by_data_source") or {}).items()}
    groups = [by_source[name] for name in names if name in by_source]
    count = sum(group["n"] for group in groups)
    return sum(group[metric] * group["n"] for group in groups) / count if count else None


def paper_table(results: dict[str, dict | None], *, metrics: tuple[str, ...] = ("em", "f1")) -> list[str]:
    """Markdown rows of the paper's per-dataset table: one row per policy and metric.

    Columns: the paper's (NQ, TQ, HotpotQA, 2Wiki, MuSiQue, Bamboogle, PopQA) that any result has
    questions for, then the other data sources; "-" where a policy has none. "Avg." is the mean
    over the datasets present for that policy (the paper averages datasets, not questions).

    Example:
        >>> result = {"by_data_source": {"nq": {"em": 0.5, "f1": 0.75, "n": 2}, "popqa": {"em": 0.0, "f1": 0.5, "n": 1}}}
        >>> for line in paper_table({"IGPO": result}):
        ...     print(line)
        | policy | metric | NQ | PopQA | Avg. |
        |---|---|---|---|---|
        | IGPO | EM | 50.0 | 0.0 | 25.0 |
        | IGPO | F1 | 75.0 | 50.0 | 62.5 |
    """
    columns = _source_columns(list(results.values()))
    rows = []
    for label, result in results.items():
        for metric in metrics:
            values = [_column_score(result, names, metric) for _, names in columns]
            present = [value for value in values if value is not None]
            average = sum(present) / len(present) if present else None
            rows.append([label, metric.upper()] + ["-" if v is None else f"{100 * v:.1f}" for v in [*values, average]])
    return _table(["policy", "metric", *[title for title, _ in columns], "Avg."], rows)


def _source_table(policies: list[tuple[str, dict | None]]) -> list[str]:
    if not _source_columns([result for _, result in policies]):
        return []
    return ["", "Exact match per data source (the paper's column order; Avg. is the mean over the datasets present):", "",
            *paper_table(dict(policies), metrics=("em",))]


def _summary_table(runs: list[dict]) -> list[str]:
    keys = [key for key in SUMMARY_KEYS if any(record.get(key) is not None for run in runs for record in run["metrics"])]
    if not keys:
        return ["No training statistics were logged."]
    header = ["metric"] + [f"{run['label']} last / mean" for run in runs]
    rows = []
    for key in keys:
        row = [key]
        for run in runs:
            values = [record[key] for record in run["metrics"] if _is_number(record.get(key))]
            row.append("n/a" if not values else f"{values[-1]:.4g} / {sum(values) / len(values):.4g}")
        rows.append(row)
    return _table(header, rows)


def _flat_config(values: Any, prefix: str = "") -> dict[str, Any]:
    """A config as dotted keys -> leaf values (``{"rl": {"steps": 2}}`` -> ``{"rl.steps": 2}``)."""
    if isinstance(values, dict) and values:
        return {key: value for name, item in values.items() for key, value in _flat_config(item, f"{prefix}{name}.").items()}
    return {prefix[:-1]: values}


def _config_value(value: Any) -> str:
    """A setting's value, whole, for a table cell: ``code`` JSON (strings quoted, lists and null as JSON)."""
    return "`" + json.dumps(value, default=str).replace("`", "'") + "`"


def _config_differences(runs: list[dict]) -> list[str]:
    """One row per setting (dotted key) whose value differs between runs, every value whole."""
    if len(runs) < 2:
        return ["One run."]
    flat = [_flat_config(run["config"]) for run in runs]
    keys = sorted({key for values in flat for key in values})
    missing = object()
    differing = [key for key in keys
                 if len({json.dumps(values.get(key, missing), sort_keys=True, default=str) for values in flat}) > 1]
    if not differing:
        return ["The runs' configurations are identical."]
    rows = [[key] + ["(not set)" if key not in values else _config_value(values[key]) for values in flat] for key in differing]
    return _table(["setting"] + [run["label"] for run in runs], rows)


def _mean_collapse(run: dict) -> str:
    values = [record["zero_advantage_group_fraction"] for record in run["metrics"]
              if record.get("zero_advantage_group_fraction") is not None]
    return "n/a" if not values else f"{100 * sum(values) / len(values):.1f}%"


def _header_lines(runs: list[dict], warm: dict | None, warm_start_eval: Path | None) -> list[str]:
    """Title, the smoke-run notice when a run's budget is too small to learn, and each run's directory."""
    lines = [f"# Reference trainer report: {' vs '.join(run['label'] for run in runs)}", ""]
    notes = list(dict.fromkeys(note for note in (budget_note(run["config"]) for run in runs) if note))
    if notes:
        lines += [f"> **Smoke run** ({'; '.join(notes)}): the EM, F1 and collapse numbers below say nothing about "
                  "IGPO or GRPO.", ""]
    for run in runs:
        steps = max((record["step"] for record in run["metrics"]), default=0)
        lines.append(f"- **{run['label']}**: `{run['dir']}`, {steps} RL steps")
    if warm is not None:
        lines.append(f"- **warm start**: `{warm_start_eval}`")
    return lines


def _results_lines(runs: list[dict], warm: dict | None) -> list[str]:
    """The final held-out table (by hop count, by data source) and one line per run against the warm start."""
    policies = ([("warm start", warm)] if warm is not None else []) + [(run["label"], run["eval"]) for run in runs]
    lines = ["", "## Final held-out results", "",
             "Greedy decoding, exact match (EM) and word-level F1 in percent, by number of hops.", ""]
    lines += _results_table(policies, warm)
    lines += _source_table(policies)
    lines.append("")
    for run in runs:
        if run["eval"] is None:
            lines.append(f"- {run['label']}: no held-out evaluation recorded.")
        elif warm is not None:
            change = 100 * (run["eval"]["em"] - warm["em"])
            lines.append(f"- {run['label']}: held-out EM {_percent(run['eval'], 'em')} vs warm start "
                         f"{_percent(warm, 'em')} ({change:+.1f} points).")
        else:
            lines.append(f"- {run['label']}: held-out EM {_percent(run['eval'], 'em')}, F1 {_percent(run['eval'], 'f1')}.")
    return lines


def _plot_lines(runs: list[dict]) -> list[str]:
    lines = ["", "## Held-out EM and F1 over training", "",
             "Each run's curve with a marker at every evaluation (runs offset slightly along the steps so that equal "
             "values stay visible); dashed: the warm start.", "",
             f"![held-out EM and F1 over RL steps]({EM_F1_PLOT})", "", "## Advantage collapse", "",
             "Left: share of groups in which every advantage is zero, so the group teaches nothing. Right: groups "
             "whose outcomes are all equal (GRPO's collapse condition).", "",
             f"![advantage-collapse rate over RL steps]({COLLAPSE_PLOT})", ""]
    return lines + [f"- {run['label']}: mean collapse rate {_mean_collapse(run)}." for run in runs]


def _case_study_lines(case_study: tuple[str, dict] | None) -> list[str]:
    lines = ["", "## Case study", ""]
    if case_study is None:
        return lines + ["No trajectories were recorded."]
    label, trajectory = case_study
    lines += [f"One {label} trajectory (step {trajectory.get('step', 'n/a')}), each turn with the probe's "
              "p(answer) before it, its information gain and its advantage (green: positive, red: negative).", "",
              f"![case study]({CASE_STUDY_PLOT})", "",
              f"Question: {_cell(trajectory['question'])}  ",
              f"Gold answer: {_cell(', '.join(trajectory.get('answers') or []))}; "
              f"outcome reward {trajectory['outcome']:+.3f}", ""]
    return lines + _table(["turn", "p(answer) before", "IG", "advantage", "text"],
                          [[str(index + 1), f"{turn['probe_prob']:.3f}",
                            "final" if turn.get("information_gain") is None else f"{turn['information_gain']:+.3f}",
                            f"{turn['advantage']:+.3f}", "`" + _excerpt(turn["text"], 200, 1).replace("`", "'") + "`"]
                           for index, turn in enumerate(trajectory["turns"])])


def write_report(run_dirs: dict[str, Path], out_dir: Path, *, warm_start_eval: Path | None = None) -> Path:
    """Write ``out_dir/report.md`` and its PNG plots from run directories (schemas: module docstring).

    Args:
        run_dirs: label -> run directory, in display order, e.g. {"IGPO": Path(...), "GRPO": Path(...)}.
        out_dir: where report.md and the PNGs go (created if needed; may be a run directory).
        warm_start_eval: the warm-start policy's eval.json (or a directory holding one), shown as
            the first table row, a dashed line in the EM/F1 plot and step 0 of every run's curve.

    Returns:
        The path of report.md.

    Raises:
        TypeError / ValueError: ``run_dirs`` empty or not a dict, or a malformed file.
        FileNotFoundError: a run directory, its config.json or metrics.jsonl, or warm_start_eval is missing.
    """
    if not isinstance(run_dirs, dict) or not run_dirs:
        raise ValueError(f"run_dirs must be a non-empty dict label -> run directory, got {run_dirs!r:.120}")
    runs = [_load_run(str(label), run_dir) for label, run_dir in run_dirs.items()]
    warm = load_eval(warm_start_eval) if warm_start_eval is not None else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    plots.save(heldout_figure(runs, warm), out_dir / EM_F1_PLOT)
    plots.save(collapse_figure(runs), out_dir / COLLAPSE_PLOT)
    case_study = _pick_case_study(runs)
    if case_study is not None:
        plots.save(case_study_figure(case_study[1], case_study[0]), out_dir / CASE_STUDY_PLOT)

    lines = _header_lines(runs, warm, warm_start_eval) + _results_lines(runs, warm) + _plot_lines(runs)
    lines += _case_study_lines(case_study)
    lines += ["", "## Training summary", ""] + _summary_table(runs)
    lines += ["", "## Configuration differences", "",
              "Every setting (dotted key of config.json) whose value differs between the runs, each value whole.", ""]
    lines += _config_differences(runs)
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report
