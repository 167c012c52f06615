"""Evaluation: greedy rollouts on held-out questions, exact match and F1 by hop count and by data source.

``evaluate`` runs one greedy rollout per question (the same loop as training, with
``greedy=True``) and scores the response with ``igpo_rewards.scoring.outcome_reward(...,
format_penalty=0.0)``: the answer's word F1 / exact match against every alias (the best
alias counts), and 0 for a malformed response or one without an answer. The result is the
``eval.json`` layout that ``igpo_rewards.reference_trainer.report`` reads::

    {"step": int, "em": float, "f1": float, "n": int,
     "by_hops": {"1": {"em", "f1", "n"}, ...},              # questions with a known hop count
     "by_data_source": {"nq": {"em", "f1", "n"}, ...},
     "format_error_fraction": float, "turns_mean": float, "searches_mean": float,
     "questions": {"question": [str], "hops": [int], "em": [0 or 1], "f1": [float]}}

``questions`` holds every question's own result, in the order of the examples (hops 0 where the
count is unknown): what the experiment pairs across methods, question by question.

``report.paper_table`` lays out the per-data-source scores like the paper's table.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from igpo_rewards.reference_trainer.rollout import QATrajectory, rollout_examples


def _summary(scores: Sequence[tuple[float, float]]) -> dict[str, Any]:
    return {
        "em": sum(em for em, _ in scores) / len(scores),
        "f1": sum(f1 for _, f1 in scores) / len(scores),
        "n": len(scores),
    }


def summarize(trajectories: Sequence[QATrajectory], *, step: int = 0) -> dict[str, Any]:
    """Aggregate scored rollouts into the ``eval.json`` layout (see the module docstring)."""
    if not trajectories:
        raise ValueError("trajectories is empty: nothing to evaluate")
    scores = [(trajectory.em, trajectory.f1) for trajectory in trajectories]
    by_hops: dict[str, list[tuple[float, float]]] = defaultdict(list)
    by_source: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for trajectory, score in zip(trajectories, scores):
        if trajectory.example.hops > 0:
            by_hops[str(trajectory.example.hops)].append(score)
        by_source[trajectory.example.data_source].append(score)
    result = {"step": step, **_summary(scores)}
    result["by_hops"] = {hops: _summary(by_hops[hops]) for hops in sorted(by_hops, key=int)}
    result["by_data_source"] = {source: _summary(by_source[source]) for source in sorted(by_source)}
    result["format_error_fraction"] = sum(not t.answered for t in trajectories) / len(trajectories)
    result["turns_mean"] = sum(t.num_turns for t in trajectories) / len(trajectories)
    result["searches_mean"] = sum(len(t.queries) for t in trajectories) / len(trajectories)
    result["questions"] = {
        "question": [t.example.question for t in trajectories],
        "hops": [int(t.example.hops) for t in trajectories],
        "em": [int(t.em) for t in trajectories],
        "f1": [t.f1 for t in trajectories],
    }
    return result


def evaluate(
    model: Any,
    tokenizer: Any,
    retriever: Any,
    examples: Sequence[Any],
    *,
    max_turns: int = 4,
    max_new_tokens: int = 64,
    topk: int = 3,
    batch_size: int = 64,
    step: int = 0,
    progress: bool = False,
    return_trajectories: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], list[QATrajectory]]:
    """Greedy rollouts on ``examples`` and their EM/F1 (overall, by hop count, by data source).

    Questions are processed ``batch_size`` at a time (one ``generate`` batch per turn).
    Returns the ``eval.json`` dict, and the trajectories too with ``return_trajectories``.

    Raises:
        ValueError: no examples.
    """
    if not examples:
        raise ValueError("examples is empty: nothing to evaluate")
    was_training = model.training
    model.eval()
    trajectories: list[QATrajectory] = []
    chunks = range(0, len(examples), batch_size)
    for first in tqdm(chunks, desc="evaluate", disable=not progress, leave=False):
        result = rollout_examples(
            model,
            tokenizer,
            retriever,
            examples[first : first + batch_size],
            max_turns=max_turns,
            max_new_tokens=max_new_tokens,
            topk=topk,
            greedy=True,
            batch_size=batch_size,
        )
        trajectories.extend(result.trajectories)
    if was_training:
        model.train()
    summary = summarize(trajectories, step=step)
    return (summary, trajectories) if return_trajectories else summary


def encode_em(values: Sequence[Any], *, where: str = "em") -> str:
    """Per-question EM (0 or 1 each, ``summarize``'s ``questions["em"]``) as a string of digits, one
    per question: how experiment.json stores it (400 questions take one line). ``decode_em``
    reverses it.

    Example:
        >>> encode_em([1, 0, 0, 1]), decode_em("1001")
        ('1001', [1, 0, 0, 1])
    """
    if any(value not in (0, 1) for value in values):
        raise ValueError(f"{where} must hold 0 or 1 per question, got {sorted(set(values) - {0, 1})[:5]}")
    return "".join("1" if value else "0" for value in values)


def decode_em(text: str) -> list[int]:
    """The per-question EM of an ``encode_em`` string."""
    if not isinstance(text, str) or set(text) - {"0", "1"}:
        raise ValueError(f"per-question EM must be a string of 0s and 1s, got {str(text)[:40]!r}")
    return [int(digit) for digit in text]
