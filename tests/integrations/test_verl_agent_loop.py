"""IGPO's verl agent loop ``igpo_tool_agent`` through verl 0.9.1's own agent-loop machinery on CPU.

The harness (tests/integrations/verl_harness.py) says what is real and what stands in: verl's
agent-loop workers, config, tool parser, Continuous Token builder, streaming reward worker and
TransferQueue run as shipped; a CPU stand-in implements the rollout server's ``generate`` on a tiny
HF model trained on hermes tool calls; the search tool calls ``igpo-retrieve`` over loopback.

Expected values never come from the code under test: turns are read off ``response_mask`` with a
loop written here, probe values come from the reference trainer's packed probe forward on the same
model and tokens, and advantages from ``igpo_rewards.igpo_advantages`` (and the float64 loop
oracle) on the probes and outcomes the rows carry. Three module-wide rollout runs share the
trained policy: the legacy worker with ``IGPOAgentLoopManager``'s worker, IGPO's V1 worker
(verl's ``AgentLoopWorkerTQ``, with verl's ``FullyAsyncLLMServerClient`` as in the async modes and
the TransferQueue on Ray), and the stock ``tool_agent`` on the stock worker. Smaller runs check
aborted probes, probes past ``max_model_len``, and the missing manager; the last section runs
``IGPOAgentLoopManager`` through Ray as both trainers do (server actor behind verl's load balancer,
worker actors, IGPO's replay buffer).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import igpo_rewards
from igpo_rewards.integrations import verl as igpo_verl
from igpo_rewards.integrations.verl_agent_loop import (
    PROBE_TOKENS_KEY,
    IGPOAgentLoopOutput,
    IGPOToolAgentLoop,
    _Probes,
    probe_answer,
    probe_logprob_from_server_output,
)
from igpo_rewards.integrations.verl_manager import IGPOAgentLoopWorker, uses_v1_trainer, write_turn_rewards
from igpo_rewards.agent.probes import (
    build_probe_suffix,
    pad_token_ids,
    probe_forward,
    score_probes,
    suffix_table,
    token_logprobs,
)
from igpo_rewards.agent.retrieval import write_corpus_jsonl
from igpo_rewards.reference_trainer.world import build_world
from igpo_rewards.testing import reference

from . import verl_harness as harness

from verl import DataProto  # noqa: E402
from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput, AgentLoopWorker  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402
from verl.trainer.ppo.reward import extract_reward  # noqa: E402

GROUP_SIZE = 4
PROBE_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------
# Fixtures: one trained policy, one retrieval server, three rollout runs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def event_loop_for_verl():
    """One asyncio loop for the module: verl's workers capture ``get_event_loop()`` at construction."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()
    asyncio.set_event_loop(None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, event_loop_for_verl):
    """The policy (trained while ``igpo-retrieve`` starts) and the search tool's config."""
    directory = tmp_path_factory.mktemp("verl_harness")
    world = build_world(seed=0, num_train=40, num_heldout=5)
    command = harness.RetrievalCommand(write_corpus_jsonl(world.corpus, directory / "served.jsonl"), directory / "index")
    try:
        policy = harness.build_policy(directory)
        url = command.wait_url()
        yield SimpleNamespace(policy=policy, tool_config=harness.write_tool_config(directory, f"{url}/retrieve"))
    finally:
        command.stop()


def make_server(policy, *, max_model_len=1024, flavor="vllm", server_class=None):
    return (server_class or harness.CPURolloutServer)(policy.model, eos_token_id=policy.tokenizer.eos_token_id,
                                                      max_model_len=max_model_len, flavor=flavor)


def legacy_input(policy, questions=None) -> DataProto:
    """The rows a legacy AgentLoopWorker gets: each question (the first ``questions``) repeated GROUP_SIZE times."""
    rows = harness.dataset_rows(policy.examples)[:questions]
    columns = {key: np.array([row[key] for row in rows for _ in range(GROUP_SIZE)], dtype=object) for key in rows[0]}
    batch = DataProto.from_dict(non_tensors=columns)
    batch.meta_info["global_steps"] = 1
    return batch


def run_legacy(setup, loop, *, agent_loop: str, worker_class, server=None, extra=(), client_class=None, questions=None,
               probe_mode: str = "server"):
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    config = harness.verl_config(setup.policy, setup.tool_config, agent_loop=agent_loop, use_v1=False, n=GROUP_SIZE,
                                 extra=list(extra), probe_mode=probe_mode)
    server = server or make_server(setup.policy)
    client = harness.local_server_client(config, server, client_class)
    rewards = harness.InProcessActor(RewardLoopWorker(config))
    worker = worker_class(config, client, None, [rewards])
    batch = legacy_input(setup.policy, questions)
    output = loop.run_until_complete(worker.generate_sequences(batch))
    for key, column in batch.non_tensor_batch.items():  # what RayPPOTrainer's batch.union(gen_batch_output) adds
        output.non_tensor_batch.setdefault(key, column)
    return SimpleNamespace(config=config, server=server, output=output)


@pytest.fixture(scope="module")
def legacy(setup, event_loop_for_verl):
    """igpo_tool_agent through the legacy trainer's worker (IGPOAgentLoopManager's IGPOAgentLoopWorker)."""
    return run_legacy(setup, event_loop_for_verl, agent_loop="igpo_tool_agent", worker_class=IGPOAgentLoopWorker)


@pytest.fixture(scope="module")
def v1(setup, event_loop_for_verl):
    """igpo_tool_agent through IGPOAgentLoopManager's V1 worker (verl's AgentLoopWorkerTQ) in the
    colocate_async mode: verl's FullyAsyncLLMServerClient, rows in a real TransferQueue."""
    ray = pytest.importorskip("ray")
    tq = pytest.importorskip("transfer_queue")
    from omegaconf import OmegaConf
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.utils import tensordict_utils
    from verl.workers.rollout.llm_server import FullyAsyncLLMServerClient

    from igpo_rewards.integrations._verl_v1 import IGPOAgentLoopWorkerTQ

    # Ray's worker processes inherit the environment ray.init starts them with: the harness (the
    # rollout server actor of the Ray tests below) must import there.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    environment = pytest.MonkeyPatch()
    environment.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    environment.undo()
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    try:
        config = harness.verl_config(setup.policy, setup.tool_config, agent_loop="igpo_tool_agent", use_v1=True,
                                     n=GROUP_SIZE, extra=["trainer.v1.trainer_mode=colocate_async"])
        server = make_server(setup.policy)
        client = harness.local_server_client(config, server, FullyAsyncLLMServerClient)
        rewards = harness.InProcessActor(RewardLoopWorker(config))
        worker = IGPOAgentLoopWorkerTQ(config, client, None, [rewards])
        rows = harness.dataset_rows(setup.policy.examples)
        prompts = tensordict_utils.get_tensordict({key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]})
        tensordict_utils.assign_non_tensor_data(prompts, "global_steps", 1)

        async def generate():
            await worker.generate_sequences(prompts)  # fire-and-forget, as in V1
            while worker.background_tasks:
                await asyncio.gather(*list(worker.background_tasks))

        event_loop_for_verl.run_until_complete(generate())
        keys = [f"{row['uid']}_{session}_0" for row in rows for session in range(GROUP_SIZE)]
        yield SimpleNamespace(config=config, keys=keys, tq=tq, worker=worker, examples=setup.policy.examples,
                              probe_requests=server.log.requests["prompt_logprobs"],
                              report=event_loop_for_verl.run_until_complete(worker.igpo_session_report()))
    finally:
        tq.close()
        ray.shutdown()


@pytest.fixture(scope="module")
def stock(setup, event_loop_for_verl):
    """verl's stock tool_agent on verl's stock legacy AgentLoopWorker: no probes, outcome at the last token."""
    return run_legacy(setup, event_loop_for_verl, agent_loop="tool_agent", worker_class=AgentLoopWorker)


# ---------------------------------------------------------------------------------------------
# Independent readings of a row
# ---------------------------------------------------------------------------------------------


def runs_of_ones(mask) -> list[tuple[int, int]]:
    runs, start = [], None
    for position, value in enumerate([int(v) for v in mask] + [0]):
        if value and start is None:
            start = position
        if not value and start is not None:
            runs.append((start, position))
            start = None
    return runs


def expected_advantages(probes, outcomes, uids, masks, settings=None):
    """[B, S] token advantages: igpo_rewards.igpo_advantages on the probes and outcomes, placed on
    each row's runs of 1s (checked against the float64 oracle too)."""
    settings = settings or igpo_verl.IGPOSettings()
    turns = max(len(row) for row in probes)
    answer_logprob = np.zeros((len(probes), turns))
    turn_mask = np.zeros((len(probes), turns), dtype=bool)
    for row, values in enumerate(probes):
        answer_logprob[row, : len(values)] = values
        turn_mask[row, : len(values)] = True
    groups = np.unique(np.asarray(uids, dtype=str), return_inverse=True)[1]
    result = igpo_rewards.igpo_advantages(answer_logprob, np.asarray(outcomes, dtype=np.float64), turn_mask, groups,
                                          gamma=settings.gamma, **settings.normalization_kwargs(), **settings.reward_kwargs())
    oracle = reference.igpo_advantages(answer_logprob, np.asarray(outcomes, dtype=np.float64), turn_mask, groups)
    np.testing.assert_allclose(result.advantages, oracle.advantages, rtol=1e-9, atol=1e-9)
    tokens = np.zeros((len(probes), masks.shape[1]))
    for row in range(len(probes)):
        for turn, (start, end) in enumerate(runs_of_ones(masks[row])):
            tokens[row, start:end] = result.advantages[row, turn]
    return tokens, result


def trajectory(out, row) -> SimpleNamespace:
    """Row ``row`` of a legacy batch unpadded: token ids (prompt + response), where each turn starts
    in them (the runs of response_mask), the probed answer (the ground truth's first alias)."""
    prompt = out.batch["prompts"][row][out.batch["attention_mask"][row, : harness.PROMPT_LENGTH].bool()].tolist()
    response = out.batch["responses"][row][out.batch["attention_mask"][row, harness.PROMPT_LENGTH:].bool()].tolist()
    starts = [len(prompt) + start for start, _ in runs_of_ones(out.batch["response_mask"][row])]
    answer = out.non_tensor_batch["reward_model"][row]["ground_truth"].split("<|answer_split|>")[0]
    return SimpleNamespace(token_ids=prompt + response, prompt_length=len(prompt), turn_starts=starts, answer=answer)


def legacy_rows(legacy):
    out = legacy.output
    probes = [list(values) for values in out.non_tensor_batch[igpo_verl.ANSWER_LOGPROB_KEY]]
    outcomes = [float(value) for value in out.non_tensor_batch["acc"]]
    return out, probes, outcomes


# ---------------------------------------------------------------------------------------------
# Deliverable 1: the agent loop, its probes and its token layout
# ---------------------------------------------------------------------------------------------


def test_rollouts_are_multi_turn_with_real_tool_calls(legacy, setup):
    out, probes, outcomes = legacy_rows(legacy)
    tokenizer = setup.policy.tokenizer
    turn_counts = [len(row) for row in probes]
    assert len(out) == len(setup.policy.examples) * GROUP_SIZE
    assert max(turn_counts) >= 2 and min(turn_counts) == 1, turn_counts
    searched = [row for row, count in enumerate(turn_counts) if count >= 2]
    responses = [tokenizer.decode(out.batch["responses"][row][out.batch["attention_mask"][row, harness.PROMPT_LENGTH:].bool()])
                 for row in searched]
    assert all('"name": "search"' in text and "<tool_response>" in text and "Doc 1(Title:" in text for text in responses)
    assert 1.0 in [outcomes[row] for row in searched]  # the streaming reward scored a multi-turn answer as correct
    assert out.non_tensor_batch["__num_turns__"].tolist() == [2 * count for count in turn_counts]  # user + tool turns


def test_response_mask_has_one_run_of_ones_per_assistant_turn(legacy, setup):
    out, probes, _ = legacy_rows(legacy)
    eos = setup.policy.tokenizer.eos_token_id
    for row in range(len(out)):
        mask = out.batch["response_mask"][row]
        responses = out.batch["responses"][row]
        runs = runs_of_ones(mask)
        assert len(runs) == len(probes[row])
        for start, end in runs:  # every run is one generated turn, ending at the model's eos
            assert int(responses[end - 1]) == eos
        for (_, end), (start, _) in zip(runs, runs[1:]):  # between two turns: the tool response
            assert "<tool_response>" in setup.policy.tokenizer.decode(responses[end:start])


def test_probe_values_equal_the_reference_trainers_packed_probe_forward(legacy, setup):
    """Each probe m_{i,j} scored by the rollout server = the packed probe forward the reference
    trainer uses (igpo_rewards.agent.probes.score_probes) of the same model on the same tokens
    (the trajectory up to turn j, then the probe suffix)."""
    out, probes, _ = legacy_rows(legacy)
    trajectories = [trajectory(out, row) for row in range(len(out))]
    with torch.no_grad():
        expected = score_probes(setup.policy.model, setup.policy.tokenizer, [t.token_ids for t in trajectories],
                                [t.turn_starts for t in trajectories], [t.answer for t in trajectories])
    for row, values in enumerate(probes):
        np.testing.assert_allclose(values, expected[row, : len(values)].numpy(), rtol=0, atol=PROBE_TOLERANCE)
    # probe 0 sees only the prompt: equal within each group of rollouts
    first = np.array([values[0] for values in probes]).reshape(-1, GROUP_SIZE)
    assert np.all(first == first[:, :1])


def test_probe_requests_and_their_prefilled_tokens(legacy, setup):
    """One probe request per turn, each prefilling its whole context plus the suffix (no prefix cache:
    vLLM skips it for prompt_logprobs requests); the counts the rows report match."""
    out, probes, _ = legacy_rows(legacy)
    server = legacy.server
    turns = sum(len(values) for values in probes)
    assert server.log.requests["prompt_logprobs"] == turns == server.log.requests["generate"]
    total = 0
    for row in range(len(out)):
        path = trajectory(out, row)
        suffix = build_probe_suffix(setup.policy.tokenizer, path.answer)
        expected = sum(start + len(suffix.token_ids) for start in path.turn_starts)
        assert out.non_tensor_batch[PROBE_TOKENS_KEY][row] == expected
        total += expected
    assert server.log.tokens["prompt_logprobs"] == total


def test_probe_requests_leave_the_trajectorys_staleness_tags_alone(legacy):
    out = legacy.output
    assert all(value == 0 for value in out.non_tensor_batch["min_global_steps"])  # the server's weight version
    assert all(value == 0 for value in out.non_tensor_batch["max_global_steps"])
    assert all(value == 0 for value in out.non_tensor_batch["num_cached_tokens"])  # from the first generation
    assert "prompt_logprobs" not in out.non_tensor_batch and "prompt_ids" not in out.non_tensor_batch


# ---------------------------------------------------------------------------------------------
# Deliverable 2: per-turn rewards reach the estimator under both trainers
# ---------------------------------------------------------------------------------------------


def test_legacy_rm_scores_hold_the_turn_rewards(legacy):
    out, probes, outcomes = legacy_rows(legacy)
    for row in range(len(out)):
        runs = runs_of_ones(out.batch["response_mask"][row])
        values = np.array([probes[row]])
        rewards = reference.turn_rewards(values, np.array([outcomes[row]]), np.ones(values.shape, dtype=bool))[0]
        expected = np.zeros(out.batch["rm_scores"].shape[1])
        for turn, (_, end) in enumerate(runs):
            expected[end - 1] = rewards[turn]
        np.testing.assert_allclose(out.batch["rm_scores"][row].numpy(), expected, rtol=1e-6, atol=1e-6)
    assert any(len(row) >= 2 and row[1] != row[0] for row in probes)  # a nonzero information gain exists


def test_legacy_batch_reaching_compute_advantage_gives_igpo_rewards(legacy):
    out, probes, outcomes = legacy_rows(legacy)
    data = DataProto(batch=out.batch.clone(), non_tensor_batch=dict(out.non_tensor_batch), meta_info=dict(out.meta_info))
    reward_tensor, _ = extract_reward(data)  # RayPPOTrainer.fit from here on
    data.batch["token_level_scores"] = reward_tensor
    data.batch["token_level_rewards"] = data.batch["token_level_scores"]
    algorithm = legacy.config.algorithm
    data = compute_advantage(data, adv_estimator=algorithm.adv_estimator, gamma=algorithm.gamma, lam=algorithm.lam,
                             num_repeat=GROUP_SIZE, config=algorithm)
    expected, result = expected_advantages(probes, outcomes, out.non_tensor_batch["uid"], out.batch["response_mask"].numpy())
    np.testing.assert_allclose(data.batch["advantages"].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(result.information_gain).max() > 0.01 and np.abs(expected).max() > 0.1


def test_v1_batch_reaching_compute_advantage_for_multi_trajectories_gives_igpo_rewards(v1):
    """verl's V1 trainer step (PPOTrainer._compute_advantage: TransferQueue -> DataProto ->
    compute_advantage_for_multi_trajectories -> TransferQueue), on the rows the stock
    AgentLoopWorkerTQ stored through IGPOAgentLoopOutput.as_dict."""
    from tensordict import TensorDict
    from transfer_queue import KVBatchMeta
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    tq, keys = v1.tq, v1.keys
    stored = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["rollout_log_probs"])
    tq.kv_batch_put(keys=keys, partition_id="train",  # the old-log-prob step's output (bypass: rollout log-probs)
                    fields=TensorDict({"old_log_probs": stored["rollout_log_probs"]}, batch_size=len(keys)))
    tags = tq.kv_list("train")["train"]
    PPOTrainer._compute_advantage(SimpleNamespace(config=v1.config),
                                  KVBatchMeta(keys=keys, partition_id="train", tags=[tags[key] for key in keys]), {})

    data = tq.kv_batch_get(keys=keys, partition_id="train",
                           select_fields=["advantages", "response_mask", "rm_scores", "extra_fields", "uid"])
    masks = data["response_mask"].to_padded_tensor(0).numpy()
    extra = list(data["extra_fields"])  # a list-like of dicts (its type depends on the TransferQueue backend)
    probes = [list(item[igpo_verl.ANSWER_LOGPROB_KEY]) for item in extra]
    outcomes = [float(item["reward_extra_info"]["acc"]) for item in extra]
    expected, _ = expected_advantages(probes, outcomes, list(data["uid"]), masks)
    np.testing.assert_allclose(data["advantages"].to_padded_tensor(0.0).numpy(), expected, rtol=1e-5, atol=1e-5)
    rm_scores = data["rm_scores"].to_padded_tensor(0.0).numpy()
    for row, values in enumerate(probes):  # IG at each earlier turn's end, the outcome at the last turn's
        ends = [end - 1 for _, end in runs_of_ones(masks[row])]
        assert np.flatnonzero(rm_scores[row]).tolist() == [end for end, value in
                                                              zip(ends, reference.turn_rewards(np.array([values]), np.array([outcomes[row]]), np.ones((1, len(values)), dtype=bool))[0])
                                                              if value != 0]
    assert max(len(values) for values in probes) >= 2


def test_v1_validation_rows_keep_verls_layout(v1, event_loop_for_verl):
    """IGPOAgentLoopManager's V1 worker stores validation rows with the outcome at the last token
    (V1 scores validation by the row sum of rm_scores)."""
    from verl.utils import tensordict_utils

    from igpo_rewards.integrations._verl_v1 import IGPOAgentLoopWorkerTQ

    worker = IGPOAgentLoopWorkerTQ(v1.config, v1.worker.llm_client, None, v1.worker.reward_loop_worker_handles)
    rows = harness.dataset_rows(v1.examples)[:1]
    rows[0]["uid"] = "validation0"
    prompts = tensordict_utils.get_tensordict({key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]})
    tensordict_utils.assign_non_tensor_data(prompts, "global_steps", 1)
    tensordict_utils.assign_non_tensor_data(prompts, "validate", True)

    async def generate():
        await worker.generate_sequences(prompts)
        while worker.background_tasks:
            await asyncio.gather(*list(worker.background_tasks))

    event_loop_for_verl.run_until_complete(generate())
    data = v1.tq.kv_batch_get(keys=["validation0_0_0"], partition_id="val", select_fields=["rm_scores", "extra_fields"])
    scores = data["rm_scores"].to_padded_tensor(0.0)[0]
    extra = list(data["extra_fields"])[0]
    outcome = float(extra["reward_extra_info"]["acc"])
    assert len(extra[igpo_verl.ANSWER_LOGPROB_KEY]) >= 1
    assert scores[-1].item() == pytest.approx(outcome) and torch.count_nonzero(scores[:-1]) == 0


# ---------------------------------------------------------------------------------------------
# Deliverable 3: no silent degradation
# ---------------------------------------------------------------------------------------------


def test_stock_tool_agent_path_is_refused_by_the_estimator(stock, monkeypatch):
    """verl's stock tool_agent: multi-turn rollouts with the outcome only. The estimator refuses the
    batch (naming the causes); under the opt-in it warns once and trains on the outcome."""
    out = stock.output
    assert igpo_verl.ANSWER_LOGPROB_KEY not in out.non_tensor_batch
    masks = out.batch["response_mask"]
    assert max(len(runs_of_ones(row)) for row in masks) >= 2  # multi-turn rollouts, yet only the outcome
    reward_tensor, _ = extract_reward(out)
    data = DataProto.from_dict(tensors={"response_mask": masks, "token_level_rewards": reward_tensor},
                               non_tensors={"uid": out.non_tensor_batch["uid"]})
    monkeypatch.setattr(igpo_verl, "_warned_outcome_only", False)
    with pytest.raises(igpo_verl.IGPOConfigError, match="default_agent_loop must be igpo_tool_agent.*agent_loop_manager_class"):
        compute_advantage(data, adv_estimator="igpo", num_repeat=GROUP_SIZE, config=stock.config.algorithm)
    allowed = OmegaConf.create({**OmegaConf.to_container(stock.config.algorithm), "igpo": {"allow_outcome_only": True}})
    with pytest.warns(igpo_verl.OutcomeOnlyWarning, match="allowed by algorithm.igpo.allow_outcome_only=True"):
        compute_advantage(data, adv_estimator="igpo", num_repeat=GROUP_SIZE, config=allowed)
    with warnings.catch_warnings():  # once per process
        warnings.simplefilter("error")
        compute_advantage(data, adv_estimator="igpo", num_repeat=GROUP_SIZE, config=allowed)


def test_igpo_rows_do_not_warn(legacy, monkeypatch):
    out = legacy.output
    monkeypatch.setattr(igpo_verl, "_warned_outcome_only", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", igpo_verl.OutcomeOnlyWarning)
        igpo_verl.compute_igpo_advantage(out.batch["rm_scores"], out.batch["response_mask"],
                                         index=out.non_tensor_batch["uid"], config=legacy.config.algorithm)


@pytest.mark.parametrize("mode", ["token_k1", "token_k2", "token_k3", "seq_mean_k3,token_k1"])
def test_token_level_rejection_sampling_is_refused(legacy, mode):
    """verl's rejection sampling punches a hole into a turn (two runs where one turn was); the
    estimator refuses the setting by name before reading such a mask."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch

    out, probes, _ = legacy_rows(legacy)
    row = next(row for row, values in enumerate(probes) if len(values) >= 2)
    start, end = runs_of_ones(out.batch["response_mask"][row])[0]
    data = DataProto(batch=out.batch.clone(), non_tensor_batch=dict(out.non_tensor_batch))
    data.batch["old_log_probs"] = data.batch["rollout_log_probs"].clone()
    data.batch["old_log_probs"][row, (start + end) // 2] += 5.0  # one off-policy token inside turn 0
    data.batch["token_level_rewards"] = data.batch["rm_scores"]
    threshold = {"token_k1": "2.0", "token_k2": "1.0", "token_k3": "1.0", "seq_mean_k3,token_k1": "100.0,2.0"}[mode]
    correction = OmegaConf.create({"rollout_is": None, "rollout_rs": mode, "rollout_rs_threshold": threshold,
                                   "bypass_mode": False})
    data, _ = compute_rollout_correction_and_add_to_batch(data, correction)
    assert len(runs_of_ones(data.batch["response_mask"][row])) == len(probes[row]) + 1  # the turn was cut in two
    algorithm = OmegaConf.merge(legacy.config.algorithm, {"rollout_correction": correction})
    with pytest.raises(ValueError, match=rf"algorithm\.rollout_correction\.rollout_rs is '{mode}'.*cuts IGPO's turns"):
        compute_advantage(data, adv_estimator="igpo", num_repeat=GROUP_SIZE, config=algorithm)


@pytest.mark.filterwarnings("ignore::igpo_rewards.SingleRolloutGroupWarning")  # a one-row batch, on purpose
def test_rejection_settings_that_keep_turns_are_accepted():
    from omegaconf import OmegaConf

    mask = torch.tensor([[1, 1, 0, 1, 0]])
    rewards = torch.tensor([[0.0, 0.5, 0.0, 1.0, 0.0]])
    for correction in ({"rollout_rs": "seq_mean_k3", "bypass_mode": False},
                       {"rollout_rs": "token_k1", "bypass_mode": True}, {"rollout_rs": None}):
        config = OmegaConf.create({"adv_estimator": "igpo", "rollout_correction": correction})
        igpo_verl.compute_igpo_advantage(rewards, mask, index=np.array(["q"], dtype=object), config=config)


# ---------------------------------------------------------------------------------------------
# Issue 19: V1's async client, aborted probes, probes past max_model_len, the manager, agent_name data
# ---------------------------------------------------------------------------------------------


def reference_probes(policy, paths):
    """[B, T] probe log-probs of the library's packed probe forward on the rows' own tokens."""
    with torch.no_grad():
        return score_probes(policy.model, policy.tokenizer, [p.token_ids for p in paths], [p.turn_starts for p in paths],
                            [p.answer for p in paths])


def v1_trajectories(v1):
    """The V1 rows the worker stored in the TransferQueue, read like ``trajectory`` reads a legacy row."""
    data = v1.tq.kv_batch_get(keys=v1.keys, partition_id="train",
                              select_fields=["prompts", "responses", "response_mask", "extra_fields", "reward_model"])
    paths = []
    for prompt, response, mask, reward_model in zip(data["prompts"].unbind(), data["responses"].unbind(),
                                                    data["response_mask"].unbind(), list(data["reward_model"])):
        prompt = prompt.tolist()
        starts = [len(prompt) + start for start, _ in runs_of_ones(mask)]
        answer = reward_model["ground_truth"].split("<|answer_split|>")[0]
        paths.append(SimpleNamespace(token_ids=prompt + response.tolist(), turn_starts=starts, answer=answer))
    probes = [list(item[igpo_verl.ANSWER_LOGPROB_KEY]) for item in list(data["extra_fields"])]
    return paths, probes


def test_v1_async_client_probes_equal_the_reference_probe_forward(v1, setup):
    """Under V1's async modes the agent loop gets verl's FullyAsyncLLMServerClient: the probes still
    reach the server's prompt log-probs and equal the library's probe forward on the same tokens."""
    from verl.workers.rollout.llm_server import FullyAsyncLLMServerClient

    assert isinstance(v1.worker.llm_client, FullyAsyncLLMServerClient)
    paths, probes = v1_trajectories(v1)
    expected = reference_probes(setup.policy, paths)
    for row, values in enumerate(probes):
        np.testing.assert_allclose(values, expected[row, : len(values)].numpy(), rtol=0, atol=PROBE_TOLERANCE)
    assert max(len(values) for values in probes) >= 2
    assert v1.probe_requests == sum(len(values) for values in probes)
    assert v1.report == {"failed": [False] * len(paths), "errors": [], "config_errors": [], "probes_skipped": 0}


def test_fully_async_clients_own_generate_drops_the_prompt_logprobs(setup, legacy, event_loop_for_verl):
    """Why the probe takes the base LLMServerClient.generate under the async client: verl's
    FullyAsyncLLMServerClient.generate rebuilds the answer without them (verl 0.9.1)."""
    from verl.workers.rollout.llm_server import FullyAsyncLLMServerClient, LLMServerClient

    from igpo_rewards.integrations.verl_agent_loop import PROBE_SAMPLING_PARAMS

    client = harness.local_server_client(legacy.config, make_server(setup.policy), FullyAsyncLLMServerClient)
    ids = setup.policy.tokenizer.encode(setup.policy.examples[0].question)
    own = event_loop_for_verl.run_until_complete(
        client.generate("probe", prompt_ids=ids, sampling_params=dict(PROBE_SAMPLING_PARAMS)))
    base = event_loop_for_verl.run_until_complete(
        LLMServerClient.generate(client, "probe", prompt_ids=ids, sampling_params=dict(PROBE_SAMPLING_PARAMS)))
    assert "prompt_logprobs" not in own.extra_fields
    assert len(base.extra_fields["prompt_logprobs"]) == len(ids)


class AbortingServer(harness.CPURolloutServer):
    """Answers the first ``aborts`` probe requests as verl's vLLM server does while the async trainer
    syncs weights: no token, no prompt log-probs, ``stop_reason="aborted"``."""

    aborts = 3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.aborted = 0

    async def generate(self, prompt_ids, sampling_params, request_id, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        if sampling_params.get("prompt_logprobs") is not None and self.aborted < self.aborts:
            self.aborted += 1
            return TokenOutput(token_ids=[], log_probs=None, stop_reason="aborted",
                               extra_fields={"global_steps": self.global_steps})
        return await super().generate(prompt_ids, sampling_params, request_id, **kwargs)


def test_probes_aborted_by_a_weight_sync_are_sent_again(setup, event_loop_for_verl):
    from verl.workers.rollout.llm_server import FullyAsyncLLMServerClient

    server = make_server(setup.policy, server_class=AbortingServer)
    run = run_legacy(setup, event_loop_for_verl, agent_loop="igpo_tool_agent", worker_class=IGPOAgentLoopWorker,
                     server=server, client_class=FullyAsyncLLMServerClient, questions=1)
    out, probes, _ = legacy_rows(run)
    expected = reference_probes(setup.policy, [trajectory(out, row) for row in range(len(out))])
    for row, values in enumerate(probes):
        np.testing.assert_allclose(values, expected[row, : len(values)].numpy(), rtol=0, atol=PROBE_TOLERANCE)
    assert server.aborted == AbortingServer.aborts
    assert server.log.requests["prompt_logprobs"] == sum(len(values) for values in probes)


def test_a_probe_aborted_again_and_again_fails_its_session(setup, event_loop_for_verl, monkeypatch):
    from verl.workers.rollout.llm_server import FullyAsyncLLMServerClient

    from igpo_rewards.integrations import verl_agent_loop

    monkeypatch.setattr(verl_agent_loop, "PROBE_ABORT_RETRIES", 2)
    monkeypatch.setattr(AbortingServer, "aborts", 10**6)
    with pytest.raises(RuntimeError, match="aborted a probe request 2 times in a row"):
        run_legacy(setup, event_loop_for_verl, agent_loop="igpo_tool_agent", worker_class=IGPOAgentLoopWorker,
                   server=make_server(setup.policy, server_class=AbortingServer),
                   client_class=FullyAsyncLLMServerClient, questions=1)


def run_past_max_model_len(setup, loop, limit, probe_mode):
    """The legacy run with max_model_len (config and server) = limit + 1; the server writes SGLang's layout."""
    server = make_server(setup.policy, max_model_len=limit + 1, flavor="sglang")
    return run_legacy(setup, loop, agent_loop="igpo_tool_agent", worker_class=IGPOAgentLoopWorker, server=server,
                      extra=[f"actor_rollout_ref.rollout.max_model_len={limit + 1}"], probe_mode=probe_mode)


@pytest.fixture(scope="module")
def past_max_model_len(legacy, setup, event_loop_for_verl):
    """max_model_len one token short of the longest probe request of the legacy run (context +
    suffix): that probe no longer fits, every generation still does. (limit, the run in server mode)."""
    tokenizer = setup.policy.tokenizer
    old_paths = [trajectory(legacy.output, row) for row in range(len(legacy.output))]
    longest = max(start + len(build_probe_suffix(tokenizer, path.answer).token_ids)
                  for path in old_paths for start in path.turn_starts)
    limit = longest - 1  # max_model_len - 1: the longest request verl's servers take
    return SimpleNamespace(limit=limit, run=run_past_max_model_len(setup, event_loop_for_verl, limit, "server"))


def test_probes_past_max_model_len_are_skipped_with_zero_information_gain(past_max_model_len, legacy, setup):
    """No session fails; each probe that does not fit repeats the last value (IG 0 there and after),
    is counted, and the batch's advantages are IGPO's on those values."""
    tokenizer = setup.policy.tokenizer
    old_paths = [trajectory(legacy.output, row) for row in range(len(legacy.output))]
    limit, run = past_max_model_len.limit, past_max_model_len.run
    out, probes, outcomes = legacy_rows(run)
    assert len(out) == len(old_paths)  # every session finished
    paths = [trajectory(out, row) for row in range(len(out))]
    reference = reference_probes(setup.policy, paths)
    skipped_total = 0
    for row, path in enumerate(paths):
        probe_length = len(build_probe_suffix(tokenizer, path.answer).token_ids)
        skipped = [start + probe_length > limit for start in path.turn_starts]
        expected = []
        for turn, skip in enumerate(skipped):
            expected.append((expected[-1] if expected else -np.inf) if skip else float(reference[row, turn]))
        np.testing.assert_allclose(probes[row], expected, rtol=0, atol=PROBE_TOLERANCE)
        assert out.non_tensor_batch["igpo_probes_skipped"][row] == sum(skipped)
        skipped_total += sum(skipped)
    assert skipped_total >= 1
    assert any(len(values) >= 2 and values[1] != values[0] for values in probes)  # gains left elsewhere
    data = DataProto(batch=out.batch.clone(), non_tensor_batch=dict(out.non_tensor_batch), meta_info=dict(out.meta_info))
    reward_tensor, _ = extract_reward(data)
    data.batch["token_level_rewards"] = reward_tensor
    algorithm = run.config.algorithm
    data = compute_advantage(data, adv_estimator="igpo", num_repeat=GROUP_SIZE, config=algorithm)
    expected_tokens, _ = expected_advantages(probes, outcomes, out.non_tensor_batch["uid"], out.batch["response_mask"].numpy())
    np.testing.assert_allclose(data.batch["advantages"].numpy(), expected_tokens, rtol=1e-5, atol=1e-5)


def test_the_legacy_trainer_without_igpos_manager_is_refused_at_the_first_rollout(setup, event_loop_for_verl, monkeypatch):
    """verl's stock legacy worker drops the per-turn rewards; igpo_tool_agent refuses to run in it
    (the first rollout of the run fails, before any request)."""
    from igpo_rewards.integrations import verl_checks

    monkeypatch.setattr(verl_checks, "_in_igpo_worker", False)
    with pytest.raises(igpo_verl.IGPOConfigError, match=r"agent_loop_manager_class is not IGPO's: the legacy trainer's "
                                                       r".*Fix: \+actor_rollout_ref\.rollout\.agent\.agent_loop_manager_class="
                                                       r"igpo_rewards\.integrations\.verl_manager\.IGPOAgentLoopManager"):
        run_legacy(setup, event_loop_for_verl, agent_loop="igpo_tool_agent", worker_class=AgentLoopWorker, questions=1)


def test_rows_of_verls_dataset_naming_tool_agent_are_refused(setup, tmp_path, monkeypatch, event_loop_for_verl):
    """Rows as verl's tool-agent preprocessing scripts write them (agent_name: tool_agent), read by
    verl's RLHFDataset and collate_fn into each trainer's batch: refused at start-up (the parquet
    file) and before dispatch (the batch), naming the column and the fix."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from verl.experimental.agent_loop.agent_loop import AgentLoopManager
    from verl.utils import tensordict_utils
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

    from igpo_rewards.integrations.verl_manager import IGPOAgentLoopManager

    async def no_actors(self):
        self.agent_loop_workers = []

    monkeypatch.setattr(AgentLoopManager, "_init_agent_loop_workers", no_actors)
    rows = harness.dataset_rows(setup.policy.examples)
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"data_source": [row["data_source"] for row in rows],
                             "prompt": [row["raw_prompt"] for row in rows],
                             "reward_model": [row["reward_model"] for row in rows],
                             "extra_info": [row["extra_info"] for row in rows],
                             "agent_name": ["tool_agent"] * len(rows)}), path)
    message = (r"agent_name in {} names agent loops other than 'igpo_tool_agent' \(3 of 3 rows: \['tool_agent'\]\).*"
               r"Fix: write agent_name='igpo_tool_agent' into those rows, or drop the agent_name column")
    for use_v1 in (False, True):
        config = harness.verl_config(setup.policy, setup.tool_config, agent_loop="igpo_tool_agent", use_v1=use_v1,
                                     n=GROUP_SIZE, extra=[f"data.train_files={path}"])
        with pytest.raises(igpo_verl.IGPOConfigError, match=message.format(r"data.train_files '.*train.parquet'")):
            IGPOAgentLoopManager.create(config=config, llm_client=None, teacher_client=None, reward_loop_worker_handles=None)
        asyncio.set_event_loop(event_loop_for_verl)
        dataset = RLHFDataset(data_files=[str(path)], tokenizer=setup.policy.tokenizer, config=config.data)
        batch = collate_fn([dataset[index] for index in range(len(dataset))])
        config = harness.verl_config(setup.policy, setup.tool_config, agent_loop="igpo_tool_agent", use_v1=use_v1,
                                     n=GROUP_SIZE)
        manager = IGPOAgentLoopManager.create(config=config, llm_client=None, teacher_client=None,
                                              reward_loop_worker_handles=None)
        asyncio.set_event_loop(event_loop_for_verl)  # verl's auto_await ran create with asyncio.run
        if use_v1:  # what the V1 trainer's _fetch_one_gen_batch makes of a dataloader batch
            batch["uid"] = np.array([f"u{index}" for index in range(len(rows))], dtype=object)
            prompts = tensordict_utils.get_tensordict(batch)
        else:  # the legacy trainer's DataProto
            prompts = DataProto.from_single_dict(batch)
        with pytest.raises(igpo_verl.IGPOConfigError, match=message.format("a training batch")):
            manager.generate_sequences(prompts)


# ---------------------------------------------------------------------------------------------
# IGPOAgentLoopManager as both trainers run it: Ray actors, verl's load balancer, the replay buffer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_server(v1, setup):
    """The rollout server as a Ray actor behind verl's real GlobalRequestLoadBalancer, and verl's
    reward loop worker as a Ray actor (what the trainers hand the manager), in the V1 fixture's Ray session."""
    import ray
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.workers.rollout.router import GlobalRequestLoadBalancer

    server = ray.remote(harness.CPURolloutServer).remote(setup.policy.model, eos_token_id=setup.policy.tokenizer.eos_token_id,
                                                         max_model_len=1024)
    balancer = ray.remote(GlobalRequestLoadBalancer).remote(servers={"cpu-0": server})
    rewards = ray.remote(RewardLoopWorker).remote(v1.config)
    return SimpleNamespace(server=server, balancer=balancer, rewards=[rewards])


def manager_config(setup, *, use_v1, extra=()):
    return harness.verl_config(setup.policy, setup.tool_config, agent_loop="igpo_tool_agent", use_v1=use_v1, n=GROUP_SIZE,
                               extra=["actor_rollout_ref.rollout.agent.num_workers=1", *extra])


def test_v1_manager_replay_buffer_and_advantages_through_ray(v1, setup, ray_server, event_loop_for_verl):
    """V1 in colocate_async mode as TaskRunnerV1 and the trainer run it, minus the actor:
    IGPOAgentLoopManager.create starts IGPO's worker actor; prompts registered and dispatched as
    _submit_batch_to_rollout does; IGPO's replay buffer (verl's ReplayBufferAsync) samples the
    finished groups and reports the sessions, including one prompt whose 4 sessions fail (no ground
    truth to probe); verl's _compute_advantage gives IGPO's advantages; failures past the limit stop
    the run at the next dispatch, in the trainer's process."""
    from tensordict import TensorDict
    from transfer_queue import KVBatchMeta
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.utils import tensordict_utils
    from verl.workers.rollout.llm_server import FullyAsyncLLMServerClient

    from igpo_rewards.integrations._verl_v1 import IGPOAgentLoopManagerTQ
    from igpo_rewards.integrations.verl_manager import IGPOAgentLoopManager, IGPOReplayBuffer, SessionFailureError

    tq = v1.tq
    config = manager_config(setup, use_v1=True, extra=["trainer.v1.trainer_mode=colocate_async"])
    client = FullyAsyncLLMServerClient(config, load_balancer_handle=ray_server.balancer)
    manager = IGPOAgentLoopManager.create(config=config, llm_client=client, teacher_client=None,
                                          reward_loop_worker_handles=ray_server.rewards)
    asyncio.set_event_loop(event_loop_for_verl)
    assert type(manager) is IGPOAgentLoopManagerTQ and len(manager.agent_loop_workers) == 1
    buffer = IGPOReplayBuffer(trainer_mode="colocate_async", trainer_config=config.trainer.v1.colocate_async,
                              max_off_policy_threshold=None, max_off_policy_strategy="drop",
                              sampler_kwargs=config.trainer.v1.sampler.sampler_kwargs, refill_fn=None)

    def dispatch(rows):
        tq.kv_batch_put(keys=[row["uid"] for row in rows], partition_id="train",
                        tags=[{"is_prompt": True, "status": "pending", "global_steps": 1} for _ in rows])
        prompts = tensordict_utils.get_tensordict({key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]})
        tensordict_utils.assign_non_tensor_data(prompts, "global_steps", 1)
        manager.generate_sequences(prompts)

    rows = harness.dataset_rows(setup.policy.examples)
    for row in rows:
        row["uid"] = f"ray{row['uid']}"
    unprobeable = dict(rows[0], uid="raybroken", reward_model={"style": "rule"})  # no ground truth: the probe cannot run
    dispatch(rows + [unprobeable])
    batch, metrics = buffer.sample(global_steps=1, partition_id="train", batch_size=len(rows))
    assert metrics["training/igpo/sessions"] == GROUP_SIZE * (len(rows) + 1)
    assert metrics["training/igpo/failed_sessions"] == GROUP_SIZE and metrics["training/igpo/probes_skipped"] == 0
    assert metrics["training/rollout_failure/evicted_samples"] == 1  # verl evicts the failed group (async modes)
    assert sorted(batch.keys) == sorted(f"{row['uid']}_{session}_0" for row in rows for session in range(GROUP_SIZE))

    stored = tq.kv_batch_get(keys=batch.keys, partition_id="train", select_fields=["rollout_log_probs"])
    tq.kv_batch_put(keys=batch.keys, partition_id="train",
                    fields=TensorDict({"old_log_probs": stored["rollout_log_probs"]}, batch_size=len(batch.keys)))
    PPOTrainer._compute_advantage(SimpleNamespace(config=config), batch, {})
    data = tq.kv_batch_get(keys=batch.keys, partition_id="train",
                           select_fields=["advantages", "response_mask", "extra_fields", "uid"])
    masks = data["response_mask"].to_padded_tensor(0).numpy()
    extra = list(data["extra_fields"])
    probes = [list(item[igpo_verl.ANSWER_LOGPROB_KEY]) for item in extra]
    outcomes = [float(item["reward_extra_info"]["acc"]) for item in extra]
    expected, _ = expected_advantages(probes, outcomes, list(data["uid"]), masks)
    np.testing.assert_allclose(data["advantages"].to_padded_tensor(0.0).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert max(len(values) for values in probes) >= 2

    manager.sessions.limit = GROUP_SIZE + 1  # a low limit: the next GROUP_SIZE failures pass it
    dispatch([dict(unprobeable, uid="raybroken2")])
    deadline = time.monotonic() + 300
    with pytest.raises(SessionFailureError, match=r"8 of the last 20 agent-loop sessions failed .*ValueError: "
                                                  r"igpo_tool_agent needs each row's ground truth"):
        while time.monotonic() < deadline:  # the failures reach the trainer with the next report
            manager.collect_session_reports()
            time.sleep(1.0)


class NoPromptLogprobsServer(harness.CPURolloutServer):
    """A server that ignores ``prompt_logprobs`` (as verl's TRT-LLM server does)."""

    async def generate(self, prompt_ids, sampling_params, request_id, **kwargs):
        output = await super().generate(prompt_ids, sampling_params, request_id, **kwargs)
        output.extra_fields.pop("prompt_logprobs", None)
        return output


def test_a_session_refused_for_its_configuration_stops_the_run(v1, setup, event_loop_for_verl):
    """IGPO's V1 worker reports a session that failed with IGPOConfigError (here: a server without
    prompt log-probs); the trainer-side ledger stops at once, since every session would fail alike."""
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.utils import tensordict_utils

    from igpo_rewards.integrations._verl_v1 import IGPOAgentLoopWorkerTQ
    from igpo_rewards.integrations.verl_manager import SessionLedger

    client = harness.local_server_client(v1.config, make_server(setup.policy, server_class=NoPromptLogprobsServer))
    worker = IGPOAgentLoopWorkerTQ(v1.config, client, None, [harness.InProcessActor(RewardLoopWorker(v1.config))])
    row = dict(harness.dataset_rows(setup.policy.examples)[0], uid="noprobes")
    prompts = tensordict_utils.get_tensordict({key: np.array([value], dtype=object) for key, value in row.items()})
    tensordict_utils.assign_non_tensor_data(prompts, "global_steps", 1)

    async def generate():
        await worker.generate_sequences(prompts)
        while worker.background_tasks:
            await asyncio.gather(*list(worker.background_tasks))

    event_loop_for_verl.run_until_complete(generate())
    report = event_loop_for_verl.run_until_complete(worker.igpo_session_report())
    assert report["failed"] == [True] * GROUP_SIZE and len(report["config_errors"]) == GROUP_SIZE
    with pytest.raises(igpo_verl.IGPOConfigError, match=r"refused for its configuration.*no extra_fields\['prompt_logprobs'\]"):
        SessionLedger().add(report)


def test_legacy_manager_reward_path_through_ray(setup, ray_server, event_loop_for_verl):
    """The legacy trainer's path with IGPOAgentLoopManager as RayPPOTrainer runs it: create (worker
    actor), generate_sequences on the repeated prompts, batch.union, extract_reward, compute_advantage:
    IGPO's advantages on the rows' probes and outcomes."""
    from verl.workers.rollout.llm_server import LLMServerClient

    from igpo_rewards.integrations.verl_manager import IGPOAgentLoopManager

    config = manager_config(setup, use_v1=False)
    manager = IGPOAgentLoopManager.create(config=config, llm_client=LLMServerClient(config, load_balancer_handle=ray_server.balancer),
                                          teacher_client=None, reward_loop_worker_handles=ray_server.rewards)
    asyncio.set_event_loop(event_loop_for_verl)
    assert type(manager) is IGPOAgentLoopManager and len(manager.agent_loop_workers) == 1
    batch = legacy_input(setup.policy)
    data = manager.generate_sequences(batch)
    for key, column in batch.non_tensor_batch.items():  # what RayPPOTrainer's batch.union(gen_batch_output) adds
        data.non_tensor_batch.setdefault(key, column)
    reward_tensor, _ = extract_reward(data)
    data.batch["token_level_scores"] = reward_tensor
    data.batch["token_level_rewards"] = data.batch["token_level_scores"]
    algorithm = config.algorithm
    data = compute_advantage(data, adv_estimator=algorithm.adv_estimator, gamma=algorithm.gamma, lam=algorithm.lam,
                             num_repeat=GROUP_SIZE, config=algorithm)
    probes = [list(values) for values in data.non_tensor_batch[igpo_verl.ANSWER_LOGPROB_KEY]]
    outcomes = [float(value) for value in data.non_tensor_batch["acc"]]
    expected, result = expected_advantages(probes, outcomes, data.non_tensor_batch["uid"], data.batch["response_mask"].numpy())
    np.testing.assert_allclose(data.batch["advantages"].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(result.information_gain).max() > 0.01


# ---------------------------------------------------------------------------------------------
# Pieces, with hand-computed values
# ---------------------------------------------------------------------------------------------


def test_probe_answer_reads_the_verl_parquet_layouts():
    assert probe_answer({"ground_truth": "Kaleno<|answer_split|>Kaleno City"}) == "Kaleno"
    assert probe_answer({"ground_truth": np.array(["Velum", "Velum town"], dtype=object)}) == "Velum"
    assert probe_answer({"ground_truth": {"target": np.array(["Tosk"])}}) == "Tosk"  # Search-R1
    assert probe_answer({"style": "rule"}, {"ground_truth": ["Mira"]}) == "Mira"
    with pytest.raises(ValueError, match=r"reward_model\['ground_truth'\]"):
        probe_answer({"style": "rule"}, {"index": 3})


def test_probe_logprob_from_server_output_reads_vllms_layout(setup):
    tokenizer = setup.policy.tokenizer
    suffix = build_probe_suffix(tokenizer, "Kivages")
    context = [5, 6, 7]
    sequence = context + list(suffix.token_ids)
    logprobs = [[-0.1 * position] for position in range(1, len(sequence))] + [[0.0]]
    ids = [[token] for token in sequence[1:]] + [[0]]
    scored = range(len(context) + suffix.answer_start, len(context) + suffix.answer_end)
    expected = np.mean([-0.1 * position for position in scored])
    value = probe_logprob_from_server_output({"prompt_logprobs": logprobs, "prompt_ids": ids}, sequence, len(context), suffix)
    assert value == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="no extra_fields\\['prompt_logprobs'\\]"):
        probe_logprob_from_server_output({}, sequence, len(context), suffix)
    with pytest.raises(ValueError, match=r"extra_fields\['prompt_logprobs'\] must hold one row per prompt token.*got 2"):
        probe_logprob_from_server_output({"prompt_logprobs": logprobs[:2]}, sequence, len(context), suffix)
    wrong = [list(item) for item in ids]
    wrong[len(context) + suffix.answer_start - 1] = [123456]
    with pytest.raises(ValueError, match=r"extra_fields\['prompt_ids'\]: the rollout server scored token ids"):
        probe_logprob_from_server_output({"prompt_logprobs": logprobs, "prompt_ids": wrong}, sequence, len(context), suffix)


def _finished(turn_starts, response_mask, values, steps=()):
    """IGPOToolAgentLoop._finish on a hand-made trajectory (no server needed)."""
    loop = IGPOToolAgentLoop.__new__(IGPOToolAgentLoop)
    loop.igpo_settings = igpo_verl.IGPOSettings()
    loop.igpo_probe_mode = "server"
    loop._probes = _Probes(suffix=None, values=list(values), turn_starts=list(turn_starts), prefill_tokens=42,
                           global_steps=list(steps), skipped=[False] * len(values))
    output = AgentLoopOutput(prompt_ids=[1, 2], response_ids=list(range(len(response_mask))),
                             response_mask=list(response_mask), metrics=AgentLoopMetrics(), num_turns=3,
                             extra_fields={"min_global_steps": 3, "max_global_steps": 3})
    return loop._finish(output)


def test_finish_keeps_one_probe_per_turn_left_in_the_response():
    # three turns started at 0, 5 and 9; response_length cut the third turn away entirely
    output = _finished([0, 5, 9], [1, 1, 0, 0, 0, 1, 1, 0, 0], [-3.0, -2.0, -1.0], steps=[2, 3])
    assert isinstance(output, IGPOAgentLoopOutput)
    assert output.extra_fields[igpo_verl.ANSWER_LOGPROB_KEY] == [-3.0, -2.0]
    assert output.extra_fields[PROBE_TOKENS_KEY] == 42
    assert (output.extra_fields["min_global_steps"], output.extra_fields["max_global_steps"]) == (2, 3)
    # a turn whose generation produced no token has no run: its probe goes
    assert _finished([0, 3], [1, 1, 0], [-3.0, -2.0]).extra_fields[igpo_verl.ANSWER_LOGPROB_KEY] == [-3.0]
    with pytest.raises(ValueError, match="response_mask has runs.*each turn must be exactly one run of 1s"):
        _finished([0, 5], [1, 0, 1, 0, 0, 1], [-3.0, -2.0])  # turn 0 split in two runs


def test_output_as_dict_writes_turn_rewards_after_scoring():
    output = _finished([0, 3], [1, 1, 0, 1, 1], [np.log(0.2), np.log(0.6)])
    assert "rm_scores" not in output.as_dict()  # no reward yet: as verl, no rm_scores
    output.reward_score = 1.0  # what the streaming reward does
    fields = output.as_dict()
    np.testing.assert_allclose(fields["rm_scores"].numpy(), [0.0, 0.4, 0.0, 0.0, 1.0], atol=1e-6)
    assert fields["rm_scores"].dtype == torch.float32 and "_settings" not in fields
    output.keep_outcome_only()
    np.testing.assert_allclose(output.as_dict()["rm_scores"].numpy(), [0.0, 0.0, 0.0, 0.0, 1.0])


def test_write_turn_rewards_leaves_rows_of_other_agent_loops_alone():
    probes = np.empty(2, dtype=object)
    probes[0], probes[1] = [np.log(0.5), np.log(0.25)], None
    data = DataProto.from_dict(
        tensors={"response_mask": torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]]),
                 "rm_scores": torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.7, 0.0, 0.0]])},
        non_tensors={igpo_verl.ANSWER_LOGPROB_KEY: probes},
    )
    assert write_turn_rewards(data, [1.0, 0.7], igpo_verl.IGPOSettings(ig_weight=2.0)) == [0]
    np.testing.assert_allclose(data.batch["rm_scores"].numpy(), [[-0.5, 0.0, 1.0, 0.0], [0.0, 0.7, 0.0, 0.0]])
    with pytest.raises(ValueError, match="no outcome reward"):
        write_turn_rewards(data, [None, 0.7], igpo_verl.IGPOSettings())


def test_manager_builds_the_workers_of_the_trainer_in_use(legacy, event_loop_for_verl, monkeypatch):
    """IGPOAgentLoopManager.create, as both trainers call it, with the worker actors not started."""
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import AgentLoopManager

    from igpo_rewards.integrations._verl_v1 import IGPOAgentLoopManagerTQ, IGPOAgentLoopWorkerTQ
    from igpo_rewards.integrations.verl_manager import IGPOAgentLoopManager

    async def no_actors(self):
        self.agent_loop_workers = []

    monkeypatch.setattr(AgentLoopManager, "_init_agent_loop_workers", no_actors)
    for use_v1, manager_class, worker_class in ((False, IGPOAgentLoopManager, IGPOAgentLoopWorker),
                                                (True, IGPOAgentLoopManagerTQ, IGPOAgentLoopWorkerTQ)):
        config = OmegaConf.merge(legacy.config, {"trainer": {"use_v1": use_v1}})
        assert uses_v1_trainer(config) is use_v1
        manager = IGPOAgentLoopManager.create(config=config, llm_client=None, teacher_client=None,
                                              reward_loop_worker_handles=None)
        asyncio.set_event_loop(event_loop_for_verl)  # verl's auto_await ran it with asyncio.run
        assert type(manager) is manager_class
        assert manager.agent_loop_workers_class.__ray_actor_class__ is worker_class


def test_without_igpos_manager_v1_logs_once_and_the_legacy_opt_in_warns(legacy, monkeypatch, caplog):
    """Outside IGPO's worker: under V1 (rewards reach the estimator through as_dict; a refusal would
    make verl's async modes refill the group forever) one error line per process names the key;
    under the legacy trainer the refusal becomes one warning with the opt-in."""
    import logging

    from igpo_rewards.integrations import verl_agent_loop, verl_checks

    monkeypatch.setattr(verl_checks, "_in_igpo_worker", False)
    monkeypatch.setattr(verl_agent_loop, "_warned", set())
    loop = IGPOToolAgentLoop.__new__(IGPOToolAgentLoop)
    loop.config = OmegaConf.merge(legacy.config, {"trainer": {"use_v1": True}})
    loop.igpo_settings = igpo_verl.IGPOSettings()
    with caplog.at_level(logging.WARNING, logger=verl_agent_loop.__name__):
        loop._check_manager()
        loop._check_manager()
    lines = [record.getMessage() for record in caplog.records
             if record.name == verl_agent_loop.__name__ and record.levelno == logging.ERROR]
    assert len(lines) == 1 and "agent_loop_manager_class=igpo_rewards.integrations.verl_manager.IGPOAgentLoopManager" in lines[0]
    loop.config = legacy.config
    loop.igpo_settings = igpo_verl.IGPOSettings(allow_outcome_only=True)
    with pytest.warns(igpo_verl.OutcomeOnlyWarning, match="agent_loop_manager_class is not IGPO's"):
        loop._check_manager()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loop._check_manager()  # once per process


def test_compute_score_reads_hermes_transcripts():
    response = ('<tool_call>\n{"name": "search", "arguments": {"query": "Gusti"}}\n</tool_call>user\n<tool_response>\n'
                'Doc 1(Title: "Gusti") ...\n</tool_response>\n<tool_response>\nDoc 2\n</tool_response>\nassistant\n'
                "<answer> Kivages </answer>")
    assert igpo_verl.compute_score("world", response, "Kivages<|answer_split|>Kivages town") == 1.0
    assert igpo_verl.compute_score("world", response + " more", ["Kivages"]) == -2.0  # text after the answer
    assert igpo_verl.compute_score("world", "<answer> Krupiti Vale </answer>", {"target": ["Krupiti"]}) == pytest.approx(2 / 3)


def test_search_tool_refuses_bad_config_and_arguments(setup, event_loop_for_verl):
    from igpo_rewards.integrations.verl_search import SearchTool

    with pytest.raises(ValueError, match="retrieval_url"):
        SearchTool({"type": "native"})
    with pytest.raises(ValueError, match="topk"):
        SearchTool({"type": "native", "retrieval_url": "http://127.0.0.1:1/retrieve", "topk": 0})
    tool = SearchTool({"type": "native", "retrieval_url": "http://127.0.0.1:1/retrieve"})
    with pytest.raises(ValueError, match="non-empty string 'query'"):
        event_loop_for_verl.run_until_complete(tool.execute("id", {"q": "x"}))


# ---------------------------------------------------------------------------------------------
# Deliverable 5: what the server-side probes cost, next to the actor-side packed forward
# ---------------------------------------------------------------------------------------------


def test_probe_cost_server_side_versus_actor_side(legacy, setup):
    """Tokens the probe requests prefilled per rollout against the ideal T x P, and the wall time of
    scoring the probes as the server does (one forward over context + suffix per probe) against the
    extra time of the actor-side way (igpo_rewards.agent.probes.probe_forward: the old-log-prob
    forward of the response tokens with the probes over its KV cache, minus that forward alone),
    on the same trajectories. Token counts and values are asserted; timings are reported
    (``IGPO_BENCH=full`` runs 9 interleaved rounds and writes .benchmarks/igpo/verl_probe_cost.json)."""
    from ..probe_oracle import naive_probe_logprobs

    out, probes, _ = legacy_rows(legacy)
    tokenizer, model = setup.policy.tokenizer, setup.policy.model
    paths = [trajectory(out, row) for row in range(len(out))]
    suffixes = [build_probe_suffix(tokenizer, path.answer) for path in paths]
    rows = []
    for row, (path, suffix) in enumerate(zip(paths, suffixes)):
        ideal = len(probes[row]) * len(suffix.token_ids)
        prefilled = int(out.non_tensor_batch[PROBE_TOKENS_KEY][row])
        assert prefilled == sum(start + len(suffix.token_ids) for start in path.turn_starts) > ideal
        rows.append({"turns": len(probes[row]), "probe_length": len(suffix.token_ids), "trajectory": len(path.token_ids),
                     "prefilled": prefilled, "ideal": ideal})
    # the actor-side inputs: one padded batch, the old log-probs of the response tokens
    input_ids, lengths = pad_token_ids([path.token_ids for path in paths], pad_token_id=tokenizer.pad_token_id)
    starts, _ = pad_token_ids([path.turn_starts for path in paths])
    turn_mask = torch.arange(starts.shape[1])[None, :] < torch.tensor([[len(p.turn_starts)] for p in paths])
    positions = torch.arange(input_ids.shape[1])[None, :]
    response_tokens = (positions >= torch.tensor([[p.prompt_length] for p in paths])) & (positions < lengths[:, None])
    table = suffix_table(suffixes)

    full = os.environ.get("IGPO_BENCH", "quick").strip().lower() == "full"
    ways = {
        "server_side": lambda: igpo_rewards.answer_logprob(*naive_probe_logprobs(
            model, [p.token_ids for p in paths], [p.turn_starts for p in paths], suffixes)),
        "actor_forward": lambda: token_logprobs(model, input_ids, response_tokens)[0],
        "actor_forward_with_probes": lambda: probe_forward(
            model, input_ids, lengths, starts, turn_mask, table, token_mask=response_tokens, probe_layout="kv_cache",
            pad_token_id=tokenizer.pad_token_id).answer_logprob,
    }
    timings: dict[str, list[float]] = {name: [] for name in ways}
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for _ in range(9 if full else 1):
                for name, run in ways.items():
                    started = time.perf_counter()
                    results[name] = run()
                    timings[name].append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    for name in ("server_side", "actor_forward_with_probes"):  # both ways give the agent loop's probes
        for row, values in enumerate(probes):
            np.testing.assert_allclose(values, results[name][row, : len(values)].numpy(), rtol=0, atol=PROBE_TOLERANCE)
    median = {name: float(np.median(values)) for name, values in timings.items()}
    report = {
        "rollouts": len(rows),
        "probe_tokens_prefilled_per_rollout": float(np.mean([row["prefilled"] for row in rows])),
        "ideal_probe_tokens_per_rollout": float(np.mean([row["ideal"] for row in rows])),
        "trajectory_tokens_per_rollout": float(np.mean([row["trajectory"] for row in rows])),
        "harness_server_probe_seconds": legacy.server.log.seconds["prompt_logprobs"],
        "harness_server_generate_seconds": legacy.server.log.seconds["generate"],
        "server_side_probe_seconds": median["server_side"],
        "actor_forward_seconds": median["actor_forward"],
        "actor_forward_with_probes_seconds": median["actor_forward_with_probes"],
        "actor_side_extra_seconds": median["actor_forward_with_probes"] - median["actor_forward"],
        "rounds": len(timings["server_side"]),
        "rows": rows,
    }
    print("\nverl probe cost:", json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))
    if full:
        directory = os.environ.get("IGPO_BENCH_SUMMARY", os.path.join(os.path.dirname(__file__), "..", "..", ".benchmarks", "igpo"))
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "verl_probe_cost.json"), "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)


# ---------------------------------------------------------------------------------------------
# Actor mode (algorithm.igpo.probe_mode=actor): the probes scored in the actor's old-log-prob pass
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def actor_legacy(setup, event_loop_for_verl):
    """igpo_tool_agent in actor mode through the legacy worker: probe plans in the rows, no probe requests."""
    return run_legacy(setup, event_loop_for_verl, agent_loop="igpo_tool_agent", worker_class=IGPOAgentLoopWorker,
                      probe_mode="actor")


@pytest.fixture(scope="module")
def actor_worker(setup):
    """verl's actor worker (``ActorRolloutRefWorker(role="actor")``, fsdp2, remove-padding) on CPU,
    loaded from the policy's saved weights (tests/integrations/verl_cpu_engine.py)."""
    from . import verl_cpu_engine

    with verl_cpu_engine.cpu_actor_environment():
        config = verl_cpu_engine.actor_config(setup.policy.path, remove_padding=True, micro_batch_size=4)
        yield verl_cpu_engine.actor_worker(config)


def advantages_by_trajectory(data: DataProto, uids=None) -> dict:
    """(uid, token ids) -> (rm_scores row, advantages row) over the response, for a legacy batch."""
    out = data
    uids = out.non_tensor_batch["uid"] if uids is None else uids
    table = {}
    for row in range(len(out)):
        path = trajectory(out, row)
        size = len(path.token_ids) - path.prompt_length
        table[(str(uids[row]), tuple(path.token_ids))] = (out.batch["token_level_rewards"][row, :size].numpy(),
                                                          out.batch["advantages"][row, :size].numpy())
    return table


def legacy_advantages(data: DataProto, config) -> DataProto:
    """RayPPOTrainer.fit from the reward on (extract_reward -> token_level_rewards -> compute_advantage)."""
    reward_tensor, _ = extract_reward(data)
    data.batch["token_level_scores"] = reward_tensor
    data.batch["token_level_rewards"] = reward_tensor
    algorithm = config.algorithm
    return compute_advantage(data, adv_estimator=algorithm.adv_estimator, gamma=algorithm.gamma, lam=algorithm.lam,
                             num_repeat=GROUP_SIZE, config=algorithm)


def test_actor_mode_rollouts_send_no_probe_and_carry_probe_plans(actor_legacy, legacy, setup):
    from igpo_rewards.integrations.verl_actor import ACTOR_PROBES_KEY

    out = actor_legacy.output
    assert actor_legacy.server.log.requests["prompt_logprobs"] == 0 < actor_legacy.server.log.requests["generate"]
    assert igpo_verl.ANSWER_LOGPROB_KEY not in out.non_tensor_batch and PROBE_TOKENS_KEY not in out.non_tensor_batch
    for row in range(len(out)):
        path = trajectory(out, row)
        plan = out.non_tensor_batch[ACTOR_PROBES_KEY][row]
        suffix = build_probe_suffix(setup.policy.tokenizer, path.answer)
        assert plan["turn_starts"] == path.turn_starts
        assert plan["suffix_ids"] == list(suffix.token_ids)
        assert plan["answer_span"] == [suffix.answer_start, suffix.answer_end]
        scores = out.batch["rm_scores"][row].numpy()  # verl's layout until the old-log-prob pass: R at the last token
        size = len(path.token_ids) - path.prompt_length
        assert np.flatnonzero(scores).tolist() in ([], [size - 1])
        assert scores[size - 1] == pytest.approx(float(out.non_tensor_batch["acc"][row]))
    # the same trajectories as server mode (the harness server seeds each request by its prompt)
    server = sorted(tuple(trajectory(legacy.output, row).token_ids) for row in range(len(legacy.output)))
    assert sorted(tuple(trajectory(out, row).token_ids) for row in range(len(out))) == server


def test_actor_mode_legacy_advantages_equal_server_modes(actor_legacy, legacy, actor_worker):
    """Legacy trainer: RayPPOTrainer._compute_old_log_prob (wrapped by verl_actor) runs verl's actor
    worker, whose pass scores the probes and writes the turn rewards into the reward tensor ``fit``
    took; the rewards and advantages equal server mode's on the same trajectories."""
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    out = actor_legacy.output
    batch = DataProto(batch=out.batch.clone(), non_tensor_batch=dict(out.non_tensor_batch), meta_info=dict(out.meta_info))
    batch.meta_info.update(temperature=1.0, global_token_num=batch.batch["attention_mask"].sum(-1).tolist())
    reward_tensor, _ = extract_reward(batch)
    RayPPOTrainer._compute_old_log_prob(SimpleNamespace(config=actor_legacy.config, actor_rollout_wg=actor_worker), batch)
    assert reward_tensor.data_ptr() == batch.batch["rm_scores"].data_ptr()
    actor = advantages_by_trajectory(legacy_advantages(batch, actor_legacy.config))
    server_data = DataProto(batch=legacy.output.batch.clone(), non_tensor_batch=dict(legacy.output.non_tensor_batch))
    server = advantages_by_trajectory(legacy_advantages(server_data, legacy.config))
    assert actor.keys() == server.keys()
    for key, (rewards, advantages) in actor.items():
        np.testing.assert_allclose(rewards, server[key][0], rtol=0, atol=PROBE_TOLERANCE)
        np.testing.assert_allclose(advantages, server[key][1], rtol=0, atol=PROBE_TOLERANCE)
    assert sum(np.count_nonzero(rewards) > 1 for rewards, _ in actor.values()) > 0  # information gains reached rm_scores


def test_actor_mode_v1_advantages_equal_server_modes(v1, legacy, actor_worker, setup, event_loop_for_verl):
    """V1 trainer: rows stored by verl's AgentLoopWorkerTQ in actor mode; PPOTrainer._compute_old_log_prob
    calls the actor worker with the TransferQueue batch (verl's tqbridge fetches every field and writes
    the pass's outputs back, rm_scores included); PPOTrainer._compute_advantage then gives server
    mode's advantages on the same trajectories."""
    from transfer_queue import KVBatchMeta
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.utils import tensordict_utils

    config = harness.verl_config(setup.policy, setup.tool_config, agent_loop="igpo_tool_agent", use_v1=True,
                                 n=GROUP_SIZE, probe_mode="actor")
    client = harness.local_server_client(config, make_server(setup.policy))
    worker = AgentLoopWorkerTQ.__ray_actor_class__(config, client, None, [harness.InProcessActor(RewardLoopWorker(config))])
    rows = harness.dataset_rows(setup.policy.examples)
    for row in rows:
        row["uid"] = f"actor_{row['uid']}"
    prompts = tensordict_utils.get_tensordict({key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]})
    tensordict_utils.assign_non_tensor_data(prompts, "global_steps", 1)

    async def generate():
        await worker.generate_sequences(prompts)
        while worker.background_tasks:
            await asyncio.gather(*list(worker.background_tasks))

    event_loop_for_verl.run_until_complete(generate())
    keys = [f"{row['uid']}_{session}_0" for row in rows for session in range(GROUP_SIZE)]
    tags = v1.tq.kv_list("train")["train"]
    batch = KVBatchMeta(keys=keys, partition_id="train", tags=[tags[key] for key in keys])
    trainer = SimpleNamespace(config=config, actor_rollout_wg=actor_worker)
    PPOTrainer._compute_old_log_prob(trainer, batch, {})
    PPOTrainer._compute_advantage(SimpleNamespace(config=config), batch, {})

    data = v1.tq.kv_batch_get(keys=keys, partition_id="train",
                              select_fields=["advantages", "rm_scores", "prompts", "responses", "uid"])
    server_data = DataProto(batch=legacy.output.batch.clone(), non_tensor_batch=dict(legacy.output.non_tensor_batch))
    server = advantages_by_trajectory(legacy_advantages(server_data, legacy.config))
    rm_scores = list(data["rm_scores"].unbind())
    advantages = list(data["advantages"].unbind())
    for row, (prompt, response) in enumerate(zip(data["prompts"].unbind(), data["responses"].unbind())):
        key = (str(list(data["uid"])[row]).removeprefix("actor_"), tuple(prompt.tolist() + response.tolist()))
        np.testing.assert_allclose(rm_scores[row].numpy(), server[key][0], rtol=0, atol=PROBE_TOLERANCE)
        np.testing.assert_allclose(advantages[row].numpy(), server[key][1], rtol=0, atol=PROBE_TOLERANCE)


def test_actor_mode_skips_the_probes_server_mode_skips(past_max_model_len, setup, actor_worker, event_loop_for_verl):
    """Past max_model_len, actor mode follows server mode's rule: the plans carry the limit, each row
    counts the same skipped probes, and the actor's pass (legacy trainer) gives server mode's
    rewards and advantages on the same trajectories."""
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    from igpo_rewards.integrations.verl_actor import ACTOR_PROBES_KEY

    limit, server_run = past_max_model_len.limit, past_max_model_len.run
    run = run_past_max_model_len(setup, event_loop_for_verl, limit, "actor")
    out = run.output
    assert all(plan["probe_token_limit"] == limit for plan in out.non_tensor_batch[ACTOR_PROBES_KEY])

    def skipped(data):
        return {(str(data.non_tensor_batch["uid"][row]), tuple(trajectory(data, row).token_ids)):
                int(data.non_tensor_batch["igpo_probes_skipped"][row]) for row in range(len(data))}

    assert skipped(out) == skipped(server_run.output) and sum(skipped(out).values()) >= 1
    batch = DataProto(batch=out.batch.clone(), non_tensor_batch=dict(out.non_tensor_batch), meta_info=dict(out.meta_info))
    batch.meta_info.update(temperature=1.0, global_token_num=batch.batch["attention_mask"].sum(-1).tolist())
    RayPPOTrainer._compute_old_log_prob(SimpleNamespace(config=run.config, actor_rollout_wg=actor_worker), batch)
    actor = advantages_by_trajectory(legacy_advantages(batch, run.config))
    server_out = server_run.output
    server_data = DataProto(batch=server_out.batch.clone(), non_tensor_batch=dict(server_out.non_tensor_batch))
    server = advantages_by_trajectory(legacy_advantages(server_data, server_run.config))
    assert actor.keys() == server.keys()
    for key, (rewards, advantages) in actor.items():
        np.testing.assert_allclose(rewards, server[key][0], rtol=0, atol=PROBE_TOLERANCE)
        np.testing.assert_allclose(advantages, server[key][1], rtol=0, atol=PROBE_TOLERANCE)
