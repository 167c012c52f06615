"""One RL step of IGPO (or GRPO), and the run around it. Read ``rl_step`` top to bottom:

1. rollouts: ``rollout.rollout_examples`` samples G rollouts for each question (the library's
   loop, ``igpo_rewards.agent.rollout``) and scores each once (outcome, EM, F1);
2. tensors: ``batch.build_batch`` turns them into ONE ``RolloutBatch`` (padded ids, the turn
   of every generated token from the turn spans, turn starts and mask, group ids, outcomes, probe
   suffixes: the answer's, and with ``rl.igpo.subgoal_weight > 0`` each question's sub-goal
   targets too), on the model's device; everything below takes slices of it;
3. probes + old log-probs: ``score_batch`` runs ``igpo_rewards.agent.probes.probe_forward`` per
   micro batch: the log-probs of the generated tokens (the PPO "old" policy) and, before every
   turn, the length-normalized log-prob of the ground-truth answer (``answer_logprob``, [B, T];
   [B, T, K] with sub-goals: every target of every turn in the same forward);
4. advantages: one call of the settings object, ``config.igpo.igpo_advantages(answer_logprob,
   outcome, turn_mask, group_ids, target_mask=...)`` ([B, T]; every option of
   ``igpo_rewards.igpo_advantages``; with sub-goals the information gain is the weighted sum over
   the targets) or ``config.igpo.grpo_advantages(outcome, group_ids)`` ([B], the same value on every turn);
   ``igpo_rewards.broadcast_to_tokens`` puts turn j's advantage on turn j's generated tokens.
   ``config.max_turns`` caps the rollouts and ``config.igpo.max_turns`` (when set) the advantage
   computation, with one meaning (the most turns a rollout may have): the second may not be lower;
5. reference: the frozen warm start's log-probs of the same tokens (a plain causal forward);
6. update (``ppo_update``): PPO clipped surrogate (clip 0.2) + ``kl_coef`` * k3 KL to the
   reference (``policy_loss``), averaged over the generated tokens of each sequence and then over
   sequences; AdamW with gradient-norm clipping, ``ppo_epochs`` x ``minibatches`` optimizer steps;
7. metrics (``metrics.step_metrics``).

Forwards without probe copies (the update, the reference) are the model's plain causal attention
on right-padded rows (SDPA's fast path, no mask tensor), and every forward computes logits only at
the generated tokens. ``policy_loss`` is a pure function of log-prob tensors (tested against
hand-computed values). ``train`` is the run: seeding, the loop, evaluation, metrics.jsonl,
checkpoints, resume.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

import igpo_rewards
from igpo_rewards.agent.probes import probe_forward, token_logprobs
from igpo_rewards.reference_trainer.batch import Advantages, RolloutBatch, build_batch, micro_batches
from igpo_rewards.reference_trainer.checkpoint import latest_checkpoint, restore_training_state, save_checkpoint
from igpo_rewards.reference_trainer.config import RLConfig, RunConfig, to_dict
from igpo_rewards.reference_trainer.evaluation import evaluate
from igpo_rewards.reference_trainer.files import append_jsonl, truncate_jsonl, write_text_atomic
from igpo_rewards.reference_trainer.metrics import case_studies, step_metrics
from igpo_rewards.reference_trainer.modeling import load_pretrained
from igpo_rewards.reference_trainer.rollout import rollout_examples

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


# --- advantages -------------------------------------------------------------------------------


def uses_subgoals(config: RLConfig) -> bool:
    """Whether a step probes the sub-goal targets too: IGPO with ``rl.igpo.subgoal_weight > 0``."""
    return config.algorithm == "igpo" and config.igpo.subgoal_weight > 0


def compute_advantages(batch: RolloutBatch, answer_logprob: torch.Tensor | None, config: RLConfig) -> Advantages:
    """Turn advantages with ``config.igpo`` (IGPO or GRPO), then broadcast to the generated tokens.

    ``answer_logprob`` is the probe output: [B, T], or [B, T, K] when the batch carries sub-goal
    targets (``batch.target_mask`` [B, K]); required for IGPO, for GRPO it only feeds the
    information-gain metric when given. With K targets ``Advantages.target_gains`` holds each
    target's own gain (``igpo_rewards.target_information_gain``).
    """
    settings, turn_mask, target_mask = config.igpo, batch.turn_mask, batch.target_mask
    expected = tuple(turn_mask.shape) + (() if target_mask is None else (target_mask.shape[1],))
    if answer_logprob is not None and tuple(answer_logprob.shape) != expected:
        layout = "[B, T]" if target_mask is None else "[B, T, K]"
        raise ValueError(f"answer_logprob must be {layout} = {expected}, got {tuple(answer_logprob.shape)}")
    information_gain = rewards = target_gains = None
    if config.algorithm == "igpo":
        if answer_logprob is None:
            raise ValueError("IGPO needs the probes' answer_logprob, got None")
        result = settings.igpo_advantages(answer_logprob, batch.outcome, turn_mask, batch.group_ids, target_mask=target_mask)
        turn, information_gain, rewards = result.advantages, result.information_gain, result.rewards
        if target_mask is not None:
            target_gains = igpo_rewards.target_information_gain(
                answer_logprob, turn_mask, target_mask=target_mask, kind=settings.kind, log_prob_floor=settings.log_prob_floor,
                subgoal_potential=settings.subgoal_potential, gain_clip=settings.gain_clip,
            )
    elif config.algorithm == "grpo":
        turn = settings.grpo_advantages(batch.outcome, batch.group_ids)[:, None] * turn_mask
        if answer_logprob is not None:
            information_gain = settings.information_gain(answer_logprob, turn_mask)
    else:
        raise ValueError(f"config.algorithm must be 'igpo' or 'grpo', got {config.algorithm!r}")
    token = igpo_rewards.broadcast_to_tokens(turn, batch.token_turn, turn_mask=turn_mask)
    return Advantages(turn, token, information_gain, rewards, target_gains)


# --- forwards and the update ------------------------------------------------------------------


class Scores(NamedTuple):
    """``score_batch``'s output: [B, S] log-probs of the generated tokens (0 elsewhere), the [B, T]
    probes ([B, T, K] with sub-goal targets; or None) and the [B, S] entropy at the generated
    tokens (or None)."""

    logprobs: torch.Tensor
    answer_logprob: torch.Tensor | None
    entropy: torch.Tensor | None


@torch.no_grad()
def score_batch(model: Any, batch: RolloutBatch, config: RLConfig, *, probes: bool, entropy: bool = False) -> Scores:
    """Log-probs of the generated tokens (and, with ``probes``, the probe before every turn, from the
    same forward) without gradients, in micro batches of similar lengths."""
    logprobs = torch.zeros(batch.input_ids.shape, device=batch.input_ids.device)
    targets = () if batch.target_mask is None else (batch.target_mask.shape[1],)  # K is the whole batch's
    answer_logprob = torch.zeros(tuple(batch.turn_mask.shape) + targets, device=logprobs.device) if probes else None
    spread = torch.zeros_like(logprobs) if entropy else None
    rows = torch.arange(len(batch.trajectories), device=logprobs.device)
    for micro in micro_batches(rows, batch.lengths, config.micro_batch_size, max_tokens=config.micro_batch_tokens):
        part = batch.select(micro)
        if probes:
            out = probe_forward(
                model, part.input_ids, part.lengths, part.turn_starts, part.turn_mask, part.suffixes,
                token_mask=part.loss_mask, probe_layout=config.probe_layout, return_entropy=entropy,
            )
            values, entropies, answer_logprob[micro] = out.token_logprobs, out.token_entropy, out.answer_logprob
        else:
            values, entropies = token_logprobs(model, part.input_ids, part.loss_mask, return_entropy=entropy)
        logprobs[micro, : values.shape[1]] = values
        if entropy:
            spread[micro, : values.shape[1]] = entropies
    return Scores(logprobs, answer_logprob, spread)


def _minibatches(num_groups: int, group_size: int, count: int, device: torch.device) -> list[torch.Tensor]:
    """Row indices of ``count`` minibatches of whole groups (contiguous, sizes differ by <= 1 group)."""
    bounds = [round(index * num_groups / count) for index in range(count + 1)]
    return [torch.arange(bounds[i] * group_size, bounds[i + 1] * group_size, device=device) for i in range(count)]


def _micro_step(
    policy: Any, part: RolloutBatch, advantages: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None, weight: float, config: RLConfig
) -> dict[str, float]:
    """Forward and backward of one micro batch, its loss weighted by its share of the minibatch."""
    width = part.input_ids.shape[1]
    logprobs, _ = token_logprobs(policy, part.input_ids, part.loss_mask)
    loss, stats = policy_loss(
        logprobs, old[:, :width], None if ref is None else ref[:, :width], advantages[:, :width], part.loss_mask,
        clip_ratio=config.clip_ratio, kl_coef=config.kl_coef,
    )
    (loss * weight).backward()
    return {"loss": float(loss.detach()) * weight, **{key: float(value) * weight for key, value in stats.items()}}


def _clip_gradients(policy: Any, grad_clip: float) -> float:
    """Clip the global gradient norm to ``grad_clip`` (0: no clipping); returns the norm before."""
    parameters = [p for p in policy.parameters() if p.grad is not None]
    if grad_clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(parameters, grad_clip))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters])))


def ppo_update(
    policy: Any,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    token_advantages: torch.Tensor,
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
    num_groups = len(batch.trajectories) // config.group_size
    minibatches = _minibatches(num_groups, config.group_size, min(config.minibatches, num_groups), batch.input_ids.device)
    totals = dict.fromkeys(("loss", "pg_loss", "kl", "clip_fraction", "ratio", "grad_norm"), 0.0)
    policy.train()
    for _ in range(config.ppo_epochs):
        for rows in minibatches:
            optimizer.zero_grad(set_to_none=True)
            for micro in micro_batches(rows, batch.lengths, config.micro_batch_size, max_tokens=config.micro_batch_tokens):
                ref = None if ref_logprobs is None else ref_logprobs[micro]
                stats = _micro_step(
                    policy, batch.select(micro), token_advantages[micro], old_logprobs[micro], ref, len(micro) / len(rows), config
                )
                for key, value in stats.items():
                    totals[key] += value
            totals["grad_norm"] += _clip_gradients(policy, config.grad_clip)
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    policy.eval()
    updates = max(config.ppo_epochs * len(minibatches), 1)
    return {key: value / updates for key, value in totals.items()}


# --- the step ---------------------------------------------------------------------------------


def check_turn_caps(config: RLConfig) -> None:
    """``config.max_turns`` (the rollout loop's cap) and ``config.igpo.max_turns`` (the advantage
    settings' cap, when set) mean the same bound: the settings may not refuse what the loop allows.

    Raises:
        ValueError: ``rl.igpo.max_turns`` below ``rl.max_turns``.
    """
    cap = config.igpo.max_turns
    if cap is not None and cap < config.max_turns:
        raise ValueError(
            f"rl.igpo.max_turns = {cap} is below rl.max_turns = {config.max_turns}: both are the most turns a "
            f"rollout may have, and the rollouts may take {config.max_turns}. Leave rl.igpo.max_turns unset (no "
            f"cap beyond the rollouts') or set it to at least rl.max_turns"
        )


def check_subgoals(config: RLConfig, examples: Sequence[Any]) -> None:
    """Sub-goal targets need questions that have some: refuse ``rl.igpo.subgoal_weight > 0`` (IGPO)
    when no training question has a sub-goal (``QAExample.subgoals``), since the run would be the
    paper's IGPO under another name.

    Raises:
        ValueError: sub-goals on and none of ``examples`` has one.
    """
    if uses_subgoals(config) and not any(example.subgoals for example in examples):
        raise ValueError(
            f"rl.igpo.subgoal_weight = {config.igpo.subgoal_weight} needs questions with gold chains of 2 hops or more "
            f"(extra_info.gold_bridge_answers: the bridge entities, then the answer), but none of the {len(examples)} "
            "training questions has a sub-goal; set rl.igpo.subgoal_weight 0 (the paper's IGPO) or give such data"
        )


@dataclass
class StepResult:
    """What ``rl_step`` returns: the metrics, the batch of rollouts, their advantages and probes."""

    metrics: dict[str, float | None]
    batch: RolloutBatch
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
    ``igpo_rewards.reference_trainer.report``'s metrics.jsonl schema), batch and advantages.
    """
    check_turn_caps(config)
    step_started = time.perf_counter()
    use_probes = config.algorithm == "igpo" or config.grpo_probes
    use_reference = reference is not None and config.kl_coef > 0
    device = next(policy.parameters()).device

    # -- 1. rollouts: G per question, batched, with retrieval; each scored once ------------------
    policy.eval()
    rollouts = rollout_examples(
        policy, tokenizer, retriever, examples, group_size=config.group_size, max_turns=config.max_turns,
        max_new_tokens=config.max_new_tokens, topk=config.topk, batch_size=config.generation_batch_size,
    )

    # -- 2. one batch of tensors for everything below (the answer's probe suffix, and the sub-goals') --
    batch = build_batch(rollouts.trajectories, tokenizer, probes=use_probes, subgoals=uses_subgoals(config), device=device)

    # -- 3. old log-probs + the probe before every turn, in the same forward --------------------
    started = time.perf_counter()
    old = score_batch(policy, batch, config, probes=use_probes, entropy=True)
    seconds_probes = time.perf_counter() - started

    # -- 4. turn advantages (one call of the library), broadcast to the generated tokens ---------
    advantages = compute_advantages(batch, old.answer_logprob, config)

    # -- 5. reference log-probs (the frozen warm start) for the KL term ----------------------------
    started = time.perf_counter()
    ref_logprobs = score_batch(reference, batch, config, probes=False).logprobs if use_reference else None
    seconds_reference = time.perf_counter() - started

    # -- 6. the PPO update ----------------------------------------------------------------------------
    started = time.perf_counter()
    update_stats = ppo_update(policy, optimizer, batch, advantages.token, old.logprobs, ref_logprobs, config)
    seconds_update = time.perf_counter() - started

    # -- 7. metrics ------------------------------------------------------------------------------------
    metrics = {**step_metrics(batch, advantages, old.entropy), **update_stats}
    if not use_reference:
        metrics["kl"] = None
    seconds = time.perf_counter() - step_started
    metrics.update(
        seconds_rollout=rollouts.generation_seconds,
        seconds_retrieval=rollouts.retrieval_seconds,
        seconds_probes=seconds_probes,
        seconds_reference=seconds_reference,
        seconds_update=seconds_update,
        seconds_step=seconds,
        generated_tokens=rollouts.generated_tokens,
        tokens_per_second=int(batch.lengths.sum()) / seconds if seconds > 0 else None,
    )
    return StepResult(metrics, batch, advantages, old.answer_logprob)


# --- the run ----------------------------------------------------------------------------------------


def seed_everything(config: RunConfig) -> None:
    """The seeding block: Python, NumPy and torch RNGs from ``config.seed``; torch threads."""
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    torch.manual_seed(config.seed)
    if config.threads > 0:
        torch.set_num_threads(config.threads)


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


def _start(config: RunConfig, init: str | os.PathLike[str], checkpoints: Path) -> tuple[Any, Any, Any, torch.optim.Optimizer, int]:
    """Policy, frozen reference (or None), tokenizer, optimizer and the step done so far: from
    ``init``, or from the latest checkpoint when ``config.resume`` (weights, optimizer, RNG)."""
    resume_from = latest_checkpoint(checkpoints) if config.resume else None
    dtype = getattr(torch, config.dtype)
    policy, tokenizer = load_pretrained(resume_from or init, dtype=dtype, device=config.device)
    reference = None
    if config.rl.kl_coef > 0:
        reference, _ = load_pretrained(init, dtype=dtype, device=config.device)
        reference.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.rl.learning_rate, weight_decay=config.rl.weight_decay)
    start = int(restore_training_state(resume_from, optimizer)["step"]) if resume_from is not None else 0
    return policy, reference, tokenizer, optimizer, start


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
    held-out scores, or only ``{"step": 0}`` when ``rl.eval_at_start`` is off, then one record per
    step, with held-out EM/F1 every ``eval_every`` steps), ``evaluations.jsonl`` (each evaluation's
    per-question ``em`` and ``f1``, in the order of ``eval_examples``), ``trajectories.jsonl``
    (case studies at evaluation steps), ``checkpoints/`` (every ``checkpoint_every`` steps and at
    the end) and ``eval.json`` (the final evaluation, by hop, by data source and per question). The
    frozen KL reference is the model in ``init``. With
    ``config.resume`` the run continues from its latest checkpoint (weights, optimizer, RNG,
    step) and ends exactly where an uninterrupted run would. Returns the final evaluation.
    """
    rl, run_dir = config.rl, Path(run_dir)
    check_turn_caps(rl)  # before any model is loaded
    check_subgoals(rl, train_examples)
    checkpoints, metrics_path, trajectories_path = run_dir / "checkpoints", run_dir / "metrics.jsonl", run_dir / "trajectories.jsonl"
    evaluations_path = run_dir / "evaluations.jsonl"
    eval_examples = list(eval_examples)[: config.eval.max_questions or None]

    def evaluate_policy(step: int) -> dict[str, Any]:
        result = evaluate(
            policy, tokenizer, retriever, eval_examples, max_turns=config.eval.max_turns or rl.max_turns,
            max_new_tokens=rl.max_new_tokens, topk=rl.topk, batch_size=config.eval.batch_size, step=step,
        )
        append_jsonl(evaluations_path, [{"step": step, "em": result["questions"]["em"], "f1": result["questions"]["f1"]}])
        return result

    # -- seeding, then policy, frozen reference and optimizer (from the latest checkpoint when resuming)
    seed_everything(config)
    policy, reference, tokenizer, optimizer, start = _start(config, init, checkpoints)
    run_dir.mkdir(parents=True, exist_ok=True)
    if start > 0:
        for path in (metrics_path, trajectories_path, evaluations_path):
            truncate_jsonl(path, start)
    else:
        write_text_atomic(run_dir / "config.json", json.dumps(to_dict(config), indent=2))
        for path in (metrics_path, trajectories_path, evaluations_path, run_dir / "eval.json"):
            path.unlink(missing_ok=True)
        initial = evaluate_policy(0) if rl.eval_at_start else None
        append_jsonl(metrics_path, [{"step": 0} if initial is None else
                                    {"step": 0, "heldout_em": initial["em"], "heldout_f1": initial["f1"]}])

    # -- the loop: rollouts -> probes -> advantages -> update, then log / evaluate / checkpoint -------
    scores = None
    bar = tqdm(range(start + 1, rl.steps + 1), desc=f"{rl.algorithm} RL", disable=not config.progress, initial=start, total=rl.steps)
    for step in bar:
        result = rl_step(policy, reference, tokenizer, optimizer, retriever, examples_for_step(train_examples, step, rl.questions_per_step, config.seed), rl)
        record, last = {"step": step, **result.metrics}, step == rl.steps
        if (rl.eval_every and step % rl.eval_every == 0) or last:
            scores = evaluate_policy(step)
            record.update(heldout_em=scores["em"], heldout_f1=scores["f1"])
            studies = case_studies(result.batch, result.advantages, result.answer_logprob, tokenizer, count=rl.case_studies_per_eval, step=step)
            append_jsonl(trajectories_path, studies)
        append_jsonl(metrics_path, [record])
        bar.set_postfix(reward=f"{record['reward_mean']:.2f}", em=f"{record.get('heldout_em', float('nan')):.2f}")
        if (rl.checkpoint_every and step % rl.checkpoint_every == 0) or last:
            save_checkpoint(checkpoints, step=step, model=policy, tokenizer=tokenizer, optimizer=optimizer,
                            trainer_state={"algorithm": rl.algorithm, "init": str(init)})

    # -- final evaluation (the last step's, unless the run was already complete) -----------------------
    final = scores if scores is not None and scores["step"] == rl.steps else evaluate_policy(rl.steps)
    write_text_atomic(run_dir / "eval.json", json.dumps(final, indent=2))
    return final
