"""Multi-turn Search-R1 rollouts with an HF causal LM: batched sampling, retrieval, observations.

``generate_rollouts`` rolls out a FLAT list of prompts (token ids), all rows batched together
turn by turn (TRL's ``rollout_func`` gets each prompt repeated ``num_generations`` times and
passes them as they are; ``rollout_questions`` is the thin G-per-question layer on top):

1. every unfinished rollout's context (prompt + turns + observations so far) is left-padded
   into a batch and HF ``generate`` samples one turn (temperature 1, no top-k/top-p, so the
   tokens come from the same distribution whose log-probs the PPO ratio uses; or greedy),
   stopping a row at the first ``</search>`` or ``</answer>`` (``StopOnStrings``) or
   end-of-sequence;
2. ``protocol.parse_action`` reads the turn: an answer ends the rollout, an invalid turn
   (tag soup, no stop string, empty query) ends it too, a search is sent to the retriever;
3. all queries of the turn go to ``retriever.search`` in one call, and
   ``protocol.observation_block(retrieval.format_observation(docs))`` is tokenized and
   appended (observation tokens are context, never trained on);
4. after ``max_turns`` turns a rollout ends whatever it did.

Each ``Trajectory`` keeps the exact token ids that were fed to the model, so a training forward
scores the same tokens that were sampled (nothing is re-tokenized), the ``[start, end)`` spans
of its generated turns and of its observations (``turn_spans[j][0]`` is where the probe before
turn j cuts the context), and ``response``, the text an outcome reward scores
(``igpo_rewards.outcome_reward(response, answers)``; a rollout cut off by an invalid turn, by
``max_turns`` after a search, or by a full context window has no answer).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from igpo_rewards.agent.probes import pad_token_ids
from igpo_rewards.agent.protocol import STOP_STRINGS, build_prompt, observation_block, parse_action
from igpo_rewards.agent.retrieval import Retriever, format_observation

__all__ = [
    "RolloutResult",
    "StopOnStrings",
    "TokenLayout",
    "Trajectory",
    "cut_turn",
    "generate_rollouts",
    "generate_turn",
    "rollout_questions",
    "sampling_config",
    "token_layout",
]


@dataclass
class Trajectory:
    """One rollout: the exact token ids and where its turns and observations lie.

    Attributes:
        token_ids: prompt + every turn + every observation, exactly as fed to the model.
        prompt_length: number of prompt tokens at the start of ``token_ids``.
        turn_spans: ``[start, end)`` of the generated tokens of turn j in ``token_ids``
            (at least one turn, each non-empty).
        observation_spans: ``[start, end)`` of observation j, inserted after turn j; one fewer
            than the turns, or as many when the rollout ended on a full context.
        turn_texts: decoded text of each turn.
        response: all turn texts and observation blocks after the prompt, in order, up to the
            last turn (what an outcome reward scores).
        stop_reason: ``"answer"``, ``"invalid: <why>"``, ``"max_turns"`` or ``"context_full"``.
        queries: the search queries issued, one per observation.
    """

    token_ids: list[int]
    prompt_length: int
    turn_spans: list[tuple[int, int]]
    observation_spans: list[tuple[int, int]]
    turn_texts: list[str]
    response: str
    stop_reason: str = ""
    queries: list[str] = field(default_factory=list)

    @property
    def num_turns(self) -> int:
        """Number of turns n_i (>= 1)."""
        return len(self.turn_spans)

    @property
    def turn_starts(self) -> list[int]:
        """Where each turn starts; the probe before turn j sees ``token_ids[:turn_starts[j]]``."""
        return [start for start, _ in self.turn_spans]

    @property
    def answered(self) -> bool:
        """Whether the rollout ended with a well-formed answer turn."""
        return self.stop_reason == "answer"


class TokenLayout(NamedTuple):
    """Trajectories as right-padded tensors. B trajectories, S the longest, T the most turns.

    Attributes:
        input_ids: [B, S] long, each trajectory's ``token_ids`` then the pad id.
        lengths: [B] long.
        token_turn: [B, S] long, the turn j of every generated token (``turn_spans[j]``), -1 on
            prompt, observation and padding tokens: the token -> turn index of
            ``igpo_rewards.broadcast_to_tokens``; ``token_turn >= 0`` is the loss (or TRL
            ``env_mask``) mask.
        turn_starts: [B, T] long, where turn j starts (the probe before it sees
            ``input_ids[b, :turn_starts[b, j]]``); 0 at padded turns.
        turn_mask: [B, T] bool, the real turns (a prefix of each row).
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    token_turn: torch.Tensor
    turn_starts: torch.Tensor
    turn_mask: torch.Tensor


def token_layout(
    trajectories: Sequence[Trajectory], *, pad_token_id: int = 0, device: torch.device | str | None = None
) -> TokenLayout:
    """The ``TokenLayout`` of a batch of trajectories, read from their spans (no loop per token)."""
    input_ids, lengths = pad_token_ids([t.token_ids for t in trajectories], pad_token_id=pad_token_id, device=device)
    counts = torch.tensor([t.num_turns for t in trajectories], device=device)
    turn_mask = torch.arange(int(counts.max()), device=device)[None, :] < counts[:, None]
    spans = torch.zeros((*turn_mask.shape, 2), dtype=torch.long, device=device)
    spans[turn_mask] = torch.tensor([span for t in trajectories for span in t.turn_spans], dtype=torch.long, device=device)
    position = torch.arange(input_ids.shape[1], device=device)
    inside = (position >= spans[..., :1]) & (position < spans[..., 1:]) & turn_mask[..., None]  # [B, T, S]
    turn = torch.arange(turn_mask.shape[1], device=device)[None, :, None]
    token_turn = torch.where(inside.any(1), (inside * turn).sum(1), -1)
    return TokenLayout(input_ids, lengths, token_turn, spans[..., 0], turn_mask)


@dataclass
class RolloutResult:
    """Trajectories of one rollout call (in the order of its prompts) and where its time went."""

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
    context: list[int]
    prompt_length: int
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    observation_spans: list[tuple[int, int]] = field(default_factory=list)
    turn_texts: list[str] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    stop_reason: str = ""

    def trajectory(self) -> Trajectory:
        return Trajectory(
            token_ids=self.context,
            prompt_length=self.prompt_length,
            turn_spans=self.turn_spans,
            observation_spans=self.observation_spans,
            turn_texts=self.turn_texts,
            response="".join(self.pieces[: 2 * len(self.turn_spans) - 1]),
            stop_reason=self.stop_reason or "max_turns",
            queries=self.queries,
        )


def _check_counts(**counts: Any) -> None:
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _take_turns(tokenizer: Any, active: list[_RolloutState], turns: list[list[int]], last: bool) -> list[tuple[_RolloutState, str]]:
    """Append each sampled turn to its rollout; returns the rollouts that searched, with their query."""
    searches = []
    for state, turn_ids in zip(active, turns):
        start = len(state.context)
        state.context.extend(turn_ids)
        state.turn_spans.append((start, len(state.context)))
        text = _decode(tokenizer, turn_ids)
        state.turn_texts.append(text)
        state.pieces.append(text)
        action = parse_action(text)
        if action.kind == "answer":
            state.stop_reason = "answer"
        elif action.kind == "invalid":
            state.stop_reason = f"invalid: {action.reason}"
        elif last:
            state.stop_reason = "max_turns"
        else:
            searches.append((state, action.content))
    return searches


def _observe(tokenizer: Any, searches: list[tuple[_RolloutState, str]], results: list[list[Any]], max_context_tokens: int) -> None:
    """Append each search's observation block; a rollout whose block does not fit ends ("context_full")."""
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


def generate_rollouts(
    model: Any,
    tokenizer: Any,
    retriever: Retriever,
    prompts: Sequence[Sequence[int]],
    *,
    max_turns: int = 4,
    max_new_tokens: int = 64,
    topk: int = 3,
    greedy: bool = False,
    max_context_tokens: int | None = None,
    batch_size: int = 64,
) -> RolloutResult:
    """Roll out every prompt once (a flat list); see the module docstring for the loop.

    Args:
        model: an HF causal LM (generation runs without gradients; put it in eval mode).
        tokenizer: its tokenizer (decodes turns, encodes observation blocks).
        retriever: anything with ``search(queries, topk) -> list[list[Document]]``.
        prompts: the token ids of each rollout's prompt (e.g. ``protocol.build_prompt`` encoded
            with ``add_special_tokens=False``); repeat a prompt to roll it out several times.
        max_turns: the most turns a rollout takes (searches plus the answer).
        max_new_tokens: the most tokens sampled in one turn.
        topk: documents retrieved per search.
        greedy: greedy decoding instead of temperature-1 sampling (evaluation).
        max_context_tokens: the longest context; a rollout whose next observation would leave
            no room for a turn ends (``"context_full"``). Defaults to the model's
            ``max_position_embeddings``.
        batch_size: rows per ``generate`` call.

    Returns:
        ``RolloutResult`` with one trajectory per prompt, in order.

    Raises:
        ValueError: a bad count, an empty prompt, a prompt that leaves no room for a turn, or a
            retriever that answers another number of result lists than it got queries.
    """
    _check_counts(max_turns=max_turns, max_new_tokens=max_new_tokens, topk=topk)
    if max_context_tokens is None:
        max_context_tokens = int(getattr(model.config, "max_position_embeddings", 4096))
    states = []
    for index, prompt in enumerate(prompts):
        if not 0 < len(prompt) < max_context_tokens:
            raise ValueError(f"prompts[{index}] has {len(prompt)} tokens; it needs 1 to max_context_tokens - 1 = {max_context_tokens - 1}")
        states.append(_RolloutState(list(map(int, prompt)), len(prompt)))
    result = RolloutResult([])
    for turn in range(max_turns):
        active = [state for state in states if not state.stop_reason]
        if not active:
            break
        started = time.perf_counter()
        room = max_context_tokens - max(len(state.context) for state in active)
        turns = generate_turn(
            model, tokenizer, [state.context for state in active],
            max_new_tokens=max(1, min(max_new_tokens, room)), greedy=greedy, batch_size=batch_size,
        )
        result.generation_seconds += time.perf_counter() - started
        result.generated_tokens += sum(len(turn_ids) for turn_ids in turns)
        searches = _take_turns(tokenizer, active, turns, last=turn == max_turns - 1)
        if searches:
            started = time.perf_counter()
            documents = retriever.search([query for _, query in searches], topk)
            result.retrieval_seconds += time.perf_counter() - started
            _observe(tokenizer, searches, documents, max_context_tokens)
    result.trajectories = [state.trajectory() for state in states]
    return result


def rollout_questions(
    model: Any,
    tokenizer: Any,
    retriever: Retriever,
    questions: Sequence[str],
    *,
    group_size: int = 1,
    **kwargs: Any,
) -> RolloutResult:
    """``group_size`` rollouts of each question: rollouts ``g * G .. g * G + G - 1`` answer ``questions[g]``.

    Each question becomes the Search-R1 prompt (``protocol.build_prompt``, the tokenizer's chat
    template when it has one), tokenized once; ``kwargs`` go to ``generate_rollouts``.

    Raises:
        ValueError: ``group_size`` < 1, and whatever ``generate_rollouts`` raises.
    """
    _check_counts(group_size=group_size)
    prompts = []
    for question in questions:
        prompt_ids = tokenizer(build_prompt(question, tokenizer), add_special_tokens=False)["input_ids"]
        prompts += [prompt_ids] * group_size
    return generate_rollouts(model, tokenizer, retriever, prompts, **kwargs)
