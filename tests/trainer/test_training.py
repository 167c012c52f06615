"""The RL step: PPO + k3 loss against hand-computed values, advantages on tokens, the update, determinism."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from igpo_rewards.reference_trainer.config import RLConfig
from igpo_rewards.reference_trainer.modeling import build_model, train_tokenizer
from igpo_rewards.agent.protocol import INSTRUCTION
from igpo_rewards.reference_trainer.retrieval import BM25Retriever
from igpo_rewards.reference_trainer.rollout import QATrajectory
from igpo_rewards.reference_trainer.training import (
    all_zero_group_fraction,
    case_studies,
    compute_advantages,
    policy_loss,
    ppo_update,
    response_mask,
    rl_step,
    score_trajectories,
    turn_layout,
)
from igpo_rewards.reference_trainer.world import QAExample, build_world

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


def test_turn_layout_and_response_mask():
    trajectories = [make_trajectory([2, 1], outcome=1.0, group_id=3), make_trajectory([2], outcome=-2.0, group_id=5)]
    turn_mask, group_ids, outcome = turn_layout(trajectories)
    assert turn_mask.tolist() == [[True, True], [True, False]]
    assert group_ids.tolist() == [3, 5] and outcome.tolist() == [1.0, -2.0]
    assert response_mask(trajectories).tolist() == [[0, 0, 0, 0, 1, 1, 0, 0, 0, 1], [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]]


def test_igpo_advantages_on_tokens_by_hand():
    # group 0: rollout 0 has 3 turns, probes p = 0.1, 0.3, 0.6 and outcome 1; rollout 1 answers at once, outcome 0.
    trajectories = [make_trajectory([2, 1, 2], outcome=1.0), make_trajectory([3], outcome=0.0)]
    answer_logprob = torch.log(torch.tensor([[0.1, 0.3, 0.6], [0.1, 0.0, 0.0]]))
    result = compute_advantages(trajectories, answer_logprob, RLConfig(algorithm="igpo"))
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
    assert result.loss_mask.tolist()[0] == [False] * 4 + [True] * 2 + [False] * 3 + [True] + [False] * 3 + [True] * 2


def test_grpo_advantages_on_tokens_and_identical_layout():
    trajectories = [make_trajectory([2, 1], outcome=1.0), make_trajectory([3], outcome=0.0),
                    make_trajectory([1], outcome=0.5, group_id=1), make_trajectory([1], outcome=0.5, group_id=1)]
    result = compute_advantages(trajectories, None, RLConfig(algorithm="grpo"))
    a = 0.5 / (0.5 + 1e-6)
    torch.testing.assert_close(result.turn, torch.tensor([[a, a], [-a, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    assert result.token[0].tolist() == pytest.approx([0] * 4 + [a] * 2 + [0] * 3 + [a])
    assert result.token[1].tolist() == pytest.approx([0] * 4 + [-a] * 3 + [0] * 3)
    assert result.information_gain is None and result.rewards is None
    igpo = compute_advantages(trajectories, torch.zeros(4, 2), RLConfig(algorithm="igpo"))
    assert torch.equal(igpo.loss_mask, result.loss_mask)  # everything but the advantages is identical
    assert all_zero_group_fraction(result.turn, result.group_ids) == 0.5


def test_compute_advantages_errors():
    trajectories = [make_trajectory([2], outcome=1.0)]
    with pytest.raises(ValueError, match="IGPO needs the probes"):
        compute_advantages(trajectories, None, RLConfig(algorithm="igpo"))
    with pytest.raises(ValueError, match=r"answer_logprob must be \[B, T\] = \(1, 1\), got \(1, 2\)"):
        compute_advantages(trajectories, torch.zeros(1, 2), RLConfig(algorithm="igpo"))


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
    logprobs, _, _ = score_trajectories(model, tokenizer, [trajectory], include_probes=False, micro_batch_size=4)
    return sum(float(logprobs[0, s:e].sum()) for s, e in trajectory.turn_spans)


def test_ppo_update_moves_log_probs_with_the_advantage_sign(setup):
    _, tokenizer, model, _ = setup
    policy = copy.deepcopy(model)
    good = text_trajectory(tokenizer, ["<search> Tovia </search>", "<answer> Tovia </answer>"], 1.0)
    bad = text_trajectory(tokenizer, ["<answer> Kelm </answer>"], 0.0)
    trajectories = [good, bad]
    config = RLConfig(algorithm="grpo", group_size=2, minibatches=1, kl_coef=0.0, learning_rate=1e-2)
    advantages = compute_advantages(trajectories, None, config)
    old, _, _ = score_trajectories(policy, tokenizer, trajectories, include_probes=False, micro_batch_size=4)
    before = [turn_logprob(policy, tokenizer, t) for t in trajectories]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    stats = ppo_update(policy, tokenizer, optimizer, trajectories, advantages, old, None, config)
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
    for micro_batch_size in (1, 4):
        policy, reference = copy.deepcopy(model), copy.deepcopy(model)
        config = RLConfig(algorithm="grpo", group_size=2, minibatches=1, micro_batch_size=micro_batch_size, grad_clip=0.0)
        advantages = compute_advantages(trajectories, None, config)
        old, _, _ = score_trajectories(policy, tokenizer, trajectories, include_probes=False, micro_batch_size=4)
        ref, _, _ = score_trajectories(reference, tokenizer, trajectories, include_probes=False, micro_batch_size=4)
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
        stats = ppo_update(policy, tokenizer, optimizer, trajectories, advantages, old, ref, config)
        results.append((torch.nn.utils.parameters_to_vector(policy.parameters()), stats))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(results[0][0], torch.nn.utils.parameters_to_vector(model.parameters()))
    assert results[0][1]["loss"] == pytest.approx(results[1][1]["loss"], abs=1e-6)
    assert results[1][1]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the step


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
    for key in ("reward_mean", "train_f1", "train_em", "zero_variance_group_fraction", "outcome_zero_variance_group_fraction",
                "zero_advantage_token_fraction", "entropy", "clip_fraction", "tokens_per_second", "seconds_rollout",
                "seconds_retrieval", "seconds_probes", "seconds_update", "kl", "loss", "grad_norm"):
        assert metrics[key] is not None and math.isfinite(metrics[key]), key
    assert len(results_a[-1].rollouts.trajectories) == 6
    if algorithm == "igpo":
        assert results_a[-1].answer_logprob.shape == results_a[-1].advantages.turn.shape
        records = case_studies(results_a[-1], setup[1], count=2, step=1)
        assert len(records) == 2 and all(0.0 < turn["probe_prob"] <= 1.0 for r in records for turn in r["turns"])
    else:
        assert results_a[-1].answer_logprob is None and metrics["ig_mean"] is None


def test_rl_step_probe_layouts_agree(setup):
    """The KV-cache probe pass gives the step the same probes and advantages as the packed forward
    (multi-turn probe batches are compared with one forward per probe in test_probes.py)."""
    _, (packed,) = run_steps(setup, "igpo", steps=1)
    _, (cached,) = run_steps(setup, "igpo", steps=1, probe_layout="kv_cache")
    assert [t.token_ids for t in cached.rollouts.trajectories] == [t.token_ids for t in packed.rollouts.trajectories]
    torch.testing.assert_close(cached.answer_logprob, packed.answer_logprob, rtol=0, atol=1e-4)
    torch.testing.assert_close(cached.advantages.turn, packed.advantages.turn, rtol=0, atol=1e-3)
