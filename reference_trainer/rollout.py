"""Multi-turn rollouts: batched sampling, retrieval, observations, max turns.

``generate_rollouts`` runs G rollouts per question, all rollouts of all questions batched
together turn by turn:

1. every unfinished rollout's context (prompt + turns + observations so far) is left-padded
   into a batch and HF ``generate`` samples one turn (temperature 1, no top-k/top-p, so the
   tokens come from the same distribution whose log-probs the PPO ratio uses), stopping a
   row at the first ``</search>`` or ``</answer>`` (``StopOnStrings``) or end-of-sequence;
2. ``prompts.parse_action`` reads the turn: an answer ends the rollout, an invalid turn
   (tag soup, no stop string, empty query) ends it too, a search is sent to the retriever;
3. all queries of the turn go to ``retriever.search`` in one call, and
   ``prompts.observation_block(retrieval.format_observation(docs))`` is tokenized and appended
   (observation tokens are context, never trained on);
4. after ``max_turns`` turns a rollout ends whatever it did.

The result keeps the exact token ids that were fed to the model, so the training forward
scores the same tokens that were sampled (nothing is re-tokenized). Each rollout's outcome
is ``igpo_rewards.outcome_reward(final_response, answers)``: F1 of the answer, or the format
penalty when the response is malformed or has no answer (a rollout cut off by an invalid turn,
by ``max_turns`` after a search, or by a full context window has none).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from igpo_rewards.scoring import outcome_reward
from igpo_rewards.reference_trainer.prompts import STOP_STRINGS, build_prompt, observation_block, parse_action
from igpo_rewards.reference_trainer.retrieval import format_observation

if TYPE_CHECKING:
    from igpo_rewards.reference_trainer.retrieval import Retriever
    from igpo_rewards.reference_trainer.world import QAExample

_STOP_WINDOW = max(len(stop) for stop in STOP_STRINGS) + 1
"""Tokens decoded at the end of a row to look for a stop string (a token holds >= 1 char)."""


@dataclass
class Trajectory:
    """One rollout, with everything the probes, rewards and loss need.

    Attributes:
        example: the question (with its answer aliases) the rollout answers.
        token_ids: prompt + every turn + every observation, exactly as fed to the model.
        prompt_length: number of prompt tokens at the start of ``token_ids``.
        turn_spans: ``[start, end)`` of the generated tokens of turn j in ``token_ids``
            (at least one turn, each non-empty).
        observation_spans: ``[start, end)`` of observation j, inserted after turn j; one fewer
            than the turns (no observation follows the last turn).
        turn_texts: decoded text of each turn.
        final_response: all turn texts and observation blocks after the prompt, in order
            (what the outcome reward scores).
        outcome: ``igpo_rewards.outcome_reward(final_response, example.answers)``.
        group_id: index of the question in the batch; the G rollouts of a question share it.
        stop_reason: ``"answer"``, ``"invalid: <why>"``, ``"max_turns"`` or ``"context_full"``.
        queries: the search queries issued, one per observation.
    """

    example: QAExample
    token_ids: list[int]
    prompt_length: int
    turn_spans: list[tuple[int, int]]
    observation_spans: list[tuple[int, int]]
    turn_texts: list[str]
    final_response: str
    outcome: float
    group_id: int = 0
    stop_reason: str = ""
    queries: list[str] = field(default_factory=list)

    @property
    def num_turns(self) -> int:
        """Number of turns n_i (>= 1)."""
        return len(self.turn_spans)

    @property
    def answered(self) -> bool:
        """Whether the rollout ended with a well-formed answer turn."""
        return self.stop_reason == "answer"

    def response_mask(self) -> list[int]:
        """1 on generated tokens, 0 on observation tokens, over ``token_ids[prompt_length:]``.

        Each maximal run of 1s is one turn (observations separate turns), the verl layout
        that ``igpo_rewards.turn_index_from_response_mask`` reads.
        """
        mask = [0] * (len(self.token_ids) - self.prompt_length)
        for start, end in self.turn_spans:
            for position in range(start, end):
                mask[position - self.prompt_length] = 1
        return mask


@dataclass
class RolloutResult:
    """Trajectories of one ``generate_rollouts`` call and where its time went.

    Trajectories are ordered question by question: rollouts ``g * G .. g * G + G - 1`` answer
    ``examples[g]`` and have ``group_id == g``.
    """

    trajectories: list[Trajectory]
    generation_seconds: float = 0.0
    retrieval_seconds: float = 0.0
    generated_tokens: int = 0


class StopOnStrings(StoppingCriteria):
    """Marks a row done once its generated text (after ``prompt_width``) contains a stop string.

    Works for any tokenizer: the last few generated tokens of each row are decoded and
    searched, so a stop string split over several tokens (``</`` ``search`` ``>``) is found
    too. Returns one bool per row, as ``generate`` expects.
    """

    def __init__(self, tokenizer: Any, prompt_width: int, stop_strings: Sequence[str] = STOP_STRINGS):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.stop_strings = tuple(stop_strings)
        self.window = max(len(stop) for stop in self.stop_strings) + 1

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        tail = input_ids[:, max(self.prompt_width, input_ids.shape[1] - self.window) :]
        texts = self.tokenizer.batch_decode(tail.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        done = [any(stop in text for stop in self.stop_strings) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _decode(tokenizer: Any, token_ids: Sequence[int]) -> str:
    return tokenizer.decode(list(token_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and int(item) not in ids:
                ids.append(int(item))
    return ids


def cut_turn(tokenizer: Any, token_ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """The tokens of one turn: up to and including the first stop string or end-of-sequence.

    ``generate`` keeps sampling (or padding) a row after it stopped while other rows go on;
    this cuts each row back to what the turn really was. The cut lands on the token that
    completes the first stop string (found by bisection over decoded prefixes, so a stop string
    spread over tokens is handled), or on the first end-of-sequence token, whichever is first.
    """
    tokens = [int(t) for t in token_ids]
    cut = len(tokens)
    for index, token in enumerate(tokens):
        if token in eos_ids:
            cut = index + 1
            break

    def has_stop(length: int) -> bool:
        text = _decode(tokenizer, tokens[:length])
        return any(stop in text for stop in STOP_STRINGS)

    if has_stop(cut):
        low, high = 1, cut  # smallest length whose decoded prefix holds a stop string
        while low < high:
            middle = (low + high) // 2
            if has_stop(middle):
                high = middle
            else:
                low = middle + 1
        cut = low
    return tokens[:cut]


def sampling_config(
    tokenizer: Any, model: Any, *, max_new_tokens: int, greedy: bool
) -> GenerationConfig:
    """A ``GenerationConfig`` for one turn: pure temperature-1 sampling, or greedy decoding.

    Every filter a checkpoint's ``generation_config.json`` may switch on (top-k, top-p, min-p,
    repetition penalty, ...) is set to its neutral value, so the sampled tokens follow the
    model's own distribution, the one the PPO ratio is computed under.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; batched generation needs one")
    common = dict(
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=_eos_ids(model, tokenizer) or None,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        use_cache=True,
    )
    if greedy:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, **common)


@torch.no_grad()
def generate_turn(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    greedy: bool = False,
    batch_size: int = 64,
) -> list[list[int]]:
    """Sample one turn for each context; returns the turn's tokens per context (in order).

    Contexts are sorted by length and cut into batches of ``batch_size`` (less padding),
    left-padded (position ids follow the attention mask), and generated with
    ``sampling_config`` and ``StopOnStrings``; each row is then cut by ``cut_turn``. Every
    returned turn has at least one token.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos_ids = _eos_ids(model, tokenizer)
    config = sampling_config(tokenizer, model, max_new_tokens=max_new_tokens, greedy=greedy)
    device = next(model.parameters()).device
    order = sorted(range(len(contexts)), key=lambda index: len(contexts[index]))
    turns: list[list[int]] = [[] for _ in contexts]
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        width = max(len(contexts[row]) for row in rows)
        input_ids = torch.full((len(rows), width), config.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for slot, row in enumerate(rows):
            length = len(contexts[row])
            input_ids[slot, width - length :] = torch.tensor(list(contexts[row]), dtype=torch.long)
            attention_mask[slot, width - length :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([StopOnStrings(tokenizer, width)]),
        )
        generated = output[:, width:].tolist()
        for slot, row in enumerate(rows):
            turns[row] = cut_turn(tokenizer, generated[slot], eos_ids)
    return turns


@dataclass
class _RolloutState:
    example: Any
    group_id: int
    context: list[int]
    prompt_length: int
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    observation_spans: list[tuple[int, int]] = field(default_factory=list)
    turn_texts: list[str] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    stop_reason: str = ""


def generate_rollouts(
    model: Any,
    tokenizer: Any,
    retriever: Retriever,
    examples: Sequence[QAExample],
    *,
    group_size: int = 8,
    max_turns: int = 4,
    max_new_tokens: int = 64,
    topk: int = 3,
    greedy: bool = False,
    max_context_tokens: int | None = None,
    batch_size: int = 64,
) -> RolloutResult:
    """Run ``group_size`` rollouts for each example; see the module docstring for the loop.

    Args:
        model: an HF causal LM (in eval mode; generation runs without gradients).
        tokenizer: its tokenizer (chat template used when present, see ``build_prompt``).
        retriever: anything with ``search(queries, topk) -> list[list[Document]]``.
        examples: the questions; rollouts of ``examples[g]`` get ``group_id == g``.
        group_size: G, rollouts per question.
        max_turns: the most turns a rollout takes (searches plus the answer).
        max_new_tokens: the most tokens sampled in one turn.
        topk: documents retrieved per search.
        greedy: greedy decoding instead of temperature-1 sampling (evaluation).
        max_context_tokens: the longest context; a rollout whose next observation would leave
            no room for a turn ends (``"context_full"``). Defaults to the model's
            ``max_position_embeddings``.
        batch_size: rows per ``generate`` call.

    Returns:
        ``RolloutResult`` with ``len(examples) * group_size`` trajectories.

    Raises:
        ValueError: a bad count, or a prompt that leaves no room for a turn.
    """
    for name, value in (("group_size", group_size), ("max_turns", max_turns), ("max_new_tokens", max_new_tokens), ("topk", topk)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if max_context_tokens is None:
        max_context_tokens = int(getattr(model.config, "max_position_embeddings", 4096))
    states: list[_RolloutState] = []
    for group_id, example in enumerate(examples):
        prompt_ids = tokenizer(build_prompt(example.question, tokenizer), add_special_tokens=False)["input_ids"]
        if len(prompt_ids) >= max_context_tokens:
            raise ValueError(
                f"the prompt of example {group_id} has {len(prompt_ids)} tokens, max_context_tokens is {max_context_tokens}"
            )
        for _ in range(group_size):
            states.append(_RolloutState(example, group_id, list(prompt_ids), len(prompt_ids)))

    generation_seconds = retrieval_seconds = 0.0
    generated_tokens = 0
    for turn in range(max_turns):
        active = [state for state in states if not state.stop_reason]
        if not active:
            break
        # -- sample one turn for every unfinished rollout --------------------------------
        started = time.perf_counter()
        room = max_context_tokens - max(len(state.context) for state in active)
        turns = generate_turn(
            model,
            tokenizer,
            [state.context for state in active],
            max_new_tokens=max(1, min(max_new_tokens, room)),
            greedy=greedy,
            batch_size=batch_size,
        )
        generation_seconds += time.perf_counter() - started
        searches: list[tuple[_RolloutState, str]] = []
        for state, turn_ids in zip(active, turns):
            start = len(state.context)
            state.context.extend(turn_ids)
            state.turn_spans.append((start, len(state.context)))
            generated_tokens += len(turn_ids)
            text = _decode(tokenizer, turn_ids)
            state.turn_texts.append(text)
            state.pieces.append(text)
            action = parse_action(text)
            if action.kind == "answer":
                state.stop_reason = "answer"
            elif action.kind == "invalid":
                state.stop_reason = f"invalid: {action.reason}"
            elif turn == max_turns - 1:
                state.stop_reason = "max_turns"
            else:
                searches.append((state, action.content))
        if not searches:
            continue
        # -- retrieval: every query of this turn in one call -------------------------------
        started = time.perf_counter()
        results = retriever.search([query for _, query in searches], topk)
        retrieval_seconds += time.perf_counter() - started
        if len(results) != len(searches):
            raise ValueError(f"retriever returned {len(results)} results for {len(searches)} queries")
        for (state, query), documents in zip(searches, results):
            block = observation_block(format_observation(documents))
            block_ids = tokenizer(block, add_special_tokens=False)["input_ids"]
            if len(state.context) + len(block_ids) >= max_context_tokens:
                state.stop_reason = "context_full"
                continue
            start = len(state.context)
            state.context.extend(block_ids)
            state.observation_spans.append((start, len(state.context)))
            state.pieces.append(block)
            state.queries.append(query)

    trajectories = []
    for state in states:
        response = "".join(state.pieces[: 2 * len(state.turn_spans) - 1])
        trajectories.append(
            Trajectory(
                example=state.example,
                token_ids=state.context,
                prompt_length=state.prompt_length,
                turn_spans=state.turn_spans,
                observation_spans=state.observation_spans,
                turn_texts=state.turn_texts,
                final_response=response,
                outcome=float(outcome_reward(response, list(state.example.answers))),
                group_id=state.group_id,
                stop_reason=state.stop_reason or "max_turns",
                queries=state.queries,
            )
        )
    return RolloutResult(trajectories, generation_seconds, retrieval_seconds, generated_tokens)
