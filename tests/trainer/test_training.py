"""The RL step: PPO + k3 loss against hand-computed values, the step's tensor batch, advantages on
tokens (one call of the settings), the update, determinism."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import igpo_rewards
from igpo_rewards import IGPOSettings
from igpo_rewards.agent.bm25 import BM25Retriever
from igpo_rewards.agent.probes import probe_forward, token_logprobs
from igpo_rewards.agent.protocol import INSTRUCTION
from igpo_rewards.reference_trainer.batch import build_batch, micro_batches
from igpo_rewards.reference_trainer.config import RLConfig
from igpo_rewards.reference_trainer.metrics import case_studies, step_metrics, zero_advantage_group_fraction
from igpo_rewards.reference_trainer.rollout import QATrajectory
from igpo_rewards.reference_trainer.training import (
    check_subgoals,
    check_turn_caps,
    compute_advantages,
    policy_loss,
    ppo_update,
    rl_step,
    score_batch,
)
from igpo_rewards.reference_trainer.world import QAExample, build_world
from igpo_rewards.testing.tiny import build_model, train_tokenizer

# --- policy_loss -------------------------------------------------------------------------------


def test_policy_loss_matches_hand_computation():
    # row 0: token 1 unclipped (ratio e^0.1 < 1.2), token 2 clipped (A > 0, ratio e^0.3 > 1.2)
    # row 1: token 1 A < 0 with ratio e^-0.4 < 0.8: the clipped branch is active; token 2 masked out
    logprobs = torch.tensor([[-9.0, -1.0, -0.5], [-9.0, -0.6, -3.0]], dtype=torch.float64)
    old = torch.tensor([[-9.0, -1.1, -0.8], [-9.0, -0.2, -1.0]], dtype=torch.float64)
    ref = torch.tensor([[-9.0, -1.3, -0.5], [-9.0, -0.1, -1.0]], dtype=torch.float64)
    adv = torch.tensor([[7.0, 2.0, 1.0], [7.0, -1.0, 4.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    loss, stats = policy_loss(logprobs, old, ref, adv, mask, clip_ratio=0.2, kl_coef=0.5)

    pg = [[-2.0 * math.exp(0.1), -1.0 * 1.2], [1.0 * 0.8]]  # max(-A r, -A clip(r)) by hand
    k3 = lambda ref_lp, lp: math.exp(ref_lp - lp) - (ref_lp - lp) - 1.0  # noqa: E731
    kl = [[k3(-1.3, -1.0), k3(-0.5, -0.5)], [k3(-0.1, -0.6)]]
    row0 = ((pg[0][0] + 0.5 * kl[0][0]) + (pg[0][1] + 0.5 * kl[0][1])) / 2
    row1 = pg[1][0] + 0.5 * kl[1][0]
    assert float(loss) == pytest.approx((row0 + row1) / 2, rel=1e-12)
    assert float(stats["pg_loss"]) == pytest.approx((pg[0][0] + pg[0][1] + pg[1][0]) / 3, rel=1e-12)
    assert float(stats["kl"]) == pytest.approx((kl[0][0] + kl[0][1] + kl[1][0]) / 3, rel=1e-12)
    assert float(stats["clip_fraction"]) == pytest.approx(2 / 3)
    assert float(stats["ratio"]) == pytest.approx((math.exp(0.1) + math.exp(0.3) + math.exp(-0.4)) / 3)


def test_policy_loss_gradient():
    """Unclipped token: d/dlogp = (-A r + beta (1 - e^(ref - lp))) / n_b / B; a clipped one gets only the KL part."""
    logprobs = torch.tensor([[-1.0, -0.5]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.1, -0.8]], dtype=torch.float64)
    ref = torch.tensor([[-1.3, -0.5]], dtype=torch.float64)
    adv = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    loss, _ = policy_loss(logprobs, old, ref, adv, torch.ones(1, 2), clip_ratio=0.2, kl_coef=0.5)
    loss.backward()
    expected0 = (-2.0 * math.exp(0.1) + 0.5 * (1 - math.exp(-0.3))) / 2
    expected1 = (0.5 * (1 - math.exp(0.0))) / 2
    assert logprobs.grad.tolist()[0] == pytest.approx([expected0, expected1], rel=1e-12)


def test_policy_loss_sequence_mean_then_batch_mean():
    """A long sequence does not outweigh a short one: token mean within, then mean over sequences."""
    logprobs = torch.zeros(2, 4)
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    loss, _ = policy_loss(logprobs, logprobs, None, adv, mask)
    assert float(loss) == pytest.approx((-1.0 + -3.0) / 2)
    # an all-masked row does not count; no masked token at all gives 0
    loss, _ = policy_loss(logprobs, logprobs, None, adv, torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0]]))
    assert float(loss) == pytest.approx(-3.0)
    loss, _ = policy_loss(logprobs, logprobs, None, adv, torch.zeros(2, 4))
    assert float(loss) == 0.0


def test_policy_loss_shape_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"advantages must have the shape of logprobs \(2, 3\), got \(2, 2\)"):
        policy_loss(x, x, None, torch.zeros(2, 2), x)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(x, x, torch.zeros(3), x, x)


# --- advantages on tokens -----------------------------------------------------------------------------

EXAMPLE = QAExample("Where?", ("Tovia",), 2, "world")


def make_trajectory(turn_lengths, observation_length=3, prompt_length=4, outcome=0.0, group_id=0):
    """A trajectory with the given turn lengths (observations of fixed length in between)."""
    position = prompt_length
    turn_spans, observation_spans = [], []
    for j, length in enumerate(turn_lengths):
        turn_spans.append((position, position + length))
        position += length
        if j < len(turn_lengths) - 1:
            observation_spans.append((position, position + observation_length))
            position += observation_length
    return QATrajectory(
        token_ids=list(range(position)),
        prompt_length=prompt_length,
        turn_spans=turn_spans,
        observation_spans=observation_spans,
        turn_texts=["t"] * len(turn_lengths),
        response="",
        example=EXAMPLE,
        outcome=outcome,
        group_id=group_id,
    )


class Pad:
    """A stand-in tokenizer: the batch only needs the pad id when no probes are built."""

    pad_token_id = 0


def batch_of(trajectories):
    return build_batch(trajectories, Pad(), probes=False)


def test_batch_reads_turns_from_the_spans():
    trajectories = [make_trajectory([2, 1], outcome=1.0, group_id=3), make_trajectory([2], outcome=-2.0, group_id=5)]
    batch = batch_of(trajectories)
    assert batch.turn_mask.tolist() == [[True, True], [True, False]]
    assert batch.turn_starts.tolist() == [[4, 9], [4, 0]]
    assert batch.group_ids.tolist() == [3, 5] and batch.outcome.tolist() == [1.0, -2.0]
    assert batch.lengths.tolist() == [10, 6] and batch.input_ids[1].tolist() == list(range(6)) + [0] * 4
    assert batch.token_turn.tolist() == [[-1, -1, -1, -1, 0, 0, -1, -1, -1, 1], [-1, -1, -1, -1, 0, 0, -1, -1, -1, -1]]
    # the library's reading of the same layout as a verl response mask agrees
    index = igpo_rewards.turn_index_from_response_mask(batch.loss_mask[:, 4:].long())
    assert torch.equal(index, batch.token_turn[:, 4:])
    part = batch.select(torch.tensor([1]))
    assert part.input_ids.tolist() == [list(range(6))] and part.trajectories == [trajectories[1]]
    assert part.turn_mask.tolist() == [[True, False]]


def test_micro_batches_by_length():
    lengths = torch.tensor([5, 1, 4, 2, 3])
    rows = torch.tensor([0, 1, 2, 3, 4])
    assert [m.tolist() for m in micro_batches(rows, lengths, 2, by_length=True)] == [[1, 3], [4, 2], [0]]
    assert [m.tolist() for m in micro_batches(rows, lengths, 2, by_length=False)] == [[0, 1], [2, 3], [4]]


def test_micro_batches_by_token_budget():
    """At most ``max_tokens`` padded tokens (rows x longest row) per micro batch, rows sorted by
    length; a row longer than the budget is a micro batch alone; rows still cap each one."""
    lengths = torch.tensor([5, 1, 4, 2, 3, 9])
    rows = torch.arange(6)
    assert [m.tolist() for m in micro_batches(rows, lengths, 8, max_tokens=8)] == [[1, 3], [4, 2], [0], [5]]
    assert [m.tolist() for m in micro_batches(rows, lengths, 2, max_tokens=100)] == [[1, 3], [4, 2], [0, 5]]
    assert [m.tolist() for m in micro_batches(rows, lengths, 8, max_tokens=0)] == [[1, 3, 4, 2, 0, 5]]


def test_igpo_advantages_on_tokens_by_hand():
    # group 0: rollout 0 has 3 turns, probes p = 0.1, 0.3, 0.6 and outcome 1; rollout 1 answers at once, outcome 0.
    batch = batch_of([make_trajectory([2, 1, 2], outcome=1.0), make_trajectory([3], outcome=0.0)])
    answer_logprob = torch.log(torch.tensor([[0.1, 0.3, 0.6], [0.1, 0.0, 0.0]]))
    result = compute_advantages(batch, answer_logprob, RLConfig(algorithm="igpo"))
    rewards = [0.3 - 0.1, 0.6 - 0.3, 1.0, 0.0]  # IG, IG, outcome | outcome
    mean = sum(rewards) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 4)
    z = [(r - mean) / (std + 1e-6) for r in rewards]
    turn = [[z[0] + z[1] + z[2], z[1] + z[2], z[2]], [z[3], 0.0, 0.0]]
    torch.testing.assert_close(result.turn, torch.tensor(turn), rtol=0, atol=1e-5)
    assert result.information_gain[0].tolist() == pytest.approx([0.2, 0.3, 0.0], abs=1e-6)
    # tokens: prompt 4, turn0 2, obs 3, turn1 1, obs 3, turn2 2 | prompt 4, turn0 3
    a0, a1, a2 = turn[0]
    expected0 = [0] * 4 + [a0] * 2 + [0] * 3 + [a1] + [0] * 3 + [a2] * 2
    expected1 = [0] * 4 + [turn[1][0]] * 3 + [0] * 8
    torch.testing.assert_close(result.token, torch.tensor([expected0, expected1]), rtol=0, atol=1e-5)
    assert batch.loss_mask.tolist()[0] == [False] * 4 + [True] * 2 + [False] * 3 + [True] + [False] * 3 + [True] * 2


def test_every_setting_reaches_the_advantages():
    """RLConfig.igpo is the library's settings object: the step's advantages are its call, option for option."""
    batch = batch_of([make_trajectory([2, 1, 2], outcome=1.0), make_trajectory([3], outcome=0.0),
                      make_trajectory([1, 1], outcome=0.5, group_id=1), make_trajectory([2], outcome=-2.0, group_id=1)])
    answer_logprob = torch.log(torch.tensor([[0.1, 0.3, 0.6], [0.2, 1.0, 1.0], [0.5, 0.4, 1.0], [0.05, 1.0, 1.0]]))
    settings = IGPOSettings(gamma=0.9, kind="log_prob", mode="separate", weighting="trajectory", eps=0.01, ddof=1,
                            ig_weight=0.5, outcome_weight=2.0, log_prob_floor=-2.0)
    result = compute_advantages(batch, answer_logprob, RLConfig(algorithm="igpo", igpo=settings))
    expected = igpo_rewards.igpo_advantages(answer_logprob, batch.outcome, batch.turn_mask, batch.group_ids, gamma=0.9,
                                            kind="log_prob", mode="separate", weighting="trajectory", eps=0.01, ddof=1,
                                            ig_weight=0.5, outcome_weight=2.0, log_prob_floor=-2.0)
    torch.testing.assert_close(result.turn, expected.advantages)
    grpo = compute_advantages(batch, None, RLConfig(algorithm="grpo", igpo=IGPOSettings(scale="none", eps=0.5, ddof=1)))
    per_rollout = igpo_rewards.grpo_advantages(batch.outcome, batch.group_ids, scale="none", eps=0.5, ddof=1)
    torch.testing.assert_close(grpo.turn, per_rollout[:, None] * batch.turn_mask)


def test_grpo_advantages_on_tokens_and_identical_layout():
    trajectories = [make_trajectory([2, 1], outcome=1.0), make_trajectory([3], outcome=0.0),
                    make_trajectory([1], outcome=0.5, group_id=1), make_trajectory([1], outcome=0.5, group_id=1)]
    batch = batch_of(trajectories)
    result = compute_advantages(batch, None, RLConfig(algorithm="grpo"))
    a = 0.5 / (0.5 + 1e-6)
    torch.testing.assert_close(result.turn, torch.tensor([[a, a], [-a, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    assert result.token[0].tolist() == pytest.approx([0] * 4 + [a] * 2 + [0] * 3 + [a])
    assert result.token[1].tolist() == pytest.approx([0] * 4 + [-a] * 3 + [0] * 3)
    assert result.information_gain is None and result.rewards is None
    igpo = compute_advantages(batch, torch.zeros(4, 2), RLConfig(algorithm="igpo"))
    assert torch.equal(igpo.token != 0, result.token != 0)  # everything but the advantages is identical
    assert zero_advantage_group_fraction(result.turn, batch.group_ids) == 0.5


def test_zero_advantage_group_fraction_by_hand():
    turn = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.1], [0.0, 0.0], [0.0, 0.0]])
    assert zero_advantage_group_fraction(turn, torch.tensor([7, 7, 2, 2, 9])) == pytest.approx(2 / 3)
    assert zero_advantage_group_fraction(turn[2:3], torch.tensor([1])) == 0.0


def test_compute_advantages_errors():
    batch = batch_of([make_trajectory([2], outcome=1.0)])
    with pytest.raises(ValueError, match="IGPO needs the probes"):
        compute_advantages(batch, None, RLConfig(algorithm="igpo"))
    with pytest.raises(ValueError, match=r"answer_logprob must be \[B, T\] = \(1, 1\), got \(1, 2\)"):
        compute_advantages(batch, torch.zeros(1, 2), RLConfig(algorithm="igpo"))


def test_max_turns_has_one_meaning_in_the_trainer():
    """--rl.max-turns caps the rollouts, --rl.igpo.max-turns the advantages: the same bound."""
    check_turn_caps(RLConfig(max_turns=4))  # no cap on the settings
    check_turn_caps(RLConfig(max_turns=4, igpo=IGPOSettings(max_turns=6)))
    with pytest.raises(ValueError, match=r"rl.igpo.max_turns = 2 is below rl.max_turns = 4"):
        check_turn_caps(RLConfig(max_turns=4, igpo=IGPOSettings(max_turns=2)))
    batch = batch_of([make_trajectory([2, 1, 2], outcome=1.0), make_trajectory([3], outcome=0.0)])
    answer_logprob = torch.log(torch.tensor([[0.1, 0.3, 0.6], [0.1, 1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"max_turns = 2 \(the most turns a rollout may have\), but rollouts \[0\] have "
                                         r"\[3\] turns"):  # the settings' cap is read by the advantage step
        compute_advantages(batch, answer_logprob, RLConfig(algorithm="igpo", igpo=IGPOSettings(max_turns=2)))
    with pytest.raises(ValueError, match=r"max_turns = 2"):  # GRPO's IG metric reads it too
        compute_advantages(batch, answer_logprob, RLConfig(algorithm="grpo", igpo=IGPOSettings(max_turns=2)))


# --- the update and the whole step with a tiny model ----------------------------------------------


@pytest.fixture(scope="module")
def setup():
    world = build_world(seed=5, num_train=12, num_heldout=3, num_countries=3, cities_per_country=2, num_organisations=3)
    texts = [doc.contents for doc in world.corpus] + [e.question for e in world.train] + [INSTRUCTION]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    model = build_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=1024)
    return world, tokenizer, model.eval(), BM25Retriever(world.corpus)


def text_trajectory(tokenizer, turns, outcome, group_id=0):
    prompt = tokenizer("<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    ids, spans, obs = list(prompt), [], []
    for j, text in enumerate(turns):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
        if j < len(turns) - 1:
            block = tokenizer("\n\n<information>Doc 1 x</information>\n\n", add_special_tokens=False)["input_ids"]
            obs.append((len(ids), len(ids) + len(block)))
            ids += block
    return QATrajectory(ids, len(prompt), spans, obs, list(turns), "", example=EXAMPLE, outcome=outcome, group_id=group_id)


def turn_logprob(model, tokenizer, trajectory):
    batch = build_batch([trajectory], tokenizer, probes=False)
    with torch.no_grad():
        logprobs, _ = token_logprobs(model, batch.input_ids, batch.loss_mask)
    return float(logprobs.sum())


def test_ppo_update_moves_log_probs_with_the_advantage_sign(setup):
    _, tokenizer, model, _ = setup
    policy = copy.deepcopy(model)
    good = text_trajectory(tokenizer, ["<search> Tovia </search>", "<answer> Tovia </answer>"], 1.0)
    bad = text_trajectory(tokenizer, ["<answer> Kelm </answer>"], 0.0)
    trajectories = [good, bad]
    config = RLConfig(algorithm="grpo", group_size=2, minibatches=1, kl_coef=0.0, learning_rate=1e-2)
    batch = build_batch(trajectories, tokenizer, probes=False)
    advantages = compute_advantages(batch, None, config)
    old = score_batch(policy, batch, config, probes=False).logprobs
    before = [turn_logprob(policy, tokenizer, t) for t in trajectories]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    stats = ppo_update(policy, optimizer, batch, advantages.token, old, None, config)
    after = [turn_logprob(policy, tokenizer, t) for t in trajectories]
    assert after[0] > before[0] and after[1] < before[1]
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-5) and stats["clip_fraction"] == 0.0
    assert stats["grad_norm"] > 0


def test_ppo_update_micro_batches_accumulate_to_the_full_batch_gradient(setup):
    _, tokenizer, model, _ = setup
    trajectories = [
        text_trajectory(tokenizer, ["<search> Tovia </search>", "<answer> Tovia </answer>"], 1.0),
        text_trajectory(tokenizer, ["<answer> Kelm </answer>"], 0.0),
        text_trajectory(tokenizer, ["<answer> Tovia </answer>"], 1.0, group_id=1),
        text_trajectory(tokenizer, ["<search> x </search>", "<answer> y </answer>"], 0.2, group_id=1),
    ]
    results = []
    shortest = min(len(trajectory.token_ids) for trajectory in trajectories)
    for micro_batch_size, micro_batch_tokens in ((1, 0), (4, 0), (4, 2 * shortest)):
        policy, reference = copy.deepcopy(model), copy.deepcopy(model)
        config = RLConfig(algorithm="grpo", group_size=2, minibatches=1, micro_batch_size=micro_batch_size,
                          micro_batch_tokens=micro_batch_tokens, grad_clip=0.0)
        batch = build_batch(trajectories, tokenizer, probes=False)
        if micro_batch_tokens:  # the budget splits the 4 rows
            assert len(list(micro_batches(torch.arange(4), batch.lengths, 4, max_tokens=micro_batch_tokens))) > 1
        advantages = compute_advantages(batch, None, config)
        old = score_batch(policy, batch, config, probes=False).logprobs
        ref = score_batch(reference, batch, config, probes=False).logprobs
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
        stats = ppo_update(policy, optimizer, batch, advantages.token, old, ref, config)
        results.append((torch.nn.utils.parameters_to_vector(policy.parameters()), stats))
    for other in results[1:]:
        torch.testing.assert_close(results[0][0], other[0], rtol=1e-5, atol=1e-6)
        assert results[0][1]["loss"] == pytest.approx(other[1]["loss"], abs=1e-6)
    assert not torch.equal(results[0][0], torch.nn.utils.parameters_to_vector(model.parameters()))
    assert results[1][1]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the step


def test_score_batch_micro_batches_give_the_whole_batch_forward(setup):
    """Micro batches (sorted by length, each cut to its own width) score what one forward over the
    whole batch scores: the old log-probs and entropies of the generated tokens and the probes."""
    _, tokenizer, model, _ = setup
    example = QAExample("Where?", ("Tovia",), 2, "world")
    trajectories = [
        text_trajectory(tokenizer, ["<search> Tovia </search>", "<answer> Tovia </answer>"], 1.0),
        text_trajectory(tokenizer, ["<answer> Kelm </answer>"], 0.0),
        text_trajectory(tokenizer, ["<search> x </search>", "<search> y </search>", "<answer> y </answer>"], 0.2, group_id=1),
    ]
    for trajectory in trajectories:
        trajectory.example = example
    batch = build_batch(trajectories, tokenizer, probes=True)
    scores = score_batch(model, batch, RLConfig(micro_batch_size=2), probes=True, entropy=True)
    with torch.no_grad():
        whole = probe_forward(model, batch.input_ids, batch.lengths, batch.turn_starts, batch.turn_mask, batch.suffixes,
                              token_mask=batch.loss_mask, return_entropy=True)
    torch.testing.assert_close(scores.logprobs, whole.token_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores.entropy, whole.token_entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores.answer_logprob, whole.answer_logprob, rtol=0, atol=1e-5)
    assert (scores.logprobs[~batch.loss_mask] == 0).all() and (scores.logprobs[batch.loss_mask] < 0).all()
    assert scores.answer_logprob.shape == (3, 3) and (scores.answer_logprob[1, 1:] == 0).all()


def run_steps(setup, algorithm, steps=2, probe_layout="packed"):
    world, tokenizer, model, retriever = setup
    torch.manual_seed(0)
    policy, reference = copy.deepcopy(model), copy.deepcopy(model)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    config = RLConfig(algorithm=algorithm, questions_per_step=2, group_size=3, max_turns=2, max_new_tokens=6, minibatches=2,
                      probe_layout=probe_layout)
    results = [rl_step(policy, reference, tokenizer, optimizer, retriever, world.train[2 * s : 2 * s + 2], config) for s in range(steps)]
    return policy, results


@pytest.mark.parametrize("algorithm", ["igpo", "grpo"])
def test_rl_step_runs_and_is_deterministic(setup, algorithm):
    policy_a, results_a = run_steps(setup, algorithm)
    policy_b, results_b = run_steps(setup, algorithm)
    assert torch.equal(torch.nn.utils.parameters_to_vector(policy_a.parameters()), torch.nn.utils.parameters_to_vector(policy_b.parameters()))
    timing = {k for k in results_a[0].metrics if k.startswith("seconds") or k == "tokens_per_second"}
    for a, b in zip(results_a, results_b):
        assert {k: v for k, v in a.metrics.items() if k not in timing} == {k: v for k, v in b.metrics.items() if k not in timing}
    metrics = results_a[-1].metrics
    for key in ("reward_mean", "train_f1", "train_em", "zero_variance_group_fraction", "zero_advantage_group_fraction",
                "zero_advantage_token_fraction", "entropy", "clip_fraction", "tokens_per_second", "seconds_rollout",
                "seconds_retrieval", "seconds_probes", "seconds_reference", "seconds_update", "kl", "loss", "grad_norm"):
        assert metrics[key] is not None and math.isfinite(metrics[key]), key
    last = results_a[-1]
    assert len(last.batch.trajectories) == 6
    # the logged group fractions are the library's function of the outcomes and the all-zero-advantage rate
    assert metrics["zero_variance_group_fraction"] == float(igpo_rewards.zero_variance_group_fraction(last.batch.outcome, last.batch.group_ids))
    assert metrics["zero_advantage_group_fraction"] == zero_advantage_group_fraction(last.advantages.turn, last.batch.group_ids)
    assert metrics["train_em"] == sum(t.em for t in last.batch.trajectories) / 6
    if algorithm == "igpo":
        assert last.answer_logprob.shape == last.advantages.turn.shape
        records = case_studies(last.batch, last.advantages, last.answer_logprob, setup[1], count=2, step=1)
        assert len(records) == 2 and all(0.0 < turn["probe_prob"] <= 1.0 for r in records for turn in r["turns"])
    else:
        assert results_a[-1].answer_logprob is None and metrics["ig_mean"] is None


def test_rl_step_probe_layouts_agree(setup):
    """The KV-cache probe pass gives the step the same probes and advantages as the packed forward
    (multi-turn probe batches are compared with one forward per probe in test_probes.py)."""
    _, (packed,) = run_steps(setup, "igpo", steps=1)
    _, (cached,) = run_steps(setup, "igpo", steps=1, probe_layout="kv_cache")
    assert torch.equal(cached.batch.input_ids, packed.batch.input_ids)
    torch.testing.assert_close(cached.answer_logprob, packed.answer_logprob, rtol=0, atol=1e-4)
    torch.testing.assert_close(cached.advantages.turn, packed.advantages.turn, rtol=0, atol=1e-3)


# --- sub-goal targets -----------------------------------------------------------------------------

CHAIN = QAExample("Capital of the country where Ilsa Marr was born?", ("Oslo",), 3, "world",
                  gold_queries=("Ilsa Marr", "Kelm", "Tovia"), gold_bridge_answers=("Kelm", "Tovia", "Oslo"))
ONE_HOP = QAExample("Where was Ilsa Marr born?", ("Kelm",), 1, "world", gold_queries=("Ilsa Marr",), gold_bridge_answers=("Kelm",))


def _chain_trajectories(tokenizer):
    trajectories = [
        text_trajectory(tokenizer, ["<search> Ilsa Marr </search>", "<search> Kelm </search>", "<answer> Oslo </answer>"], 1.0),
        text_trajectory(tokenizer, ["<answer> Kelm </answer>"], 0.0),
        text_trajectory(tokenizer, ["<search> x </search>", "<answer> Kelm </answer>"], 1.0, group_id=1),
    ]
    for trajectory, example in zip(trajectories, (CHAIN, CHAIN, ONE_HOP)):
        trajectory.example = example
    return trajectories


def test_the_batch_carries_each_questions_sub_goal_targets(setup):
    """With sub-goals each row's probe targets are its answer then its gold chain's bridges; a row
    with fewer targets has the rest marked absent; without, the answer's suffix alone (2-D table)."""
    _, tokenizer, _, _ = setup
    trajectories = _chain_trajectories(tokenizer)
    batch = build_batch(trajectories, tokenizer, probes=True, subgoals=True)
    assert batch.target_mask.tolist() == [[True, True, True], [True, True, True], [True, False, False]]
    assert batch.select(torch.tensor([2])).target_mask.tolist() == [[True, False, False]]
    plain = build_batch(trajectories, tokenizer, probes=True)
    assert plain.target_mask is None and plain.suffixes.token_ids.dim() == 2
    assert CHAIN.subgoals == ("Kelm", "Tovia") and ONE_HOP.subgoals == ()


def test_every_target_is_scored_in_the_same_forward_as_its_own_probe(setup):
    """Target k of the K-target probe forward is what the answer-only forward gives when the
    question's answer is that target (each target scored alone: the peer), micro batches included."""
    _, tokenizer, model, _ = setup
    trajectories = _chain_trajectories(tokenizer)
    batch = build_batch(trajectories, tokenizer, probes=True, subgoals=True)
    scores = score_batch(model, batch, RLConfig(micro_batch_size=2), probes=True)
    assert scores.answer_logprob.shape == (3, 3, 3)
    for k in range(3):
        alone = copy.deepcopy(trajectories)
        for trajectory in alone:
            targets = [trajectory.example.answers[0], *trajectory.example.subgoals]
            target = targets[k] if k < len(targets) else targets[0]
            trajectory.example = QAExample(trajectory.example.question, (target,), trajectory.example.hops, "world")
        single = score_batch(model, build_batch(alone, tokenizer, probes=True), RLConfig(), probes=True).answer_logprob
        present = batch.target_mask[:, k][:, None] & batch.turn_mask
        torch.testing.assert_close(scores.answer_logprob[..., k][present], single[present], rtol=0, atol=1e-5)


def test_sub_goal_advantages_by_hand(setup):
    """Rollout 0 (3 turns): p(answer) 0.1, 0.1, 0.6; p(bridge 1) 0.2, 0.7, 0.3, running max 0.2, 0.7, 0.7;
    p(bridge 2) 0.1, 0.1, 0.4. Subgoal weight 0.5: IG = answer gain + 0.5 (bridge gains) =
    [0 + 0.5 (0.5 + 0), 0.5 + 0.5 (0 + 0.3), 0] = [0.25, 0.65, 0]; the advantages are the library's call."""
    _, tokenizer, _, _ = setup
    batch = build_batch(_chain_trajectories(tokenizer), tokenizer, probes=True, subgoals=True)
    probs = torch.tensor([[[0.1, 0.2, 0.1], [0.1, 0.7, 0.1], [0.6, 0.3, 0.4]],
                          [[0.5, 0.5, 0.5], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
                          [[0.2, 1.0, 1.0], [0.9, 1.0, 1.0], [1.0, 1.0, 1.0]]])
    config = RLConfig(algorithm="igpo", igpo=IGPOSettings(subgoal_weight=0.5))
    result = compute_advantages(batch, torch.log(probs), config)
    assert result.information_gain[0].tolist() == pytest.approx([0.25, 0.65, 0.0], abs=1e-6)
    assert result.information_gain[2].tolist() == pytest.approx([0.7, 0.0, 0.0], abs=1e-6)  # 1-hop: the answer alone
    # per turn: the answer's, bridge 1's and bridge 2's gain
    torch.testing.assert_close(result.target_gains[0], torch.tensor([[0.0, 0.5, 0.0], [0.5, 0.0, 0.3], [0.0, 0.0, 0.0]]),
                               rtol=0, atol=1e-6)
    expected = igpo_rewards.igpo_advantages(torch.log(probs), batch.outcome, batch.turn_mask, batch.group_ids,
                                            target_weights=[1.0, 0.5, 0.5], target_mask=batch.target_mask)
    torch.testing.assert_close(result.turn, expected.advantages)
    # the metrics: the answer's and the sub-goals' mean gain over the non-final turns (and present targets)
    metrics = step_metrics(batch, result, torch.zeros(batch.input_ids.shape))
    assert metrics["ig_answer_mean"] == pytest.approx((0.0 + 0.5 + 0.7) / 3, abs=1e-6)
    assert metrics["ig_subgoal_mean"] == pytest.approx((0.5 + 0.0 + 0.0 + 0.3) / 4, abs=1e-6)
    assert metrics["ig_mean"] == pytest.approx((0.25 + 0.65 + 0.7) / 3, abs=1e-6)
    with pytest.raises(ValueError, match=r"answer_logprob must be \[B, T, K\] = \(3, 3, 3\), got \(3, 3\)"):
        compute_advantages(batch, torch.log(probs[..., 0]), config)


def test_sub_goals_need_questions_that_have_some():
    check_subgoals(RLConfig(igpo=IGPOSettings(subgoal_weight=1.0)), [ONE_HOP, CHAIN])
    check_subgoals(RLConfig(algorithm="grpo", igpo=IGPOSettings(subgoal_weight=1.0)), [ONE_HOP])  # GRPO probes nothing
    with pytest.raises(ValueError, match=r"rl.igpo.subgoal_weight = 1.0 needs questions with gold chains of 2 hops or more .* "
                                         r"none of the 2 training questions has a sub-goal"):
        check_subgoals(RLConfig(igpo=IGPOSettings(subgoal_weight=1.0)), [ONE_HOP, EXAMPLE])


def test_rl_step_with_sub_goals_runs_and_is_deterministic(setup):
    world = setup[0]
    chains = [example for example in world.train if example.subgoals][:2]
    assert len(chains) == 2

    def step():
        _, tokenizer, model, retriever = setup
        torch.manual_seed(0)
        policy = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        config = RLConfig(algorithm="igpo", questions_per_step=2, group_size=3, max_turns=3, max_new_tokens=6,
                          igpo=IGPOSettings(subgoal_weight=1.0))
        return rl_step(policy, copy.deepcopy(model), tokenizer, optimizer, retriever, chains, config)

    first, again = step(), step()
    assert first.answer_logprob.dim() == 3 and first.answer_logprob.shape[2] == 1 + max(len(e.subgoals) for e in chains)
    assert torch.equal(first.advantages.turn, again.advantages.turn)
    assert first.metrics["ig_subgoal_mean"] is None or math.isfinite(first.metrics["ig_subgoal_mean"])
    studies = case_studies(first.batch, first.advantages, first.answer_logprob, setup[1], count=2, step=1)
    assert len(studies) == 2
    for study in studies:
        example = next(example for example in chains if example.question == study["question"])
        for turn in study["turns"]:  # each sub-goal's probability before the turn
            assert set(turn["subgoal_probs"]) == set(example.subgoals) and all(0 < p <= 1 for p in turn["subgoal_probs"].values())
