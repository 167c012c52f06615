"""IGPO for TRL: ``IGPOTrainer``, a ``GRPOTrainer`` whose advantages are IGPO's per-turn advantages.

The package holds three modules, imported in one direction: :mod:`.trainer` (``IGPOTrainer`` and
what it reads from TRL), :mod:`.tools` (``use_search_r1_tool_protocol``: the Search-R1 text as TRL
tool calls) and :mod:`.search` (the Search-R1 ``rollout_func`` and the outcome reward function,
which run under ``IGPOTrainer``). Import every public name from here; the search tool and
environment (``make_search_tool``, ``SearchEnvironment``) come from
:mod:`igpo_rewards.agent.tool_calls`.

TRL has no advantage hook; this trainer lets ``GRPOTrainer._generate_and_score_completions``
run unchanged (rollouts, reward functions, reference/old log-probs, logging) and then replaces
its one-scalar-per-completion ``advantages`` [B] with per-token IGPO advantages [B, C]
(C completion tokens), which TRL's loss accepts as they are.

The turns and their probes come from one of two sources:

* TRL's own tool loop (``tools=`` / ``environment_factory=``): TRL generates every turn with its
  configured backend (transformers, vLLM colocate or server). ``IGPOTrainer`` wraps
  ``GRPOTrainer._tool_call_loop`` (private; the same parameters and first three return values in
  every TRL 1.x) and keeps the per-row tool masks and completion ids it returns; each run of 1s
  of a tool mask is a turn. After TRL has built the batch it scores the probe before every turn
  on its own model (``igpo_rewards.agent.probes.score_probes``, kv_cache layout; never on vLLM),
  with the answers of the dataset column ``answers_column`` (and with ``subgoals_column``, each
  row's sub-goal targets too). Needs :data:`SUPPORTED_TRL_TOOL_VERSIONS` and
  :data:`SUPPORTED_TRANSFORMERS_TOOL_VERSIONS`.
* a ``rollout_func`` that returns the probes itself (below).

What it reads from TRL on both paths, and how stable each piece is:

* the user's ``rollout_func`` (TRL's documented, experimental contract; the rollout-function
  path): IGPOTrainer wraps it and keeps what it returns, so it reads the completions,
  ``env_mask`` and the probe log-probs exactly as the rollout produced them;
* ``GRPOTrainer._calculate_rewards``: the rewards of the whole batch, gathered over processes;
* ``GRPOTrainer._generate_and_score_completions``, a private method, whose ``advantages`` it
  replaces;
* ``GRPOTrainer._prepare_inputs``, a private method, which shuffles each round's rollouts
  (``trl.trainer.grpo_trainer.shuffle_sequence_dict``) before splitting them into the round's
  ``steps_per_generation`` optimizer steps: IGPOTrainer swaps in, for the duration of that call,
  a shuffle that moves whole groups, so every optimizer step trains on complete groups (as verl's
  and the reference trainer's minibatches do). IGPO's advantages are normalized within a group,
  so a whole group's advantages are their own baseline inside one step; TRL's row shuffle splits
  groups across steps, and on the docs' CPU run that cost 2.6 held-out EM points over five seeds
  (docs/integrations/trl.md). Because of these private methods, IGPOTrainer checks the TRL version
  when it is built and refuses any outside :data:`SUPPORTED_TRL_VERSIONS`, the range pyproject's
  ``trl`` extra declares and the tests run at both ends (on the tool loop also the narrower
  ``trl-tools`` ranges).

What the ``rollout_func`` must return per completion, besides TRL's ``prompt_ids``,
``completion_ids`` and ``logprobs``:

* ``igpo_answer_logprob``: the n_i probe log-probs m_{i,0..n_i-1}, probe j taken right before
  turn j (:func:`igpo_rewards.answer_logprob` of the ground-truth answer tokens);
* ``env_mask`` (TRL's own key): 1 on tokens the model generated, 0 on tool/observation tokens
  inside the completion. Each maximal run of 1s is one turn, so a completion needs exactly
  n_i runs. Without ``env_mask`` the whole completion is one turn;
* optionally ``igpo_turn_index``: the turn (0, 1, ...) of every completion token, -1 for none,
  when turns are not the runs of ``env_mask`` (e.g. two turns with no observation between);
* optionally ``igpo_target_logprob`` (sub-goal targets): per turn, the probe log-probs of the
  completion's K_i targets, the answer first (the same K_i on every turn).

:func:`make_search_rollout_func` is such a ``rollout_func`` (the Search-R1 loop of
:mod:`igpo_rewards.agent` with retrieval and probes) and :func:`make_outcome_reward_func` its
reward function (both in :mod:`.search`).

The outcome reward R_i is the weighted sum of the trainer's reward functions (what GRPO
normalizes). Groups are TRL's: row k of the batch gathered over processes belongs to group
k // num_generations, so a group may span processes; the per-turn data of all processes is
gathered, normalized together and each process keeps its own rows.
"""

from igpo_rewards.agent.tool_calls import SearchEnvironment, make_search_tool
from igpo_rewards.integrations.trl.trainer import (
    ANSWER_LOGPROB_KEY,
    PROBE_SECONDS_KEY,
    SUPPORTED_TRANSFORMERS_TOOL_VERSIONS,
    SUPPORTED_TRL_TOOL_VERSIONS,
    SUPPORTED_TRL_VERSIONS,
    TARGET_LOGPROB_KEY,
    TESTED_TRL_TOOL_VERSIONS,
    TESTED_TRL_VERSIONS,
    TURN_INDEX_KEY,
    IGPOTrainer,
    SplitGroupWarning,
    ZeroAdvantageWarning,
    check_tool_loop_versions,
    check_trl_version,
    token_turn_index,
    turn_starts_from_tool_mask,
    whole_group_permutation,
)
from igpo_rewards.integrations.trl.tools import use_search_r1_tool_protocol
from igpo_rewards.integrations.trl.search import make_outcome_reward_func, make_search_rollout_func

__all__ = [
    "ANSWER_LOGPROB_KEY",
    "PROBE_SECONDS_KEY",
    "SUPPORTED_TRANSFORMERS_TOOL_VERSIONS",
    "SUPPORTED_TRL_TOOL_VERSIONS",
    "SUPPORTED_TRL_VERSIONS",
    "TARGET_LOGPROB_KEY",
    "TESTED_TRL_TOOL_VERSIONS",
    "TESTED_TRL_VERSIONS",
    "TURN_INDEX_KEY",
    "IGPOTrainer",
    "SearchEnvironment",
    "SplitGroupWarning",
    "ZeroAdvantageWarning",
    "check_tool_loop_versions",
    "check_trl_version",
    "make_outcome_reward_func",
    "make_search_rollout_func",
    "make_search_tool",
    "token_turn_index",
    "turn_starts_from_tool_mask",
    "use_search_r1_tool_protocol",
    "whole_group_permutation",
]
