"""The V1 trainer's half of ``verl_manager`` (imports the TransferQueue package).

Training rows already hold IGPO's turn rewards (``IGPOAgentLoopOutput.as_dict``). The worker keeps
validation rows in verl's layout (the outcome at the last token, since V1 scores validation by
the row sum of ``rm_scores``) and counts its agent-loop sessions: V1 only logs a failed session
(its group trains with fewer rollouts in sync mode, and is evicted and refilled in the async
modes). The manager collects the counts into a ``SessionLedger`` whenever it dispatches a batch
and whenever IGPO's replay buffer samples one, so a run past the failure limit stops in the
trainer process, and each step's metrics hold the counts.
"""

from __future__ import annotations

import weakref
from typing import Any

import ray
from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ, AgentLoopWorkerTQ
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

from igpo_rewards.integrations.verl import IGPOConfigError
from igpo_rewards.integrations.verl_agent_loop import PROBES_SKIPPED_KEY, IGPOAgentLoopOutput
from igpo_rewards.integrations.verl_checks import check_batch_agent_names, mark_igpo_worker
from igpo_rewards.integrations.verl_sessions import SessionLedger

__all__ = ["IGPOAgentLoopManagerTQ", "IGPOAgentLoopWorkerTQ", "active_manager", "agent_names", "replay_buffer_class"]

_active_manager: weakref.ref | None = None


class IGPOAgentLoopWorkerTQ(AgentLoopWorkerTQ.__ray_actor_class__):
    """verl's ``AgentLoopWorkerTQ`` (V1) that counts its sessions (:meth:`igpo_session_report`)
    and stores validation rows in verl's outcome-only layout."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        mark_igpo_worker()
        self._igpo_report = _empty_report()

    async def _run_agent_loop(self, *args: Any, **kwargs: Any) -> Any:
        try:
            result = await super()._run_agent_loop(*args, **kwargs)
        except Exception as error:
            report = self._igpo_report
            report["failed"].append(True)
            report["errors"] = (report["errors"] + [f"{type(error).__name__}: {error}"])[-3:]
            if isinstance(error, IGPOConfigError):
                report["config_errors"].append(str(error))
            raise
        self._igpo_report["failed"].append(False)
        return result

    async def _agent_loop_postprocess(self, output: Any, validate: bool, **kwargs: Any) -> None:
        outputs = output if isinstance(output, list) else [output]
        for item in outputs:
            if validate and isinstance(item, IGPOAgentLoopOutput):
                item.keep_outcome_only()
            if not validate:
                self._igpo_report["probes_skipped"] += int(item.extra_fields.get(PROBES_SKIPPED_KEY, 0))
        return await super()._agent_loop_postprocess(output, validate, **kwargs)

    async def igpo_session_report(self) -> dict[str, Any]:
        """The sessions finished since the last call (``failed``: one bool each, in order), the
        last errors, the configuration errors and the skipped probes; resets them."""
        report, self._igpo_report = self._igpo_report, _empty_report()
        return report


def _empty_report() -> dict[str, Any]:
    return {"failed": [], "errors": [], "config_errors": [], "probes_skipped": 0}


def agent_names(batch: Any) -> list[Any] | None:
    """The ``agent_name`` column of a V1 prompt batch (a TensorDict; NonTensorStack or NonTensorData), or None."""
    if "agent_name" not in batch.keys():
        return None
    column = batch.get("agent_name")
    if hasattr(column, "tolist"):
        return list(column.tolist())
    return [column.data] * len(batch)


class IGPOAgentLoopManagerTQ(AgentLoopManagerTQ):
    """verl's ``AgentLoopManagerTQ`` (V1) with :class:`IGPOAgentLoopWorkerTQ` workers, the
    ``agent_name`` check before each training batch is dispatched, and the session ledger."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.agent_loop_workers_class = ray.remote(IGPOAgentLoopWorkerTQ)
        self.sessions = SessionLedger()
        global _active_manager
        _active_manager = weakref.ref(self)

    def generate_sequences(self, prompts: Any) -> None:
        """verl's dispatch, after :func:`check_batch_agent_names` on a training batch and the
        session reports so far (which raise past the failure limit)."""
        if not (prompts["validate"] if "validate" in prompts.keys() else False):
            check_batch_agent_names(agent_names(prompts), self.config)
        self.collect_session_reports()
        return super().generate_sequences(prompts)

    def collect_session_reports(self) -> None:
        """Adds every worker's report to :attr:`sessions` (raises past the limit)."""
        workers = getattr(self, "agent_loop_workers", [])
        for report in ray.get([worker.igpo_session_report.remote() for worker in workers]) if workers else []:
            self.sessions.add(report)


def active_manager() -> IGPOAgentLoopManagerTQ:
    """The V1 manager of this (the trainer's) process; IGPO's replay buffer reads its ledger."""
    manager = _active_manager() if _active_manager is not None else None
    if manager is None:
        from igpo_rewards.integrations.verl import MANAGER_CLASS

        raise IGPOConfigError(
            "trainer.v1.sampler.custom_sampler is IGPO's replay buffer, but no IGPO agent-loop manager runs in this "
            f"process: set +actor_rollout_ref.rollout.agent.agent_loop_manager_class={MANAGER_CLASS}")
    return manager


class _SessionMetrics:
    """``sample()`` of verl's replay buffer, then the session reports into the training step's metrics."""

    def sample(self, global_steps: int, partition_id: str, batch_size: int) -> tuple[Any, dict]:
        batch, metrics = super().sample(global_steps=global_steps, partition_id=partition_id, batch_size=batch_size)
        manager = active_manager()
        manager.collect_session_reports()
        if partition_id == "train":
            metrics.update(manager.sessions.metrics())
        return batch, metrics


class IGPOReplayBufferSync(_SessionMetrics, ReplayBuffer):
    """verl's sync-mode ``ReplayBuffer`` with IGPO's session metrics."""


class IGPOReplayBufferAsync(_SessionMetrics, ReplayBufferAsync):
    """verl's ``ReplayBufferAsync`` (colocate_async, separate_async) with IGPO's session metrics."""


def replay_buffer_class(trainer_mode: str) -> type:
    """The replay buffer verl would build for ``trainer_mode`` (``trainer.v1.trainer_mode``), with IGPO's metrics."""
    return IGPOReplayBufferSync if trainer_mode == "sync" else IGPOReplayBufferAsync
