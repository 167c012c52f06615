"""IGPO's agent-loop manager for both of verl 0.9's trainers: start-up checks, the per-turn rewards
through the legacy reward path, and the failed agent-loop sessions.

``+actor_rollout_ref.rollout.agent.agent_loop_manager_class=igpo_rewards.integrations.verl_manager.IGPOAgentLoopManager``
(both trainers read this key) makes verl build its agent-loop workers from this module:

* **Start-up.** :meth:`IGPOAgentLoopManager.create` runs in verl's trainer process with the whole
  config before any rollout: it refuses every configuration under which the per-turn rewards
  cannot reach the estimator (``igpo_rewards.integrations.verl_checks``), and the training
  data's ``agent_name`` column. Each training batch is checked again before it is dispatched.
* **Legacy trainer** (``trainer.use_v1=False``, ``RayPPOTrainer``): ``AgentLoopWorker._postprocess``
  stacks the padded rows and writes the streaming reward's outcome R at each row's last token;
  it never calls the agent loop's ``as_dict()``. :class:`IGPOAgentLoopWorker` rewrites
  ``rm_scores`` of the rows that carry probes (``extra_fields["igpo_answer_logprob"]``) with
  IGPO's turn rewards (``assemble_igpo_rm_scores``). The legacy worker awaits every session of a
  batch: one failed session stops the run, as in verl.
* **V1 trainer** (the default): the rows already hold the turn rewards (``IGPOAgentLoopOutput.as_dict``
  runs in ``AgentLoopWorkerTQ``). V1 logs a failed session and trains its group with fewer
  rollouts (sync) or evicts and refills the group (async); IGPO's workers count the failed
  sessions, :data:`IGPOReplayBuffer` (``trainer.v1.sampler.custom_sampler``) puts the counts into
  each step's metrics, and :class:`SessionLedger` stops the run past :data:`FAILED_SESSIONS_LIMIT`
  failures in the last :data:`FAILURE_WINDOW` sessions, or at the first session refused for its
  configuration (``IGPOConfigError``).

Validation rows keep verl's layout (R at the last token) in both trainers.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray
from verl.experimental.agent_loop.agent_loop import AgentLoopManager, AgentLoopWorker
from verl.protocol import DataProto
from verl.utils.ray_utils import auto_await

from igpo_rewards.integrations import IGPOSettings
from igpo_rewards.integrations.verl import (
    ANSWER_LOGPROB_KEY,
    assemble_igpo_rm_scores,
    settings_from_config,
)
from igpo_rewards.integrations.verl_checks import (
    check_batch_agent_names,
    check_config,
    check_data_files,
    enforce,
    mark_igpo_worker,
    uses_v1_trainer,
)
from igpo_rewards.integrations.verl_sessions import (
    FAILED_SESSIONS_LIMIT,
    FAILURE_WINDOW,
    SessionFailureError,
    SessionLedger,
)

__all__ = [
    "FAILED_SESSIONS_LIMIT",
    "FAILURE_WINDOW",
    "IGPOAgentLoopManager",
    "IGPOAgentLoopWorker",
    "IGPOReplayBuffer",
    "SessionFailureError",
    "SessionLedger",
    "check_batch_agent_names",
    "start_up_checks",
    "uses_v1_trainer",
    "write_turn_rewards",
]

logger = logging.getLogger(__name__)


def start_up_checks(config: Any) -> None:
    """Every start-up refusal for verl's whole config and its local training data
    (``verl_checks.check_config`` and ``check_data_files``); raises one IGPOConfigError."""
    settings = settings_from_config(config.algorithm)
    enforce(check_config(config) + check_data_files(config), settings, when="at start-up, IGPOAgentLoopManager.create")


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


def IGPOReplayBuffer(**kwargs: Any) -> Any:  # noqa: N802 - the name verl's custom_sampler.name takes
    """verl's V1 replay buffer (``ReplayBuffer`` in sync mode, ``ReplayBufferAsync`` otherwise) whose
    ``sample()`` adds the agent-loop session counts of :class:`SessionLedger` to the step's metrics
    and stops the run past the failure limit. Set with
    ``trainer.v1.sampler.custom_sampler.path=pkg://igpo_rewards.integrations.verl_manager`` and
    ``trainer.v1.sampler.custom_sampler.name=IGPOReplayBuffer``; verl calls it with the
    keyword arguments it passes every custom sampler."""
    from igpo_rewards.integrations._verl_v1 import replay_buffer_class

    return replay_buffer_class(kwargs["trainer_mode"])(**kwargs)


class IGPOAgentLoopWorker(AgentLoopWorker):
    """The legacy trainer's agent-loop worker, with IGPO's turn rewards in ``rm_scores``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        mark_igpo_worker()

    def _postprocess(self, inputs: list[Any], input_non_tensor_batch: dict | None = None, validate: bool = False) -> DataProto:
        output = super()._postprocess(inputs, input_non_tensor_batch=input_non_tensor_batch, validate=validate)
        if not validate:
            settings = settings_from_config(self.config.get("algorithm"))
            write_turn_rewards(output, [item.reward_score for item in inputs], settings)
            skipped = output.non_tensor_batch.get("igpo_probes_skipped")
            if skipped is not None and int(np.sum(skipped)) > 0:
                logger.warning("igpo_tool_agent: %d probes of this batch did not fit the rollout server's context "
                               "(their information gain is 0; column igpo_probes_skipped)", int(np.sum(skipped)))
        return output


class IGPOAgentLoopManager(AgentLoopManager):
    """verl's ``AgentLoopManager`` with :class:`IGPOAgentLoopWorker` workers (legacy trainer);
    under the V1 trainer ``create`` returns the TransferQueue manager of ``_verl_v1``. Both run
    :func:`start_up_checks` first."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.agent_loop_workers_class = ray.remote(IGPOAgentLoopWorker)
        super().__init__(*args, **kwargs)

    @classmethod
    @auto_await
    async def create(cls, *args: Any, **kwargs: Any) -> Any:
        """What both trainers call (like verl's, awaitable or not): ``create(config=...,
        llm_client=..., teacher_client=..., reward_loop_worker_handles=...)``."""
        config = kwargs["config"] if "config" in kwargs else args[0]
        start_up_checks(config)
        if uses_v1_trainer(config):
            from igpo_rewards.integrations._verl_v1 import IGPOAgentLoopManagerTQ

            return await IGPOAgentLoopManagerTQ.create(*args, **kwargs)
        instance = cls(*args, **kwargs)
        await instance._init_agent_loop_workers()
        return instance

    @auto_await
    async def generate_sequences(self, prompts: DataProto) -> DataProto:
        """verl's, after :func:`check_batch_agent_names` on a training batch."""
        if not prompts.meta_info.get("validate", False):
            check_batch_agent_names(prompts.non_tensor_batch.get("agent_name"), self.config)
        return await super().generate_sequences(prompts)
