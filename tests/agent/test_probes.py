"""The probe forward equals one naive forward per probe, values and gradients (igpo_rewards.agent.probes).

Batches are built as a trainer builds them: right-padded ids, [B, T] turn starts and mask, one
suffix per row. The oracle (tests/probe_oracle.py) runs one plain forward per probe.
"""

from __future__ import annotations

import pytest
import torch

import igpo_rewards
from igpo_rewards.agent.probes import (
    PROBE_LAYOUTS,
    ProbeSuffix,
    build_packed_inputs,
    build_probe_inputs,
    build_probe_suffix,
    pad_token_ids,
    probe_forward,
    score_probes,
    suffix_table,
    token_logprobs,
)
from igpo_rewards.agent.protocol import PROBE_TEMPLATE
from igpo_rewards.testing.tiny import build_model, train_tokenizer

from ..probe_oracle import naive_probe_logprobs

TEXTS = [
    "Now there's enough information to answer",
    "<answer> Paris </answer> <answer> Ada Lovelace </answer> <search> capital of France </search>",
    "the river flows to answerParis answerParis answerParis",  # teaches a merge across "answer|Paris"
    "<information> Doc 1 Ada Lovelace was born in London, the capital. </information>",
] * 6
GLUED_TEMPLATE = "Now there's enough information to answer{answer}"
ANSWER_FIRST_TEMPLATE = "{answer} is the answer"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=420)


def _sharpen(model, seed):
    """Large random weights: log-probs then depend strongly on the context (a leaky mask shows)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tokenizer):
    built = build_model(
        tokenizer,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        attn_implementation=request.param,
    )
    return _sharpen(built, seed=5)


def _batch(tokenizer):
    """Trajectories of different lengths with 1, 2 and 4 probes; probe answers of different lengths."""
    generator = torch.Generator().manual_seed(0)
    vocabulary = len(tokenizer)
    token_ids = [torch.randint(5, vocabulary, (n,), generator=generator).tolist() for n in (9, 21, 40)]
    starts = [[4], [5, 13], [3, 11, 24, 40]]
    suffixes = [
        build_probe_suffix(tokenizer, "London", template=ANSWER_FIRST_TEMPLATE),  # scored from the prefix
        build_probe_suffix(tokenizer, "Ada Lovelace"),
        build_probe_suffix(tokenizer, "Paris", template=GLUED_TEMPLATE),
    ]
    assert suffixes[0].answer_start == 0
    return token_ids, starts, suffixes


class Tensors:
    """The batch of ``_batch`` as the kernel takes it (built independently of the kernel's helpers)."""

    def __init__(self, token_ids, starts, suffixes):
        width, turns = max(map(len, token_ids)), max(map(len, starts))
        self.input_ids = torch.tensor([row + [0] * (width - len(row)) for row in token_ids])
        self.lengths = torch.tensor([len(row) for row in token_ids])
        self.turn_starts = torch.tensor([row + [0] * (turns - len(row)) for row in starts])
        self.turn_mask = torch.tensor([[j < len(row) for j in range(turns)] for row in starts])
        self.suffixes = suffix_table(suffixes)
        position = torch.arange(width)[None, :]
        self.token_mask = (position > 0) & (position < self.lengths[:, None])  # every token after the first

    def forward(self, model, layout, **kwargs):
        return probe_forward(model, self.input_ids, self.lengths, self.turn_starts, self.turn_mask, self.suffixes,
                             token_mask=self.token_mask, probe_layout=layout, **kwargs)


def _plain_token_logprobs(model, row):
    logits = model(input_ids=torch.tensor([row])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1].gather(-1, torch.tensor(row[1:])[:, None])[:, 0]


def _char_positions(tokenizer, token_ids):
    """Character start of every token, from decoding prefixes (independent of offset_mapping; ASCII)."""
    return [len(tokenizer.decode(list(token_ids[:i]))) for i in range(len(token_ids) + 1)]


@pytest.mark.parametrize(
    ("template", "answer"),
    [
        (PROBE_TEMPLATE, "Paris"),
        (PROBE_TEMPLATE, "Ada Lovelace"),
        ("<answer>{answer}</answer>", "Paris"),  # no space after the tag
        (GLUED_TEMPLATE, "Paris"),  # BPE merges template text and answer into one token
        (ANSWER_FIRST_TEMPLATE, "London"),  # answer first: probe scored from the prefix's last token
    ],
)
def test_answer_tokens_located_by_character_offsets(tokenizer, template, answer):
    suffix = build_probe_suffix(tokenizer, answer, template=template)
    text = template.replace("{answer}", answer)
    assert suffix.text == text
    assert list(suffix.token_ids) == tokenizer(text, add_special_tokens=False).input_ids
    positions = _char_positions(tokenizer, suffix.token_ids)
    assert positions[-1] == len(text)
    first = template.index("{answer}")
    last = first + len(answer)
    expected = [i for i in range(len(suffix.token_ids)) if positions[i] < last and positions[i + 1] > first]
    assert list(range(suffix.answer_start, suffix.answer_end)) == expected
    scored = tokenizer.decode(list(suffix.token_ids[suffix.answer_start : suffix.answer_end]))
    assert answer in scored


def test_glued_answer_is_merged_and_still_scored(tokenizer):
    suffix = build_probe_suffix(tokenizer, "Paris", template=GLUED_TEMPLATE)
    scored = tokenizer.decode(list(suffix.token_ids[suffix.answer_start : suffix.answer_end]))
    # The precondition that makes this case hard: the first scored token starts before the answer.
    assert scored != "Paris" and scored.endswith("Paris")
    # Counting the tokens of the pieces would have scored different tokens.
    piece_count = len(tokenizer("Paris", add_special_tokens=False).input_ids)
    assert list(suffix.token_ids[-piece_count:]) != tokenizer("Paris", add_special_tokens=False).input_ids


def test_build_probe_suffix_rejects_bad_input(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        build_probe_suffix(tokenizer, "")
    with pytest.raises(ValueError, match="exactly once"):
        build_probe_suffix(tokenizer, "Paris", template="no placeholder")
    with pytest.raises(ValueError, match="exactly once"):
        build_probe_suffix(tokenizer, "Paris", template="{answer} {answer}")
    with pytest.raises(TypeError, match="str"):
        build_probe_suffix(tokenizer, 3)


def test_pad_token_ids_and_suffix_table():
    input_ids, lengths = pad_token_ids([[5, 6, 7], [8]], pad_token_id=1)
    assert input_ids.tolist() == [[5, 6, 7], [8, 1, 1]] and lengths.tolist() == [3, 1]
    table = suffix_table([ProbeSuffix("", (9, 10, 11), 1, 3), ProbeSuffix("", (12,), 0, 1)])
    assert table.token_ids.tolist() == [[9, 10, 11], [12, 0, 0]] and table.lengths.tolist() == [3, 1]
    assert table.answer_start.tolist() == [1, 0] and table.answer_end.tolist() == [3, 1]
    assert table.rows(torch.tensor([1])).token_ids.tolist() == [[12, 0, 0]]
    with pytest.raises(ValueError, match=r"token_ids\[1\] is empty"):
        pad_token_ids([[1], []])
    with pytest.raises(ValueError, match="non-empty"):
        pad_token_ids([])
    with pytest.raises(TypeError, match="token_ids must be a sequence of token id sequences, got str"):
        pad_token_ids("abc")
    with pytest.raises(TypeError, match=r"suffixes\[0\] must be a ProbeSuffix"):
        suffix_table([None])


def test_packed_layout_matches_the_convention():
    suffix = ProbeSuffix(text="", token_ids=(101, 102, 103), answer_start=1, answer_end=3)
    other = ProbeSuffix(text="", token_ids=(7,), answer_start=0, answer_end=1)
    packed = build_packed_inputs(
        torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]]), torch.tensor([4, 2]), torch.tensor([[2, 4], [0, 0]]),
        torch.tensor([[True, True], [False, False]]), suffix_table([suffix, other]), pad_token_id=0,
    )
    assert packed.input_ids.tolist() == [
        [1, 2, 3, 4, 101, 102, 103, 101, 102, 103],
        [5, 6, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 4, 5, 6], [0, 1, 0, 0, 0, 0, 0, 0, 0, 0]]
    allowed = (packed.attention_mask == 0)[:, 0]
    expected_row0 = torch.zeros(10, 10, dtype=torch.bool)
    for query in range(4):  # trajectory: causal
        expected_row0[query, : query + 1] = True
    for copy, start in enumerate([2, 4]):
        offset = 4 + 3 * copy
        for k in range(3):
            expected_row0[offset + k, :start] = True  # its prefix
            expected_row0[offset + k, offset : offset + k + 1] = True  # its own copy, causally
    expected_row1 = torch.eye(10, dtype=torch.bool)
    expected_row1[1, 0] = True
    assert torch.equal(allowed[0], expected_row0)
    assert torch.equal(allowed[1], expected_row1)
    assert (packed.attention_mask[~allowed[:, None]] == torch.finfo(torch.float32).min).all()
    # Answer token 1 of copy 0 is read at the logits of the copy's token 0 (packed index 4).
    assert packed.probe_mask.tolist() == [[[True, True], [True, True]], [[False, False], [False, False]]]
    assert packed.probe_sources[0].tolist() == [[4, 5], [7, 8]]
    assert packed.probe_tokens[0].tolist() == [[102, 103], [102, 103]]


def test_probe_pass_layout_matches_the_convention():
    """Probe slots of the second pass: ids, positions, the mask over [cache | slots], targets."""
    suffix = ProbeSuffix(text="", token_ids=(101, 102, 103), answer_start=1, answer_end=3)
    short = ProbeSuffix(text="", token_ids=(201, 202), answer_start=0, answer_end=2)
    probes = build_probe_inputs(
        torch.tensor([[2, 4], [0, 0], [3, 0]]), torch.tensor([[True, True], [False, False], [True, False]]),
        suffix_table([suffix, short, short]), cached_length=5,
    )
    assert probes.input_ids.tolist() == [
        [101, 102, 103, 101, 102, 103],
        [0, 0, 0, 0, 0, 0],
        [201, 202, 0, 0, 0, 0],
    ]
    assert probes.position_ids.tolist() == [[2, 3, 4, 4, 5, 6], [0] * 6, [3, 4, 0, 0, 0, 0]]
    allowed = (probes.attention_mask == 0)[:, 0]
    assert allowed.shape == (3, 6, 5 + 6)
    expected = torch.zeros(3, 6, 11, dtype=torch.bool)
    for slot in range(6):
        expected[:, slot, 5 + slot] = True  # every slot sees itself
    for copy, start in enumerate([2, 4]):
        for k in range(3):
            expected[0, 3 * copy + k, :start] = True  # its prefix in the cache
            expected[0, 3 * copy + k, 5 + 3 * copy : 5 + 3 * copy + k + 1] = True  # its copy, causally
    for k in range(2):
        expected[2, k, :3] = True
        expected[2, k, 5 : 5 + k + 1] = True
    assert torch.equal(allowed, expected)
    assert (probes.attention_mask[~allowed[:, None]] == torch.finfo(torch.float32).min).all()
    # Answer token 0 of a copy is read at the prefix's last token in the cache (start - 1), later
    # ones at the copy's previous slot (cached_length + slot).
    where = probes.probe_mask
    assert where.tolist() == [[[True, True], [True, True]], [[False, False], [False, False]], [[True, True], [False, False]]]
    assert probes.probe_sources[where].tolist() == [5 + 0, 5 + 1, 5 + 3, 5 + 4, 2, 5 + 0]
    assert probes.probe_tokens[where].tolist() == [102, 103, 102, 103, 201, 202]


@pytest.mark.parametrize("layout", PROBE_LAYOUTS)
def test_batches_without_probes_and_rows_without_probes(model, tokenizer, layout):
    token_ids, starts, suffixes = _batch(tokenizer)
    batch = Tensors(token_ids, starts, suffixes)
    with torch.no_grad():
        alone, _ = token_logprobs(model, batch.input_ids, batch.token_mask)
        none = probe_forward(model, batch.input_ids, batch.lengths, batch.turn_starts, torch.zeros_like(batch.turn_mask),
                             batch.suffixes, token_mask=batch.token_mask, probe_layout=layout)
        mixed_mask = batch.turn_mask.clone()
        mixed_mask[1] = False
        mixed = probe_forward(model, batch.input_ids, batch.lengths, batch.turn_starts, mixed_mask, batch.suffixes,
                              token_mask=batch.token_mask, probe_layout=layout)
        naive, _ = naive_probe_logprobs(model, [token_ids[0], token_ids[2]], [starts[0], starts[2]], [suffixes[0], suffixes[2]])
    assert none.probe_logprobs.shape == (3, 4, 0) and none.answer_logprob.tolist() == [[0.0] * 4] * 3
    torch.testing.assert_close(none.token_logprobs, alone, atol=0, rtol=0)
    assert not mixed.probe_mask[1].any() and (mixed.answer_logprob[1] == 0).all()
    torch.testing.assert_close(mixed.probe_logprobs[[0, 2]], naive, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(mixed.token_logprobs, alone, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("layout", PROBE_LAYOUTS)
def test_probes_equal_one_naive_forward_per_probe(model, tokenizer, layout):
    token_ids, starts, suffixes = _batch(tokenizer)
    with torch.no_grad():
        out = Tensors(token_ids, starts, suffixes).forward(model, layout)
        naive, naive_mask = naive_probe_logprobs(model, token_ids, starts, suffixes)
    lengths = [s.num_answer_tokens for s in suffixes]
    assert out.probe_logprobs.shape == (3, 4, max(lengths))
    expected_mask = torch.zeros(3, 4, max(lengths), dtype=torch.bool)
    for b, (row_starts, length) in enumerate(zip(starts, lengths)):
        expected_mask[b, : len(row_starts), :length] = True
    assert torch.equal(out.probe_mask, expected_mask)
    assert torch.equal(naive_mask, expected_mask)
    torch.testing.assert_close(out.probe_logprobs, naive, atol=TOLERANCE, rtol=0)
    assert (out.probe_logprobs[~expected_mask] == 0).all()
    expected_answer_logprob = igpo_rewards.answer_logprob(naive, naive_mask)
    torch.testing.assert_close(out.answer_logprob, expected_answer_logprob, atol=TOLERANCE, rtol=0)
    # The test can fail: the answer's log-prob depends on the context, probe by probe.
    assert out.answer_logprob[2].max() - out.answer_logprob[2].min() > 1e-2


@pytest.mark.parametrize("layout", PROBE_LAYOUTS)
def test_a_leaky_mask_would_be_caught(model, tokenizer, layout):
    token_ids, starts, suffixes = _batch(tokenizer)
    leaky_starts = [[len(row)] * len(row_starts) for row, row_starts in zip(token_ids, starts)]
    with torch.no_grad():
        out = Tensors(token_ids, starts, suffixes).forward(model, layout)
        leaky, _ = naive_probe_logprobs(model, token_ids, leaky_starts, suffixes)
    assert (out.probe_logprobs[2, :3] - leaky[2, :3]).abs().max() > 10 * TOLERANCE


@pytest.mark.parametrize("layout", PROBE_LAYOUTS)
def test_token_logprobs_and_entropy_equal_a_plain_forward(model, tokenizer, layout):
    token_ids, starts, suffixes = _batch(tokenizer)
    batch = Tensors(token_ids, starts, suffixes)
    with torch.no_grad():
        folded = batch.forward(model, layout, return_entropy=True)
        alone, alone_entropy = token_logprobs(model, batch.input_ids, batch.token_mask, return_entropy=True)
        some = batch.token_mask & (torch.arange(40)[None, :] % 3 == 0)
        partial, _ = token_logprobs(model, batch.input_ids, some)
    assert folded.token_logprobs.shape == (3, 40)
    for b, row in enumerate(token_ids):
        with torch.no_grad():
            expected = _plain_token_logprobs(model, row)
            logits = model(input_ids=torch.tensor([row])).logits[0, :-1].float()
        entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
        torch.testing.assert_close(folded.token_logprobs[b, 1 : len(row)], expected, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(folded.token_entropy[b, 1 : len(row)], entropy, atol=TOLERANCE, rtol=0)
    for values in (folded.token_logprobs, folded.token_entropy, alone, alone_entropy):
        assert (values[~batch.token_mask] == 0).all()
    torch.testing.assert_close(alone, folded.token_logprobs, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(alone_entropy, folded.token_entropy, atol=TOLERANCE, rtol=0)
    assert torch.equal(partial, torch.where(some, alone, 0.0))  # only the asked-for tokens are scored


@pytest.mark.parametrize("layout", PROBE_LAYOUTS)
def test_gradients_flow_and_match_a_plain_forward(model, tokenizer, layout):
    token_ids, starts, suffixes = _batch(tokenizer)
    batch = Tensors(token_ids, starts, suffixes)
    parameters = [p for p in model.parameters()]
    out = batch.forward(model, layout)
    plain = sum(_plain_token_logprobs(model, row).sum() for row in token_ids)
    plain_grads = torch.autograd.grad(plain, parameters)
    for values in (out.token_logprobs, token_logprobs(model, batch.input_ids, batch.token_mask)[0]):
        grads = torch.autograd.grad(values[batch.token_mask].sum(), parameters, retain_graph=True)
        for grad, plain_grad in zip(grads, plain_grads):
            torch.testing.assert_close(grad, plain_grad, atol=1e-4, rtol=1e-4)
    probe_grads = torch.autograd.grad(out.answer_logprob.sum(), parameters)
    naive, naive_mask = naive_probe_logprobs(model, token_ids, starts, suffixes)
    naive_grads = torch.autograd.grad(igpo_rewards.answer_logprob(naive, naive_mask).sum(), parameters)
    for probe_grad, naive_grad in zip(probe_grads, naive_grads):
        torch.testing.assert_close(probe_grad, naive_grad, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert not batch.forward(model, layout).token_logprobs.requires_grad


def test_forwards_without_probes_take_the_causal_fast_path(tokenizer, monkeypatch):
    """No attention mask reaches SDPA (is_causal instead) for the plain forward and the KV-cache
    layout's first pass; only the probe copies get a custom mask."""
    model = _sharpen(build_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), seed=1)
    token_ids, starts, suffixes = _batch(tokenizer)
    batch = Tensors(token_ids, starts, suffixes)
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, *args, **kwargs):
        calls.append((attn_mask is None, bool(kwargs.get("is_causal")), query.shape[2], key.shape[2]))
        return original(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        token_logprobs(model, batch.input_ids, batch.token_mask)
        assert calls == [(True, True, 40, 40)]
        calls.clear()
        batch.forward(model, "kv_cache")
    assert calls[0] == (True, True, 40, 40)  # the trajectory pass
    assert calls[1][:2] == (False, False) and calls[1][3] == 40 + calls[1][2]  # probe slots over cache + slots


@pytest.mark.parametrize("layout", PROBE_LAYOUTS)
def test_score_probes_uses_turn_starts_and_one_suffix_per_answer(model, tokenizer, layout):
    token_ids, _, _ = _batch(tokenizer)
    turn_starts = [[4], [5, 13], [3, 11, 24, 34]]
    answers = ["Paris", "Ada Lovelace", "Paris"]
    with torch.no_grad():
        scores = score_probes(model, tokenizer, token_ids, turn_starts, answers, probe_layout=layout)
        suffixes = [build_probe_suffix(tokenizer, answer) for answer in answers]
        naive, naive_mask = naive_probe_logprobs(model, token_ids, turn_starts, suffixes)
    assert scores.shape == (3, 4)
    torch.testing.assert_close(scores, igpo_rewards.answer_logprob(naive, naive_mask), atol=TOLERANCE, rtol=0)
    assert (scores[0, 1:] == 0).all() and (scores[1, 2:] == 0).all()
    with pytest.raises(ValueError, match="one entry per trajectory"):
        score_probes(model, tokenizer, token_ids, turn_starts, answers[:2])


def test_bad_batches_are_refused(model, tokenizer):
    token_ids, starts, suffixes = _batch(tokenizer)
    batch = Tensors(token_ids, starts, suffixes)
    with pytest.raises(ValueError, match=r"turn_starts\[0, 0\] = 10 must lie in \[1, 9\]"):
        score_probes(model, tokenizer, token_ids, [[10], [5], [3]], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"turn_starts\[1, 0\] = 0 must lie in \[1, 21\]"):
        score_probes(model, tokenizer, token_ids, [[4], [0], [3]], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"turn_starts and turn_mask must both be \[B, T\]"):
        probe_forward(model, batch.input_ids, batch.lengths, batch.turn_starts[:, :2], batch.turn_mask, batch.suffixes)
    with pytest.raises(ValueError, match="one row per trajectory"):
        probe_forward(model, batch.input_ids, batch.lengths, batch.turn_starts, batch.turn_mask, batch.suffixes.rows(torch.tensor([0])))
    with pytest.raises(ValueError, match=r"token_mask\[:, 0\] must be False"):
        token_logprobs(model, batch.input_ids, torch.ones_like(batch.token_mask))
    with pytest.raises(ValueError, match="token_mask must have the shape of input_ids"):
        token_logprobs(model, batch.input_ids, batch.token_mask[:, :3])
    with pytest.raises(ValueError, match=r"probe_layout must be one of \['packed', 'kv_cache'\], got 'flat'"):
        batch.forward(model, "flat")


def test_unsupported_attention_implementation_is_refused(tokenizer):
    model = build_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model.config._attn_implementation = "flash_attention_2"
    batch = Tensors(*_batch(tokenizer))
    with pytest.raises(ValueError, match="sdpa"):
        batch.forward(model, "packed")
