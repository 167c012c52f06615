"""Step-0 diagnostics: which searches retrieved the answer, the outcome sparsity, the probe signal split."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from igpo_rewards.agent.bm25 import BM25Retriever
from igpo_rewards.reference_trainer.cli import tokenizer_texts
from igpo_rewards.reference_trainer.config import RLConfig
from igpo_rewards.reference_trainer.diagnostics import (
    IG_GROUPS,
    POTENTIALS,
    SUBGOAL_GROUPS,
    _outcome_summary,
    chain_group,
    format_signal,
    measure_signal,
    new_chain_documents,
    outcome_groups,
    observation_labels,
    turn_group,
)
from igpo_rewards.reference_trainer.warm_start import build_demonstration, demonstration_turns
from igpo_rewards.reference_trainer.world import build_world
from igpo_rewards.testing.tiny import build_model, train_tokenizer


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


def test_observation_labels_follow_the_gold_chain(world, tokenizer):
    retriever = BM25Retriever(world.corpus)
    mentioned = 0
    for example in world.train:
        demo = _demonstration(world, tokenizer, example)
        labels = observation_labels(demo, retriever, 3)
        assert len(labels) == example.hops and labels[-1] == "answer_document", example.question  # the last gold search
        texts = [tokenizer.decode(demo.token_ids[start:end]) for start, end in demo.observation_spans]
        for label, text in zip(labels, texts):  # the same verdict from the observation text the policy read
            has_document = f'(Title: "{example.gold_queries[-1]}")' in text
            assert (label == "answer_document") == has_document
            assert (label == "answer_mentioned") == (not has_document and example.answers[0] in text)
        mentioned += labels.count("answer_mentioned")
    assert mentioned > 0  # people born in the answer city mention it without being the answer's document

    example = next(e for e in world.train if e.hops == 2)
    demo = _demonstration(world, tokenizer, example, repeat_last=True)
    labels = observation_labels(demo, retriever, 3)
    assert labels[1:] == ["answer_document", "answer_document"]
    groups = [turn_group(labels, turn) for turn in range(demo.num_turns - 1)]
    assert groups[1:] == ["answer_document_first", "answer_document_again"]
    assert set(groups) <= set(IG_GROUPS)
    no_chain = dataclasses.replace(demo, example=dataclasses.replace(example, gold_queries=(), gold_bridge_answers=(),
                                                                        answers=(example.answers[0].lower(), "")))
    assert observation_labels(no_chain, retriever, 3)[1:] == ["answer_mentioned", "answer_mentioned"]  # case-insensitive


def test_outcome_summary_by_hand(world, tokenizer):
    demo = _demonstration(world, tokenizer, world.train[0])
    groups = {index: [dataclasses.replace(demo, outcome=value) for value in outcomes]
              for index, outcomes in enumerate([[1.0, 1.0], [0.0, 1.0], [-2.0, -2.0], [0.0, -2.0]])}
    # [0.0, -2.0]: every rollout failed, but not in the same way (GRPO still has a signal): not "all wrong"
    assert _outcome_summary(groups) == {"outcome_zero_variance_fraction": 0.5, "all_wrong_group_fraction": 0.25,
                                        "all_right_group_fraction": 0.25, "equal_partial_group_fraction": 0.0,
                                        "all_failed_outcomes_differ_fraction": 0.25}


@pytest.mark.parametrize("seed", range(20))
def test_all_wrong_and_all_right_groups_are_zero_variance_groups(seed):
    """The split of outcome_groups adds up: all wrong + all right + equal partial = zero-variance
    (each a subset of it, counted group by group), against the library's zero-variance fraction."""
    import numpy as np

    import igpo_rewards

    rng = random.Random(seed)
    groups = [[rng.choice([-2.0, 0.0, 0.5, 1.0][: rng.randint(1, 4)]) for _ in range(4)] for _ in range(12)]
    split = outcome_groups(groups)
    library = igpo_rewards.zero_variance_group_fraction(np.array(groups).ravel(), group_size=4)
    assert split["outcome_zero_variance_fraction"] == pytest.approx(float(library))
    parts = split["all_wrong_group_fraction"] + split["all_right_group_fraction"] + split["equal_partial_group_fraction"]
    assert parts == pytest.approx(split["outcome_zero_variance_fraction"])
    failed = sum(max(group) <= 0 for group in groups) / len(groups)  # no rollout got any F1
    assert split["all_wrong_group_fraction"] + split["all_failed_outcomes_differ_fraction"] == pytest.approx(failed)


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


def test_new_chain_documents_follow_the_gold_chain(world, tokenizer):
    """A demonstration that walks the gold chain retrieves hop h's document first at search h; a
    repeated last search retrieves nothing new; each bridge's probe is labelled by ``chain_group``."""
    retriever = BM25Retriever(world.corpus)
    example = next(e for e in world.train if e.hops == 3)
    new = new_chain_documents(_demonstration(world, tokenizer, example), retriever, 3)
    assert [hop in documents for hop, documents in enumerate(new)] == [True, True, True]
    assert [sorted(documents) for documents in new] == [[0], [1], [2]]
    groups = [chain_group(new, turn, bridge=0, answer_hop=2) for turn in range(3)]
    assert groups == ["own_document_first", "other_bridge_document_first", "answer_document_first"]
    repeated = new_chain_documents(_demonstration(world, tokenizer, example, repeat_last=True), retriever, 3)
    assert repeated[-1] == set() and chain_group(repeated, 3, bridge=1, answer_hop=2) == "nothing_new"


def test_measure_signal_splits_the_sub_goal_probes(world, tokenizer):
    """Questions with bridges get the sub-goal split: every (non-final turn, bridge) pair once, in one
    group, under both potentials; the answer probe on bridge-document turns; none for 1-hop questions."""
    model = build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=1024)
    config = RLConfig(questions_per_step=4, group_size=2, max_turns=4, max_new_tokens=6)
    chains = [example for example in world.train if example.hops >= 3]
    result = measure_signal(model, tokenizer, BM25Retriever(world.corpus), chains, config, steps=1, seed=2)
    signal = result["subgoal_signal"]
    assert set(signal) == {*SUBGOAL_GROUPS, "answer_on_bridge_document"}
    for group in SUBGOAL_GROUPS:
        turns = {potential: signal[group]["all"][potential]["turns"] for potential in POTENTIALS}
        assert turns["probe"] == turns["running_max"]
        assert turns["probe"] == sum(cell["probe"]["turns"] for cell in signal[group]["by_hops"].values())
    assert set(signal["answer_on_bridge_document"]["all"]) == {"probe"}
    assert "sub-goal probes (bridge entities)" in format_signal(result)
    one_hop = [example for example in world.train if example.hops == 1]
    assert measure_signal(model, tokenizer, BM25Retriever(world.corpus), one_hop, config, steps=1, seed=2)["subgoal_signal"] is None
