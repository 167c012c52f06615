"""Warm start: demonstrations (gold chains, deliberate mistakes, renaming), SFT loss, a short run."""

from __future__ import annotations

import random

import pytest
import torch

from igpo_rewards.agent.bm25 import BM25Retriever
from igpo_rewards.agent.probes import build_probe_suffix, token_logprobs
from igpo_rewards.agent.protocol import build_prompt, observation_block, parse_action
from igpo_rewards.agent.retrieval import format_observation
from igpo_rewards.reference_trainer.batch import build_batch
from igpo_rewards.reference_trainer.cli import tokenizer_texts
from igpo_rewards.reference_trainer.config import WarmStartConfig
from igpo_rewards.reference_trainer.warm_start import (
    NamePool,
    RenamingRetriever,
    build_demonstration,
    demonstrated_questions,
    demonstration_turns,
    pretraining_documents,
    renamed,
    sft_loss,
    warm_start,
)
from igpo_rewards.reference_trainer.world import QAExample, build_world
from igpo_rewards.scoring import outcome_reward
from igpo_rewards.testing.tiny import build_model, train_tokenizer

from ..probe_oracle import naive_probe_logprobs

CHAIN = QAExample(
    "What is the capital of the country where Ilsa Marr was born?", ("Tovia",), 3, "world",
    ("Ilsa Marr", "Kelm", "Borania"), ("Kelm", "Borania", "Tovia"),
)


@pytest.fixture(scope="module")
def world():
    return build_world(seed=2, num_train=24, num_heldout=6, num_countries=3, cities_per_country=2, num_organisations=3)


@pytest.fixture(scope="module")
def tokenizer(world):
    return train_tokenizer(tokenizer_texts(world), vocab_size=600)


def turns_of(example, **probabilities):
    settings = dict(noisy_query_prob=0.0, skip_hop_prob=0.0, think_prob=0.0, distractors=["Zed Zog", "Kelm"])
    settings.update(probabilities)
    return demonstration_turns(example, random.Random(0), **settings)


def test_perfect_demonstration_follows_the_gold_chain():
    assert turns_of(CHAIN) == [
        ("<search> Ilsa Marr </search>", "Ilsa Marr"),
        ("<search> Kelm </search>", "Kelm"),
        ("<search> Borania </search>", "Borania"),
        ("<answer> Tovia </answer>", None),
    ]


def test_skipped_hop_answers_the_last_bridge():
    assert turns_of(CHAIN, skip_hop_prob=1.0) == [
        ("<search> Ilsa Marr </search>", "Ilsa Marr"),
        ("<search> Kelm </search>", "Kelm"),
        ("<answer> Borania </answer>", None),
    ]
    one_hop = QAExample("Where was Ilsa Marr born?", ("Kelm",), 1, "world", ("Ilsa Marr",), ("Kelm",))
    assert turns_of(one_hop, skip_hop_prob=1.0)[-1] == ("<answer> Kelm </answer>", None)


def test_noisy_queries_come_before_the_right_one():
    turns = turns_of(CHAIN, noisy_query_prob=1.0)
    queries = [query for _, query in turns[:-1]]
    assert queries[1::2] == ["Ilsa Marr", "Kelm", "Borania"]
    noisy = queries[0::2]
    assert all(n != right for n, right in zip(noisy, queries[1::2]))
    assert noisy[0] in ("Marr", "Zed Zog", "Kelm")
    assert all(parse_action(text).kind == "search" for text, _ in turns[:-1])


def test_think_blocks_and_errors():
    turns = turns_of(CHAIN, think_prob=1.0)
    assert turns[0][0] == "<think> I need to find Ilsa Marr. </think> <search> Ilsa Marr </search>"
    assert [parse_action(text).kind for text, _ in turns] == ["search"] * 3 + ["answer"]
    with pytest.raises(ValueError, match="gold_queries and gold_bridge_answers"):
        turns_of(QAExample("q", ("a",), 0, "nq"))


def test_build_demonstration_layout(world, tokenizer):
    retriever = BM25Retriever(world.corpus)
    example = next(e for e in world.train if e.hops == 2)
    turns = turns_of(example)
    demo = build_demonstration(example, turns, tokenizer, retriever, topk=3)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    blocks = [observation_block(format_observation(retriever.search([q], 3)[0])) for _, q in turns[:-1]]
    expected = encode(build_prompt(example.question, tokenizer))
    for index, (text, _) in enumerate(turns):
        expected += encode(text) + (encode(blocks[index]) if index < len(blocks) else [])
    assert demo.token_ids == expected
    assert [demo.token_ids[s:e] for s, e in demo.turn_spans] == [encode(text) for text, _ in turns]
    assert len(demo.observation_spans) == 2 and demo.queries == list(example.gold_queries)
    assert outcome_reward(demo.response, list(example.answers)) == 1.0


def test_renaming(world):
    retriever = BM25Retriever(world.corpus)
    example = world.train[0]
    old = example.gold_queries[0]
    new = "Zed Zog"
    moved = renamed(example, old, new)
    assert new in moved.question and old not in moved.question and moved.gold_queries[0] == new
    docs = RenamingRetriever(retriever, old, new).search([new], 3)[0]
    assert docs[0].title == new and old not in docs[0].text and new in docs[0].text
    assert docs[0].text == retriever.search([old], 3)[0][0].text.replace(old, new)
    pool = NamePool(["Ilsa Marr", "Odo Kelm"], taken={"Ilsa Kelm", "Odo Marr", "Ilsa Marr"})
    rng = random.Random(0)
    assert {pool.draw(rng) for _ in range(20)} == {"Odo Kelm"}
    assert NamePool(["Ilsa Marr"], taken={"Ilsa Marr"}).draw(rng) is None


def test_pretraining_documents_leave_out_heldout_people(world):
    documents, people = pretraining_documents(world.corpus, world.train)
    titles = {doc.title for doc in documents}
    heldout_people = {example.gold_queries[0] for example in world.heldout}
    assert not titles & heldout_people
    assert people == {example.gold_queries[0] for example in world.train} and people <= titles


def test_sft_loss_is_the_mean_nll_of_turn_tokens(world, tokenizer):
    retriever = BM25Retriever(world.corpus)
    model = build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=1024)
    demos = [build_demonstration(e, turns_of(e), tokenizer, retriever, topk=3) for e in world.train[:3]]
    loss, parts = sft_loss(model, tokenizer, demos)
    batch = build_batch(demos, tokenizer, probes=False)
    position = torch.arange(batch.input_ids.shape[1])[None, :]
    with torch.no_grad():  # every token's log-prob; the turn tokens are picked from the spans below
        logprobs, _ = token_logprobs(model, batch.input_ids, (position > 0) & (position < batch.lengths[:, None]))
    values = [float(logprobs[row, t]) for row, demo in enumerate(demos) for s, e in demo.turn_spans for t in range(s, e)]
    assert float(loss.detach()) == pytest.approx(-sum(values) / len(values), rel=1e-5)
    assert parts == {"sft": pytest.approx(float(loss.detach()))}
    loss.backward()
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_sft_probe_term_scores_the_last_probe_of_right_demonstrations(world, tokenizer):
    """Checked against one plain forward per probe (probes.naive_probe_logprobs)."""
    retriever = BM25Retriever(world.corpus)
    model = build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=1024)
    multi_hop = [e for e in world.train if e.hops >= 2][:2]
    right = build_demonstration(multi_hop[0], turns_of(multi_hop[0]), tokenizer, retriever, topk=3)
    skipped = build_demonstration(multi_hop[1], turns_of(multi_hop[1], skip_hop_prob=1.0), tokenizer, retriever, topk=3)
    loss, parts = sft_loss(model, tokenizer, [right, skipped], probe_weight=0.5)
    suffix = build_probe_suffix(tokenizer, right.example.answers[0])
    logprobs, mask = naive_probe_logprobs(model, [right.token_ids], [[right.turn_spans[-1][0]]], [suffix])
    expected_probe = -float(logprobs[mask].mean().detach())
    assert parts["probe"] == pytest.approx(expected_probe, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(parts["sft"] + 0.5 * expected_probe, rel=1e-5)
    _, only_skipped = sft_loss(model, tokenizer, [skipped], probe_weight=0.5)
    assert "probe" not in only_skipped  # a demonstration that answers a bridge teaches no probe


def test_short_warm_start_lowers_the_loss(world, tokenizer):
    retriever = BM25Retriever(world.corpus)
    model = build_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=1024)
    config = WarmStartConfig(steps=25, batch_size=4, learning_rate=3e-3, warmup_steps=2, pretrain_steps=5, pretrain_batch_size=8)
    history = warm_start(model, tokenizer, retriever, world.train, config, corpus=world.corpus, seed=0)
    assert [h["phase"] for h in history] == ["pretrain"] * 5 + ["sft"] * 25
    assert 3 <= sum("probe" in h for h in history) <= 8  # the last 30% of the 25 SFT steps, when a batch has a right demo
    sft = [h["loss"] for h in history if h["phase"] == "sft"]
    assert sum(sft[-5:]) / 5 < sum(sft[:5]) / 5
    assert not model.training
    with pytest.raises(ValueError, match="gold search chains"):
        warm_start(model, tokenizer, retriever, [QAExample("q", ("a",), 0, "nq")], config)


def test_max_hops_leaves_the_longer_chains_out_of_sft(world, tokenizer, monkeypatch):
    assert {example.hops for example in demonstrated_questions(world.train, 2)} == {1, 2}
    assert demonstrated_questions(world.train, 0) == [example for example in world.train if example.gold_queries]
    with pytest.raises(ValueError, match=r"warm_start.max_hops = 1 leaves no question to demonstrate \(hop counts present: \[3\]\)"):
        demonstrated_questions([CHAIN], 1)

    from igpo_rewards.reference_trainer import warm_start as module

    seen = []

    def recording(example, *args, **kwargs):  # the real function, watched
        seen.append(example.hops)
        return build_demonstration(example, *args, **kwargs)

    monkeypatch.setattr(module, "build_demonstration", recording)
    model = build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=512)
    config = WarmStartConfig(steps=3, batch_size=8, pretrain_steps=0, max_hops=2)
    warm_start(model, tokenizer, BM25Retriever(world.corpus), world.train, config, seed=0)
    assert len(seen) == 24 and set(seen) <= {1, 2} and 2 in seen
