"""IGPO for TRL: ``IGPOTrainer``, a ``GRPOTrainer`` whose advantages are IGPO's per-turn advantages.

TRL has no advantage hook; this trainer lets ``GRPOTrainer._generate_and_score_completions``
run unchanged (rollouts, reward functions, reference/old log-probs, logging) and then replaces
its one-scalar-per-completion ``advantages`` [B] with per-token IGPO advantages [B, C]
(C completion tokens), which TRL's loss accepts as they are.

What the ``rollout_func`` must return per completion, besides TRL's ``prompt_ids``,
``completion_ids`` and ``logprobs``:

* ``igpo_answer_logprob``: the n_i probe log-probs m_{i,0..n_i-1}, probe j taken right before
  turn j (:func:`igpo_rewards.answer_logprob` of the ground-truth answer tokens);
* ``env_mask`` (TRL's own key): 1 on tokens the model generated, 0 on tool/observation tokens
  inside the completion. Each maximal run of 1s is one turn, so a completion needs exactly
  n_i runs. Without ``env_mask`` the whole completion is one turn;
* optionally ``igpo_turn_index``: the turn (0, 1, ...) of every completion token, -1 for none,
  when turns are not the runs of ``env_mask`` (e.g. two turns with no observation between).

The outcome reward R_i is the weighted sum of the trainer's reward functions (what GRPO
normalizes). Groups are TRL's: row k of the batch gathered over processes belongs to group
k // num_generations, so a group may span processes; the per-turn data of all processes is
gathered, normalized together and each process keeps its own rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from trl import GRPOTrainer

import igpo_rewards
from igpo_rewards.integrations import IGPOSettings

__all__ = ["ANSWER_LOGPROB_KEY", "TURN_INDEX_KEY", "IGPOTrainer", "token_turn_index"]

ANSWER_LOGPROB_KEY = "igpo_answer_logprob"
"""rollout_func output key: per completion, the list of its n_i probe log-probs."""
TURN_INDEX_KEY = "igpo_turn_index"
"""Optional rollout_func output key: per completion, the turn of each completion token (-1: none)."""


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


class IGPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with IGPO advantages: each completion token gets its turn's advantage.

    Takes every ``GRPOTrainer`` argument, plus ``igpo_settings`` (:class:`IGPOSettings` or a
    mapping; the paper's defaults). A ``rollout_func`` that returns ``igpo_answer_logprob``
    (and ``env_mask`` for multi-turn completions) is required; see the module docstring.

    Per training batch: R_i = weighted sum of the reward functions; probe log-probs, turn masks
    and R are gathered over processes; :func:`igpo_rewards.igpo_advantages` runs on the whole
    batch with ``group_size=num_generations`` (row k is in group k // num_generations); each
    process broadcasts its rows' turn advantages to their tokens. The result replaces
    ``advantages`` in the batch TRL trains on ([B_local, C], 0 on environment tokens and padding).

    Logged: ``igpo/turns_mean`` (mean turns per completion) and ``igpo/information_gain_mean``
    (mean IG over non-final turns), besides TRL's metrics (whose ``advantages`` log column
    still shows GRPO's scalar advantages).
    """

    def __init__(self, *args: Any, igpo_settings: IGPOSettings | Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.rollout_func is None:
            raise ValueError(
                f"IGPOTrainer needs a rollout_func that returns {ANSWER_LOGPROB_KEY!r} (the probe log-probs of each "
                f"completion) and 'env_mask'; got rollout_func=None"
            )
        self.igpo_settings = IGPOSettings.from_mapping(igpo_settings)
        self._igpo_rollouts: dict[str, Any] | None = None
        self._igpo_rewards_per_func: torch.Tensor | None = None

    # GRPOTrainer._generate pops env_mask from the rollout_func output; keep what IGPO needs.
    def _generate(self, prompts: list):
        result = super()._generate(prompts)
        if len(result) != 8:
            raise RuntimeError(
                f"IGPOTrainer supports trl 1.x, whose GRPOTrainer._generate returns 8 values; got {len(result)}"
            )
        _, completion_ids, tool_mask, _, _, extra_fields, _, _ = result
        if ANSWER_LOGPROB_KEY not in extra_fields:
            raise ValueError(
                f"rollout_func must return {ANSWER_LOGPROB_KEY!r}: per completion the list of its probe log-probs "
                f"(one per turn); it returned {sorted(extra_fields)}"
            )
        self._igpo_rollouts = {
            "completion_lengths": [len(ids) for ids in completion_ids],
            "env_mask": tool_mask,
            "turn_index": extra_fields.get(TURN_INDEX_KEY),
            "answer_logprob": extra_fields[ANSWER_LOGPROB_KEY],
        }
        return result

    # The rewards of the whole batch (gathered over processes), for the outcome R_i.
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._igpo_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._igpo_rollouts = None
        self._igpo_rewards_per_func = None
        output = super()._generate_and_score_completions(inputs)
        output["advantages"] = self._igpo_token_advantages(output["completion_ids"].shape[1])
        return output

    def _igpo_token_advantages(self, num_tokens: int) -> torch.Tensor:
        rollouts, rewards_per_func = self._igpo_rollouts, self._igpo_rewards_per_func
        if rollouts is None or rewards_per_func is None:
            raise RuntimeError("IGPOTrainer: the rollouts or rewards of this batch were not recorded")
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        settings = self.igpo_settings

        # Local per-turn data: probe log-probs [B_local, T] and the turn mask.
        probes = [np.asarray(row, dtype=np.float64).reshape(-1) for row in rollouts["answer_logprob"]]
        local_rows = len(rollouts["completion_lengths"])
        if len(probes) != local_rows:
            raise ValueError(f"{ANSWER_LOGPROB_KEY} has {len(probes)} entries for {local_rows} completions")
        turn_index = token_turn_index(
            rollouts["completion_lengths"], rollouts["env_mask"], rollouts["turn_index"], num_tokens
        )
        turns = (turn_index.max(dim=1).values + 1).tolist()
        counts = [row.size for row in probes]
        mismatched = [row for row in range(local_rows) if counts[row] != turns[row]]
        if mismatched:
            shown = mismatched[:5]
            raise ValueError(
                f"each completion needs one probe log-prob per turn: completions {shown} have "
                f"{[counts[row] for row in shown]} values in {ANSWER_LOGPROB_KEY!r} but "
                f"{[turns[row] for row in shown]} turns (runs of 1s in env_mask)"
            )
        local_max = max(counts, default=0)
        widest = int(self.accelerator.gather(torch.tensor([local_max], device=device)).max())
        num_turns = widest if settings.max_turns is None else settings.max_turns
        if widest > num_turns:
            raise ValueError(f"a completion has {widest} turns but igpo_settings.max_turns = {num_turns}")
        answer_logprob = torch.zeros(local_rows, num_turns, dtype=torch.float32)
        turn_mask = torch.zeros(local_rows, num_turns, dtype=torch.bool)
        for row, values in enumerate(probes):
            answer_logprob[row, : values.size] = torch.from_numpy(values).float()
            turn_mask[row, : values.size] = True

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

        gain = result.information_gain
        last_turn = all_turn_mask.sum(dim=1, keepdim=True) - 1
        non_final = all_turn_mask & (torch.arange(num_turns, device=gain.device)[None, :] < last_turn)
        self._metrics[mode]["igpo/turns_mean"].append(all_turn_mask.sum(dim=1).float().mean().item())
        self._metrics[mode]["igpo/information_gain_mean"].append(
            gain[non_final].float().mean().item() if bool(non_final.any()) else 0.0
        )

        start = self.accelerator.process_index * local_rows
        local_advantages = result.advantages[start : start + local_rows]
        return igpo_rewards.broadcast_to_tokens(
            local_advantages, turn_index.to(local_advantages.device), turn_mask=turn_mask.to(local_advantages.device)
        )
