"""Section 4 of the spec: discounted turn advantages. Shapes: B rollouts, T turns (padded)."""

from __future__ import annotations

from typing import Any

from igpo_rewards import _checks, _turns
from igpo_rewards.backends import Backend, get_backend

Array = Any


def discounted_returns(rewards: Array, turn_mask: Array, *, gamma: float = 1.0, validate: bool = True) -> Array:
    r"""Discounted sum of the (normalized) rewards of the current and later turns.

    .. math:: A_{i,j} = \sum_{k=j}^{n_i-1} \gamma^{k-j} \hat A_{i,k}
              \quad\Longleftrightarrow\quad A_{i,j} = \hat A_{i,j} + \gamma A_{i,j+1}

    computed as that backward recursion over the T turns (vectorised over rollouts).
    gamma = 1 (every published config) sums all later rewards; gamma = 0 returns the rewards
    unchanged (0^0 = 1). Padded turns get 0 and contribute nothing.

    Args:
      rewards: [B, T] per-turn rewards, usually the output of :func:`group_normalize`.
      turn_mask: [B, T] prefix mask of valid turns.
      gamma: discount in [0, 1], a Python or NumPy number (static under jit).
      validate: value checks (prefix mask, NaN/inf).

    Returns:
      [B, T] returns, dtype of ``rewards``.

    Example:
      >>> import numpy as np
      >>> discounted_returns(np.array([[1.0, 2.0, 4.0]]), [[1, 1, 0]], gamma=0.5)
      array([[2., 2., 0.]])
    """
    gamma = _checks.check_gamma(gamma)
    validate = _checks.check_flag("validate", validate)
    backend = get_backend(rewards=rewards, turn_mask=turn_mask)
    rewards, turn_mask = _turns.turn_values_and_mask(
        backend, "rewards", rewards, turn_mask, validate=validate, allow_neg_inf=False
    )
    return discount(backend, rewards, turn_mask, gamma=gamma)


def discount(backend: Backend, rewards: Array, turn_mask: Array, *, gamma: float) -> Array:
    """The backward recursion of :func:`discounted_returns` on checked arrays ([B, T], bool mask)."""
    rewards = backend.where(turn_mask, rewards, 0.0)
    num_rollouts, num_turns = rewards.shape
    if num_turns == 0:
        return rewards
    running = rewards[:, num_turns - 1]
    columns = [running]
    for turn in range(num_turns - 2, -1, -1):
        running = rewards[:, turn] + gamma * running
        columns.append(running)
    return backend.where(turn_mask, backend.stack(columns[::-1], axis=1), 0.0)
