"""Reward sparsity and probe signal of a policy, measured like RL step 0 (``igpo-train diagnose``).

IGPO's dense turn rewards matter where outcome rewards are sparse: when all G rollouts of a
question get the same outcome, GRPO's advantages are zero for the whole group, while IGPO
still rewards the turns that moved the probe's belief in the answer. ``measure_signal``
samples the rollouts that the first RL steps would sample (the same questions, G rollouts
each, temperature 1), runs the probes and reports:

- ``outcome_zero_variance_fraction``: ``igpo_rewards.zero_variance_group_fraction`` of the
  outcomes (overall and by hop count), split by ``outcome_groups`` into all wrong / all right /
  equal partial F1, and the groups where every rollout failed but not in the same way;
- ``information_gain``: the answer probe's information gain of the non-final turns, split by what the
  turn's search returned (``observation_labels``): ``answer_document_first`` (for the first
  time, the document the gold chain reads the answer from), ``answer_document_again`` (that
  document once more), ``answer_mentioned_elsewhere`` (only other documents that happen to
  mention an answer alias, e.g. a person born in the answer city) and ``answer_not_retrieved``;
  count, mean, std and share above ``ig_threshold`` of each, overall and by hop count. If the
  probes carry signal, the first group's mean is clearly positive and the last one's near 0;
- ``turn_advantage_collapse_rate``: groups whose IGPO turn advantages are all exactly zero;
- ``subgoal_signal`` (when the questions have gold chains of 2 hops or more): the probes of the
  sub-goal targets (``QAExample.subgoals``, the bridge entities), scored in one K-target probe
  forward, and the gain of each bridge's probe on the non-final turns split by what the turn's
  search newly retrieved along the gold chain (``SUBGOAL_GROUPS``: that bridge's own document,
  the answer's document, another bridge's document, nothing new), with the raw probe and with
  the running-max potential; plus the answer probe's gain on turns that newly retrieved a bridge
  document (what IGPO's answer-only probe pays for progress along a chain).

Nothing here changes the policy or the global RNGs' use by training: it runs under its own
``torch`` seed and restores the previous RNG state when it returns.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

import igpo_rewards
from igpo_rewards.reference_trainer.batch import build_batch
from igpo_rewards.reference_trainer.config import RLConfig
from igpo_rewards.reference_trainer.metrics import zero_advantage_group_fraction
from igpo_rewards.reference_trainer.rollout import QATrajectory, rollout_examples
from igpo_rewards.reference_trainer.training import compute_advantages, examples_for_step, score_batch

IG_GROUPS = ("answer_document_first", "answer_document_again", "answer_mentioned_elsewhere", "answer_not_retrieved")
"""How ``measure_signal`` splits the non-final turns by what their search returned."""

SUBGOAL_GROUPS = ("own_document_first", "answer_document_first", "other_bridge_document_first", "nothing_new")
"""How ``measure_signal`` splits a bridge probe's gains by what the turn's search newly retrieved (``chain_group``)."""

POTENTIALS = ("probe", "running_max")
"""The sub-goal potentials ``measure_signal`` compares."""


def _mentions(text: str, aliases: Sequence[str]) -> bool:
    return any(re.search(r"(?<!\w)" + re.escape(alias) + r"(?!\w)", text, re.IGNORECASE) for alias in aliases if alias.strip())


def observation_labels(trajectory: QATrajectory, retriever: Any, topk: int) -> list[str]:
    """One label per observation of ``trajectory`` (observation j follows turn j's search):

    - ``"answer_document"``: the search returned the document the gold chain reads the answer
      from (the one titled ``example.gold_queries[-1]``; questions without a gold chain never
      get this label);
    - ``"answer_mentioned"``: otherwise, some returned document mentions an answer alias (a whole
      word or phrase, case-insensitive);
    - ``"none"``.

    The documents are those ``retriever`` returns for the trajectory's queries (BM25 is
    deterministic, so they are the ones the rollout saw).
    """
    results = retriever.search(list(trajectory.queries), topk) if trajectory.queries else []
    gold = trajectory.example.gold_queries[-1] if trajectory.example.gold_queries else None
    labels = []
    for documents in results:
        if gold is not None and any(document.title == gold for document in documents):
            labels.append("answer_document")
        elif any(_mentions(document.title + " " + document.text, trajectory.example.answers) for document in documents):
            labels.append("answer_mentioned")
        else:
            labels.append("none")
    return labels


def turn_group(labels: Sequence[str], turn: int) -> str:
    """The ``IG_GROUPS`` entry of non-final turn ``turn`` given its trajectory's ``observation_labels``.

    Example:
        >>> [turn_group(["none", "answer_document", "answer_document", "answer_mentioned"], turn) for turn in range(5)]
        ['answer_not_retrieved', 'answer_document_first', 'answer_document_again', 'answer_mentioned_elsewhere', 'answer_not_retrieved']
    """
    label = labels[turn] if turn < len(labels) else "none"
    if label == "answer_document":
        return "answer_document_again" if "answer_document" in labels[:turn] else "answer_document_first"
    return "answer_mentioned_elsewhere" if label == "answer_mentioned" else "answer_not_retrieved"


def new_chain_documents(trajectory: QATrajectory, retriever: Any, topk: int) -> list[set[int]]:
    """For each observation j of ``trajectory``, the hops h of its question's gold chain whose
    document (titled ``gold_queries[h]``) the search of turn j retrieved for the first time in the
    rollout (hop ``hops - 1``'s document holds the answer, the others a bridge entity)."""
    results = retriever.search(list(trajectory.queries), topk) if trajectory.queries else []
    titles = {title: hop for hop, title in enumerate(trajectory.example.gold_queries)}
    seen: set[int] = set()
    new = []
    for documents in results:
        hops = {titles[document.title] for document in documents if document.title in titles} - seen
        seen |= hops
        new.append(hops)
    return new


def chain_group(new: Sequence[set[int]], turn: int, *, bridge: int, answer_hop: int) -> str:
    """The ``SUBGOAL_GROUPS`` entry of non-final turn ``turn`` for the probe of bridge ``bridge``
    (the hop whose document reveals it), given ``new_chain_documents``.

    Example:
        >>> new = [{0}, set(), {1, 2}]
        >>> [chain_group(new, turn, bridge=1, answer_hop=2) for turn in range(3)]
        ['other_bridge_document_first', 'nothing_new', 'own_document_first']
    """
    retrieved = new[turn] if turn < len(new) else set()
    if bridge in retrieved:
        return "own_document_first"
    if answer_hop in retrieved:
        return "answer_document_first"
    return "other_bridge_document_first" if retrieved else "nothing_new"


def _subgoal_gains(policy: Any, tokenizer: Any, trajectories: Sequence[QATrajectory], config: RLConfig) -> tuple[Any, dict[str, Any]]:
    """The K-target probes of ``trajectories`` (answer + sub-goals, one forward) and each target's
    gain under each of ``POTENTIALS``: ``(batch, {potential: [B, T, K]})``."""
    batch = build_batch(trajectories, tokenizer, probes=True, subgoals=True, device=next(policy.parameters()).device)
    logprob = score_batch(policy, batch, config, probes=True).answer_logprob
    settings = config.igpo
    return batch, {potential: igpo_rewards.target_information_gain(
        logprob, batch.turn_mask, target_mask=batch.target_mask, kind=settings.kind, log_prob_floor=settings.log_prob_floor,
        subgoal_potential=potential) for potential in POTENTIALS}


def _record_subgoal_gains(values: dict, trajectories: Sequence[QATrajectory], gains: dict[str, Any], retriever: Any,
                          topk: int) -> None:
    """Append each bridge probe's gains to ``values[group][hops][potential]``, and the answer probe's
    on turns that newly retrieved a bridge document to ``values["answer_on_bridge_document"]``."""
    for row, trajectory in enumerate(trajectories):
        example = trajectory.example
        if not example.subgoals:
            continue
        new = new_chain_documents(trajectory, retriever, topk)
        for turn in range(trajectory.num_turns - 1):
            for bridge in range(len(example.subgoals)):
                group = chain_group(new, turn, bridge=bridge, answer_hop=example.hops - 1)
                for potential in POTENTIALS:
                    values[group][example.hops][potential].append(float(gains[potential][row, turn, bridge + 1]))
            retrieved = new[turn] if turn < len(new) else set()
            if retrieved - {example.hops - 1}:
                values["answer_on_bridge_document"][example.hops]["probe"].append(float(gains["probe"][row, turn, 0]))


def _subgoal_summary(values: dict, threshold: float) -> dict[str, Any]:
    """group -> {"all": {potential: summary}, "by_hops": {hops: {potential: summary}}}."""
    result = {}
    for group, per_hop in values.items():
        potentials = POTENTIALS if group != "answer_on_bridge_document" else ("probe",)
        result[group] = {
            "all": {p: _summary([v for hop in per_hop.values() for v in hop[p]], threshold) for p in potentials},
            "by_hops": {str(hops): {p: _summary(per_hop[hops][p], threshold) for p in potentials} for hops in sorted(per_hop)},
        }
    return result


def _summary(values: Sequence[float], threshold: float) -> dict[str, Any]:
    if not values:
        return {"turns": 0, "mean": None, "std": None, "above_threshold_fraction": None}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((value - mean) ** 2 for value in values) / len(values))
    return {"turns": len(values), "mean": mean, "std": std,
            "above_threshold_fraction": sum(value > threshold for value in values) / len(values)}


def outcome_groups(groups: Sequence[Sequence[float]]) -> dict[str, float]:
    """How the groups' outcomes split, as fractions of the groups (the outcome is the answer's F1,
    or the format penalty -2.0 for a malformed response; "failed" means an outcome <= 0):

    - ``outcome_zero_variance_fraction``: all G outcomes equal, so GRPO's advantages are 0 for the
      whole group; the sum of the next three, each a subset of it:
    - ``all_wrong_group_fraction``: all equal and <= 0 (every rollout F1 0, or every rollout -2.0);
    - ``all_right_group_fraction``: all equal and >= 1 (every rollout a perfect answer);
    - ``equal_partial_group_fraction``: all equal, strictly between 0 and 1;
    - ``all_failed_outcomes_differ_fraction``: every outcome <= 0 but not all equal (F1 0 next to
      the format penalty): no rollout answered, yet GRPO gets a signal (for the format). Not zero-variance.

    Example:
        >>> split = outcome_groups([[1.0, 1.0], [0.0, 1.0], [-2.0, -2.0], [0.0, -2.0]])
        >>> split["outcome_zero_variance_fraction"], split["all_wrong_group_fraction"], split["all_failed_outcomes_differ_fraction"]
        (0.5, 0.25, 0.25)
    """
    if not groups:
        raise ValueError("groups is empty: no outcomes to split")
    equal = [group for group in groups if len(set(group)) == 1]
    count = len(groups)
    return {
        "outcome_zero_variance_fraction": len(equal) / count,
        "all_wrong_group_fraction": sum(group[0] <= 0 for group in equal) / count,
        "all_right_group_fraction": sum(group[0] >= 1 for group in equal) / count,
        "equal_partial_group_fraction": sum(0 < group[0] < 1 for group in equal) / count,
        "all_failed_outcomes_differ_fraction": sum(len(set(group)) > 1 and max(group) <= 0 for group in groups) / count,
    }


def _group_outcomes(trajectories: Sequence[QATrajectory], offset: int) -> dict[int, list[QATrajectory]]:
    groups: dict[int, list[QATrajectory]] = defaultdict(list)
    for trajectory in trajectories:
        groups[offset + trajectory.group_id].append(trajectory)
    return groups


def _record_answer_gains(gains: dict[str, dict[int, list[float]]], trajectories: Sequence[QATrajectory],
                         information_gain: torch.Tensor, retriever: Any, topk: int) -> None:
    """Append each non-final turn's information gain ([B, T]) to ``gains[turn_group][hops]``."""
    for row, trajectory in enumerate(trajectories):
        labels = observation_labels(trajectory, retriever, topk)
        for turn in range(trajectory.num_turns - 1):
            gains[turn_group(labels, turn)][trajectory.example.hops].append(float(information_gain[row, turn]))


def measure_signal(
    policy: Any,
    tokenizer: Any,
    retriever: Any,
    examples: Sequence[Any],
    config: RLConfig,
    *,
    steps: int = 4,
    seed: int = 0,
    ig_threshold: float = 0.1,
    progress: bool = False,
) -> dict[str, Any]:
    """Sparsity and probe signal over the rollouts of RL steps 1..``steps`` (see the module docstring).

    Args:
        policy, tokenizer: the policy RL would start from (e.g. a warm start), in eval mode.
        retriever: the run's search engine.
        examples: the training questions (``training.examples_for_step`` picks each step's).
        config: the RL settings: questions per step, G, turns, tokens, top-k, probe kind.
        steps: how many steps' worth of questions to sample.
        seed: the run's seed (which questions; the sampling seed is derived from it).
        ig_threshold: the information gain counted as "clearly positive" in the split.
        progress: a tqdm bar over the steps.

    Returns:
        A JSON-ready dict: ``questions``, ``rollouts``, ``group_size``,
        the fractions of ``outcome_groups`` (``outcome_zero_variance_fraction``, ``all_wrong_group_fraction``,
        ``all_right_group_fraction``, ...), ``turn_advantage_collapse_rate``,
        ``by_hops`` ({hops: groups, outcome_zero_variance_fraction, train_em, solved_group_fraction,
        information_gain}),
        ``groups`` (every group's hop count and G outcomes),
        ``information_gain`` ({group: turns, mean, std, above_threshold_fraction}), ``ig_kind``,
        ``ig_threshold``, ``subgoal_signal`` ({group of ``SUBGOAL_GROUPS`` or
        "answer_on_bridge_document": {"all": {potential: summary}, "by_hops": {hops: {...}}}},
        or None when no sampled question has a sub-goal).
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    igpo_config = copy.deepcopy(config)
    igpo_config.algorithm = "igpo"
    igpo_config.igpo = dataclasses.replace(config.igpo, subgoal_weight=0.0)  # the answer's IG (sub-goals: subgoal_signal)
    gains: dict[str, dict[int, list[float]]] = {name: defaultdict(list) for name in IG_GROUPS}
    subgoal_values: dict[str, dict[int, dict[str, list[float]]]] = {
        name: defaultdict(lambda: defaultdict(list)) for name in (*SUBGOAL_GROUPS, "answer_on_bridge_document")}
    measured_subgoals = False
    groups: dict[int, list[QATrajectory]] = {}
    collapse = []
    rng_state = torch.get_rng_state()
    torch.manual_seed(seed * 7919 + 17)
    try:
        for step in tqdm(range(1, steps + 1), desc="diagnose", disable=not progress, leave=False):
            questions = examples_for_step(examples, step, config.questions_per_step, seed)
            trajectories = rollout_examples(
                policy, tokenizer, retriever, questions, group_size=config.group_size, max_turns=config.max_turns,
                max_new_tokens=config.max_new_tokens, topk=config.topk, batch_size=config.generation_batch_size,
            ).trajectories
            batch = build_batch(trajectories, tokenizer, probes=True, device=next(policy.parameters()).device)
            answer_logprob = score_batch(policy, batch, igpo_config, probes=True).answer_logprob
            advantages = compute_advantages(batch, answer_logprob, igpo_config)
            collapse.append(zero_advantage_group_fraction(advantages.turn, batch.group_ids))
            _record_answer_gains(gains, trajectories, advantages.information_gain, retriever, config.topk)
            if any(trajectory.example.subgoals for trajectory in trajectories):
                _, subgoal_gains = _subgoal_gains(policy, tokenizer, trajectories, igpo_config)
                _record_subgoal_gains(subgoal_values, trajectories, subgoal_gains, retriever, config.topk)
                measured_subgoals = True
            groups.update(_group_outcomes(trajectories, offset=len(groups)))
    finally:
        torch.set_rng_state(rng_state)
    return {
        "questions": len(groups),
        "rollouts": sum(len(group) for group in groups.values()),
        "group_size": config.group_size,
        **_outcome_summary(groups),
        "turn_advantage_collapse_rate": sum(collapse) / len(collapse),
        "by_hops": _by_hops(groups, gains, ig_threshold),
        "groups": [{"hops": group[0].example.hops, "outcomes": [t.outcome for t in group]} for group in groups.values()],
        "information_gain": {name: _summary([gain for values in per_hop.values() for gain in values], ig_threshold)
                             for name, per_hop in gains.items()},
        "ig_kind": config.igpo.kind,
        "ig_threshold": ig_threshold,
        "subgoal_signal": _subgoal_summary(subgoal_values, ig_threshold) if measured_subgoals else None,
    }


def _outcome_summary(groups: dict[int, list[QATrajectory]]) -> dict[str, float]:
    """``outcome_groups`` of the groups' outcomes (its zero-variance fraction is the library's
    ``zero_variance_group_fraction``: tests/trainer/test_diagnostics.py)."""
    return outcome_groups([[t.outcome for t in group] for group in groups.values()])


def _by_hops(groups: dict[int, list[QATrajectory]], gains: dict[str, dict[int, list[float]]],
             threshold: float) -> dict[str, dict[str, Any]]:
    by_hops: dict[int, list[list[QATrajectory]]] = defaultdict(list)
    for group in groups.values():
        by_hops[group[0].example.hops].append(group)
    result = {}
    for hops in sorted(by_hops):
        hop_groups = by_hops[hops]
        em = [[t.em for t in group] for group in hop_groups]
        result[str(hops)] = {
            "groups": len(hop_groups),
            "outcome_zero_variance_fraction": sum(len({t.outcome for t in group}) == 1 for group in hop_groups) / len(hop_groups),
            "train_em": sum(map(sum, em)) / sum(map(len, em)),
            "solved_group_fraction": sum(max(row) == 1.0 for row in em) / len(hop_groups),
            "information_gain": {name: _summary(per_hop.get(hops, []), threshold) for name, per_hop in gains.items()},
        }
    return result


def format_signal(result: dict[str, Any]) -> str:
    """A few lines of text summarizing ``measure_signal``'s result (what ``igpo-train diagnose`` prints)."""
    lines = [
        f"{result['questions']} questions x G = {result['group_size']} rollouts (the first RL steps' questions)",
        f"outcome zero-variance groups: {100 * result['outcome_zero_variance_fraction']:.1f}% "
        f"(all wrong {100 * result['all_wrong_group_fraction']:.1f}%, all right {100 * result['all_right_group_fraction']:.1f}%, "
        f"equal partial F1 {100 * result['equal_partial_group_fraction']:.1f}%); every rollout failed but outcomes differ: "
        f"{100 * result['all_failed_outcomes_differ_fraction']:.1f}%; "
        f"IGPO turn-advantage collapse: {100 * result['turn_advantage_collapse_rate']:.1f}%",
    ]
    for hops, row in result["by_hops"].items():
        first = row["information_gain"]["answer_document_first"]
        lines.append(f"  {hops}-hop: {row['groups']} groups, zero-variance {100 * row['outcome_zero_variance_fraction']:.1f}%, "
                     f"train EM {100 * row['train_em']:.1f}%, solved by >= 1 rollout {100 * row['solved_group_fraction']:.1f}%, "
                     f"{first['turns']} turns first retrieving the answer's document")
    lines.append(f"information gain ({result['ig_kind']}) of non-final turns, by what the turn's search returned:")
    for name, row in result["information_gain"].items():
        if row["turns"] == 0:
            lines.append(f"  {name}: no turns")
            continue
        lines.append(f"  {name}: {row['turns']} turns, mean {row['mean']:+.3f} (std {row['std']:.3f}), "
                     f"{100 * row['above_threshold_fraction']:.1f}% above {result['ig_threshold']}")
    signal = result.get("subgoal_signal")
    if signal:
        lines.append("sub-goal probes (bridge entities): mean gain of non-final turns, raw probe / running max, by what "
                     "the turn's search newly retrieved along the gold chain:")
        for name in SUBGOAL_GROUPS:
            cells = signal[name]["all"]
            if cells["probe"]["turns"]:
                lines.append(f"  {name}: {cells['probe']['turns']} (turn, bridge) pairs, {cells['probe']['mean']:+.3f} / "
                             f"{cells['running_max']['mean']:+.3f}")
        answer = signal["answer_on_bridge_document"]["all"]["probe"]
        if answer["turns"]:
            lines.append(f"  the answer's probe on turns that newly retrieved a bridge's document: {answer['turns']} turns, "
                         f"{answer['mean']:+.3f}")
    return "\n".join(lines)
