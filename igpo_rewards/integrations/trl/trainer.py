"""``IGPOTrainer``: TRL's ``GRPOTrainer`` with IGPO's per-turn advantages (the package docstring of
:mod:`igpo_rewards.integrations.trl` says what it reads from TRL, how it reads turns from TRL's
tool loop and what a ``rollout_func`` returns; import from there)."""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import transformers
import trl
import trl.trainer.grpo_trainer as _trl_grpo
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from trl import GRPOTrainer

import igpo_rewards
from igpo_rewards import _checks
from igpo_rewards.agent.protocol import PROBE_TEMPLATE
from igpo_rewards.agent.tool_calls import SEARCH_R1_RESPONSE_TEMPLATE, STOP_TAGS
from igpo_rewards.integrations import IGPOSettings
from igpo_rewards.integrations.trl._probes import generation_model, probe_log_probs
from igpo_rewards.scoring import normalize_answer, split_ground_truth

__all__ = [
    "ANSWER_LOGPROB_KEY",
    "PROBE_SECONDS_KEY",
    "SUPPORTED_TRANSFORMERS_TOOL_VERSIONS",
    "SUPPORTED_TRL_TOOL_VERSIONS",
    "SUPPORTED_TRL_VERSIONS",
    "TARGET_LOGPROB_KEY",
    "TESTED_TRL_TOOL_VERSIONS",
    "TESTED_TRL_VERSIONS",
    "TURN_INDEX_KEY",
    "IGPOTrainer",
    "SplitGroupWarning",
    "ZeroAdvantageWarning",
    "check_tool_loop_versions",
    "check_trl_version",
    "token_turn_index",
    "turn_starts_from_tool_mask",
    "whole_group_permutation",
]

ANSWER_LOGPROB_KEY = "igpo_answer_logprob"
"""rollout_func output key: per completion, the list of its n_i probe log-probs."""
TURN_INDEX_KEY = "igpo_turn_index"
"""Optional rollout_func output key: per completion, the turn of each completion token (-1: none)."""
TARGET_LOGPROB_KEY = "igpo_target_logprob"
"""Optional rollout_func output key (sub-goal targets): per completion, per turn, the probe log-probs of
its K_i targets, the answer first (then ``igpo_answer_logprob`` is each turn's first value)."""
SUPPORTED_TRL_VERSIONS = ">=1.0,<1.17"
"""The TRL releases IGPOTrainer runs on: pyproject's ``trl`` extra, tested at both ends."""
TESTED_TRL_VERSIONS = ("1.0.0", "1.16.0")
"""The releases the test set-up installs: the floor (``scripts/test_trl_floor.sh``) and the newest."""
SUPPORTED_TRL_TOOL_VERSIONS = ">=1.14.2,<1.17"
"""The TRL releases IGPOTrainer runs TRL's tool loop on (``tools=`` / ``environment_factory=``):
pyproject's ``trl-tools`` extra, tested at both ends. 1.14.2 is the first release whose completions
end at the model's end-of-turn ids (``generation_config.eos_token_id``), which the Search-R1 tool
protocol stops at (``</search>``, ``</answer>``)."""
SUPPORTED_TRANSFORMERS_TOOL_VERSIONS = ">=5.13"
"""The transformers releases of the tool-loop path: 5.13 is the first whose ``response_template``
parser takes ``prefix=`` (TRL itself asks only >= 5.0 for tools and >= 5.2 for environments)."""
TESTED_TRL_TOOL_VERSIONS = ("1.14.2", "1.16.0")
"""The TRL releases the tool-loop tests run on: the floor job (``scripts/test_trl_tools_floor.sh``,
with transformers 5.13.0) and the newest."""
PROBE_SECONDS_KEY = "igpo/probe_seconds"
"""Logged metric: wall seconds of one generation batch's probes on this process."""

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
    if not Version(version).is_prerelease and Version(version) in SpecifierSet(SUPPORTED_TRL_VERSIONS):
        return  # (packaging >= 26 lets a specifier set admit pre-releases inside its range: excluded explicitly)
    raise RuntimeError(
        f"IGPOTrainer supports trl{SUPPORTED_TRL_VERSIONS} (tested: {' and '.join(TESTED_TRL_VERSIONS)}); "
        f"found trl {version}. It overrides GRPOTrainer._generate_and_score_completions, a private TRL method, "
        f"so other releases are refused rather than trusted: pip install 'trl{SUPPORTED_TRL_VERSIONS}'"
    )


def check_tool_loop_versions(trl_version: str, transformers_version: str) -> None:
    """Raises unless TRL and transformers are in the tool-loop ranges (:data:`SUPPORTED_TRL_TOOL_VERSIONS`,
    pre-releases excluded; :data:`SUPPORTED_TRANSFORMERS_TOOL_VERSIONS`).

    Raises:
      RuntimeError: a version outside its range; the message names both ranges, the reason and
        the rollout_func path's range.

    Example:
      >>> check_tool_loop_versions("1.16.0", "5.25.0")
      >>> check_tool_loop_versions("1.14.1", "5.25.0")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      RuntimeError: IGPOTrainer on TRL's tool loop (tools= / environment_factory=) supports trl>=1.14.2,<1.17 with transformers>=5.13 ...
    """
    trl_ok = not Version(trl_version).is_prerelease and Version(trl_version) in SpecifierSet(SUPPORTED_TRL_TOOL_VERSIONS)
    transformers_ok = SpecifierSet(SUPPORTED_TRANSFORMERS_TOOL_VERSIONS).contains(transformers_version, prereleases=True)
    if trl_ok and transformers_ok:
        return
    raise RuntimeError(
        f"IGPOTrainer on TRL's tool loop (tools= / environment_factory=) supports trl{SUPPORTED_TRL_TOOL_VERSIONS} with "
        f"transformers{SUPPORTED_TRANSFORMERS_TOOL_VERSIONS} (tested: trl {' and '.join(TESTED_TRL_TOOL_VERSIONS)}); found "
        f"trl {trl_version}, transformers {transformers_version}. TRL before 1.14.2 does not end a completion at the "
        f"model's end-of-turn ids (generation_config.eos_token_id, e.g. </search>), and transformers before 5.13 has no "
        f"response_template parser that takes prefix=; TRL itself asks only transformers>=5.0 (tools) or >=5.2 "
        f"(environment_factory). pip install 'trl{SUPPORTED_TRL_TOOL_VERSIONS}' 'transformers{SUPPORTED_TRANSFORMERS_TOOL_VERSIONS}', "
        f"or use a rollout_func (trl{SUPPORTED_TRL_VERSIONS})"
    )


def turn_starts_from_tool_mask(prompt_lengths: Sequence[int], tool_masks: Sequence[Sequence[int]]) -> list[list[int]]:
    """Where each turn of each trajectory starts, as a position in prompt + completion.

    A turn is a maximal run of 1s in the completion's tool mask (1 on generated tokens, 0 on
    tool results and the template tokens around them); it starts at its first 1.

    Example:
      >>> turn_starts_from_tool_mask([3, 2], [[1, 1, 0, 0, 1], [1, 1, 1]])
      [[3, 7], [2]]
    """
    if len(prompt_lengths) != len(tool_masks):
        raise ValueError(f"prompt_lengths has {len(prompt_lengths)} entries for {len(tool_masks)} tool masks")
    return [
        [length + t for t, value in enumerate(mask) if value == 1 and (t == 0 or mask[t - 1] == 0)]
        for length, mask in zip(prompt_lengths, tool_masks)
    ]


def _row_answers(rows: Sequence[Mapping[str, Any]], column: str) -> list[tuple[str, ...]]:
    """Each dataset row's answer aliases (``split_ground_truth`` of ``row[column]``), naming the
    column and the row when one is missing or unreadable."""
    answers = []
    for index, row in enumerate(rows):
        if column not in row:
            raise ValueError(
                f"the dataset has no column {column!r} (the ground-truth answers, answers_column=); its columns: "
                f"{sorted(row)}"
            )
        try:
            answers.append(split_ground_truth(row[column]))
        except (TypeError, ValueError) as error:
            raise type(error)(f"dataset row {index} of the batch, column {column!r}: {error}") from None
    return answers


def _refuse_ignored_subgoals(settings: IGPOSettings, column: str | None) -> None:
    """Sub-goal targets with ``subgoal_weight == 0`` would be probed and then ignored."""
    if column is not None and settings.subgoal_weight == 0:
        raise ValueError(
            f"subgoals_column={column!r} probes sub-goal targets, but igpo_settings.subgoal_weight is 0: they would be "
            f"ignored; set IGPOSettings(subgoal_weight=...) (e.g. 1.0), or leave subgoals_column out for the paper's IGPO"
        )


def _row_targets(
    rows: Sequence[Mapping[str, Any]], answers: Sequence[tuple[str, ...]], column: str, settings: IGPOSettings
) -> list[list[str]]:
    """Each dataset row's probe targets (both TRL paths): its answer (the first alias), then the
    sub-goals of ``column`` (a list of non-empty strings, or None for none), each checked."""
    _refuse_ignored_subgoals(settings, column)
    targets = []
    for index, (row, aliases) in enumerate(zip(rows, answers, strict=True)):
        if column not in row:
            raise ValueError(
                f"the dataset has no column {column!r} (the sub-goal targets, subgoals_column=); its columns: {sorted(row)}"
            )
        subgoals = [] if row[column] is None else row[column]
        where = f"dataset row {index} of the batch, column {column!r}"
        if isinstance(subgoals, str) or not isinstance(subgoals, Sequence):
            raise TypeError(f"{where}: the sub-goals must be a list of strings, got {subgoals!r:.120}")
        answer_forms = {normalize_answer(alias) for alias in aliases}
        for subgoal in subgoals:
            if not isinstance(subgoal, str) or not subgoal.strip():
                raise ValueError(f"{where}: every sub-goal must be a non-empty string, got {subgoal!r:.80}")
            if normalize_answer(subgoal) in answer_forms:
                raise ValueError(
                    f"{where}: the sub-goal {subgoal!r} is the answer itself (target 0): list only the intermediate "
                    f"answers, or its gain would count twice"
                )
        if len({normalize_answer(subgoal) for subgoal in subgoals}) != len(subgoals):
            raise ValueError(f"{where}: repeated sub-goals {list(subgoals)}")
        targets.append([aliases[0], *subgoals])
    return targets


def _probe_outputs(probes: list[list[Any]], targets: Sequence[str | Sequence[str]]) -> dict[str, Any]:
    """The probe keys of a rollout (both TRL paths) from ``probe_log_probs`` of ``targets``: the
    answer's probes, and with a list of targets per row each turn's probes of the row's own targets."""
    if all(isinstance(target, str) for target in targets):
        return {ANSWER_LOGPROB_KEY: probes}
    return {ANSWER_LOGPROB_KEY: [[turn[0] for turn in row] for row in probes], TARGET_LOGPROB_KEY: probes}


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
    target_logprob: Sequence[Sequence[Sequence[float]]] | None = None


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
    return _Rollout(lengths, output.get("env_mask"), output.get(TURN_INDEX_KEY), answer_logprob,
                    output.get(TARGET_LOGPROB_KEY))


def _recording(rollout_func: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """rollout_func as TRL calls it (``rollout_func(prompts, trainer)``), keeping its IGPO fields."""

    @functools.wraps(rollout_func)
    def recording_rollout_func(prompts: list, trainer: IGPOTrainer) -> dict[str, Any]:
        output = rollout_func(prompts, trainer)
        if "completion_ids" in output:  # otherwise TRL names the missing keys itself
            trainer._igpo_rollouts.append(_read_rollout(output))
        return output

    return recording_rollout_func


def _gathered_targets(trainer: Any, rollout: _Rollout, turn_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Sub-goal targets of the whole batch: ``([B, T, K] probe log-probs, [B, K] target mask)``
    gathered over processes (K = the most targets of any completion, T = this process's turn slots,
    the same on every process), or None when the rollout returned no ``igpo_target_logprob``.

    Checks that each completion has one entry per turn, the same K_i >= 1 targets on each turn,
    and the answer's probe first; refuses ``igpo_settings.subgoal_weight > 0`` without targets.
    """
    targets = rollout.target_logprob
    if targets is None:
        if trainer.igpo_settings.subgoal_weight > 0:
            raise ValueError(
                f"igpo_settings.subgoal_weight = {trainer.igpo_settings.subgoal_weight}, but the rollout_func returned no "
                f"{TARGET_LOGPROB_KEY!r} (the probes of each turn's sub-goal targets): pass subgoals_column= to "
                f"make_search_rollout_func, or set subgoal_weight = 0 (the paper's IGPO)"
            )
        return None
    if len(targets) != len(rollout.answer_logprob):
        raise ValueError(f"{TARGET_LOGPROB_KEY} has {len(targets)} entries for {len(rollout.answer_logprob)} completions")
    counts = []
    for row, (turns, answer) in enumerate(zip(targets, rollout.answer_logprob)):
        sizes = {len(turn) for turn in turns}
        if len(turns) != len(answer) or len(sizes) > 1 or 0 in sizes:
            raise ValueError(
                f"{TARGET_LOGPROB_KEY}[{row}] must hold, for each of the completion's {len(answer)} turns, the probes of "
                f"its K >= 1 targets (the same K every turn); got {len(turns)} turns with {sorted(sizes)} targets"
            )
        if [turn[0] for turn in turns] != list(answer):
            raise ValueError(
                f"{TARGET_LOGPROB_KEY}[{row}]: each turn's first target must be the answer, whose probes are "
                f"{ANSWER_LOGPROB_KEY}[{row}] = {list(answer)[:4]}; got {[turn[0] for turn in turns][:4]}"
            )
        counts.append(sizes.pop() if sizes else 1)
    device = trainer.accelerator.device
    num_targets = int(trainer.accelerator.gather(torch.tensor([max(counts, default=1)], device=device)).max())
    values = torch.zeros((len(targets), turn_mask.shape[1], num_targets), dtype=torch.float32)
    for row, turns in enumerate(targets):
        if turns:
            values[row, : len(turns), : counts[row]] = torch.tensor(turns, dtype=torch.float32)
    target_mask = torch.arange(num_targets)[None, :] < torch.tensor(counts, dtype=torch.long)[:, None]
    return trainer.accelerator.gather(values.to(device)), trainer.accelerator.gather(target_mask.to(device))


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


def _check_mode(rollout_func: Any, tool_loop: list[str], probe_options: dict[str, Any]) -> bool:
    """True for TRL's tool loop, False for a rollout_func; refuses neither, both, and tool-loop options
    with a rollout_func (they would do nothing). Checks the tool loop's versions."""
    if rollout_func is None and not tool_loop:
        raise ValueError(
            f"IGPOTrainer needs TRL's tool loop (tools=[...] or environment_factory=...) or a rollout_func that returns "
            f"{ANSWER_LOGPROB_KEY!r} (the probe log-probs of each completion) and 'env_mask'; got neither"
        )
    if rollout_func is not None and tool_loop:
        raise ValueError(
            f"IGPOTrainer takes either a rollout_func or TRL's tool loop, not both: TRL's tool loop ({tool_loop[0]}=...) "
            f"would rewrite the rollout_func's completions after its probes. Run the tools inside rollout_func, or drop it"
        )
    if rollout_func is not None:
        given = [name for name, value in probe_options.items() if value is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} configure the probes of TRL's tool loop; with a rollout_func the rollout function "
                f"scores the probes (make_search_rollout_func(answers_column=..., subgoals_column=..., probe_batch_size=...)): "
                f"drop them here"
            )
        return False
    check_tool_loop_versions(trl.__version__, transformers.__version__)
    return True


def _tool_loop_targets(
    inputs: Sequence[Mapping[str, Any]], answers_column: str, subgoals_column: str | None, settings: IGPOSettings
) -> list[str] | list[list[str]]:
    """Each row's probe targets on TRL's tool loop: the answer (first alias), or with ``subgoals_column``
    the list ``[answer, *sub-goals]``. Checked before TRL generates: conversational prompts (TRL's tool
    loop parses tool calls out of chat messages only), the answers and sub-goals columns."""
    for index, row in enumerate(inputs):
        prompt = row.get("prompt")
        if not (isinstance(prompt, list) and prompt and all(isinstance(message, Mapping) for message in prompt)):
            raise ValueError(
                f"TRL's tool loop needs conversational prompts (a list of chat messages), but the 'prompt' of dataset "
                f"row {index} of the batch is {prompt!r:.120}"
            )
    answers = _row_answers(inputs, answers_column)
    if subgoals_column is None:
        return [aliases[0] for aliases in answers]
    return _row_targets(inputs, answers, subgoals_column, settings)


def _check_tool_loop_subgoals(settings: IGPOSettings, column: str | None) -> None:
    """On TRL's tool loop the trainer probes the targets itself: sub-goals need a weight and a column."""
    _refuse_ignored_subgoals(settings, column)
    if column is None and settings.subgoal_weight > 0:
        raise ValueError(
            f"igpo_settings.subgoal_weight = {settings.subgoal_weight} weighs sub-goal targets, but subgoals_column is "
            f"None, so the tool loop probes the answer alone: pass subgoals_column= (the dataset column of each row's "
            f"sub-goals), or set subgoal_weight = 0 (the paper's IGPO)"
        )


def _tool_owners(tools: Sequence[Any], environments: Sequence[Any] | None) -> list[Any]:
    """The tool functions and environment instances of a batch, each once (bound methods give their instance)."""
    owners = {id(owner): owner for owner in (getattr(tool, "__self__", tool) for tool in tools)}
    owners.update({id(environment): environment for environment in environments or ()})
    return list(owners.values())


class IGPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with IGPO advantages: each completion token gets its turn's advantage.

    Takes every ``GRPOTrainer`` argument (those after ``optimizers`` by keyword), plus
    ``igpo_settings`` (:class:`IGPOSettings` or a mapping; the paper's defaults). The turns and
    their probes come from one of two sources (the package docstring says more):

    * TRL's own tool loop, ``tools=[...]`` and/or ``environment_factory=...``: TRL generates every
      turn with whichever backend it is configured for (transformers, vLLM colocate or server)
      and marks tool-result tokens in its tool mask; each run of 1s is a turn. After TRL has built
      the batch, the probe before every turn is scored on the trainer's own model (never on
      vLLM: the current policy, whatever the backend) with ``score_probes``' kv_cache layout,
      ``probe_batch_size`` completions per forward, the probe text ``probe_template``, and the
      first alias of each row's ``answers_column`` (default ``"answers"``). With
      ``subgoals_column`` (sub-goal targets, docs/algorithm.md section 7.1; needs
      ``igpo_settings.subgoal_weight > 0``) every probe also scores the row's sub-goals (a list
      of strings, or None) in the same forward, checked as :func:`make_search_rollout_func` checks
      them. Needs :data:`SUPPORTED_TRL_TOOL_VERSIONS` and
      :data:`SUPPORTED_TRANSFORMERS_TOOL_VERSIONS`, conversational prompts, and a model with
      ``attn_implementation`` "sdpa" or "eager".
    * a ``rollout_func`` that returns ``igpo_answer_logprob`` (and ``env_mask`` for multi-turn
      completions; ``igpo_target_logprob`` for sub-goal targets), e.g.
      :func:`make_search_rollout_func`. ``answers_column``, ``subgoals_column``,
      ``probe_template`` and ``probe_batch_size`` belong to the rollout function then and are
      refused here.

    Per training batch: R_i = weighted sum of the reward functions; probe log-probs, turn masks
    and R are gathered over processes (probes padded by :func:`igpo_rewards.pad_turns` to
    ``igpo_settings.max_turns``, or the most turns of any process);
    ``igpo_settings.igpo_advantages`` runs on the whole batch with ``group_size=num_generations``
    (row k is in group k // num_generations; with sub-goal targets on [B, T, K] probes, K the most
    targets of any row, and a [B, K] target mask); each process broadcasts its rows' turn advantages
    to their tokens. The result replaces ``advantages`` in the batch TRL trains on ([B_local, C],
    0 on environment tokens and padding). A batch whose every advantage is 0 (it trains nothing)
    emits a :class:`ZeroAdvantageWarning` with the count.

    ``igpo_batch_inputs``: while TRL scores a batch, the dataset rows of this process's slice,
    row i the one of ``prompts[i]``; ``None`` otherwise. TRL hands ``rollout_func`` the prompts
    only; this is how a rollout function reads the other columns (the ground-truth answer its
    probes need: :func:`make_search_rollout_func`).

    Logged: ``igpo/turns_mean`` (mean turns per completion), ``igpo/information_gain_mean``
    (mean IG over non-final turns), ``igpo/zero_advantage_group_fraction`` (the share of groups
    whose turn advantages are all 0: the advantage-collapse rate, as the reference trainer logs it)
    and ``igpo/probe_seconds`` (the probes' wall seconds per generation batch), besides TRL's
    metrics (whose ``advantages`` log column still shows GRPO's scalar advantages).

    Raises:
      RuntimeError: the installed TRL (or, on the tool loop, transformers) is outside the
        supported range; on the tool loop, a tool's retriever failed (``retrieval_errors``,
        :class:`igpo_rewards.agent.tool_calls.ToolErrors`).
      ValueError: neither or both of a ``rollout_func`` and TRL's tool loop; settings that would
        do nothing or change IGPO (named in the message; on the tool loop ``subgoals_column``
        with ``subgoal_weight == 0`` and ``subgoal_weight > 0`` without it); per batch, data
        that do not match (probes per turn, ``max_turns``, unscored completions, a missing
        answers or sub-goals column, a sub-goal that is empty, repeated or the answer itself).
      TypeError: more positional arguments than ``model`` .. ``optimizers``; a setting of the wrong
        type; on the tool loop, a row's sub-goals that are not a list.
    """

    def __init__(
        self,
        *args: Any,
        rollout_func: Callable[..., dict[str, Any]] | None = None,
        igpo_settings: IGPOSettings | Mapping[str, Any] | None = None,
        answers_column: str | None = None,
        subgoals_column: str | None = None,
        probe_template: str | None = None,
        probe_batch_size: int | None = None,
        **kwargs: Any,
    ):
        check_trl_version(trl.__version__)
        if len(args) > len(_POSITIONAL_PARAMETERS):
            raise TypeError(
                f"IGPOTrainer takes at most {len(_POSITIONAL_PARAMETERS)} positional arguments "
                f"({', '.join(_POSITIONAL_PARAMETERS)}); got {len(args)}. Pass the rest by keyword: their "
                f"positions differ between TRL releases"
            )
        tool_loop = [name for name in ("tools", "environment_factory") if kwargs.get(name)]
        probe_options = dict(answers_column=answers_column, subgoals_column=subgoals_column, probe_template=probe_template,
                             probe_batch_size=probe_batch_size)
        self._igpo_tool_mode = _check_mode(rollout_func, tool_loop, probe_options)
        self.igpo_settings = IGPOSettings.from_mapping(igpo_settings)
        if self.igpo_settings.allow_outcome_only:
            raise ValueError(
                "igpo_settings.allow_outcome_only is the verl integration's opt-in (algorithm.igpo.allow_outcome_only); "
                "IGPOTrainer always scores the probes, so it has no meaning here: leave it False"
            )
        self.igpo_batch_inputs: list[dict[str, Any]] | None = None
        self._igpo_rollouts: list[_Rollout] = []
        self._igpo_rewards_per_func: torch.Tensor | None = None
        self._igpo_tool_loop: tuple[list[list[int]], list[list[int]]] | None = None
        if self._igpo_tool_mode:
            self.answers_column = _checks.check_str(
                "answers_column", "answers" if answers_column is None else answers_column, what="a str (a dataset column)"
            )
            if subgoals_column is not None:
                _checks.check_str("subgoals_column", subgoals_column, what="a str (a dataset column) or None")
            self.subgoals_column = subgoals_column
            _check_tool_loop_subgoals(self.igpo_settings, subgoals_column)
            self.probe_template = PROBE_TEMPLATE if probe_template is None else _checks.check_str("probe_template", probe_template)
            self.probe_batch_size = _checks.check_positive_count("probe_batch_size", 32 if probe_batch_size is None else probe_batch_size)
            super().__init__(*args, **kwargs)
            self._check_tool_loop_settings()
        else:
            super().__init__(*args, rollout_func=_recording(rollout_func), **kwargs)

    # The rewards of the whole batch (gathered over processes), for the outcome R_i.
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._igpo_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._igpo_rollouts = []
        self._igpo_rewards_per_func = None
        self._igpo_tool_loop = None
        if self._igpo_tool_mode:
            targets = _tool_loop_targets(inputs, self.answers_column, self.subgoals_column, self.igpo_settings)
        self.igpo_batch_inputs = inputs
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self.igpo_batch_inputs = None
        if self._igpo_tool_mode:
            self._igpo_rollouts.append(self._igpo_tool_rollout(output, targets))
        rewards_seen = self._igpo_rewards_per_func is not None
        if len(self._igpo_rollouts) != 1 or not rewards_seen:
            raise RuntimeError(
                f"IGPOTrainer expects one rollout (a rollout_func call or TRL's tool loop) and one _calculate_rewards "
                f"call per batch; this batch made {len(self._igpo_rollouts)} rollout(s), rewards computed: {rewards_seen}"
            )
        output["advantages"] = self._igpo_token_advantages(output["completion_ids"].shape[1])
        return output

    # --- TRL's tool loop -------------------------------------------------------------------------

    def _check_tool_loop_settings(self) -> None:
        """What the probes and the turn bound need, checked once the model is loaded (not at the first batch)."""
        config = self.model.config
        implementation = getattr(config, "_attn_implementation", None)
        if getattr(self, "_is_vlm", False) or implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"IGPOTrainer scores the probes of TRL's tool loop with igpo_rewards.agent.probes (a text causal LM with "
                f"attn_implementation 'sdpa' or 'eager', custom 4D masks); the model uses {implementation!r}"
                f"{' and is a vision-language model' if getattr(self, '_is_vlm', False) else ''}: load it with "
                f"attn_implementation='sdpa'"
            )
        max_turns = self.igpo_settings.max_turns
        if max_turns is not None and self.max_tool_calling_iterations + 1 > max_turns:
            raise ValueError(
                f"igpo_settings.max_turns = {max_turns} (the most turns a rollout may have), but "
                f"max_tool_calling_iterations = {self.args.max_tool_calling_iterations} lets a rollout have "
                f"{'unbounded' if self.args.max_tool_calling_iterations is None else self.max_tool_calling_iterations + 1} "
                f"turns; set max_tool_calling_iterations = {max_turns - 1}"
            )
        tokenizer = self._tokenizer  # the processing class of a text model (TRL >= 1.14.2)
        if getattr(tokenizer, "response_template", None) == SEARCH_R1_RESPONSE_TEMPLATE:
            stop_ids = {tag: tokenizer.convert_tokens_to_ids(tag) for tag in STOP_TAGS}
            missing = {tag: token for tag, token in stop_ids.items() if token not in self.eos_token_ids}
            if missing:
                raise ValueError(
                    f"the tokenizer parses Search-R1 tool calls, but generation would not stop at {sorted(missing)} "
                    f"(ids {sorted(missing.values())}): TRL stops at {self.eos_token_ids} (the tokenizer's eos and "
                    f"model.generation_config.eos_token_id). igpo_rewards.integrations.trl.use_search_r1_tool_protocol"
                    f"(model, tokenizer) adds them"
                )

    def _tool_call_loop(self, *args: Any, **kwargs: Any) -> Any:
        """TRL's tool loop; keeps each row's tool mask and completion ids as the loop returns them
        (before TRL pads the mask with 1s or ``mask_truncated_completions`` zeroes truncated rows)."""
        result = super()._tool_call_loop(*args, **kwargs)
        self._raise_tool_errors()
        tool_mask, completion_ids = result[0], result[2]  # the same positions in every TRL 1.x
        self._igpo_tool_loop = ([list(mask) for mask in tool_mask], [list(ids) for ids in completion_ids])
        return result

    def _raise_tool_errors(self) -> None:
        """A retriever failure that a tool recorded (TRL turned it into an error message for the model)."""
        for owner in _tool_owners(self.tools, getattr(self, "environments", None)):
            errors = getattr(owner, "retrieval_errors", None)
            if errors is None:
                continue
            count, first = errors.take()
            if count:
                raise RuntimeError(
                    f"the search tool's retriever failed {count} time(s) during this batch's tool loop (TRL passed the "
                    f"error to the model as the tool's result); first error: {first[0]}"
                ) from first[0]

    def _igpo_tool_rollout(self, output: Mapping[str, Any], targets: Sequence[str | Sequence[str]]) -> _Rollout:
        """Turns and probes of the batch TRL's tool loop generated (this process's rows), each row probed
        for its ``targets`` (:func:`_tool_loop_targets`)."""
        if self._igpo_tool_loop is None:
            raise RuntimeError("IGPOTrainer runs on TRL's tool loop, but TRL did not call _tool_call_loop for this batch")
        tool_masks, completion_ids = self._igpo_tool_loop
        prompt_ids = [row[mask.bool()].tolist() for row, mask in zip(output["prompt_ids"], output["prompt_mask"])]
        padded = output["completion_ids"].tolist()  # one copy to the host
        if len(prompt_ids) != len(completion_ids) or any(row[: len(ids)] != ids for row, ids in zip(padded, completion_ids)):
            raise RuntimeError(
                "TRL's batch does not hold the completions its tool loop returned (rows or tokens differ): this TRL "
                f"release is not one IGPOTrainer supports ({SUPPORTED_TRL_TOOL_VERSIONS})"
            )
        turn_starts = turn_starts_from_tool_mask([len(ids) for ids in prompt_ids], tool_masks)
        started = time.perf_counter()
        with generation_model(self) as model:
            probes = probe_log_probs(
                model, self._tokenizer, [p + c for p, c in zip(prompt_ids, completion_ids)], turn_starts, targets,
                batch_size=self.probe_batch_size, layout="kv_cache", template=self.probe_template,
            )
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][PROBE_SECONDS_KEY].append(time.perf_counter() - started)
        fields = _probe_outputs(probes, targets)
        return _Rollout([len(ids) for ids in completion_ids], tool_masks, None, fields[ANSWER_LOGPROB_KEY],
                        fields.get(TARGET_LOGPROB_KEY))

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
        targets = _gathered_targets(self, rollout, turn_mask)  # sub-goal targets: [B, T, K] probes and [B, K] mask
        probes, target_mask = (all_logprob, None) if targets is None else targets
        result = self.igpo_settings.igpo_advantages(
            probes, outcome.to(probes), all_turn_mask, group_size=num_generations, target_mask=target_mask
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
