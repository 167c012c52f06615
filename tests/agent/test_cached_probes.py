"""The cached probe layout (igpo_rewards.agent.probes.cached_probe_forward) equals one naive
forward per probe, over a padded cache (one row per trajectory) and a packed one (all
trajectories in one row, as remove-padding forwards keep it); it computes only the probe tokens
(plus the padding its groups allow).

The oracle (tests/probe_oracle.py) runs one plain forward per probe; layouts are checked against
hand-written positions and masks.
"""

from __future__ import annotations

import pytest
import torch

from igpo_rewards.agent.probes import (
    ProbeSuffix,
    build_cached_probe_groups,
    build_probe_suffix,
    cached_probe_forward,
    pad_token_ids,
    suffix_table,
    target_table,
)
from igpo_rewards.testing.tiny import build_model, train_tokenizer

from ..probe_oracle import naive_probe_logprobs

TEXTS = [
    "Now there's enough information to answer",
    "<answer> Paris </answer> <answer> Ada Lovelace </answer> <search> capital of France </search>",
    "the river flows to answerParis answerParis answerParis",
] * 6
GLUED_TEMPLATE = "Now there's enough information to answer{answer}"
TOLERANCE = 1e-4
MIN = torch.finfo(torch.float32).min


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tokenizer):
    built = build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                        attn_implementation=request.param)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # large random weights: a leaky mask changes the log-probs a lot
        for parameter in built.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return built.eval()


def _batch(tokenizer):
    """Five trajectories: 1, 2, 4, 0 and 3 probes; answers of different lengths, one glued by BPE."""
    generator = torch.Generator().manual_seed(0)
    lengths = [9, 21, 40, 12, 17]
    token_ids = [torch.randint(5, len(tokenizer), (n,), generator=generator).tolist() for n in lengths]
    starts = [[4], [5, 13], [3, 11, 24, 40], [], [2, 9, 16]]
    suffixes = [build_probe_suffix(tokenizer, "London"), build_probe_suffix(tokenizer, "Ada Lovelace"),
                build_probe_suffix(tokenizer, "Paris", template=GLUED_TEMPLATE), build_probe_suffix(tokenizer, "Paris"),
                build_probe_suffix(tokenizer, "Paris")]
    return token_ids, starts, suffixes


def _tensors(starts, suffixes):
    width = max(map(len, starts))
    turn_starts = torch.tensor([row + [0] * (width - len(row)) for row in starts])
    turn_mask = torch.tensor([[j < len(row) for j in range(width)] for row in starts])
    return turn_starts, turn_mask, suffix_table(suffixes)


def _cache(model, token_ids, layout):
    """The trajectory forward's KV cache and where each row's keys are: one padded row per
    trajectory, or every trajectory packed into one row (block-causal mask, positions per row)."""
    from igpo_rewards.agent.probes import _cache_argument

    if layout == "padded":
        input_ids, _ = pad_token_ids(token_ids)
        output = model.base_model(input_ids=input_ids, use_cache=True)
        return next(iter(_cache_argument(model, output).values())), None, None
    lengths = torch.tensor([len(row) for row in token_ids])
    flat = torch.tensor([[token for row in token_ids for token in row]])
    segment = torch.repeat_interleave(torch.arange(len(token_ids)), lengths)
    position = torch.arange(flat.shape[1])
    allowed = (segment[:, None] == segment[None, :]) & (position[None, :] <= position[:, None])
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, MIN)[None, None]
    positions = torch.cat([torch.arange(n) for n in lengths.tolist()])[None]
    output = model.base_model(input_ids=flat, position_ids=positions, attention_mask=mask, use_cache=True)
    offsets = torch.cumsum(lengths, 0) - lengths
    return next(iter(_cache_argument(model, output).values())), torch.zeros(len(token_ids), dtype=torch.long), offsets


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("max_padding", [0.0, 0.1, 1.0])
def test_cached_probes_equal_one_naive_forward_per_probe(model, tokenizer, layout, max_padding):
    token_ids, starts, suffixes = _batch(tokenizer)
    turn_starts, turn_mask, table = _tensors(starts, suffixes)
    with torch.no_grad():
        cache, key_rows, key_offsets = _cache(model, token_ids, layout)
        result = cached_probe_forward(model, cache, turn_starts, turn_mask, table, key_rows=key_rows,
                                      key_offsets=key_offsets, max_padding=max_padding)
        expected, expected_mask = naive_probe_logprobs(model, token_ids, starts, suffixes)
    assert torch.equal(result.probe_mask, expected_mask)
    torch.testing.assert_close(result.probe_logprobs, expected, rtol=0, atol=TOLERANCE)
    lengths = expected_mask.sum(-1)
    mean = torch.where(lengths > 0, expected.sum(-1) / lengths.clamp(min=1), 0.0)
    torch.testing.assert_close(result.answer_logprob, mean, rtol=0, atol=TOLERANCE)
    ideal = sum(len(row) * len(suffix.token_ids) for row, suffix in zip(starts, suffixes))
    assert result.probe_tokens == ideal
    assert ideal <= result.query_tokens <= (1 + max_padding) * ideal
    if max_padding == 0.0:
        assert result.query_tokens == ideal


def test_gradients_flow_through_the_probes_and_the_cache(tokenizer):
    """d(sum of answer log-probs)/d(weights) equals the naive forwards' (the cache keeps its graph)."""
    token_ids, starts, suffixes = _batch(tokenizer)
    turn_starts, turn_mask, table = _tensors(starts, suffixes)
    model = build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, seed=3).eval()
    cache, _, _ = _cache(model, token_ids, "padded")
    cached_probe_forward(model, cache, turn_starts, turn_mask, table).probe_logprobs.sum().backward()
    got = [parameter.grad.clone() for parameter in model.parameters()]
    model.zero_grad()
    naive_probe_logprobs(model, token_ids, starts, suffixes)[0].sum().backward()
    for value, expected in zip(got, (parameter.grad for parameter in model.parameters())):
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5)


def _suffix(ids, answer):
    return ProbeSuffix(text="", token_ids=tuple(ids), answer_start=answer[0], answer_end=answer[1])


def test_cached_layout_matches_the_convention():
    """Row 0: probes after 2 and 5 tokens, suffix (7, 8, 9) with answer tokens 1-2; row 1: one probe
    after 4 tokens, suffix (11, 12) with answer token 1. One group (padding allowed)."""
    turn_starts, turn_mask, table = _tensors([[2, 5], [4]], [_suffix([7, 8, 9], (1, 3)), _suffix([11, 12], (1, 2))])
    (group,) = build_cached_probe_groups(turn_starts, turn_mask, table, max_padding=1.0, pad_token_id=0)
    assert group.rows.tolist() == [0, 1] and group.num_keys == 5
    assert group.input_ids.tolist() == [[7, 8, 9, 7, 8, 9], [11, 12, 0, 0, 0, 0]]
    assert group.position_ids.tolist() == [[2, 3, 4, 5, 6, 7], [4, 5, 0, 0, 0, 0]]
    allowed = (group.attention_mask[:, 0] == 0).int()
    assert allowed.shape == (2, 6, 5 + 6)
    # row 0: copy 0 sees keys 0-1, copy 1 keys 0-4; each its own copy causally
    assert allowed[0].tolist() == [
        [1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1],
    ]
    # row 1: its copy sees keys 0-3; padding slots see only themselves
    assert allowed[1].tolist() == [
        [1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    ]
    # answer token k of a copy is read where its previous token sits
    assert group.probe_mask.tolist() == [[[True, True], [True, True]], [[True, False], [False, False]]]
    assert group.probe_sources[0].tolist() == [[0, 1], [3, 4]] and group.probe_sources[1, 0, 0] == 0
    assert group.probe_tokens[0].tolist() == [[8, 9], [8, 9]] and group.probe_tokens[1, 0, 0] == 12


def test_groups_keep_the_padding_within_the_allowance():
    """Probe tokens per row 30, 10, 0, 28, 9. With 10% padding allowed: {0, 3} (60 slots for 58
    tokens) and {1, 4} (20 for 19); adding row 1 to the first group would cost 90 slots for 68."""
    lengths, counts = [10, 5, 7, 14, 9], [3, 2, 0, 2, 1]
    suffixes = [_suffix(range(5, 5 + size), (1, 2)) for size in lengths]
    starts = [[2 + 3 * j for j in range(count)] for count in counts]
    turn_starts, turn_mask, table = _tensors(starts, suffixes)
    groups = build_cached_probe_groups(turn_starts, turn_mask, table, max_padding=0.1)
    assert [group.rows.tolist() for group in groups] == [[0, 3], [1, 4]]
    assert [tuple(group.input_ids.shape) for group in groups] == [(2, 30), (2, 10)]
    exact = build_cached_probe_groups(turn_starts, turn_mask, table, max_padding=0.0)
    assert [group.rows.tolist() for group in exact] == [[0], [3], [1], [4]]
    assert build_cached_probe_groups(turn_starts, turn_mask & False, table) == []


def test_attention_without_custom_masks_runs_the_probes_with_sdpa(tokenizer):
    """A model set to flash attention (which takes no 4D mask, and cannot run on this CPU) gets its
    probe forwards run with "sdpa", and keeps its setting afterwards."""
    token_ids, starts, suffixes = _batch(tokenizer)
    turn_starts, turn_mask, table = _tensors(starts, suffixes)
    model = build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, seed=4).eval()
    with torch.no_grad():
        cache, _, _ = _cache(model, token_ids, "padded")
        expected, _ = naive_probe_logprobs(model, token_ids, starts, suffixes)
        model.config._attn_implementation = "flash_attention_2"
        result = cached_probe_forward(model, cache, turn_starts, turn_mask, table)
    assert model.config._attn_implementation == "flash_attention_2"
    torch.testing.assert_close(result.probe_logprobs, expected, rtol=0, atol=TOLERANCE)


def test_bad_inputs_are_refused(model, tokenizer):
    token_ids, starts, suffixes = _batch(tokenizer)
    turn_starts, turn_mask, table = _tensors(starts, suffixes)
    with torch.no_grad():
        cache, _, _ = _cache(model, token_ids, "padded")
    answer_first = suffix_table([build_probe_suffix(tokenizer, "Paris", template="{answer} is it")] * len(starts))
    with pytest.raises(ValueError, match=r"suffixes row 0 starts with its answer \(answer_start = 0\)"):
        cached_probe_forward(model, cache, turn_starts, turn_mask, answer_first)
    with pytest.raises(ValueError, match=r"turn_starts\[1, 0\] = 0 must be >= 1"):
        cached_probe_forward(model, cache, turn_starts.masked_fill(torch.tensor([[0] * 4, [1, 0, 0, 0]] + [[0] * 4] * 3).bool(), 0),
                             turn_mask, table)
    with pytest.raises(ValueError, match=r"turn_starts and turn_mask must both be \[B, T\]"):
        cached_probe_forward(model, cache, turn_starts[:, :2], turn_mask, table)
    targets = target_table([[suffix, suffix] for suffix in suffixes])  # K = 2 targets per row
    with pytest.raises(ValueError, match=r"takes one suffix per row \(suffix_table\), got a table of 2 targets per row"):
        cached_probe_forward(model, cache, turn_starts, turn_mask, targets)
    with pytest.raises(ValueError, match="max_padding must be >= 0, got -0.5"):
        cached_probe_forward(model, cache, turn_starts, turn_mask, table, max_padding=-0.5)
    with pytest.raises(TypeError, match="max_padding must be a float, got bool"):
        cached_probe_forward(model, cache, turn_starts, turn_mask, table, max_padding=True)
    with pytest.raises(ValueError, match=r"row 2 reads cache row 2, keys \[30, 70\), but the cache has 5 rows of 40 keys"):
        cached_probe_forward(model, cache, turn_starts, turn_mask, table, key_offsets=torch.tensor([0, 0, 30, 0, 0]))
    with pytest.raises(TypeError, match="cache must be a transformers Cache"):
        cached_probe_forward(model, object(), turn_starts, turn_mask, table)
