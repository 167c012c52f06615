"""Carries ``igpo_tool_agent``'s per-turn rewards through both of verl 0.9's trainers' reward paths.

``+actor_rollout_ref.rollout.agent.agent_loop_manager_class=igpo_rewards.integrations.verl_manager.IGPOAgentLoopManager``
(both trainers read this key) makes verl build its agent-loop workers from this module:

* **Legacy trainer** (``trainer.use_v1=False``, ``RayPPOTrainer``): ``AgentLoopWorker._postprocess``
  stacks the padded rows and writes the streaming reward's outcome R at each row's last token;
  it never calls the agent loop's ``as_dict()``. :class:`IGPOAgentLoopWorker` rewrites
  ``rm_scores`` of the rows that carry probes (``extra_fields["igpo_answer_logprob"]``) with
  IGPO's turn rewards (``assemble_igpo_rm_scores``). Without this manager the legacy trainer
  trains outcome-only, and the estimator warns (``OutcomeOnlyWarning``).
* **V1 trainer** (the default): the rows already hold the turn rewards (``IGPOAgentLoopOutput.as_dict``
  runs in ``AgentLoopWorkerTQ``); the manager's TransferQueue workers only keep validation rows
  in verl's layout (R at the last token), because V1 reports the validation score as the row
  sum of ``rm_scores``. It is optional there.

Validation rows keep verl's layout in both trainers.
"""

from __future__ import annotations

from typing import Any

import ray
from omegaconf import OmegaConf
from verl.experimental.agent_loop.agent_loop import AgentLoopManager, AgentLoopWorker
from verl.protocol import DataProto
from verl.utils.ray_utils import auto_await

from igpo_rewards.integrations import IGPOSettings
from igpo_rewards.integrations.verl import ANSWER_LOGPROB_KEY, assemble_igpo_rm_scores, settings_from_config

__all__ = ["IGPOAgentLoopManager", "IGPOAgentLoopWorker", "write_turn_rewards"]


def write_turn_rewards(data: DataProto, outcomes: list[float | None], settings: IGPOSettings) -> list[int]:
    """Rewrites ``data.batch["rm_scores"]`` of the rows that carry probe log-probs with IGPO's
    turn rewards (w_ig * IG at each turn's last token, w_out * R at the last turn's).

    Args:
      data: a batch in verl's layout with ``response_mask``, ``rm_scores`` and the
        ``igpo_answer_logprob`` column (None for rows of other agent loops, left as they are).
      outcomes: [B] outcome reward R of each row (the streaming reward's ``reward_score``).
      settings: IGPO's hyperparameters (kind, ig_weight, outcome_weight, log_prob_floor).

    Returns:
      The rows rewritten (none when the batch has no ``rm_scores`` or no probes).

    Raises:
      ValueError: a row whose probes do not match its turns (``assemble_igpo_rm_scores``).
    """
    probes = data.non_tensor_batch.get(ANSWER_LOGPROB_KEY)
    if "rm_scores" not in data.batch.keys() or probes is None:
        return []
    rows = [row for row, values in enumerate(probes) if values is not None]
    if not rows:
        return []
    missing = [row for row in rows if outcomes[row] is None]
    if missing:
        raise ValueError(f"rows {missing[:5]} carry probes but no outcome reward (reward_score is None)")
    scores = assemble_igpo_rm_scores(data.select_idxs(rows), [float(outcomes[row]) for row in rows], config=settings)
    data.batch["rm_scores"][rows] = scores.to(data.batch["rm_scores"].dtype)
    return rows


class IGPOAgentLoopWorker(AgentLoopWorker):
    """The legacy trainer's agent-loop worker, with IGPO's turn rewards in ``rm_scores``."""

    def _postprocess(self, inputs: list[Any], input_non_tensor_batch: dict | None = None, validate: bool = False) -> DataProto:
        output = super()._postprocess(inputs, input_non_tensor_batch=input_non_tensor_batch, validate=validate)
        if not validate:
            settings = settings_from_config(self.config.get("algorithm"))
            write_turn_rewards(output, [item.reward_score for item in inputs], settings)
        return output


def uses_v1_trainer(config: Any) -> bool:
    """Whether ``config`` runs verl's V1 trainer (``trainer.use_v1``, verl 0.9's default)."""
    return bool(OmegaConf.select(config, "trainer.use_v1", default=False)) if OmegaConf.is_config(config) else False


class IGPOAgentLoopManager(AgentLoopManager):
    """verl's ``AgentLoopManager`` with :class:`IGPOAgentLoopWorker` workers (legacy trainer);
    under the V1 trainer ``create`` returns the TransferQueue manager of ``_verl_v1``."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.agent_loop_workers_class = ray.remote(IGPOAgentLoopWorker)
        super().__init__(*args, **kwargs)

    @classmethod
    @auto_await
    async def create(cls, *args: Any, **kwargs: Any) -> Any:
        """What both trainers call (like verl's, awaitable or not): ``create(config=...,
        llm_client=..., teacher_client=..., reward_loop_worker_handles=...)``."""
        config = kwargs["config"] if "config" in kwargs else args[0]
        if uses_v1_trainer(config):
            from igpo_rewards.integrations._verl_v1 import IGPOAgentLoopManagerTQ

            return await IGPOAgentLoopManagerTQ.create(*args, **kwargs)
        instance = cls(*args, **kwargs)
        await instance._init_agent_loop_workers()
        return instance
