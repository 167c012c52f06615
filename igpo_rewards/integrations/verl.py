"""IGPO as a verl advantage estimator: ``algorithm.adv_estimator=igpo`` with no fork of verl.

Importing this module registers :func:`compute_igpo_advantage` under the name ``"igpo"`` with
verl's ``register_adv_est``. verl >= 0.9 imports it by itself, at ``import verl``, through the
``verl.plugins`` entry point that ``pip install igpo-rewards[verl]`` declares; verl 0.6 - 0.8 import
it when ``VERL_USE_EXTERNAL_MODULES=igpo_rewards.integrations.verl`` is set; verl 0.4.1 - 0.5
need an explicit ``import igpo_rewards.integrations.verl`` in the driver process.

verl's layout (B rollouts, S response tokens): ``response_mask`` [B, S] is 1 on generated tokens
and 0 on tool/observation/padding tokens, so each maximal run of 1s is one turn; turn j's reward
sits at the last token of run j and the outcome at the last generated token (or on a trailing
observation token, where verl's reward managers put it). :func:`igpo_token_scores` and
:func:`assemble_igpo_rm_scores` write that layout from probe log-probs and outcome rewards.

verl logs a plugin that fails to load only at debug level; so this module logs its own failure
at ERROR level, and :func:`check_registered` (also ``python -m igpo_rewards.integrations.verl``)
says whether ``"igpo"`` is registered and, if not, why.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import igpo_rewards
from igpo_rewards._groups import contiguous_group_size
from igpo_rewards.integrations import IGPOSettings

__all__ = [
    "ANSWER_LOGPROB_KEY",
    "ESTIMATOR_NAME",
    "assemble_igpo_rm_scores",
    "check_registered",
    "compute_igpo_advantage",
    "group_ids_from_uids",
    "igpo_token_scores",
    "register",
    "settings_from_config",
]

ESTIMATOR_NAME = "igpo"
"""The name verl's ``algorithm.adv_estimator`` takes."""
CONFIG_KEY = "igpo"
"""The hyperparameters live under ``algorithm.igpo``."""
ANSWER_LOGPROB_KEY = "igpo_answer_logprob"
"""The ``non_tensor_batch`` column (an agent loop's ``extra_fields`` key) holding each rollout's probe log-probs."""
ENTRY_POINT_GROUP = "verl.plugins"
MODULE_NAME = "igpo_rewards.integrations.verl"

logger = logging.getLogger(MODULE_NAME)
_warned_kl_in_reward = False


def settings_from_config(config: Any) -> IGPOSettings:
    """Reads :class:`IGPOSettings` from verl's algorithm config (``algorithm.igpo.*``).

    Args:
      config: verl's ``algorithm`` config (an OmegaConf DictConfig, verl's AlgoConfig or a plain
        mapping), an :class:`IGPOSettings`, or None. A missing ``igpo`` key gives the paper's
        defaults.

    Raises:
      ValueError: unknown key or bad value under ``algorithm.igpo``.

    Example:
      >>> settings_from_config({"adv_estimator": "igpo", "igpo": {"mode": "separate"}}).mode
      'separate'
    """
    if config is None or isinstance(config, IGPOSettings):
        return IGPOSettings.from_mapping(config)
    section = config.get(CONFIG_KEY, None) if hasattr(config, "get") else getattr(config, CONFIG_KEY, None)
    try:
        return IGPOSettings.from_mapping(section)
    except (ValueError, TypeError) as error:
        raise type(error)(f"algorithm.{CONFIG_KEY}: {error}") from error


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

    With ``use_kl_in_reward=True`` every generated token carries a KL penalty: turn detection is
    unaffected (it uses the mask only), but only the penalty at turn ends reaches the turn
    reward. Use ``actor.use_kl_loss=True`` instead (the paper's choice); a warning says so once.

    Args:
      token_level_rewards: [B, S] float rewards (verl's ``token_level_rewards``).
      response_mask: [B, S] 0/1 mask of generated tokens.
      index: [B] group ids (verl's ``uid``); required.
      config: verl's ``algorithm`` config (reads ``igpo`` and ``use_kl_in_reward``).
      **unused: other arguments verl passes to some estimators (e.g. ``reward_baselines``);
        IGPO does not use them.

    Returns:
      (advantages, returns), both the same [B, S] tensor of ``token_level_rewards``' dtype and
      device; 0 on every 0-mask token.

    Raises:
      ValueError: no ``index``, shapes that disagree, rewards on observation tokens between turns.
    """
    global _warned_kl_in_reward
    if index is None:
        raise ValueError(
            "the igpo advantage estimator needs verl's group index (non_tensor_batch['uid']); got index=None"
        )
    settings = settings_from_config(config)
    if config is not None and not isinstance(config, IGPOSettings) and hasattr(config, "get"):
        if config.get("use_kl_in_reward", False) and not _warned_kl_in_reward:
            _warned_kl_in_reward = True
            warnings.warn(
                "algorithm.use_kl_in_reward=True with adv_estimator=igpo: IGPO reads each turn's reward at the "
                "turn's last token, so the per-token KL penalty on the other tokens is dropped. Set "
                "algorithm.use_kl_in_reward=False and actor_rollout_ref.actor.use_kl_loss=True.",
                stacklevel=2,
            )
    group_ids = group_ids_from_uids(index)  # on the host
    if group_ids.shape[0] != token_level_rewards.shape[0]:
        raise ValueError(
            f"index (verl's uid) must have one entry per row: {group_ids.shape[0]} ids for token_level_rewards "
            f"{tuple(token_level_rewards.shape)}"
        )
    with torch.no_grad():
        advantages = igpo_rewards.advantages_from_token_rewards(
            token_level_rewards,
            response_mask,
            **_groups_of(group_ids, device=token_level_rewards.device),
            gamma=settings.gamma,
            max_turns=settings.max_turns,
            **settings.normalization_kwargs(),
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
    rewards = igpo_rewards.turn_rewards(answer_logprob, outcome, turn_mask, **settings.reward_kwargs())
    return igpo_rewards.place_turn_rewards(rewards, response_mask, turn_mask=turn_mask)


def _turn_mask_from_runs(answer_logprob: Any, response_mask: Any) -> Any:
    """[B, T] prefix mask with n_b = number of runs of 1s in row b, in answer_logprob's library."""
    index = igpo_rewards.turn_index_from_response_mask(response_mask)
    if isinstance(index, torch.Tensor):
        runs = index.max(dim=1).values + 1
        num_turns = answer_logprob.shape[1]
        positions = torch.arange(num_turns, device=index.device)
        if index.shape[0] and int(runs.max()) > num_turns:
            raise ValueError(
                f"response_mask has up to {int(runs.max())} runs of 1s (turns) per row but answer_logprob has "
                f"T = {num_turns} probes per row (shape {tuple(answer_logprob.shape)})"
            )
        return positions[None, :] < runs[:, None]
    index = np.asarray(index)
    runs = index.max(axis=1, initial=-1) + 1
    num_turns = np.shape(answer_logprob)[1]
    if runs.size and runs.max() > num_turns:
        raise ValueError(
            f"response_mask has up to {int(runs.max())} runs of 1s (turns) per row but answer_logprob has "
            f"T = {num_turns} probes per row (shape {np.shape(answer_logprob)})"
        )
    return np.arange(num_turns)[None, :] < runs[:, None]


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
      KeyError: ``key`` missing from ``non_tensor_batch``. ValueError: a rollout whose number
      of probe log-probs differs from its number of turns, or a length mismatch with ``scores``.
    """
    response_mask = data.batch["response_mask"]
    if key not in data.non_tensor_batch:
        raise KeyError(
            f"non_tensor_batch has no {key!r} column (columns: {sorted(data.non_tensor_batch)}); the agent loop "
            f"must store each rollout's probe log-probs in extra_fields[{key!r}]"
        )
    per_rollout = [np.asarray(row, dtype=np.float64).reshape(-1) for row in data.non_tensor_batch[key]]
    num_rollouts = response_mask.shape[0]
    if len(per_rollout) != num_rollouts or len(scores) != num_rollouts:
        raise ValueError(
            f"need one probe row and one score per rollout: response_mask {tuple(response_mask.shape)}, "
            f"{len(per_rollout)} rows in {key!r}, {len(scores)} scores"
        )
    runs = (igpo_rewards.turn_index_from_response_mask(response_mask).max(dim=1).values + 1).tolist()
    probes = [row.size for row in per_rollout]
    mismatched = [row for row in range(num_rollouts) if runs[row] != probes[row]]
    if mismatched:
        shown = mismatched[:5]
        raise ValueError(
            f"each rollout needs one probe log-prob per turn (run of 1s in response_mask): rows {shown} have "
            f"{[probes[row] for row in shown]} values in {key!r} but {[runs[row] for row in shown]} turns"
        )
    num_turns = max(probes, default=0)
    answer_logprob = np.zeros((num_rollouts, num_turns))
    turn_mask = np.zeros((num_rollouts, num_turns), dtype=bool)
    for row, values in enumerate(per_rollout):
        answer_logprob[row, : values.size] = values
        turn_mask[row, : values.size] = True
    device = response_mask.device
    token_scores = igpo_token_scores(
        torch.tensor(answer_logprob, dtype=torch.float32, device=device),
        torch.tensor(np.asarray(scores, dtype=np.float64), dtype=torch.float32, device=device),
        response_mask,
        turn_mask=torch.tensor(turn_mask, device=device),
        config=config,
    )
    return token_scores


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
    try:
        import verl
        from verl.trainer.ppo import core_algos
    except ImportError as error:
        raise RuntimeError(f"verl cannot be imported ({error}); install it: pip install 'igpo-rewards[verl]'") from error
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
    raise RuntimeError(f"verl's advantage estimator {ESTIMATOR_NAME!r} is not registered: {_why_not_loaded(verl)}")


def _why_not_loaded(verl_module: Any) -> str:
    version = getattr(verl_module, "__version__", "unknown")
    installed = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    entry_points = [ep for ep in installed if ep.name == ESTIMATOR_NAME]
    policy = os.getenv("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
    if not entry_points:
        return (
            f"no {ENTRY_POINT_GROUP!r} entry point named {ESTIMATOR_NAME!r} is installed (igpo-rewards is not "
            f"pip-installed in this environment, e.g. it runs from a source tree on PYTHONPATH); run "
            f"`pip install 'igpo-rewards[verl]'` or import {MODULE_NAME} in the driver"
        )
    if ENTRY_POINT_GROUP not in _verl_init_source(verl_module):
        return (
            f"verl {version} does not load {ENTRY_POINT_GROUP!r} entry points (verl >= 0.9 does); set "
            f"VERL_USE_EXTERNAL_MODULES={MODULE_NAME} (verl >= 0.6) or import {MODULE_NAME} in the driver"
        )
    if policy == "none" or (policy != "auto" and ESTIMATOR_NAME not in {p.strip() for p in policy.split(",")}):
        return (
            f"VERL_USE_EXTERNAL_PLUGINS={os.environ.get('VERL_USE_EXTERNAL_PLUGINS')!r} excludes the "
            f"{ESTIMATOR_NAME!r} plugin; unset it or add {ESTIMATOR_NAME!r} to the list"
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
    reports whether ``algorithm.adv_estimator=igpo`` will resolve. Exit status 0 if it will."""
    del argv
    try:
        check_registered()
    except RuntimeError as error:
        print(f"igpo is NOT available to verl: {error}", file=sys.stderr)
        return 1
    import verl

    print(f"verl {verl.__version__}: advantage estimator {ESTIMATOR_NAME!r} -> {MODULE_NAME}.compute_igpo_advantage")
    return 0


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
