"""Section 1-2 of the spec: probe beliefs, information gain and turn rewards.

Shapes: B rollouts, T turns (padded), L answer tokens (padded).
"""

from __future__ import annotations

from typing import Any

from igpo_rewards import _checks, _turns, targets
from igpo_rewards.backends import Backend, get_backend
from igpo_rewards.targets import gain_options

Array = Any

def reward_options(
    *, kind: Any, ig_weight: Any, outcome_weight: Any, log_prob_floor: Any, subgoal_potential: Any = "running_max",
    gain_clip: Any = "none",
) -> dict[str, Any]:
    """The checked hyperparameters of :func:`turn_rewards` (floats as Python floats)."""
    return dict(
        **gain_options(kind=kind, log_prob_floor=log_prob_floor, subgoal_potential=subgoal_potential, gain_clip=gain_clip),
        ig_weight=_checks.check_weight("ig_weight", ig_weight),
        outcome_weight=_checks.check_weight("outcome_weight", outcome_weight),
    )


def answer_logprob(
    token_logprobs: Array, token_mask: Array, *, turn_mask: Array | None = None, validate: bool = True
) -> Array:
    r"""Length-normalized log-probability of the ground-truth answer at each probe.

    .. math:: m_{i,j} = \frac{1}{L_{i,j}} \sum_{l} \log \pi(a_l \mid \text{context}_{i,j}, a_{<l})

    where the sum runs over the answer tokens that ``token_mask`` marks and L_{i,j} is their
    count; p_{i,j} = exp(m_{i,j}) is the geometric-mean probability of the answer.

    A probe slot with no answer tokens has no log-prob. At a padded turn it gets 0.0, a
    placeholder every later function ignores; at a valid turn it is an error (a lost answer
    would otherwise read as probability 1 and fake an information gain). The valid turns are
    ``turn_mask`` when given; without it, every slot up to the last one that has answer tokens
    (so only an empty slot *before* a probe with tokens is caught: pass ``turn_mask`` to have
    every valid turn checked, the final one included).

    K targets (:mod:`igpo_rewards.targets`): ``token_logprobs`` [B, T, K, L] gives m [B, T, K],
    each target averaged over its own tokens. A target with no token in any slot of row i is
    absent from that row (0.0 placeholders everywhere, never an error; ``target_mask`` marks it).

    Args:
      token_logprobs: [B, T, L] (or [B, T, K, L]) log pi of each answer token at probe j of rollout i, <= 0
        (a positive value is refused: probabilities passed instead of log-probabilities).
        -inf (probability 0) is legitimate and makes m = -inf. Values where ``token_mask``
        is 0 are ignored (they may hold anything, NaN included).
      token_mask: [B, T, L] (or [B, T, K, L]) bool or 0/1, which answer tokens are real (not padding).
      turn_mask: optional [B, T] prefix mask of the valid turns (probes).
      validate: check for NaN/+inf and positive values at masked-in positions and for valid
        turns without answer tokens (a host sync on accelerators). Without the check (``validate=False``, or under
        jit) such a turn gets NaN, which :func:`information_gain` and :func:`igpo_advantages`
        refuse at valid turns and which otherwise shows in every advantage of its group.

    Returns:
      [B, T] (or [B, T, K]) floating array, dtype of ``token_logprobs`` (ints promoted to the
      default float).

    Raises:
      ValueError: shapes differ, the mask holds values other than 0/1, NaN/+inf or a positive
        value at a masked-in position, or a valid turn with no answer tokens.

    Example:
      >>> import numpy as np
      >>> logprobs = np.log([[[0.5, 0.5], [1.0, 0.25], [0.1, 0.1]]])   # B=1, T=3, L=2
      >>> mask = np.array([[[1, 1], [1, 0], [0, 0]]])        # probe 1 has one answer token; slot 2 is padding
      >>> np.round(np.exp(answer_logprob(logprobs, mask)), 4)
      array([[0.5, 1. , 1. ]])
      >>> answer_logprob(logprobs, mask, turn_mask=[[1, 1, 1]])  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: token_mask has no answer token at valid turns (row, turn) [[0, 2]]...
    """
    validate = _checks.check_flag("validate", validate)
    backend = get_backend(token_logprobs=token_logprobs, token_mask=token_mask, turn_mask=turn_mask)
    token_logprobs = backend.asarray(token_logprobs)
    token_mask = backend.asarray(token_mask, like=token_logprobs)
    targets_axis = len(token_logprobs.shape) == 4
    if not targets_axis:
        _checks.check_ndim("token_logprobs", token_logprobs, 3, "B, T, L")
    _checks.check_same_shape("token_mask", token_mask, "token_logprobs", token_logprobs)
    _checks.check_numeric(backend, "token_logprobs", token_logprobs)
    token_mask = _checks.as_mask(backend, "token_mask", token_mask, validate=validate)
    token_logprobs = backend.astype(token_logprobs, backend.float_dtype(token_logprobs))
    if validate:
        _checks.check_no_nan(backend, "token_logprobs", token_logprobs, token_mask, allow_neg_inf=True)
        _turns.check_log_probabilities(backend, "token_logprobs", token_logprobs, token_mask)
    tokens_axis = len(token_logprobs.shape) - 1
    count = backend.sum(backend.astype(token_mask, backend.index_dtype()), axis=tokens_axis)
    has_answer = count > 0
    valid = _valid_probes(backend, has_answer, turn_mask, validate=validate, shape=token_logprobs.shape)
    if targets_axis and turn_mask is not None:  # a target with no token in any slot is absent from the row
        present = backend.sum(backend.astype(has_answer, backend.index_dtype()), axis=1) > 0
        valid = valid[:, :, None] & present[:, None, :]
    missing = valid & ~has_answer
    if validate and backend.is_concrete(missing) and backend.any(missing):
        import numpy as np

        cells = np.argwhere(backend.to_numpy(missing))[:5].tolist()
        where = "(row, turn, target)" if targets_axis else "(row, turn)"
        raise ValueError(
            f"token_mask has no answer token at valid turns {where} {cells}: a probe without answer tokens has "
            f"no log-prob (score the answer's tokens at every probe, or mark the turn invalid in turn_mask)"
        )
    total = backend.sum(backend.where(token_mask, token_logprobs, 0.0), axis=tokens_axis)
    mean = total / backend.maximum(backend.astype(count, total.dtype), 1.0)
    return backend.where(missing, float("nan"), backend.where(has_answer, mean, 0.0))


def _valid_probes(backend: Backend, has_answer: Array, turn_mask: Array | None, *, validate: bool, shape: Any) -> Array:
    """[B, T] bool: the probes of valid turns (``turn_mask``, or the slots up to the last one with
    answer tokens)."""
    if turn_mask is None:
        seen = backend.cumsum(backend.astype(has_answer, backend.index_dtype()), axis=1)
        # slot j is followed (or filled) by a probe with tokens: fewer were seen before it than in all
        return (seen - backend.astype(has_answer, seen.dtype)) < seen[:, -1:]
    turn_mask = backend.asarray(turn_mask, like=has_answer)
    if tuple(turn_mask.shape) != tuple(shape[:2]):
        raise ValueError(
            f"turn_mask must have shape [B, T] = {tuple(shape[:2])} (from token_logprobs {tuple(shape)}), "
            f"got {tuple(turn_mask.shape)}"
        )
    turn_mask = _checks.as_mask(backend, "turn_mask", turn_mask, validate=validate)
    if validate:
        _checks.check_prefix_mask(backend, "turn_mask", turn_mask)
    return turn_mask


def information_gain(
    answer_logprob: Array,
    turn_mask: Array,
    *,
    target_weights: Array | None = None,
    target_mask: Array | None = None,
    kind: str = "prob",
    log_prob_floor: float = -20.0,
    subgoal_potential: str = "running_max",
    gain_clip: str = "none",
    validate: bool = True,
) -> Array:
    r"""Information gain of each turn: how much it moved the belief in the answer (and sub-goals).

    .. math::
        IG_{i,j} = p_{i,j+1} - p_{i,j} \quad (\text{kind="prob"}, p = e^{m}),
        \qquad IG_{i,j} = m_{i,j+1} - m_{i,j} \quad (\text{kind="log_prob"})

    for j < n_i - 1; IG = 0 at the final turn j = n_i - 1 and at padded turns. With K targets
    (``answer_logprob`` [B, T, K], target 0 the answer):

    .. math:: IG_{i,j} = \sum_k \tau_{i,k} \, w_{i,k} \, g_{i,j,k}

    where g is the change of target k's potential over turn j (:func:`target_information_gain`).
    ``gain_clip="positive"`` clips each target's gain at 0 first (for one target: IG := max(IG, 0)).

    -inf log-probs: with kind="prob" they are probability 0 (exp(-inf) = 0), so a turn that
    takes the answer from impossible to p gains p. With kind="log_prob" each m is first
    clamped to ``log_prob_floor`` (m := max(m, floor)), so the gain stays finite: from -inf to
    m counts as m - floor.

    Args:
      answer_logprob: [B, T] m_{i,j}, probe j taken before turn j (see :func:`answer_logprob`),
        or [B, T, K] with one probe per target. Values at padded turns (and absent targets) are
        ignored; NaN at a valid turn (a probe without answer tokens) is refused, and so is a
        positive value (a probability is not a log-probability). [B, T] input runs the paper's
        computation unchanged; [B, T, 1] with weight 1 gives the same bits.
      turn_mask: [B, T] prefix mask of valid turns (bool or 0/1); n_i = its row sum.
      target_weights: [K] or [B, K] finite weights w of the targets' gains ([B, T, K] input only;
        required when K > 1, [1.0] for K = 1). Python or NumPy values are read in float64 and cast
        to the gains' dtype.
      target_mask: optional [B, K] bool or 0/1, tau: which targets each row has (default: all);
        target 0 must be present on rows with a valid turn.
      kind: "prob" (the paper's) or "log_prob" (the authors' later option).
      log_prob_floor: lower clamp of m for kind="log_prob" (a finite number); unused for "prob".
      subgoal_potential: the potential of targets k >= 1, "running_max" (default) or "probe"
        (see :func:`target_information_gain`).
      gain_clip: "none" (default, the paper's) or "positive" (an ablation: docs/algorithm.md).
      validate: check the prefix mask, and NaN/+inf and positive values at valid turns.

    Returns:
      [B, T] floating array of IG, dtype of ``answer_logprob``. A one-turn rollout has none
      (all zeros); rows with no valid turn are zeros.

    Example:
      >>> import numpy as np
      >>> m = np.log([[0.1, 0.6, 0.5]])            # beliefs before turns 0, 1, 2
      >>> np.round(information_gain(m, [[1, 1, 1]]), 4)   # 0.6 - 0.1, 0.5 - 0.6, final turn
      array([[ 0.5, -0.1,  0. ]])
      >>> both = np.log([[[0.1, 0.2], [0.1, 0.9], [0.8, 0.3]]])   # the answer and one bridge entity
      >>> np.round(information_gain(both, [[1, 1, 1]], target_weights=[1.0, 0.5]), 4)
      array([[0.35, 0.7 , 0.  ]])
    """
    options = gain_options(kind=kind, log_prob_floor=log_prob_floor, subgoal_potential=subgoal_potential,
                           gain_clip=gain_clip)
    validate = _checks.check_flag("validate", validate)
    backend = get_backend(answer_logprob=answer_logprob, turn_mask=turn_mask,
                          **targets.dispatch(target_weights, target_mask))
    probes = targets.check_probes(backend, answer_logprob, turn_mask, target_weights=target_weights,
                                  target_mask=target_mask, validate=validate)
    return targets.information_gain_of(backend, probes, **options)


def turn_rewards(
    answer_logprob: Array,
    outcome: Array,
    turn_mask: Array,
    *,
    target_weights: Array | None = None,
    target_mask: Array | None = None,
    kind: str = "prob",
    ig_weight: float = 1.0,
    outcome_weight: float = 1.0,
    log_prob_floor: float = -20.0,
    subgoal_potential: str = "running_max",
    gain_clip: str = "none",
    validate: bool = True,
) -> Array:
    r"""Dense turn rewards: information gain on every turn but the last, the outcome on the last.

    .. math::
        r_{i,j} = w_{ig} \, IG_{i,j} \ (j < n_i - 1), \qquad
        r_{i,n_i-1} = w_{out} \, R_i, \qquad r_{i,j} = 0 \ (j \ge n_i)

    Args:
      answer_logprob: [B, T] probe log-probs m_{i,j}, or [B, T, K] with one probe per target
        (see :func:`information_gain`).
      outcome: [B] outcome reward R_i (answer F1, or the format penalty). Int/bool promote.
      turn_mask: [B, T] prefix mask of valid turns.
      target_weights, target_mask, kind, log_prob_floor, subgoal_potential, gain_clip: as in
        :func:`information_gain`.
      ig_weight, outcome_weight: w_ig and w_out (1.0 in the paper), finite numbers.
      validate: value checks (prefix mask, NaN/inf).

    Returns:
      [B, T] rewards, dtype promoted from ``answer_logprob`` and ``outcome``. A one-turn
      rollout gets only w_out * R_i; a row with no valid turn gets zeros (its outcome is
      ignored: such rows are batch padding).

    Example:
      >>> import numpy as np
      >>> m = np.log([[0.1, 0.6, 0.5], [0.2, 0.2, 0.2]])
      >>> np.round(turn_rewards(m, [0.0, 1.0], [[1, 1, 1], [1, 0, 0]]), 4)
      array([[ 0.5, -0.1,  0. ],
             [ 1. ,  0. ,  0. ]])
    """
    options = reward_options(kind=kind, ig_weight=ig_weight, outcome_weight=outcome_weight,
                             log_prob_floor=log_prob_floor, subgoal_potential=subgoal_potential, gain_clip=gain_clip)
    validate = _checks.check_flag("validate", validate)
    backend = get_backend(answer_logprob=answer_logprob, outcome=outcome, turn_mask=turn_mask,
                          **targets.dispatch(target_weights, target_mask))
    probes = targets.check_probes(
        backend, answer_logprob, turn_mask, target_weights=target_weights, target_mask=target_mask,
        validate=validate, num_rollouts=_turns.leading_length(outcome), rollouts_from="outcome",
    )
    outcome = outcome_array(backend, outcome, probes.logprob, validate=validate)
    _, rewards = rewards_from_probes(backend, probes, outcome, **options)
    return rewards


def outcome_array(backend: Backend, outcome: Array, beliefs: Array, *, validate: bool) -> Array:
    """``outcome`` [B] converted to a float array of the backend and checked against [B, T] beliefs."""
    outcome = backend.asarray(outcome, like=beliefs)
    _checks.check_numeric(backend, "outcome", outcome)
    _checks.check_length("outcome", outcome, beliefs.shape[0], "answer_logprob")
    outcome = backend.astype(outcome, backend.float_dtype(outcome))
    if validate:
        _checks.check_no_nan(backend, "outcome", outcome, None, allow_neg_inf=False)
    return outcome


def rewards_from_probes(
    backend: Backend,
    probes: targets.Probes,
    outcome: Array,
    *,
    kind: str,
    ig_weight: float,
    outcome_weight: float,
    log_prob_floor: float,
    subgoal_potential: str,
    gain_clip: str,
) -> tuple[Array, Array]:
    """(IG, turn rewards), each [B, T], from checked probes and outcome (:func:`turn_rewards`)."""
    gain = targets.information_gain_of(backend, probes, kind=kind, log_prob_floor=log_prob_floor,
                                       subgoal_potential=subgoal_potential, gain_clip=gain_clip)
    turn_mask = probes.turn_mask
    dtype = backend.float_dtype(gain, outcome)
    gain, outcome = backend.astype(gain, dtype), backend.astype(outcome, dtype)
    is_final = _turns.final_turn_mask(backend, turn_mask)
    rewards = backend.where(is_final, outcome_weight * outcome[:, None], ig_weight * gain)
    return gain, backend.where(turn_mask, rewards, 0.0)
