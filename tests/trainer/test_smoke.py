"""CI smoke test of the whole pipeline: ``igpo-train demo --quick --out DIR`` on a tiny budget.

World -> tokenizer -> tiny model -> warm start -> IGPO and GRPO from the same start (two
processes) -> evaluation -> report.md. Checks the files a user gets and their consistency,
not the numbers (the quick budget is far too small to learn anything).
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest


def test_console_scripts_are_registered():
    scripts = {entry.name: entry.value for entry in entry_points(group="console_scripts")}
    assert scripts.get("igpo-train") == "igpo_rewards._console:igpo_train"
    assert scripts.get("igpo-retrieve") == "igpo_rewards._console:igpo_retrieve"


@pytest.mark.parametrize(("command", "blocked", "extra"), [("igpo_train", "torch", "trainer"), ("igpo_retrieve", "fastapi", "server")])
def test_console_script_names_the_missing_extra(command, blocked, extra):
    # A NumPy-only install has the console scripts too: without the extra's packages they say
    # which extra to install instead of dying with a raw ModuleNotFoundError.
    code = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        f"from igpo_rewards import _console\n"
        f"sys.exit(_console.{command}())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f'pip install "igpo-rewards[{extra}] @ git+$IGPO_GIT"' in result.stderr  # the README's form: no registry has it
    assert f'pip install ".[{extra}]" in a clone' in result.stderr
    assert repr(blocked) in result.stderr
    assert "Traceback" not in result.stderr


def run_quick_demo(out):
    command = [sys.executable, "-m", "igpo_rewards.reference_trainer.cli", "demo", "--quick", "--out", str(out), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "held-out EM: warm start" in result.stdout


def without_timing(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("seconds") and k != "tokens_per_second"} for r in records]


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    run_quick_demo(out)

    # the data in the Search-R1 / verl layouts, the warm start, the two runs
    for name in ("data/corpus.jsonl", "data/train.parquet", "data/heldout.parquet", "config.json",
                 "warm_start/model.safetensors", "warm_start/eval.json", "igpo/eval.json", "grpo/eval.json"):
        assert (out / name).is_file(), name
    phases = [json.loads(line)["phase"] for line in (out / "warm_start" / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((out / "config.json").read_text())
    assert phases == ["pretrain"] * config["warm_start"]["pretrain_steps"] + ["sft"] * config["warm_start"]["steps"]
    steps = config["rl"]["steps"]
    for label in ("igpo", "grpo"):
        run_config = json.loads((out / label / "config.json").read_text())
        assert run_config["rl"]["algorithm"] == label and run_config["init"] == str(out / "warm_start")
        records = [json.loads(line) for line in (out / label / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(steps + 1))
        assert (out / label / "checkpoints" / f"step_{steps:06d}" / "model.safetensors").is_file()

    # one metrics.jsonl with every run, and the report with its plots
    merged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["run"] for r in merged} == {"warm_start", "igpo", "grpo"}
    warm = json.loads((out / "warm_start" / "eval.json").read_text())
    starts = {r["run"]: r["heldout_em"] for r in merged if r["step"] == 0}
    assert starts == {"warm_start": warm["em"], "igpo": warm["em"], "grpo": warm["em"]}  # same start, same greedy EM
    report = (out / "report.md").read_text()
    assert "IGPO" in report and "GRPO" in report
    assert (out / "heldout_em_f1.png").is_file() and (out / "advantage_collapse.png").is_file()


def test_demo_quick_is_deterministic(tmp_path):
    """Fixed seeds give identical runs on CPU: the same numbers, step by step, and the same weights."""
    first, second = tmp_path / "first", tmp_path / "second"
    run_quick_demo(first)
    run_quick_demo(second)
    assert without_timing(first / "metrics.jsonl") == without_timing(second / "metrics.jsonl")
    for name in ("warm_start/model.safetensors", "igpo/checkpoints/step_000002/model.safetensors",
                 "grpo/checkpoints/step_000002/model.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
