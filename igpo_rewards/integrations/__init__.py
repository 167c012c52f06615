"""Adapters that run IGPO inside distributed RL engines; each translates layouts and calls igpo_rewards.

- :mod:`igpo_rewards.integrations.verl`: the advantage estimator ``"igpo"`` for verl (>= 0.9 loads it
  through the ``verl.plugins`` entry point), the helpers that write turn rewards into
  ``rm_scores``, and the outcome reward function ``compute_score``. Needs the ``verl`` extra
  (``pip install "igpo-rewards[verl] @ git+$IGPO_GIT"``, README "Install").
- :mod:`igpo_rewards.integrations.verl_agent_loop`: verl's agent loop ``"igpo_tool_agent"`` (the
  tool agent loop plus the probe before every turn, scored by the rollout server);
  :mod:`igpo_rewards.integrations.verl_manager` carries its turn rewards through the legacy
  trainer; :mod:`igpo_rewards.integrations.verl_search` is a Search-R1 ``/retrieve`` search tool.
- :mod:`igpo_rewards.integrations.trl` (a package: ``trainer`` and ``search``, imported in that
  order): ``IGPOTrainer``, a TRL ``GRPOTrainer`` whose advantages are IGPO's per-turn advantages,
  the Search-R1 ``rollout_func`` with retrieval and probes, ``make_search_rollout_func``, and its
  reward function ``make_outcome_reward_func``. Needs the ``trl`` extra
  (``pip install "igpo-rewards[trl] @ git+$IGPO_GIT"``).

This package imports neither torch, verl nor trl; each adapter module imports its engine when it
is imported itself. :class:`IGPOSettings` (defined in :mod:`igpo_rewards.settings`, also
``igpo_rewards.IGPOSettings``) holds the hyperparameters both adapters share.
"""

from __future__ import annotations

from igpo_rewards.settings import IGPOSettings

__all__ = ["IGPOSettings"]
