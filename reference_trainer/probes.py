"""The trainer's probe forward over its ``rollout.QATrajectory`` objects (the kernel is
``igpo_rewards.agent.probes``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from igpo_rewards.agent.probes import PackedForward, ProbeSuffix, build_probe_suffix, packed_forward
from igpo_rewards.agent.protocol import PROBE_TEMPLATE


def trajectory_forward(
    model: Any,
    tokenizer: Any,
    trajectories: Sequence[Any],
    *,
    include_probes: bool = True,
    template: str = PROBE_TEMPLATE,
    probe_layout: str = "packed",
    return_entropy: bool = False,
    chunk_size: int = 1024,
) -> PackedForward:
    """``packed_forward`` over ``rollout.QATrajectory`` objects: old log-probs and the probe before every turn.

    The probe answer is the example's first alias ``trajectory.example.answers[0]``; its suffix
    is tokenized once per distinct answer in the batch (the G rollouts of a question share it).
    With ``include_probes=False`` it is a plain padded forward (e.g. for the new log-probs with
    grad, or the reference model's log-probs); ``probe_logprobs`` is then [B, 0, 0].
    ``answer_logprob`` ([B, T], T = the batch's max turns) lines up with the turn mask built from
    ``len(trajectory.turn_spans)``.
    """
    if len(trajectories) == 0:
        raise ValueError("trajectories is empty")
    token_ids = [trajectory.token_ids for trajectory in trajectories]
    if not include_probes:
        return packed_forward(
            model, token_ids, pad_token_id=tokenizer.pad_token_id, return_entropy=return_entropy, chunk_size=chunk_size
        )
    cache: dict[str, ProbeSuffix] = {}
    suffixes = []
    for index, trajectory in enumerate(trajectories):
        if not trajectory.example.answers:
            raise ValueError(f"trajectories[{index}].example has no answers to probe")
        answer = trajectory.example.answers[0]
        if answer not in cache:
            cache[answer] = build_probe_suffix(tokenizer, answer, template=template)
        suffixes.append(cache[answer])
    return packed_forward(
        model,
        token_ids,
        [trajectory.turn_starts for trajectory in trajectories],
        suffixes,
        probe_layout=probe_layout,
        pad_token_id=tokenizer.pad_token_id,
        return_entropy=return_entropy,
        chunk_size=chunk_size,
    )
