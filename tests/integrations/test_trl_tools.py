"""IGPOTrainer on TRL's own tool loop (tools= / environment_factory=), with real TRL, a real BM25
index and a tiny Llama taught the Search-R1 turns for a few seconds.

The world, its byte-level BPE tokenizer (igpo_rewards.testing.tiny, whose chat template is the
Search-R1 tool template) and the model are built here. Independent oracles: the Search-R1 text
protocol (``parse_action``, ``observation_block``, ``format_observation`` of the BM25 results),
the old ChatML template written out below, one plain forward per probe (tests/probe_oracle.py),
and the float64 loop oracle of the advantages (igpo_rewards.testing.reference); with sub-goal
targets also ``score_probes`` of each target alone and the rollout function's batch on the same
questions and seed.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import socket
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
import trl
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from trl import GRPOConfig

from igpo_rewards import outcome_reward
from igpo_rewards.agent.bm25 import BM25Retriever
from igpo_rewards.agent.probes import build_probe_suffix, score_probes
from igpo_rewards.agent.protocol import INSTRUCTION, PROBE_TEMPLATE, build_prompt, observation_block, parse_action, user_message
from igpo_rewards.agent.retrieval import HTTPRetriever, format_observation, write_corpus_jsonl
from igpo_rewards.agent.tool_calls import SEARCH_R1_CHAT_TEMPLATE, SEARCH_R1_RESPONSE_TEMPLATE
from igpo_rewards.integrations import IGPOSettings
from igpo_rewards.integrations.trl import (
    PROBE_SECONDS_KEY,
    SUPPORTED_TRANSFORMERS_TOOL_VERSIONS,
    SUPPORTED_TRL_TOOL_VERSIONS,
    SUPPORTED_TRL_VERSIONS,
    TESTED_TRL_TOOL_VERSIONS,
    IGPOTrainer,
    SearchEnvironment,
    check_tool_loop_versions,
    make_outcome_reward_func,
    make_search_rollout_func,
    make_search_tool,
    turn_starts_from_tool_mask,
    use_search_r1_tool_protocol,
)
from igpo_rewards.integrations.trl import trainer as trl_trainer
from igpo_rewards.reference_trainer.modeling import save_pretrained
from igpo_rewards.reference_trainer.world import build_world, write_qa_parquet
from igpo_rewards.testing import reference
from igpo_rewards.testing.tiny import build_model, train_tokenizer

from ..probe_oracle import naive_probe_logprobs
from ..torch_threads import one_thread  # noqa: F401  (an autouse fixture)

ROOT = Path(__file__).resolve().parents[2]
G = 4
TOPK = 2
QUESTIONS = 4
# The repository's chat template before it rendered tool calls (plain ChatML after the bos): the
# oracle of every tool-free rendering.
OLD_CHATML = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def world():
    return build_world(seed=3, num_train=12, num_heldout=3, num_countries=3, cities_per_country=2, num_organisations=3)


@pytest.fixture(scope="module")
def retriever(world):
    return BM25Retriever(world.corpus)


@pytest.fixture(scope="module")
def tokenizer(world):
    texts = [doc.contents for doc in world.corpus] + [example.question for example in world.train]
    texts += [INSTRUCTION, PROBE_TEMPLATE, observation_block('Doc 1(Title: "x") x')] * 5
    return train_tokenizer(texts, vocab_size=400)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def warm_start(world, tokenizer, retriever):
    """A tiny Llama taught the Search-R1 turns of six questions (150 AdamW steps, a few seconds), so
    that it writes searches and answers: the rollouts have 1 to 4 turns."""
    model = build_model(tokenizer, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_position_embeddings=2048)
    demonstrations = []
    for example in world.train[:6]:
        ids = encode(tokenizer, build_prompt(example.question, tokenizer))
        mask = [0] * len(ids)
        for query in example.gold_queries:
            turn = encode(tokenizer, f"<search> {query} </search>")
            observation = encode(tokenizer, observation_block(format_observation(retriever.search([query], TOPK)[0])))
            ids, mask = ids + turn + observation, mask + [1] * len(turn) + [0] * len(observation)
        turn = encode(tokenizer, f"<answer> {example.answers[0]} </answer>")
        demonstrations.append((torch.tensor(ids + turn), torch.tensor(mask + [1] * len(turn))))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for step in range(150):
            ids, mask = demonstrations[step % len(demonstrations)]
            losses = torch.nn.functional.cross_entropy(model(ids[None]).logits[0, :-1], ids[1:], reduction="none")
            optimizer.zero_grad()
            ((losses * mask[1:]).sum() / mask[1:].sum()).backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def tool_model(warm_start, tokenizer):
    """The warm start and a copy of its tokenizer with the Search-R1 tool protocol set."""
    model, tool_tokenizer = copy.deepcopy(warm_start), copy.deepcopy(tokenizer)
    use_search_r1_tool_protocol(model, tool_tokenizer)
    return model, tool_tokenizer


def dataset_rows(examples):
    return [{"prompt": [{"role": "user", "content": user_message(e.question)}], "answers": list(e.answers)} for e in examples]


def make_trainer(tool_model, retriever, world, tmp_path, *, environment=False, igpo_settings=None, model=None, rows=None,
                 subgoals_column=None, **config):
    """An IGPOTrainer on TRL's tool loop over a copy of the tool model (TRL patches the model it trains);
    its dataset is ``rows`` (default: the first QUESTIONS questions)."""
    base, tool_tokenizer = tool_model
    options = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=QUESTIONS * G, num_generations=G, max_steps=1, learning_rate=1e-3,
        beta=0.0, loss_type="grpo", use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1, seed=0,
        max_completion_length=600, max_tool_calling_iterations=3, generation_kwargs={"max_new_tokens": 24},
    )
    options.update(config)
    if environment:
        loop = {"environment_factory": functools.partial(SearchEnvironment, retriever, topk=TOPK)}
    else:
        loop = {"tools": [make_search_tool(retriever, topk=TOPK)]}
    return IGPOTrainer(
        model=copy.deepcopy(base) if model is None else model, reward_funcs=[make_outcome_reward_func(tokenizer=tool_tokenizer)],
        args=GRPOConfig(**options), train_dataset=Dataset.from_list(rows or dataset_rows(world.train[:QUESTIONS])),
        processing_class=tool_tokenizer, igpo_settings=igpo_settings, subgoals_column=subgoals_column, **loop,
    )


def scored_batch(trainer, world, *, seed=0, rows=None):
    """What TRL does per generation batch: each question's row G times in a row, scored in train mode."""
    rows = [row for row in rows or dataset_rows(world.train[:QUESTIONS]) for _ in range(G)]
    torch.manual_seed(seed)
    trainer.model.train()
    output = trainer._generate_and_score_completions([dict(row) for row in rows])
    masks, completions = trainer._igpo_tool_loop
    (rollout,) = trainer._igpo_rollouts
    return SimpleNamespace(output=output, rows=rows, masks=masks, completions=completions, probes=rollout.answer_logprob,
                           targets=rollout.target_logprob)


@pytest.fixture(scope="module")
def tools_batch(tool_model, retriever, world, tmp_path_factory):
    trainer = make_trainer(tool_model, retriever, world, tmp_path_factory.mktemp("tools"))
    return trainer, scored_batch(trainer, world)


def runs(mask, value):
    """(start, end) of every maximal run of ``value`` (plain loop)."""
    spans, start = [], None
    for index, item in enumerate([*mask, None]):
        if item == value and start is None:
            start = index
        elif item != value and start is not None:
            spans.append((start, index))
            start = None
    return spans


# --- the templates and the tool ---------------------------------------------------------------


def test_the_tool_template_passes_trls_checks_and_renders_prompts_as_chatml(tokenizer, retriever):
    from trl.chat_template_utils import is_chat_template_prefix_preserving, supports_tool_calling

    assert tokenizer.chat_template == SEARCH_R1_CHAT_TEMPLATE
    assert supports_tool_calling(tokenizer) and is_chat_template_prefix_preserving(tokenizer)
    search = make_search_tool(retriever, topk=TOPK)
    conversations = [
        [{"role": "user", "content": user_message("Where was Ilsa Marr born?")}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    ]
    for messages in conversations:
        chatml = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=OLD_CHATML)
        with_tools = tokenizer.apply_chat_template(messages, tools=[search], add_generation_prompt=True, return_dict=True)
        assert with_tools["input_ids"] == encode(tokenizer, chatml)
        assert tokenizer.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
            messages, tokenize=False, chat_template=OLD_CHATML)
    ending = conversations[2][:2]  # a conversation that ends with the assistant: no newline after <|im_end|>
    assert tokenizer.apply_chat_template(ending, tokenize=False) + "\n" == tokenizer.apply_chat_template(
        ending, tokenize=False, chat_template=OLD_CHATML)
    call = {"role": "assistant", "content": "<think> x </think> ",
            "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"query": "Ilsa Marr"}}}]}
    result = {"role": "tool", "name": "search", "content": "Doc 1 x\n"}
    rendered = tokenizer.apply_chat_template([conversations[0][0], call, result], tokenize=False, add_generation_prompt=True)
    assert rendered == build_prompt("Where was Ilsa Marr born?", tokenizer) + "<think> x </think> <search> Ilsa Marr </search>" \
        "<|im_end|>" + observation_block("Doc 1 x")


def test_trls_tool_suffix_is_the_observation_block(tool_model, retriever, world, tmp_path):
    trainer = make_trainer(tool_model, retriever, world, tmp_path)
    observation = format_observation(retriever.search(["Ilsa Marr"], TOPK)[0])
    suffix = trainer._get_tool_suffix_ids([{"role": "tool", "name": "search", "content": observation}])
    assert suffix == encode(trainer.processing_class, observation_block(observation))


def test_the_search_tool_and_environment_are_valid_trl_tools(retriever, tool_model, world, tmp_path):
    from transformers.utils import get_json_schema

    expected = {"type": "object", "properties": {"query": {"type": "string", "description": get_json_schema(
        make_search_tool(retriever))["function"]["parameters"]["properties"]["query"]["description"]}}, "required": ["query"]}
    for tool in (make_search_tool(retriever, topk=TOPK), SearchEnvironment(retriever, topk=TOPK).search):
        schema = get_json_schema(tool)["function"]
        assert schema["name"] == "search" and schema["parameters"] == expected and schema["description"]
    trainer = make_trainer(tool_model, retriever, world, tmp_path, environment=True)
    assert [tool.__name__ for tool in trainer.tools] == ["search"]  # reset is not a tool, no helper leaks
    search = make_search_tool(retriever, topk=TOPK)
    assert search("  Ilsa \n Marr ") == format_observation(retriever.search(["Ilsa Marr"], TOPK)[0])


CASES = [
    "<search> Ilsa Marr </search>", "  <search>Ilsa   Marr</search>", "<think> need it </think> <search> Kelm </search>",
    "<think>a</think><search>b</search>", "<search> </search>", "<search>", "<search> Ilsa Marr", "so <search> x </search>",
    "<search> a <answer> b </answer>", "<answer> Tovia </answer>", "<think> x </think> <answer> y </answer>",
    "<think> a </think> <think> b </think> <search> c </search>", "<information> x </information> <search> c </search>",
    "<search> a </answer>", "<think> <search> x </search>", "<search> a < b </search>", "<search> 3 </search>",
    "<|im_end|>", "<think> x </think>", "<search> a\n b </search>",
]


def turn_parse(tokenizer, text, prefix):
    """TRL's parse of one generated turn (the turn ends at its first stop tag, as generation does):
    the search query, or None when it is no tool call."""
    from trl.chat_template_utils import parse_response

    parsed = parse_response(tokenizer, encode(tokenizer, text), prefix=prefix)
    calls = parsed.get("tool_calls") or []
    assert len(calls) <= 1
    return " ".join(calls[0]["function"]["arguments"]["query"].split()) if calls else None


def expected_query(text):
    action = parse_action(text)
    return action.content if action.kind == "search" else None


@pytest.fixture(scope="module")
def prefixes(tool_model):
    _, tool_tokenizer = tool_model
    prompt = encode(tool_tokenizer, build_prompt("Where was Ilsa Marr born?", tool_tokenizer))
    later = prompt + encode(tool_tokenizer, "<search> a </search>" + observation_block("Doc 1 <search> x </search>"))
    return prompt, later


@pytest.mark.parametrize("text", CASES)
def test_the_response_template_calls_search_when_parse_action_does(tool_model, prefixes, text):
    _, tool_tokenizer = tool_model
    for prefix in prefixes:  # after the prompt, and after an earlier turn and its observation
        assert turn_parse(tool_tokenizer, text, prefix) == expected_query(text)


PIECES = ["<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>",
          " ", "  ", "\n", "Ilsa", " Marr", "Kelm", "a", "<", ">", "x y"]


@settings(max_examples=150)
@given(st.lists(st.sampled_from(PIECES), max_size=10))
def test_the_response_template_agrees_with_parse_action_on_any_turn(tool_model, prefixes, pieces):
    _, tool_tokenizer = tool_model
    text = "".join(pieces)
    stop = min((text.find(tag) + len(tag) for tag in ("</search>", "</answer>") if tag in text), default=None)
    turn = text if stop is None else text[:stop]  # generation ends at the first stop tag
    if not turn.strip():
        return
    assert turn_parse(tool_tokenizer, turn, prefixes[1]) == expected_query(turn)


def test_the_protocol_is_set_once_and_refuses_what_it_cannot_keep(warm_start, tokenizer):
    model, tool_tokenizer = copy.deepcopy(warm_start), copy.deepcopy(tokenizer)
    stops = [tokenizer.convert_tokens_to_ids(tag) for tag in ("</search>", "</answer>")]
    use_search_r1_tool_protocol(model, tool_tokenizer)
    use_search_r1_tool_protocol(model, tool_tokenizer)  # idempotent
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, *stops]
    assert tool_tokenizer.response_template == SEARCH_R1_RESPONSE_TEMPLATE
    other = copy.deepcopy(tokenizer)
    other.chat_template = OLD_CHATML.replace("{{- bos_token }}", "")
    with pytest.raises(ValueError, match="replaces only the project's ChatML template"):
        use_search_r1_tool_protocol(copy.deepcopy(warm_start), other)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["a b </search> c"] * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    split = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    with pytest.raises(ValueError, match=r"stops a turn at '</search>' as one token id, but the tokenizer splits it into \d+"):
        use_search_r1_tool_protocol(copy.deepcopy(warm_start), split)


# --- TRL's loop, for real -----------------------------------------------------------------------


def test_the_loops_tokens_are_the_search_r1_layout(tools_batch, tool_model, retriever, world):
    """Every rollout TRL generated is prompt, turns and observation blocks exactly as the Search-R1 text
    protocol writes them: each observation is the BM25 result of the query parse_action reads in the
    turn before it."""
    trainer, batch = tools_batch
    _, tool_tokenizer = tool_model
    turns_seen = set()
    for b, (mask, ids) in enumerate(zip(batch.masks, batch.completions)):
        question = world.train[b // G].question
        prompt = batch.output["prompt_ids"][b][batch.output["prompt_mask"][b].bool()].tolist()
        assert prompt == encode(tool_tokenizer, build_prompt(question, tool_tokenizer))
        assert batch.output["tool_mask"][b, : len(mask)].tolist() == mask and len(ids) == len(mask)
        turns, observations = runs(mask, 1), runs(mask, 0)
        turns_seen.add(len(turns))
        assert len(observations) in (len(turns) - 1, len(turns))  # a last search whose result did not fit
        for (start, end), (obs_start, obs_end) in zip(turns, observations):
            query = expected_query(tool_tokenizer.decode(ids[start:end]))
            assert query is not None and obs_start == end
            want = observation_block(format_observation(retriever.search([query], TOPK)[0]))
            assert ids[obs_start:obs_end] == encode(tool_tokenizer, want)
        if len(observations) < len(turns) and len(turns) <= trainer.max_tool_calling_iterations:
            assert expected_query(tool_tokenizer.decode(ids[turns[-1][0]:])) is None  # the loop ended: no search
    assert turns_seen >= {1, 2}, turns_seen


def test_the_environment_factory_gives_the_same_batch(tools_batch, tool_model, retriever, world, tmp_path):
    _, tools = tools_batch
    trainer = make_trainer(tool_model, retriever, world, tmp_path, environment=True)
    batch = scored_batch(trainer, world)
    assert batch.completions == tools.completions and batch.masks == tools.masks
    torch.testing.assert_close(batch.output["advantages"], tools.output["advantages"], rtol=0, atol=0)
    searches = [len(runs(mask, 0)) for mask in batch.masks]
    assert [len(environment.queries) for environment in trainer.environments] == searches


def row_targets(row, subgoals):
    """A row's probe targets: its first answer alias, then (``subgoals``) its ``subgoals`` column."""
    return [row["answers"][0], *(row.get("subgoals") or [])] if subgoals else [row["answers"][0]]


def oracle_probes(batch, tokenizer, model, *, subgoals=False):
    """[B, T, K] float64 probes of every row's targets from one plain forward per probe and target,
    the [B, T] turn mask (turns from a plain loop over the tool mask) and the [B, K] target mask."""
    sequences, starts = [], []
    for b, (mask, ids) in enumerate(zip(batch.masks, batch.completions)):
        prompt = batch.output["prompt_ids"][b][batch.output["prompt_mask"][b].bool()].tolist()
        sequences.append(prompt + ids)
        starts.append([len(prompt) + start for start, _ in runs(mask, 1)])
    targets = [row_targets(row, subgoals) for row in batch.rows]
    num_turns, num_targets = max(map(len, starts)), max(map(len, targets))
    probes = torch.zeros((len(sequences), num_turns, num_targets), dtype=torch.float64)
    for k in range(num_targets):
        has = [len(names) > k for names in targets]
        suffixes = [build_probe_suffix(tokenizer, names[k]) if present else None for names, present in zip(targets, has)]
        with torch.no_grad():
            logprobs, where = naive_probe_logprobs(
                model.eval(), sequences, [row if present else [] for row, present in zip(starts, has)], suffixes)
        column = (logprobs * where).sum(-1).double() / where.sum(-1).clamp(min=1)
        probes[:, : column.shape[1], k] = column
    turn_mask = torch.arange(num_turns)[None, :] < torch.tensor([len(s) for s in starts])[:, None]
    target_mask = torch.arange(num_targets)[None, :] < torch.tensor([len(names) for names in targets])[:, None]
    return probes, turn_mask, target_mask


def oracle_token_advantages(batch, tokenizer, settings: IGPOSettings, probes, turn_mask, target_mask=None) -> list[np.ndarray]:
    """Per token of every completion: the float64 oracle's turn advantage on ``probes`` ([B, T], or
    [B, T, K] with ``target_mask`` and ``settings.target_weights(K)``), outcomes from the decoded completions."""
    outcome = [outcome_reward(tokenizer.decode(ids, skip_special_tokens=True), row["answers"])
               for ids, row in zip(batch.completions, batch.rows)]
    groups = [b // G for b in range(len(batch.rows))]
    targets = {} if target_mask is None else {"target_weights": settings.target_weights(probes.shape[2]),
                                              "target_mask": target_mask.numpy()}
    turn_advantages = reference.igpo_advantages(
        probes.numpy(), outcome, turn_mask.numpy(), groups, gamma=settings.gamma, **targets, **settings.reward_kwargs(),
        **settings.normalization_kwargs(), **settings.accumulation_kwargs(),
    ).advantages
    per_token = []
    for b, mask in enumerate(batch.masks):
        turn_of = {}
        for turn, (start, end) in enumerate(runs(mask, 1)):
            turn_of.update({t: turn for t in range(start, end)})
        per_token.append(np.array([turn_advantages[b, turn_of[t]] if t in turn_of else 0.0 for t in range(len(mask))]))
    return per_token


def oracle_advantages(batch, tokenizer, settings: IGPOSettings, model) -> list[np.ndarray]:
    """Per token of every completion: the float64 oracle's turn advantage, from probes of one plain
    forward per probe, outcomes from the decoded completions, turns from a plain loop over the mask."""
    probes, turn_mask, _ = oracle_probes(batch, tokenizer, model)
    probes = probes[..., 0]
    return oracle_token_advantages(batch, tokenizer, settings, probes, turn_mask), probes, turn_mask


@pytest.mark.parametrize("igpo_settings", [None, {"gamma": 0.5, "mode": "separate", "kind": "log_prob", "ig_weight": 2.0}])
def test_advantages_equal_the_float64_oracle(igpo_settings, tools_batch, tool_model, retriever, world, tmp_path):
    if igpo_settings is None:
        trainer, batch = tools_batch
    else:
        trainer = make_trainer(tool_model, retriever, world, tmp_path, igpo_settings=igpo_settings)
        batch = scored_batch(trainer, world)
    model = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model))
    expected, probes, turn_mask = oracle_advantages(batch, trainer.processing_class, IGPOSettings.from_mapping(igpo_settings), model)
    for b, row in enumerate(batch.probes):
        np.testing.assert_allclose(row, probes[b, turn_mask[b]].numpy(), rtol=1e-5, atol=2e-5)
    advantages = batch.output["advantages"]
    assert advantages.shape == batch.output["completion_ids"].shape
    for b, want in enumerate(expected):
        np.testing.assert_allclose(advantages[b, : want.size].double().numpy(), want, rtol=1e-4, atol=1e-5)
        assert torch.count_nonzero(advantages[b, want.size :]) == 0
    metrics = trainer._metrics["train"]
    assert metrics["igpo/turns_mean"][-1] == pytest.approx(float(turn_mask.sum(1).double().mean()))
    assert metrics[PROBE_SECONDS_KEY][-1] > 0


# --- sub-goal targets (docs/algorithm.md 7.1) on the tool loop ----------------------------------

SUBGOAL_QUESTIONS = (1, 4, 0, 2)  # 3, 2, 1 and 3 hops: K = 3, 2, 1 and 3 targets
SUBGOALS = {"subgoal_weight": 1.0}


def subgoal_rows(world):
    """Rows of questions with sub-goals: each gold chain without its answer (None for a 1-hop question)."""
    examples = [world.train[i] for i in SUBGOAL_QUESTIONS]
    return [{**row, "subgoals": list(example.gold_bridge_answers[:-1]) or None}
            for row, example in zip(dataset_rows(examples), examples)]


def subgoal_trainer(tool_model, retriever, world, tmp_path, igpo_settings=SUBGOALS):
    return make_trainer(tool_model, retriever, world, tmp_path, rows=subgoal_rows(world), subgoals_column="subgoals",
                        igpo_settings=igpo_settings)


@pytest.fixture(scope="module")
def subgoal_batch(tool_model, retriever, world, tmp_path_factory):
    trainer = subgoal_trainer(tool_model, retriever, world, tmp_path_factory.mktemp("subgoals"))
    return trainer, scored_batch(trainer, world, rows=subgoal_rows(world))


@pytest.mark.parametrize("igpo_settings", [SUBGOALS, {"subgoal_weight": 0.5, "subgoal_potential": "probe", "gain_clip": "positive",
                                                      "accumulation": "sqrt_n", "kind": "log_prob", "gamma": 0.9}])
def test_sub_goal_advantages_equal_the_float64_oracle(igpo_settings, subgoal_batch, tool_model, retriever, world, tmp_path):
    """The trainer probes every turn for each row's answer and sub-goals; its [B, T, K] advantages are the
    oracle's on one plain forward per probe and target, with the target mask and target_weights(K)."""
    if igpo_settings is SUBGOALS:
        trainer, batch = subgoal_batch
    else:
        trainer = subgoal_trainer(tool_model, retriever, world, tmp_path, igpo_settings)
        batch = scored_batch(trainer, world, rows=subgoal_rows(world))
    model = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model))
    tokenizer, settings = trainer.processing_class, IGPOSettings.from_mapping(igpo_settings)
    probes, turn_mask, target_mask = oracle_probes(batch, tokenizer, model, subgoals=True)
    assert sorted({len(turns[0]) for turns in batch.targets}) == [1, 2, 3] and max(turn_mask.sum(1)) >= 3
    for b, turns in enumerate(batch.targets):
        count = len(row_targets(batch.rows[b], True))
        assert len(turns) == int(turn_mask[b].sum()) and {len(turn) for turn in turns} == {count}
        assert [turn[0] for turn in turns] == batch.probes[b]
        np.testing.assert_allclose(turns, probes[b, turn_mask[b], :count].numpy(), rtol=1e-5, atol=2e-5)
    expected = oracle_token_advantages(batch, tokenizer, settings, probes, turn_mask, target_mask)
    advantages = batch.output["advantages"]
    for b, want in enumerate(expected):
        np.testing.assert_allclose(advantages[b, : want.size].double().numpy(), want, rtol=1e-4, atol=1e-5)
        assert torch.count_nonzero(advantages[b, want.size :]) == 0
    # the sub-goals move the advantages: the answer's probes alone give others
    answer_only = IGPOSettings.from_mapping({key: value for key, value in igpo_settings.items() if key != "subgoal_weight"})
    alone = oracle_token_advantages(batch, tokenizer, answer_only, probes[..., 0], turn_mask)
    assert any(not np.allclose(a, b, atol=1e-3) for a, b in zip(expected, alone))


def test_each_targets_probe_equals_score_probes_of_that_target_alone(subgoal_batch):
    trainer, batch = subgoal_batch
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    for b, (mask, ids) in enumerate(zip(batch.masks, batch.completions)):
        prompt = batch.output["prompt_ids"][b][batch.output["prompt_mask"][b].bool()].tolist()
        starts = [len(prompt) + start for start, _ in runs(mask, 1)]
        for k, name in enumerate(row_targets(batch.rows[b], True)):
            with torch.no_grad():
                alone = score_probes(model, trainer.processing_class, [prompt + ids], [starts], [name], probe_layout="kv_cache")[0]
            torch.testing.assert_close(torch.tensor([turn[k] for turn in batch.targets[b]]), alone, rtol=1e-5, atol=1e-5)


def test_the_rollout_function_path_gives_the_same_sub_goal_batch(subgoal_batch, tool_model, retriever, world, tmp_path):
    """make_search_rollout_func(subgoals_column=) on the same questions and seed writes the tool loop's
    tokens (the Search-R1 tool protocol); its targets' probes and the advantages are the tool loop's."""
    _, tools = subgoal_batch
    base, tool_tokenizer = tool_model
    rows = subgoal_rows(world)
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=QUESTIONS * G, num_generations=G, max_steps=1,
                   beta=0.0, loss_type="grpo", use_cpu=True, bf16=False, report_to="none", save_strategy="no", seed=0,
                   max_completion_length=600)
    trainer = IGPOTrainer(
        model=copy.deepcopy(base), reward_funcs=[make_outcome_reward_func(tokenizer=tool_tokenizer)],
        args=GRPOConfig(**options), train_dataset=Dataset.from_list(rows), processing_class=tool_tokenizer,
        rollout_func=make_search_rollout_func(retriever, subgoals_column="subgoals", max_turns=4, max_new_tokens=24,
                                              topk=TOPK, probe_layout="kv_cache"),
        igpo_settings=SUBGOALS,
    )
    batch = [row for row in rows for _ in range(G)]
    torch.manual_seed(0)
    trainer.model.train()
    output = trainer._generate_and_score_completions([dict(row) for row in batch])
    (rollout,) = trainer._igpo_rollouts
    completions = [output["completion_ids"][b, :length].tolist() for b, length in enumerate(rollout.completion_lengths)]
    assert completions == tools.completions and [list(mask) for mask in rollout.env_mask] == tools.masks
    assert rollout.target_logprob == tools.targets and rollout.answer_logprob == tools.probes
    assert torch.equal(output["advantages"], tools.output["advantages"])


def test_sub_goal_settings_that_would_be_ignored_or_misread_are_refused(tool_model, retriever, world, tmp_path):
    with pytest.raises(ValueError, match=r"subgoals_column='subgoals' probes sub-goal targets, but "
                                         r"igpo_settings.subgoal_weight is 0: they would be ignored"):
        subgoal_trainer(tool_model, retriever, world, tmp_path / "a", igpo_settings=None)
    with pytest.raises(ValueError, match=r"igpo_settings.subgoal_weight = 0.5 weighs sub-goal targets, but "
                                         r"subgoals_column is None.*pass subgoals_column="):
        make_trainer(tool_model, retriever, world, tmp_path / "b", igpo_settings={"subgoal_weight": 0.5})
    with pytest.raises(TypeError, match="subgoals_column must be a str"):
        make_trainer(tool_model, retriever, world, tmp_path / "c", igpo_settings=SUBGOALS, subgoals_column=["subgoals"])
    trainer = subgoal_trainer(tool_model, retriever, world, tmp_path / "d")
    for change, error, message in [  # row 0: a 3-hop question, sub-goals Hapova Group and Kudis, answer Kruhirand
        (lambda row: row.pop("subgoals"), ValueError, r"no column 'subgoals' \(the sub-goal targets, subgoals_column=\)"),
        (lambda row: row.update(subgoals="Kudis"), TypeError,
         r"dataset row 0 of the batch, column 'subgoals': the sub-goals must be a list of strings"),
        (lambda row: row.update(subgoals=["Kudis", ""]), ValueError, r"every sub-goal must be a non-empty string"),
        (lambda row: row.update(subgoals=["Hapova Group", "kruhirand"]), ValueError,
         r"the sub-goal 'kruhirand' is the answer itself \(target 0\)"),
        (lambda row: row.update(subgoals=["Kudis", "kudis"]), ValueError, r"repeated sub-goals \['Kudis', 'kudis'\]"),
    ]:
        rows = subgoal_rows(world)
        change(rows[0])
        with pytest.raises(error, match=message):
            scored_batch(trainer, world, rows=rows)
        assert trainer._igpo_tool_loop is None  # refused before TRL generated anything


def test_truncated_rollouts_keep_their_turns_and_train_nothing(tool_model, retriever, world, tmp_path):
    """mask_truncated_completions=True with a per-turn cap that cuts some turns: TRL zeroes those rows'
    masks; IGPO still counts their turns and outcome in their group (as GRPO keeps their reward), and
    one training step changes the weights with zero weight on them and on tool tokens."""
    trainer = make_trainer(tool_model, retriever, world, tmp_path, mask_truncated_completions=True,
                           generation_kwargs={"max_new_tokens": 7})
    batch = scored_batch(trainer, world)
    truncated = [b for b in range(len(batch.masks)) if not bool(batch.output["completion_mask"][b].any())]
    assert 0 < len(truncated) < len(batch.masks)
    model = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model))
    expected, _, _ = oracle_advantages(batch, trainer.processing_class, IGPOSettings(), model)
    for b, want in enumerate(expected):
        np.testing.assert_allclose(batch.output["advantages"][b, : want.size].double().numpy(), want, rtol=1e-4, atol=1e-5)
    assert any(np.abs(expected[b]).max() > 0 for b in truncated)
    trainer = make_trainer(tool_model, retriever, world, tmp_path / "train", mask_truncated_completions=True,
                           generation_kwargs={"max_new_tokens": 7})
    before = [parameter.detach().clone() for parameter in trainer.model.parameters()]
    trainer.train()
    (step,) = trainer._buffered_inputs
    weight = step["completion_mask"] * step["tool_mask"]
    assert torch.count_nonzero(step["advantages"] * (1 - step["tool_mask"]) * step["completion_mask"]) == 0
    assert bool(weight.any()) and np.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert any(not torch.equal(old, new) for old, new in zip(before, trainer.model.parameters()))
    assert PROBE_SECONDS_KEY in trainer.state.log_history[0]


def test_transformers_continuous_batching_gives_the_same_batch(tool_model, retriever, world, tmp_path):
    """TRL's second transformers backend (dispatched where vLLM is): greedy turns, the same batch."""
    fields = transformers.ContinuousBatchingConfig.__dataclass_fields__
    cache = {"page_size": 32} if "page_size" in fields else {"block_size": 32}
    batches = []
    for name, backend in (("generate", {}), ("continuous", {"use_transformers_continuous_batching": True,
                                                            "transformers_continuous_batching_config": {
                                                                "num_blocks": 128, "max_batch_tokens": 512, **cache}})):
        trainer = make_trainer(tool_model, retriever, world, tmp_path / name, top_k=1, **backend)
        batches.append(scored_batch(trainer, world))
    greedy, continuous = batches
    assert continuous.completions == greedy.completions and continuous.masks == greedy.masks
    assert max(len(runs(mask, 1)) for mask in greedy.masks) >= 2
    torch.testing.assert_close(continuous.output["advantages"], greedy.output["advantages"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["server", "colocate"])
def test_vllm_modes_pass_igpos_checks_and_reach_trls_vllm(mode, tool_model, retriever, world, tmp_path):
    """IGPO has no vLLM branch; without vLLM installed, what stops the construction is TRL's own error."""
    pytest.importorskip("trl.generation.vllm_generation")
    from trl.import_utils import is_vllm_available

    if is_vllm_available():
        pytest.skip("vLLM is installed: this checks the machine without it")
    with pytest.raises(ImportError, match="vLLM is not available"):
        make_trainer(tool_model, retriever, world, tmp_path, use_vllm=True, vllm_mode=mode,
                     generation_kwargs={"max_tokens": 24})


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_dead_retrieval_server_stops_training(tool_model, retriever, world, tmp_path):
    """TRL turns a tool's exception into an error message for the model; a search engine that does
    not answer must stop the run instead."""
    dead = HTTPRetriever(f"http://127.0.0.1:{free_port()}", timeout=5)  # nothing listens there
    for environment in (False, True):
        trainer = make_trainer(tool_model, dead, world, tmp_path / str(environment), environment=environment)
        with pytest.raises(RuntimeError, match=r"the search tool's retriever failed \d+ time\(s\) .*first error: cannot "
                                               r"reach retrieval server http://127.0.0.1"):
            scored_batch(trainer, world)


def test_settings_that_would_break_the_probes_are_refused(tool_model, warm_start, retriever, world, tmp_path):
    trainer = make_trainer(tool_model, retriever, world, tmp_path / "a")
    rows = [row for row in dataset_rows(world.train[:QUESTIONS]) for _ in range(G)]
    with pytest.raises(ValueError, match=r"no column 'answers' .* its columns: \['golden', 'prompt'\]"):
        trainer._generate_and_score_completions([{"prompt": row["prompt"], "golden": row["answers"]} for row in rows])
    with pytest.raises(ValueError, match=r"needs conversational prompts .* row 0 of the batch is 'Where"):
        trainer._generate_and_score_completions([{"prompt": "Where?", "answers": ["x"]} for _ in rows])
    with pytest.raises(ValueError, match=r"igpo_settings.max_turns = 3 .* max_tool_calling_iterations = 3 lets a rollout "
                                         r"have 4 turns; set max_tool_calling_iterations = 2"):
        make_trainer(tool_model, retriever, world, tmp_path / "b", igpo_settings={"max_turns": 3})
    with pytest.raises(ValueError, match=r"max_tool_calling_iterations = None lets a rollout have unbounded turns"):
        make_trainer(tool_model, retriever, world, tmp_path / "c", igpo_settings={"max_turns": 4}, max_tool_calling_iterations=None)
    flash = copy.deepcopy(tool_model[0])
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"attn_implementation 'sdpa' or 'eager'.*the model uses 'flash_attention_2'"):
        make_trainer(tool_model, retriever, world, tmp_path / "d", model=flash)
    no_stops = copy.deepcopy(tool_model[0])
    no_stops.generation_config.eos_token_id = tool_model[1].eos_token_id
    with pytest.raises(ValueError, match=r"would not stop at \['</answer>', '</search>'\].*use_search_r1_tool_protocol"):
        make_trainer(tool_model, retriever, world, tmp_path / "e", model=no_stops)
    with pytest.raises(TypeError, match="probe_batch_size must be an int"):
        IGPOTrainer(model=copy.deepcopy(warm_start), reward_funcs=[len], tools=[len], probe_batch_size="8")


def test_the_outcome_reward_scores_the_decoded_completion(tool_model):
    """In TRL's tool loop the <search> turns become tool_calls: the message content alone would be
    malformed, so the reward decodes completion_ids (what TRL decodes for a rollout function)."""
    _, tool_tokenizer = tool_model
    text = "<search> Ilsa Marr </search>" + observation_block("Doc 1 x") + "<answer> Tovia </answer>"
    ids = encode(tool_tokenizer, text)
    messages = [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "search", "arguments": {"query": "Ilsa Marr"}}}]}, {"role": "tool", "name": "search", "content": "Doc 1 x"},
        {"role": "assistant", "content": "<answer> Tovia </answer>"}]
    reward = make_outcome_reward_func("answers", tokenizer=tool_tokenizer)
    assert reward(["p"], [messages], completion_ids=[ids], answers=[["Tovia"]]) == [outcome_reward(text, ["Tovia"])] == [1.0]
    with pytest.raises(ValueError, match=r"completions\[0\] holds tool calls .* make_outcome_reward_func\(..., tokenizer=tokenizer\)"):
        make_outcome_reward_func("answers")(["p"], [messages], completion_ids=[ids], answers=[["Tovia"]])


def test_turn_starts_from_tool_mask():
    assert turn_starts_from_tool_mask([3, 2, 1], [[1, 1, 0, 0, 1], [1, 1, 1], [1, 0, 1, 0]]) == [[3, 7], [2], [1, 3]]
    with pytest.raises(ValueError, match="prompt_lengths has 1 entries for 2 tool masks"):
        turn_starts_from_tool_mask([3], [[1], [1]])


# --- supported versions ---------------------------------------------------------------------------


@pytest.mark.parametrize(("trl_version", "transformers_version"), [("1.14.2", "5.13.0"), ("1.16.3", "5.25.0"),
                                                                    ("1.15.0", "5.30.0.dev0")])
def test_versions_in_the_tool_range_pass(trl_version, transformers_version):
    check_tool_loop_versions(trl_version, transformers_version)


@pytest.mark.parametrize(("trl_version", "transformers_version"), [("1.14.1", "5.25.0"), ("1.17.0", "5.25.0"), ("2.0.0", "5.25.0"),
                                                                    ("1.16.0rc1", "5.25.0"), ("1.16.0", "5.12.1"), ("1.16.0", "4.57.0")])
def test_other_versions_are_refused_on_the_tool_loop(trl_version, transformers_version, monkeypatch, warm_start):
    message = (rf"TRL's tool loop \(tools= / environment_factory=\) supports trl>=1\.14\.2,<1\.17 with transformers>=5\.13 "
               rf"\(tested: trl 1\.14\.2 and 1\.16\.0\); found trl {re.escape(trl_version)}, transformers "
               rf"{re.escape(transformers_version)}\. .*or use a rollout_func \(trl>=1\.0,<1\.17\)")
    with pytest.raises(RuntimeError, match=message):
        check_tool_loop_versions(trl_version, transformers_version)
    if not Version(trl_version).is_prerelease and Version(trl_version) in SpecifierSet(SUPPORTED_TRL_VERSIONS):
        # (else the general check refuses it first)
        monkeypatch.setattr(trl, "__version__", trl_version)
        # the module object the trainer imported (transformers' lazy module can be a second object here)
        monkeypatch.setattr(trl_trainer.transformers, "__version__", transformers_version)
        with pytest.raises(RuntimeError, match=message):
            IGPOTrainer(model=warm_start, reward_funcs=[len], tools=[len])


def test_the_tool_range_is_the_declared_and_tested_one():
    pyproject = (ROOT / "pyproject.toml").read_text()
    extra = re.findall(r'"([^"]+)"', re.search(r"^trl-tools = \[(.*)\]$", pyproject, flags=re.M).group(1))
    assert f"trl{SUPPORTED_TRL_TOOL_VERSIONS}" in extra and f"transformers{SUPPORTED_TRANSFORMERS_TOOL_VERSIONS}" in extra
    bounds = {spec.operator: Version(spec.version) for spec in SpecifierSet(SUPPORTED_TRL_TOOL_VERSIONS)}
    floor, newest = (Version(version) for version in TESTED_TRL_TOOL_VERSIONS)
    assert set(bounds) == {">=", "<"} and floor == bounds[">="]
    assert (newest.major, newest.minor + 1) == (bounds["<"].major, bounds["<"].minor)
    # The floor job (scripts/test_trl_tools_floor.sh) pins the floor of every requirement of the extra.
    pins = {name: Version(version) for name, version in
            re.findall(r"^([\w-]+)==(\S+)$", (ROOT / "constraints-trl-tools-floor.txt").read_text(), re.M)}
    floors = {name: Version(version) for name, version in re.findall(r"^([\w-]+)>=([\d.]+)", "\n".join(extra), re.M)}
    assert pins == floors and pins["trl"] == floor
    check_tool_loop_versions(trl.__version__, transformers.__version__)
    expected = os.environ.get("IGPO_EXPECT_TRL_TOOLS")  # set by scripts/test_trl_tools_floor.sh
    if expected is not None:
        assert trl.__version__ == expected == TESTED_TRL_TOOL_VERSIONS[0]
        assert Version(transformers.__version__) == pins["transformers"]


# --- the example, for two steps ------------------------------------------------------------------


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_dir(world, tokenizer, warm_start, tmp_path_factory):
    """A demo run directory as `igpo-train demo` writes it (data/ and warm_start/), with the taught tiny model."""
    directory = tmp_path_factory.mktemp("demo")
    write_corpus_jsonl(world.corpus, directory / "data" / "corpus.jsonl")
    write_qa_parquet(world.train, directory / "data" / "train.parquet", split="train")
    write_qa_parquet(world.heldout, directory / "data" / "heldout.parquet", split="test")
    save_pretrained(warm_start, tokenizer, directory / "warm_start")
    return directory


def test_two_training_steps_of_the_example_with_tools_and_with_an_environment(demo_dir, tmp_path):
    """examples/trl_tools_igpo.py end to end with igpo-retrieve over loopback, a TRL evaluation at step 2
    (the tool loop and the probes in eval mode) and a checkpoint per step: tools= and
    environment_factory= train the same."""
    example = load_example("trl_tools_igpo")
    common = ["--demo_dir", str(demo_dir), "--max_steps", "2", "--num_generations", "2", "--per_device_train_batch_size", "4",
              "--steps_per_generation", "1", "--logging_steps", "1", "--learning_rate", "1e-2", "--max_new_tokens", "16",
              "--eval_batch_size", "8", "--topk", str(TOPK), "--eval_strategy", "steps", "--eval_steps", "2",
              "--per_device_eval_batch_size", "4"]
    results = {}
    for name, extra in (("tools", []), ("environment", ["--environment"])):
        out = tmp_path / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[name] = example.main([*common, "--output_dir", str(out), "--save_steps", "1"] + extra)
        assert json.loads((out / "heldout_em.json").read_text()) == results[name]
    result = results["tools"]
    assert result["optimizer_steps"] == 2 and result["rollouts"] == 8
    for scores in (result["warm_start"], result["trained"]):
        assert scores["n"] == 3 and 0.0 <= scores["em"] <= 1.0
    logged = {key for record in result["log_history"] for key in record}
    for key in ("loss", "reward", "rewards/outcome_f1/mean", "tools/call_frequency", "igpo/turns_mean",
                "igpo/information_gain_mean", PROBE_SECONDS_KEY, "eval_reward", "eval_igpo/turns_mean"):
        assert key in logged, key
    keys = ("loss", "reward", "igpo/turns_mean", "igpo/information_gain_mean", "tools/call_frequency")
    for tools_record, environment_record in zip(result["log_history"], results["environment"]["log_history"]):
        assert {k: tools_record.get(k) for k in keys} == {k: environment_record.get(k) for k in keys}
    generation = json.loads((tmp_path / "tools" / "checkpoint-2" / "generation_config.json").read_text())
    assert len(generation["eos_token_id"]) == 3  # the checkpoints keep the tool protocol's stop ids
    table = load_example("trl_paths_table").main([str(tmp_path / "tools"), str(tmp_path / "environment")])
    em = f"{100 * result['trained']['em']:.1f}"
    assert f"| TRL's tool loop (tools) | {em} (seed 0) | **{em}** |" in table
    assert "| TRL's tool loop (environment_factory) |" in table and f"| warm start | | {100 * result['warm_start']['em']:.1f} |" in table


def test_the_examples_flags(capsys):
    example = load_example("trl_tools_igpo")
    with pytest.raises(SystemExit) as exit_info:
        example.parse_arguments(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--environment" in out and "python examples/trl_tools_igpo.py" in out
    args, config, given = example.parse_arguments(["--max_turns", "3", "--max_new_tokens", "10"])
    assert config.max_tool_calling_iterations == 2 and config.generation_kwargs == {"max_new_tokens": 10} and not given
    _, config, given = example.parse_arguments(["--generation_kwargs", '{"max_tokens": 7}', "--max_completion_length", "99"])
    assert config.generation_kwargs == {"max_tokens": 7} and config.max_completion_length == 99 and given
    with pytest.raises(SystemExit) as exit_info:
        example.parse_arguments(["--probe_layout", "packed"])
    assert exit_info.value.code == 2 and "--probe_layout is kv_cache" in capsys.readouterr().err


def test_the_probe_cost_benchmark_runs(demo_dir, tmp_path):
    """tests/benchmarks/trl_probe_cost.py on the taught tiny model, one small batch: (a) and (b) time
    the same rollouts, and the tool loop's extra seconds are (b) - (a)."""
    spec = importlib.util.spec_from_file_location("trl_probe_cost", ROOT / "tests" / "benchmarks" / "trl_probe_cost.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = benchmark.main(["--demo_dir", str(demo_dir), "--repeats", "1", "--questions", "2", "--group_size", "2",
                                  "--max_new_tokens", "16", "--topk", str(TOPK), "--work_dir", str(tmp_path),
                                  "--out", str(tmp_path / "costs.jsonl")])
    records = [json.loads(line) for line in (tmp_path / "costs.jsonl").read_text().splitlines()[:-1]]
    tokens = {record["way"]: record["completion_tokens"] for record in records}
    assert tokens["a_grpo_tools"] == tokens["b_igpo_tools"] > 0
    medians = summary["medians"]
    assert medians["a_grpo_tools"]["probe_s"] == 0.0 < medians["b_igpo_tools"]["probe_s"]
    assert medians["c_igpo_rollout_func"]["probe_s"] > 0 and medians["c_igpo_rollout_func"]["probe_cpu_s"] > 0
    assert medians["a_grpo_tools"]["probe_cpu_s"] == 0.0 < medians["b_igpo_tools"]["probe_cpu_s"]
    assert summary["tools_extra_per_batch"]["wall_s"] == pytest.approx(medians["b_igpo_tools"]["wall_s"] - medians["a_grpo_tools"]["wall_s"])
