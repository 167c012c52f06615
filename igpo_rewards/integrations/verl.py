"""IGPO as a verl advantage estimator: ``algorithm.adv_estimator=igpo`` with no fork of verl.

Importing this module registers :func:`compute_igpo_advantage` under the name ``"igpo"`` with
verl's ``register_adv_est``. verl >= 0.9 imports it by itself, at ``import verl``, through the
``verl.plugins`` entry point that igpo-rewards declares (installed with the ``verl`` extra:
``pip install "igpo-rewards[verl] @ git+$IGPO_GIT"``, README "Install"); verl 0.6 - 0.8 import
it when ``VERL_USE_EXTERNAL_MODULES=igpo_rewards.integrations.verl`` is set; verl 0.4.1 - 0.5
need an explicit ``import igpo_rewards.integrations.verl`` in the driver process.

verl's layout (B rollouts, S response tokens): ``response_mask`` [B, S] is 1 on generated tokens
and 0 on tool/observation/padding tokens, so each maximal run of 1s is one turn; turn j's reward
sits at the last token of run j and the outcome at the last generated token (or on a trailing
observation token, where verl's reward managers put it). :func:`igpo_token_scores` and
:func:`assemble_igpo_rm_scores` write that layout from probe log-probs and outcome rewards.

The estimator refuses what would silently turn IGPO into something else: token-level rejection
sampling (``algorithm.rollout_correction.rollout_rs`` = token_k1/k2/k3 outside bypass mode) cuts
turns apart in ``response_mask`` before the advantage step, ``algorithm.use_kl_in_reward`` puts
rewards where IGPO does not read them, and a multi-turn batch whose rollouts have rewards only
on their last turn (the stock ``tool_agent``, or a reward path that dropped the per-turn rewards)
would train on the outcome only: each is an :class:`IGPOConfigError`, the last one a warning
(once per process) under the opt-in ``algorithm.igpo.allow_outcome_only=True``. The start-up
checks of the same kind (before any rollout) are in ``igpo_rewards.integrations.verl_checks``.

verl logs a plugin that fails to load only at debug level; so this module logs its own failure
at ERROR level, and :func:`check_registered` (also ``python -m igpo_rewards.integrations.verl``)
says whether ``"igpo"`` and the agent loop ``igpo_tool_agent`` are registered and, if not, why.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

import igpo_rewards
from igpo_rewards._extras import install_hint, install_line
from igpo_rewards._groups import contiguous_group_size
from igpo_rewards.integrations import IGPOSettings

__all__ = [
    "ANSWER_LOGPROB_KEY",
    "ESTIMATOR_NAME",
    "IGPOConfigError",
    "OutcomeOnlyWarning",
    "algorithm_config_problems",
    "assemble_igpo_rm_scores",
    "check_agent_loop_registered",
    "check_registered",
    "compute_igpo_advantage",
    "compute_score",
    "hermes_response_for_scoring",
    "group_ids_from_uids",
    "igpo_token_scores",
    "register",
    "settings_from_config",
]

ESTIMATOR_NAME = "igpo"
"""The name verl's ``algorithm.adv_estimator`` takes."""
CONFIG_KEY = "igpo"
"""The hyperparameters live under ``algorithm.igpo``."""
PROBE_MODE_KEY = "probe_mode"
"""``algorithm.igpo.probe_mode``: where the agent loop's probes are scored (``actor`` or ``server``,
unset: ``actor`` where supported); a verl-side key, read by ``verl_actor.probe_mode_from_config``
and not one of :class:`IGPOSettings`' fields."""
PROBE_MODES = ("actor", "server")
"""The values ``algorithm.igpo.probe_mode`` takes (or unset)."""
ACTOR_PROBES_KEY = "igpo_actor_probes"
"""Actor mode's per-trajectory column with the probe plan (an ``extra_fields`` key; a top-level field
in V1's TransferQueue), written by the agent loop and read by ``verl_actor``'s probe engine."""
ANSWER_LOGPROB_KEY = "igpo_answer_logprob"
"""The ``non_tensor_batch`` column (an agent loop's ``extra_fields`` key) holding each rollout's probe log-probs."""
ENTRY_POINT_GROUP = "verl.plugins"
MODULE_NAME = "igpo_rewards.integrations.verl"
AGENT_LOOP_NAME = "igpo_tool_agent"
AGENT_LOOP_MODULE = "igpo_rewards.integrations.verl_agent_loop"
MANAGER_CLASS = "igpo_rewards.integrations.verl_manager.IGPOAgentLoopManager"
"""What ``+actor_rollout_ref.rollout.agent.agent_loop_manager_class`` names."""
TOKEN_LEVEL_REJECTION = ("token_k1", "token_k2", "token_k3")
"""verl's token-level ``rollout_rs`` modes (``rollout_corr_helper.TOKEN_LEVEL_ROLLOUT_RS_OPTIONS``)."""

logger = logging.getLogger(MODULE_NAME)
_warned_outcome_only = False


class IGPOConfigError(ValueError):
    """A verl configuration (or the data it reads) under which IGPO would train something else,
    typically on the outcome only: the message names the setting and the fix."""


class OutcomeOnlyWarning(UserWarning):
    """IGPO trains on the outcome only, as the user allowed with ``algorithm.igpo.allow_outcome_only=True``."""


def settings_from_config(config: Any) -> IGPOSettings:
    """Reads :class:`IGPOSettings` from verl's algorithm config (``algorithm.igpo.*``).

    Args:
      config: verl's ``algorithm`` config (an OmegaConf DictConfig, verl's AlgoConfig or a plain
        mapping), an :class:`IGPOSettings`, or None. A missing ``igpo`` key gives the paper's
        defaults.

    Raises:
      ValueError: unknown key or bad value under ``algorithm.igpo``, or ``subgoal_weight > 0``
        (verl's probes score the answer alone; an :class:`IGPOSettings` with it is refused where
        its methods get the answer's probes alone).

    Example:
      >>> settings_from_config({"adv_estimator": "igpo", "igpo": {"mode": "separate"}}).mode
      'separate'
    """
    if config is None or isinstance(config, IGPOSettings):
        return IGPOSettings.from_mapping(config)
    section = config.get(CONFIG_KEY, None) if hasattr(config, "get") else getattr(config, CONFIG_KEY, None)
    if section is not None and hasattr(section, "items"):
        section = {key: value for key, value in section.items() if key != PROBE_MODE_KEY}
    try:
        settings = IGPOSettings.from_mapping(section)
    except (ValueError, TypeError) as error:
        raise type(error)(f"algorithm.{CONFIG_KEY}: {error}") from error
    if settings.subgoal_weight > 0:
        raise ValueError(
            f"algorithm.{CONFIG_KEY}.subgoal_weight = {settings.subgoal_weight}: sub-goal targets are not available in "
            f"verl yet. Its probes score one target, the answer, on the rollout server (server probe mode) or on the "
            f"actor (actor mode, whose probe plan carries one suffix); scoring the sub-goals too needs a row's "
            f"sub-goals in that plan and the K targets in the actor's probe pass. Set subgoal_weight = 0 "
            f"(docs/integrations/verl.md)"
        )
    return settings


def group_ids_from_uids(index: Any, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Maps verl's group index (``non_tensor_batch["uid"]``, usually an object array of uuid
    strings) to int64 group ids 0, 1, ... in order of first appearance.

    Args:
      index: [B] hashable ids (strings, ints); a NumPy array, a list or a 1-D tensor.
      device: device of the returned tensor.

    Returns:
      [B] int64 tensor; equal ids get equal ints.

    Example:
      >>> import numpy as np
      >>> group_ids_from_uids(np.array(["b7", "a1", "b7"], dtype=object))
      tensor([0, 1, 0])
    """
    if isinstance(index, torch.Tensor):
        index = index.detach().cpu().numpy()
    ids = np.asarray(index, dtype=object)
    if ids.ndim != 1:
        raise ValueError(f"index (verl's uid) must be 1-D [B], got shape {ids.shape}")
    numbering: dict[Any, int] = {}
    try:
        dense = [numbering.setdefault(uid, len(numbering)) for uid in ids.tolist()]
    except TypeError as error:
        raise TypeError(f"index (verl's uid) entries must be hashable: {error}") from error
    return torch.tensor(dense, dtype=torch.int64, device=device)


def compute_igpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    config: Any = None,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's advantage estimator ``"igpo"``: per-turn IGPO advantages on every generated token.

    Turn j of row b is the j-th run of 1s in ``response_mask``; its reward r_{b,j} is read at
    the run's last token (the final turn also collects reward on trailing 0-mask tokens). The
    turn rewards are group-normalized within verl's ``uid`` groups, discounted over turns and
    broadcast to the turn's tokens (:func:`igpo_rewards.advantages_from_token_rewards`). When the
    uids come as G contiguous rows each (verl's ``rollout.n`` repeats, unless
    ``trainer.balance_batch`` reordered the batch) the groups are passed as ``group_size=G``,
    otherwise as ids; the advantages are the same.
    Hyperparameters come from ``algorithm.igpo.*`` (:class:`IGPOSettings`, the paper's defaults);
    verl's ``algorithm.gamma`` (a per-token discount for GAE) is not used.

    ``use_kl_in_reward=True`` is refused: it puts a KL penalty on every generated token, and IGPO
    reads a turn's reward at its last token only, so the rest would be dropped. Use
    ``actor.use_kl_loss=True`` instead (the paper's choice).

    Args:
      token_level_rewards: [B, S] float rewards (verl's ``token_level_rewards``).
      response_mask: [B, S] 0/1 mask of generated tokens.
      index: [B] group ids (verl's ``uid``); required.
      config: verl's ``algorithm`` config (reads ``igpo``, ``use_kl_in_reward`` and
        ``rollout_correction``).
      **unused: other arguments verl passes to some estimators (e.g. ``reward_baselines``);
        IGPO does not use them.

    Returns:
      (advantages, returns), both the same [B, S] tensor of ``token_level_rewards``' dtype and
      device; 0 on every 0-mask token.

    Warns:
      OutcomeOnlyWarning: once per process, for an outcome-only batch (below) under
        ``algorithm.igpo.allow_outcome_only=True``.

    Raises:
      IGPOConfigError: ``use_kl_in_reward``, token-level rejection sampling in
        ``algorithm.rollout_correction.rollout_rs``, and (unless ``allow_outcome_only``) a batch in
        which some rollout has several turns but no rollout has a nonzero reward at the end of any
        turn but its last (:func:`_check_outcome_only`).
      ValueError: no ``index``, shapes that disagree, a reward that would be lost (on observation
        tokens between turns, inside a turn, in a row without a turn).
    """
    if index is None:
        raise ValueError(
            "the igpo advantage estimator needs verl's group index (non_tensor_batch['uid']); got index=None"
        )
    settings = settings_from_config(config)
    _check_algorithm_config(config)
    _check_outcome_only(token_level_rewards, response_mask, settings)
    group_ids = group_ids_from_uids(index)  # on the host; _groups_of moves them if needed
    if group_ids.shape[0] != token_level_rewards.shape[0]:
        raise ValueError(
            f"index (verl's uid) must have one entry per row: {group_ids.shape[0]} ids for token_level_rewards "
            f"{tuple(token_level_rewards.shape)}"
        )
    with torch.no_grad():
        advantages = settings.advantages_from_token_rewards(
            token_level_rewards, response_mask, **_groups_of(group_ids, device=token_level_rewards.device)
        )
    return advantages, advantages


def _groups_of(group_ids: torch.Tensor, *, device: torch.device) -> dict[str, Any]:
    """``group_size=G`` when the rows are G contiguous rollouts per uid (verl repeats each prompt
    ``rollout.n`` times in a row), checked on the host in O(B); else the ids, on ``device``. Both
    give the same advantages; the first skips the group-id factorization."""
    group_size = contiguous_group_size(group_ids.numpy())
    if group_size is not None:
        return {"group_size": group_size}
    return {"group_ids": group_ids.to(device)}


def _config_value(config: Any, key: str) -> Any:
    """``config[key]`` for an OmegaConf node, a verl config dataclass or a mapping; None if absent."""
    if config is None or isinstance(config, IGPOSettings):
        return None
    if hasattr(config, "get"):
        return config.get(key, None)
    return getattr(config, key, None)


def algorithm_config_problems(config: Any) -> list[tuple[str, str, str]]:
    """What in verl's ``algorithm`` config IGPO refuses in every case (no opt-in): one
    (setting, why, fix) triple per problem. Empty when the config is fine.

    * ``rollout_correction.rollout_rs`` in token_k1/k2/k3 (decoupled mode, the default:
      ``bypass_mode=False``) zeroes single tokens of ``response_mask`` before the advantage step.
      A hole inside a turn splits it into two runs (two turns, which changes the group's pool and
      every other rollout's advantages); a hole on a turn's last token moves its reward onto a
      0-mask token. In bypass mode the rejection only masks the actor's loss, after the advantages.
    * ``use_kl_in_reward`` puts a KL penalty on every generated token; IGPO reads a turn's reward at
      the turn's last token only.

    Example:
      >>> algorithm_config_problems({"use_kl_in_reward": False, "rollout_correction": {"rollout_rs": "seq_mean_k3"}})
      []
      >>> algorithm_config_problems({"use_kl_in_reward": True})[0][0]
      'algorithm.use_kl_in_reward'
    """
    problems = []
    correction = _config_value(config, "rollout_correction")
    rejection = _config_value(correction, "rollout_rs")
    if isinstance(rejection, str) and not _config_value(correction, "bypass_mode"):
        modes = [mode.strip() for mode in rejection.split(",")]
        cutting = [mode for mode in modes if mode in TOKEN_LEVEL_REJECTION]
        if cutting:
            problems.append((
                "algorithm.rollout_correction.rollout_rs",
                f"is {rejection!r}: token-level rejection sampling ({', '.join(cutting)}) zeroes single tokens of "
                f"response_mask before the advantage step, which cuts IGPO's turns (a hole inside a turn makes it two "
                f"turns and changes the whole group's advantages).",
                "a sequence-level mode (e.g. seq_mean_k3), or algorithm.rollout_correction.bypass_mode=True "
                "(rejection then masks only the loss)",
            ))
    if _config_value(config, "use_kl_in_reward"):
        problems.append((
            "algorithm.use_kl_in_reward",
            "is True: verl puts a KL penalty on every generated token, but IGPO reads each turn's reward at the "
            "turn's last token, so the penalty on the other tokens would be dropped.",
            "algorithm.use_kl_in_reward=False and actor_rollout_ref.actor.use_kl_loss=True (the KL as a loss term, "
            "the paper's choice)",
        ))
    return problems


def _check_algorithm_config(config: Any) -> None:
    """Raises IGPOConfigError naming every problem of :func:`algorithm_config_problems`."""
    problems = algorithm_config_problems(config)
    if problems:
        messages = [f"adv_estimator=igpo: {setting} {why} Fix: {fix}." for setting, why, fix in problems]
        raise IGPOConfigError(" ".join(messages))


def _check_outcome_only(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, settings: IGPOSettings) -> None:
    """Refuses (IGPOConfigError) a batch in which some rollout has two or more turns but no rollout
    has a nonzero reward at the last token of any turn other than its final one; under
    ``settings.allow_outcome_only`` warns instead (OutcomeOnlyWarning, once per process).

    That is verl's stock layout (the outcome at the last token, nothing else): per-turn rewards did
    not reach the estimator (see ``igpo_rewards.integrations.verl_checks`` for the configurations
    refused at start-up), and IGPO would train a turn-pooled outcome-only baseline. With
    ``ig_weight == 0`` (the paper's ablation) the earlier turns' rewards are 0 by design: no check.
    """
    global _warned_outcome_only
    already_warned = settings.allow_outcome_only and _warned_outcome_only
    if token_level_rewards.numel() == 0 or settings.ig_weight == 0 or already_warned:
        return
    mask = response_mask.bool()
    turn_end = mask & ~torch.nn.functional.pad(mask[:, 1:], (0, 1), value=False)
    later_ends = torch.flip(torch.cumsum(torch.flip(turn_end.int(), [1]), 1), [1]) - turn_end.int()
    earlier_turn_end = turn_end & (later_ends > 0)  # a turn end followed by another turn
    if not bool(earlier_turn_end.any()) or bool((token_level_rewards[earlier_turn_end] != 0).any()):
        return
    multi_turn = int(earlier_turn_end.any(dim=1).sum())
    message = (
        f"adv_estimator=igpo got a batch in which {multi_turn} of {mask.shape[0]} rollouts have several turns but no "
        f"rollout has a nonzero reward on any turn but its last: the per-turn rewards did not reach the estimator, "
        f"and IGPO would train an outcome-only baseline pooled over turns. Likely causes: rows run verl's stock "
        f"tool_agent (actor_rollout_ref.rollout.agent.default_agent_loop must be {AGENT_LOOP_NAME}, and a dataset "
        f"column agent_name overrides it), the legacy trainer without +actor_rollout_ref.rollout.agent."
        f"agent_loop_manager_class={MANAGER_CLASS}, a colocated reward model rewriting rm_scores "
        f"(reward.reward_model.enable=True without enable_resource_pool), actor-mode probes (algorithm.igpo."
        f"{PROBE_MODE_KEY}) whose old-log-prob pass ran verl's own engine (the igpo_actor plugin not loaded in the "
        f"actor's workers), or every probe past the rollout server's max_model_len. Set "
        f"algorithm.igpo.allow_outcome_only=True to train on the outcome only."
    )
    if not settings.allow_outcome_only:
        raise IGPOConfigError(message)
    _warned_outcome_only = True
    warnings.warn(message + " (allowed by algorithm.igpo.allow_outcome_only=True; shown once per process)",
                  OutcomeOnlyWarning, stacklevel=3)


def igpo_token_scores(
    answer_logprob: Any,
    outcome: Any,
    response_mask: Any,
    *,
    turn_mask: Any = None,
    config: Any = None,
) -> Any:
    """Token-level rewards in verl's layout (``rm_scores``): each turn's IGPO reward at the
    last token of its run, r_{b,j} = w_ig * IG_{b,j} on turns j < n_b - 1 and w_out * R_b on the
    final turn (:func:`igpo_rewards.turn_rewards` then :func:`igpo_rewards.place_turn_rewards`).

    Args:
      answer_logprob: [B, T] probe log-probs m_{b,j}, taken right before turn j (the paper's
        length-normalized answer log-prob); -inf allowed, padded turns ignored.
      outcome: [B] outcome reward R_b.
      response_mask: [B, S] verl response mask; run j of row b is turn j.
      turn_mask: [B, T] prefix mask of valid turns. None takes n_b = the number of runs in
        row b (then T must be at least the most runs of any row).
      config: verl's ``algorithm`` config or :class:`IGPOSettings` (kind, ig_weight,
        outcome_weight, log_prob_floor); None gives the paper's defaults.

    Returns:
      [B, S] rewards in the floating dtype of ``answer_logprob``/``outcome``, same library.

    Raises:
      ValueError: a row whose number of runs differs from its number of probes.

    Example:
      >>> import numpy as np
      >>> m = np.log([[0.1, 0.6]])                      # probe before turn 0 and before turn 1
      >>> np.round(igpo_token_scores(m, [1.0], [[1, 1, 0, 0, 1, 0]]), 4)
      array([[0. , 0.5, 0. , 0. , 1. , 0. ]])
    """
    settings = settings_from_config(config)
    if turn_mask is None:
        turn_mask = _turn_mask_from_runs(answer_logprob, response_mask)
    rewards = settings.turn_rewards(answer_logprob, outcome, turn_mask)
    return igpo_rewards.place_turn_rewards(rewards, response_mask, turn_mask=turn_mask)


def _turn_mask_from_runs(answer_logprob: Any, response_mask: Any) -> Any:
    """[B, T] prefix mask with n_b = the number of runs of 1s in row b (T from answer_logprob),
    in the library of ``response_mask``."""
    runs = igpo_rewards.num_turns_from_response_mask(response_mask)
    num_turns = np.shape(answer_logprob)[1]
    most = int(runs.max()) if runs.shape[0] else 0
    if most > num_turns:
        raise ValueError(
            f"response_mask has up to {most} runs of 1s (turns) per row but answer_logprob has T = {num_turns} "
            f"probes per row (shape {tuple(np.shape(answer_logprob))})"
        )
    positions = torch.arange(num_turns, device=runs.device) if isinstance(runs, torch.Tensor) else np.arange(num_turns)
    return positions[None, :] < runs[:, None]


def assemble_igpo_rm_scores(
    data: Any, scores: Sequence[float], *, key: str = ANSWER_LOGPROB_KEY, config: Any = None
) -> torch.Tensor:
    """``rm_scores`` [B, S] for a verl batch: the drop-in body of a reward manager's
    ``assemble_rm_scores(data, scores)`` classmethod.

    Args:
      data: verl ``DataProto`` with ``batch["response_mask"]`` [B, S] and
        ``non_tensor_batch[key]``: per rollout a sequence of its n_b probe log-probs (what an
        agent loop puts in ``extra_fields[key]``), one per run of 1s in its response mask.
      scores: [B] outcome rewards R_b (what the reward function returned).
      key: the ``non_tensor_batch`` column with the probe log-probs.
      config: verl's ``algorithm`` config or :class:`IGPOSettings`.

    Returns:
      [B, S] float32 tensor on ``response_mask``'s device (see :func:`igpo_token_scores`).

    Raises:
      ValueError: ``key`` missing from ``non_tensor_batch``, a rollout whose number of probe
      log-probs differs from its number of turns, or a length mismatch with ``scores`` (each
      names the field).
    """
    response_mask = data.batch["response_mask"]
    if key not in data.non_tensor_batch:
        raise ValueError(
            f"non_tensor_batch has no {key!r} column (columns: {sorted(data.non_tensor_batch)}); the agent loop "
            f"must store each rollout's probe log-probs in extra_fields[{key!r}]"
        )
    probes = igpo_rewards.pad_turns(data.non_tensor_batch[key], like=response_mask)
    num_rollouts = response_mask.shape[0]
    if probes.values.shape[0] != num_rollouts or len(scores) != num_rollouts:
        raise ValueError(
            f"need one probe row and one score per rollout: response_mask {tuple(response_mask.shape)}, "
            f"{probes.values.shape[0]} rows in non_tensor_batch[{key!r}], {len(scores)} scores"
        )
    runs = igpo_rewards.num_turns_from_response_mask(response_mask).tolist()
    counts = probes.turn_mask.sum(dim=1).tolist()
    mismatched = [row for row in range(num_rollouts) if runs[row] != counts[row]]
    if mismatched:
        shown = mismatched[:5]
        raise ValueError(
            f"each rollout needs one probe log-prob per turn (run of 1s in response_mask): rows {shown} have "
            f"{[counts[row] for row in shown]} values in {key!r} but {[runs[row] for row in shown]} turns"
        )
    return igpo_token_scores(
        probes.values.to(torch.float32),
        torch.as_tensor(np.asarray(scores, dtype=np.float64), dtype=torch.float32, device=response_mask.device),
        response_mask,
        turn_mask=probes.turn_mask,
        config=config,
    )


def register() -> None:
    """Registers :func:`compute_igpo_advantage` as verl's advantage estimator ``"igpo"``.

    Idempotent. Raises verl's ValueError when another function already holds the name.
    """
    from verl.trainer.ppo import core_algos

    if core_algos.ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR_NAME) is compute_igpo_advantage:
        return
    core_algos.register_adv_est(ESTIMATOR_NAME)(compute_igpo_advantage)


def check_registered() -> None:
    """Raises RuntimeError, saying why, unless verl's registry maps ``"igpo"`` to this module's
    estimator. Call it at start-up (e.g. in a reward manager's ``__init__``) or run
    ``python -m igpo_rewards.integrations.verl``; verl itself logs a failed plugin only at debug level.
    """
    verl, core_algos = _import_verl("trainer.ppo.core_algos")
    if not hasattr(core_algos, "register_adv_est"):
        raise RuntimeError(f"verl {verl.__version__} has no register_adv_est (added in verl 0.4.1); upgrade verl")
    registered = core_algos.ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR_NAME)
    if registered is not None and getattr(registered, "__module__", None) == MODULE_NAME:
        return
    if registered is not None:
        raise RuntimeError(
            f"verl's advantage estimator {ESTIMATOR_NAME!r} is {registered!r} from {registered.__module__}, "
            f"not IGPO's ({MODULE_NAME}.compute_igpo_advantage)"
        )
    reason = _why_not_loaded(verl, ESTIMATOR_NAME, MODULE_NAME)
    raise RuntimeError(f"verl's advantage estimator {ESTIMATOR_NAME!r} is not registered: {reason}")


def check_agent_loop_registered() -> None:
    """Raises RuntimeError, saying why, unless verl's agent-loop registry maps ``"igpo_tool_agent"``
    to ``igpo_rewards.integrations.verl_agent_loop.IGPOToolAgentLoop`` (what
    ``actor_rollout_ref.rollout.agent.default_agent_loop=igpo_tool_agent`` instantiates)."""
    verl, agent_loop = _import_verl("experimental.agent_loop.agent_loop")
    expected = f"{AGENT_LOOP_MODULE}.IGPOToolAgentLoop"
    registered = getattr(agent_loop, "_agent_loop_registry", {}).get(AGENT_LOOP_NAME)
    target = registered.get("_target_") if hasattr(registered, "get") else None
    if target == expected:
        return
    if registered is not None:
        raise RuntimeError(f"verl's agent loop {AGENT_LOOP_NAME!r} is {target!r}, not IGPO's ({expected})")
    reason = _why_not_loaded(verl, AGENT_LOOP_NAME, AGENT_LOOP_MODULE)
    raise RuntimeError(f"verl's agent loop {AGENT_LOOP_NAME!r} is not registered: {reason}")


def _import_verl(submodule: str) -> tuple[Any, Any]:
    try:
        import verl

        return verl, importlib.import_module(f"verl.{submodule}")
    except ImportError as error:
        raise RuntimeError(f"verl cannot be imported ({error}); {install_hint('verl')}") from error


def _why_not_loaded(verl_module: Any, name: str, module: str) -> str:
    """Why the ``verl.plugins`` entry point ``name`` (which imports ``module``) did not register."""
    version = getattr(verl_module, "__version__", "unknown")
    installed = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    entry_points = [ep for ep in installed if ep.name == name]
    policy = os.getenv("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
    if not entry_points:
        return (
            f"no {ENTRY_POINT_GROUP!r} entry point named {name!r} is installed (igpo-rewards is not "
            f"pip-installed in this environment, e.g. it runs from a source tree on PYTHONPATH); run "
            f"`{install_line('verl')}` (IGPO_GIT: the repository's https address; README, \"Install\") or import "
            f"{module} in the driver"
        )
    if ENTRY_POINT_GROUP not in _verl_init_source(verl_module):
        return (
            f"verl {version} does not load {ENTRY_POINT_GROUP!r} entry points (verl >= 0.9 does); set "
            f"VERL_USE_EXTERNAL_MODULES={module} (verl >= 0.6) or import {module} in the driver"
        )
    if policy == "none" or (policy != "auto" and name not in {p.strip() for p in policy.split(",")}):
        return (
            f"VERL_USE_EXTERNAL_PLUGINS={os.environ.get('VERL_USE_EXTERNAL_PLUGINS')!r} excludes the "
            f"{name!r} plugin; unset it or add {name!r} to the list"
        )
    try:
        entry_points[0].load()
    except Exception as error:  # the reason verl logged only at debug level
        return f"loading the entry point {entry_points[0].value!r} failed: {type(error).__name__}: {error}"
    return (
        f"the entry point {entry_points[0].value!r} loads now, so verl was imported before igpo-rewards was "
        f"installed or with plugins disabled; restart the process"
    )


def _verl_init_source(verl_module: Any) -> str:
    path = getattr(verl_module, "__file__", None)
    if not path:
        return ""
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m igpo_rewards.integrations.verl``: imports verl the way a training job does and
    reports whether ``algorithm.adv_estimator=igpo`` and ``default_agent_loop=igpo_tool_agent``
    will resolve. Exit status 0 if both will, 1 otherwise."""
    del argv
    checks = (
        (ESTIMATOR_NAME, "advantage estimator", check_registered, f"{MODULE_NAME}.compute_igpo_advantage"),
        (AGENT_LOOP_NAME, "agent loop", check_agent_loop_registered, f"{AGENT_LOOP_MODULE}.IGPOToolAgentLoop"),
    )
    status = 0
    for name, kind, check, target in checks:
        try:
            check()
        except RuntimeError as error:
            print(f"{name} is NOT available to verl: {error}", file=sys.stderr)
            status = 1
            continue
        import verl

        print(f"verl {verl.__version__}: {kind} {name!r} -> {target}")
    return status


_TOOL_RESPONSE_JOIN = re.compile(r"</tool_response>\s*<tool_response>")
_TOOL_RESPONSE = re.compile(r"(?:\b(?:user|tool)\s*)?<tool_response>(.*?)</tool_response>(?:\s*assistant\b\s*)?", re.S)


def hermes_response_for_scoring(solution_str: str) -> str:
    r"""verl's decoded multi-turn response in the tag layout ``igpo_rewards.outcome_reward`` reads.

    verl's reward managers decode the whole response (assistant tokens and the chat template's
    tool turns) with special tokens skipped. Under a ChatML template with hermes tool calls
    (Qwen2.5, Qwen3) a tool turn then reads ``user\n<tool_response>\n...\n</tool_response>\n
    assistant\n``: the role names would be text outside the tags (a malformed response). Each
    run of tool responses becomes one ``<information>`` block (the observation after a call), and
    the role names that wrap it go.

    Example:
      >>> hermes_response_for_scoring('<tool_call>{"name": "search"}</tool_call>\nuser\n<tool_response>\n'
      ...                             'Doc 1\n</tool_response>\nassistant\n<answer> Kaleno </answer>')
      '<tool_call>{"name": "search"}</tool_call>\n<information>\nDoc 1\n</information>\n<answer> Kaleno </answer>'
    """
    joined = _TOOL_RESPONSE_JOIN.sub("\n", solution_str)
    return _TOOL_RESPONSE.sub(lambda match: f"<information>{match.group(1)}</information>\n", joined)


def compute_score(
    data_source: Any, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None = None, **unused: Any
) -> float:
    r"""The paper's outcome reward R as a verl reward function
    (``reward.custom_reward_function.path=pkg://igpo_rewards.integrations.verl``, ``name=compute_score``).

    ``igpo_rewards.outcome_reward`` (answer F1 over the aliases, -2.0 for a malformed response) of
    :func:`hermes_response_for_scoring` of verl's decoded response. Ground truths are aliases
    (a list or one string joined by ``"<|answer_split|>"``) or Search-R1's ``{"target": [...]}``.
    Only ``solution_str`` is read per rollout: verl's ``NaiveRewardManager`` merges each rollout's
    ``extra_fields`` into the ``extra_info`` dict that all rollouts of a prompt share, so values
    read from ``extra_info`` may belong to another rollout.

    Example:
      >>> compute_score("nq", "<tool_call>{}</tool_call>user\n<tool_response>Doc</tool_response>"
      ...               "assistant\n<answer> Kaleno </answer>", "Kaleno")
      1.0
    """
    del data_source, extra_info, unused
    if isinstance(ground_truth, Mapping) and "target" in ground_truth:  # Search-R1's {"target": [...]}
        ground_truth = ground_truth["target"]
    return float(igpo_rewards.outcome_reward(hermes_response_for_scoring(solution_str), ground_truth))


def _register_at_import() -> None:
    try:
        register()
    except Exception:
        # verl swallows exceptions from plugins at debug level: make this one visible.
        logger.error("igpo_rewards could not register verl's advantage estimator %r", ESTIMATOR_NAME, exc_info=True)
        raise


if __name__ == "__main__":
    # Run as a script this file is not the module verl's entry point imports: check that one.
    sys.exit(main())
else:
    _register_at_import()
