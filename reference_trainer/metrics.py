"""What a step logs: its metrics (one ``metrics.jsonl`` record) and its case studies (``trajectories.jsonl``).

Both read the step's ``batch.RolloutBatch`` (the rollouts, scored once when they were generated)
and its ``batch.Advantages``; nothing is re-scored from text. The keys are the
``metrics.jsonl`` schema of ``igpo_rewards.reference_trainer.report``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import igpo_rewards
from igpo_rewards.reference_trainer.batch import Advantages, RolloutBatch


def zero_advantage_group_fraction(turn_advantages: torch.Tensor, group_ids: torch.Tensor) -> float:
    """The advantage-collapse rate: the fraction of groups in which every turn advantage is exactly 0.

    ``turn_advantages`` [B, T], ``group_ids`` [B]. GRPO collapses on a group whose outcomes are
    all equal (``igpo_rewards.zero_variance_group_fraction`` of the outcomes); IGPO only when every
    pooled turn reward of the group is equal too.
    """
    groups, dense = torch.unique(group_ids, return_inverse=True)
    nonzero = (turn_advantages != 0).any(dim=1).to(torch.float32)
    nonzero_per_group = torch.zeros(len(groups), device=nonzero.device).index_add_(0, dense, nonzero)
    return float((nonzero_per_group == 0).float().mean()) if len(groups) else 0.0


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float((values * mask).sum() / mask.sum().clamp(min=1))


def step_metrics(batch: RolloutBatch, advantages: Advantages, entropy: torch.Tensor) -> dict[str, Any]:
    """Per-step numbers about the rollouts and their advantages (the metrics.jsonl schema).

    ``zero_variance_group_fraction``: ``igpo_rewards.zero_variance_group_fraction`` of the
    outcomes (groups whose G outcomes are all equal, GRPO's collapse condition), for both methods;
    ``zero_advantage_group_fraction``: groups whose turn advantages are all exactly 0 (the
    advantage-collapse rate of the method that ran); ``ig_mean`` / ``ig_std`` over the non-final
    turns (IG is defined there only), ``None`` without probes; ``ig_answer_mean``, the mean gain
    of the answer's probe over those turns (= ``ig_mean`` without sub-goal targets), and
    ``ig_subgoal_mean``, the mean gain of a sub-goal target over those turns and the targets each
    row has (unweighted; ``None`` without sub-goal targets).
    """
    trajectories = batch.trajectories
    count = len(trajectories)
    mask = batch.loss_mask
    metrics: dict[str, Any] = {
        "reward_mean": float(batch.outcome.mean()),
        "reward_std": float(batch.outcome.std(unbiased=False)),
        "train_f1": sum(t.f1 for t in trajectories) / count,
        "train_em": sum(t.em for t in trajectories) / count,
        "format_error_fraction": sum(not t.answered for t in trajectories) / count,
        "turns_mean": sum(t.num_turns for t in trajectories) / count,
        "searches_mean": sum(len(t.queries) for t in trajectories) / count,
        "zero_variance_group_fraction": float(igpo_rewards.zero_variance_group_fraction(batch.outcome, batch.group_ids)),
        "zero_advantage_group_fraction": zero_advantage_group_fraction(advantages.turn, batch.group_ids),
        "zero_advantage_token_fraction": _masked_mean((advantages.token == 0).float(), mask),
        "advantage_abs_mean": _masked_mean(advantages.token.abs(), mask),
        "entropy": _masked_mean(entropy, mask),
        "ig_mean": None,
        "ig_std": None,
        "ig_answer_mean": None,
        "ig_subgoal_mean": None,
    }
    if advantages.information_gain is not None:
        final = igpo_rewards.final_turn_mask(batch.turn_mask, validate=False)
        scored = batch.turn_mask & ~final  # [B, T]: the turns IG is defined on
        gains = advantages.information_gain[scored]
        if gains.numel() > 0:
            metrics["ig_mean"] = float(gains.mean())
            metrics["ig_std"] = float(gains.std(unbiased=False))
            metrics["ig_answer_mean"] = metrics["ig_mean"]
        metrics.update(_target_means(advantages.target_gains, scored, batch.target_mask))
    return metrics


def _target_means(target_gains: torch.Tensor | None, scored: torch.Tensor, target_mask: torch.Tensor | None) -> dict[str, float]:
    """``ig_answer_mean`` and ``ig_subgoal_mean`` from the per-target gains [B, T, K] (nothing without them)."""
    if target_gains is None or target_mask is None or not bool(scored.any()):
        return {}
    means = {"ig_answer_mean": float(target_gains[..., 0][scored].mean())}
    cells = scored[:, :, None] & target_mask[:, None, 1:].bool()  # [B, T, K - 1]
    if bool(cells.any()):
        means["ig_subgoal_mean"] = float(target_gains[..., 1:][cells].mean())
    return means


def _case_study(batch: RolloutBatch, advantages: Advantages, answer_logprob: torch.Tensor, tokenizer: Any, index: int) -> list[dict[str, Any]]:
    trajectory = batch.trajectories[index]
    subgoals = list(trajectory.example.subgoals) if answer_logprob.dim() == 3 else []
    turns = []
    for j, text in enumerate(trajectory.turn_texts):
        observation = None
        if j < len(trajectory.observation_spans):
            start, end = trajectory.observation_spans[j]
            observation = tokenizer.decode(trajectory.token_ids[start:end], skip_special_tokens=False).strip()
        gain = None
        if advantages.information_gain is not None and j < trajectory.num_turns - 1:
            gain = float(advantages.information_gain[index, j])
        probes = answer_logprob[index, j].reshape(-1)  # the answer's, then each sub-goal's
        turn = {
            "text": text,
            "observation": observation,
            "probe_prob": math.exp(float(probes[0])),
            "information_gain": gain,
            "advantage": float(advantages.turn[index, j]),
        }
        if subgoals:
            turn["subgoal_probs"] = {name: math.exp(float(probes[k + 1])) for k, name in enumerate(subgoals)}
        turns.append(turn)
    return turns


def case_studies(
    batch: RolloutBatch, advantages: Advantages, answer_logprob: torch.Tensor | None, tokenizer: Any, *, count: int, step: int
) -> list[dict[str, Any]]:
    """Trajectories of a step in the report's ``trajectories.jsonl`` layout (per turn: text,
    observation, probe probability of the answer before the turn, with sub-goal targets each
    sub-goal's too (``subgoal_probs``), information gain, advantage).

    Prefers multi-turn rollouts with a positive outcome, then other multi-turn ones. Empty when
    the step ran no probes (GRPO without ``grpo_probes``): a case study needs the probe values.
    """
    if answer_logprob is None:
        return []
    trajectories = batch.trajectories
    order = sorted(range(len(trajectories)), key=lambda i: (-(trajectories[i].num_turns > 1), -(trajectories[i].outcome > 0), i))
    return [
        {
            "step": step,
            "question": trajectories[index].example.question,
            "answers": list(trajectories[index].example.answers),
            "hops": trajectories[index].example.hops,
            "outcome": trajectories[index].outcome,
            "turns": _case_study(batch, advantages, answer_logprob, tokenizer, index),
        }
        for index in order[:count]
    ]
