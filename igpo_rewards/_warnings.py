"""The warnings igpo_rewards raises (all subclasses of ``UserWarning``, exported at the top level)."""

from __future__ import annotations

__all__ = ["SingleRolloutGroupWarning"]


class SingleRolloutGroupWarning(UserWarning):
    """Every group of a batch holds a single rollout (``group_size=1``, or every group id unique).

    A group of one has no peers to be compared with: GRPO's advantages are all 0, IGPO's too for
    one-turn rollouts, and a multi-turn rollout is only compared with its own turns. Usually a
    slip (TRL's ``num_generations=1``, verl's ``rollout.n=1``, or per-rollout ids passed as group
    ids). Silence it with ``warnings.filterwarnings("ignore", category=SingleRolloutGroupWarning)``
    when it is meant.
    """
