"""A CPU harness for verl 0.9.1's agent-loop machinery (what runs without a GPU).

What is real: verl's config (Hydra-composed ``ppo_trainer.yaml``), ``AgentLoopWorker`` (legacy) and
``AgentLoopWorkerTQ`` (V1) with their registries, hydra instantiation, Continuous Token builder,
hermes tool parser, padding and streaming-reward path; verl's ``LLMServerClient.generate``; verl's
``RewardLoopWorker`` with its ``NaiveRewardManager`` and our ``compute_score``; a tiny Llama and a
byte-level BPE chat tokenizer built with ``igpo_rewards.testing.tiny``; the search
tool calling ``igpo-retrieve`` over loopback; verl's TransferQueue (Ray actors on CPU).

What stands in: :class:`CPURolloutServer` implements the contract of verl's vLLM / SGLang server
``generate`` (token ids in, ``TokenOutput`` out: sampled tokens with log-probs, and
``extra_fields["prompt_ids"/"prompt_logprobs"]`` for ``prompt_logprobs=0``) on the HF model,
re-prefilling every request as vLLM does for requests with prompt log-probs. The prompt log-probs
are handed to verl's own extractor of the flavor it serves (vLLM's ``extract_prompt_logprobs``
or ``_extract_prompt_logprobs_sglang``, compiled from verl's installed source by
:func:`verl_function`: their modules import vLLM / SGLang, which a CPU machine lacks) in the
engine's own output layout. In the in-process runs the load balancer and Ray's actor hop are
replaced by :class:`InProcessActor` (Ray's ``handle.method.remote(...)`` call syntax, executed in
this process); the Ray tests run the server as a Ray actor behind verl's real load balancer.

The tiny model is trained for a few seconds on scripted hermes conversations (search, then
answer; or answer at once), so that sampling at temperature 1 produces real tool calls and
multi-turn trajectories of varying length. Each request's sampling seed comes from its prompt
ids and how many identical prompts came before, so the set of trajectories does not depend on
the order in which the asyncio tasks reach the server.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import time
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from igpo_rewards.integrations.verl_search import SEARCH_TOOL_SCHEMA
from igpo_rewards.agent.bm25 import BM25Retriever
from igpo_rewards.agent.probes import _cache_argument
from igpo_rewards.agent.retrieval import format_observation, write_corpus_jsonl
from igpo_rewards.reference_trainer.modeling import save_pretrained
from igpo_rewards.reference_trainer.world import QAExample, build_world
from igpo_rewards.testing.tiny import build_model, train_tokenizer

#: A Qwen2.5-style ChatML template with hermes tool calls (what verl's "hermes" parser reads):
#: tool schemas in the system turn, assistant tool calls as <tool_call> JSON, tool results as a
#: user turn of <tool_response> blocks.
HERMES_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\nTools (call as <tool_call> JSON </tool_call>):' }}"
    "{%- for tool in tools %}{{- ' ' + tool['function']['name'] + '(' + tool['function']['parameters']['required'] | join(', ') + ')' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + (message['content'] or '') }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{{- '<tool_call>\\n' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " + '\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SEARCH_SCHEMA = SEARCH_TOOL_SCHEMA.model_dump(exclude_unset=True, exclude_none=True)
"""The search tool's schema as verl's tool agent loop hands it to the chat template."""
TOPK = 2
LEARNING_RATE = 2e-2
PROMPT_LENGTH = 256
RESPONSE_LENGTH = 512


def tool_call(query: str) -> str:
    return "<tool_call>\n" + json.dumps({"name": "search", "arguments": {"query": query}}) + "\n</tool_call>"


@dataclass
class Policy:
    """The tiny model and its chat tokenizer, saved in ``path``; the questions it was trained on."""

    path: Path
    model: Any
    tokenizer: Any
    examples: list[QAExample]
    corpus_path: Path
    train_seconds: float


def _scripts(example: QAExample, retriever: BM25Retriever, wrong: str) -> list[list[tuple[str, str | None]]]:
    """Scripted conversations: [(assistant text, tool text that follows or None), ...] per variant."""
    searches = []
    for query in example.gold_queries:
        searches.append((tool_call(query), format_observation(retriever.search([query], TOPK)[0])))
    answer = f"<answer> {example.answers[0]} </answer>"
    return [searches + [(answer, None)], [(f"<answer> {wrong} </answer>", None)]]


def _sequence(builder: Any, tokenizer: Any, question: str, script: list[tuple[str, str | None]]) -> tuple[list[int], list[int]]:
    """The token ids verl's tool agent loop would hold after this conversation (same CT builder),
    and the positions of the assistant's tokens."""
    messages = [{"role": "user", "content": question}]
    ids = builder.build_initial_tokens(messages, tools=[SEARCH_SCHEMA])
    assistant: list[int] = []
    for text, observation in script:
        turn = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        assistant += range(len(ids), len(ids) + len(turn))
        ids = builder.merge_assistant_tokens(ids, turn).token_ids
        if observation is None:
            break
        previous = list(messages)
        messages.append({"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "search", "arguments": json.loads(text.split("\n")[1])["arguments"]}}
        ]})
        messages.append({"role": "tool", "content": observation})
        ids = builder.merge_context_tokens(previous, messages, ids, tools=[SEARCH_SCHEMA]).token_ids
    return ids, assistant


def build_policy(directory: Path, *, steps: int = 60, seed: int = 0) -> Policy:
    """Trains the tiny hermes policy on three questions and writes it (HF layout) to ``directory``."""
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    world = build_world(seed=0, num_train=40, num_heldout=5)
    one_hop = [example for example in world.train if example.hops == 1][:2]
    two_hop = [example for example in world.train if example.hops == 2][:1]
    examples = one_hop + two_hop
    retriever = BM25Retriever(world.corpus)
    corpus_path = write_corpus_jsonl(world.corpus, directory / "corpus.jsonl")
    wrong = [examples[(index + 1) % len(examples)].answers[0] for index in range(len(examples))]
    scripts = [(example, script) for example, other in zip(examples, wrong) for script in _scripts(example, retriever, other)]

    texts = [example.question for example in examples] + [json.dumps(SEARCH_SCHEMA)]
    texts += [piece for _, script in scripts for turn in script for piece in turn if piece]
    texts += ["Now there's enough information to answer", "<tool_call>", "</tool_call>", "<tool_response>", "assistant"]
    tokenizer = train_tokenizer(texts * 3, vocab_size=600, min_frequency=2)
    tokenizer.chat_template = HERMES_CHAT_TEMPLATE
    builder = create_continuous_token_builder(tokenizer, hf_model_type="llama")
    sequences = [_sequence(builder, tokenizer, example.question, script) for example, script in scripts]

    model = build_model(tokenizer, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                        max_position_embeddings=1024, seed=seed)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and much faster on a busy machine
    try:
        _train(model, sequences, pad_id=tokenizer.pad_token_id, steps=steps, seed=seed)
    finally:
        torch.set_num_threads(threads)
    train_seconds = time.perf_counter() - started
    model.eval()
    save_pretrained(model, tokenizer, directory / "model")
    return Policy(directory / "model", model, tokenizer, examples, corpus_path, train_seconds)


def _train(model: Any, sequences: list[tuple[list[int], list[int]]], *, pad_id: int, steps: int, seed: int) -> None:
    """Next-token loss on the assistant's tokens only (the prompt and tool text are given)."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (ids, assistant) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, assistant] = input_ids[row, assistant]
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0, betas=(0.9, 0.98))
    model.train()
    for step in range(steps):  # linear warm-up over 10 steps, then cosine decay to half
        scale = min(1.0, (step + 1) / 10) * (0.75 + 0.25 * math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = LEARNING_RATE * scale
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


# ---------------------------------------------------------------------------------------------
# The rollout server stand-in
# ---------------------------------------------------------------------------------------------


@dataclass
class ServerLog:
    """What the server computed: per request kind ("generate" / "prompt_logprobs"), the tokens it
    prefilled and the seconds it spent."""

    tokens: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)
    requests: Counter = field(default_factory=Counter)


@dataclass
class Logprob:
    """vLLM's ``Logprob`` (``vllm.logprobs``): what ``RequestOutput.prompt_logprobs`` maps each token id to."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


VERL_EXTRACTORS = {
    "vllm": ("workers/rollout/vllm_rollout/utils.py", "extract_prompt_logprobs",
             {"Optional": typing.Optional, "RequestOutput": object}),
    "sglang": ("workers/rollout/sglang_rollout/async_sglang_server.py", "_extract_prompt_logprobs_sglang", {}),
}
"""verl's prompt log-prob extractors: (file in the verl package, function, the names its signature reads)."""


def verl_function(relative_path: str, name: str, namespace: dict[str, Any]) -> Any:
    """The top-level function ``name`` of the installed verl's ``relative_path``, compiled from that
    file's own source (same file name and line numbers in tracebacks) in ``namespace``; its module
    cannot be imported here (it imports vLLM or SGLang at the top)."""
    import verl

    path = Path(verl.__file__).parent / relative_path
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name]
    if not found:
        raise RuntimeError(f"verl {verl.__version__} has no function {name} in {path}: verl moved it, update VERL_EXTRACTORS")
    scope = dict(namespace)
    exec(compile(ast.Module(body=found, type_ignores=[]), str(path), "exec"), scope)
    return scope[name]


def engine_prompt_logprobs(flavor: str, prompt_ids: list[int], logprobs: list[float]) -> dict[str, list]:
    """``extra_fields`` from verl's own extractor of ``flavor`` for prompt log-probs in that engine's
    output layout: vLLM's ``RequestOutput.prompt_logprobs`` ([None, {token: Logprob}, ...]) or
    SGLang's ``meta_info["input_token_logprobs"]`` ([(logprob or None, token, text), ...]).
    ``logprobs[p - 1]`` is log pi(prompt_ids[p] | prompt_ids[:p]) for p >= 1."""
    relative_path, name, namespace = VERL_EXTRACTORS[flavor]
    extract = verl_function(relative_path, name, namespace)
    result: dict[str, list] = {}
    if flavor == "vllm":
        output = SimpleNamespace(prompt_logprobs=[None] + [
            {token: Logprob(value, rank=1)} for token, value in zip(prompt_ids[1:], logprobs)])
        extract(output=output, num_prompt_logprobs=0, result_dict=result)
    else:
        meta_info = {"input_token_logprobs": [(None, prompt_ids[0], None)] + [
            (value, token, None) for token, value in zip(prompt_ids[1:], logprobs)]}
        extract(meta_info=meta_info, num_prompt_logprobs=0, sequence_length=len(prompt_ids), result_dict=result)
    return result


class CPURolloutServer:
    """verl's vLLM (or SGLang) server ``generate`` contract on an HF causal LM, on CPU (see the module docstring).

    Sampling params read as vLLM does: ``max_tokens``, ``temperature`` (0 = greedy), ``top_p``,
    ``top_k`` (-1 = off), ``logprobs`` (bool: return the sampled tokens' log-probs, from the raw
    logits as vLLM's default ``raw_logprobs``), ``prompt_logprobs`` (0: the log-prob of every prompt
    token; top-k > 0 is not supported), ``stop_token_ids``, ``repetition_penalty`` (1.0 only),
    ``ignore_eos``, ``detokenize``; any other key is refused, as ``SamplingParams`` would.
    """

    def __init__(self, model: Any, *, eos_token_id: int, max_model_len: int, global_steps: int = 0, seed: int = 0,
                 flavor: str = "vllm"):
        if flavor not in VERL_EXTRACTORS:
            raise ValueError(f"flavor must be one of {sorted(VERL_EXTRACTORS)}, got {flavor!r}")
        self.model = model.eval()
        self.flavor = flavor
        self.eos_token_id = int(eos_token_id)
        self.max_model_len = int(max_model_len)
        self.global_steps = global_steps
        self.seed = seed
        self.log = ServerLog()
        self._seen: Counter = Counter()

    async def generate(self, prompt_ids, sampling_params, request_id, image_data=None, video_data=None,
                       audio_data=None, mm_processor_kwargs=None, priority=0):
        from verl.workers.rollout.replica import TokenOutput

        if image_data is not None or video_data is not None or audio_data is not None:
            raise ValueError("CPURolloutServer is text-only")
        prompt_ids = [int(token) for token in prompt_ids]
        params = dict(sampling_params)
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(f"Prompt length ({len(prompt_ids)}) leaves no room within max_model_len {self.max_model_len}")
        max_tokens = max(1, min(int(params.pop("max_tokens", room)), room))
        want_logprobs = bool(params.pop("logprobs", False))
        prompt_logprobs = params.pop("prompt_logprobs", None)
        sampler = _Sampler(params, self.eos_token_id)
        if prompt_logprobs not in (None, 0):
            raise ValueError(f"CPURolloutServer supports prompt_logprobs=0 only, got {prompt_logprobs}")
        started = time.perf_counter()
        extra_fields: dict[str, Any] = {"global_steps": self.global_steps, "num_cached_tokens": 0}
        with torch.no_grad():
            output = self.model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
            if prompt_logprobs is not None:
                log_softmax = torch.log_softmax(output.logits[0, :-1].float(), dim=-1)
                values = log_softmax.gather(-1, torch.tensor(prompt_ids[1:])[:, None])[:, 0].tolist()
                extra_fields.update(engine_prompt_logprobs(self.flavor, prompt_ids, values))
            tokens, logprobs = sampler.sample(self.model, output, max_tokens, self._generator(prompt_ids))
        kind = "prompt_logprobs" if prompt_logprobs is not None else "generate"
        self.log.tokens[kind] += len(prompt_ids)
        self.log.seconds[kind] += time.perf_counter() - started
        self.log.requests[kind] += 1
        return TokenOutput(token_ids=tokens, log_probs=logprobs if want_logprobs else None, stop_reason="completed",
                           num_preempted=0, extra_fields=extra_fields)

    def _generator(self, prompt_ids: list[int]) -> torch.Generator:
        digest = hashlib.sha256(np.asarray(prompt_ids, dtype=np.int64).tobytes()).digest()
        key = digest[:8]
        self._seen[key] += 1
        return torch.Generator().manual_seed((int.from_bytes(key, "little") + 7919 * self._seen[key] + self.seed) % 2**63)


class _Sampler:
    def __init__(self, params: dict[str, Any], eos_token_id: int):
        self.temperature = float(params.pop("temperature", 1.0))
        self.top_p = float(params.pop("top_p", 1.0))
        self.top_k = int(params.pop("top_k", -1))
        self.stop = set(params.pop("stop_token_ids", None) or [])
        if not params.pop("ignore_eos", False):
            self.stop.add(eos_token_id)
        if float(params.pop("repetition_penalty", 1.0)) != 1.0:
            raise ValueError("CPURolloutServer supports repetition_penalty=1.0 only")
        params.pop("detokenize", None)
        if params:
            raise TypeError(f"unsupported sampling params {sorted(params)}")

    def sample(self, model: Any, output: Any, max_tokens: int, generator: torch.Generator) -> tuple[list[int], list[float]]:
        tokens, logprobs = [], []
        logits = output.logits[0, -1].float()
        for _ in range(max_tokens):
            log_softmax = torch.log_softmax(logits, dim=-1)
            token = self._pick(logits, generator)
            tokens.append(token)
            logprobs.append(float(log_softmax[token]))
            if token in self.stop or len(tokens) == max_tokens:
                break
            # The KV cache under the keyword this transformers' forward takes (``cache`` in the newest,
            # ``past_key_values`` in the 5.10 that verl 0.9.1 allows): an unknown keyword would land in
            # **kwargs and every step would be decoded without its context.
            output = model(input_ids=torch.tensor([[token]]), use_cache=True, **_cache_argument(model, output))
            logits = output.logits[0, -1].float()
        return tokens, logprobs

    def _pick(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        if self.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_k > 0:
            kth = torch.topk(probs, self.top_k).values[-1]
            probs = torch.where(probs >= kth, probs, 0.0)
        if self.top_p < 1.0:
            ordered, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(ordered, 0) - ordered < self.top_p * ordered.sum()
            probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
        return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


class InProcessActor:
    """Ray's actor-handle call syntax on a local object: ``handle.method.remote(*args)`` returns
    the method's awaitable (or an already-finished future), run in this process."""

    def __init__(self, target: Any):
        self._target = target

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)

        def remote(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if hasattr(result, "__await__"):
                return result
            import asyncio

            future = asyncio.get_event_loop().create_future()
            future.set_result(result)
            return future

        return SimpleNamespace(remote=remote)


def local_server_client(config: Any, server: CPURolloutServer, client_class: type | None = None) -> Any:
    """verl's ``LLMServerClient`` (or ``client_class``, e.g. ``FullyAsyncLLMServerClient``; its
    ``generate`` runs as is) routed to ``server`` in this process."""
    from verl.workers.rollout.llm_server import LLMServerClient

    class LocalServerClient(client_class or LLMServerClient):
        async def _acquire_server(self, request_id: str, **extra: Any) -> tuple[str, Any]:
            return "cpu-0", InProcessActor(server)

        def _release_server(self, server_id: str, request_id: str | None = None) -> None:
            return None

    return LocalServerClient(config, load_balancer_handle=None)


# ---------------------------------------------------------------------------------------------
# verl's config and batches
# ---------------------------------------------------------------------------------------------


def verl_config(policy: Policy, tool_config: Path, *, agent_loop: str, use_v1: bool, n: int, extra: list[str] = (),
                probe_mode: str = "server") -> Any:
    """verl's own ``ppo_trainer`` config composed by Hydra, with the harness's overrides; the probes
    on the rollout server (``probe_mode="server"``) or in the actor's old-log-prob pass ("actor")."""
    import verl
    from hydra import compose, initialize_config_dir

    overrides = [
        f"actor_rollout_ref.model.path={policy.path}",
        "actor_rollout_ref.rollout.name=vllm",
        f"actor_rollout_ref.rollout.n={n}",
        f"data.max_prompt_length={PROMPT_LENGTH}",
        f"data.max_response_length={RESPONSE_LENGTH}",
        "actor_rollout_ref.rollout.multi_turn.enable=True",
        "actor_rollout_ref.rollout.multi_turn.format=hermes",
        "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=4",
        "actor_rollout_ref.rollout.multi_turn.max_tool_response_length=2048",
        f"actor_rollout_ref.rollout.multi_turn.tool_config_path={tool_config}",
        f"actor_rollout_ref.rollout.agent.default_agent_loop={agent_loop}",
        "+actor_rollout_ref.rollout.agent.agent_loop_manager_class=igpo_rewards.integrations.verl_manager.IGPOAgentLoopManager",
        "trainer.v1.sampler.custom_sampler.path=pkg://igpo_rewards.integrations.verl_manager",
        "trainer.v1.sampler.custom_sampler.name=IGPOReplayBuffer",
        "algorithm.adv_estimator=igpo",
        f"+algorithm.igpo.probe_mode={probe_mode}",
        "algorithm.use_kl_in_reward=False",
        f"trainer.use_v1={use_v1}",
        "reward.custom_reward_function.path=pkg://igpo_rewards.integrations.verl",
        "reward.custom_reward_function.name=compute_score",
        *extra,
    ]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def write_tool_config(directory: Path, retrieval_url: str) -> Path:
    path = directory / "search_tool.yaml"
    path.write_text(
        "tools:\n"
        "  - class_name: igpo_rewards.integrations.verl_search.SearchTool\n"
        "    config:\n"
        "      type: native\n"
        f"      retrieval_url: {retrieval_url}\n"
        f"      topk: {TOPK}\n"
    )
    return path


def dataset_rows(examples: list[QAExample]) -> list[dict[str, Any]]:
    """One row per question in the verl/Search-R1 parquet layout, as RLHFDataset yields them."""
    return [
        {
            "data_source": "igpo_world",
            "raw_prompt": [{"role": "user", "content": example.question}],
            "reward_model": {"ground_truth": "<|answer_split|>".join(example.answers), "style": "rule"},
            "extra_info": {"index": index, "split": "train"},
            "index": index,
            "tools_kwargs": {},
            "uid": f"question{index}",
        }
        for index, example in enumerate(examples)
    ]


class RetrievalCommand:
    """``igpo-retrieve serve`` (the installed console script) on a free loopback port."""

    def __init__(self, corpus_path: Path, index_dir: Path):
        import subprocess
        import sys

        command = Path(sys.executable).with_name("igpo-retrieve")
        self.process = subprocess.Popen(
            [str(command), "serve", "--corpus", str(corpus_path), "--index-dir", str(index_dir), "--port", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.log: list[str] = []

    def wait_url(self, timeout: float = 180.0) -> str:
        """Blocks until the server logs its address; returns ``http://127.0.0.1:PORT``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                break
            self.log.append(line)
            if "serving" in line and " on " in line:
                return line.split(" on ")[1].split()[0]
        self.stop()
        raise RuntimeError(f"igpo-retrieve did not start: {self.log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except Exception:
                self.process.kill()
