"""Information gain on checked arrays: beliefs, potentials, per-target gains and their weighted sum.

The public functions (:func:`igpo_rewards.information_gain`,
:func:`igpo_rewards.target_information_gain`, ...) check their arguments and call these.
Shapes: B rollouts, T turns (padded), K targets (target 0 = the answer).
"""

from __future__ import annotations

from typing import Any

import einops

from igpo_rewards.backends import Backend

Array = Any

SUBGOAL_POTENTIALS = ("running_max", "probe")
GAIN_CLIPS = ("none", "positive")


def beliefs(backend: Backend, logprob: Array, turn_mask: Array, *, kind: str, log_prob_floor: float) -> Array:
    """b = exp(m) (kind "prob") or max(m, floor) (kind "log_prob") at valid turns; the value of m = 0
    at the others (never read by a gain)."""
    logprob = backend.where(turn_mask, logprob, 0.0)
    if kind == "prob":
        return backend.exp(logprob)
    return backend.maximum(logprob, log_prob_floor)


def successor_difference(backend: Backend, potential: Array, turn_mask: Array) -> Array:
    """phi_{i,j+1} - phi_{i,j} where turn j + 1 is valid (j < n_i - 1), 0 elsewhere: [B, T] -> [B, T]."""
    num_rollouts, num_turns = potential.shape
    if num_turns == 0:
        return potential
    # Turn j has a successor probe exactly when turn j+1 is valid (j < n_i - 1).
    gain = backend.where(turn_mask[:, 1:], potential[:, 1:] - potential[:, :-1], 0.0)
    return backend.concat([gain, backend.zeros((num_rollouts, 1), gain.dtype, like=gain)], axis=1)


def clip_gain(backend: Backend, gain: Array, gain_clip: str) -> Array:
    """g := max(g, 0) for ``gain_clip="positive"``; ``gain`` itself for "none"."""
    return backend.maximum(gain, 0.0) if gain_clip == "positive" else gain


def gain_from_beliefs(backend: Backend, answer_logprob: Array, turn_mask: Array, *, kind: str, log_prob_floor: float) -> Array:
    """IG [B, T] of one target (the answer) from checked probe log-probs and a bool turn mask
    (see :func:`igpo_rewards.information_gain`)."""
    belief = beliefs(backend, answer_logprob, turn_mask, kind=kind, log_prob_floor=log_prob_floor)
    return successor_difference(backend, belief, turn_mask)


def target_gains(
    backend: Backend,
    logprob: Array,
    turn_mask: Array,
    target_mask: Array,
    *,
    kind: str,
    log_prob_floor: float,
    subgoal_potential: str,
    gain_clip: str,
) -> Array:
    """Per-target gains g [B, T, K] from checked probe log-probs [B, T, K], a bool turn mask [B, T]
    and a bool target mask [B, K] (see :func:`igpo_rewards.target_information_gain`).

    The K targets of a row are K more rows of the one-target computation (the [B * K, T]
    reshape): for K = 1 every operation is the one of :func:`gain_from_beliefs`, so the gains are
    the same bits. Absent targets get 0 (their values, NaN included, are never read).
    """
    num_targets = logprob.shape[2]
    rows = einops.rearrange(logprob, "b t k -> (b k) t")
    mask = einops.rearrange(turn_mask[:, :, None] & target_mask[:, None, :], "b t k -> (b k) t")
    potential = beliefs(backend, rows, mask, kind=kind, log_prob_floor=log_prob_floor)
    if subgoal_potential == "running_max" and num_targets > 1:
        # A sub-goal, once reached, stays reached: phi_{i,j,k} = max_{j' <= j} b_{i,j',k} for k >= 1.
        # Padded turns come after the valid ones, so the running max of a valid turn reads valid turns only.
        is_subgoal = backend.arange(rows.shape[0], like=rows) % num_targets != 0
        potential = backend.where(is_subgoal[:, None], backend.cummax(potential, axis=1), potential)
    gain = clip_gain(backend, successor_difference(backend, potential, mask), gain_clip)
    return einops.rearrange(gain, "(b k) t -> b t k", k=num_targets)


def weighted_sum(backend: Backend, gains: Array, target_weights: Array, target_mask: Array) -> Array:
    """IG_{i,j} = sum_k tau_{i,k} w_{i,k} g_{i,j,k}: [B, T, K] gains, [B, K] weights and mask -> [B, T].

    The products and the sum run in the gains' statistics dtype (float32 for half precision) and
    the result is cast back; a weight of 1.0 multiplies exactly and a sum over one target is that
    target's gain, so K = 1 with weight 1 returns the gains' own bits.
    """
    dtype = backend.statistics_dtype(gains.dtype)
    weighted = backend.astype(gains, dtype) * backend.astype(target_weights, dtype)[:, None, :]
    weighted = backend.where(target_mask[:, None, :], weighted, 0.0)
    return backend.astype(backend.sum(weighted, axis=2), gains.dtype)
