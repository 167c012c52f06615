"""The step's rollouts as one batch of tensors, built once after generation, and their advantages.

``build_batch`` turns the scored ``rollout.QATrajectory`` objects of a step into a
``RolloutBatch``: the right-padded token ids, the turn of every generated token (read from the
turn spans, so it is the loss mask too), each turn's start (where its probe cuts the context),
the turn mask, the group ids, the outcomes and each row's probe suffixes: the answer's, and with
``subgoals`` also one per sub-goal target of the question (``QAExample.subgoals``: the gold
chain's bridge entities), so that the probe forward scores all K targets of every turn at once.
The probe forward, the reference forward and every micro batch of the update take slices of it
(``RolloutBatch.select``); nothing is re-packed from the trajectories afterwards, and everything
lives on the model's device.

Shapes: B rollouts, S the longest trajectory, T the most turns, K the most targets of a row
(the answer + its sub-goals).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from igpo_rewards.agent.probes import SuffixTable, build_probe_suffix, suffix_table, target_table
from igpo_rewards.agent.rollout import token_layout
from igpo_rewards.reference_trainer.rollout import QATrajectory


@dataclass
class RolloutBatch:
    """Everything the step needs about its rollouts (shapes in the module docstring).

    Attributes:
        trajectories: the rollouts (their text, for metrics and case studies).
        input_ids: [B, S] long, right-padded with the tokenizer's pad id.
        lengths: [B] long.
        token_turn: [B, S] long, the turn of each generated token, -1 on prompt, observation and
            padding tokens (``igpo_rewards.broadcast_to_tokens``' index).
        turn_starts: [B, T] long, where each turn starts; 0 at padded turns.
        turn_mask: [B, T] bool.
        group_ids: [B] long, the question of each rollout.
        outcome: [B] float32, the outcome reward.
        suffixes: each row's probe suffix (the first answer alias), or with sub-goals a table of
            K targets per row (``agent.probes.target_table``: the answer, then the sub-goals), or
            ``None`` without probes.
    """

    trajectories: list[QATrajectory]
    input_ids: torch.Tensor
    lengths: torch.Tensor
    token_turn: torch.Tensor
    turn_starts: torch.Tensor
    turn_mask: torch.Tensor
    group_ids: torch.Tensor
    outcome: torch.Tensor
    suffixes: SuffixTable | None = None

    @property
    def target_mask(self) -> torch.Tensor | None:
        """[B, K] bool: which targets each row has (column 0, the answer, always), or None when the
        probes score the answer alone (no sub-goals, or no probes)."""
        if self.suffixes is None or self.suffixes.token_ids.dim() != 3:
            return None
        return self.suffixes.target_mask

    @property
    def loss_mask(self) -> torch.Tensor:
        """[B, S] bool: the generated tokens, the only ones scored and trained on."""
        return self.token_turn >= 0

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """The rows ``rows`` (a micro batch), cut to their own longest trajectory."""
        width = int(self.lengths[rows].max())
        return RolloutBatch(
            trajectories=[self.trajectories[row] for row in rows.tolist()],
            input_ids=self.input_ids[rows, :width],
            lengths=self.lengths[rows],
            token_turn=self.token_turn[rows, :width],
            turn_starts=self.turn_starts[rows],
            turn_mask=self.turn_mask[rows],
            group_ids=self.group_ids[rows],
            outcome=self.outcome[rows],
            suffixes=self.suffixes.rows(rows) if self.suffixes is not None else None,
        )


@dataclass
class Advantages:
    """Advantages of a ``RolloutBatch`` (``training.compute_advantages``). B rollouts, T turns, S tokens.

    Attributes:
        turn: [B, T] advantage of each turn (0 on padded turns).
        token: [B, S] float32, turn j's advantage on turn j's generated tokens, 0 elsewhere.
        information_gain: [B, T] IG of each turn (None without probes); with sub-goal targets the
            weighted sum of the targets' gains.
        rewards: [B, T] turn rewards fed to the normalization (None for GRPO).
        target_gains: [B, T, K] each target's own (unweighted) gain, target 0 the answer, with
            sub-goal targets only (else None).
    """

    turn: torch.Tensor
    token: torch.Tensor
    information_gain: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    target_gains: torch.Tensor | None = None


def probe_targets(examples: Sequence[Any], *, subgoals: bool) -> list[list[str]]:
    """Each question's probe targets: its first answer alias, then (with ``subgoals``) its sub-goal
    targets (``QAExample.subgoals``: the gold chain's bridge entities, in chain order).

    Example:
        >>> from igpo_rewards.reference_trainer.world import QAExample
        >>> example = QAExample("q", ("Oslo",), 3, "world", gold_bridge_answers=("Kelm", "Tovia", "Oslo"))
        >>> probe_targets([example], subgoals=True), probe_targets([example], subgoals=False)
        ([['Oslo', 'Kelm', 'Tovia']], [['Oslo']])
    """
    return [[example.answers[0], *(example.subgoals if subgoals else ())] for example in examples]


def build_batch(
    trajectories: Sequence[QATrajectory], tokenizer: Any, *, probes: bool, subgoals: bool = False,
    device: torch.device | str | None = None,
) -> RolloutBatch:
    """The ``RolloutBatch`` of a step's rollouts. With ``probes`` each row gets the probe suffix of
    its question's first answer alias; with ``subgoals`` too, a ``target_table`` of every row's
    ``probe_targets`` (K = the most targets of a row; a row with fewer has them marked absent).
    Each distinct target string is tokenized once."""
    if not trajectories:
        raise ValueError("trajectories is empty: no rollouts to train on")
    layout = token_layout(trajectories, pad_token_id=tokenizer.pad_token_id or 0, device=device)
    suffixes = None
    if probes:
        targets = probe_targets([trajectory.example for trajectory in trajectories], subgoals=subgoals)
        distinct = {text: build_probe_suffix(tokenizer, text) for row in targets for text in dict.fromkeys(row)}
        if subgoals:
            suffixes = target_table([[distinct[text] for text in row] for row in targets], device=device)
        else:
            suffixes = suffix_table([distinct[row[0]] for row in targets], device=device)
    return RolloutBatch(
        trajectories=list(trajectories),
        input_ids=layout.input_ids,
        lengths=layout.lengths,
        token_turn=layout.token_turn,
        turn_starts=layout.turn_starts,
        turn_mask=layout.turn_mask,
        group_ids=torch.tensor([t.group_id for t in trajectories], dtype=torch.long, device=device),
        outcome=torch.tensor([t.outcome for t in trajectories], dtype=torch.float32, device=device),
        suffixes=suffixes,
    )


def micro_batches(
    rows: torch.Tensor, lengths: torch.Tensor, size: int, *, max_tokens: int = 0, by_length: bool = True
) -> Iterator[torch.Tensor]:
    """``rows`` in micro batches of at most ``size`` rows and, when ``max_tokens`` > 0, at most
    ``max_tokens`` padded tokens (rows x the longest row; a longer row is a micro batch alone).

    ``by_length`` sorts the rows by length first, so rows of similar lengths share a micro batch
    and little is padding (as verl's dynamic batch size does). Neither changes what is computed:
    every forward is per row, and the update weights each micro batch's loss by its share of rows.
    """
    if by_length:
        rows = rows[torch.argsort(lengths[rows], stable=True)]
    chunk: list[int] = []
    longest = 0
    for row, length in zip(rows.tolist(), lengths[rows].tolist()):
        wider = max(longest, length)
        if chunk and (len(chunk) == size or (max_tokens > 0 and (len(chunk) + 1) * wider > max_tokens)):
            yield torch.tensor(chunk, dtype=torch.long, device=rows.device)
            chunk, wider = [], length
        chunk.append(row)
        longest = wider
    if chunk:
        yield torch.tensor(chunk, dtype=torch.long, device=rows.device)
