"""The packed probe forward equals one naive forward per probe (igpo_rewards.agent.probes)."""

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
    packed_forward,
    score_probes,
)
from igpo_rewards.agent.protocol import PROBE_TEMPLATE
from igpo_rewards.reference_trainer.modeling import build_model, train_tokenizer

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


def test_packed_layout_matches_the_convention():
    suffix = ProbeSuffix(text="", token_ids=(101, 102, 103), answer_start=1, answer_end=3)
    packed = build_packed_inputs([[1, 2, 3, 4], [5, 6]], [[2, 4], []], [suffix, None], pad_token_id=0)
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
    assert packed.probe_targets.tolist() == [
        [0, 4, 102, 0, 0],
        [0, 5, 103, 0, 1],
        [0, 7, 102, 1, 0],
        [0, 8, 103, 1, 1],
    ]
    assert (packed.sequence_length, packed.num_probes, packed.num_answer_tokens) == (4, 2, 2)


def test_probe_pass_layout_matches_the_convention():
    """Probe slots of the second pass: ids, positions, the mask over [cache | slots], targets."""
    suffix = ProbeSuffix(text="", token_ids=(101, 102, 103), answer_start=1, answer_end=3)
    short = ProbeSuffix(text="", token_ids=(201, 202), answer_start=0, answer_end=2)
    probes = build_probe_inputs(
        [[1, 2, 3, 4], [5, 6], [7, 8, 9]], [[2, 4], [], [3]], [suffix, None, short], cached_length=5
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
    assert probes.probe_targets.tolist() == [
        [0, 5 + 0, 102, 0, 0],
        [0, 5 + 1, 103, 0, 1],
        [0, 5 + 3, 102, 1, 0],
        [0, 5 + 4, 103, 1, 1],
        [2, 2, 201, 0, 0],
        [2, 5 + 0, 202, 0, 1],
    ]
    assert (probes.num_probes, probes.num_answer_tokens) == (2, 2)
    with pytest.raises(ValueError, match="cached_length must be >= the longest trajectory"):
        build_probe_inputs([[1, 2, 3, 4]], [[2]], [suffix], cached_length=3)


@pytest.mark.parametrize("layout", PROBE_LAYOUTS)
def test_batches_without_probes_and_rows_without_probes(model, tokenizer, layout):
    token_ids, starts, suffixes = _batch(tokenizer)
    with torch.no_grad():
        none = packed_forward(model, token_ids, [[] for _ in token_ids], [None] * len(token_ids), probe_layout=layout)
        alone = packed_forward(model, token_ids)
        mixed = packed_forward(
            model, token_ids, [starts[0], [], starts[2]], [suffixes[0], None, suffixes[2]], probe_layout=layout
        )
        naive, naive_mask = naive_probe_logprobs(
            model, [token_ids[0], token_ids[2]], [starts[0], starts[2]], [suffixes[0], suffixes[2]]
        )
    assert none.probe_logprobs.shape == (3, 0, 0) and none.answer_logprob.shape == (3, 0)
    torch.testing.assert_close(none.token_logprobs, alone.token_logprobs, atol=0, rtol=0)
    assert not mixed.probe_mask[1].any()
    torch.testing.assert_close(mixed.probe_logprobs[[0, 2]], naive, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(mixed.token_logprobs, alone.token_logprobs, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("layout", PROBE_LAYOUTS)
def test_packed_equals_naive_per_probe(model, tokenizer, layout):
    token_ids, starts, suffixes = _batch(tokenizer)
    with torch.no_grad():
        out = packed_forward(model, token_ids, starts, suffixes, probe_layout=layout)
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
        out = packed_forward(model, token_ids, starts, suffixes, probe_layout=layout)
        leaky, _ = naive_probe_logprobs(model, token_ids, leaky_starts, suffixes)
    assert (out.probe_logprobs[2, :3] - leaky[2, :3]).abs().max() > 10 * TOLERANCE


def _plain_token_logprobs(model, row):
    logits = model(input_ids=torch.tensor([row])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1].gather(-1, torch.tensor(row[1:])[:, None])[:, 0]


@pytest.mark.parametrize("layout", PROBE_LAYOUTS)
def test_trajectory_logprobs_equal_a_plain_forward(model, tokenizer, layout):
    token_ids, starts, suffixes = _batch(tokenizer)
    with torch.no_grad():
        folded = packed_forward(model, token_ids, starts, suffixes, probe_layout=layout, return_entropy=True)
        alone = packed_forward(model, token_ids)
    assert folded.token_logprobs.shape == (3, 40)
    for b, row in enumerate(token_ids):
        with torch.no_grad():
            expected = _plain_token_logprobs(model, row)
            logits = model(input_ids=torch.tensor([row])).logits[0, :-1].float()
        entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
        torch.testing.assert_close(folded.token_logprobs[b, 1 : len(row)], expected, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(folded.token_entropy[b, 1 : len(row)], entropy, atol=TOLERANCE, rtol=0)
        assert folded.token_mask[b].tolist() == [False] + [True] * (len(row) - 1) + [False] * (40 - len(row))
    assert (folded.token_logprobs[~folded.token_mask] == 0).all()
    torch.testing.assert_close(alone.token_logprobs, folded.token_logprobs, atol=TOLERANCE, rtol=0)
    assert alone.probe_logprobs.shape == (3, 0, 0) and alone.answer_logprob.shape == (3, 0)
    assert alone.token_entropy is None


@pytest.mark.parametrize("layout", PROBE_LAYOUTS)
def test_gradients_flow_and_match_a_plain_forward(model, tokenizer, layout):
    token_ids, starts, suffixes = _batch(tokenizer)
    parameters = [p for p in model.parameters()]
    out = packed_forward(model, token_ids, starts, suffixes, probe_layout=layout)
    loss = out.token_logprobs[out.token_mask].sum()
    packed_grads = torch.autograd.grad(loss, parameters, retain_graph=True)
    plain = sum(_plain_token_logprobs(model, row).sum() for row in token_ids)
    plain_grads = torch.autograd.grad(plain, parameters)
    for packed_grad, plain_grad in zip(packed_grads, plain_grads):
        torch.testing.assert_close(packed_grad, plain_grad, atol=1e-4, rtol=1e-4)
    probe_loss = out.answer_logprob.sum()
    probe_grads = torch.autograd.grad(probe_loss, parameters)
    naive, naive_mask = naive_probe_logprobs(model, token_ids, starts, suffixes)
    naive_grads = torch.autograd.grad(igpo_rewards.answer_logprob(naive, naive_mask).sum(), parameters)
    for probe_grad, naive_grad in zip(probe_grads, naive_grads):
        torch.testing.assert_close(probe_grad, naive_grad, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert not packed_forward(model, token_ids, starts, suffixes).token_logprobs.requires_grad


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


@pytest.mark.parametrize(
    ("token_ids", "starts", "suffix_count", "error", "message"),
    [
        ([], None, 0, ValueError, "non-empty"),
        ([[1, 2], []], None, 0, ValueError, r"token_ids\[1\] is empty"),
        ([[1, 2, 3]], [[0]], 1, ValueError, r"probe_starts\[0\] must lie in \[1, 3\]"),
        ([[1, 2, 3]], [[4]], 1, ValueError, r"\[4\]"),
        ([[1, 2, 3]], [[1], [2]], 1, ValueError, "one entry per trajectory"),
        ([[1, 2, 3]], [[1]], None, ValueError, "without suffixes"),
        ([[1, 2, 3]], [[1]], "none", TypeError, r"suffixes\[0\] must be a ProbeSuffix"),
    ],
)
def test_packed_inputs_reject_bad_batches(token_ids, starts, suffix_count, error, message):
    suffix = ProbeSuffix(text="x", token_ids=(7, 8), answer_start=0, answer_end=2)
    if suffix_count is None:
        suffixes = None
    elif suffix_count == "none":
        suffixes = [None]
    else:
        suffixes = [suffix] * suffix_count if starts is not None else None
    with pytest.raises(error, match=message):
        build_packed_inputs(token_ids, starts, suffixes)


def test_unknown_probe_layout_is_refused(model):
    with pytest.raises(ValueError, match=r"probe_layout must be one of \('packed', 'kv_cache'\), got 'flat'"):
        packed_forward(model, [[1, 2, 3]], probe_layout="flat")


def test_unsupported_attention_implementation_is_refused(tokenizer):
    model = build_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        packed_forward(model, [[1, 2, 3]])
