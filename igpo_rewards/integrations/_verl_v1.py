"""The V1 trainer's half of ``verl_manager.IGPOAgentLoopManager`` (imports the TransferQueue package).

Training rows already hold IGPO's turn rewards (``IGPOAgentLoopOutput.as_dict``); the worker
only keeps validation rows in verl's layout (the outcome at the last token), since V1 scores
validation by the row sum of ``rm_scores``.
"""

from __future__ import annotations

from typing import Any

import ray
from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ, AgentLoopWorkerTQ

from igpo_rewards.integrations.verl_agent_loop import IGPOAgentLoopOutput

__all__ = ["IGPOAgentLoopManagerTQ", "IGPOAgentLoopWorkerTQ"]


class IGPOAgentLoopWorkerTQ(AgentLoopWorkerTQ.__ray_actor_class__):
    """verl's ``AgentLoopWorkerTQ`` (V1) whose validation rows keep verl's outcome-only layout."""

    async def _agent_loop_postprocess(self, output: Any, validate: bool, **kwargs: Any) -> None:
        if validate:
            for item in output if isinstance(output, list) else [output]:
                if isinstance(item, IGPOAgentLoopOutput):
                    item.keep_outcome_only()
        return await super()._agent_loop_postprocess(output, validate, **kwargs)


class IGPOAgentLoopManagerTQ(AgentLoopManagerTQ):
    """verl's ``AgentLoopManagerTQ`` (V1) with :class:`IGPOAgentLoopWorkerTQ` workers."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.agent_loop_workers_class = ray.remote(IGPOAgentLoopWorkerTQ)
