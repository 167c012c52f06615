"""``IGPOTrainer``: TRL's ``GRPOTrainer`` with IGPO's per-turn advantages (the package docstring of
:mod:`igpo_rewards.integrations.trl` says what it reads from TRL and what a ``rollout_func``
returns; import from there)."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import trl
import trl.trainer.grpo_trainer as _trl_grpo
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from trl import GRPOTrainer

import igpo_rewards
from igpo_rewards import _checks
from igpo_rewards.integrations import IGPOSettings

__all__ = [
    "ANSWER_LOGPROB_KEY",
    "SUPPORTED_TRL_VERSIONS",
    "TESTED_TRL_VERSIONS",
    "TURN_INDEX_KEY",
    "IGPOTrainer",
    "SplitGroupWarning",
    "ZeroAdvantageWarning",
    "check_trl_version",
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
        if turn_index is not None:
            _check_explicit_turns(row, values)
    if turn_index is None:
        index = igpo_rewards.turn_index_from_response_mask(index.clamp(min=0))
    return index


def _check_explicit_turns(row: int, values: Sequence[int]) -> None:
    """An explicit turn index numbers the completion's turns 0, 1, ..., n - 1 (each with a token), -1 elsewhere."""
    turns = sorted({int(value) for value in values} - {-1})
    if turns != list(range(len(turns))):
        raise ValueError(
            f"{TURN_INDEX_KEY}[{row}] must number the completion's turns 0, 1, ..., n - 1 (every turn on some token) "
            f"and -1 on tokens of no turn; got turns {turns[:8]}"
        )


def _num_turns(turn_index: torch.Tensor, explicit: Sequence[Sequence[int]] | None) -> list[int]:
    """n_i of each completion: the runs of env_mask (``turn_index >= 0``), or the explicit turns."""
    if explicit is not None:
        return [len({int(value) for value in values} - {-1}) for values in explicit]
    return igpo_rewards.num_turns_from_response_mask(turn_index >= 0).tolist()


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


class ZeroAdvantageWarning(UserWarning):
    """Every completion of a batch got advantage 0 on every token, so the batch trains nothing.

    The group-normalized turn rewards of every group were all equal (e.g. every completion got
    the format penalty -2.0, and the probes moved nothing): the policy-gradient loss is 0. A few
    such batches happen; a run of them means the set-up gives no signal (a malformed-answer
    policy, a reward function that always returns the same value, or too short completions).
    """


def whole_group_permutation(num_rows: int, group_size: int) -> torch.Tensor:
    """A random order of ``num_rows`` rows that keeps each group of ``group_size`` consecutive rows
    together and in order (one ``torch.randperm`` over the groups, on torch's global generator).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> whole_group_permutation(6, 2).tolist()
        [4, 5, 0, 1, 2, 3]
    """
    num_rows = _checks.check_count("num_rows", num_rows)
    group_size = _checks.check_positive_count("group_size", group_size)
    if num_rows % group_size:
        raise ValueError(f"num_rows must be a multiple of group_size, got num_rows={num_rows}, group_size={group_size}")
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
    and R are gathered over processes (probes padded by :func:`igpo_rewards.pad_turns` to
    ``igpo_settings.max_turns``, or the most turns of any process);
    ``igpo_settings.igpo_advantages`` runs on the whole batch with ``group_size=num_generations``
    (row k is in group k // num_generations); each process broadcasts its rows' turn advantages
    to their tokens. The result replaces ``advantages`` in the batch TRL trains on ([B_local, C],
    0 on environment tokens and padding). A batch whose every advantage is 0 (it trains nothing)
    emits a :class:`ZeroAdvantageWarning` with the count.

    ``igpo_batch_inputs``: while TRL scores a batch (so during each ``rollout_func`` call), the
    dataset rows of this process's slice, row i the one of ``prompts[i]``; ``None`` otherwise.
    TRL hands ``rollout_func`` the prompts only; this is how a rollout function reads the other
    columns (the ground-truth answer its probes need: :func:`make_search_rollout_func`).

    Logged: ``igpo/turns_mean`` (mean turns per completion), ``igpo/information_gain_mean``
    (mean IG over non-final turns) and ``igpo/zero_advantage_group_fraction`` (the share of groups
    whose turn advantages are all 0: the advantage-collapse rate, as the reference trainer logs it),
    besides TRL's metrics (whose ``advantages`` log column still shows GRPO's scalar advantages).

    Raises:
      RuntimeError: the installed TRL is outside :data:`SUPPORTED_TRL_VERSIONS`.
      ValueError: no ``rollout_func``, or ``tools`` / ``environment_factory`` given; per batch,
        rollout data that do not match (probes per turn, ``max_turns``, unscored completions).
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

        T is ``igpo_settings.max_turns`` (the most turns a completion may have), or else the
        largest turn count of any process, so that every process gathers tensors of one width.
        """
        turn_index = token_turn_index(rollout.completion_lengths, rollout.env_mask, rollout.turn_index, num_tokens)
        turns = _num_turns(turn_index, rollout.turn_index)
        counts = [len(row) for row in rollout.answer_logprob]
        mismatched = [row for row in range(len(counts)) if counts[row] != turns[row]]
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
        if max_turns is not None and widest > max_turns:
            raise ValueError(
                f"igpo_settings.max_turns = {max_turns} (the most turns a completion may have), but a completion of "
                f"this batch has {widest} turns; raise it or cap the rollout's turns"
            )
        padded = igpo_rewards.pad_turns(
            rollout.answer_logprob, max_turns=widest if max_turns is None else max_turns, like=turn_index
        )
        return padded.values.to(torch.float32), padded.turn_mask, turn_index

    def _igpo_token_advantages(self, num_tokens: int) -> torch.Tensor:
        (rollout,), rewards_per_func = self._igpo_rollouts, self._igpo_rewards_per_func
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        answer_logprob, turn_mask, turn_index = self._igpo_local_turns(rollout, num_tokens)
        local_rows = answer_logprob.shape[0]

        # The whole batch: groups are rows k * G .. k * G + G - 1 of the gathered batch.
        all_logprob = self.accelerator.gather(answer_logprob.to(device))
        all_turn_mask = self.accelerator.gather(turn_mask.to(device))
        outcome = self._igpo_outcome(rewards_per_func)
        total_rows = all_logprob.shape[0]
        if outcome.shape[0] != total_rows or total_rows % num_generations:
            raise ValueError(
                f"gathered batch of {total_rows} completions ({outcome.shape[0]} rewards) is not made of whole groups "
                f"of num_generations = {num_generations}"
            )
        # TRL's sampler yields each prompt num_generations times in a row: contiguous groups.
        result = self.igpo_settings.igpo_advantages(
            all_logprob, outcome.to(all_logprob), all_turn_mask, group_size=num_generations
        )
        self._igpo_log(mode, result.information_gain, all_turn_mask, result.advantages, num_generations)
        self._warn_if_no_signal(result.advantages, outcome, num_generations)

        start = self.accelerator.process_index * local_rows
        local_advantages = result.advantages[start : start + local_rows]
        return igpo_rewards.broadcast_to_tokens(
            local_advantages, turn_index.to(local_advantages.device), turn_mask=turn_mask.to(local_advantages.device)
        )

    def _igpo_outcome(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """R_i [B]: the weighted sum of the reward functions (what GRPO normalizes) of every completion."""
        weights = self.reward_weights.to(rewards_per_func.device)
        unscored = torch.isnan(rewards_per_func).all(dim=1)
        if bool(unscored.any()):
            raise ValueError(
                f"every reward function returned None for completions {torch.nonzero(unscored).flatten()[:5].tolist()} "
                f"of the batch; IGPO needs an outcome reward for each completion"
            )
        return (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)

    def _warn_if_no_signal(self, advantages: torch.Tensor, outcome: torch.Tensor, num_generations: int) -> None:
        """ZeroAdvantageWarning when every completion of the batch has advantage 0 (the step trains nothing)."""
        if bool(advantages.any()):
            return
        rows = advantages.shape[0]
        distinct = torch.unique(outcome).tolist()
        rewards = f"every outcome reward is {distinct[0]:g}" if len(distinct) == 1 else f"outcome rewards {distinct[:6]}"
        warnings.warn(
            f"IGPOTrainer: all {rows} completions of this batch ({rows // num_generations} groups of "
            f"num_generations = {num_generations}) have advantage 0 on every token: within each group every turn "
            f"reward is the same ({rewards}), so this step's policy-gradient loss is 0 and it learns nothing. A run of "
            f"such batches means the set-up gives no signal: check the reward function and that completions can "
            f"reach a well-formed answer",
            ZeroAdvantageWarning,
            stacklevel=2,
        )

    def _igpo_log(self, mode: str, information_gain: torch.Tensor, turn_mask: torch.Tensor, advantages: torch.Tensor,
                  num_generations: int) -> None:
        """Adds igpo/turns_mean, igpo/information_gain_mean (non-final turns) and
        igpo/zero_advantage_group_fraction (groups whose turn advantages are all 0) to TRL's metrics."""
        non_final = turn_mask & ~igpo_rewards.final_turn_mask(turn_mask, validate=False)
        nonzero_groups = advantages.reshape(-1, num_generations * advantages.shape[1]).ne(0).any(dim=1)
        self._metrics[mode]["igpo/zero_advantage_group_fraction"].append(1.0 - nonzero_groups.float().mean().item())
        self._metrics[mode]["igpo/turns_mean"].append(turn_mask.sum(dim=1).float().mean().item())
        self._metrics[mode]["igpo/information_gain_mean"].append(
            information_gain[non_final].float().mean().item() if bool(non_final.any()) else 0.0
        )
