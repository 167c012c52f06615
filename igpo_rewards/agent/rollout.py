"""Multi-turn Search-R1 rollouts with an HF causal LM: batched sampling, retrieval, observations.

``generate_rollouts`` rolls out a FLAT list of prompts (token ids), all rows batched together
turn by turn (TRL's ``rollout_func`` gets each prompt repeated ``num_generations`` times and
passes them as they are; ``rollout_questions`` is the thin G-per-question layer on top):

1. the rollouts are cut into ``TurnGrid`` s of ``batch_size`` rows; every turn, each grid feeds
   its unfinished rollouts' NEW context tokens (the prompt, then the last observation) to the
   model on top of the KV cache it kept from the previous turns, and HF ``generate`` samples one
   turn (temperature 1, no top-k/top-p, so the tokens come from the same distribution whose
   log-probs the PPO ratio uses; or greedy), stopping a row at the first ``</search>`` or
   ``</answer>`` (``StopOnStrings``) or end-of-sequence (``cut_turn``);
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

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from igpo_rewards import _checks
from igpo_rewards.agent.probes import pad_token_ids
from igpo_rewards.agent.protocol import STOP_STRINGS, build_prompt, observation_block, parse_action
from igpo_rewards.agent.retrieval import Retriever, format_observation

__all__ = [
    "RolloutResult",
    "StopOnStrings",
    "TokenLayout",
    "Trajectory",
    "TurnGrid",
    "cut_turn",
    "generate_rollouts",
    "rollout_questions",
    "sample_turns",
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


class TurnGrid:
    """Rollouts generated together, turn after turn, with one KV cache kept between turns.

    Every row holds what its rollout has fed to the model so far, left to right: each turn
    appends the row's new context tokens (the prompt at turn 0, the observation after a search)
    as a left-padded block, then ``generate`` samples the turn. Everything that is not the
    rollout's own token (padding, and the tokens ``generate`` kept sampling after a row's stop
    string) stays in place as a hole: attention mask 0, so no real token sees it, and the
    position ids (the mask's cumulative sum) count only real tokens, exactly as in the
    rollout's ``token_ids``. So a turn feeds only its new tokens to the model, not the whole
    context again. Rows whose rollout ended are dropped (from the cache too) before the next turn.
    """

    def __init__(self, states: Sequence[Any]):
        self.states = list(states)
        self.fed = [0] * len(self.states)  # context tokens of each rollout already in the grid
        self.ids: torch.Tensor | None = None  # [R, W] long
        self.mask: torch.Tensor | None = None  # [R, W] long, 1 on the rollouts' own tokens
        self.cache: Any = None

    @property
    def contexts(self) -> list[list[int]]:
        """Each row's rollout context (its ``token_ids`` so far)."""
        return [state.context for state in self.states]

    def drop_finished(self) -> None:
        """Keep only the rows whose rollout goes on."""
        keep = [row for row, state in enumerate(self.states) if not state.stop_reason]
        if len(keep) == len(self.states):
            return
        self.states = [self.states[row] for row in keep]
        self.fed = [self.fed[row] for row in keep]
        if self.ids is not None:
            index = torch.tensor(keep, dtype=torch.long, device=self.ids.device)
            self.ids, self.mask = self.ids[index], self.mask[index]
            if self.cache is not None:
                self.cache.batch_select_indices(index)

    def extend(self, pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Append each row's new context tokens as a left-padded block; returns the whole grid."""
        new = [state.context[fed:] for state, fed in zip(self.states, self.fed)]
        width = max(len(tokens) for tokens in new)
        block = torch.full((len(new), width), pad_token_id, dtype=torch.long)
        block_mask = torch.zeros((len(new), width), dtype=torch.long)
        for row, tokens in enumerate(new):
            block[row, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
            block_mask[row, width - len(tokens) :] = 1
        self.fed = [len(state.context) for state in self.states]
        block, block_mask = block.to(device), block_mask.to(device)
        self.ids = block if self.ids is None else torch.cat([self.ids, block], dim=1)
        self.mask = block_mask if self.mask is None else torch.cat([self.mask, block_mask], dim=1)
        return self.ids, self.mask

    def record(self, sequences: torch.Tensor, turns: list[list[int]], cache: Any) -> None:
        """Keep what ``generate`` returned: the sampled tokens (a row's turn real, the rest holes) and the cache."""
        sampled = sequences.shape[1] - self.ids.shape[1]
        lengths = torch.tensor([len(turn) for turn in turns], device=sequences.device)
        turn_mask = (torch.arange(sampled, device=sequences.device)[None, :] < lengths[:, None]).long()
        self.ids, self.mask, self.cache = sequences, torch.cat([self.mask, turn_mask], dim=1), cache
        self.fed = [fed + len(turn) for fed, turn in zip(self.fed, turns)]


def _cache_keyword(model: Any) -> str:
    """``cache`` in transformers >= 5 (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"


def _shared_prompt_cache(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """The KV cache of a first turn's rows but their last column, each distinct row computed once.

    The G rollouts of a question start from the same prompt: their rows are identical, so the
    prompt is encoded once and its cache copied to every row (``generate`` then feeds only the
    last column). ``None`` when no row repeats another.
    """
    rows = [tuple(row) for row in ids.tolist()]
    first: dict[tuple[int, ...], int] = {}  # distinct row -> its first index
    for index, row in enumerate(rows):
        first.setdefault(row, index)
    if len(first) == len(rows) or ids.shape[1] < 2:
        return None
    position = {row: rank for rank, row in enumerate(first)}  # distinct row -> its row in the cache
    distinct = torch.tensor(list(first.values()), dtype=torch.long, device=ids.device)
    copy_of = torch.tensor([position[row] for row in rows], dtype=torch.long, device=ids.device)
    prompt_mask = mask[distinct, :-1]
    keyword = _cache_keyword(model)
    output = model.base_model(
        input_ids=ids[distinct, :-1], attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
    )
    cache = getattr(output, keyword)
    cache.batch_select_indices(copy_of)
    return cache


@torch.no_grad()
def sample_turns(model: Any, tokenizer: Any, grid: TurnGrid, *, max_new_tokens: int, greedy: bool = False) -> list[list[int]]:
    """Sample the next turn of every row of ``grid`` (in its order), continuing from its KV cache.

    ``generate`` runs on the grid (``TurnGrid.extend``) with ``sampling_config`` and
    ``StopOnStrings``; each row is then cut by ``cut_turn``. At the first turn, rows with the same
    prompt share its encoding (``_shared_prompt_cache``). Every returned turn has at least one
    token.
    """
    max_new_tokens = _checks.check_positive_count("max_new_tokens", max_new_tokens)
    config = sampling_config(tokenizer, model, max_new_tokens=max_new_tokens, greedy=greedy)
    config.return_dict_in_generate = True  # the output carries the cache
    ids, mask = grid.extend(config.pad_token_id, next(model.parameters()).device)
    if grid.cache is None:
        grid.cache = _shared_prompt_cache(model, ids, mask)
    keyword = _cache_keyword(model)
    output = model.generate(
        input_ids=ids,
        attention_mask=mask,
        generation_config=config,
        stopping_criteria=StoppingCriteriaList([StopOnStrings(tokenizer, ids.shape[1])]),
        **({keyword: grid.cache} if grid.cache is not None else {}),
    )
    eos_ids = _eos_ids(model, tokenizer)
    turns = [cut_turn(tokenizer, row, eos_ids) for row in output.sequences[:, ids.shape[1] :].tolist()]
    grid.record(output.sequences, turns, getattr(output, keyword, None))
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
        batch_size: rollouts generated together (one ``TurnGrid``, one ``generate`` call per
            turn, their KV cache kept between turns).

    Returns:
        ``RolloutResult`` with one trajectory per prompt, in order.

    Raises:
        TypeError: a count that is not an int.
        ValueError: a count < 1, an empty prompt, a prompt that leaves no room for a turn, or a
            retriever that answers another number of result lists than it got queries.
    """
    for name, count in dict(max_turns=max_turns, max_new_tokens=max_new_tokens, topk=topk, batch_size=batch_size).items():
        _checks.check_positive_count(name, count)
    _checks.check_optional_positive_count("max_context_tokens", max_context_tokens)
    if max_context_tokens is None:
        max_context_tokens = int(getattr(model.config, "max_position_embeddings", 4096))
    states = []
    for index, prompt in enumerate(prompts):
        if not 0 < len(prompt) < max_context_tokens:
            raise ValueError(f"prompts[{index}] has {len(prompt)} tokens; it needs 1 to max_context_tokens - 1 = {max_context_tokens - 1}")
        states.append(_RolloutState(list(map(int, prompt)), len(prompt)))
    grids = [TurnGrid(states[first : first + batch_size]) for first in range(0, len(states), batch_size)]
    result = RolloutResult([])
    for turn in range(max_turns):
        for grid in grids:
            grid.drop_finished()
        grids = [grid for grid in grids if grid.states]
        if not grids:
            break
        started = time.perf_counter()
        room = max_context_tokens - max(len(context) for grid in grids for context in grid.contexts)
        turns = [
            turn_ids
            for grid in grids
            for turn_ids in sample_turns(model, tokenizer, grid, max_new_tokens=max(1, min(max_new_tokens, room)), greedy=greedy)
        ]
        result.generation_seconds += time.perf_counter() - started
        result.generated_tokens += sum(len(turn_ids) for turn_ids in turns)
        active = [state for grid in grids for state in grid.states]
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
        TypeError / ValueError: ``group_size`` not an int / < 1, and whatever ``generate_rollouts`` raises.
    """
    _checks.check_positive_count("group_size", group_size)
    prompts = []
    for question in questions:
        prompt_ids = tokenizer(build_prompt(question, tokenizer), add_special_tokens=False)["input_ids"]
        prompts += [prompt_ids] * group_size
    return generate_rollouts(model, tokenizer, retriever, prompts, **kwargs)
