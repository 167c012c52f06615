"""The agent-loop sessions' outcomes in verl's trainer process: how many ended, failed, or skipped
probes, and the failure limit that stops a run (``SessionLedger``).

IGPO's V1 workers report each batch's sessions (``igpo_rewards.integrations._verl_v1``); the
replay buffer ``verl_manager.IGPOReplayBuffer`` puts the counts into each step's metrics.
docs/integrations/verl.md ("Failed agent-loop sessions") explains the limit.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping
from typing import Any

from igpo_rewards.integrations.verl import IGPOConfigError

__all__ = ["FAILED_SESSIONS_LIMIT", "FAILURE_WINDOW", "SessionFailureError", "SessionLedger"]

FAILURE_WINDOW = 256
"""How many of the most recent agent-loop sessions the failure limit looks at."""
FAILED_SESSIONS_LIMIT = 12
"""The most failed sessions allowed among the last :data:`FAILURE_WINDOW` (about 5 %): one more stops the run."""


class SessionFailureError(RuntimeError):
    """More agent-loop sessions failed than :data:`FAILED_SESSIONS_LIMIT` allows."""


class SessionLedger:
    """The agent-loop sessions' outcomes as the workers report them (in the trainer process).

    :meth:`add` takes a worker's report and raises once the last ``window`` sessions hold more
    than ``limit`` failures (:class:`SessionFailureError`), or at once for a session refused for
    its configuration (``IGPOConfigError``: every session would fail the same way). :meth:`metrics`
    returns what was counted since its last call, as a training step's metrics:
    ``training/igpo/sessions`` (sessions that ended, failed or not), ``training/igpo/failed_sessions``
    and ``training/igpo/probes_skipped`` (probes past the server's context, see ``verl_agent_loop``).

    Example:
      >>> ledger = SessionLedger(window=4, limit=1)
      >>> ledger.add({"failed": [False, True, False], "errors": ["ValueError: x"], "probes_skipped": 2})
      >>> ledger.metrics()
      {'training/igpo/sessions': 3, 'training/igpo/failed_sessions': 1, 'training/igpo/probes_skipped': 2}
      >>> ledger.add({"failed": [True], "errors": ["ValueError: y"]})  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      igpo_rewards.integrations.verl_sessions.SessionFailureError: 2 of the last 4 agent-loop sessions failed ...
    """

    def __init__(self, *, window: int = FAILURE_WINDOW, limit: int = FAILED_SESSIONS_LIMIT):
        self.window, self.limit = window, limit
        self.recent: deque[bool] = deque(maxlen=window)
        self.errors: deque[str] = deque(maxlen=3)
        self.counts: Counter = Counter()

    def add(self, report: Mapping[str, Any]) -> None:
        failed = [bool(value) for value in report.get("failed", [])]
        self.recent.extend(failed)
        self.errors.extend(report.get("errors", []))
        self.counts["sessions"] += len(failed)
        self.counts["failed_sessions"] += sum(failed)
        self.counts["probes_skipped"] += int(report.get("probes_skipped", 0))
        if report.get("config_errors"):
            raise IGPOConfigError(f"an igpo_tool_agent session was refused for its configuration (every session "
                                  f"would be): {report['config_errors'][0]}")
        if sum(self.recent) > self.limit:
            raise SessionFailureError(
                f"{sum(self.recent)} of the last {len(self.recent)} agent-loop sessions failed (IGPO allows at most "
                f"{self.limit} of the last {self.window}); the last errors: {list(self.errors)}")

    def metrics(self) -> dict[str, int]:
        names = ("sessions", "failed_sessions", "probes_skipped")
        metrics = {f"training/igpo/{name}": int(self.counts[name]) for name in names}
        self.counts.clear()
        return metrics
