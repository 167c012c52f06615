"""make_search_rollout_func and make_outcome_reward_func (igpo_rewards.integrations.trl) against the
reference trainer, and a short real IGPOTrainer run through examples/trl_search_igpo.py.

The world, its byte-level BPE tokenizer and a tiny random Llama are built here
(igpo_rewards.reference_trainer). The expected values come from the reference trainer's own
path on the same model and seed: ``rollout.rollout_examples`` (G rollouts per question),
``batch.build_batch`` (turn of every token, turn starts) and ``training.score_batch`` (the probes,
micro-batched and length-sorted, from ``probe_forward``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from trl import GRPOConfig

from igpo_rewards.agent import rollout as agent_rollout
from igpo_rewards.agent.bm25 import BM25Retriever
from igpo_rewards.agent.protocol import INSTRUCTION, PROBE_TEMPLATE, observation_block, user_message
from igpo_rewards.agent.retrieval import format_observation, write_corpus_jsonl
from igpo_rewards.integrations.trl import IGPOTrainer, make_outcome_reward_func, make_search_rollout_func
from igpo_rewards.reference_trainer.batch import build_batch
from igpo_rewards.reference_trainer.config import RLConfig
from igpo_rewards.reference_trainer.modeling import save_pretrained
from igpo_rewards.reference_trainer.rollout import rollout_examples
from igpo_rewards.reference_trainer.training import score_batch
from igpo_rewards.reference_trainer.world import build_world, write_qa_parquet
from igpo_rewards.testing.tiny import build_model, train_tokenizer

from ..torch_threads import one_thread  # noqa: F401  (an autouse fixture)

ROOT = Path(__file__).resolve().parents[2]
G = 4
SETTINGS = dict(max_turns=4, max_new_tokens=12, topk=2)


@pytest.fixture(scope="module")
def world():
    return build_world(seed=3, num_train=12, num_heldout=3, num_countries=3, cities_per_country=2, num_organisations=3)


@pytest.fixture(scope="module")
def tokenizer(world):
    texts = [doc.contents for doc in world.corpus] + [example.question for example in world.train]
    texts += [INSTRUCTION, PROBE_TEMPLATE, observation_block("Doc 1(Title: \"x\") x")] * 5
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=1024).eval()


@pytest.fixture(scope="module")
def retriever(world):
    return BM25Retriever(world.corpus)


def dataset_rows(examples):
    return [{"prompt": [{"role": "user", "content": user_message(e.question)}], "answers": list(e.answers), "hops": e.hops} for e in examples]


@pytest.fixture(scope="module")
def trainer(world, tokenizer, model, tmp_path_factory):
    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trainer")), per_device_train_batch_size=G, num_generations=G, max_steps=1,
        beta=0.0, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no", seed=0,
    )
    return IGPOTrainer(  # on a copy: TRL patches the model it trains, the reference path uses the original
        model=copy.deepcopy(model), reward_funcs=[make_outcome_reward_func()], args=args, train_dataset=Dataset.from_list(dataset_rows(world.train)),
        processing_class=tokenizer, rollout_func=lambda prompts, trainer: {},
    )


def call(rollout_func, trainer, examples, seed):
    """What TRL does: each question's row G times in a row; IGPOTrainer holds them while the rollout runs."""
    rows = [row for row in dataset_rows(examples) for _ in range(G)]
    trainer.igpo_batch_inputs = rows
    torch.manual_seed(seed)
    try:
        return rollout_func([row["prompt"] for row in rows], trainer), rows
    finally:
        trainer.igpo_batch_inputs = None


def reference_path(model, tokenizer, retriever, examples, seed):
    """The reference trainer's step 1-3 on the same questions: trajectories, batch tensors, probes."""
    torch.manual_seed(seed)
    trajectories = rollout_examples(model, tokenizer, retriever, examples, group_size=G, **SETTINGS).trajectories
    batch = build_batch(trajectories, tokenizer, probes=True)
    probes = score_batch(model, batch, RLConfig(micro_batch_size=3), probes=True).answer_logprob
    return trajectories, batch, probes


def turn_starts_of(env_mask, prompt_length):
    """Where each run of 1s starts, as a position in prompt + completion (plain loop)."""
    return [prompt_length + i for i, value in enumerate(env_mask) if value == 1 and (i == 0 or env_mask[i - 1] == 0)]


def assert_matches_reference(output, trajectories, batch, probes):
    assert output["logprobs"] is None
    for b, trajectory in enumerate(trajectories):
        prompt_ids, completion_ids, env_mask = output["prompt_ids"][b], output["completion_ids"][b], output["env_mask"][b]
        length = len(prompt_ids) + len(completion_ids)
        assert prompt_ids + completion_ids == trajectory.token_ids[:length]
        assert len(prompt_ids) == trajectory.prompt_length and length == trajectory.turn_spans[-1][1]
        assert env_mask == (batch.token_turn[b, len(prompt_ids) : length] >= 0).long().tolist()
        starts = turn_starts_of(env_mask, len(prompt_ids))
        assert starts == trajectory.turn_starts == batch.turn_starts[b, : trajectory.num_turns].tolist()
        assert len(output["igpo_answer_logprob"][b]) == trajectory.num_turns
        torch.testing.assert_close(torch.tensor(output["igpo_answer_logprob"][b]), probes[b, : trajectory.num_turns], rtol=1e-5, atol=1e-5)


def test_sampled_rollouts_equal_the_reference_trainers(trainer, model, tokenizer, retriever, world):
    """Same model, same seed: the same sampled tokens, env_mask, turn starts and probes."""
    examples = world.train[:3]
    output, _ = call(make_search_rollout_func(retriever, **SETTINGS), trainer, examples, seed=11)
    trajectories, batch, probes = reference_path(model, tokenizer, retriever, examples, seed=11)
    assert_matches_reference(output, trajectories, batch, probes)
    trainer.model.train()  # as during training: the rollout runs in eval mode and restores train mode
    again, _ = call(make_search_rollout_func(retriever, **SETTINGS), trainer, examples, seed=11)
    assert again == output and trainer.model.training
    assert trainer._metrics["train"]["igpo/searches_mean"] and trainer._metrics["train"]["igpo/answered_fraction"]
    trainer.model.eval()


SAMPLE_TURNS = agent_rollout.sample_turns


def scripted_turns(tokenizer, world, seed, model_share=0.0):
    """A stand-in for ``agent.rollout.sample_turns``: turns drawn from searches (gold or not),
    answers (right or wrong) and malformed text with a seeded RNG; a ``model_share`` of the rows
    are sampled by the model instead (the real ``sample_turns`` on a fresh grid of those rows'
    contexts, so the scripted rows' grid keeps no KV cache)."""
    rng = random.Random(seed)
    gold = [query for example in world.train for query in example.gold_queries]
    names = [example.answers[0] for example in world.train]
    choices = [
        lambda: f"<search> {rng.choice(gold)} </search>",
        lambda: f"<think> next </think><search> {rng.choice(gold)} </search>",
        lambda: f"<answer> {rng.choice(names)} </answer>",
        lambda: rng.choice(["so <answer> x </answer>", "<search> a", "<answer> b </search>", "<search>  </search>"]),
    ]
    weights = [4, 2, 2, 1]

    def fake_sample_turns(model, tokenizer_, grid, *, max_new_tokens, greedy=False):
        contexts = grid.contexts
        sampled = [index for index in range(len(contexts)) if rng.random() < model_share]
        turns = [tokenizer(rng.choices(choices, weights)[0](), add_special_tokens=False)["input_ids"] for _ in contexts]
        if sampled:
            rows = [SimpleNamespace(context=list(contexts[i]), stop_reason="") for i in sampled]
            real = SAMPLE_TURNS(model, tokenizer_, agent_rollout.TurnGrid(rows), max_new_tokens=max_new_tokens, greedy=greedy)
            for index, turn in zip(sampled, real):
                turns[index] = turn
        return turns

    return fake_sample_turns


def test_multi_turn_rollouts_equal_the_reference_trainers(monkeypatch, trainer, model, tokenizer, retriever, world):
    """Scripted multi-turn turns (the model's probes are real): layout, probes and rewards match the
    reference, through a search callable that answers Search-R1 contents strings."""
    examples = world.train[:4]

    def search(queries, topk):
        return [[doc.contents for doc in docs] for docs in retriever.search(queries, topk)]

    monkeypatch.setattr(agent_rollout, "sample_turns", scripted_turns(tokenizer, world, seed=5))
    output, rows = call(make_search_rollout_func(search, **SETTINGS), trainer, examples, seed=0)
    monkeypatch.setattr(agent_rollout, "sample_turns", scripted_turns(tokenizer, world, seed=5))
    trajectories, batch, probes = reference_path(model, tokenizer, retriever, examples, seed=0)
    assert_matches_reference(output, trajectories, batch, probes)
    turns = sorted({t.num_turns for t in trajectories})
    assert turns[0] == 1 and turns[-1] >= 3, turns
    assert {t.stop_reason.split(":")[0] for t in trajectories} >= {"answer", "invalid"}

    # The outcome reward, on the text TRL decodes from completion_ids, is the reference's outcome.
    texts = tokenizer.batch_decode(output["completion_ids"], skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": text}] for text in texts]  # TRL's conversational form
    rewards = make_outcome_reward_func("answers")([row["prompt"] for row in rows], completions, answers=[r["answers"] for r in rows])
    assert rewards == [t.outcome for t in trajectories]
    assert -2.0 in rewards  # malformed turns end their rollout with the format penalty


def test_the_rollout_refuses_what_would_change_igpo(trainer, retriever, world):
    rollout_func = make_search_rollout_func(retriever, **SETTINGS)
    examples = world.train[:1]
    with pytest.raises(TypeError, match="runs under igpo_rewards.integrations.trl.IGPOTrainer"):
        rollout_func(["a prompt"], object())
    with pytest.raises(ValueError, match="trainer.igpo_batch_inputs is None"):
        rollout_func([dataset_rows(examples)[0]["prompt"]], trainer)
    for name, value, message in [
        ("use_vllm", True, "use_vllm=True is not supported"),
        ("mask_truncated_completions", True, "would mask every search rollout"),
        ("temperature", 0.7, r"would not be applied: \{'temperature': 0.7\}"),
        ("top_p", 0.9, r"\{'top_p': 0.9\}"),
        ("generation_kwargs", {"top_k": 5}, "generation_kwargs"),
    ]:
        original = getattr(trainer.args, name)
        setattr(trainer.args, name, value)
        try:
            with pytest.raises(ValueError, match=message):
                call(rollout_func, trainer, examples, seed=0)
        finally:
            setattr(trainer.args, name, original)
    with pytest.raises(ValueError, match=r"no column 'golden_answers' .* its columns: \['answers', 'hops', 'prompt'\]"):
        call(make_search_rollout_func(retriever, answers_column="golden_answers"), trainer, examples, seed=0)
    trainer.igpo_batch_inputs = dataset_rows(world.train[:2])
    try:
        with pytest.raises(ValueError, match=r"prompts\[0\] is not the 'prompt' of trainer.igpo_batch_inputs\[0\]"):
            rollout_func([trainer.igpo_batch_inputs[1]["prompt"], trainer.igpo_batch_inputs[0]["prompt"]], trainer)
    finally:
        trainer.igpo_batch_inputs = None


def test_bad_settings_are_refused_when_built():
    with pytest.raises(TypeError, match="retriever must be a Search-R1 /retrieve URL"):
        make_search_rollout_func(42)
    with pytest.raises(ValueError, match="url must be an http"):
        make_search_rollout_func("localhost:8000")
    with pytest.raises(ValueError, match="max_turns must be >= 1, got 0"):
        make_search_rollout_func("http://127.0.0.1:8000", max_turns=0)
    with pytest.raises(TypeError, match="topk must be an int, got str '3'"):  # a wrong type is a TypeError
        make_search_rollout_func("http://127.0.0.1:8000", topk="3")
    with pytest.raises(TypeError, match="probe_layout must be a str"):
        make_search_rollout_func("http://127.0.0.1:8000", probe_layout=1)
    with pytest.raises(ValueError, match="probe_layout must be one of"):
        make_search_rollout_func("http://127.0.0.1:8000", probe_layout="dense")
    with pytest.raises(ValueError, match="metric"):
        make_outcome_reward_func(metric="bleu")
    reward = make_outcome_reward_func("answers", metric="em")
    assert reward.__name__ == "outcome_em"
    assert reward(["p", "p"], ["<answer> Paris </answer>", "<answer> Paris"], answers=[["Paris"], "x<|answer_split|>Paris"]) == [1.0, -2.0]
    with pytest.raises(ValueError, match=r"no column 'answers' .* got \['golden_answers'\]"):
        reward(["p"], ["<answer> Paris </answer>"], golden_answers=["Paris"])


# --- a short real run: the example, with igpo-retrieve serving over loopback ----------------------


def load_example():
    spec = importlib.util.spec_from_file_location("trl_search_igpo", ROOT / "examples" / "trl_search_igpo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_dir(world, tokenizer, model, tmp_path_factory):
    """A demo run directory as `igpo-train demo` writes it (data/ and warm_start/), with the tiny model."""
    directory = tmp_path_factory.mktemp("demo")
    write_corpus_jsonl(world.corpus, directory / "data" / "corpus.jsonl")
    write_qa_parquet(world.train, directory / "data" / "train.parquet", split="train")
    write_qa_parquet(world.heldout, directory / "data" / "heldout.parquet", split="test")
    save_pretrained(model, tokenizer, directory / "warm_start")
    return directory


def test_two_training_steps_of_the_example(monkeypatch, demo_dir, world, tokenizer, tmp_path):
    """IGPOTrainer.train() for two steps with the real rollout function, tokenizer and retrieval server
    (igpo-retrieve over loopback), a TRL evaluation (the rollout function in eval mode) and a
    checkpoint per step. The tiny random model alone writes no valid turn (every outcome -2.0, all
    advantages 0), so a share of the turns is scripted to give the update a signal."""
    monkeypatch.setattr(agent_rollout, "sample_turns", scripted_turns(tokenizer, world, seed=1, model_share=0.25))
    out = tmp_path / "run"
    result = load_example().main([
        "--demo_dir", str(demo_dir), "--output_dir", str(out), "--max_steps", "2", "--num_generations", "2",
        "--per_device_train_batch_size", "4", "--steps_per_generation", "1", "--save_steps", "1", "--logging_steps", "1",
        "--learning_rate", "1e-2", "--eval_strategy", "steps", "--eval_steps", "2", "--per_device_eval_batch_size", "4",
        "--max_new_tokens", "12", "--eval_batch_size", "8",
    ])
    assert result["optimizer_steps"] == 2 and result["rollouts"] == 8
    for scores in (result["warm_start"], result["trained"]):
        assert scores["n"] == 3 and 0.0 <= scores["em"] <= 1.0 and scores["by_hops"]
    assert json.loads((out / "heldout_em.json").read_text()) == result
    assert result["pipeline_check"]["ok"], result["pipeline_check"]  # scripted turns: rewards vary, advantages and gradient nonzero
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logged = {key for record in state["log_history"] for key in record}
    for key in ("loss", "reward", "rewards/outcome_f1/mean", "igpo/turns_mean", "igpo/information_gain_mean",
                "igpo/searches_mean", "igpo/answered_fraction", "eval_reward", "eval_igpo/turns_mean"):
        assert key in logged, key
    assert (out / "checkpoint-1" / "model.safetensors").is_file()
    start, trained = load_file(demo_dir / "warm_start" / "model.safetensors"), load_file(out / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(start[name], trained[name]) for name in start)
