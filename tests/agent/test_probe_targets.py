"""Probes of K targets per turn (the answer and sub-goals) in one forward: ``target_table``, both layouts.

The oracle is the one of tests/agent/test_probes.py: one plain forward per (turn, target)
(tests/probe_oracle.py), values and gradients. With one target per row the K-target layouts are
the one-target layouts, tensor for tensor.
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
    probe_forward,
    score_probes,
    suffix_table,
    target_table,
)
from igpo_rewards.testing.tiny import build_model, train_tokenizer

from ..probe_oracle import naive_probe_logprobs
from .test_probes import ANSWER_FIRST_TEMPLATE, GLUED_TEMPLATE, TEXTS, TOLERANCE, _sharpen


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=420)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tokenizer):
    built = build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                        attn_implementation=request.param)
    return _sharpen(built, seed=5)


def _batch(tokenizer):
    """Trajectories with 1, 2 and 4 probes and 3, 1 and 2 targets of different suffix lengths; one
    target's answer comes first in its suffix (scored from the prefix's last token)."""
    generator = torch.Generator().manual_seed(0)
    token_ids = [torch.randint(5, len(tokenizer), (n,), generator=generator).tolist() for n in (9, 21, 40)]
    starts = [[4], [5, 13], [3, 11, 24, 40]]
    targets = [
        [build_probe_suffix(tokenizer, "Paris"), build_probe_suffix(tokenizer, "Ada Lovelace"),
         build_probe_suffix(tokenizer, "London", template=ANSWER_FIRST_TEMPLATE)],
        [build_probe_suffix(tokenizer, "Ada Lovelace")],
        [build_probe_suffix(tokenizer, "Paris", template=GLUED_TEMPLATE), build_probe_suffix(tokenizer, "the river")],
    ]
    return token_ids, starts, targets


class Tensors:
    def __init__(self, token_ids, starts, table):
        width, turns = max(map(len, token_ids)), max(map(len, starts))
        self.input_ids = torch.tensor([row + [0] * (width - len(row)) for row in token_ids])
        self.lengths = torch.tensor([len(row) for row in token_ids])
        self.turn_starts = torch.tensor([row + [0] * (turns - len(row)) for row in starts])
        self.turn_mask = torch.tensor([[j < len(row) for j in range(turns)] for row in starts])
        self.table = table
        position = torch.arange(width)[None, :]
        self.token_mask = (position > 0) & (position < self.lengths[:, None])

    def forward(self, model, layout, table=None):
        return probe_forward(model, self.input_ids, self.lengths, self.turn_starts, self.turn_mask,
                             self.table if table is None else table, token_mask=self.token_mask, probe_layout=layout)


def naive_per_target(model, token_ids, starts, targets):
    """[B, T, K, L] log-probs and mask from one plain forward per (turn, target)."""
    num_targets, num_turns = max(map(len, targets)), max(map(len, starts))
    width = max(suffix.num_answer_tokens for row in targets for suffix in row)
    values = torch.zeros((len(token_ids), num_turns, num_targets, width))
    mask = torch.zeros(values.shape, dtype=torch.bool)
    for k in range(num_targets):
        rows = [b for b in range(len(token_ids)) if k < len(targets[b])]
        naive, naive_mask = naive_probe_logprobs(model, [token_ids[b] for b in rows], [starts[b] for b in rows],
                                                 [targets[b][k] for b in rows])
        turns, length = naive.shape[1], naive.shape[2]
        values[rows, :turns, k, :length] = naive
        mask[rows, :turns, k, :length] = naive_mask
    return values, mask


def test_target_table_holds_every_row_s_targets():
    first, second, short = ProbeSuffix("", (5, 6, 7), 1, 3), ProbeSuffix("", (8, 9), 0, 1), ProbeSuffix("", (4,), 0, 1)
    table = target_table([[first, second], [short]])
    assert table.token_ids.tolist() == [[[5, 6, 7], [8, 9, 0]], [[4, 0, 0], [0, 0, 0]]]
    assert table.lengths.tolist() == [[3, 2], [1, 0]]
    assert table.answer_start.tolist() == [[1, 0], [0, 0]] and table.answer_end.tolist() == [[3, 1], [1, 0]]
    assert table.num_targets == 2 and table.target_mask.tolist() == [[True, True], [True, False]]
    assert table.rows(torch.tensor([1])).lengths.tolist() == [[1, 0]]
    one = suffix_table([first, short])
    assert one.num_targets == 1 and one.target_mask.tolist() == [[True], [True]]
    with pytest.raises(ValueError, match=r"targets\[1\] is empty: every row needs its answer as target 0"):
        target_table([[first], []])
    with pytest.raises(TypeError, match=r"targets\[0\]\[1\] must be a ProbeSuffix"):
        target_table([[first, "Paris"]])
    with pytest.raises(TypeError, match=r"targets\[0\] must be a list of ProbeSuffix"):
        target_table([first])
    with pytest.raises(ValueError, match="non-empty sequence of rows"):
        target_table([])


def test_probe_pass_with_two_targets_matches_the_convention():
    """kv_cache slots: copy c = j * K + k at slots [c * P, c * P + P_{b,k}), target k's ids."""
    answer, bridge = ProbeSuffix("", (101, 102, 103), 1, 3), ProbeSuffix("", (201, 202), 0, 2)
    probes = build_probe_inputs(torch.tensor([[2, 4], [3, 0]]), torch.tensor([[True, True], [True, False]]),
                                target_table([[answer, bridge], [answer]]), cached_length=5)
    assert probes.input_ids.tolist() == [
        [101, 102, 103, 201, 202, 0, 101, 102, 103, 201, 202, 0],
        [101, 102, 103, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert probes.position_ids.tolist() == [[2, 3, 4, 2, 3, 0, 4, 5, 6, 4, 5, 0], [3, 4, 5] + [0] * 9]
    allowed = (probes.attention_mask == 0)[:, 0]
    expected = torch.zeros(2, 12, 5 + 12, dtype=torch.bool)
    for slot in range(12):
        expected[:, slot, 5 + slot] = True
    for copy, (start, length) in enumerate([(2, 3), (2, 2), (4, 3), (4, 2)]):
        for t in range(length):
            expected[0, 3 * copy + t, :start] = True
            expected[0, 3 * copy + t, 5 + 3 * copy : 5 + 3 * copy + t + 1] = True
    for t in range(3):
        expected[1, t, :3] = True
        expected[1, t, 5 : 5 + t + 1] = True
    assert torch.equal(allowed, expected)
    assert probes.probe_mask.shape == (2, 2, 2, 2)
    assert probes.probe_mask.tolist() == [[[[True, True], [True, True]], [[True, True], [True, True]]],
                                          [[[True, True], [False, False]], [[False, False], [False, False]]]]
    where = probes.probe_mask
    # answer tokens 1, 2 of copy (0, 0) at slots 0, 1; bridge token 0 of copy (0, 1) at the prefix's last
    # cached token, token 1 at slot 3; then copies (1, 0) and (1, 1) at slots 6.. and 9..
    assert probes.probe_sources[where].tolist() == [5, 6, 1, 5 + 3, 5 + 6, 5 + 7, 3, 5 + 9, 5, 6]
    assert probes.probe_tokens[where].tolist() == [102, 103, 201, 202, 102, 103, 201, 202, 102, 103]


def test_packed_layout_with_two_targets_matches_the_convention():
    """packed: row b's copies (j, k) back to back after its trajectory, each P_b = its longest target wide."""
    answer, bridge = ProbeSuffix("", (101, 102, 103), 1, 3), ProbeSuffix("", (201, 202), 0, 2)
    packed = build_packed_inputs(torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]]), torch.tensor([4, 2]),
                                 torch.tensor([[2, 4], [1, 0]]), torch.tensor([[True, True], [True, False]]),
                                 target_table([[answer, bridge], [bridge]]))
    assert packed.input_ids.tolist() == [
        [1, 2, 3, 4, 101, 102, 103, 201, 202, 0, 101, 102, 103, 201, 202, 0],
        [5, 6, 201, 202, 0, 0] + [0] * 10,
    ]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 2, 3, 0, 4, 5, 6, 4, 5, 0], [0, 1, 1, 2] + [0] * 12]
    allowed = (packed.attention_mask == 0)[:, 0]
    expected = torch.eye(16, dtype=torch.bool).expand(2, -1, -1).clone()
    for query in range(4):
        expected[0, query, : query + 1] = True
    for copy, (start, length) in enumerate([(2, 3), (2, 2), (4, 3), (4, 2)]):
        for t in range(length):
            expected[0, 4 + 3 * copy + t, :start] = True
            expected[0, 4 + 3 * copy + t, 4 + 3 * copy : 4 + 3 * copy + t + 1] = True
    expected[1, 1, 0] = True
    for t in range(2):  # row 1: one probe, its one target (2 tokens) at 2, 3; the empty copy for k = 1 unused
        expected[1, 2 + t, :1] = True
        expected[1, 2 + t, 2 : 2 + t + 1] = True
    assert torch.equal(allowed, expected)
    where = packed.probe_mask
    assert packed.probe_sources[where].tolist() == [4, 5, 1, 7, 10, 11, 3, 13, 0, 2]
    assert packed.probe_tokens[where].tolist() == [102, 103, 201, 202, 102, 103, 201, 202, 201, 202]


def test_one_target_per_row_gives_the_one_target_tensors(tokenizer):
    token_ids, starts, targets = _batch(tokenizer)
    answers = [row[0] for row in targets]
    batch = Tensors(token_ids, starts, suffix_table(answers))
    one, alone = target_table([[answer] for answer in answers]), batch.table
    for built in (
        lambda table: build_packed_inputs(batch.input_ids, batch.lengths, batch.turn_starts, batch.turn_mask, table),
        lambda table: build_probe_inputs(batch.turn_starts, batch.turn_mask, table, cached_length=40),
    ):
        for field, plain, with_axis in zip(built(alone)._fields, built(alone), built(one)):
            squeezed = with_axis[:, :, 0] if field.startswith("probe_") else with_axis
            assert torch.equal(squeezed, plain), field


@pytest.mark.parametrize("layout", PROBE_LAYOUTS)
def test_one_target_per_row_gives_the_one_target_forward(model, tokenizer, layout):
    token_ids, starts, targets = _batch(tokenizer)
    batch = Tensors(token_ids, starts, suffix_table([row[0] for row in targets]))
    with torch.no_grad():
        plain = batch.forward(model, layout)
        one = batch.forward(model, layout, table=target_table([[row[0]] for row in targets]))
    assert torch.equal(one.token_logprobs, plain.token_logprobs)
    assert torch.equal(one.probe_logprobs[:, :, 0], plain.probe_logprobs)
    assert torch.equal(one.answer_logprob[:, :, 0], plain.answer_logprob)


@pytest.mark.parametrize("layout", PROBE_LAYOUTS)
def test_k_targets_equal_one_naive_forward_per_turn_and_target(model, tokenizer, layout):
    token_ids, starts, targets = _batch(tokenizer)
    batch = Tensors(token_ids, starts, target_table(targets))
    with torch.no_grad():
        out = batch.forward(model, layout)
        naive, naive_mask = naive_per_target(model, token_ids, starts, targets)
        plain = Tensors(token_ids, starts, suffix_table([row[0] for row in targets])).forward(model, layout)
    assert out.probe_logprobs.shape == naive.shape == (3, 4, 3, naive.shape[3])
    assert torch.equal(out.probe_mask, naive_mask)
    torch.testing.assert_close(out.probe_logprobs, naive, atol=TOLERANCE, rtol=0)
    assert (out.probe_logprobs[~naive_mask] == 0).all()
    torch.testing.assert_close(out.answer_logprob, igpo_rewards.answer_logprob(naive, naive_mask), atol=TOLERANCE, rtol=0)
    assert torch.equal(out.answer_logprob[~batch.table.target_mask[:, None, :].expand(-1, 4, -1)],
                       torch.zeros(int((~batch.table.target_mask).sum()) * 4))
    torch.testing.assert_close(out.token_logprobs, plain.token_logprobs, atol=TOLERANCE, rtol=0)  # K copies change no old log-prob
    # The test can fail: the targets' log-probs differ, and depend on the context probe by probe.
    assert (out.answer_logprob[0, 0, 0] - out.answer_logprob[0, 0, 1]).abs() > 1e-2
    assert out.answer_logprob[2, :, 1].max() - out.answer_logprob[2, :, 1].min() > 1e-2


@pytest.mark.parametrize("layout", PROBE_LAYOUTS)
def test_k_target_gradients_match_the_naive_forwards(model, tokenizer, layout):
    token_ids, starts, targets = _batch(tokenizer)
    parameters = list(model.parameters())
    out = Tensors(token_ids, starts, target_table(targets)).forward(model, layout)
    weights = torch.tensor([1.0, 0.5, -2.0])  # a different weight per target, so a swapped target shows
    grads = torch.autograd.grad((out.answer_logprob * weights).sum(), parameters)
    naive, naive_mask = naive_per_target(model, token_ids, starts, targets)
    naive_grads = torch.autograd.grad((igpo_rewards.answer_logprob(naive, naive_mask) * weights).sum(), parameters)
    for grad, naive_grad in zip(grads, naive_grads):
        torch.testing.assert_close(grad, naive_grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", PROBE_LAYOUTS)
def test_score_probes_takes_a_list_of_targets_per_trajectory(model, tokenizer, layout):
    token_ids, starts, _ = _batch(tokenizer)
    answers = [["Paris", "Ada Lovelace", "London"], "Ada Lovelace", ["Paris", "the river"]]
    with torch.no_grad():
        scores = score_probes(model, tokenizer, token_ids, starts, answers, probe_layout=layout)
        targets = [[build_probe_suffix(tokenizer, text) for text in ([row] if isinstance(row, str) else row)]
                   for row in answers]
        naive, naive_mask = naive_per_target(model, token_ids, starts, targets)
        plain_answers = ["Paris", "Ada Lovelace", "Paris"]
        plain = score_probes(model, tokenizer, token_ids, starts, plain_answers, probe_layout=layout)
        listed = score_probes(model, tokenizer, token_ids, starts, [[a] for a in plain_answers], probe_layout=layout)
    assert scores.shape == (3, 4, 3)
    torch.testing.assert_close(scores, igpo_rewards.answer_logprob(naive, naive_mask), atol=TOLERANCE, rtol=0)
    assert (scores[1, :, 1:] == 0).all() and (scores[2, :, 2] == 0).all() and (scores[0, 1:] == 0).all()
    assert plain.shape == (3, 4) and listed.shape == (3, 4, 1)
    assert torch.equal(listed[:, :, 0], plain)  # one target as a list: the one-target numbers
    with pytest.raises(ValueError, match=r"answers\[1\] must be a str or a non-empty list of str"):
        score_probes(model, tokenizer, token_ids, starts, [["Paris"], [], "x"])
    with pytest.raises(TypeError, match=r"answers\[0\]\[1\] must be a str, got int"):
        score_probes(model, tokenizer, token_ids, starts, [["Paris", 3], "a", "b"])


@pytest.mark.parametrize("layout", PROBE_LAYOUTS)
def test_a_batch_without_probes_keeps_the_target_axis(model, tokenizer, layout):
    token_ids, starts, targets = _batch(tokenizer)
    batch = Tensors(token_ids, starts, target_table(targets))
    with torch.no_grad():
        none = probe_forward(model, batch.input_ids, batch.lengths, batch.turn_starts, torch.zeros_like(batch.turn_mask),
                             batch.table, token_mask=batch.token_mask, probe_layout=layout)
    assert none.probe_logprobs.shape == (3, 4, 3, 0) and none.answer_logprob.shape == (3, 4, 3)
    assert (none.answer_logprob == 0).all()
