"""Information gain over K weighted targets: the answer and, where the data has them, sub-goals.

The paper probes one target, the ground-truth answer. Here a question may have K targets: target
0 is the answer, targets 1 .. K-1 are sub-goals (bridge entities, sub-answers of a multi-hop
question). Each target k has a potential phi_k (the probe's belief in it, or for a sub-goal its
running maximum), and a turn's information gain is the weighted sum of the potentials' changes
(docs/algorithm.md, "Several targets"). With K = 1 it is the paper's IG, bit for bit.

Shapes: B rollouts, T turns (padded), K targets. :func:`target_information_gain` is public; the
other functions check and convert the target arguments for :func:`igpo_rewards.information_gain`,
:func:`igpo_rewards.turn_rewards` and :func:`igpo_rewards.igpo_advantages`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from igpo_rewards import _checks, _gains, _turns
from igpo_rewards.backends import Backend, backend_name_of, get_backend

Array = Any

INFORMATION_GAIN_KINDS = ("prob", "log_prob")
SUBGOAL_POTENTIALS = _gains.SUBGOAL_POTENTIALS
GAIN_CLIPS = _gains.GAIN_CLIPS


def gain_options(*, kind: Any, log_prob_floor: Any, subgoal_potential: Any, gain_clip: Any) -> dict[str, Any]:
    """The checked hyperparameters of the information gain (floats as Python floats)."""
    return dict(
        kind=_checks.check_choice("kind", kind, INFORMATION_GAIN_KINDS),
        log_prob_floor=_checks.check_weight("log_prob_floor", log_prob_floor),
        subgoal_potential=_checks.check_choice("subgoal_potential", subgoal_potential, SUBGOAL_POTENTIALS),
        gain_clip=_checks.check_choice("gain_clip", gain_clip, GAIN_CLIPS),
    )


class Probes(NamedTuple):
    """Checked probe inputs: float log-probs [B, T] or [B, T, K], the bool turn mask [B, T], and for
    [B, T, K] log-probs the weights [B, K] (None when not asked for) and the bool target mask [B, K]."""

    logprob: Array
    turn_mask: Array
    target_weights: Array | None
    target_mask: Array | None

    @property
    def has_targets(self) -> bool:
        return self.target_mask is not None


def dispatch(target_weights: Any, target_mask: Any) -> dict[str, Any]:
    """The keywords to add to ``get_backend`` for the target arguments (None ones are left out)."""
    return {name: value for name, value in (("target_weights", target_weights), ("target_mask", target_mask))
            if value is not None}


def check_probes(
    backend: Backend,
    answer_logprob: Array,
    turn_mask: Array,
    *,
    target_weights: Any,
    target_mask: Any,
    validate: bool,
    weights_required: bool = True,
    num_rollouts: int | None = None,
    rollouts_from: str = "",
) -> Probes:
    """Converts and checks ``answer_logprob`` ([B, T], or [B, T, K] with its target arguments).

    [B, T] input takes the one-target path of the paper, unchanged; giving ``target_weights`` or
    ``target_mask`` with it is an error (they describe a K axis it does not have).
    """
    answer_logprob = backend.asarray(answer_logprob)
    if len(answer_logprob.shape) not in (2, 3):
        raise ValueError(
            f"answer_logprob must have shape [B, T] (the answer's probes) or [B, T, K] (K targets), got shape "
            f"{tuple(answer_logprob.shape)}"
        )
    if len(answer_logprob.shape) == 2:
        if target_weights is not None or target_mask is not None:
            given = [name for name, value in (("target_weights", target_weights), ("target_mask", target_mask))
                     if value is not None]
            raise ValueError(
                f"{' and '.join(given)} describe K targets, but answer_logprob has shape {tuple(answer_logprob.shape)}: "
                f"pass the probes of every target as [B, T, K] (target 0 the answer), or leave {' and '.join(given)} out"
            )
        values, mask = _turns.turn_values_and_mask(
            backend, "answer_logprob", answer_logprob, turn_mask, validate=validate, allow_neg_inf=True,
            log_probabilities=True, num_rollouts=num_rollouts, rollouts_from=rollouts_from,
        )
        return Probes(values, mask, None, None)
    turn_mask = backend.asarray(turn_mask, like=answer_logprob)
    shape = tuple(answer_logprob.shape)
    if tuple(turn_mask.shape) != shape[:2]:
        raise ValueError(
            f"turn_mask must have shape [B, T] = {shape[:2]} (from answer_logprob [B, T, K] = {shape}), "
            f"got {tuple(turn_mask.shape)}"
        )
    _checks.check_numeric(backend, "answer_logprob", answer_logprob)
    turn_mask = _checks.as_mask(backend, "turn_mask", turn_mask, validate=validate)
    values = backend.astype(answer_logprob, backend.float_dtype(answer_logprob))
    mask = _target_mask(backend, target_mask, shape, validate=validate, like=values)
    weights = _target_weights(backend, target_weights, shape, required=weights_required, validate=validate, like=values)
    if validate:
        _checks.check_prefix_mask(backend, "turn_mask", turn_mask)
        where = turn_mask[:, :, None] & mask[:, None, :]
        _checks.check_no_nan(backend, "answer_logprob", values, where, allow_neg_inf=True)
        _turns.check_log_probabilities(backend, "answer_logprob", values, where)
        _check_answer_present(backend, turn_mask, mask)
    return Probes(values, turn_mask, weights, mask)


def _target_mask(backend: Backend, target_mask: Any, shape: tuple[int, ...], *, validate: bool, like: Array) -> Array:
    """tau [B, K] bool: which targets each row has (all, when not given)."""
    num_rollouts, _, num_targets = shape
    if target_mask is None:
        return backend.zeros((num_rollouts, num_targets), backend.index_dtype(), like=like) == 0
    target_mask = backend.asarray(target_mask, like=like)
    if tuple(target_mask.shape) != (num_rollouts, num_targets):
        raise ValueError(
            f"target_mask must have shape [B, K] = {(num_rollouts, num_targets)} (from answer_logprob [B, T, K] = "
            f"{shape}), got {tuple(target_mask.shape)}"
        )
    return _checks.as_mask(backend, "target_mask", target_mask, validate=validate)


def _target_weights(
    backend: Backend, target_weights: Any, shape: tuple[int, ...], *, required: bool, validate: bool, like: Array
) -> Array | None:
    """w [B, K] floating: from [K] or [B, K]; [1.0] for K = 1 when not given."""
    num_rollouts, _, num_targets = shape
    if target_weights is None:
        if num_targets == 1:
            return backend.zeros((num_rollouts, 1), like.dtype, like=like) + 1.0
        if not required:
            return None
        raise ValueError(
            f"answer_logprob holds K = {num_targets} targets, so target_weights ([K] or [B, K], the weight of each "
            f"target's gain; e.g. [1.0] + [w] * {num_targets - 1}) is required"
        )
    if backend_name_of(target_weights, argument="target_weights") in (None, "numpy"):
        host = np.asarray(target_weights)
        if host.dtype.kind not in "biuf":
            raise TypeError(f"target_weights must hold real numbers, got dtype {host.dtype}")
        target_weights = host.astype(np.float64)  # no float32 rounding of 0.1 before the cast to the gains' dtype
    target_weights = backend.asarray(target_weights, like=like)
    _checks.check_numeric(backend, "target_weights", target_weights)
    if tuple(target_weights.shape) == (num_targets,):
        target_weights = target_weights[None, :] + backend.zeros((num_rollouts, 1), target_weights.dtype, like=like)
    elif tuple(target_weights.shape) != (num_rollouts, num_targets):
        raise ValueError(
            f"target_weights must have shape [K] = ({num_targets},) or [B, K] = {(num_rollouts, num_targets)} (from "
            f"answer_logprob [B, T, K] = {shape}), got {tuple(target_weights.shape)}"
        )
    target_weights = backend.astype(target_weights, backend.float_dtype(target_weights))
    if validate:
        _checks.check_no_nan(backend, "target_weights", target_weights, None, allow_neg_inf=False)
    return target_weights


def _check_answer_present(backend: Backend, turn_mask: Array, target_mask: Array) -> None:
    """Target 0, the answer, must be present in every row with a valid turn (it defines IGPO)."""
    if not backend.is_concrete(target_mask):
        return
    missing = backend.sum(backend.astype(turn_mask, backend.index_dtype()), axis=1) > 0
    missing = missing & ~target_mask[:, 0]
    if backend.any(missing):
        rows = np.flatnonzero(backend.to_numpy(missing))[:5].tolist()
        raise ValueError(
            f"target_mask[:, 0] must be True (target 0 is the answer) on every row with a valid turn; rows {rows} "
            f"have turns but no answer target"
        )


def information_gain_of(backend: Backend, probes: Probes, *, kind: str, log_prob_floor: float,
                        subgoal_potential: str, gain_clip: str) -> Array:
    """IG [B, T] of checked probes: the paper's for [B, T], the weighted sum over targets for [B, T, K]."""
    if not probes.has_targets:
        gain = _gains.gain_from_beliefs(backend, probes.logprob, probes.turn_mask, kind=kind, log_prob_floor=log_prob_floor)
        return _gains.clip_gain(backend, gain, gain_clip)
    gains = _gains.target_gains(
        backend, probes.logprob, probes.turn_mask, probes.target_mask, kind=kind, log_prob_floor=log_prob_floor,
        subgoal_potential=subgoal_potential, gain_clip=gain_clip,
    )
    return _gains.weighted_sum(backend, gains, probes.target_weights, probes.target_mask)


def target_information_gain(
    answer_logprob: Array,
    turn_mask: Array,
    *,
    target_mask: Array | None = None,
    kind: str = "prob",
    log_prob_floor: float = -20.0,
    subgoal_potential: str = "running_max",
    gain_clip: str = "none",
    validate: bool = True,
) -> Array:
    r"""The gain of every target on every turn, before weighting (for diagnostics and case studies).

    .. math::
        b_{i,j,k} = e^{m_{i,j,k}} \ (\text{kind="prob"}), \quad \max(m_{i,j,k}, f) \ (\text{kind="log\_prob"})

        \phi_{i,j,k} = b_{i,j,k} \ (k = 0 \text{ or subgoal\_potential="probe"}), \quad
        \max_{j' \le j} b_{i,j',k} \ (k \ge 1, \text{"running\_max"})

        g_{i,j,k} = \phi_{i,j+1,k} - \phi_{i,j,k} \ (j < n_i - 1), \qquad
        g_{i,j,k} := \max(g_{i,j,k}, 0) \ (\text{gain\_clip="positive"})

    g = 0 on the final turn, on padded turns and for absent targets. :func:`information_gain`
    returns sum_k tau_{i,k} w_{i,k} g_{i,j,k}.

    Args:
      answer_logprob: [B, T, K] probe log-probs m_{i,j,k} of target k before turn j (target 0 the
        answer, 1 .. K-1 sub-goals); or [B, T], the answer alone (K = 1). Values at padded turns
        and absent targets are ignored (NaN allowed there).
      turn_mask: [B, T] prefix mask of valid turns.
      target_mask: optional [B, K] bool or 0/1, tau: which targets row i has (default: all).
        Target 0 must be present on every row with a valid turn.
      kind, log_prob_floor: as in :func:`information_gain`.
      subgoal_potential: "running_max" (default; a sub-goal once reached stays reached) or
        "probe" (the raw belief). Target 0 always uses the raw belief.
      gain_clip: "none" (default) or "positive" (each target's gain clipped at 0; an ablation).
      validate: value checks (prefix mask, NaN/inf and positive values at valid turns of present
        targets, the answer present).

    Returns:
      [B, T, K] floating array, dtype of ``answer_logprob`` ([B, T, 1] for [B, T] input).

    Example:
      >>> import numpy as np
      >>> m = np.log([[[0.1, 0.2], [0.1, 0.9], [0.8, 0.3]]])   # B=1, T=3, K=2: answer, one bridge
      >>> np.round(target_information_gain(m, [[1, 1, 1]]), 4)   # the bridge's drop is not taken back
      array([[[0. , 0.7],
              [0.7, 0. ],
              [0. , 0. ]]])
    """
    options = gain_options(kind=kind, log_prob_floor=log_prob_floor, subgoal_potential=subgoal_potential,
                           gain_clip=gain_clip)
    validate = _checks.check_flag("validate", validate)
    backend = get_backend(answer_logprob=answer_logprob, turn_mask=turn_mask, **dispatch(None, target_mask))
    answer_logprob = backend.asarray(answer_logprob)
    if len(answer_logprob.shape) == 2:
        answer_logprob = answer_logprob[:, :, None]
    elif len(answer_logprob.shape) != 3:
        raise ValueError(f"answer_logprob must have shape [B, T, K] or [B, T], got shape {tuple(answer_logprob.shape)}")
    probes = check_probes(backend, answer_logprob, turn_mask, target_weights=None, target_mask=target_mask,
                          validate=validate, weights_required=False)
    return _gains.target_gains(backend, probes.logprob, probes.turn_mask, probes.target_mask, **options)
