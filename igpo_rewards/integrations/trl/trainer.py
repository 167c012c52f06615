"""IGPO for TRL: ``IGPOTrainer``, a ``GRPOTrainer`` whose advantages are IGPO's per-turn advantages.

TRL has no advantage hook; this trainer lets ``GRPOTrainer._generate_and_score_completions``
run unchanged (rollouts, reward functions, reference/old log-probs, logging) and then replaces
its one-scalar-per-completion ``advantages`` [B] with per-token IGPO advantages [B, C]
(C completion tokens), which TRL's loss accepts as they are.

What it reads from TRL, and how stable each piece is:

* the user's ``rollout_func`` (TRL's documented, experimental contract): IGPOTrainer wraps it
  and keeps what it returns, so it reads the completions, ``env_mask`` and the probe log-probs
  exactly as the rollout produced them;
* ``GRPOTrainer._calculate_rewards``: the rewards of the whole batch, gathered over processes;
* ``GRPOTrainer._generate_and_score_completions``, a private method, whose ``advantages`` it
  replaces;
* ``GRPOTrainer._prepare_inputs``, a private method, which shuffles each round's rollouts
  (``trl.trainer.grpo_trainer.shuffle_sequence_dict``) before splitting them into the round's
  ``steps_per_generation`` optimizer steps: IGPOTrainer swaps in, for the duration of that call,
  a shuffle that moves whole groups, so every optimizer step trains on complete groups (as verl's
  and the reference trainer's minibatches do). IGPO's advantages are normalized within a group,
  so a whole group's advantages are their own baseline inside one step; TRL's row shuffle splits
  groups across steps, and on the docs' CPU run that cost 2.6 held-out EM points over five seeds
  (docs/integrations/trl.md). Because of these private methods, IGPOTrainer checks the TRL version
  when it is built and refuses any outside :data:`SUPPORTED_TRL_VERSIONS`, the range pyproject's
  ``trl`` extra declares and the tests run at both ends.

What the ``rollout_func`` must return per completion, besides TRL's ``prompt_ids``,
``completion_ids`` and ``logprobs``:

* ``igpo_answer_logprob``: the n_i probe log-probs m_{i,0..n_i-1}, probe j taken right before
  turn j (:func:`igpo_rewards.answer_logprob` of the ground-truth answer tokens);
* ``env_mask`` (TRL's own key): 1 on tokens the model generated, 0 on tool/observation tokens
  inside the completion. Each maximal run of 1s is one turn, so a completion needs exactly
  n_i runs. Without ``env_mask`` the whole completion is one turn;
* optionally ``igpo_turn_index``: the turn (0, 1, ...) of every completion token, -1 for none,
  when turns are not the runs of ``env_mask`` (e.g. two turns with no observation between).

:func:`make_search_rollout_func` is such a ``rollout_func`` (the Search-R1 loop of
:mod:`igpo_rewards.agent` with retrieval and probes) and :func:`make_outcome_reward_func` its
reward function; both live in :mod:`igpo_rewards.integrations.trl_search` and are importable
from here.

The outcome reward R_i is the weighted sum of the trainer's reward functions (what GRPO
normalizes). Groups are TRL's: row k of the batch gathered over processes belongs to group
k // num_generations, so a group may span processes; the per-turn data of all processes is
gathered, normalized together and each process keeps its own rows.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import trl
import trl.trainer.grpo_trainer as _trl_grpo
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from trl import GRPOTrainer

import igpo_rewards
from igpo_rewards.integrations import IGPOSettings

__all__ = [
    "ANSWER_LOGPROB_KEY",
    "SUPPORTED_TRL_VERSIONS",
    "TESTED_TRL_VERSIONS",
    "TURN_INDEX_KEY",
    "IGPOTrainer",
    "SplitGroupWarning",
    "check_trl_version",
    "make_outcome_reward_func",
    "make_search_rollout_func",
    "token_turn_index",
    "whole_group_permutation",
]

ANSWER_LOGPROB_KEY = "igpo_answer_logprob"
"""rollout_func output key: per completion, the list of its n_i probe log-probs."""
TURN_INDEX_KEY = "igpo_turn_index"
"""Optional rollout_func output key: per completion, the turn of each completion token (-1: none)."""
SUPPORTED_TRL_VERSIONS = ">=1.0,<1.17"
"""The TRL releases IGPOTrainer runs on: pyproject's ``trl`` extra, tested at both ends."""
TESTED_TRL_VERSIONS = ("1.0.0", "1.16.0")
"""The releases the test set-up installs: the floor (``scripts/test_trl_floor.sh``) and the newest."""

# GRPOTrainer's positional parameters after `optimizers` differ between releases (1.8 inserted
# `quantization_config` before `peft_config`), so IGPOTrainer takes at most these positionally.
_POSITIONAL_PARAMETERS = (
    "model", "reward_funcs", "args", "train_dataset", "eval_dataset", "processing_class",
    "reward_processing_classes", "callbacks", "optimizers",
)


def check_trl_version(version: str) -> None:
    """Raises unless ``version`` lies in :data:`SUPPORTED_TRL_VERSIONS` (pre-releases excluded).

    Raises:
      RuntimeError: the version is outside the supported range; the message names the range
        and the tested releases.

    Example:
      >>> check_trl_version("1.16.0")
      >>> check_trl_version("1.17.0")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      RuntimeError: IGPOTrainer supports trl>=1.0,<1.17 (tested: 1.0.0 and 1.16.0); found trl 1.17.0. ...
    """
    if Version(version) in SpecifierSet(SUPPORTED_TRL_VERSIONS):
        return
    raise RuntimeError(
        f"IGPOTrainer supports trl{SUPPORTED_TRL_VERSIONS} (tested: {' and '.join(TESTED_TRL_VERSIONS)}); "
        f"found trl {version}. It overrides GRPOTrainer._generate_and_score_completions, a private TRL method, "
        f"so other releases are refused rather than trusted: pip install 'trl{SUPPORTED_TRL_VERSIONS}'"
    )


def token_turn_index(
    completion_lengths: Sequence[int],
    env_mask: Sequence[Sequence[int]] | None,
    turn_index: Sequence[Sequence[int]] | None,
    num_tokens: int,
) -> torch.Tensor:
    """[B, num_tokens] int64 turn of each completion token (-1 for none) for a batch of completions.

    Args:
      completion_lengths: [B] number of tokens of each completion (before padding).
      env_mask: per completion, 1 on generated tokens and 0 on environment tokens; each
        maximal run of 1s is a turn. None: each whole completion is one turn.
      turn_index: per completion, an explicit turn per token; overrides ``env_mask``.
      num_tokens: padded width C (>= every length); padding gets -1.

    Raises:
      ValueError: a per-token list whose length differs from its completion's.

    Example:
      >>> token_turn_index([5, 2], [[1, 1, 0, 1, 1], [1, 1]], None, 6)
      tensor([[ 0,  0, -1,  1,  1, -1],
              [ 0,  0, -1, -1, -1, -1]])
    """
    rows = len(completion_lengths)
    index = torch.full((rows, num_tokens), -1, dtype=torch.int64)
    if turn_index is not None:
        per_token, name = turn_index, TURN_INDEX_KEY
    elif env_mask is not None:
        per_token, name = env_mask, "env_mask"
    else:
        for row, length in enumerate(completion_lengths):
            index[row, :length] = 0
        return index
    if len(per_token) != rows:
        raise ValueError(f"{name} must have one entry per completion: {len(per_token)} entries for {rows} completions")
    for row, (values, length) in enumerate(zip(per_token, completion_lengths)):
        if len(values) != length:
            raise ValueError(f"{name}[{row}] has {len(values)} values but completion {row} has {length} tokens")
        index[row, :length] = torch.as_tensor(list(values), dtype=torch.int64)
    if turn_index is None:
        index = igpo_rewards.turn_index_from_response_mask(index.clamp(min=0))
    return index


@dataclasses.dataclass
class _Rollout:
    """What IGPOTrainer keeps of one rollout_func call (this process's completions)."""

    completion_lengths: list[int]
    env_mask: Sequence[Sequence[int]] | None
    turn_index: Sequence[Sequence[int]] | None
    answer_logprob: Sequence[Sequence[float]]


def _read_rollout(output: Mapping[str, Any]) -> _Rollout:
    """The IGPO fields of a rollout_func output, checked against its number of completions."""
    if ANSWER_LOGPROB_KEY not in output:
        raise ValueError(
            f"rollout_func must return {ANSWER_LOGPROB_KEY!r}: per completion the list of its probe log-probs "
            f"(one per turn); it returned {sorted(output)}"
        )
    lengths = [len(ids) for ids in output["completion_ids"]]
    answer_logprob = output[ANSWER_LOGPROB_KEY]
    if len(answer_logprob) != len(lengths):
        raise ValueError(f"{ANSWER_LOGPROB_KEY} has {len(answer_logprob)} entries for {len(lengths)} completions")
    return _Rollout(lengths, output.get("env_mask"), output.get(TURN_INDEX_KEY), answer_logprob)


def _recording(rollout_func: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """rollout_func as TRL calls it (``rollout_func(prompts, trainer)``), keeping its IGPO fields."""

    @functools.wraps(rollout_func)
    def recording_rollout_func(prompts: list, trainer: IGPOTrainer) -> dict[str, Any]:
        output = rollout_func(prompts, trainer)
        if "completion_ids" in output:  # otherwise TRL names the missing keys itself
            trainer._igpo_rollouts.append(_read_rollout(output))
        return output

    return recording_rollout_func


class SplitGroupWarning(UserWarning):
    """A round's minibatches cannot hold whole groups, so some group is split across optimizer steps."""


def whole_group_permutation(num_rows: int, group_size: int) -> torch.Tensor:
    """A random order of ``num_rows`` rows that keeps each group of ``group_size`` consecutive rows
    together and in order (one ``torch.randperm`` over the groups, on torch's global generator).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> whole_group_permutation(6, 2).tolist()
        [4, 5, 0, 1, 2, 3]
    """
    if group_size < 1 or num_rows % group_size:
        raise ValueError(f"num_rows must be a multiple of group_size >= 1, got num_rows={num_rows}, group_size={group_size}")
    groups = torch.randperm(num_rows // group_size)
    return (groups[:, None] * group_size + torch.arange(group_size)[None, :]).reshape(-1)


def _permute_rows(values: Any, order: torch.Tensor) -> Any:
    if values is None or (isinstance(values, torch.Tensor) and values.ndim == 0):
        return values
    if isinstance(values, torch.Tensor):
        return values[order.to(values.device)]
    return [values[index] for index in order.tolist()]


class IGPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with IGPO advantages: each completion token gets its turn's advantage.

    Takes every ``GRPOTrainer`` argument (those after ``optimizers`` by keyword), plus
    ``igpo_settings`` (:class:`IGPOSettings` or a mapping; the paper's defaults). A
    ``rollout_func`` that returns ``igpo_answer_logprob`` (and ``env_mask`` for multi-turn
    completions) is required; see the module docstring. TRL's own tool loop (``tools``,
    ``environment_factory``) is refused: it would rewrite the completions after the rollout.

    Per training batch: R_i = weighted sum of the reward functions; probe log-probs, turn masks
    and R are gathered over processes; :func:`igpo_rewards.igpo_advantages` runs on the whole
    batch with ``group_size=num_generations`` (row k is in group k // num_generations); each
    process broadcasts its rows' turn advantages to their tokens. The result replaces
    ``advantages`` in the batch TRL trains on ([B_local, C], 0 on environment tokens and padding).

    ``igpo_batch_inputs``: while TRL scores a batch (so during each ``rollout_func`` call), the
    dataset rows of this process's slice, row i the one of ``prompts[i]``; ``None`` otherwise.
    TRL hands ``rollout_func`` the prompts only; this is how a rollout function reads the other
    columns (the ground-truth answer its probes need: :func:`make_search_rollout_func`).

    Logged: ``igpo/turns_mean`` (mean turns per completion) and ``igpo/information_gain_mean``
    (mean IG over non-final turns), besides TRL's metrics (whose ``advantages`` log column
    still shows GRPO's scalar advantages).

    Raises:
      RuntimeError: the installed TRL is outside :data:`SUPPORTED_TRL_VERSIONS`.
      ValueError: no ``rollout_func``, or ``tools`` / ``environment_factory`` given.
      TypeError: more positional arguments than ``model`` .. ``optimizers``.
    """

    def __init__(
        self,
        *args: Any,
        rollout_func: Callable[..., dict[str, Any]] | None = None,
        igpo_settings: IGPOSettings | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        check_trl_version(trl.__version__)
        if len(args) > len(_POSITIONAL_PARAMETERS):
            raise TypeError(
                f"IGPOTrainer takes at most {len(_POSITIONAL_PARAMETERS)} positional arguments "
                f"({', '.join(_POSITIONAL_PARAMETERS)}); got {len(args)}. Pass the rest by keyword: their "
                f"positions differ between TRL releases"
            )
        if rollout_func is None:
            raise ValueError(
                f"IGPOTrainer needs a rollout_func that returns {ANSWER_LOGPROB_KEY!r} (the probe log-probs of each "
                f"completion) and 'env_mask'; got rollout_func=None"
            )
        for name in ("tools", "environment_factory"):
            if kwargs.get(name):
                raise ValueError(
                    f"IGPOTrainer reads turns from the rollout_func's env_mask; TRL's tool loop ({name}=...) would "
                    f"rewrite the completions after the rollout. Run the tools inside rollout_func instead"
                )
        self.igpo_settings = IGPOSettings.from_mapping(igpo_settings)
        self.igpo_batch_inputs: list[dict[str, Any]] | None = None
        self._igpo_rollouts: list[_Rollout] = []
        self._igpo_rewards_per_func: torch.Tensor | None = None
        super().__init__(*args, rollout_func=_recording(rollout_func), **kwargs)

    # The rewards of the whole batch (gathered over processes), for the outcome R_i.
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._igpo_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._igpo_rollouts = []
        self._igpo_rewards_per_func = None
        self.igpo_batch_inputs = inputs
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self.igpo_batch_inputs = None
        rewards_seen = self._igpo_rewards_per_func is not None
        if len(self._igpo_rollouts) != 1 or not rewards_seen:
            raise RuntimeError(
                f"IGPOTrainer expects one rollout_func call and one _calculate_rewards call per batch; this batch "
                f"made {len(self._igpo_rollouts)} rollout_func call(s), rewards computed: {rewards_seen}"
            )
        output["advantages"] = self._igpo_token_advantages(output["completion_ids"].shape[1])
        return output

    def _prepare_inputs(self, generation_batch: Any) -> Any:
        """TRL's ``_prepare_inputs`` with each round's shuffle moving whole groups (module docstring)."""
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        original = _trl_grpo.shuffle_sequence_dict
        _trl_grpo.shuffle_sequence_dict = functools.partial(self._shuffle_whole_groups, fallback=original)
        try:
            return super()._prepare_inputs(generation_batch)
        finally:
            _trl_grpo.shuffle_sequence_dict = original

    def _shuffle_whole_groups(self, batch: dict[str, Any], *, fallback: Callable[[dict], dict]) -> dict[str, Any]:
        """This process's rows of one round, reordered group by group (groups are consecutive rows)."""
        num_rows = len(next(values for values in batch.values() if values is not None))
        group_size, steps = self.num_generations, self.args.steps_per_generation
        if num_rows % group_size or (num_rows // steps) % group_size:
            warnings.warn(
                f"IGPOTrainer keeps whole groups in each optimizer step, but this process's {num_rows} rollouts per "
                f"round in {steps} steps_per_generation minibatches are not whole groups of num_generations = "
                f"{group_size}; TRL's row shuffle is used, which splits groups across steps. Make "
                f"per_device_train_batch_size a multiple of num_generations",
                SplitGroupWarning,
                stacklevel=2,
            )
            return fallback(batch)
        order = whole_group_permutation(num_rows, group_size)
        return {key: _permute_rows(values, order) for key, values in batch.items()}

    def _igpo_local_turns(self, rollout: _Rollout, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This process's probe log-probs [B_local, T], turn mask [B_local, T] and token turns [B_local, C].

        T is the largest turn count of any process (or ``igpo_settings.max_turns``), so that
        every process gathers tensors of the same width.
        """
        probes = [np.asarray(row, dtype=np.float64).reshape(-1) for row in rollout.answer_logprob]
        turn_index = token_turn_index(rollout.completion_lengths, rollout.env_mask, rollout.turn_index, num_tokens)
        turns = (turn_index.max(dim=1).values + 1).tolist()
        counts = [row.size for row in probes]
        mismatched = [row for row in range(len(probes)) if counts[row] != turns[row]]
        if mismatched:
            shown = mismatched[:5]
            raise ValueError(
                f"each completion needs one probe log-prob per turn: completions {shown} have "
                f"{[counts[row] for row in shown]} values in {ANSWER_LOGPROB_KEY!r} but "
                f"{[turns[row] for row in shown]} turns (runs of 1s in env_mask)"
            )
        local_max = torch.tensor([max(counts, default=0)], device=self.accelerator.device)
        widest = int(self.accelerator.gather(local_max).max())
        max_turns = self.igpo_settings.max_turns
        num_turns = widest if max_turns is None else max_turns
        if widest > num_turns:
            raise ValueError(f"a completion has {widest} turns but igpo_settings.max_turns = {num_turns}")
        answer_logprob = torch.zeros(len(probes), num_turns, dtype=torch.float32)
        turn_mask = torch.zeros(len(probes), num_turns, dtype=torch.bool)
        for row, values in enumerate(probes):
            answer_logprob[row, : values.size] = torch.from_numpy(values).float()
            turn_mask[row, : values.size] = True
        return answer_logprob, turn_mask, turn_index

    def _igpo_token_advantages(self, num_tokens: int) -> torch.Tensor:
        (rollout,), rewards_per_func = self._igpo_rollouts, self._igpo_rewards_per_func
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        settings = self.igpo_settings
        answer_logprob, turn_mask, turn_index = self._igpo_local_turns(rollout, num_tokens)
        local_rows = answer_logprob.shape[0]

        # The whole batch: groups are rows k * G .. k * G + G - 1 of the gathered batch.
        all_logprob = self.accelerator.gather(answer_logprob.to(device))
        all_turn_mask = self.accelerator.gather(turn_mask.to(device))
        weights = self.reward_weights.to(rewards_per_func.device)
        outcome = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        unscored = torch.isnan(rewards_per_func).all(dim=1)
        if bool(unscored.any()):
            raise ValueError(
                f"every reward function returned None for completions {torch.nonzero(unscored).flatten()[:5].tolist()} "
                f"of the batch; IGPO needs an outcome reward for each completion"
            )
        total_rows = all_logprob.shape[0]
        if outcome.shape[0] != total_rows or total_rows % num_generations:
            raise ValueError(
                f"gathered batch of {total_rows} completions ({outcome.shape[0]} rewards) is not made of whole groups "
                f"of num_generations = {num_generations}"
            )
        # TRL's sampler yields each prompt num_generations times in a row: contiguous groups.
        result = igpo_rewards.igpo_advantages(
            all_logprob,
            outcome.to(all_logprob),
            all_turn_mask,
            group_size=num_generations,
            gamma=settings.gamma,
            **settings.reward_kwargs(),
            **settings.normalization_kwargs(),
        )
        self._igpo_log(mode, result.information_gain, all_turn_mask)

        start = self.accelerator.process_index * local_rows
        local_advantages = result.advantages[start : start + local_rows]
        return igpo_rewards.broadcast_to_tokens(
            local_advantages, turn_index.to(local_advantages.device), turn_mask=turn_mask.to(local_advantages.device)
        )

    def _igpo_log(self, mode: str, information_gain: torch.Tensor, turn_mask: torch.Tensor) -> None:
        """Adds igpo/turns_mean and igpo/information_gain_mean (non-final turns) to TRL's metrics."""
        last_turn = turn_mask.sum(dim=1, keepdim=True) - 1
        positions = torch.arange(turn_mask.shape[1], device=turn_mask.device)[None, :]
        non_final = turn_mask & (positions < last_turn)
        self._metrics[mode]["igpo/turns_mean"].append(turn_mask.sum(dim=1).float().mean().item())
        self._metrics[mode]["igpo/information_gain_mean"].append(
            information_gain[non_final].float().mean().item() if bool(non_final.any()) else 0.0
        )


def __getattr__(name: str) -> Any:
    """``make_search_rollout_func`` and ``make_outcome_reward_func`` from :mod:`.trl_search` (which
    imports this module, so it is imported on first use rather than at the top)."""
    if name in ("make_search_rollout_func", "make_outcome_reward_func"):
        from igpo_rewards.integrations import trl_search

        return getattr(trl_search, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
