"""Checkpoints: exact round trip of weights, optimizer and RNG; atomic writes; no pickles."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from igpo_rewards.reference_trainer.checkpoint import (
    LATEST,
    checkpoint_name,
    latest_checkpoint,
    optimizer_state_from_files,
    optimizer_state_to_files,
    read_trainer_state,
    restore_training_state,
    save_checkpoint,
)
from igpo_rewards.reference_trainer.cli import tokenizer_texts
from igpo_rewards.reference_trainer.modeling import load_pretrained, save_pretrained
from igpo_rewards.reference_trainer.world import build_world
from igpo_rewards.testing.tiny import build_model, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["<search> Ilsa Marr </search> was born in Tovia"] * 4, vocab_size=300)


def trained(tokenizer, steps=3):
    """A tiny model and its AdamW after a few steps (so every optimizer state tensor is non-trivial)."""
    model = build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.tensor([tokenizer("<search> Ilsa Marr </search>")["input_ids"]])
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return model, optimizer


def test_optimizer_state_split_round_trip(tokenizer):
    _, optimizer = trained(tokenizer)
    tensors, meta = optimizer_state_to_files(optimizer)
    assert all(isinstance(value, torch.Tensor) for value in tensors.values())
    json.dumps(meta)  # everything else is JSON
    rebuilt = optimizer_state_from_files(tensors, json.loads(json.dumps(meta)))
    original = optimizer.state_dict()
    assert rebuilt["param_groups"] == original["param_groups"]
    assert set(rebuilt["state"]) == set(original["state"])
    for index, values in original["state"].items():
        assert set(rebuilt["state"][index]) == set(values)
        for name, value in values.items():
            assert torch.equal(rebuilt["state"][index][name], value)


def test_checkpoint_round_trip_is_exact(tmp_path, tokenizer):
    model, optimizer = trained(tokenizer)
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)
    path = save_checkpoint(tmp_path, step=7, model=model, tokenizer=tokenizer, optimizer=optimizer, trainer_state={"algorithm": "igpo"})
    assert path == tmp_path / checkpoint_name(7) == tmp_path / "step_000007"
    expected_draws = (torch.rand(3), random.random(), np.random.rand())

    # scramble every RNG, then restore into a freshly loaded model + optimizer
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    loaded, _ = load_pretrained(path)
    fresh = torch.optim.AdamW(loaded.parameters(), lr=1e-2, weight_decay=0.1)
    state = restore_training_state(path, fresh)
    assert state == {"algorithm": "igpo", "step": 7}
    draws = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    for index, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            assert torch.equal(fresh.state_dict()["state"][index][name], value)
    # continuing both gives the same weights
    ids = torch.tensor([tokenizer("was born in Tovia")["input_ids"]])
    for m, o in ((model, optimizer), (loaded, fresh)):
        o.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_holds_no_pickle(tmp_path, tokenizer):
    model, optimizer = trained(tokenizer, steps=1)
    path = save_checkpoint(tmp_path, step=1, model=model, tokenizer=tokenizer, optimizer=optimizer)
    names = sorted(p.name for p in path.iterdir())
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))], names
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        assert load_file(path / name)  # readable as safetensors
    for name in ("optimizer.json", "rng.json", "trainer_state.json", "config.json"):
        json.loads((path / name).read_text())


def test_latest_pointer_pruning_and_leftovers(tmp_path, tokenizer):
    model, optimizer = trained(tokenizer, steps=1)
    assert latest_checkpoint(tmp_path) is None and latest_checkpoint(tmp_path / "missing") is None
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step=step, model=model, tokenizer=tokenizer, optimizer=optimizer, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000002", "step_000003"]
    assert (tmp_path / LATEST).read_text().strip() == "step_000003"
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000003"
    # a write killed half way leaves a temporary directory, never a step_* one: it is ignored
    torn = tmp_path / ".step_000004.tmp-999"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000003"
    # a latest pointer to a checkpoint that is gone falls back on the newest complete one
    (tmp_path / LATEST).write_text("step_000009\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000003"
    # writing the same step again replaces it in place
    save_checkpoint(tmp_path, step=3, model=model, tokenizer=tokenizer, optimizer=optimizer, trainer_state={"again": True})
    assert read_trainer_state(tmp_path / "step_000003") == {"again": True, "step": 3}
    assert not list(tmp_path.glob(".step_000003*"))


def test_checkpoint_errors(tmp_path, tokenizer):
    model, optimizer = trained(tokenizer, steps=1)
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        save_checkpoint(tmp_path, step=-1, model=model, tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="trainer_state.json is missing"):
        restore_training_state(tmp_path, optimizer)
    path = save_checkpoint(tmp_path, step=1, model=model, tokenizer=tokenizer)  # no optimizer saved
    with pytest.raises(FileNotFoundError, match="no optimizer state"):
        restore_training_state(path, optimizer)


# --- resume: a run killed mid-step continues to the uninterrupted result ------------------------------


def _train_command(init, out, *extra):
    return [
        sys.executable, "-m", "igpo_rewards.reference_trainer.cli", "train", "--init", str(init), "--out", str(out),
        "--threads", "1", "--no-progress", "--seed", "3",
        "--world.num-train", "12", "--world.num-heldout", "3", "--world.num-countries", "2",
        "--world.cities-per-country", "2", "--world.num-organisations", "2",
        "--rl.steps", "4", "--rl.questions-per-step", "2", "--rl.group-size", "3", "--rl.max-new-tokens", "5",
        "--rl.max-turns", "2", "--rl.checkpoint-every", "1", "--rl.eval-every", "2", "--eval.max-questions", "3", *extra,
    ]


def _run(command):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _without_timing(path):
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("seconds") and k != "tokens_per_second"} for r in records]


def test_resume_after_a_kill_mid_step_matches_the_uninterrupted_run(tmp_path):
    world = build_world(seed=0, num_train=12, num_heldout=3, num_countries=2, cities_per_country=2, num_organisations=2)
    tokenizer = train_tokenizer(tokenizer_texts(world), vocab_size=400)
    model = build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=1024)
    init = save_pretrained(model, tokenizer, tmp_path / "init")

    full, killed = tmp_path / "full", tmp_path / "killed"
    _run(_train_command(init, full))

    process = subprocess.Popen(_train_command(init, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = killed / "checkpoints" / LATEST
    deadline = time.monotonic() + 300
    while not (pointer.is_file() and pointer.read_text().strip() in ("step_000001", "step_000002")):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.01)
    process.kill()  # SIGKILL in the middle of the next step: no cleanup code gets to run
    process.wait()
    assert not (killed / "checkpoints" / "step_000004").exists() and not (killed / "eval.json").exists()

    _run(_train_command(init, killed, "--resume"))
    final_full, final_killed = full / "checkpoints" / "step_000004", killed / "checkpoints" / "step_000004"
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        expected, resumed = load_file(final_full / name), load_file(final_killed / name)
        assert expected.keys() == resumed.keys()
        for key in expected:
            assert torch.equal(expected[key], resumed[key]), (name, key)
    assert _without_timing(killed / "metrics.jsonl") == _without_timing(full / "metrics.jsonl")
    assert [r["step"] for r in _without_timing(killed / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    assert json.loads((killed / "eval.json").read_text()) == json.loads((full / "eval.json").read_text())
    # the per-question evaluations too: one record per evaluation step, none twice after the resume
    evaluations = (killed / "evaluations.jsonl").read_text()
    assert evaluations == (full / "evaluations.jsonl").read_text()
    assert len(evaluations.splitlines()) == len([r for r in _without_timing(full / "metrics.jsonl") if "heldout_em" in r])
