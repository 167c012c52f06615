"""examples/trl_search_igpo.py as a user meets it: its --help, its flags' errors, and the prompts it
reads from the demo's parquet (issue 23, items 8 and 10)."""

from __future__ import annotations

import importlib.util
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
