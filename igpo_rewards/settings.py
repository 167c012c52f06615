"""IGPO's hyperparameters in one object: what a trainer's config holds and what the adapters read.

:class:`IGPOSettings` carries every option of :func:`igpo_rewards.igpo_advantages` and
:func:`igpo_rewards.grpo_advantages` under the library's own names (plus ``max_turns``, the
number of turn slots the token-level adapters use, and ``allow_outcome_only``, the verl
integration's opt-in). Its methods run those functions with all of them, so a caller never maps
option by option. The reference trainer's ``RLConfig`` holds one
(``--rl.igpo.gamma``, ``[rl.igpo]`` in a config file), verl reads it from ``algorithm.igpo.*``,
and TRL's ``IGPOTrainer`` takes it as ``igpo_settings``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from igpo_rewards import _checks, _turns
from igpo_rewards.advantages import IGPOAdvantages, igpo_advantages
from igpo_rewards.backends import get_backend
from igpo_rewards.normalization import MODES, SCALES, WEIGHTINGS, grpo_advantages
from igpo_rewards.returns import ACCUMULATIONS
from igpo_rewards.rewards import information_gain, turn_rewards
from igpo_rewards.targets import GAIN_CLIPS, INFORMATION_GAIN_KINDS, SUBGOAL_POTENTIALS
from igpo_rewards.tokens import advantages_from_token_rewards

__all__ = ["IGPOSettings"]

Array = Any


@dataclasses.dataclass(frozen=True)
class IGPOSettings:
    """IGPO's hyperparameters; the defaults are the paper's.

    Example:
      >>> settings = IGPOSettings.from_mapping({"mode": "separate", "gamma": 0.9})
      >>> settings.mode, settings.gamma, settings.weighting
      ('separate', 0.9, 'turn')
      >>> IGPOSettings.from_mapping({"gama": 0.9})  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: igpo settings: unknown key(s) ['gama']; known keys: ['gamma', 'kind', ...]
    """

    gamma: float = 1.0
    """Turn discount in [0, 1] (spec section 4); 1.0 in every published config."""
    kind: str = "prob"
    """Information gain on probabilities ("prob", the paper's) or log-probs ("log_prob")."""
    mode: str = "joint"
    """Group pool: "joint" (IG and outcome rewards together, the paper's), "separate" (IG and outcome
    apart) or "turn_index" (one IG pool per turn index, after A2TGPO)."""
    weighting: str = "turn"
    """Pool weights: "turn" (every entry 1, the paper's) or "trajectory" (every rollout 1 in total)."""
    scale: str = "std"
    """"std" z-scores within the pool; "none" only subtracts the mean (Dr. GRPO style)."""
    eps: float = 1e-6
    """Added to the pool's std before dividing."""
    ddof: int = 0
    """Delta degrees of freedom of the pool's std (0: population std, the paper's)."""
    ig_weight: float = 1.0
    """w_ig, the weight of the information-gain rewards."""
    outcome_weight: float = 1.0
    """w_out, the weight of the outcome reward."""
    log_prob_floor: float = -20.0
    """Floor on log-probs for kind="log_prob" (keeps -inf finite)."""
    accumulation: str = "discounted"
    """Turn advantages from the normalized rewards: "discounted" (the paper's) or "sqrt_n" (the IG part
    divided by the square root of its term count, after A2TGPO)."""
    ig_advantage_scale: float = 1.0
    """alpha, the factor of the normalized IG entries in the accumulation (A2TGPO's recipe: 0.3 with
    "sqrt_n")."""
    gain_clip: str = "none"
    """"none" (the paper's) or "positive": each target's gain clipped at 0 (an ablation)."""
    subgoal_potential: str = "running_max"
    """The potential of the sub-goal targets k >= 1: "running_max" (reached stays reached) or "probe"."""
    subgoal_weight: float = 0.0
    """w of every sub-goal target (the answer weighs 1); 0.0: the paper's IGPO, the answer alone. No
    function takes it: with [B, T, K] probes the methods build ``target_weights(K)`` from it."""
    max_turns: int | None = None
    """The most turns a rollout may have (searches plus the answer): a rollout with more is an error
    in every method; the token path and TRL also take it as T, the number of turn slots. None: no
    cap, T counted from the batch (a host sync on GPUs for the token path)."""
    allow_outcome_only: bool = False
    """Read by the verl integration only (``algorithm.igpo.allow_outcome_only``): True lets a run go on
    when per-turn rewards cannot reach the estimator (a stock agent loop, a single-turn agent, a
    colocated reward model) or a multi-turn batch carries none, with a warning instead of an error.
    IGPO then trains on the outcome only."""

    def __post_init__(self) -> None:
        # The library's own checks, so a bad value fails here exactly as it would in the call
        # (TypeError for a wrong type, ValueError for a wrong value), named as the field.
        choices = {"kind": INFORMATION_GAIN_KINDS, "mode": MODES, "weighting": WEIGHTINGS, "scale": SCALES,
                   "accumulation": ACCUMULATIONS, "gain_clip": GAIN_CLIPS, "subgoal_potential": SUBGOAL_POTENTIALS}
        for name, allowed in choices.items():
            _checks.check_choice(f"igpo settings: {name}", getattr(self, name), allowed)
        _checks.check_gamma(self.gamma)
        _checks.check_eps(self.eps)
        for name in ("ig_weight", "outcome_weight", "log_prob_floor", "ig_advantage_scale"):
            _checks.check_weight(f"igpo settings: {name}", getattr(self, name))
        # A negative sub-goal weight would penalize reaching a bridge entity.
        _checks.check_real("igpo settings: subgoal_weight", self.subgoal_weight, low=0.0)
        _checks.check_count("igpo settings: ddof", self.ddof)
        if self.max_turns is not None:
            _checks.check_positive_count("igpo settings: max_turns", self.max_turns)
        _checks.check_flag("igpo settings: allow_outcome_only", self.allow_outcome_only)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> IGPOSettings:
        """Builds settings from a mapping (a dict, an OmegaConf node); None gives the defaults.

        Raises:
          ValueError: on a key that is not a field (a typo would otherwise be ignored silently),
            and on an out-of-range value.
          TypeError: when ``values`` is not a mapping.
        """
        if values is None:
            return cls()
        if isinstance(values, cls):
            return values
        if not isinstance(values, Mapping) and not hasattr(values, "items"):
            raise TypeError(f"igpo settings must be a mapping, got {type(values).__name__}")
        known = [field.name for field in dataclasses.fields(cls)]
        given = {str(key): value for key, value in values.items()}
        unknown = sorted(key for key in given if key not in known)
        if unknown:
            raise ValueError(f"igpo settings: unknown key(s) {unknown}; known keys: {known}")
        return cls(**given)

    def normalization_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`igpo_rewards.group_normalize` (mode, weighting, scale, eps, ddof)."""
        return {"mode": self.mode, "weighting": self.weighting, "scale": self.scale, "eps": self.eps, "ddof": self.ddof}

    def reward_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`igpo_rewards.turn_rewards` (kind, weights, floor, sub-goal potential,
        gain clip)."""
        return {
            "kind": self.kind,
            "ig_weight": self.ig_weight,
            "outcome_weight": self.outcome_weight,
            "log_prob_floor": self.log_prob_floor,
            "subgoal_potential": self.subgoal_potential,
            "gain_clip": self.gain_clip,
        }

    def accumulation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the accumulation step of :func:`igpo_rewards.igpo_advantages` and
        :func:`igpo_rewards.advantages_from_token_rewards` (accumulation, ig_advantage_scale; ``gamma``
        is passed on its own)."""
        return {"accumulation": self.accumulation, "ig_advantage_scale": self.ig_advantage_scale}

    def target_weights(self, num_targets: int) -> list[float]:
        """[K] weights of K targets: 1.0 for target 0 (the answer), ``subgoal_weight`` for each sub-goal.

        Example:
          >>> IGPOSettings(subgoal_weight=0.5).target_weights(3)
          [1.0, 0.5, 0.5]
        """
        num_targets = _checks.check_positive_count("num_targets", num_targets)
        return [1.0] + [self.subgoal_weight] * (num_targets - 1)

    def _weights_for(self, answer_logprob: Array, target_weights: Array | None) -> Array | None:
        """The target weights to pass: explicit ones, or ``target_weights(K)`` for [B, T, K] probes.

        Refuses the two silent slips: sub-goal probes that ``subgoal_weight = 0`` would ignore, and
        ``subgoal_weight > 0`` with probes of the answer alone ([B, T])."""
        shape = tuple(getattr(answer_logprob, "shape", None) or np.shape(answer_logprob))
        if len(shape) != 3:
            if self.subgoal_weight > 0:
                raise ValueError(
                    f"igpo settings: subgoal_weight = {self.subgoal_weight} but answer_logprob has shape {shape}, the "
                    f"answer's probes alone: pass [B, T, K] probes of the answer and the sub-goal targets, or set "
                    f"subgoal_weight = 0 (the paper's IGPO)"
                )
            return target_weights
        if target_weights is not None:
            return target_weights
        if shape[2] > 1 and self.subgoal_weight == 0:
            raise ValueError(
                f"igpo settings: answer_logprob holds K = {shape[2]} targets but subgoal_weight is 0: the sub-goal "
                f"probes would be ignored; set subgoal_weight or pass target_weights"
            )
        return self.target_weights(shape[2])

    def igpo_advantages(
        self,
        answer_logprob: Array,
        outcome: Array,
        turn_mask: Array,
        group_ids: Array | None = None,
        *,
        group_size: int | None = None,
        target_weights: Array | None = None,
        target_mask: Array | None = None,
        validate: bool = True,
    ) -> IGPOAdvantages:
        """:func:`igpo_rewards.igpo_advantages` with every one of these settings (shapes there);
        pass ``group_ids`` or, for G contiguous rollouts per group, ``group_size=G``.

        [B, T, K] probes (target 0 the answer, then the sub-goals) are weighted by
        ``target_weights(K)`` (the answer 1, each sub-goal ``subgoal_weight``) unless
        ``target_weights`` is given; ``target_mask`` [B, K] marks the targets each row has. A
        ValueError for K > 1 with ``subgoal_weight = 0`` and no weights (the sub-goals would be
        ignored), and for ``subgoal_weight > 0`` with [B, T] probes (there are no sub-goals).

        Example:
          >>> import numpy as np
          >>> settings = IGPOSettings(ig_weight=0.0)  # the paper's ablation without the IG reward
          >>> result = settings.igpo_advantages(np.log([[0.1, 0.9], [0.1, 0.1]]), [1.0, 0.0], [[1, 1], [1, 1]], [0, 0])
          >>> float(result.rewards[0, 0]), float(result.rewards[0, 1])
          (0.0, 1.0)
          >>> IGPOSettings(max_turns=1).igpo_advantages(np.log([[0.1, 0.9]] * 2), [1.0, 0.0], [[1, 1]] * 2, [0, 0])  # doctest: +ELLIPSIS
          Traceback (most recent call last):
          ...
          ValueError: max_turns = 1 (the most turns a rollout may have), but rollouts [0, 1] have [2, 2] turns ...
        """
        return igpo_advantages(
            answer_logprob,
            outcome,
            turn_mask,
            group_ids,
            group_size=group_size,
            target_weights=self._weights_for(answer_logprob, target_weights),
            target_mask=target_mask,
            gamma=self.gamma,
            **self.reward_kwargs(),
            **self.normalization_kwargs(),
            **self.accumulation_kwargs(),
            max_turns=self.max_turns,
            validate=validate,
        )

    def advantages_from_token_rewards(
        self,
        token_level_rewards: Array,
        response_mask: Array,
        group_ids: Array | None = None,
        *,
        group_size: int | None = None,
        validate: bool = True,
    ) -> Array:
        """:func:`igpo_rewards.advantages_from_token_rewards` (verl's token layout: [B, S] rewards
        and response mask -> [B, S] advantages) with ``gamma``, the normalization and accumulation
        settings and ``max_turns`` (the turn slots T). ``kind``, the reward weights, the targets and
        the gain clip shaped the rewards already, where they were placed (:meth:`turn_rewards`).

        Example:
          >>> import numpy as np
          >>> mask = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]])
          >>> rewards = np.array([[0.0, 0.5, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
          >>> IGPOSettings(scale="none").advantages_from_token_rewards(rewards, mask, group_size=2)  # pool {0.5, 1, 0}
          array([[ 0.5,  0.5,  0. ,  0.5,  0. ],
                 [-0.5,  0. ,  0. ,  0. ,  0. ]])
        """
        return advantages_from_token_rewards(
            token_level_rewards,
            response_mask,
            group_ids,
            group_size=group_size,
            gamma=self.gamma,
            **self.normalization_kwargs(),
            **self.accumulation_kwargs(),
            max_turns=self.max_turns,
            validate=validate,
        )

    def grpo_advantages(
        self, outcome: Array, group_ids: Array | None = None, *, group_size: int | None = None, validate: bool = True
    ) -> Array:
        """:func:`igpo_rewards.grpo_advantages` (the outcome-only baseline) with ``scale``, ``eps`` and
        ``ddof`` of these settings: [B] advantages. It has no turns, so no other setting applies.

        Example:
          >>> import numpy as np
          >>> IGPOSettings(scale="none").grpo_advantages(np.array([1.0, 0.0]), [0, 0])
          array([ 0.5, -0.5])
        """
        return grpo_advantages(
            outcome, group_ids, group_size=group_size, scale=self.scale, eps=self.eps, ddof=self.ddof, validate=validate
        )

    def turn_rewards(
        self,
        answer_logprob: Array,
        outcome: Array,
        turn_mask: Array,
        *,
        target_weights: Array | None = None,
        target_mask: Array | None = None,
        validate: bool = True,
    ) -> Array:
        """:func:`igpo_rewards.turn_rewards` ([B, T] rewards r, what a verl reward manager places at
        the turns' last tokens) with ``kind``, the reward weights, ``log_prob_floor``, the sub-goal
        potential and the gain clip (targets as in :meth:`igpo_advantages`); checks ``max_turns``.

        Example:
          >>> import numpy as np
          >>> np.round(IGPOSettings(ig_weight=2.0).turn_rewards(np.log([[0.1, 0.6]]), [1.0], [[1, 1]]), 4)
          array([[1., 1.]])
        """
        self._check_max_turns(turn_mask, validate=validate)
        return turn_rewards(
            answer_logprob, outcome, turn_mask, target_weights=self._weights_for(answer_logprob, target_weights),
            target_mask=target_mask, **self.reward_kwargs(), validate=validate,
        )

    def information_gain(
        self,
        answer_logprob: Array,
        turn_mask: Array,
        *,
        target_weights: Array | None = None,
        target_mask: Array | None = None,
        validate: bool = True,
    ) -> Array:
        """:func:`igpo_rewards.information_gain` ([B, T] IG) with ``kind``, ``log_prob_floor``, the
        sub-goal potential and the gain clip (targets as in :meth:`igpo_advantages`); checks
        ``max_turns`` (e.g. the IG metrics of a GRPO run that also probes).

        Example:
          >>> import numpy as np
          >>> np.round(IGPOSettings(kind="log_prob").information_gain(np.log([[0.1, 0.6]]), [[1, 1]]), 4)
          array([[1.7918, 0.    ]])
        """
        self._check_max_turns(turn_mask, validate=validate)
        return information_gain(
            answer_logprob, turn_mask, target_weights=self._weights_for(answer_logprob, target_weights),
            target_mask=target_mask, kind=self.kind, log_prob_floor=self.log_prob_floor,
            subgoal_potential=self.subgoal_potential, gain_clip=self.gain_clip, validate=validate,
        )

    def _check_max_turns(self, turn_mask: Array, *, validate: bool) -> None:
        """The ``max_turns`` check of :func:`igpo_rewards.igpo_advantages`, for the methods whose
        function has no ``max_turns`` (free when the mask's T slots fit)."""
        if self.max_turns is None:
            return
        backend = get_backend(turn_mask=turn_mask)
        mask = backend.asarray(turn_mask)
        if len(mask.shape) == 2 and mask.shape[1] > self.max_turns:
            mask = _checks.as_mask(backend, "turn_mask", mask, validate=validate)
            _turns.check_max_turns(backend, mask, self.max_turns, validate=validate)
