"""Cost of the ground-truth probes on the reference model (issue 5, probe part).

For a batch of finished trajectories with 4 and with 10 turns, every probe's answer log-prob
(one probe before each turn) is computed these ways (igpo_rewards.agent.probes):

(a) ``naive_probe_logprobs`` (tests/probe_oracle.py): one full forward per probe (the released code's way);
(b) ``packed_probe_logprobs`` (here): one packed forward per batch, probes only;
(c) ``probe_forward`` (``probe_layout="packed"``, ``score_probes``' default): the probe copies
    appended after each trajectory in the old-log-prob forward the trainer runs anyway;
    compared with ``token_logprobs`` (the old-log-prob forward alone, plain causal attention),
    the extra cost is what IGPO adds to a PPO step. With one dense [N, N] mask every trajectory
    query also scores the probe keys (masked out, but computed), so attention grows by about
    twice the extra tokens, and it loses the causal fast path;
(d) ``probe_forward(probe_layout="kv_cache")`` (the trainer's default): the old-log-prob forward (plain causal) keeps its
    KV cache, then one second pass runs every probe copy against it: only the probe rows are
    computed.

The old log-probs are those of the generated tokens (the turns), as the trainer scores them.

K = 4 targets per turn (the answer and three sub-goals, ``target_table``): (c) and (d) with every
turn probed for four targets in the same forward, timed in interleaved rounds against the same
way with one target and the forward alone (``test_four_targets_per_turn_in_interleaved_rounds``),
checked against one plain forward per (turn, target).

The summary reports tokens processed (real and padded: attention runs on the padded packed
layout) and wall time, and the extra cost of (c) and (d) over the old-log-prob forward next to the
ideal extra tokens T x P (probe suffix length P) relative to the forward's tokens. All
ways must agree (checked on every run; timings are never asserted).

Full mode (``IGPO_BENCH=full``): the demo's tiny model (igpo_rewards.reference_trainer.config.TinyModelConfig,
e.g. hidden 96, 3 layers, 4 heads, MLP 256, with its BPE vocabulary trained on the synthetic
world), 8 trajectories. Quick mode: a 1-layer width-32 model, one trajectory.
"""

from __future__ import annotations

import functools
import random
import statistics
import time
from typing import NamedTuple

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from igpo_rewards.agent.probes import (  # noqa: E402
    build_probe_suffix,
    pad_token_ids,
    probe_forward,
    suffix_table,
    target_table,
    token_logprobs,
)
from igpo_rewards.agent.protocol import TAGS  # noqa: E402
from igpo_rewards.reference_trainer.config import TinyModelConfig  # noqa: E402
from igpo_rewards.reference_trainer.world import build_world  # noqa: E402
from igpo_rewards.testing.tiny import build_model, train_tokenizer  # noqa: E402

from ..probe_oracle import naive_probe_logprobs  # noqa: E402
from .bench_support import WAY_C, WAY_D, mode, rounds  # noqa: E402

TURN_COUNTS = (4, 10)
TOLERANCE = 1e-4


class Setting(NamedTuple):
    trajectories: int
    documents_per_observation: int
    vocab_size: int
    model: dict


def _settings() -> dict[str, Setting]:
    tiny = TinyModelConfig()  # the demo's model, as the trainer builds it
    sizes = ("hidden_size", "num_layers", "num_heads", "intermediate_size")
    return {
        "full": Setting(8, 3, tiny.vocab_size, {name: getattr(tiny, name) for name in sizes}),
        "quick": Setting(1, 1, 300, dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)),
    }


SETTINGS = _settings()


class ProbeBatch(NamedTuple):
    token_ids: list[list[int]]
    starts: list[list[int]]  # probe j of trajectory b scores the answer after token_ids[b][:starts[b][j]]
    suffixes: list  # ProbeSuffix per trajectory
    turn_ends: list[list[int]]  # turn j of trajectory b is token_ids[b][starts[b][j]:turn_ends[b][j]]


class Tensors(NamedTuple):
    """A ProbeBatch as the trainer's step holds it: padded ids, [B, T] starts and mask, the suffix table,
    the generated-token mask."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    turn_starts: torch.Tensor
    turn_mask: torch.Tensor
    suffixes: object
    token_mask: torch.Tensor


def _tensors(batch: ProbeBatch, *, cut: bool = False) -> Tensors:
    """``cut``: each trajectory ends at its last probe start (way (b): later tokens are the context of no probe)."""
    rows = [row[: max(starts)] if cut else row for row, starts in zip(batch.token_ids, batch.starts)]
    input_ids, lengths = pad_token_ids(rows)
    turns = max(map(len, batch.starts))
    turn_starts = torch.tensor([starts + [0] * (turns - len(starts)) for starts in batch.starts])
    turn_mask = torch.tensor([[j < len(starts) for j in range(turns)] for starts in batch.starts])
    position = torch.arange(input_ids.shape[1])
    token_mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    for b, (starts, ends) in enumerate(zip(batch.starts, batch.turn_ends)):
        for start, end in zip(starts, ends):
            token_mask[b] |= (position >= start) & (position < end) & (not cut)
    return Tensors(input_ids, lengths, turn_starts, turn_mask, suffix_table(batch.suffixes), token_mask)


def packed_probe_logprobs(model, batch: ProbeBatch):
    """Way (b): the probe copies in one packed forward, each trajectory cut at its last probe start."""
    cut = _tensors(batch, cut=True)
    out = probe_forward(model, cut.input_ids, cut.lengths, cut.turn_starts, cut.turn_mask, cut.suffixes)
    return out.probe_logprobs, out.probe_mask


def folded(model, tensors: Tensors, layout: str):
    """Ways (c) and (d): the old log-probs of the generated tokens and every probe, one forward."""
    return probe_forward(model, tensors.input_ids, tensors.lengths, tensors.turn_starts, tensors.turn_mask, tensors.suffixes,
                         token_mask=tensors.token_mask, probe_layout=layout)


def alone(model, tensors: Tensors):
    """The old-log-prob forward alone: plain causal attention, log-probs of the generated tokens."""
    return token_logprobs(model, tensors.input_ids, tensors.token_mask)[0]


@functools.lru_cache(maxsize=1)
def _world():
    return build_world(seed=0, num_train=300 if mode() == "full" else 40, num_heldout=0)


@functools.lru_cache(maxsize=1)
def _model_and_tokenizer():
    setting = SETTINGS[mode()]
    world = _world()
    texts = [doc.contents for doc in world.corpus] + [example.question for example in world.train]
    texts += [" ".join(TAGS) + " Now there's enough information to answer"] * 4
    tokenizer = train_tokenizer(texts, vocab_size=setting.vocab_size, model_max_length=4096)
    model = build_model(tokenizer, max_position_embeddings=4096, seed=0, **setting.model)
    return model.eval(), tokenizer


def _trajectory_batch(num_turns: int) -> ProbeBatch:
    """Finished trajectories with ``num_turns`` turns, written as the agent writes them.

    Prompt (instruction + question), then per turn a think/search call of about the demo's
    24 new tokens and an observation of retrieved documents; the last turn answers.
    """
    setting = SETTINGS[mode()]
    model, tokenizer = _model_and_tokenizer()
    world = _world()
    rng = random.Random(num_turns)
    token_ids, starts, suffixes, ends = [], [], [], []
    for b in range(setting.trajectories):
        example = world.train[b % len(world.train)]
        ids = tokenizer(
            "Answer the given question. Think inside <think> and </think>, search with <search> query "
            f"</search>, answer inside <answer> and </answer>. Question: {example.question}\n",
            add_special_tokens=False,
        ).input_ids
        turn_starts, turn_ends = [], []
        for turn in range(num_turns):
            turn_starts.append(len(ids))
            if turn < num_turns - 1:
                doc = rng.choice(world.corpus)
                call = f"<think> I need to find {doc.title}. </think>\n<search> {doc.title} </search>"
                docs = rng.sample(world.corpus, setting.documents_per_observation)
                observation = "<information> " + " ".join(
                    f"Doc {i + 1}(Title: {d.title}) {d.text}" for i, d in enumerate(docs)) + " </information>\n"
                ids += tokenizer(call, add_special_tokens=False).input_ids[:24]
                turn_ends.append(len(ids))
                ids += tokenizer(observation, add_special_tokens=False).input_ids
            else:
                ids += tokenizer(f"<think> done </think>\n<answer> {example.answers[0]} </answer>",
                                 add_special_tokens=False).input_ids
                turn_ends.append(len(ids))
        token_ids.append(ids)
        starts.append(turn_starts)
        ends.append(turn_ends)
        suffixes.append(build_probe_suffix(tokenizer, example.answers[0]))
    return ProbeBatch(token_ids, starts, suffixes, ends)


@pytest.fixture(scope="module", params=TURN_COUNTS, ids=[f"T{t}" for t in TURN_COUNTS])
def probe_batch(request, torch_threads):
    return request.param, _trajectory_batch(request.param)


def _token_counts(batch: ProbeBatch) -> dict[str, int]:
    """Tokens each way processes: real ones, and padded ones (rows x packed width)."""
    lengths = [len(ids) for ids in batch.token_ids]
    probe_lengths = [len(suffix.token_ids) for suffix in batch.suffixes]
    naive = sum(start + p for starts, p in zip(batch.starts, probe_lengths) for start in starts)
    cut = [max(starts) + len(starts) * p for starts, p in zip(batch.starts, probe_lengths)]
    folded = [n + len(starts) * p for n, starts, p in zip(lengths, batch.starts, probe_lengths)]
    rows = len(lengths)
    copies = max(len(starts) for starts in batch.starts) * max(probe_lengths)
    return dict(
        two_pass=sum(folded), two_pass_padded=rows * (max(lengths) + copies),
        naive=naive, naive_padded=naive,
        packed_probes=sum(cut), packed_probes_padded=rows * max(cut),
        folded=sum(folded), folded_padded=rows * max(folded),
        old_logprob=sum(lengths), old_logprob_padded=rows * max(lengths),
        ideal_extra=sum(len(starts) * p for starts, p in zip(batch.starts, probe_lengths)),
        probe_length=max(probe_lengths),
    )


@functools.lru_cache(maxsize=2)
def _naive_reference(num_turns: int):
    model, _ = _model_and_tokenizer()
    batch = _trajectory_batch(num_turns)
    with torch.no_grad():
        return naive_probe_logprobs(model, batch.token_ids, batch.starts, batch.suffixes)


def _run(benchmark, function, name: str, num_turns: int, batch: ProbeBatch, recorder):
    benchmark.group = f"probes, {num_turns} turns: one forward per probe vs packed vs folded"
    counts = _token_counts(batch)
    benchmark.extra_info.update(counts)

    def call():
        with torch.no_grad():
            return function()

    result = benchmark.pedantic(call, rounds=rounds("probe"), warmup_rounds=1 if mode() == "full" else 0,
                                iterations=1)
    recorder.record(benchmark, suite="probes", workload=f"T={num_turns}", backend="torch", name=name, **counts)
    return result


def test_probes_one_forward_each(benchmark, probe_batch, recorder):
    num_turns, batch = probe_batch
    model, _ = _model_and_tokenizer()
    logprobs, mask = _run(
        benchmark, lambda: naive_probe_logprobs(model, batch.token_ids, batch.starts, batch.suffixes),
        "(a) one forward per probe", num_turns, batch, recorder)
    want, want_mask = _naive_reference(num_turns)
    assert torch.equal(mask, want_mask) and int(mask.sum()) > 0
    torch.testing.assert_close(logprobs, want, rtol=0.0, atol=TOLERANCE)


def test_probes_packed(benchmark, probe_batch, recorder):
    num_turns, batch = probe_batch
    model, _ = _model_and_tokenizer()
    logprobs, mask = _run(
        benchmark, lambda: packed_probe_logprobs(model, batch),
        "(b) one packed forward, probes only", num_turns, batch, recorder)
    want, want_mask = _naive_reference(num_turns)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(logprobs, want, rtol=0.0, atol=TOLERANCE)


@pytest.mark.parametrize("layout", ["packed", "kv_cache"])
def test_probes_folded_into_old_logprob_forward(benchmark, probe_batch, recorder, layout):
    num_turns, batch = probe_batch
    model, _ = _model_and_tokenizer()
    tensors = _tensors(batch)
    result = _run(benchmark, lambda: folded(model, tensors, layout), WAY_C if layout == "packed" else WAY_D, num_turns, batch, recorder)
    want, want_mask = _naive_reference(num_turns)
    assert torch.equal(result.probe_mask, want_mask)
    torch.testing.assert_close(result.probe_logprobs, want, rtol=0.0, atol=TOLERANCE)
    with torch.no_grad():
        plain = alone(model, tensors)
    torch.testing.assert_close(result.token_logprobs, plain, rtol=0.0, atol=TOLERANCE)


def test_old_logprob_forward_alone(benchmark, probe_batch, recorder):
    num_turns, batch = probe_batch
    model, _ = _model_and_tokenizer()
    tensors = _tensors(batch)
    result = _run(benchmark, lambda: alone(model, tensors), "old-log-prob forward alone", num_turns, batch, recorder)
    assert bool(tensors.token_mask.any()) and bool((result[tensors.token_mask] < 0).all())


def test_probe_overhead_in_interleaved_rounds(benchmark, probe_batch, recorder):
    """The extra cost of (c) and (d) over the forward alone, from rounds that time all three.

    The separate benchmarks above time each way minutes apart, and on a shared machine the load
    moves in between, so the ratio of their medians moves by more than the overhead itself.
    Here every round runs the three in a shuffled order, and the reported overhead is the
    median over rounds of (way / forward alone in the same round) - 1.
    """
    num_turns, batch = probe_batch
    model, _ = _model_and_tokenizer()
    tensors = _tensors(batch)
    ways = {
        "alone": lambda: alone(model, tensors),
        WAY_C: lambda: folded(model, tensors, "packed"),
        WAY_D: lambda: folded(model, tensors, "kv_cache"),
    }
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    shuffle = random.Random(num_turns)

    def one_round():
        order = list(ways)
        shuffle.shuffle(order)
        with torch.no_grad():
            for name in order:
                started = time.perf_counter()
                ways[name]()
                seconds[name].append(time.perf_counter() - started)

    benchmark.group = f"probes, {num_turns} turns: interleaved rounds"
    benchmark.pedantic(one_round, rounds=rounds("probe_paired"), warmup_rounds=0, iterations=1)
    counts = _token_counts(batch)
    assert len(seconds["alone"]) == len(seconds[WAY_C]) == len(seconds[WAY_D]) >= 1
    for name in (WAY_C, WAY_D):
        extra = statistics.median(t / alone - 1.0 for t, alone in zip(seconds[name], seconds["alone"]))
        recorder.record(benchmark, suite="probes_paired", workload=f"T={num_turns}", backend="torch", name=name,
                        paired_extra_fraction=extra, **counts)


NUM_TARGETS = 4


def _targets(num_turns: int, batch: ProbeBatch) -> list[list]:
    """Per trajectory: its answer's suffix, then three other entities of the world as sub-goals."""
    _, tokenizer = _model_and_tokenizer()
    world = _world()
    rng = random.Random(100 + num_turns)
    entities = sorted({example.answers[0] for example in world.train})
    return [[suffix] + [build_probe_suffix(tokenizer, name) for name in rng.sample(entities, NUM_TARGETS - 1)]
            for suffix in batch.suffixes]


@functools.lru_cache(maxsize=2)
def _naive_targets(num_turns: int):
    """[B, T, K, L] from one plain forward per (turn, target)."""
    model, _ = _model_and_tokenizer()
    batch = _trajectory_batch(num_turns)
    targets = _targets(num_turns, batch)
    per_target = []
    with torch.no_grad():
        for k in range(NUM_TARGETS):
            per_target.append(naive_probe_logprobs(model, batch.token_ids, batch.starts, [row[k] for row in targets]))
    width = max(values.shape[2] for values, _ in per_target)
    pad = [torch.nn.functional.pad(values, (0, width - values.shape[2])) for values, _ in per_target]
    masks = [torch.nn.functional.pad(mask, (0, width - mask.shape[2])) for _, mask in per_target]
    return torch.stack(pad, dim=2), torch.stack(masks, dim=2)


@pytest.mark.parametrize("layout", ["packed", "kv_cache"])
def test_four_targets_per_turn_in_interleaved_rounds(benchmark, probe_batch, recorder, layout):
    """The cost of probing K = 4 targets per turn in the same forward, against one target and against
    the old-log-prob forward alone, from rounds that time all three in a shuffled order (as above)."""
    num_turns, batch = probe_batch
    model, _ = _model_and_tokenizer()
    tensors = _tensors(batch)
    with_targets = tensors._replace(suffixes=target_table(_targets(num_turns, batch)))
    ways = {
        "alone": lambda: alone(model, tensors),
        "one target": lambda: folded(model, tensors, layout),
        "four targets": lambda: folded(model, with_targets, layout),
    }
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    results = {}
    shuffle = random.Random(num_turns)

    def one_round():
        order = list(ways)
        shuffle.shuffle(order)
        with torch.no_grad():
            for name in order:
                started = time.perf_counter()
                results[name] = ways[name]()
                seconds[name].append(time.perf_counter() - started)

    benchmark.group = f"probes, {num_turns} turns: {NUM_TARGETS} targets per turn ({layout})"
    benchmark.pedantic(one_round, rounds=rounds("probe_paired"), warmup_rounds=0, iterations=1)
    want, want_mask = _naive_targets(num_turns)
    got = results["four targets"]
    assert got.probe_logprobs.shape == want.shape and torch.equal(got.probe_mask, want_mask)
    torch.testing.assert_close(got.probe_logprobs, want, rtol=0.0, atol=TOLERANCE)
    torch.testing.assert_close(got.token_logprobs, results["alone"], rtol=0.0, atol=TOLERANCE)
    over_alone = statistics.median(t / a - 1.0 for t, a in zip(seconds["four targets"], seconds["alone"]))
    over_one = statistics.median(t / o - 1.0 for t, o in zip(seconds["four targets"], seconds["one target"]))
    one_over_alone = statistics.median(o / a - 1.0 for o, a in zip(seconds["one target"], seconds["alone"]))
    recorder.record(benchmark, suite="probe_targets", workload=f"T={num_turns}", backend="torch",
                    name=WAY_C if layout == "packed" else WAY_D, num_targets=NUM_TARGETS,
                    extra_over_alone=over_alone, extra_over_one_target=over_one,
                    one_target_extra_over_alone=one_over_alone, **_token_counts(batch))
