"""Tests for igpo_rewards.reference_trainer.report: report.md and its PNGs from synthetic run directories."""

import json
import re

import numpy as np
import pytest
from matplotlib.image import imread

from igpo_rewards.reference_trainer.config import RunConfig, quick_config, to_dict
from igpo_rewards.reference_trainer.report import (
    CASE_STUDY_PLOT,
    COLLAPSE_PLOT,
    EM_F1_PLOT,
    _load_run,
    collapse_figure,
    heldout_figure,
    load_eval,
    load_metrics,
    load_trajectories,
    paper_table,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _turn(text, probe_prob, advantage, information_gain=None):
    return {"text": text, "probe_prob": probe_prob, "information_gain": information_gain, "advantage": advantage}


def _write_run(run_dir, *, algorithm, final_em, final_f1, collapse, eval_file=True, trajectories=True):
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"algorithm": algorithm, "learning_rate": 1e-4, "seed": 0}))
    lines = []
    for step in range(1, 7):
        record = {"step": step, "zero_advantage_group_fraction": collapse, "zero_variance_group_fraction": 1.0,
                  "reward_mean": 0.1 * step, "kl": None}
        if step % 3 == 0:
            record.update(heldout_em=final_em * step / 6, heldout_f1=final_f1 * step / 6)
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n\n")
    if eval_file:
        (run_dir / "eval.json").write_text(json.dumps({
            "step": 6, "em": final_em, "f1": final_f1, "n": 90,
            "by_hops": {"1": {"em": 0.8, "f1": 0.85, "n": 30}, "2": {"em": 0.5, "f1": 0.55, "n": 30},
                        "3": {"em": 0.125, "f1": 0.25, "n": 30}}}))
    if trajectories:
        chosen = {"step": 6, "question": "In which country was Mira Tosk born?", "answers": ["Borania"], "outcome": 1.0,
                  "turns": [_turn("<search> Mira Tosk </search>", 0.02, 0.75, 0.31),
                            _turn("<search> Velum\x00\x1b[31m </search>\r\n", 0.33, -0.5, -0.04),
                            _turn("<answer> Borania </answer>", 0.29, 1.25)]}
        one_turn = {"step": 6, "question": "Where was Aki Lo born?", "answers": ["Velum"], "outcome": 1.0,
                    "turns": [_turn("<answer> Velum </answer>", 0.9, 0.5)]}
        failed = {"step": 6, "question": "Where was Mira Tosk born?", "answers": ["Velum"], "outcome": 0.0,
                  "turns": [_turn("<search> Mira </search>", 0.1, -0.2, 0.0), _turn("<answer> x </answer>", 0.1, -0.9)]}
        (run_dir / "trajectories.jsonl").write_text("\n".join(json.dumps(t) for t in (failed, chosen, one_turn)) + "\n")
    return run_dir


@pytest.fixture
def runs(tmp_path):
    igpo = _write_run(tmp_path / "igpo", algorithm="igpo", final_em=0.4333, final_f1=0.5, collapse=0.125)
    grpo = _write_run(tmp_path / "grpo", algorithm="grpo", final_em=0.3, final_f1=0.3667, collapse=0.5)
    warm = tmp_path / "warm_start" / "eval.json"
    warm.parent.mkdir()
    warm.write_text(json.dumps({"step": 0, "em": 0.25, "f1": 0.3, "n": 90,
                                "by_hops": {"1": {"em": 0.6, "f1": 0.7, "n": 30}, "2": {"em": 0.1, "f1": 0.15, "n": 30},
                                            "3": {"em": 0.05, "f1": 0.05, "n": 30}}}))
    return {"IGPO": igpo, "GRPO": grpo}, warm


def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert np.ptp(image[..., :3]) > 0  # something was drawn


def test_write_report_tables_and_plots(runs, tmp_path):
    run_dirs, warm = runs
    report = write_report(run_dirs, tmp_path / "out", warm_start_eval=warm)
    assert report == tmp_path / "out" / "report.md"
    text = report.read_text()
    for name in (EM_F1_PLOT, COLLAPSE_PLOT, CASE_STUDY_PLOT):
        _assert_png(tmp_path / "out" / name)
        assert f"]({name})" in text

    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| policy |"))
    assert header == ("| policy | 1-hop EM | 1-hop F1 | 2-hop EM | 2-hop F1 | 3-hop EM | 3-hop F1 | EM | F1 | n "
                      "| EM vs warm start |")
    assert "| warm start | 60.0 | 70.0 | 10.0 | 15.0 | 5.0 | 5.0 | 25.0 | 30.0 | 90 | +0.0 |" in lines
    assert "| IGPO | 80.0 | 85.0 | 50.0 | 55.0 | 12.5 | 25.0 | 43.3 | 50.0 | 90 | +18.3 |" in lines
    assert "| GRPO | 80.0 | 85.0 | 50.0 | 55.0 | 12.5 | 25.0 | 30.0 | 36.7 | 90 | +5.0 |" in lines
    assert "- IGPO: held-out EM 43.3 vs warm start 25.0 (+18.3 points)." in lines
    assert "- IGPO: mean collapse rate 12.5%." in lines and "- GRPO: mean collapse rate 50.0%." in lines

    # The case study is the multi-turn trajectory with a positive outcome, not the first or last line.
    assert "Question: In which country was Mira Tosk born?  " in lines
    # Control characters (NUL, ESC) in model text become spaces; white space runs collapse.
    assert "| 2 | 0.330 | -0.040 | -0.500 | `<search> Velum [31m </search>` |" in lines
    assert "| 3 | 0.290 | final | +1.250 | `<answer> Borania </answer>` |" in lines

    assert "| reward_mean | 0.6 / 0.35 | 0.6 / 0.35 |" in lines  # last / mean over steps
    assert not any(line.startswith("| kl ") for line in lines)  # logged only as null
    assert '| algorithm | `"igpo"` | `"grpo"` |' in lines
    assert not any(line.startswith("| seed ") for line in lines)  # identical settings are not listed


def test_report_without_eval_files_trajectories_or_warm_start(tmp_path):
    run = _write_run(tmp_path / "run", algorithm="igpo", final_em=0.5, final_f1=0.75, collapse=0.0,
                     eval_file=False, trajectories=False)
    text = write_report({"IGPO": run}, tmp_path / "out").read_text()
    # falls back on the last held-out evaluation in metrics.jsonl (step 6)
    assert "| IGPO | 50.0 | 75.0 | n/a |" in text
    assert "No trajectories were recorded." in text
    assert not (tmp_path / "out" / CASE_STUDY_PLOT).exists()
    _assert_png(tmp_path / "out" / EM_F1_PLOT)
    _assert_png(tmp_path / "out" / COLLAPSE_PLOT)


def test_report_per_data_source_table_in_paper_order(runs, tmp_path):
    run_dirs, _ = runs
    by_source = {"popqa": 0.2, "nq": 0.4, "Bamboogle": 0.1, "hotpotqa": 0.3, "custom": 0.5}
    (run_dirs["IGPO"] / "eval.json").write_text(json.dumps(
        {"step": 6, "em": 0.3, "f1": 0.4, "by_data_source": {key: {"em": em, "f1": em, "n": 10} for key, em in by_source.items()}}))
    lines = write_report(run_dirs, tmp_path / "out", warm_start_eval=None).read_text().splitlines()
    assert "| policy | metric | NQ | HotpotQA | Bamboogle | PopQA | custom | Avg. |" in lines
    assert "| IGPO | EM | 40.0 | 30.0 | 10.0 | 20.0 | 50.0 | 30.0 |" in lines
    assert "| GRPO | EM | - | - | - | - | - | - |" in lines


def test_paper_table_pools_spellings_and_averages_datasets():
    result = {
        "by_data_source": {
            "nq": {"em": 0.5, "f1": 0.6, "n": 10},
            "triviaqa": {"em": 0.2, "f1": 0.4, "n": 1},
            "tq": {"em": 0.4, "f1": 0.4, "n": 3},
            "Bamboogle": {"em": 0.1, "f1": 0.2, "n": 5},
            "world": {"em": 1.0, "f1": 1.0, "n": 2},
        }
    }
    lines = paper_table({"IGPO": result, "GRPO": {"by_data_source": {"popqa": {"em": 0.25, "f1": 0.5, "n": 4}}}})
    assert lines[0] == "| policy | metric | NQ | TQ | Bamboogle | PopQA | world | Avg. |"
    tq_em = (0.2 * 1 + 0.4 * 3) / 4  # both TriviaQA spellings pooled by question count
    average = (0.5 + tq_em + 0.1 + 1.0) / 4  # mean over the datasets present
    assert lines[2] == f"| IGPO | EM | 50.0 | {100 * tq_em:.1f} | 10.0 | - | 100.0 | {100 * average:.1f} |"
    assert lines[4] == "| GRPO | EM | - | - | - | 25.0 | - | 25.0 |"
    assert lines[5] == "| GRPO | F1 | - | - | - | 50.0 | - | 50.0 |"


def test_loaders_read_what_they_are_given(runs):
    run_dirs, warm = runs
    metrics = load_metrics(run_dirs["IGPO"] / "metrics.jsonl")
    assert [record["step"] for record in metrics] == [1, 2, 3, 4, 5, 6]
    assert load_eval(warm.parent)["em"] == 0.25  # a directory holding eval.json works too
    trajectories = load_trajectories(run_dirs["GRPO"] / "trajectories.jsonl")
    assert [len(trajectory["turns"]) for trajectory in trajectories] == [2, 3, 1]


@pytest.mark.parametrize("content, message", [
    ('{"step": 1}\n{"step": 2, "heldout_em": 43.0}\n', "metrics.jsonl:2: 'heldout_em' must be a number in [0, 1]"),
    ('{"step": 1}\nnot json\n', "metrics.jsonl:2: not valid JSON"),
    ('{"heldout_em": 0.5}\n', "metrics.jsonl:1: 'step' must be a non-negative int, got None"),
    ('[1, 2]\n', "metrics.jsonl:1: expected a JSON object, got list"),
])
def test_bad_metrics_raise(runs, tmp_path, content, message):
    run_dirs, _ = runs
    (run_dirs["GRPO"] / "metrics.jsonl").write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        write_report(run_dirs, tmp_path / "out")


def test_bad_eval_and_trajectories_raise(runs, tmp_path):
    run_dirs, warm = runs
    warm.write_text(json.dumps({"em": 0.3}))
    with pytest.raises(ValueError, match=re.escape("lacks 'f1'; keys present: ['em']")):
        write_report(run_dirs, tmp_path / "out", warm_start_eval=warm)
    (run_dirs["IGPO"] / "eval.json").write_text(json.dumps({"em": 0.3, "f1": 0.4, "by_hops": {"1": {"em": 2, "f1": 0.1}}}))
    with pytest.raises(ValueError, match=re.escape("by_hops['1']['em'] must be a number in [0, 1]")):
        write_report(run_dirs, tmp_path / "out")
    (run_dirs["IGPO"] / "eval.json").unlink()
    (run_dirs["IGPO"] / "trajectories.jsonl").write_text(json.dumps({"question": "q", "outcome": 1.0, "turns": [{"text": "t"}]}))
    with pytest.raises(ValueError, match=re.escape("trajectories.jsonl:1: turns[0] needs a string 'text' and numbers")):
        write_report(run_dirs, tmp_path / "out")


def test_missing_inputs_raise(runs, tmp_path):
    run_dirs, _ = runs
    with pytest.raises(ValueError, match="run_dirs must be a non-empty dict"):
        write_report({}, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="run directory for 'X' not found"):
        write_report({"X": tmp_path / "nowhere"}, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="evaluation file not found"):
        write_report(run_dirs, tmp_path / "out", warm_start_eval=tmp_path / "nowhere.json")
    (run_dirs["GRPO"] / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="run 'GRPO': .*config.json not found"):
        write_report(run_dirs, tmp_path / "out")


# --- what a reader sees: smoke runs, whole settings, plots (issue 23, items 5-7) -----------------------


def _nested_config(run_dir, config):
    (run_dir / "config.json").write_text(json.dumps(config))


def test_configuration_differences_show_nested_values_whole(runs, tmp_path):
    run_dirs, warm = runs
    long_out = "runs/" + "a-long-directory-name/" * 5 + "igpo"
    base = to_dict(RunConfig())
    igpo, grpo = json.loads(json.dumps(base)), json.loads(json.dumps(base))
    igpo["out"], grpo["out"] = long_out, long_out.replace("igpo", "grpo")
    grpo["rl"]["algorithm"], grpo["rl"]["igpo"]["ig_weight"] = "grpo", 0.0
    _nested_config(run_dirs["IGPO"], igpo)
    _nested_config(run_dirs["GRPO"], grpo)
    lines = write_report(run_dirs, tmp_path / "out", warm_start_eval=warm).read_text().splitlines()
    section = lines[lines.index("## Configuration differences"):]
    rows = [line for line in section if line.startswith("| ") and not line.startswith("| setting")]
    assert rows == [f'| out | `"{long_out}"` | `"{long_out.replace("igpo", "grpo")}"` |',  # whole: 120 characters
                    '| rl.algorithm | `"igpo"` | `"grpo"` |',
                    "| rl.igpo.ig_weight | `1.0` | `0.0` |"]


def test_a_quick_budget_report_says_it_is_a_smoke_run(runs, tmp_path):
    run_dirs, warm = runs
    for label in run_dirs:
        _nested_config(run_dirs[label], to_dict(quick_config()))
    text = write_report(run_dirs, tmp_path / "quick", warm_start_eval=warm).read_text()
    assert text.splitlines()[2] == ("> **Smoke run** (2 RL steps, 150 SFT steps of a model built from scratch: the quick "
                                    "budget, too small to learn; the numbers only show that the pipeline runs): the EM, F1 "
                                    "and collapse numbers below say nothing about IGPO or GRPO.")
    for label in run_dirs:
        _nested_config(run_dirs[label], to_dict(RunConfig()))
    assert "Smoke run" not in write_report(run_dirs, tmp_path / "full", warm_start_eval=warm).read_text()


def _lines_by_gid(ax, prefix):
    return [line for line in ax.get_lines() if str(line.get_gid()).startswith(prefix)]


def _assert_integer_step_ticks(ax):
    ticks = [tick for tick in ax.get_xticks() if ax.get_xlim()[0] <= tick <= ax.get_xlim()[1]]
    assert ticks and all(float(tick).is_integer() for tick in ticks), ticks


def test_the_plots_fit_the_data_with_integer_steps_and_visible_overlaps(runs, tmp_path):
    run_dirs, warm = runs
    loaded = [_load_run(label, directory) for label, directory in run_dirs.items()]
    figure = heldout_figure(loaded, load_eval(warm))
    em_axes, f1_axes = figure.axes
    assert em_axes.get_title() == "held-out EM" and f1_axes.get_title() == "held-out F1"
    # EM data: the warm start 25.0 at step 0, then 21.7 and 43.3 (IGPO), 15.0 and 30.0 (GRPO): the axis hugs 15-43.3
    low, high = em_axes.get_ylim()
    assert 12 < low < 15 and 43.3 < high < 46
    _assert_integer_step_ticks(em_axes)
    means = {line.get_gid(): line for line in _lines_by_gid(em_axes, "mean:")}
    assert set(means) == {"mean:IGPO", "mean:GRPO"}
    igpo, grpo = means["mean:IGPO"], means["mean:GRPO"]
    assert igpo.get_marker() != grpo.get_marker() and igpo.get_linestyle() != grpo.get_linestyle()
    assert igpo.get_markersize() > grpo.get_markersize()  # the larger marker is drawn below the smaller one
    # both start at the warm start (the same point): offset along the steps so that neither hides the other
    assert igpo.get_ydata()[0] == grpo.get_ydata()[0] == 25.0 and igpo.get_xdata()[0] < 0 < grpo.get_xdata()[0]
    assert abs(igpo.get_xdata()[0]) < 0.2
    assert [list(line.get_ydata()) for line in _lines_by_gid(em_axes, "reference")] == [[25.0, 25.0]]  # the dashed warm start
    collapse = collapse_figure(loaded)
    for ax in collapse.axes:
        _assert_integer_step_ticks(ax)
    igpo_collapse = _lines_by_gid(collapse.axes[0], "mean:IGPO")[0]
    assert list(igpo_collapse.get_ydata()) == [12.5] * 6
    assert collapse.axes[1].get_ylim()[0] > 80  # every group zero-variance (100%): not a 0-100 axis
