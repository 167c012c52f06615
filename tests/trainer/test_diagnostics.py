"""Step-0 diagnostics: which searches retrieved the answer, the outcome sparsity, the probe signal split."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from igpo_rewards.reference_trainer.cli import tokenizer_texts
from igpo_rewards.reference_trainer.config import RLConfig
from igpo_rewards.reference_trainer.diagnostics import (
    IG_GROUPS,
    _ig_group,
    _outcome_summary,
    answer_in_observations,
    format_signal,
    measure_signal,
)
from igpo_rewards.reference_trainer.modeling import build_model, train_tokenizer
from igpo_rewards.reference_trainer.retrieval import BM25Retriever
from igpo_rewards.reference_trainer.warm_start import build_demonstration, demonstration_turns
from igpo_rewards.reference_trainer.world import build_world


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world():
    return build_world(seed=2, num_train=24, num_heldout=4, num_countries=3, cities_per_country=3, num_organisations=4,
                       max_hops=4)


@pytest.fixture(scope="module")
def tokenizer(world):
    return train_tokenizer(tokenizer_texts(world), vocab_size=600)


def _demonstration(world, tokenizer, example, *, repeat_last=False):
    turns = demonstration_turns(example, random.Random(0), noisy_query_prob=0.0, skip_hop_prob=0.0, think_prob=0.0,
                                distractors=[])
    if repeat_last:  # search the last gold query twice
        turns = turns[:-1] + [turns[-2]] + turns[-1:]
    return build_demonstration(example, turns, tokenizer, BM25Retriever(world.corpus), topk=3)


def test_answer_in_observations_follows_the_gold_chain(world, tokenizer):
    first_searches = []
    for example in world.train:
        demo = _demonstration(world, tokenizer, example)
        retrieved = answer_in_observations(demo, tokenizer)
        assert retrieved[-1] and len(retrieved) == example.hops, example.question  # the last gold search states it
        texts = [tokenizer.decode(demo.token_ids[start:end]) for start, end in demo.observation_spans]
        assert retrieved == [example.answers[0] in text for text in texts]
        first_searches.append(retrieved[0])
    assert not all(first_searches)
    example = next(e for e in world.train if e.hops == 2 and not answer_in_observations(_demonstration(world, tokenizer, e), tokenizer)[0])
    demo = _demonstration(world, tokenizer, example, repeat_last=True)
    retrieved = answer_in_observations(demo, tokenizer)
    assert retrieved == [False, True, True]
    groups = [_ig_group(retrieved, turn) for turn in range(demo.num_turns - 1)]
    assert groups == ["answer_not_retrieved", "answer_first_retrieved", "answer_retrieved_again"]
    assert _ig_group([False], 0) == "answer_not_retrieved" and _ig_group([False], 3) == "answer_not_retrieved"
    lower = dataclasses.replace(demo, example=dataclasses.replace(example, answers=(example.answers[0].lower(), "")))
    assert answer_in_observations(lower, tokenizer) == retrieved  # case-insensitive, empty aliases ignored


def test_outcome_summary_by_hand(world, tokenizer):
    demo = _demonstration(world, tokenizer, world.train[0])
    groups = {index: [dataclasses.replace(demo, outcome=value) for value in outcomes]
              for index, outcomes in enumerate([[1.0, 1.0], [0.0, 1.0], [-2.0, -2.0], [0.0, -2.0]])}
    assert _outcome_summary(groups) == {"outcome_zero_variance_fraction": 0.5, "all_wrong_group_fraction": 0.5,
                                        "all_right_group_fraction": 0.25}


def test_measure_signal_on_a_tiny_policy(world, tokenizer):
    model = build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=1024)
    config = RLConfig(questions_per_step=3, group_size=2, max_turns=3, max_new_tokens=6)
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    result = measure_signal(model, tokenizer, BM25Retriever(world.corpus), world.train, config, steps=2, seed=1)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's RNG stream is left where it was
    assert (result["questions"], result["rollouts"], result["group_size"]) == (6, 12, 2)
    same = [len(set(group["outcomes"])) == 1 for group in result["groups"]]
    assert result["outcome_zero_variance_fraction"] == pytest.approx(sum(same) / len(same))
    assert sum(row["groups"] for row in result["by_hops"].values()) == 6
    for name in IG_GROUPS:
        total = result["information_gain"][name]["turns"]
        assert total == sum(row["information_gain"][name]["turns"] for row in result["by_hops"].values())
    assert 0.0 <= result["turn_advantage_collapse_rate"] <= 1.0
    assert "questions x G = 2 rollouts" in format_signal(result)
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        measure_signal(model, tokenizer, BM25Retriever(world.corpus), world.train, config, steps=0)
