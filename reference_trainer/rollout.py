"""Rollouts of questions, scored once: G rollouts per question with the library's loop.

``rollout_examples`` calls ``igpo_rewards.agent.rollout.rollout_questions`` (the batched
multi-turn HF ``generate`` loop with retrieval; see that module for the loop) and scores each
rollout once against its question's answer aliases (``score_response``): the outcome reward
``igpo_rewards.outcome_reward(response, answers)`` (answer F1, or the format penalty when the
response is malformed or has no answer) and the exact match and F1 with no penalty (the
training and evaluation metrics). Nothing downstream re-scores the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from igpo_rewards.agent.rollout import RolloutResult, Trajectory, rollout_questions
from igpo_rewards.scoring import outcome_reward


@dataclass
class QATrajectory(Trajectory):
    """A rollout of a question (``igpo_rewards.agent.rollout.Trajectory``) with its question and scores.

    Attributes (besides the trajectory's):
        example: the question (a ``world.QAExample``) with its answer aliases.
        group_id: index of the question in the step; the G rollouts of a question share it.
        outcome: ``igpo_rewards.outcome_reward(response, example.answers)``.
        em, f1: exact match and word F1 of the answer against the best alias (0 without a
            well-formed answer).
    """

    example: Any = None
    group_id: int = 0
    outcome: float = 0.0
    em: float = 0.0
    f1: float = 0.0


def score_response(response: str, answers: Sequence[str]) -> tuple[float, float, float]:
    """``(outcome, em, f1)`` of a response: the outcome reward (F1 or the format penalty), then EM
    and F1 against the best alias with no format penalty."""
    answers = list(answers)
    return (
        float(outcome_reward(response, answers)),
        float(outcome_reward(response, answers, metric="em", format_penalty=0.0)),
        float(outcome_reward(response, answers, metric="f1", format_penalty=0.0)),
    )


def scored(trajectory: Trajectory, example: Any, group_id: int = 0) -> QATrajectory:
    """``trajectory`` as a ``QATrajectory`` of ``example``, scored by ``score_response``."""
    outcome, em, f1 = score_response(trajectory.response, example.answers)
    fields = {name: getattr(trajectory, name) for name in Trajectory.__dataclass_fields__}
    return QATrajectory(**fields, example=example, group_id=group_id, outcome=outcome, em=em, f1=f1)


def rollout_examples(
    model: Any, tokenizer: Any, retriever: Any, examples: Sequence[Any], *, group_size: int = 1, **kwargs: Any
) -> RolloutResult:
    """``group_size`` scored rollouts of each example, ordered question by question.

    Rollouts ``g * G .. g * G + G - 1`` answer ``examples[g]`` and have ``group_id == g``;
    ``kwargs`` go to ``igpo_rewards.agent.rollout.generate_rollouts`` (max_turns,
    max_new_tokens, topk, greedy, max_context_tokens, batch_size).
    """
    result = rollout_questions(model, tokenizer, retriever, [e.question for e in examples], group_size=group_size, **kwargs)
    result.trajectories = [
        scored(trajectory, examples[index // group_size], index // group_size)
        for index, trajectory in enumerate(result.trajectories)
    ]
    return result
