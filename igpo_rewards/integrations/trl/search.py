"""The Search-R1 agent as a TRL ``rollout_func`` for ``IGPOTrainer``, and the outcome reward function.

Import them from :mod:`igpo_rewards.integrations.trl` (this module imports the trainer, never the
reverse).

``make_search_rollout_func(retriever, ...)`` returns ``rollout_func(prompts, trainer)``. Per call
(one per generation batch, on each process):

1. each prompt is tokenized: a conversational prompt (a list of messages) through the tokenizer's
   chat template with the generation prompt, a plain string as it is (no special tokens added);
2. ``igpo_rewards.agent.rollout.generate_rollouts`` rolls every prompt out once with the trainer's
   model (TRL already repeats each prompt ``num_generations`` times): all rollouts batched turn by
   turn through HF ``generate``, temperature 1 with every filter off, each turn stopped at
   ``</search>`` or ``</answer>``; searches go to the retriever in one call per turn and the
   documents come back inside ``<information>..</information>``. A malformed turn (tag soup, no
   stop string, an empty query) ends its rollout there; the reward function then gives it the
   format penalty;
3. ``igpo_rewards.agent.probes.score_probes`` scores the probe before every turn (the
   ground-truth answer after "Now there's enough information to answer"), ``probe_batch_size``
   rollouts per forward (``probe_layout``), through the helper IGPOTrainer's tool loop uses too;
4. the output holds TRL's ``prompt_ids``, ``completion_ids`` (the turns and the observations
   between them) and ``logprobs`` (``None``: with HF generate TRL recomputes what it needs), and
   what ``IGPOTrainer`` reads: ``env_mask`` (1 on generated tokens, 0 on observation tokens: one
   run of 1s per turn) and ``igpo_answer_logprob`` (one probe per turn).

Sub-goal targets (``subgoals_column``, docs/algorithm.md section 7.1): each row may also list
intermediate answers of its question (a multi-hop question's bridge entities: MuSiQue's
decomposition answers, 2Wiki's evidence objects). Every turn is then probed for the answer and
each of them in the same forward (``score_probes`` with a list of targets per trajectory), and the
output also holds ``igpo_target_logprob``: per completion, per turn, the probe log-probs of its
targets, the answer first. ``IGPOTrainer`` weighs the sub-goals with
``igpo_settings.subgoal_weight``. The targets are built and checked, and the probes split into
the two keys, by the trainer module's helpers that ``IGPOTrainer(subgoals_column=...)`` uses on
TRL's tool loop, so both paths probe the same targets.

The ground-truth answers: TRL passes a ``rollout_func`` the prompts only. ``IGPOTrainer`` keeps
the batch's dataset rows in ``trainer.igpo_batch_inputs`` while it scores the batch (row i is the
row of ``prompts[i]``), and the rollout function reads ``answers_column`` from them (any form
``igpo_rewards.split_ground_truth`` accepts; the first alias is probed). It therefore runs
under ``IGPOTrainer`` only.

Generation is HF ``generate`` on the trainer's model in eval mode, without gradients, in training
and in evaluation alike (``trainer.model.training`` is restored afterwards). TRL's vLLM modes are
refused: the rollout function does not drive vLLM, and vLLM cannot be tested here. Sampling
settings the loop does not apply (``temperature`` other than 1, ``top_p``, ``top_k``, ``min_p``,
``repetition_penalty``, ``generation_kwargs``) are refused rather than ignored, and so is
``mask_truncated_completions`` (a Search-R1 completion ends at ``</answer>``, not at an
end-of-sequence token, so TRL would mask every one of them).

``make_outcome_reward_func(answers_column, tokenizer=...)`` is the matching TRL reward function,
for this rollout function and for TRL's tool loop alike: ``igpo_rewards.outcome_reward`` of each
completion's text (with ``tokenizer``, the decoded ``completion_ids``) against its row's aliases
(answer F1, the format penalty -2.0 for a malformed response or one without an answer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from igpo_rewards import _checks
from igpo_rewards.agent.probes import PROBE_LAYOUTS
from igpo_rewards.agent.retrieval import Retriever
from igpo_rewards.agent.rollout import Trajectory, generate_rollouts
from igpo_rewards.agent.tool_calls import as_retriever
from igpo_rewards.integrations.trl._probes import generation_model, probe_log_probs
from igpo_rewards.integrations.trl.trainer import (
    PROBE_SECONDS_KEY,
    IGPOTrainer,
    _probe_outputs,
    _row_answers,
    _row_targets,
)
from igpo_rewards.scoring import outcome_reward

__all__ = ["make_outcome_reward_func", "make_search_rollout_func"]

# GRPOConfig fields that shape TRL's own sampling, with the values under which the loop's
# temperature-1, filter-free sampling is what TRL's loss assumes.
_NEUTRAL_SAMPLING = {
    "temperature": (1.0,),
    "top_p": (1.0,),
    "top_k": (0, None),
    "min_p": (0.0, None),
    "repetition_penalty": (1.0,),
}


def _check_trainer(trainer: Any) -> None:
    """Refuses trainers and settings under which this rollout would not be what TRL trains on."""
    if not isinstance(trainer, IGPOTrainer):
        raise TypeError(
            f"the search rollout_func runs under igpo_rewards.integrations.trl.IGPOTrainer (it reads the batch's "
            f"answers from trainer.igpo_batch_inputs), got {type(trainer).__name__}"
        )
    args = trainer.args
    if getattr(args, "use_vllm", False):
        raise ValueError(
            "the search rollout_func generates with the trainer's model through HF generate; use_vllm=True is not "
            "supported (TRL's vLLM server and colocate modes are untested with it): set use_vllm=False"
        )
    if getattr(args, "mask_truncated_completions", False):
        raise ValueError(
            "mask_truncated_completions=True would mask every search rollout from the loss: a completion ends at "
            "</answer>, not at an end-of-sequence token, so TRL counts it as truncated. Set it to False"
        )
    changed = {
        name: getattr(args, name)
        for name, neutral in _NEUTRAL_SAMPLING.items()
        if hasattr(args, name) and getattr(args, name) not in neutral
    }
    if getattr(args, "generation_kwargs", None):
        changed["generation_kwargs"] = args.generation_kwargs
    if changed:
        raise ValueError(
            f"the search rollout_func samples at temperature 1 with no top-k/top-p/min-p/repetition penalty (the "
            f"distribution TRL's loss scores); these GRPOConfig settings would not be applied: {changed}"
        )


def _batch_answers(trainer: IGPOTrainer, prompts: Sequence[Any], column: str) -> list[tuple[str, ...]]:
    """Each prompt's answer aliases, from the dataset rows IGPOTrainer holds for the batch."""
    rows = trainer.igpo_batch_inputs
    if rows is None:
        raise ValueError(
            "trainer.igpo_batch_inputs is None: the search rollout_func must be called by IGPOTrainer while it "
            "scores a batch (TRL calls rollout_func from _generate_and_score_completions)"
        )
    if len(rows) != len(prompts):
        raise ValueError(
            f"prompts has {len(prompts)} entries but trainer.igpo_batch_inputs holds {len(rows)} dataset rows; "
            f"rollout_func must get the prompts of the batch's rows, in order"
        )
    for index, (row, prompt) in enumerate(zip(rows, prompts)):
        if row.get("prompt") != prompt:
            raise ValueError(
                f"prompts[{index}] is not the 'prompt' of trainer.igpo_batch_inputs[{index}]: {prompt!r:.120}"
            )
    return _row_answers(rows, column)


def _prompt_ids(tokenizer: Any, prompts: Sequence[Any]) -> list[list[int]]:
    """Token ids of each prompt: messages through the chat template, a string as it is (each distinct prompt once)."""
    encoded: dict[str, list[int]] = {}
    result = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(message, Mapping) for message in prompt):
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(
                    f"prompts[{index}] is a list of messages but the tokenizer has no chat template; give the dataset "
                    f"plain-text prompts or a tokenizer with a chat template"
                )
            text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        else:
            raise TypeError(f"prompts[{index}] must be a str or a list of chat messages, got {prompt!r:.120}")
        if text not in encoded:
            encoded[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
        result.append(encoded[text])
    return result


def _completion(trajectory: Trajectory) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, completion_ids, env_mask)`` of a trajectory: the completion runs from the end of
    the prompt to the end of the last turn; env_mask is 1 on turn tokens, 0 on observation tokens."""
    start, end = trajectory.prompt_length, trajectory.turn_spans[-1][1]
    env_mask = [0] * (end - start)
    for turn_start, turn_end in trajectory.turn_spans:
        env_mask[turn_start - start : turn_end - start] = [1] * (turn_end - turn_start)
    return trajectory.token_ids[:start], trajectory.token_ids[start:end], env_mask


def make_search_rollout_func(
    retriever: str | Retriever | Callable[[list[str], int], Sequence[Sequence[Any]]],
    *,
    answers_column: str = "answers",
    max_turns: int = 4,
    max_new_tokens: int = 64,
    topk: int = 3,
    max_context_tokens: int | None = None,
    generation_batch_size: int = 64,
    probe_batch_size: int = 32,
    probe_layout: str = "packed",
    subgoals_column: str | None = None,
) -> Callable[[list[Any], IGPOTrainer], dict[str, Any]]:
    """A TRL ``rollout_func`` running the Search-R1 multi-turn loop with IGPO's probes (module docstring).

    Args:
        retriever: a Search-R1 ``/retrieve`` URL (e.g. ``igpo-retrieve serve``), an object with
            ``search(queries, topk) -> [[Document, ...], ...]`` (``igpo_rewards.agent.retrieval``),
            or a callable ``(queries, topk)`` returning, per query, ``Document`` objects or
            Search-R1 contents strings (``'"Title"\\ntext'``).
        answers_column: the dataset column holding each row's ground-truth answer aliases.
        max_turns: the most turns of a rollout (searches plus the answer); the same bound as
            ``IGPOSettings.max_turns``, which, when set, must be at least this.
        max_new_tokens: the most tokens generated in one turn.
        topk: documents per search.
        max_context_tokens: the longest prompt + completion; a rollout whose next observation
            would not fit ends. Defaults to the model's ``max_position_embeddings``.
        generation_batch_size: rollouts per ``generate`` call.
        probe_batch_size: rollouts per probe forward.
        probe_layout: "packed" (probe copies in one forward) or "kv_cache"
            (``igpo_rewards.agent.probes.probe_forward``).
        subgoals_column: the dataset column of each row's sub-goal targets (a list of strings,
            possibly empty, or None: the question's intermediate answers, not the answer itself),
            probed before every turn with the answer in the same forward (module docstring).
            None (default): the paper's IGPO, the answer alone. Needs
            ``igpo_settings.subgoal_weight > 0``.

    Returns:
        ``rollout_func(prompts, trainer) -> dict`` for ``IGPOTrainer(..., rollout_func=...)``,
        one completion per prompt, in order.

    Raises:
        TypeError: a retriever or setting of the wrong type, here; at each call, a trainer that
        is not an ``IGPOTrainer``.
        ValueError: a bad setting, here; at each call, ``use_vllm``, ``mask_truncated_completions``
        or sampling settings the loop does not apply, a missing answers or sub-goals column, a
        sub-goal that is empty, repeated or the answer itself, ``subgoals_column`` with
        ``igpo_settings.subgoal_weight == 0``, or prompts that are not the batch's (each names the
        field).
    """
    search = as_retriever(retriever)
    for name, count in dict(max_turns=max_turns, max_new_tokens=max_new_tokens, topk=topk,
                            generation_batch_size=generation_batch_size, probe_batch_size=probe_batch_size).items():
        _checks.check_positive_count(name, count)
    _checks.check_optional_positive_count("max_context_tokens", max_context_tokens)
    _checks.check_choice("probe_layout", probe_layout, PROBE_LAYOUTS)
    _checks.check_str("answers_column", answers_column, what="a str (a dataset column)")
    if subgoals_column is not None:
        _checks.check_str("subgoals_column", subgoals_column, what="a str (a dataset column) or None")

    def search_rollout_func(prompts: list[Any], trainer: IGPOTrainer) -> dict[str, Any]:
        _check_trainer(trainer)
        if not prompts:
            raise ValueError("rollout_func got no prompts")
        answers = _batch_answers(trainer, prompts, answers_column)
        targets = ([aliases[0] for aliases in answers] if subgoals_column is None
                   else _row_targets(trainer.igpo_batch_inputs, answers, subgoals_column, trainer.igpo_settings))
        tokenizer = trainer.processing_class
        prompt_ids = _prompt_ids(tokenizer, prompts)
        mode = "train" if trainer.model.training else "eval"
        with generation_model(trainer) as model:
            result = generate_rollouts(
                model, tokenizer, search, prompt_ids, max_turns=max_turns, max_new_tokens=max_new_tokens, topk=topk,
                max_context_tokens=max_context_tokens, batch_size=generation_batch_size,
            )
            trajectories = result.trajectories
            started = time.perf_counter()
            probes = probe_log_probs(
                model, tokenizer, [t.token_ids for t in trajectories], [t.turn_starts for t in trajectories],
                targets, batch_size=probe_batch_size, layout=probe_layout,
            )
            probe_seconds = time.perf_counter() - started
        prompt_part, completion_ids, env_mask = zip(*(_completion(t) for t in trajectories))
        metrics = trainer._metrics[mode]
        metrics[PROBE_SECONDS_KEY].append(probe_seconds)
        metrics["igpo/searches_mean"].append(sum(len(t.queries) for t in trajectories) / len(trajectories))
        metrics["igpo/answered_fraction"].append(sum(t.answered for t in trajectories) / len(trajectories))
        return {
            "prompt_ids": list(prompt_part),
            "completion_ids": list(completion_ids),
            "logprobs": None,
            "env_mask": list(env_mask),
            **_probe_outputs(probes, targets),
        }

    return search_rollout_func


def _completion_text(completion: Any, index: int) -> str:
    """The text of a TRL completion: a string, or (conversational prompts) a list of messages
    without tool calls (their content joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and all(isinstance(message, Mapping) for message in completion):
        if any(message.get("tool_calls") or message.get("role") == "tool" for message in completion):
            raise ValueError(
                f"completions[{index}] holds tool calls or tool results (TRL's tool loop parsed them out of the "
                f"text, so its content alone lacks the <search> turns and would get the format penalty): pass "
                f"make_outcome_reward_func(..., tokenizer=tokenizer) to score the decoded completion_ids"
            )
        return "".join(str(message.get("content") or "") for message in completion)
    raise TypeError(f"a completion must be a str or a list of messages, got {completion!r:.120}")


def make_outcome_reward_func(
    answers_column: str = "answers",
    *,
    tokenizer: Any = None,
    metric: str = "f1",
    format_penalty: float = -2.0,
    style: str = "paper",
) -> Callable[..., list[float]]:
    """A TRL reward function: ``igpo_rewards.outcome_reward`` of each completion against its row's answers.

    The returned ``reward(prompts, completions, completion_ids, **columns)`` reads the aliases from
    the dataset column ``answers_column`` (TRL passes every column as a keyword argument) and
    scores the completion's whole text (turns and observation blocks): ``metric`` ("f1" or "em")
    of the answer against the best alias, or ``format_penalty`` when the response is malformed or
    has no answer. Its ``__name__`` is ``outcome_<metric>`` (TRL logs ``rewards/outcome_f1/mean``).

    The text: with ``tokenizer``, ``tokenizer.decode(completion_ids, skip_special_tokens=True)``
    (what TRL decodes for a ``rollout_func``'s completions, and the only faithful text in TRL's
    tool loop, where the ``<search>`` turns become ``tool_calls``); without it, the completion as
    TRL hands it over (a string, or the content of its messages), and a completion holding tool
    calls is an error rather than a silent format penalty.

    Raises:
        TypeError / ValueError: bad settings (here); at each call, a missing column, a ground
        truth that ``igpo_rewards.split_ground_truth`` cannot read, or (without ``tokenizer``) a
        completion with tool calls.
    """
    _checks.check_str("answers_column", answers_column, what="a str (a dataset column)")
    outcome_reward("", "checked", metric=metric, format_penalty=format_penalty, style=style)  # validates the settings
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(f"tokenizer must be a tokenizer with decode(ids), got {type(tokenizer).__name__}")

    def reward(prompts: list[Any], completions: list[Any], completion_ids: list[Any] | None = None, **columns: Any) -> list[float]:
        if answers_column not in columns:
            raise ValueError(
                f"the dataset has no column {answers_column!r} (the ground-truth answers); the reward function got "
                f"{sorted(columns)}"
            )
        if tokenizer is not None:
            if completion_ids is None:
                raise ValueError("the reward function scores the decoded completion_ids, but TRL passed none")
            texts = [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in completion_ids]
        else:
            texts = [_completion_text(completion, index) for index, completion in enumerate(completions)]
        return [
            outcome_reward(text, truth, metric=metric, format_penalty=format_penalty, style=style)
            for text, truth in zip(texts, columns[answers_column], strict=True)
        ]

    reward.__name__ = reward.__qualname__ = f"outcome_{metric}"
    return reward
