"""Warm start: supervised fine-tuning on generated, deliberately imperfect demonstrations.

A demonstration of a world question follows its gold search chain: ``<search> q_k </search>``
for each gold query (the observation is what the retriever really returns for it, in the
same layout as a rollout), then ``<answer> a </answer>``. So the policy learns the protocol
and how to copy the next entity from an observation into the next query. To leave room for
RL (and above all on multi-hop questions) the demonstrations are imperfect on purpose:

- noisy query (``noisy_query_prob`` per search): the demonstration first searches for a wrong
  query (another entity's name, or only the last word of the right one), reads that result,
  then searches the right query: an extra turn, which on a 3-hop question runs past
  ``max_turns`` at RL time;
- skipped hop (``skip_hop_prob`` per multi-hop demonstration): the last search is left out and
  the demonstration answers the last bridge entity it found, a wrong answer;
- few SFT steps, so copying names is not yet reliable.

The loss is the mean negative log-likelihood of the generated (turn) tokens only: the prompt
and the observations are context. Demonstrations are ``rollout.QATrajectory`` objects, so they
become the same ``batch.RolloutBatch`` as RL rollouts and go through the same forwards
(``igpo_rewards.agent.probes.token_logprobs``, ``probe_forward`` for the probe term).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from igpo_rewards.reference_trainer.config import WarmStartConfig
from igpo_rewards.agent.probes import pad_token_ids, probe_forward, token_logprobs
from igpo_rewards.agent.protocol import ANSWER_CLOSE, ANSWER_OPEN, SEARCH_CLOSE, SEARCH_OPEN, build_prompt, observation_block
from igpo_rewards.agent.retrieval import format_observation
from igpo_rewards.reference_trainer.batch import build_batch
from igpo_rewards.reference_trainer.rollout import QATrajectory


class CachedRetriever:
    """Wraps a retriever and remembers the documents of every (query, topk) it has answered."""

    def __init__(self, retriever: Any):
        self.retriever = retriever
        self.cache: dict[tuple[str, int], list[Any]] = {}

    def search(self, queries: list[str], topk: int = 3) -> list[list[Any]]:
        missing = [query for query in dict.fromkeys(queries) if (query, topk) not in self.cache]
        if missing:
            for query, documents in zip(missing, self.retriever.search(missing, topk)):
                self.cache[(query, topk)] = documents
        return [self.cache[(query, topk)] for query in queries]


class RenamingRetriever:
    """Shows a retriever's world with one person renamed: ``old`` reads ``new`` everywhere.

    Queries that mention the new name (or its last word) are sent with the old one, and every
    returned document has the old full name replaced by the new one, so a demonstration about
    a renamed person is self-consistent.
    """

    def __init__(self, retriever: Any, old: str, new: str):
        self.retriever, self.old, self.new = retriever, old, new

    def _to_old(self, query: str) -> str:
        query = query.replace(self.new, self.old)
        old_last, new_last = self.old.split()[-1], self.new.split()[-1]
        return " ".join(old_last if word == new_last else word for word in query.split())

    def search(self, queries: list[str], topk: int = 3) -> list[list[Any]]:
        results = self.retriever.search([self._to_old(query) for query in queries], topk)
        return [
            [dataclasses.replace(doc, title=doc.title.replace(self.old, self.new), text=doc.text.replace(self.old, self.new)) for doc in docs]
            for docs in results
        ]


def renamed(example: Any, old: str, new: str) -> Any:
    """``example`` with the person ``old`` renamed ``new`` in the question and the gold chain."""
    return dataclasses.replace(
        example,
        question=example.question.replace(old, new),
        gold_queries=tuple(query.replace(old, new) for query in example.gold_queries),
        gold_bridge_answers=tuple(bridge.replace(old, new) for bridge in example.gold_bridge_answers),
    )


class NamePool:
    """Fresh person names: a first name and a last name of two (different) training people.

    Names that belong to a document title of the corpus are never drawn, so a renamed person
    never collides with a real one.
    """

    def __init__(self, people: Sequence[str], taken: set[str]):
        two_word = [name.split() for name in people if len(name.split()) == 2]
        self.first = sorted({parts[0] for parts in two_word})
        self.last = sorted({parts[1] for parts in two_word})
        self.taken = set(taken)

    def draw(self, rng: random.Random) -> str | None:
        if not self.first or not self.last:
            return None
        for _ in range(100):
            name = f"{rng.choice(self.first)} {rng.choice(self.last)}"
            if name not in self.taken:
                return name
        return None


def demonstration_turns(
    example: Any,
    rng: random.Random,
    *,
    noisy_query_prob: float,
    skip_hop_prob: float,
    think_prob: float,
    distractors: Sequence[str],
) -> list[tuple[str, str | None]]:
    """The turns of one demonstration: ``(turn text, query or None)``; the last turn answers.

    Args:
        example: a ``QAExample`` with ``gold_queries`` and ``gold_bridge_answers``.
        rng: the source of the deliberate mistakes.
        noisy_query_prob, skip_hop_prob, think_prob: see ``WarmStartConfig``.
        distractors: names a noisy query may use instead of the right one.

    Raises:
        ValueError: an example without a gold search chain.

    Example:
        >>> from igpo_rewards.reference_trainer.world import QAExample
        >>> example = QAExample("In which country was Ilsa Marr born?", ("Tovia",), 2, "world",
        ...                     ("Ilsa Marr", "Kelm"), ("Kelm", "Tovia"))
        >>> demonstration_turns(example, random.Random(0), noisy_query_prob=0.0, skip_hop_prob=0.0,
        ...                     think_prob=0.0, distractors=[])
        [('<search> Ilsa Marr </search>', 'Ilsa Marr'), ('<search> Kelm </search>', 'Kelm'), ('<answer> Tovia </answer>', None)]
    """
    queries, bridges = list(example.gold_queries), list(example.gold_bridge_answers)
    if not queries or len(queries) != len(bridges):
        raise ValueError(
            f"a demonstration needs gold_queries and gold_bridge_answers of the same non-zero length, got "
            f"{len(queries)} and {len(bridges)} for {example.question!r}"
        )
    answer = bridges[-1]
    if len(queries) > 1 and rng.random() < skip_hop_prob:
        queries, answer = queries[:-1], bridges[-2]

    def think(text: str) -> str:
        return f"<think> {text} </think> " if rng.random() < think_prob else ""

    turns: list[tuple[str, str | None]] = []
    for query in queries:
        if rng.random() < noisy_query_prob:
            words = query.split()
            candidates = [name for name in distractors if name != query]
            if len(words) > 1 and (not candidates or rng.random() < 0.5):
                noisy = words[-1]
            elif candidates:
                noisy = rng.choice(candidates)
            else:
                noisy = None
            if noisy is not None:
                turns.append((f"{think(f'I need to find {noisy}.')}{SEARCH_OPEN} {noisy} {SEARCH_CLOSE}", noisy))
        turns.append((f"{think(f'I need to find {query}.')}{SEARCH_OPEN} {query} {SEARCH_CLOSE}", query))
    turns.append((f"{think(f'The answer is {answer}.')}{ANSWER_OPEN} {answer} {ANSWER_CLOSE}", None))
    return turns


def build_demonstration(
    example: Any, turns: Sequence[tuple[str, str | None]], tokenizer: Any, retriever: Any, *, topk: int
) -> QATrajectory:
    """Tokenize a demonstration in exactly the layout of a rollout (prompt, turns, observation blocks)."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    token_ids = encode(build_prompt(example.question, tokenizer))
    prompt_length = len(token_ids)
    turn_spans, observation_spans, pieces, queries = [], [], [], []
    for index, (text, query) in enumerate(turns):
        ids = encode(text)
        turn_spans.append((len(token_ids), len(token_ids) + len(ids)))
        token_ids += ids
        pieces.append(text)
        if index < len(turns) - 1:
            if query is None:
                raise ValueError(f"turn {index} of a demonstration must be a search, got {text!r}")
            block = observation_block(format_observation(retriever.search([query], topk)[0]))
            ids = encode(block)
            observation_spans.append((len(token_ids), len(token_ids) + len(ids)))
            token_ids += ids
            pieces.append(block)
            queries.append(query)
    return QATrajectory(
        token_ids=token_ids,
        prompt_length=prompt_length,
        turn_spans=turn_spans,
        observation_spans=observation_spans,
        turn_texts=[text for text, _ in turns],
        response="".join(pieces),
        stop_reason="answer",
        queries=queries,
        example=example,
    )


def sft_loss(
    model: Any,
    tokenizer: Any,
    demonstrations: Sequence[QATrajectory],
    *,
    probe_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SFT loss: mean negative log-likelihood of the generated (turn) tokens, plus the probe term.

    All turn tokens of the batch weigh the same (prompt and observation tokens are context).
    With ``probe_weight > 0`` the forward also runs the ground-truth probe before every turn
    (``probe_forward``), and the loss adds ``probe_weight`` times the negative length-normalized
    answer log-prob (``answer_logprob``) of the LAST probe of each demonstration that ends with
    the right answer: the one whose context holds every retrieved fact. A model built from
    scratch has never seen the probe's "answer now" text; this teaches it to answer from the
    context after it, so its probe measures its belief in the answer (earlier probes, whose
    context lacks the answer, are left alone and stay low). Returns ``(loss, {"sft": ...,
    "probe": ...})``.
    """
    use_probes = probe_weight > 0
    device = next(model.parameters()).device
    batch = build_batch(demonstrations, tokenizer, probes=use_probes, device=device)
    mask = batch.loss_mask
    if use_probes:
        out = probe_forward(model, batch.input_ids, batch.lengths, batch.turn_starts, batch.turn_mask, batch.suffixes, token_mask=mask)
        logprobs = out.token_logprobs
    else:
        logprobs, _ = token_logprobs(model, batch.input_ids, mask)
    loss = -(logprobs * mask).sum() / mask.sum().clamp(min=1)
    parts = {"sft": float(loss.detach())}
    rows = [row for row, demonstration in enumerate(demonstrations) if _answers_right(demonstration)] if use_probes else []
    if rows:
        index = torch.tensor(rows, device=device)
        probe_nll = -out.answer_logprob[index, batch.turn_mask[index].sum(1) - 1].mean()
        loss = loss + probe_weight * probe_nll
        parts["probe"] = float(probe_nll.detach())
    return loss, parts


def _answers_right(demonstration: QATrajectory) -> bool:
    """Whether a demonstration's final answer is the gold one (a skipped hop answers a bridge)."""
    return demonstration.turn_texts[-1] == f"{ANSWER_OPEN} {demonstration.example.answers[0]} {ANSWER_CLOSE}"


def learning_rate_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of ``peak`` at step ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def pretraining_documents(corpus: Sequence[Any], examples: Sequence[Any]) -> tuple[list[Any], set[str]]:
    """The documents the language-model phase reads, and which of them are about people.

    Only documents about the training questions' entities (their gold queries and bridge
    entities): the documents of held-out people are never read, so nothing about them is
    learned before RL. The people (first gold query of each question) are renamed at every
    draw by ``pretrain_language_model``, so no fact about a person can be memorised either.
    """
    people = {example.gold_queries[0] for example in examples if example.gold_queries}
    entities = people | {name for example in examples for name in (*example.gold_queries, *example.gold_bridge_answers)}
    return [doc for doc in corpus if doc.title in entities], people


def pretrain_language_model(
    model: Any,
    tokenizer: Any,
    corpus: Sequence[Any],
    examples: Sequence[Any],
    config: WarmStartConfig,
    rng: random.Random,
    *,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Next-token prediction on corpus documents (people renamed at random), before SFT.

    A model built from scratch first learns the language of the documents, above all to copy
    a name it has just read: every person document repeats its subject's name, and the name is
    a fresh random one at every draw, so it can only be predicted by copying.
    """
    documents, people = pretraining_documents(corpus, examples)
    if not documents:
        return []
    names = NamePool(sorted(people), {doc.title for doc in corpus})
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    history = []
    model.train()
    bar = tqdm(range(config.pretrain_steps), desc="warm start: language model", disable=not progress, leave=False)
    for step in bar:
        texts = []
        for doc in (rng.choice(documents) for _ in range(config.pretrain_batch_size)):
            contents = doc.contents
            new = names.draw(rng) if doc.title in people else None
            texts.append(contents.replace(doc.title, new) if new else contents)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config.pretrain_steps, config.learning_rate, config.warmup_steps)
        token_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        input_ids, lengths = pad_token_ids(token_ids, pad_token_id=tokenizer.pad_token_id or 0, device=device)
        position = torch.arange(input_ids.shape[1], device=device)[None, :]
        mask = (position > 0) & (position < lengths[:, None])  # every token after the first
        logprobs, _ = token_logprobs(model, input_ids, mask)
        loss = -(logprobs * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append({"phase": "pretrain", "step": step + 1, "loss": float(loss.detach())})
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    model.eval()
    return history


def demonstrated_questions(examples: Sequence[Any], max_hops: int) -> list[Any]:
    """The questions SFT demonstrates: those with a gold search chain of at most ``max_hops``
    hops (``0``: every one with a chain). The sparse preset sets 2, so the warm start never
    sees a 3- or 4-hop chain and rarely solves one: RL has to discover the longer chains.

    Raises:
        ValueError: no question is left.

    Example:
        >>> from igpo_rewards.reference_trainer.world import QAExample
        >>> chain = lambda hops: QAExample("q", ("a",), hops, "world", ("x",) * hops, ("y",) * (hops - 1) + ("a",))
        >>> [example.hops for example in demonstrated_questions([chain(1), chain(3), chain(2)], 2)]
        [1, 2]
    """
    chains = [example for example in examples if example.gold_queries]
    kept = [example for example in chains if not max_hops or example.hops <= max_hops]
    if not kept:
        raise ValueError(f"warm_start.max_hops = {max_hops} leaves no question to demonstrate "
                         f"(hop counts present: {sorted({example.hops for example in chains})})")
    return kept


def warm_start(
    model: Any,
    tokenizer: Any,
    retriever: Any,
    examples: Sequence[Any],
    config: WarmStartConfig,
    *,
    corpus: Sequence[Any] | None = None,
    topk: int = 3,
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Train ``model`` in place: language-model phase on ``corpus``, then SFT on demonstrations.

    The language-model phase (``pretrain_language_model``, ``config.pretrain_steps``; skipped
    without a corpus) is for models built from scratch. SFT: each step draws
    ``config.batch_size`` questions (a seeded ``random.Random``; only those of at most
    ``config.max_hops`` hops when it is set), renames the person of each
    with probability ``config.rename_prob`` (a fresh name, so the policy must copy the name
    from the question and read the person's facts from the observation instead of recalling
    them), writes one demonstration with its own mistakes (``demonstration_turns``) and takes
    one AdamW step on ``sft_loss`` with gradient-norm clipping at 1. Questions without a gold
    search chain (real datasets) cannot be demonstrated: they are left out, and ``ValueError`` is
    raised only when none of ``examples`` has one. The learning rate warms up linearly over
    ``config.warmup_steps``, then decays by a cosine to 10% (``learning_rate_at``). During the
    last ``config.probe_fraction`` of the steps the loss also has the probe term (see
    ``sft_loss``), once the policy has learned to copy. Returns the per-step losses of both
    phases.
    """
    usable = [example for example in examples if example.gold_queries]
    if not usable:
        raise ValueError(
            "warm start needs questions with gold search chains (the synthetic world's); "
            f"none of the {len(examples)} given has gold_queries"
        )
    rng = random.Random(seed)
    history: list[dict[str, float]] = []
    if corpus is not None and config.pretrain_steps > 0:
        history += pretrain_language_model(model, tokenizer, corpus, usable, config, rng, progress=progress)

    demonstrated = demonstrated_questions(usable, config.max_hops)
    distractors = sorted({name for example in demonstrated for name in example.gold_bridge_answers})
    names = NamePool(sorted({example.gold_queries[0] for example in usable}), {doc.title for doc in corpus or []})
    cached = CachedRetriever(retriever)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    model.train()
    bar = tqdm(range(config.steps), desc="warm start: SFT", disable=not progress, leave=False)
    for step in bar:
        demonstrations = []
        for example in (rng.choice(demonstrated) for _ in range(config.batch_size)):
            source = cached
            new = names.draw(rng) if rng.random() < config.rename_prob else None
            if new is not None:
                old = example.gold_queries[0]
                example, source = renamed(example, old, new), RenamingRetriever(cached, old, new)
            turns = demonstration_turns(
                example,
                rng,
                noisy_query_prob=config.noisy_query_prob,
                skip_hop_prob=config.skip_hop_prob,
                think_prob=config.think_prob,
                distractors=distractors,
            )
            demonstrations.append(build_demonstration(example, turns, tokenizer, source, topk=topk))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config.steps, config.learning_rate, config.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        probe_on = step >= round(config.steps * (1.0 - config.probe_fraction))
        loss, parts = sft_loss(model, tokenizer, demonstrations, probe_weight=config.probe_weight if probe_on else 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append({"phase": "sft", "step": step + 1, "loss": float(loss.detach()), **parts,
                        "learning_rate": optimizer.param_groups[0]["lr"]})
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    model.eval()
    return history
