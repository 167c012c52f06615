"""One RL step of IGPO (or GRPO): rollouts -> probes -> advantages -> PPO update.

Read ``rl_step`` top to bottom; every reward and advantage comes from ``igpo_rewards``:

1. rollouts: ``rollout.rollout_examples`` samples G rollouts for each question;
2. probes + old log-probs: ``probes.trajectory_forward`` runs ONE packed forward that returns
   the log-probs of the sampled tokens (the PPO "old" policy) and, before every turn, the
   length-normalized log-prob of the ground-truth answer (``answer_logprob``, [B, T]);
   (``rl.probe_layout="kv_cache"``: the probes in a second pass over that forward's KV cache);
3. advantages: IGPO calls ``igpo_rewards.igpo_advantages(answer_logprob, outcome, turn_mask,
   group_ids, ...)`` ([B, T] turn advantages); GRPO calls ``igpo_rewards.grpo_advantages(outcome,
   group_ids)`` ([B], the same value on every turn). Nothing else differs between the two;
4. tokens: ``igpo_rewards.turn_index_from_response_mask`` numbers the generated runs of each
   trajectory and ``igpo_rewards.broadcast_to_tokens`` puts turn j's advantage on turn j's
   generated tokens; prompt and observation tokens get no advantage and no loss;
5. loss (``policy_loss``): PPO clipped surrogate (clip 0.2) + ``kl_coef`` * k3 KL to the frozen
   warm-start reference, averaged over the generated tokens of each sequence and then over
   sequences; AdamW with gradient-norm clipping, ``minibatches`` optimizer steps per RL step.

``policy_loss`` is a pure function of log-prob tensors (tested against hand-computed values).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import igpo_rewards
from igpo_rewards.reference_trainer.checkpoint import latest_checkpoint, restore_training_state, save_checkpoint, write_text_atomic
from igpo_rewards.reference_trainer.config import RLConfig, RunConfig, to_dict
from igpo_rewards.reference_trainer.evaluation import evaluate
from igpo_rewards.reference_trainer.modeling import load_pretrained
from igpo_rewards.reference_trainer.probes import trajectory_forward
from igpo_rewards.agent.rollout import RolloutResult
from igpo_rewards.reference_trainer.rollout import QATrajectory, rollout_examples

# --- the loss -------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip_ratio: float = 0.2,
    kl_coef: float = 0.001,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""PPO clipped surrogate + k3 KL penalty, token mean within a sequence, then mean over sequences.

    Per token t (all arrays [B, S], aligned with the token they score):

    .. math::
        \rho_t = \exp(\log\pi_t - \log\pi^{old}_t), \qquad
        \ell^{PG}_t = \max(-A_t \rho_t,\; -A_t\, \mathrm{clip}(\rho_t, 1-\epsilon, 1+\epsilon))

        \ell^{KL}_t = \exp(\log\pi^{ref}_t - \log\pi_t) - (\log\pi^{ref}_t - \log\pi_t) - 1
        \quad (\text{k3, unbiased and} \ge 0)

        \mathcal{L} = \frac{1}{|\{b: n_b > 0\}|} \sum_{b: n_b > 0} \frac{1}{n_b}
        \sum_t m_{b,t} (\ell^{PG}_{b,t} + \beta\, \ell^{KL}_{b,t}), \qquad n_b = \sum_t m_{b,t}

    Args:
        logprobs: [B, S] log-probs of the tokens under the current policy (with grad).
        old_logprobs: [B, S] log-probs under the policy that sampled them.
        ref_logprobs: [B, S] log-probs under the reference policy, or ``None`` (no KL term).
        advantages: [B, S] advantage of each token.
        loss_mask: [B, S] 1/True on the generated tokens that are trained on.
        clip_ratio: epsilon.
        kl_coef: beta (ignored when ``ref_logprobs`` is None).

    Returns:
        ``(loss, stats)``: the scalar loss and detached masked token means ``pg_loss``, ``kl``,
        ``clip_fraction`` (tokens where the clipped branch is the active one, i.e. the
        gradient is cut), ``ratio``. Rows whose mask is all 0 do not count; with no masked
        token at all the loss is 0 (still differentiable).

    Example:
        >>> lp = torch.log(torch.tensor([[0.5, 0.5]]))
        >>> loss, stats = policy_loss(lp, lp, None, torch.tensor([[1.0, -1.0]]), torch.tensor([[1, 0]]))
        >>> float(loss), float(stats["clip_fraction"])
        (-1.0, 0.0)
    """
    shape = logprobs.shape
    for name, value in (("old_logprobs", old_logprobs), ("advantages", advantages), ("loss_mask", loss_mask)):
        if value.shape != shape:
            raise ValueError(f"{name} must have the shape of logprobs {tuple(shape)}, got {tuple(value.shape)}")
    if ref_logprobs is not None and ref_logprobs.shape != shape:
        raise ValueError(f"ref_logprobs must have the shape of logprobs {tuple(shape)}, got {tuple(ref_logprobs.shape)}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, S], got shape {tuple(shape)}")
    mask = loss_mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    pg = torch.maximum(unclipped, clipped)
    per_token = pg
    if ref_logprobs is not None:
        log_ratio = ref_logprobs - logprobs
        kl = torch.exp(log_ratio) - log_ratio - 1.0
        per_token = per_token + kl_coef * kl
    else:
        kl = torch.zeros_like(logprobs)
    counts = mask.sum(dim=1)
    has_tokens = counts > 0
    sequence_loss = (per_token * mask).sum(dim=1) / counts.clamp(min=1.0)
    num_sequences = has_tokens.sum().clamp(min=1)
    loss = (sequence_loss * has_tokens).sum() / num_sequences

    total = mask.sum().clamp(min=1.0)
    with torch.no_grad():
        stats = {
            "pg_loss": (pg * mask).sum() / total,
            "kl": (kl * mask).sum() / total,
            "clip_fraction": ((clipped > unclipped).to(mask.dtype) * mask).sum() / total,
            "ratio": (ratio * mask).sum() / total,
        }
    return loss, stats


# --- from trajectories to tensors ----------------------------------------------------------------


def turn_layout(trajectories: Sequence[QATrajectory]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(turn_mask [B, T] bool, group_ids [B] long, outcome [B] float32)`` of a batch; T = max turns."""
    num_turns = [trajectory.num_turns for trajectory in trajectories]
    turn_mask = torch.arange(max(num_turns))[None, :] < torch.tensor(num_turns)[:, None]
    group_ids = torch.tensor([trajectory.group_id for trajectory in trajectories], dtype=torch.long)
    outcome = torch.tensor([trajectory.outcome for trajectory in trajectories], dtype=torch.float32)
    return turn_mask, group_ids, outcome


def response_mask(trajectories: Sequence[QATrajectory], length: int | None = None) -> torch.Tensor:
    """[B, S] long: 1 on every generated token (turn spans), 0 on prompt, observations and padding.

    Positions index ``token_ids`` directly (S = the longest trajectory unless ``length``), so
    each maximal run of 1s is one turn.
    """
    width = length if length is not None else max(len(trajectory.token_ids) for trajectory in trajectories)
    mask = torch.zeros((len(trajectories), width), dtype=torch.long)
    for row, trajectory in enumerate(trajectories):
        for start, end in trajectory.turn_spans:
            mask[row, start:end] = 1
    return mask


@dataclass
class Advantages:
    """Advantages of a batch. B rollouts, T turns, S tokens (positions of ``token_ids``).

    Attributes:
        turn: [B, T] advantage of each turn (0 on padded turns).
        token: [B, S] advantage on each generated token, 0 elsewhere.
        loss_mask: [B, S] bool, the generated tokens.
        turn_mask: [B, T] bool.
        group_ids: [B] long.
        outcome: [B] float.
        information_gain: [B, T] IG of each turn (None without probes).
        rewards: [B, T] turn rewards fed to the normalization (None for GRPO).
    """

    turn: torch.Tensor
    token: torch.Tensor
    loss_mask: torch.Tensor
    turn_mask: torch.Tensor
    group_ids: torch.Tensor
    outcome: torch.Tensor
    information_gain: torch.Tensor | None = None
    rewards: torch.Tensor | None = None


def compute_advantages(
    trajectories: Sequence[QATrajectory], answer_logprob: torch.Tensor | None, config: RLConfig
) -> Advantages:
    """Turn advantages with ``igpo_rewards`` (IGPO or GRPO), then broadcast to generated tokens.

    ``answer_logprob`` is the [B, T] probe output (required for IGPO; for GRPO it only feeds
    the information-gain metric when given).
    """
    turn_mask, group_ids, outcome = turn_layout(trajectories)
    information_gain = rewards = None
    if answer_logprob is not None:
        answer_logprob = answer_logprob.detach().cpu().to(torch.float32)
        if answer_logprob.shape != turn_mask.shape:
            raise ValueError(f"answer_logprob must be [B, T] = {tuple(turn_mask.shape)}, got {tuple(answer_logprob.shape)}")
    if config.algorithm == "igpo":
        if answer_logprob is None:
            raise ValueError("IGPO needs the probes' answer_logprob, got None")
        result = igpo_rewards.igpo_advantages(
            answer_logprob,
            outcome,
            turn_mask,
            group_ids,
            gamma=config.gamma,
            kind=config.ig_kind,
            mode=config.norm_mode,
            weighting=config.weighting,
            scale=config.scale,
            ig_weight=config.ig_weight,
            outcome_weight=config.outcome_weight,
        )
        turn, information_gain, rewards = result.advantages, result.information_gain, result.rewards
    elif config.algorithm == "grpo":
        per_rollout = igpo_rewards.grpo_advantages(outcome, group_ids, scale=config.scale)
        turn = per_rollout[:, None] * turn_mask.to(per_rollout.dtype)
        if answer_logprob is not None:
            information_gain = igpo_rewards.information_gain(answer_logprob, turn_mask, kind=config.ig_kind)
    else:
        raise ValueError(f"config.algorithm must be 'igpo' or 'grpo', got {config.algorithm!r}")
    mask = response_mask(trajectories)
    token_turn_index = igpo_rewards.turn_index_from_response_mask(mask)
    token = igpo_rewards.broadcast_to_tokens(turn, token_turn_index, turn_mask=turn_mask)
    return Advantages(turn, token, mask.bool(), turn_mask, group_ids, outcome, information_gain, rewards)


def all_zero_group_fraction(values: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Fraction of groups in which every value of every rollout (all turns) is exactly 0."""
    flat = values.reshape(values.shape[0], -1)
    groups = torch.unique(group_ids)
    zero = [bool((flat[group_ids == group] == 0).all()) for group in groups]
    return sum(zero) / max(len(zero), 1)


# --- forwards and the update ------------------------------------------------------------------


@torch.no_grad()
def score_trajectories(
    model: Any,
    tokenizer: Any,
    trajectories: Sequence[QATrajectory],
    *,
    include_probes: bool,
    micro_batch_size: int,
    return_entropy: bool = False,
    probe_layout: str = "packed",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs of the sampled tokens (and the probes) without gradients, in micro batches.

    One ``probes.trajectory_forward`` per micro batch: with ``include_probes`` the probes are
    scored in the same forward (``probe_layout`` "packed") or in a second pass over its KV cache
    ("kv_cache"). Returns CPU float32 tensors ``token_logprobs [B, S]`` (aligned with
    ``token_ids``; S = the longest trajectory), ``answer_logprob [B, T]`` (or None) and
    ``entropy [B, S]`` (or None).
    """
    width = max(len(trajectory.token_ids) for trajectory in trajectories)
    turns = max(trajectory.num_turns for trajectory in trajectories)
    token_logprobs = torch.zeros((len(trajectories), width))
    answer_logprob = torch.zeros((len(trajectories), turns)) if include_probes else None
    entropy = torch.zeros((len(trajectories), width)) if return_entropy else None
    for first in range(0, len(trajectories), micro_batch_size):
        chunk = trajectories[first : first + micro_batch_size]
        out = trajectory_forward(
            model, tokenizer, chunk, include_probes=include_probes, probe_layout=probe_layout, return_entropy=return_entropy
        )
        rows = slice(first, first + len(chunk))
        token_logprobs[rows, : out.token_logprobs.shape[1]] = out.token_logprobs.float().cpu()
        if answer_logprob is not None:
            answer_logprob[rows, : out.answer_logprob.shape[1]] = out.answer_logprob.float().cpu()
        if entropy is not None:
            entropy[rows, : out.token_entropy.shape[1]] = out.token_entropy.float().cpu()
    return token_logprobs, answer_logprob, entropy


def _minibatches(num_groups: int, group_size: int, count: int) -> list[list[int]]:
    """Row indices of ``count`` minibatches of whole groups (contiguous, sizes differ by <= 1 group)."""
    bounds = [round(index * num_groups / count) for index in range(count + 1)]
    return [list(range(bounds[i] * group_size, bounds[i + 1] * group_size)) for i in range(count)]


def ppo_update(
    policy: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    trajectories: Sequence[QATrajectory],
    advantages: Advantages,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    config: RLConfig,
) -> dict[str, float]:
    """``config.ppo_epochs`` passes of ``config.minibatches`` AdamW steps on ``policy_loss``.

    Minibatches hold whole groups (``config.group_size`` consecutive rows); each is processed
    in micro batches of ``config.micro_batch_size`` rows whose losses are weighted by their
    share of the minibatch, so the gradient is that of the minibatch's mean over sequences.
    Gradients are clipped to ``config.grad_clip`` (global norm). Returns the mean over
    optimizer steps of the loss statistics and of the pre-clip gradient norm.
    """
    device = next(policy.parameters()).device
    num_groups = len(trajectories) // config.group_size
    minibatches = _minibatches(num_groups, config.group_size, min(config.minibatches, num_groups))
    totals = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "ratio": 0.0, "grad_norm": 0.0}
    updates = 0
    policy.train()
    for _ in range(config.ppo_epochs):
        for rows in minibatches:
            optimizer.zero_grad(set_to_none=True)
            for first in range(0, len(rows), config.micro_batch_size):
                micro = rows[first : first + config.micro_batch_size]
                out = trajectory_forward(policy, tokenizer, [trajectories[row] for row in micro], include_probes=False)
                length = out.token_logprobs.shape[1]
                index = torch.tensor(micro)
                loss, stats = policy_loss(
                    out.token_logprobs.float(),
                    old_logprobs[index, :length].to(device),
                    ref_logprobs[index, :length].to(device) if ref_logprobs is not None else None,
                    advantages.token[index, :length].to(device=device, dtype=torch.float32),
                    advantages.loss_mask[index, :length].to(device),
                    clip_ratio=config.clip_ratio,
                    kl_coef=config.kl_coef,
                )
                weight = len(micro) / len(rows)
                (loss * weight).backward()
                totals["loss"] += float(loss.detach()) * weight
                for key in ("pg_loss", "kl", "clip_fraction", "ratio"):
                    totals[key] += float(stats[key]) * weight
            parameters = [p for p in policy.parameters() if p.grad is not None]
            if config.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
            totals["grad_norm"] += float(grad_norm)
            optimizer.step()
            updates += 1
    optimizer.zero_grad(set_to_none=True)
    policy.eval()
    return {key: value / max(updates, 1) for key, value in totals.items()}


# --- the step ---------------------------------------------------------------------------------


@dataclass
class StepResult:
    """What ``rl_step`` returns: the metrics, the rollouts and their advantages (for case studies)."""

    metrics: dict[str, float | None]
    rollouts: RolloutResult
    advantages: Advantages
    answer_logprob: torch.Tensor | None


def rl_step(
    policy: Any,
    reference: Any | None,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    retriever: Any,
    examples: Sequence[Any],
    config: RLConfig,
) -> StepResult:
    """One RL step on ``examples`` (one group of ``config.group_size`` rollouts each).

    ``reference`` is the frozen warm-start model for the KL term (``None`` or
    ``config.kl_coef == 0`` skips it). Returns the step's metrics (keys as in
    ``igpo_rewards.reference_trainer.report``'s metrics.jsonl schema) and its rollouts.
    """
    step_started = time.perf_counter()
    use_probes = config.algorithm == "igpo" or config.grpo_probes
    use_reference = reference is not None and config.kl_coef > 0

    # -- 1. rollouts: G per question, batched, with retrieval ------------------------------------
    policy.eval()
    rollouts = rollout_examples(
        policy,
        tokenizer,
        retriever,
        examples,
        group_size=config.group_size,
        max_turns=config.max_turns,
        max_new_tokens=config.max_new_tokens,
        topk=config.topk,
        batch_size=config.generation_batch_size,
    )
    trajectories = rollouts.trajectories

    # -- 2. old log-probs + the probe before every turn, in the same forward --------------------
    started = time.perf_counter()
    old_logprobs, answer_logprob, entropy = score_trajectories(
        policy, tokenizer, trajectories, include_probes=use_probes, micro_batch_size=config.micro_batch_size,
        return_entropy=True, probe_layout=config.probe_layout,
    )
    seconds_probes = time.perf_counter() - started

    # -- 3. turn advantages (igpo_rewards), broadcast to the generated tokens --------------------
    advantages = compute_advantages(trajectories, answer_logprob, config)

    # -- 4. reference log-probs, then the PPO update ------------------------------------------------
    started = time.perf_counter()
    ref_logprobs = None
    if use_reference:
        ref_logprobs, _, _ = score_trajectories(
            reference, tokenizer, trajectories, include_probes=False, micro_batch_size=config.micro_batch_size
        )
    update_stats = ppo_update(policy, tokenizer, optimizer, trajectories, advantages, old_logprobs, ref_logprobs, config)
    seconds_update = time.perf_counter() - started

    # -- 5. metrics ------------------------------------------------------------------------------------
    metrics = step_metrics(trajectories, advantages, entropy)
    metrics.update(update_stats)
    if not use_reference:
        metrics["kl"] = None
    seconds = time.perf_counter() - step_started
    metrics.update(
        seconds_rollout=rollouts.generation_seconds,
        seconds_retrieval=rollouts.retrieval_seconds,
        seconds_probes=seconds_probes,
        seconds_update=seconds_update,
        seconds_step=seconds,
        generated_tokens=rollouts.generated_tokens,
        tokens_per_second=sum(len(t.token_ids) for t in trajectories) / seconds if seconds > 0 else None,
    )
    return StepResult(metrics, rollouts, advantages, answer_logprob)


def step_metrics(trajectories: Sequence[QATrajectory], advantages: Advantages, entropy: torch.Tensor) -> dict[str, Any]:
    """Per-step numbers about the rollouts and their advantages (see the metrics.jsonl schema).

    ``zero_variance_group_fraction``: groups in which every turn advantage is exactly 0 (GRPO:
    all outcomes equal; IGPO: all pooled turn rewards equal), the advantage-collapse rate;
    ``outcome_zero_variance_group_fraction``: ``igpo_rewards.zero_variance_group_fraction`` of the
    outcomes (GRPO's collapse condition), logged for both methods.
    """
    f1 = [trajectory.f1 for trajectory in trajectories]
    em = [trajectory.em for trajectory in trajectories]
    mask = advantages.loss_mask
    metrics: dict[str, Any] = {
        "reward_mean": float(advantages.outcome.mean()),
        "reward_std": float(advantages.outcome.std(unbiased=False)),
        "train_f1": sum(f1) / len(f1),
        "train_em": sum(em) / len(em),
        "format_error_fraction": sum(not t.answered for t in trajectories) / len(trajectories),
        "turns_mean": sum(t.num_turns for t in trajectories) / len(trajectories),
        "searches_mean": sum(len(t.queries) for t in trajectories) / len(trajectories),
        "zero_variance_group_fraction": all_zero_group_fraction(advantages.turn, advantages.group_ids),
        "outcome_zero_variance_group_fraction": float(
            igpo_rewards.zero_variance_group_fraction(advantages.outcome, advantages.group_ids)
        ),
        "zero_advantage_token_fraction": float(((advantages.token == 0) & mask).sum() / mask.sum().clamp(min=1)),
        "advantage_abs_mean": float((advantages.token.abs() * mask).sum() / mask.sum().clamp(min=1)),
        "entropy": float((entropy[:, : mask.shape[1]] * mask).sum() / mask.sum().clamp(min=1)),
        "ig_mean": None,
        "ig_std": None,
    }
    if advantages.information_gain is not None:
        # IG is defined on the non-final turns only (the final turn carries the outcome).
        turn_mask = advantages.turn_mask
        final = torch.zeros_like(turn_mask)
        final[torch.arange(len(trajectories)), turn_mask.sum(1) - 1] = True
        gains = advantages.information_gain[turn_mask & ~final]
        if gains.numel() > 0:
            metrics["ig_mean"] = float(gains.mean())
            metrics["ig_std"] = float(gains.std(unbiased=False))
    return metrics


def case_studies(step_result: StepResult, tokenizer: Any, *, count: int, step: int) -> list[dict[str, Any]]:
    """Trajectories of a step in the report's ``trajectories.jsonl`` layout (per turn: text,
    observation, probe probability before the turn, information gain, advantage).

    Prefers multi-turn rollouts with a positive outcome, then other multi-turn ones. Empty when
    the step ran no probes (GRPO without ``grpo_probes``): a case study needs the probe values.
    """
    if step_result.answer_logprob is None:
        return []
    trajectories = step_result.rollouts.trajectories
    advantages = step_result.advantages
    order = sorted(range(len(trajectories)), key=lambda i: (-(trajectories[i].num_turns > 1), -(trajectories[i].outcome > 0), i))
    records = []
    for index in order[:count]:
        trajectory = trajectories[index]
        turns = []
        for j, text in enumerate(trajectory.turn_texts):
            observation = None
            if j < len(trajectory.observation_spans):
                start, end = trajectory.observation_spans[j]
                observation = tokenizer.decode(trajectory.token_ids[start:end], skip_special_tokens=False).strip()
            probe = math.exp(float(step_result.answer_logprob[index, j]))
            gain = None
            if advantages.information_gain is not None and j < trajectory.num_turns - 1:
                gain = float(advantages.information_gain[index, j])
            turns.append(
                {
                    "text": text,
                    "observation": observation,
                    "probe_prob": probe,
                    "information_gain": gain,
                    "advantage": float(advantages.turn[index, j]),
                }
            )
        records.append(
            {
                "step": step,
                "question": trajectory.example.question,
                "answers": list(trajectory.example.answers),
                "hops": trajectory.example.hops,
                "outcome": trajectory.outcome,
                "turns": turns,
            }
        )
    return records


# --- the training loop ------------------------------------------------------------------------------


def examples_for_step(examples: Sequence[Any], step: int, count: int, seed: int) -> list[Any]:
    """The questions of RL step ``step`` (1-based): consecutive slices of seeded per-epoch shuffles.

    A pure function of its arguments, so a resumed run draws exactly the questions the
    uninterrupted run would have drawn, without any sampler state in the checkpoint.
    """
    if not examples:
        raise ValueError("examples is empty: no training questions")
    picked: list[Any] = []
    position = (step - 1) * count
    while len(picked) < count:
        epoch, offset = divmod(position, len(examples))
        order = list(range(len(examples)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = min(count - len(picked), len(examples) - offset)
        picked += [examples[index] for index in order[offset : offset + take]]
        position += take
    return picked


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop the records of steps after ``last_step`` (written by a run killed before its next checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line).get("step", 0) <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _append_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def train(
    config: RunConfig,
    *,
    init: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    retriever: Any,
    train_examples: Sequence[Any],
    eval_examples: Sequence[Any],
) -> dict[str, Any]:
    """The RL run: ``config.rl.steps`` calls of ``rl_step`` from the model in ``init``.

    Writes into ``run_dir``: ``config.json``, ``metrics.jsonl`` (step 0 = the starting policy's
    held-out scores, then one record per step, with held-out EM/F1 every ``eval_every`` steps),
    ``trajectories.jsonl`` (case studies at evaluation steps), ``checkpoints/`` (every
    ``checkpoint_every`` steps and at the end) and ``eval.json`` (the final evaluation, by hop
    and by data source). The frozen KL reference is the model in ``init``. With
    ``config.resume`` the run continues from its latest checkpoint (weights, optimizer, RNG,
    step) and ends exactly where an uninterrupted run would. Returns the final evaluation.
    """
    rl, run_dir = config.rl, Path(run_dir)
    checkpoints = run_dir / "checkpoints"
    metrics_path, trajectories_path = run_dir / "metrics.jsonl", run_dir / "trajectories.jsonl"
    eval_turns = config.eval.max_turns or rl.max_turns
    eval_examples = list(eval_examples)[: config.eval.max_questions or None]

    def evaluate_policy(model: Any, step: int) -> dict[str, Any]:
        return evaluate(
            model, tokenizer, retriever, eval_examples, max_turns=eval_turns, max_new_tokens=rl.max_new_tokens,
            topk=rl.topk, batch_size=config.eval.batch_size, step=step, progress=False,
        )

    # -- seeding ------------------------------------------------------------------------------------
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    torch.manual_seed(config.seed)

    # -- policy, frozen reference, optimizer (from the latest checkpoint when resuming) -------------
    resume_from = latest_checkpoint(checkpoints) if config.resume else None
    dtype = getattr(torch, config.dtype)
    policy, tokenizer = load_pretrained(resume_from or init, dtype=dtype, device=config.device)
    reference = None
    if rl.kl_coef > 0:
        reference, _ = load_pretrained(init, dtype=dtype, device=config.device)
        reference.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=rl.learning_rate, weight_decay=rl.weight_decay)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        start = int(restore_training_state(resume_from, optimizer)["step"])
        _truncate_jsonl(metrics_path, start)
        _truncate_jsonl(trajectories_path, start)
    else:
        start = 0
        write_text_atomic(run_dir / "config.json", json.dumps(to_dict(config), indent=2))
        for path in (metrics_path, trajectories_path, run_dir / "eval.json"):
            path.unlink(missing_ok=True)
        initial = evaluate_policy(policy, 0)
        _append_jsonl(metrics_path, [{"step": 0, "heldout_em": initial["em"], "heldout_f1": initial["f1"]}])

    # -- the loop: rollouts -> probes -> advantages -> update, then log / evaluate / checkpoint -------
    scores = None
    bar = tqdm(range(start + 1, rl.steps + 1), desc=f"{rl.algorithm} RL", disable=not config.progress, initial=start, total=rl.steps)
    for step in bar:
        examples = examples_for_step(train_examples, step, rl.questions_per_step, config.seed)
        result = rl_step(policy, reference, tokenizer, optimizer, retriever, examples, rl)
        record = {"step": step, **result.metrics}
        last = step == rl.steps
        if (rl.eval_every and step % rl.eval_every == 0) or last:
            scores = evaluate_policy(policy, step)
            record.update(heldout_em=scores["em"], heldout_f1=scores["f1"])
            _append_jsonl(trajectories_path, case_studies(result, tokenizer, count=rl.case_studies_per_eval, step=step))
        _append_jsonl(metrics_path, [record])
        bar.set_postfix(reward=f"{record['reward_mean']:.2f}", em=f"{record.get('heldout_em', float('nan')):.2f}")
        if (rl.checkpoint_every and step % rl.checkpoint_every == 0) or last:
            save_checkpoint(checkpoints, step=step, model=policy, tokenizer=tokenizer, optimizer=optimizer,
                            trainer_state={"algorithm": rl.algorithm, "init": str(init)})

    # -- final evaluation (the last step's, unless the run was already complete) -----------------------
    final = scores if scores is not None and scores["step"] == rl.steps else evaluate_policy(policy, rl.steps)
    write_text_atomic(run_dir / "eval.json", json.dumps(final, indent=2))
    return final
