"""Section 4 of the spec: discounted turn advantages, and the variance-rescaled accumulation.

Shapes: B rollouts, T turns (padded).
"""

from __future__ import annotations

from typing import Any

from igpo_rewards import _checks, _turns
from igpo_rewards.backends import Backend, get_backend

Array = Any

ACCUMULATIONS = ("discounted", "sqrt_n")


def accumulation_options(*, gamma: Any, accumulation: Any, ig_advantage_scale: Any) -> dict[str, Any]:
    """The checked hyperparameters of :func:`accumulate` (numbers as Python floats)."""
    return dict(
        gamma=_checks.check_gamma(gamma),
        accumulation=_checks.check_choice("accumulation", accumulation, ACCUMULATIONS),
        ig_advantage_scale=_checks.check_weight("ig_advantage_scale", ig_advantage_scale),
    )


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


def variance_rescaled_returns(
    rewards: Array, turn_mask: Array, *, gamma: float = 1.0, ig_advantage_scale: float = 1.0, validate: bool = True
) -> Array:
    r"""Turn advantages whose information-gain part is divided by the square root of its term count.

    .. math::
        A_{i,j} = \alpha \frac{\sum_{k=j}^{n_i-2} \gamma^{k-j} \hat A_{i,k}}{\sqrt{n_i - 1 - j}}
                  + \gamma^{n_i-1-j} \hat A_{i,n_i-1} \quad (j < n_i - 1), \qquad
        A_{i,n_i-1} = \hat A_{i,n_i-1}

    with alpha = ``ig_advantage_scale``. The IG entries (every valid turn but the final one) are
    accumulated as in :func:`discounted_returns` and divided by the square root of the number of
    IG terms m = n_i - 1 - j in the sum, so that a sum of m roughly independent unit-variance
    normalized gains keeps the scale of one term whatever the turn's depth; the outcome entry is
    added discounted, as in :func:`discounted_returns`. After A2TGPO (arXiv 2605.06200), as its
    released code was described (docs/algorithm.md, "Variants"): there the outcome term is added
    without discount, which is the same at gamma = 1 (every published config) and alpha = 0.3.

    Args:
      rewards: [B, T] normalized turn rewards \hat A (the output of :func:`group_normalize`):
        the IG entries on turns j < n_i - 1, the outcome entry on the final turn.
      turn_mask: [B, T] prefix mask of valid turns.
      gamma: discount in [0, 1], a Python or NumPy number (static under jit).
      ig_advantage_scale: alpha, the weight of the IG part (a finite number).
      validate: value checks (prefix mask, NaN/inf).

    Returns:
      [B, T] returns, dtype of ``rewards``; 0 on padded turns.

    Example:
      Two IG entries (1.0 and 2.0) and the outcome entry 0.5: turn 0 sums 2 IG terms, turn 1 one.

      >>> import numpy as np
      >>> np.round(variance_rescaled_returns(np.array([[1.0, 2.0, 0.5]]), [[1, 1, 1]]), 4)
      array([[2.6213, 2.5   , 0.5   ]])
    """
    options = accumulation_options(gamma=gamma, accumulation="sqrt_n", ig_advantage_scale=ig_advantage_scale)
    validate = _checks.check_flag("validate", validate)
    backend = get_backend(rewards=rewards, turn_mask=turn_mask)
    rewards, turn_mask = _turns.turn_values_and_mask(
        backend, "rewards", rewards, turn_mask, validate=validate, allow_neg_inf=False
    )
    return accumulate(backend, rewards, turn_mask, **options)


def accumulate(
    backend: Backend, normalized: Array, turn_mask: Array, *, gamma: float, accumulation: str, ig_advantage_scale: float
) -> Array:
    """Turn advantages from checked normalized rewards [B, T] and a bool turn mask.

    ``accumulation="discounted"`` is :func:`discounted_returns` of the rewards whose IG entries are
    scaled by ``ig_advantage_scale`` (alpha = 1 multiplies nothing, so the paper's numbers are
    unchanged bit for bit); ``"sqrt_n"`` is :func:`variance_rescaled_returns`.
    """
    if accumulation == "discounted" and ig_advantage_scale == 1.0:
        return discount(backend, normalized, turn_mask, gamma=gamma)
    is_final = _turns.final_turn_mask(backend, turn_mask)
    if accumulation == "discounted":
        return discount(backend, backend.where(is_final, normalized, ig_advantage_scale * normalized), turn_mask,
                        gamma=gamma)
    information = discount(backend, backend.where(is_final, 0.0, normalized), turn_mask, gamma=gamma)
    outcome = discount(backend, backend.where(is_final, normalized, 0.0), turn_mask, gamma=gamma)
    position = backend.arange(turn_mask.shape[1], like=turn_mask)[None, :]
    terms = _turns.num_turns(backend, turn_mask)[:, None] - 1 - position  # m = n_i - 1 - j
    root = backend.sqrt(backend.maximum(backend.astype(terms, normalized.dtype), 1.0))
    advantages = backend.where(is_final, normalized, ig_advantage_scale * information / root + outcome)
    return backend.where(turn_mask, advantages, 0.0)
