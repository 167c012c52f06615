"""The probes of both TRL paths: the trainer's model as TRL unwraps it for generation, and the
library's probe kernel (``igpo_rewards.agent.probes.score_probes``) over it in chunks.

Both ``IGPOTrainer`` on TRL's tool loop and the Search-R1 ``rollout_func`` score their probes
through :func:`probe_log_probs`, so both run the same kernel with the same settings.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from trl.models.utils import unwrap_model_for_generation

from igpo_rewards.agent.probes import score_probes
from igpo_rewards.agent.protocol import PROBE_TEMPLATE


@contextlib.contextmanager
def generation_model(trainer: Any) -> Iterator[Any]:
    """The trainer's model unwrapped as TRL unwraps it for generation, in eval mode, without gradients.

    Eval mode also matters for the kv_cache probes: in train mode with gradient checkpointing,
    transformers turns ``use_cache`` off and the probe pass would find no cache.
    """
    kwargs = {"gather_deepspeed3_params": trainer.args.ds3_gather_for_generation}
    if "gradient_checkpointing_kwargs" in inspect.signature(unwrap_model_for_generation).parameters:  # TRL >= 1.16
        kwargs["gradient_checkpointing_kwargs"] = trainer.args.gradient_checkpointing_kwargs
    with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator, **kwargs) as model:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                yield model
        finally:
            model.train(was_training)


def probe_log_probs(
    model: Any,
    tokenizer: Any,
    token_ids: Sequence[Sequence[int]],
    turn_starts: Sequence[Sequence[int]],
    answers: Sequence[str | Sequence[str]],
    *,
    batch_size: int,
    layout: str,
    template: str = PROBE_TEMPLATE,
) -> list[list[Any]]:
    """The n_b probe log-probs of every trajectory b (n_b = ``len(turn_starts[b])``), ``batch_size``
    trajectories per ``score_probes`` forward. With a list of K_b targets per trajectory (answer
    first), each turn's entry is the list of its K_b target log-probs (``score_probes`` [B, T, K],
    trimmed to the trajectory's own targets: a forward pads every row to its longest list)."""
    values: list[list[Any]] = []
    for first in range(0, len(token_ids), batch_size):
        part = slice(first, first + batch_size)
        scores = score_probes(
            model, tokenizer, token_ids[part], turn_starts[part], answers[part], template=template, probe_layout=layout
        ).cpu()
        for row, (starts, targets) in enumerate(zip(turn_starts[part], answers[part])):
            row_scores = scores[row, : len(starts)] if isinstance(targets, str) else scores[row, : len(starts), : len(targets)]
            values.append(row_scores.tolist())
    return values
