"""Adapters that run IGPO inside distributed RL engines; each translates layouts and calls igpo_rewards.

- :mod:`igpo_rewards.integrations.verl`: the advantage estimator ``"igpo"`` for verl (>= 0.9 loads it
  through the ``verl.plugins`` entry point), the helpers that write turn rewards into
  ``rm_scores``, and the outcome reward function ``compute_score``. Needs the ``verl`` extra
  (``pip install "igpo-rewards[verl] @ git+$IGPO_GIT"``, README "Install").
- :mod:`igpo_rewards.integrations.verl_agent_loop`: verl's agent loop ``"igpo_tool_agent"`` (the
  tool agent loop plus the probe before every turn); :mod:`igpo_rewards.integrations.verl_actor`
  scores those probes in the actor's old-log-prob pass (actor mode, verl 0.9.1; else the rollout
  server scores them);
  :mod:`igpo_rewards.integrations.verl_manager` (the agent-loop manager both trainers need) runs
  the start-up checks of :mod:`igpo_rewards.integrations.verl_checks`, carries the turn rewards
  through the legacy trainer and counts failed agent-loop sessions;
  :mod:`igpo_rewards.integrations.verl_search` is a Search-R1 ``/retrieve`` search tool.
- :mod:`igpo_rewards.integrations.trl` (a package: ``trainer``, ``tools`` and ``search``, imported
  in that order): ``IGPOTrainer``, a TRL ``GRPOTrainer`` whose advantages are IGPO's per-turn
  advantages, on TRL's own tool loop (``tools=`` / ``environment_factory=``, any generation
  backend; ``use_search_r1_tool_protocol`` and the search tool of :mod:`igpo_rewards.agent.tool_calls`)
  or on a rollout function: the Search-R1 ``rollout_func`` with retrieval and probes,
  ``make_search_rollout_func``. ``make_outcome_reward_func`` is the reward function of both.
  Needs the ``trl`` extra (``pip install "igpo-rewards[trl] @ git+$IGPO_GIT"``; the tool loop:
  ``pip install "igpo-rewards[trl-tools] @ git+$IGPO_GIT"``).

This package imports neither torch, verl nor trl; each adapter module imports its engine when it
is imported itself. :class:`IGPOSettings` (defined in :mod:`igpo_rewards.settings`, also
``igpo_rewards.IGPOSettings``) holds the hyperparameters both adapters share.
"""

from __future__ import annotations

from igpo_rewards.settings import IGPOSettings

__all__ = ["IGPOSettings"]
