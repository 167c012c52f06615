"""The methods ``igpo-train experiment`` compares: a registry of named switches over one base config.

A method is ``rl.algorithm`` plus the ``rl.igpo`` (``IGPOSettings``) values that define it; every
other setting is the experiment's base config, the same for every method. ``BASELINE`` (GRPO) is
the method every other one is compared with, question by question (``paired``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

METHODS: dict[str, dict[str, Any]] = {
    "igpo": {"algorithm": "igpo"},
    "grpo": {"algorithm": "grpo"},
    "igpo_no_ig": {"algorithm": "igpo", "ig_weight": 0.0},
    "igpo_no_outcome": {"algorithm": "igpo", "outcome_weight": 0.0},
    "igpo_subgoals": {"algorithm": "igpo", "subgoal_weight": 1.0, "subgoal_potential": "running_max"},
    "igpo_subgoals_probe": {"algorithm": "igpo", "subgoal_weight": 1.0, "subgoal_potential": "probe"},
    "igpo_turn_index": {"algorithm": "igpo", "mode": "turn_index"},
    "igpo_a2tgpo": {"algorithm": "igpo", "mode": "turn_index", "accumulation": "sqrt_n", "ig_advantage_scale": 0.3},
    "igpo_subgoals_a2tgpo": {"algorithm": "igpo", "subgoal_weight": 1.0, "subgoal_potential": "running_max",
                             "mode": "turn_index", "accumulation": "sqrt_n", "ig_advantage_scale": 0.3},
    "igpo_positive": {"algorithm": "igpo", "gain_clip": "positive"},
}
"""Method name -> what defines it: ``rl.algorithm`` and the ``rl.igpo`` (``IGPOSettings``) values
it sets; everything else is the base config's (a base ``--rl.igpo.*`` value applies to every
method unless the method sets that field). docs/trainer.md describes each."""

DEFAULT_METHODS = ("grpo", "igpo", "igpo_subgoals")
"""The methods of ``igpo-train experiment`` without ``--methods``: the baseline, the paper, and the
paper with sub-goal targets."""

BASELINE = "grpo"
"""The method every other one is compared with, question by question."""


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """``methods`` as a tuple, checked: known (``METHODS``), no repeats, and the baseline among them.

    Raises:
        ValueError: an unknown or repeated name, or no ``BASELINE`` (the message lists the registry).
    """
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise ValueError(f"methods must be a non-empty sequence of method names, got {methods!r}")
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown method(s) {unknown}; the methods are {', '.join(METHODS)}")
    repeated = sorted({method for method in methods if list(methods).count(method) > 1})
    if repeated:
        raise ValueError(f"methods: {repeated} given more than once, got {list(methods)}")
    if BASELINE not in methods:
        raise ValueError(f"methods must include {BASELINE!r}, the baseline of the paired differences, got {list(methods)}")
    return tuple(methods)
