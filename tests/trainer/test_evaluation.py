"""Evaluation: EM/F1 against all aliases, by hop and by data source, greedy rollouts."""

from __future__ import annotations

import pytest
import torch

from igpo_rewards.agent import rollout
from igpo_rewards.agent.bm25 import BM25Retriever
from igpo_rewards.agent.protocol import INSTRUCTION
from igpo_rewards.agent.retrieval import Document
from igpo_rewards.agent.rollout import Trajectory
from igpo_rewards.reference_trainer.evaluation import evaluate, summarize
from igpo_rewards.reference_trainer.rollout import rollout_examples, score_response, scored
from igpo_rewards.reference_trainer.world import QAExample
from igpo_rewards.testing.tiny import build_model, train_tokenizer


def finished(example, response, stop_reason="answer"):
    """A one-turn trajectory whose response is ``response``, scored against ``example``."""
    return scored(Trajectory([1, 2, 3], 2, [(2, 3)], [], [response], response, stop_reason), example)


def test_score_response_uses_every_alias_and_zero_for_malformed():
    answers = ("Tovia", "Tovia City")
    assert score_response("<answer> tovia city </answer>", answers) == (1.0, 1.0, 1.0)
    outcome, em, f1 = score_response("<answer> Tovia town </answer>", answers)
    assert em == 0.0 and f1 == outcome == pytest.approx(2 * 1 / (2 + 1))  # best alias "Tovia": 1 common word of 2 and 1
    assert score_response("<answer> Tovia", answers) == (-2.0, 0.0, 0.0)  # malformed: the format penalty, 0 EM/F1
    assert score_response("<search> x </search>", answers) == (-2.0, 0.0, 0.0)
    trajectory = finished(QAExample("q", answers, 1, "world"), "<answer> Tovia town </answer>")
    assert (trajectory.outcome, trajectory.em, trajectory.f1) == (outcome, em, f1)


def test_rollout_examples_groups_and_scores_each_rollout_against_its_question(monkeypatch):
    """Rollouts g * G .. g * G + G - 1 answer examples[g]; each is scored once (outcome, EM, F1)."""
    docs = [Document("0", "Ilsa Marr", "Ilsa Marr was born in Kelm."), Document("1", "Kelm", "Kelm is a city in Tovia.")]
    examples = [QAExample("Where was Ilsa Marr born?", ("Kelm",), 1, "world"),
                QAExample("In which country was Ilsa Marr born?", ("Tovia", "Tovia Republic"), 2, "world")]
    tokenizer = train_tokenizer([d.contents for d in docs] + [e.question for e in examples] + [INSTRUCTION], vocab_size=300)
    model = build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=512)
    answers = ["<answer> Kelm </answer>", "<answer> Kelm town </answer>", "<answer> Tovia", "<answer> tovia republic </answer>"]
    rollout_of: dict[int, int] = {}

    def scripted(model_, tokenizer_, grid, *, max_new_tokens, greedy=False):
        rows = [rollout_of.setdefault(id(context), len(rollout_of)) for context in grid.contexts]
        return [tokenizer(answers[row], add_special_tokens=False)["input_ids"] for row in rows]

    monkeypatch.setattr(rollout, "sample_turns", scripted)
    result = rollout_examples(model, tokenizer, BM25Retriever(docs), examples, group_size=2, max_turns=2)
    trajectories = result.trajectories
    assert [t.group_id for t in trajectories] == [0, 0, 1, 1]
    assert [t.example for t in trajectories] == [examples[0], examples[0], examples[1], examples[1]]
    assert [t.response for t in trajectories] == answers
    assert [t.outcome for t in trajectories] == [1.0, pytest.approx(2 / 3), -2.0, 1.0]
    assert [(t.em, t.f1) for t in trajectories] == [(1.0, 1.0), (0.0, pytest.approx(2 / 3)), (0.0, 0.0), (1.0, 1.0)]


def test_summarize_by_hops_and_source():
    a = QAExample("a", ("Kelm",), 1, "world")
    b = QAExample("b", ("Red Hill",), 2, "world")
    c = QAExample("c", ("Oslo",), 0, "nq")
    trajectories = [
        finished(a, "<answer> Kelm </answer>"),
        finished(b, "<answer> Red </answer>"),
        finished(b, "<search> Red Hill </search>", "max_turns"),
        finished(c, "<answer> Oslo </answer>"),
    ]
    trajectories[2].queries.append("Red Hill")
    result = summarize(trajectories, step=5)
    assert result["step"] == 5 and result["n"] == 4
    assert result["em"] == pytest.approx(2 / 4)
    assert result["f1"] == pytest.approx((1 + 2 / 3 + 0 + 1) / 4)
    assert result["by_hops"] == {
        "1": {"em": 1.0, "f1": 1.0, "n": 1},
        "2": {"em": 0.0, "f1": pytest.approx(1 / 3), "n": 2},
    }
    assert result["by_data_source"]["nq"] == {"em": 1.0, "f1": 1.0, "n": 1}
    assert result["by_data_source"]["world"]["n"] == 3
    assert result["format_error_fraction"] == 0.25
    assert result["searches_mean"] == 0.25 and result["turns_mean"] == 1.0
    assert result["questions"] == {"question": ["a", "b", "b", "c"], "hops": [1, 2, 2, 0], "em": [1, 0, 0, 1],
                                   "f1": [1.0, pytest.approx(2 / 3), 0.0, 1.0]}
    with pytest.raises(ValueError, match="empty"):
        summarize([])


def test_evaluate_runs_greedy_rollouts(monkeypatch):
    docs = [Document("0", "Ilsa Marr", "Ilsa Marr was born in Kelm."), Document("1", "Kelm", "Kelm is a city in Tovia.")]
    examples = [QAExample("Where was Ilsa Marr born?", ("Kelm",), 1, "world"), QAExample("In which country was Ilsa Marr born?", ("Tovia",), 2, "world")]
    tokenizer = train_tokenizer([d.contents for d in docs] + [e.question for e in examples] + [INSTRUCTION], vocab_size=300)
    model = build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=512)
    seen = []

    def scripted(model_, tokenizer_, grid, *, max_new_tokens, greedy=False):
        seen.append(greedy)
        texts = []
        for context in grid.contexts:
            text = tokenizer.decode(context)
            texts.append("<search> Ilsa Marr </search>" if "Doc 1" not in text else "<answer> Kelm </answer>")
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    monkeypatch.setattr(rollout, "sample_turns", scripted)
    model.train()
    result, trajectories = evaluate(model, tokenizer, BM25Retriever(docs), examples, max_turns=3, batch_size=1, step=3, return_trajectories=True)
    assert model.training  # the mode is restored
    assert seen and all(seen)
    assert [t.turn_texts for t in trajectories] == [["<search> Ilsa Marr </search>", "<answer> Kelm </answer>"]] * 2
    assert result["em"] == 0.5 and result["by_hops"]["1"]["em"] == 1.0 and result["by_hops"]["2"]["em"] == 0.0
    assert result["searches_mean"] == 1.0 and result["step"] == 3
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, tokenizer, BM25Retriever(docs), [])
