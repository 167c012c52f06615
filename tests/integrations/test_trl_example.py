"""examples/trl_search_igpo.py as a user meets it: its --help, its flags' errors, and the prompts it
reads from the demo's parquet (issue 23, items 8 and 10)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from igpo_rewards.agent.protocol import INSTRUCTION, build_prompt, user_message
from igpo_rewards.reference_trainer.cli import tokenizer_texts
from igpo_rewards.testing.tiny import train_tokenizer
from igpo_rewards.reference_trainer.world import build_world, write_qa_parquet

pytest.importorskip("trl")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trl_search_igpo.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("trl_search_igpo_cli", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world():
    return build_world(seed=3, num_train=12, num_heldout=3, num_countries=2, cities_per_country=2, num_organisations=2)


def _exit(example, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.parse_arguments(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_help_shows_the_examples_own_flags_first_and_alone(example, capsys):
    code, out, _ = _exit(example, ["--help"], capsys)
    assert code == 0
    flags = ("--demo_dir", "--max_turns", "--max_new_tokens", "--topk", "--threads", "--eval_batch_size")
    text = " ".join(out.split())
    for flag, meaning in zip(flags, ("A demo run directory", "Most turns per rollout", "Most tokens generated per turn",
                                     "Documents returned per search", "Torch CPU threads", "Held-out questions per generate")):
        assert f"{flag} {flag[2:].upper()}" in text and meaning in text, flag
    assert text.index("--demo_dir") < text.index("GRPOConfig values this example sets")
    for name, value in example.RUN_DEFAULTS.items():
        assert f"--{name} {value}" in out
    assert "--help_trl lists all of them" in text
    assert "--per_device_eval_batch_size" not in out and len(out.splitlines()) < 80  # not TRL's 1,300 lines
    code, out, _ = _exit(example, ["--help_trl"], capsys)
    assert code == 0 and "--per_device_eval_batch_size" in out and "--demo_dir" in out


def test_a_misspelled_flag_gets_suggestions(example, capsys):
    code, _, err = _exit(example, ["--max_tunrs", "3", "--demo-dirr", "x"], capsys)
    assert code == 2
    assert "error: unknown flag --max_tunrs; did you mean --max_turns" in err
    assert "unknown flag --demo-dirr; did you mean --demo_dir" in err and "--help lists this example's flags" in err
    args, config = example.parse_arguments(["--topk", "5", "--max_steps", "4"])
    assert args.topk == 5 and config.max_steps == 4 and config.num_generations == 8  # RUN_DEFAULTS


def test_a_retrieval_server_that_exits_says_why_in_the_error(example, tmp_path):
    """The real igpo-retrieve, on a corpus that does not exist: it exits before serving, and the
    example's error carries the server's own reason (issue 23, point 2: a bare exit status told the
    user nothing)."""
    missing = tmp_path / "no_corpus.jsonl"
    with pytest.raises(RuntimeError) as error:
        with example.serve_corpus(missing, timeout_s=60):
            pass
    message = str(error.value)
    assert "igpo-retrieve exited with status 1 before serving" in message
    assert f"corpus file not found: {missing}" in message


def test_the_demo_parquet_holds_the_prompt_the_trainer_uses(world, tmp_path):
    """write_qa_parquet writes the Search-R1 instruction the reference trainer rolls out from, so a
    TRL or verl user who reads the file as is trains on the same text."""
    tokenizer = train_tokenizer(tokenizer_texts(world), vocab_size=600)
    path = write_qa_parquet(world.train, tmp_path / "train.parquet")
    prompts = pq.read_table(path).column("prompt").to_pylist()
    for prompt, example in zip(prompts, world.train):
        assert prompt == [{"role": "user", "content": user_message(example.question)}]
        assert tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == build_prompt(example.question, tokenizer)


def test_the_example_uses_the_parquet_prompt_as_is(example, world, tmp_path):
    path = write_qa_parquet(world.train, tmp_path / "train.parquet")
    dataset, examples = example.qa_dataset(path)
    assert examples == world.train
    for row, question in zip(dataset, world.train):
        content = row["prompt"][-1]["content"]
        assert content == user_message(question.question) and content.count(INSTRUCTION.split("{")[0]) == 1  # not wrapped twice
        assert row["answers"] == list(question.answers)
    old = pq.read_table(path)  # a parquet of the old layout: the bare question
    bare = [[{"role": "user", "content": e.question}] for e in world.train]
    pq.write_table(old.set_column(old.column_names.index("prompt"), "prompt", pa.array(bare)), tmp_path / "old.parquet")
    with pytest.raises(ValueError, match=r"old.parquet: row 0: the prompt is not the Search-R1 instruction .* re-run `igpo-train demo`"):
        example.qa_dataset(tmp_path / "old.parquet")


# --- budgets, smoke runs and the pipeline check (issue 23, item 4) --------------------------------------


def test_a_budget_sets_its_grpo_values_and_explicit_flags_win(example):
    for name, values in example.BUDGETS.items():
        args, config = example.parse_arguments(["--budget", name])
        assert args.budget == name
        for key, value in {**example.RUN_DEFAULTS, **values}.items():
            assert getattr(config, key) == ([] if key == "report_to" else value), (name, key)  # GRPOConfig: "none" -> []
    assert example.BUDGETS["quick"]["max_steps"] == 2 and example.BUDGETS["full"] == {}
    assert example.BUDGETS["mid"]["max_steps"] < example.RUN_DEFAULTS["max_steps"]
    _, config = example.parse_arguments(["--budget", "mid", "--max_steps", "7", "--save_steps=3"])
    assert config.max_steps == 7 and config.save_steps == 3 and config.learning_rate == example.RUN_DEFAULTS["learning_rate"]


def test_a_smoke_run_is_named_with_its_reasons(example, tmp_path):
    from igpo_rewards.reference_trainer.config import RunConfig, budget_config, to_dict

    quick, full = tmp_path / "quick", tmp_path / "full"
    for directory, config in ((quick, budget_config(RunConfig(), "quick")), (full, RunConfig())):
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(to_dict(config)))
    _, one_round = example.parse_arguments(["--budget", "quick"])
    _, thirty_rounds = example.parse_arguments([])
    sft = budget_config(RunConfig(), "quick").warm_start.steps
    reasons = example.smoke_reasons(quick, one_round)
    assert reasons == [f"{quick}'s warm start has {sft} SFT steps of a model built from scratch (the quick budget): it rarely "
                       "writes a well-formed turn and never a right answer", "1 round of rollouts (--max_steps 2)"]
    assert example.smoke_reasons(full, thirty_rounds) == [] and example.smoke_reasons(tmp_path / "none", thirty_rounds) == []
    notice = example.smoke_notice(reasons)
    assert notice.splitlines()[1].startswith("SMOKE RUN: ") and "igpo-train demo --budget mid" in notice


def _recorder(example, probes, gains):
    recorder = example.RolloutRecorder(rollout_func=None)
    recorder.probes, recorder.information_gain = probes, gains
    return recorder


WORKING_LOG = [{"loss": 0.3, "grad_norm": 0.7, "reward": -1.8, "frac_reward_zero_std": 0.375, "igpo/answered_fraction": 0.1,
                "igpo/zero_advantage_group_fraction": 0.25}, {"loss": 0.2, "grad_norm": 0.8}]


def test_the_pipeline_check_tells_working_from_no_signal_from_broken(example):
    working = example.pipeline_check(_recorder(example, [[-1.0, -0.5], [-2.0]], [0.24]), WORKING_LOG, 2e-4)
    assert working["ok"] and working["verdict"].startswith("WORKING")
    rows = {check["name"]: check for check in working["checks"]}
    assert rows["advantages"]["value"] == "nonzero in 75% of the groups" and rows["advantages"]["ok"]
    assert rows["probes"]["value"].startswith("3 scored for 3 turns, 3 finite") and rows["turns per rollout"]["ok"] is None
    assert rows["information gain"]["value"] == "1 non-final turns, 1 nonzero, mean +0.2400"

    silent = [{"loss": 0.0, "grad_norm": 0.0, "reward": -2.0, "frac_reward_zero_std": 1.0, "igpo/answered_fraction": 0.0,
               "igpo/zero_advantage_group_fraction": 1.0}]
    no_signal = example.pipeline_check(_recorder(example, [[-5.0], [-5.5]], []), silent, 0.0)
    assert not no_signal["ok"] and no_signal["verdict"].startswith("NO LEARNING SIGNAL: every advantage was 0")
    assert "the policy does not write the Search-R1 format" in no_signal["verdict"]
    constant_reward = example.pipeline_check(_recorder(example, [[-1.0, -1.0], [-2.0]], [0.0]),
                                             [{**silent[0], "igpo/answered_fraction": 0.5}], 0.0)
    assert "check the reward function and its answers column" in constant_reward["verdict"]

    broken = example.pipeline_check(_recorder(example, [[-1.0, float("nan")]], [0.1]), WORKING_LOG, 1e-4)
    assert not broken["ok"] and broken["verdict"].startswith("BROKEN")
    assert not example.pipeline_check(_recorder(example, [], []), [], 0.0)["ok"]
    text = example.format_check(no_signal)
    assert "[NO] advantages" in text and "[ok] rollouts" in text and "verdict: NO LEARNING SIGNAL" in text


@pytest.fixture(scope="module")
def random_policy_demo(world, tmp_path_factory):
    """A demo directory whose warm start is a tiny random model: it never writes a well-formed turn."""
    from igpo_rewards.agent.retrieval import write_corpus_jsonl
    from igpo_rewards.reference_trainer.modeling import save_pretrained
    from igpo_rewards.testing.tiny import build_model

    directory = tmp_path_factory.mktemp("random_demo")
    tokenizer = train_tokenizer(tokenizer_texts(world), vocab_size=600)
    model = build_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=1024)
    write_corpus_jsonl(world.corpus, directory / "data" / "corpus.jsonl")
    write_qa_parquet(world.train, directory / "data" / "train.parquet", split="train")
    write_qa_parquet(world.heldout, directory / "data" / "heldout.parquet", split="test")
    save_pretrained(model, tokenizer, directory / "warm_start")
    return directory


def test_a_set_up_without_signal_fails_the_check_loudly(example, random_policy_demo, tmp_path, capsys):
    """The issue's silent run: every reward -2, loss 0, grad_norm 0, EM 0 -> 0. The example now says it
    is a smoke run, and its pipeline check says why nothing was trained (the exit status is 1)."""
    from igpo_rewards.integrations.trl import ZeroAdvantageWarning

    with pytest.warns(ZeroAdvantageWarning):
        result = example.main(["--demo_dir", str(random_policy_demo), "--output_dir", str(tmp_path / "run"), "--budget",
                               "quick", "--num_generations", "2", "--per_device_train_batch_size", "4", "--max_new_tokens",
                               "8", "--eval_batch_size", "8"])
    out = capsys.readouterr().out
    # docs/first_hour.md's "broken set-up" column, value by value
    history = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    steps = [record for record in history if "loss" in record]  # both optimizer steps
    rounds = [record for record in history if "reward" in record]  # the round's rollout metrics, logged at its first step
    assert len(steps) == 2 and len(rounds) == 1 and result["warm_start"]["em"] == result["trained"]["em"] == 0.0
    assert all((record["loss"], record["grad_norm"]) == (0.0, 0.0) for record in steps), steps
    assert (rounds[0]["reward"], rounds[0]["igpo/zero_advantage_group_fraction"]) == (-2.0, 1.0), rounds
    assert out.count("SMOKE RUN: 1 round of rollouts (--max_steps 2)") == 2  # at the start and at the end
    check = result["pipeline_check"]
    assert not check["ok"] and check["verdict"].startswith("NO LEARNING SIGNAL")
    rows = {row["name"]: row for row in check["checks"]}
    assert rows["rollouts"]["ok"] and rows["probes"]["ok"] and rows["rollouts"]["value"] == "8 made"
    assert not rows["advantages"]["ok"] and not rows["update"]["ok"]
    assert "pipeline check (training rollouts):" in out and "verdict: NO LEARNING SIGNAL" in out
    assert json.loads((tmp_path / "run" / "heldout_em.json").read_text())["pipeline_check"] == check
