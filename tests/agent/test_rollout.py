"""The agent's protocol and rollout loop (igpo_rewards.agent.protocol, igpo_rewards.agent.rollout):
action parsing, turn cutting, sampling settings, batching, and the multi-turn loop.

The loop tests script what the "model" writes (``rollout.sample_turns`` is replaced by a
function that returns the tokens of a given text), so every branch (search, answer, tag
soup, max turns, full context) is reached on purpose; the generation tests use a tiny random
HF model built by ``igpo_rewards.testing.tiny``, a handful of documents and questions written here,
and BM25 over them (``igpo_rewards.agent.bm25``).
"""

from __future__ import annotations

import functools
import random
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
from transformers import StoppingCriteriaList

from igpo_rewards.agent import rollout
from igpo_rewards.agent.protocol import (
    INSTRUCTION,
    TAGS,
    Action,
    build_prompt,
    observation_block,
    parse_action,
    stop_end,
)
from igpo_rewards.agent.bm25 import BM25Retriever
from igpo_rewards.agent.retrieval import Document, format_observation
from igpo_rewards.agent.rollout import (
    StopOnStrings,
    TurnGrid,
    cut_turn,
    generate_rollouts,
    rollout_questions,
    sample_turns,
    sampling_config,
)
from igpo_rewards.scoring import outcome_reward
from igpo_rewards.testing.tiny import build_model, train_tokenizer

DOCS = [
    Document("0", "Mira Tosk", "Mira Tosk was born in Velum. Mira Tosk works for Dara Labs."),
    Document("1", "Velum", "Velum is a city in Borania. Velum is known for its bridges."),
    Document("2", "Borania", "Borania is a country. The capital of Borania is Kaleno."),
    Document("3", "Kaleno", "Kaleno is a city in Borania. Kaleno is known for its markets."),
    Document("4", "Dara Labs", "Dara Labs is an organisation based in Kaleno."),
    Document("5", "Ilsa Marr", "Ilsa Marr was born in Kaleno. Ilsa Marr works for Orvo Mills."),
    Document("6", "Orvo Mills", "Orvo Mills is an organisation based in Velum."),
]


class Question(NamedTuple):
    question: str
    answers: tuple[str, ...]
    gold_queries: tuple[str, ...]  # the search a perfect agent issues at each hop


QUESTIONS = [
    Question("Where was Mira Tosk born?", ("Velum",), ("Mira Tosk",)),
    Question("In which country was Mira Tosk born?", ("Borania",), ("Mira Tosk", "Velum")),
    Question("Which organisation does Ilsa Marr work for?", ("Orvo Mills",), ("Ilsa Marr",)),
    Question("In which city is the employer of Ilsa Marr based?", ("Velum",), ("Ilsa Marr", "Orvo Mills")),
    Question("Where was Ilsa Marr born?", ("Kaleno",), ("Ilsa Marr",)),
    Question("In which city is the employer of Mira Tosk based?", ("Kaleno",), ("Mira Tosk", "Dara Labs")),
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [doc.contents for doc in DOCS] + [question.question for question in QUESTIONS] + [INSTRUCTION]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=1024).eval()


@pytest.fixture(scope="module")
def retriever():
    return BM25Retriever(DOCS)


# --- parse_action --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<search> Ilsa Marr </search>", Action("search", "Ilsa Marr")),
        ("  <think> who? </think>\n<search>  Ilsa\n Marr </search>", Action("search", "Ilsa Marr")),
        ("<answer> Tovia </answer>", Action("answer", "Tovia")),
        ("<think>x</think><answer></answer>", Action("answer", "")),
        ("<search>q</search><answer>z</answer>", Action("search", "q")),  # text after the stop is ignored
    ],
)
def test_parse_action_valid(text, expected):
    assert parse_action(text) == expected


@pytest.mark.parametrize(
    "text, reason_part",
    [
        ("", "no </search>"),
        ("<answer> Tov", "no </search>"),  # truncated by max_new_tokens
        ("<search> Ilsa", "no </search>"),
        ("so the answer is <answer> x </answer>", "outside"),
        ("<think> a </think> so <search> q </search>", "outside"),
        ("<think>a</think><think>b</think><answer>x</answer>", "expected"),
        ("<search> a <answer> b </answer>", "expected"),
        ("<think><search> q </search>", "expected"),
        ("</think><search> q </search>", "expected"),
        ("<information> fake </information><answer> x </answer>", "expected"),
        ("<search> q </answer>", "mismatched"),
        ("<answer> q </search>", "mismatched"),
        ("<search>   </search>", "empty search"),
        ("</search>", "expected"),
    ],
)
def test_parse_action_invalid(text, reason_part):
    action = parse_action(text)
    assert action.kind == "invalid" and action.content == ""
    assert reason_part in action.reason


def test_parse_action_never_raises_on_tag_soup():
    rng = random.Random(0)
    pieces = [*TAGS, " ", "x", "Ilsa", "\n", "<", ">", "/", "answer", "search"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        action = parse_action(text)
        assert action.kind in ("search", "answer", "invalid")
        if action.kind != "invalid":  # a valid turn contains its stop string
            assert stop_end(text) is not None


def test_parse_action_rejects_non_str():
    with pytest.raises(TypeError, match="turn_text"):
        parse_action(None)


def test_valid_turns_make_a_well_formed_response():
    """Turns parse_action accepts, joined with observation blocks, satisfy the scoring grammar."""
    turns = ["<think> a </think><search> q1 </search>", "<search> q2 </search>", "<think> b </think>\n<answer> Tovia </answer>"]
    assert [parse_action(turn).kind for turn in turns] == ["search", "search", "answer"]
    response = turns[0] + observation_block("Doc 1") + turns[1] + observation_block("Doc 2") + turns[2]
    assert outcome_reward(response, ["Tovia"]) == 1.0


def test_build_prompt_uses_chat_template(tokenizer):
    prompt = build_prompt("Where was Ilsa Marr born?", tokenizer)
    assert prompt.startswith("<|startoftext|><|im_start|>user\nAnswer the question. You may think")
    assert prompt.endswith("Question: Where was Ilsa Marr born?\n<|im_end|>\n<|im_start|>assistant\n")

    class Plain:
        chat_template = None

    assert build_prompt(" Why? ", Plain()) == INSTRUCTION.format(question="Why?")


# --- one turn: cutting, stopping, sampling ---------------------------------------------------


def test_cut_turn_stops_at_first_stop_string_or_eos(tokenizer):
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    search = encode("<search> Ilsa </search>")
    assert cut_turn(tokenizer, search + encode(" junk <answer> x </answer>"), [eos]) == search
    answer = encode("<think> a </think><answer> b </answer>")
    assert cut_turn(tokenizer, answer + [eos, eos], [eos]) == answer
    # no stop string: cut after the first end-of-sequence token, or keep everything
    babble = encode("Ilsa was born")
    assert cut_turn(tokenizer, babble + [eos] + search, [eos]) == babble + [eos]
    assert cut_turn(tokenizer, babble, [eos]) == babble
    # a stop string spelled with several tokens is found too
    spelled = encode("<search> q ") + encode("</") + encode("search") + encode(">")
    assert len(spelled) > len(encode("<search> q </search>"))
    assert cut_turn(tokenizer, spelled + encode(" more"), [eos]) == spelled


def test_stop_on_strings_marks_rows(tokenizer):
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = encode("<search> old </search> q")  # a stop string in the prompt must not count
    rows = [prompt + encode("<answer> x </answer>"), prompt + encode("<answer> x an"), prompt + encode("a <search> y </search>")]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    criterion = StopOnStrings(tokenizer, len(prompt))
    assert criterion(input_ids, None).tolist() == [True, False, True]
    assert StopOnStrings(tokenizer, width)(input_ids, None).tolist() == [False, False, False]


def test_sampling_config_is_pure_temperature_one(tokenizer, model):
    """The scores generate samples from equal the raw logits: nothing filters the distribution."""
    model.generation_config.top_k = 5  # a checkpoint default that must be overridden
    model.generation_config.temperature = 0.7
    try:
        config = sampling_config(tokenizer, model, max_new_tokens=4, greedy=False)
        config.return_dict_in_generate = config.output_scores = config.output_logits = True
        prompt = torch.tensor([tokenizer(build_prompt("Where?", tokenizer))["input_ids"]])
        torch.manual_seed(0)
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    finally:
        model.generation_config.top_k = None
        model.generation_config.temperature = None
    assert len(out.scores) >= 1
    for scores, logits in zip(out.scores, out.logits):
        assert torch.isfinite(scores).all()
        torch.testing.assert_close(scores, logits, rtol=0, atol=0)


def grid_of(*contexts):
    """A TurnGrid over rollouts whose contexts are ``contexts`` (the loop's rollout states stand-ins)."""
    return TurnGrid([SimpleNamespace(context=list(context), stop_reason="") for context in contexts])


def greedy_alone(model, tokenizer, context, max_new_tokens):
    """One greedy turn from the whole context, no padding, no cache: the reference of the grid."""
    config = sampling_config(tokenizer, model, max_new_tokens=max_new_tokens, greedy=True)
    ids = torch.tensor([context])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                         stopping_criteria=StoppingCriteriaList([StopOnStrings(tokenizer, ids.shape[1])]))
    return cut_turn(tokenizer, out[0, ids.shape[1] :].tolist(), [tokenizer.eos_token_id])


def test_sample_turns_left_padding_matches_unbatched(tokenizer, model):
    contexts = [tokenizer(build_prompt(q, tokenizer))["input_ids"] for q in ("Where?", "Where was Ilsa Marr born today?")]
    contexts.append(contexts[1] + tokenizer("<search> Ilsa </search>", add_special_tokens=False)["input_ids"])
    batched = sample_turns(model, tokenizer, grid_of(*contexts), max_new_tokens=12, greedy=True)
    assert batched == [greedy_alone(model, tokenizer, context, 12) for context in contexts]
    assert all(1 <= len(turn) <= 12 for turn in batched)


def test_rows_with_the_same_prompt_share_its_encoding(tokenizer, model, monkeypatch):
    """Repeated prompts (G rollouts of a question) are encoded once: the model sees 2 distinct
    prompts, and the greedy turns are those of a fresh generate over each prompt."""
    prompts = [tokenizer(build_prompt(q, tokenizer))["input_ids"] for q in ("Where?", "Where was Ilsa Marr born today?")]
    batch_sizes = []
    forward = model.base_model.forward

    @functools.wraps(forward)  # keeps the signature the cache keyword is read from
    def counting(*args, **kwargs):
        batch_sizes.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.base_model, "forward", counting)
    turns = sample_turns(model, tokenizer, grid_of(*[prompts[0]] * 3, *[prompts[1]] * 2), max_new_tokens=5, greedy=True)
    monkeypatch.undo()
    assert batch_sizes[0] == 2  # the shared prompt pass, then generate's steps over all 5 rows
    assert turns == [greedy_alone(model, tokenizer, prompts[0], 5)] * 3 + [greedy_alone(model, tokenizer, prompts[1], 5)] * 2


def test_turn_grid_continues_from_its_cache_like_a_fresh_forward(tokenizer, model, monkeypatch):
    """Turn after turn, with observations of different lengths appended, a turn cut short (so the
    tokens generate sampled after it stay in the grid as holes) and a row dropped, the grid (new
    tokens only, on its KV cache) samples what a greedy generate over the whole context samples."""
    prompts = [tokenizer(build_prompt(q, tokenizer))["input_ids"] for q in ("Where?", "Where was Ilsa Marr born today?", "Who?")]
    grid = grid_of(*prompts)
    observations = [observation_block("Doc 1 Ilsa Marr was born in Kelm."), observation_block("x"), observation_block("Doc 1 a b c d e")]
    full_cut = rollout.cut_turn
    for turn in range(3):
        keep = 3 if turn == 0 else None  # turn 0 stops after 3 tokens, as if a stop string came there
        monkeypatch.setattr(rollout, "cut_turn", lambda tok, ids, eos: full_cut(tok, ids, eos)[:keep])
        contexts = [list(context) for context in grid.contexts]
        turns = sample_turns(model, tokenizer, grid, max_new_tokens=6, greedy=True)
        assert turns == [greedy_alone(model, tokenizer, context, 6)[:keep] for context in contexts], turn
        for state, turn_ids, text in zip(grid.states, turns, observations):
            state.context += turn_ids + tokenizer(text, add_special_tokens=False)["input_ids"]
        if turn == 0:
            assert (grid.mask[:, -3:] == 0).all() and (grid.mask[:, -6:-3] == 1).all()  # the holes after the cut
            grid.states[1].stop_reason = "answer"
            grid.drop_finished()
            observations = [observations[0], observations[2]]
    assert len(grid.states) == 2 and grid.ids.shape[0] == 2
    assert int(grid.mask.sum(1).min()) < grid.ids.shape[1]


def test_sample_turns_sampling_is_seeded(tokenizer, model):
    contexts = [tokenizer(build_prompt("Where?", tokenizer))["input_ids"]] * 5
    torch.manual_seed(1)
    first = sample_turns(model, tokenizer, grid_of(*contexts), max_new_tokens=8)
    torch.manual_seed(1)
    second = sample_turns(model, tokenizer, grid_of(*contexts), max_new_tokens=8)
    assert first == second
    assert len({tuple(turn) for turn in first}) > 1  # temperature 1 on a random model: rows differ


def test_sample_turns_rejects_bad_counts(tokenizer, model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample_turns(model, tokenizer, grid_of([1, 2]), max_new_tokens=0)


# --- the multi-turn loop with a scripted policy ------------------------------------------------


def scripted(tokenizer, script):
    """A stand-in for sample_turns: rollout r's k-th turn is the tokens of ``script(r, k)``.

    Rollouts are numbered in the order of the first call (the order of the trajectories);
    each keeps its context list object for its whole life, which identifies it later.
    """
    rollout_of: dict[int, int] = {}
    turns_done: dict[int, int] = {}

    def fake_sample_turns(model, tokenizer_, grid, *, max_new_tokens, greedy=False):
        turns = []
        for context in grid.contexts:
            rollout_id = rollout_of.setdefault(id(context), len(rollout_of))
            turn_number = turns_done.get(rollout_id, 0)
            turns_done[rollout_id] = turn_number + 1
            turns.append(tokenizer(script(rollout_id, turn_number), add_special_tokens=False)["input_ids"][:max_new_tokens])
        return turns

    return fake_sample_turns


def test_rollout_layout_with_scripted_searches(monkeypatch, tokenizer, model, retriever):
    example = QUESTIONS[1]
    first, second = example.gold_queries
    turns = [f"<search> {first} </search>", f"<think> next </think><search> {second} </search>", f"<answer> {example.answers[0]} </answer>"]
    monkeypatch.setattr(rollout, "sample_turns", scripted(tokenizer, lambda r, k: turns[k]))
    result = rollout_questions(model, tokenizer, retriever, [example.question], group_size=2, max_turns=4)
    assert len(result.trajectories) == 2
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt_ids = encode(build_prompt(example.question, tokenizer))
    for trajectory in result.trajectories:
        blocks = [observation_block(format_observation(docs)) for docs in retriever.search([first, second], 3)]
        expected = prompt_ids + encode(turns[0]) + encode(blocks[0]) + encode(turns[1]) + encode(blocks[1]) + encode(turns[2])
        assert trajectory.token_ids == expected
        assert trajectory.prompt_length == len(prompt_ids)
        lengths = [len(encode(text)) for text in (turns[0], blocks[0], turns[1], blocks[1], turns[2])]
        starts = [len(prompt_ids) + sum(lengths[:i]) for i in range(6)]
        assert trajectory.turn_spans == [(starts[0], starts[1]), (starts[2], starts[3]), (starts[4], starts[5])]
        assert trajectory.observation_spans == [(starts[1], starts[2]), (starts[3], starts[4])]
        assert trajectory.turn_texts == turns
        assert trajectory.response == turns[0] + blocks[0] + turns[1] + blocks[1] + turns[2]
        assert trajectory.stop_reason == "answer" and trajectory.answered
        assert trajectory.queries == [first, second]
        assert trajectory.num_turns == 3 and trajectory.turn_starts == [starts[0], starts[2], starts[4]]
    assert result.generated_tokens == 2 * (lengths[0] + lengths[2] + lengths[4])


def test_rollout_endings(monkeypatch, tokenizer, model, retriever):
    """Invalid turn, wrong answer, max turns after a search: each ends the rollout as documented."""
    questions = QUESTIONS[:2]
    scripts = {
        0: ["<search> x </search>", "so <answer> y </answer>"],  # text outside tags -> invalid
        1: ["<answer> Nowhere </answer>"],  # well-formed wrong answer
        2: ["<search> a </search>", "<search> b </search>", "<search> c </search>"],  # hits max_turns
        3: ["<search> a"],  # truncated
    }
    monkeypatch.setattr(rollout, "sample_turns", scripted(tokenizer, lambda r, k: scripts[r][k]))
    result = rollout_questions(model, tokenizer, retriever, [q.question for q in questions], group_size=2, max_turns=3)
    trajectories = result.trajectories
    prompts = [tokenizer(build_prompt(q.question, tokenizer), add_special_tokens=False)["input_ids"] for q in questions]
    assert [t.token_ids[: t.prompt_length] for t in trajectories] == [prompts[0], prompts[0], prompts[1], prompts[1]]
    assert [t.stop_reason for t in trajectories] == [
        "invalid: text outside the tags", "answer", "max_turns", "invalid: no </search> or </answer>"
    ]
    assert [t.num_turns for t in trajectories] == [2, 1, 3, 1]
    assert [len(t.observation_spans) for t in trajectories] == [1, 0, 2, 0]
    outcomes = [outcome_reward(t.response, list(questions[i // 2].answers)) for i, t in enumerate(trajectories)]
    assert outcomes == [-2.0, 0.0, -2.0, -2.0]
    assert trajectories[2].queries == ["a", "b"]  # no retrieval after the last allowed turn


def test_rollout_context_full(monkeypatch, tokenizer, model, retriever):
    example = QUESTIONS[0]
    monkeypatch.setattr(rollout, "sample_turns", scripted(tokenizer, lambda r, k: f"<search> {example.gold_queries[0]} </search>"))
    prompt_length = len(tokenizer(build_prompt(example.question, tokenizer))["input_ids"])
    result = rollout_questions(model, tokenizer, retriever, [example.question], max_turns=4, max_context_tokens=prompt_length + 20)
    (trajectory,) = result.trajectories
    assert trajectory.stop_reason == "context_full"
    assert trajectory.num_turns == 1 and trajectory.observation_spans == []
    assert len(trajectory.token_ids) <= prompt_length + 20
    with pytest.raises(ValueError, match="max_context_tokens"):
        rollout_questions(model, tokenizer, retriever, [example.question], max_context_tokens=prompt_length)


def test_rollout_survives_random_tag_soup(monkeypatch, tokenizer, model, retriever):
    rng = random.Random(7)
    pieces = [*TAGS, " ", "Ilsa", "x", DOCS[0].title, "\n"]
    monkeypatch.setattr(rollout, "sample_turns", scripted(tokenizer, lambda r, k: "".join(rng.choice(pieces) for _ in range(rng.randint(1, 9)))))
    result = rollout_questions(model, tokenizer, retriever, [q.question for q in QUESTIONS], group_size=4, max_turns=4)
    assert len(result.trajectories) == 4 * len(QUESTIONS)
    for trajectory in result.trajectories:
        assert 1 <= trajectory.num_turns <= 4
        assert len(trajectory.observation_spans) == trajectory.num_turns - 1
        spans = sorted(trajectory.turn_spans + trajectory.observation_spans)
        assert spans[0][0] == trajectory.prompt_length and spans[-1][1] == len(trajectory.token_ids)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, alternating
        assert all(end > start for start, end in trajectory.turn_spans)
        assert trajectory.stop_reason in ("answer", "max_turns") or trajectory.stop_reason.startswith("invalid: ")


def test_rollout_with_random_model(tokenizer, model, retriever):
    torch.manual_seed(0)
    questions = QUESTIONS[:2]
    result = rollout_questions(model, tokenizer, retriever, [q.question for q in questions], group_size=3, max_turns=2,
                               max_new_tokens=6)
    assert len(result.trajectories) == 6
    assert result.generated_tokens == sum(e - s for t in result.trajectories for s, e in t.turn_spans)
    for index, trajectory in enumerate(result.trajectories):
        assert all(1 <= end - start <= 6 for start, end in trajectory.turn_spans)
        outcome = outcome_reward(trajectory.response, list(questions[index // 3].answers))
        assert outcome == -2.0 or 0.0 <= outcome <= 1.0


def test_rollout_rejects_bad_arguments(tokenizer, model, retriever):
    with pytest.raises(ValueError, match="group_size"):
        rollout_questions(model, tokenizer, retriever, ["q"], group_size=0)
    with pytest.raises(ValueError, match="max_turns"):
        generate_rollouts(model, tokenizer, retriever, [[1, 2]], max_turns=0)
    with pytest.raises(ValueError, match=r"prompts\[1\] has 0 tokens"):
        generate_rollouts(model, tokenizer, retriever, [[1, 2], []])
    with pytest.raises(ValueError, match="batch_size"):
        generate_rollouts(model, tokenizer, retriever, [[1, 2]], batch_size=0)
    # one error rule in every layer: a wrong type is a TypeError, as in the core
    with pytest.raises(TypeError, match="max_turns must be an int, got str '4'"):
        generate_rollouts(model, tokenizer, retriever, [[1, 2]], max_turns="4")
    with pytest.raises(TypeError, match="group_size must be an int, got float 2.0"):
        rollout_questions(model, tokenizer, retriever, ["q"], group_size=2.0)


def test_retriever_result_count_is_checked(monkeypatch, tokenizer, model):
    class Broken:
        def search(self, queries, topk=3):
            return []

    monkeypatch.setattr(rollout, "sample_turns", scripted(tokenizer, lambda r, k: "<search> q </search>"))
    with pytest.raises(ValueError, match="retriever returned 0 results for 1 queries"):
        rollout_questions(model, tokenizer, Broken(), ["q"])
