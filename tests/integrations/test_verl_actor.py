"""Actor-mode probes through verl 0.9.1's real actor worker on CPU (igpo_rewards.integrations.verl_actor).

``ActorRolloutRefWorker(role="actor").compute_log_prob`` -> ``TrainingWorker.infer_batch`` -> the
probe engine (verl's ``FSDPEngineWithLMHead`` subclass, fsdp2), built from verl's Hydra config
(tests/integrations/verl_cpu_engine.py says what the CPU needs). Batches are in the legacy
trainer's layout (left-padded prompts, right-padded responses, ``rm_scores`` with the outcome at
the last token) and go through ``left_right_2_no_padding`` as ``RayPPOTrainer._compute_old_log_prob``
sends them, or through that method itself.

Expected values never come from the code under test: probes from one plain forward per probe of
the same weights loaded with transformers (tests/probe_oracle.py, what a rollout server's prompt
log-probs compute) and from the library's ``probe_forward``; server mode's ``rm_scores`` from
``assemble_igpo_rm_scores`` on those probes; advantages from verl's ``compute_advantage``.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from verl import DataProto  # noqa: E402
from verl.trainer.ppo.ray_trainer import RayPPOTrainer, compute_advantage  # noqa: E402
from verl.trainer.ppo.reward import extract_reward  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

from igpo_rewards.agent.probes import build_probe_suffix, pad_token_ids, probe_forward, suffix_table  # noqa: E402
from igpo_rewards.integrations import IGPOSettings  # noqa: E402
from igpo_rewards.integrations import verl as igpo_verl  # noqa: E402
from igpo_rewards.integrations import verl_actor  # noqa: E402
from igpo_rewards.testing.tiny import build_model, train_tokenizer  # noqa: E402

from ..probe_oracle import naive_probe_logprobs  # noqa: E402
from . import verl_cpu_engine  # noqa: E402

PROBE_TOLERANCE = 1e-4
TEXTS = ["Now there's enough information to answer", "<answer> Paris </answer> <answer> Ada Lovelace </answer>",
         "search the river Ada Lovelace was born in London"] * 8
SETTINGS = {"ig_weight": 2.0, "kind": "prob"}  # algorithm.igpo: a non-default weight shows it is read


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    tokenizer = train_tokenizer(TEXTS, vocab_size=400)
    model = build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                        max_position_embeddings=512, seed=0)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # large random weights: probes depend strongly on their context
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    path = tmp_path_factory.mktemp("verl_actor") / "model"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
    return SimpleNamespace(path=path, tokenizer=tokenizer, model=loaded)


@pytest.fixture(scope="module")
def cpu_actor():
    with verl_cpu_engine.cpu_actor_environment():
        yield


# ---------------------------------------------------------------------------------------------
# Trajectories in the legacy trainer's layout
# ---------------------------------------------------------------------------------------------

# (prompt length, [(turn tokens, observation tokens after it), ...], outcome R, uid)
SHAPES = [
    (5, [(6, 4), (5, 0)], 1.0, "q0"),
    (5, [(3, 0)], 0.0, "q0"),
    (8, [(4, 5), (3, 6), (4, 3), (2, 0)], 1.0, "q1"),
    (8, [(7, 3)], -2.0, "q1"),  # ends on an observation: R sits after the last turn
    (3, [(2, 2), (2, 0)], 0.5, "q2"),
    (3, [(5, 4), (4, 2), (3, 0)], 0.0, "q2"),
]
ANSWERS = {"q0": "Paris", "q1": "Ada Lovelace", "q2": "London"}


def trajectories(tokenizer, settings: IGPOSettings, shapes=SHAPES, seed: int = 1) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for prompt_length, turns, outcome, uid in shapes:
        prompt = torch.randint(5, len(tokenizer), (prompt_length,), generator=generator).tolist()
        response, mask, starts = [], [], []
        for generated, observation in turns:
            starts.append(len(response))
            response += torch.randint(5, len(tokenizer), (generated + observation,), generator=generator).tolist()
            mask += [1] * generated + [0] * observation
        suffix = build_probe_suffix(tokenizer, ANSWERS[uid])
        plan = verl_actor.actor_probe_plan(prompt_length=prompt_length, turn_starts=starts, suffix=suffix, settings=settings)
        rows.append(SimpleNamespace(prompt=prompt, response=response, mask=mask, outcome=outcome, uid=uid, suffix=suffix,
                                    plan=plan, starts=[prompt_length + start for start in starts]))
    return SimpleNamespace(rows=rows, settings=settings)


def legacy_batch(paths, *, with_plans: bool = True) -> DataProto:
    """What ``RayPPOTrainer.fit`` holds before the old-log-prob step (the agent-loop workers' layout)."""
    rows = paths.rows
    width_prompt, width_response = max(len(r.prompt) for r in rows), max(len(r.response) for r in rows)
    count = len(rows)
    prompts = torch.zeros((count, width_prompt), dtype=torch.long)
    responses = torch.zeros((count, width_response), dtype=torch.long)
    attention = torch.zeros((count, width_prompt + width_response), dtype=torch.long)
    response_mask = torch.zeros((count, width_response), dtype=torch.long)
    rm_scores = torch.zeros((count, width_response), dtype=torch.float32)
    for b, row in enumerate(rows):
        prompts[b, width_prompt - len(row.prompt):] = torch.tensor(row.prompt)
        responses[b, : len(row.response)] = torch.tensor(row.response)
        attention[b, width_prompt - len(row.prompt): width_prompt + len(row.response)] = 1
        response_mask[b, : len(row.mask)] = torch.tensor(row.mask)
        rm_scores[b, len(row.response) - 1] = row.outcome
    non_tensors = {"uid": np.array([row.uid for row in rows], dtype=object)}
    if with_plans:
        plans = np.empty(count, dtype=object)
        plans[:] = [row.plan for row in rows]
        non_tensors[verl_actor.ACTOR_PROBES_KEY] = plans
    batch = DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], dim=1),
                 "attention_mask": attention, "position_ids": torch.clamp(torch.cumsum(attention, 1) - 1, min=0),
                 "response_mask": response_mask, "rm_scores": rm_scores},
        non_tensors=non_tensors,
    )
    batch.meta_info.update(temperature=1.0, global_token_num=attention.sum(-1).tolist())
    return batch


def old_log_prob_input(batch: DataProto):
    """The worker's input, as ``RayPPOTrainer._compute_old_log_prob`` builds it."""
    data = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(data, calculate_entropy=True, compute_loss=False)
    return data


def expected_probes(policy, paths) -> SimpleNamespace:
    """One plain forward per probe (what a rollout server's prompt log-probs compute), and the
    library's probe_forward on the padded batch."""
    rows = paths.rows
    token_ids = [row.prompt + row.response for row in rows]
    with torch.no_grad():
        naive, naive_mask = naive_probe_logprobs(policy.model, token_ids, [row.starts for row in rows],
                                                 [row.suffix for row in rows])
        input_ids, lengths = pad_token_ids(token_ids)
        starts, counts = pad_token_ids([row.starts for row in rows])
        turn_mask = torch.arange(starts.shape[1])[None, :] < counts[:, None]
        library = probe_forward(policy.model, input_ids, lengths, starts, turn_mask, suffix_table([r.suffix for r in rows]),
                                probe_layout="kv_cache").answer_logprob
    lengths = naive_mask.sum(-1)
    server = torch.where(lengths > 0, naive.sum(-1) / lengths.clamp(min=1), 0.0)
    return SimpleNamespace(server=[server[b, : len(r.starts)].tolist() for b, r in enumerate(rows)],
                           library=[library[b, : len(r.starts)].tolist() for b, r in enumerate(rows)])


def hf_old_log_probs(policy, paths) -> torch.Tensor:
    """[B, S] log pi(response token | everything before it), a plain HF forward per row."""
    rows = paths.rows
    result = torch.zeros((len(rows), max(len(r.response) for r in rows)))
    with torch.no_grad():
        for b, row in enumerate(rows):
            ids = torch.tensor([row.prompt + row.response])
            logprobs = torch.log_softmax(policy.model(input_ids=ids).logits[0].float(), dim=-1)
            for t in range(len(row.response)):
                result[b, t] = logprobs[len(row.prompt) + t - 1, ids[0, len(row.prompt) + t]]
    return result


def server_mode_rm_scores(batch: DataProto, probes: list[list[float]], outcomes: list[float], algorithm) -> torch.Tensor:
    """``rm_scores`` as server mode writes them (``verl_manager.write_turn_rewards`` ->
    ``assemble_igpo_rm_scores``) from the server's probe log-probs."""
    column = np.empty(len(probes), dtype=object)
    column[:] = probes
    data = DataProto.from_dict(tensors={"response_mask": batch.batch["response_mask"]},
                               non_tensors={igpo_verl.ANSWER_LOGPROB_KEY: column})
    return igpo_verl.assemble_igpo_rm_scores(data, outcomes, config=algorithm)


def advantages(batch: DataProto, rm_scores: torch.Tensor, algorithm) -> torch.Tensor:
    """verl's legacy ``fit`` from the reward on: token_level_rewards -> ``compute_advantage``."""
    data = DataProto.from_dict(tensors={"response_mask": batch.batch["response_mask"], "token_level_rewards": rm_scores},
                               non_tensors={"uid": batch.non_tensor_batch["uid"]})
    return compute_advantage(data, adv_estimator="igpo", num_repeat=2, config=algorithm).batch["advantages"]


def config_for(policy, **kwargs):
    extra = tuple(f"+algorithm.igpo.{key}={value}" for key, value in SETTINGS.items()) + tuple(kwargs.pop("extra", ()))
    return verl_cpu_engine.actor_config(policy.path, extra=extra, **kwargs)


# ---------------------------------------------------------------------------------------------
# Deliverable 3: probes equal the library's kernel, in every configuration the CPU runs
# ---------------------------------------------------------------------------------------------

CONFIGS = [  # (use_remove_padding, use_dynamic_bsz, log-prob micro batch / token budget)
    pytest.param(False, False, 2, id="padded-micro2"),
    pytest.param(True, False, 3, id="rmpad-micro3"),
    pytest.param(False, True, 90, id="padded-dynbsz90"),
    pytest.param(True, True, 60, id="rmpad-dynbsz60"),
]


@pytest.mark.parametrize(("remove_padding", "dynamic_bsz", "size"), CONFIGS)
def test_actor_probes_equal_probe_forward_and_one_forward_per_probe(policy, cpu_actor, remove_padding, dynamic_bsz, size):
    config = config_for(policy, remove_padding=remove_padding, dynamic_bsz=dynamic_bsz,
                        micro_batch_size=2 if dynamic_bsz else size, max_token_len=size if dynamic_bsz else 256)
    worker = verl_cpu_engine.actor_worker(config)
    assert type(worker.actor.engine) is verl_actor.IGPOFSDPEngineWithLMHead
    paths = trajectories(policy.tokenizer, IGPOSettings(**SETTINGS))
    batch = legacy_batch(paths)
    data = old_log_prob_input(batch)
    output = worker.compute_log_prob(data)

    expected = expected_probes(policy, paths)
    got = [row.tolist() for row in tu.get(output, igpo_verl.ANSWER_LOGPROB_KEY).unbind()]
    for b in range(len(got)):
        np.testing.assert_allclose(got[b], expected.library[b], rtol=0, atol=PROBE_TOLERANCE)
        np.testing.assert_allclose(got[b], expected.server[b], rtol=0, atol=PROBE_TOLERANCE)
    # the old log-probs PPO needs are unchanged
    log_probs = no_padding_2_padding(tu.get(output, "log_probs"), data)
    mask = batch.batch["response_mask"].bool()
    torch.testing.assert_close(log_probs[mask].float(), hf_old_log_probs(policy, paths)[mask], rtol=0, atol=1e-5)
    # only the probe tokens: at most 1.1x sum_b n_b * P_b query slots (padding within a group)
    metrics = tu.get(output, "metrics")
    ideal = sum(len(row.starts) * len(row.suffix.token_ids) for row in paths.rows)
    assert total(metrics["igpo/probe_tokens"]) == ideal
    assert ideal <= total(metrics["igpo/probe_query_tokens"]) <= 1.1 * ideal


def total(values) -> int:
    """The sum of a metric verl gathered per micro-batch (and per data-parallel rank: lists of lists)."""
    return sum(total(value) for value in values) if isinstance(values, (list, tuple)) else int(values)


def test_actor_rewards_and_advantages_equal_server_modes(policy, cpu_actor):
    """The same trajectories scored both ways: ``rm_scores`` from the actor's pass, through the
    legacy trainer's own (wrapped) ``_compute_old_log_prob``, in place in the batch ``fit`` took
    its reward from, equal server mode's; so do the advantages."""
    config = config_for(policy, remove_padding=True, dynamic_bsz=False, micro_batch_size=3)
    worker = verl_cpu_engine.actor_worker(config)
    paths = trajectories(policy.tokenizer, IGPOSettings(**SETTINGS))
    batch = legacy_batch(paths)
    reward_tensor, _ = extract_reward(batch)  # RayPPOTrainer.fit takes the reward before the old-log-prob step
    trainer = SimpleNamespace(config=config, actor_rollout_wg=worker)
    old_log_prob, _ = RayPPOTrainer._compute_old_log_prob(trainer, batch)
    assert "compute_log_prob" not in vars(worker)  # the capture is undone
    assert set(old_log_prob.batch.keys()) == {"old_log_probs", "entropys"}

    expected = expected_probes(policy, paths)
    server = server_mode_rm_scores(batch, expected.server, [row.outcome for row in paths.rows], config.algorithm)
    torch.testing.assert_close(reward_tensor, server, rtol=0, atol=1e-5)
    assert reward_tensor.data_ptr() == batch.batch["rm_scores"].data_ptr()
    assert np.count_nonzero(reward_tensor[2].numpy()) == 4  # IG at three turn ends, R at the last
    torch.testing.assert_close(advantages(batch, reward_tensor, config.algorithm),
                               advantages(batch, server, config.algorithm), rtol=0, atol=1e-5)


def test_probes_past_the_token_limit_repeat_the_last_value_as_in_server_mode(policy, cpu_actor):
    """A probe longer than its plan's ``probe_token_limit`` (context + suffix; server mode skips it
    on the server's context) is not scored: it repeats the row's last scored value, -inf if none."""
    config = config_for(policy, remove_padding=True, dynamic_bsz=False, micro_batch_size=6)
    worker = verl_cpu_engine.actor_worker(config)
    paths = trajectories(policy.tokenizer, IGPOSettings(**SETTINGS))
    limits = {1: 1, 2: paths.rows[2].starts[1] + len(paths.rows[2].suffix.token_ids)}  # row 1: none fits; row 2: two of four
    for row, limit in limits.items():
        paths.rows[row].plan["probe_token_limit"] = limit
    batch = legacy_batch(paths)
    output = worker.compute_log_prob(old_log_prob_input(batch))

    server = expected_probes(policy, paths).server
    server[1] = [float("-inf")]
    server[2] = server[2][:2] + [server[2][1]] * 2
    got = [row.tolist() for row in tu.get(output, igpo_verl.ANSWER_LOGPROB_KEY).unbind()]
    for b in range(len(got)):
        np.testing.assert_allclose(got[b], server[b], rtol=0, atol=PROBE_TOLERANCE)
    assert total(tu.get(output, "metrics")["igpo/probes_skipped"]) == 3
    rm_scores = torch.stack(list(tu.get(output, "rm_scores").unbind()))
    expected = server_mode_rm_scores(batch, server, [row.outcome for row in paths.rows], config.algorithm)
    torch.testing.assert_close(rm_scores, expected, rtol=0, atol=1e-5)
    assert rm_scores[2].nonzero()[:, 0].tolist() == [3, 26]  # turn ends 3, 11, 21, 26: IG, 0, 0, then R


def test_without_probe_plans_the_engine_is_verls_own(policy, cpu_actor, monkeypatch):
    """No plan in the batch: the same outputs as verl's own engine (bit for bit), the model never
    asked for a KV cache, no extra outputs."""
    paths = trajectories(policy.tokenizer, IGPOSettings())
    config = config_for(policy, remove_padding=True, dynamic_bsz=False, micro_batch_size=2)
    worker = verl_cpu_engine.actor_worker(config)
    calls = []
    worker.actor.engine.module.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs.get("use_cache")),
                                                         with_kwargs=True)
    output = worker.compute_log_prob(old_log_prob_input(legacy_batch(paths, with_plans=False)))
    assert calls and set(calls) == {False}
    assert "rm_scores" not in output.keys() and igpo_verl.ANSWER_LOGPROB_KEY not in output.keys()

    monkeypatch.setenv("VERL_ENGINE_VENDOR", "stock")  # verl's registry falls back to its own device key
    stock = verl_cpu_engine.actor_worker(config)
    assert type(stock.actor.engine) is FSDPEngineWithLMHead
    reference = stock.compute_log_prob(old_log_prob_input(legacy_batch(paths, with_plans=False)))
    for key in ("log_probs", "entropy"):
        assert torch.equal(tu.get(output, key).values(), tu.get(reference, key).values())


def test_reference_policy_passes_score_no_probes(policy, cpu_actor):
    """The reference policy gets the same batch (V1 fetches every field): its engine is built with
    ``forward_only`` (verl's ref config), or it is the actor with its LoRA adapter disabled; it
    computes log-probs only. (verl builds a separate reference engine with FSDP2's CPU-offload
    policy, which needs an accelerator: here the actor's engine takes the reference's setting.)"""
    config = config_for(policy, remove_padding=True, dynamic_bsz=False, micro_batch_size=2)
    assert config.actor_rollout_ref.ref.fsdp_config.forward_only is True
    worker = verl_cpu_engine.actor_worker(config)
    engine = worker.actor.engine
    data = old_log_prob_input(legacy_batch(trajectories(policy.tokenizer, IGPOSettings())))
    engine.engine_config.forward_only = True
    try:
        output = worker.compute_log_prob(data)
    finally:
        engine.engine_config.forward_only = False
    assert "rm_scores" not in output.keys() and "log_probs" in output.keys()
    assert "rm_scores" in worker.compute_log_prob(data).keys()


def test_lora_actor_scores_probes_with_its_adapter_only(policy, cpu_actor):
    """With LoRA the reference policy is the actor with its adapter disabled (``no_lora_adapter``,
    verl's ref-in-actor call): no probes there; the old-log-prob call scores them."""
    config = config_for(policy, remove_padding=True, dynamic_bsz=False, micro_batch_size=2,
                        extra=("actor_rollout_ref.model.lora_rank=4", "actor_rollout_ref.model.lora_alpha=8"))
    worker = verl_cpu_engine.actor_worker(config)
    batch = legacy_batch(trajectories(policy.tokenizer, IGPOSettings()))
    reference = old_log_prob_input(batch)
    tu.assign_non_tensor(reference, no_lora_adapter=True, calculate_entropy=False)
    output = worker.compute_log_prob(reference)
    assert "rm_scores" not in output.keys() and "log_probs" in output.keys()
    assert not worker.actor.engine._igpo_adapter_disabled
    assert "rm_scores" in worker.compute_log_prob(old_log_prob_input(batch)).keys()


# ---------------------------------------------------------------------------------------------
# Deliverable 2: what is refused, and why
# ---------------------------------------------------------------------------------------------


def test_batches_the_actor_cannot_reward_are_refused(policy, cpu_actor):
    config = config_for(policy, remove_padding=False, dynamic_bsz=False, micro_batch_size=6)
    worker = verl_cpu_engine.actor_worker(config)
    paths = trajectories(policy.tokenizer, IGPOSettings())

    already = legacy_batch(paths)
    already.batch["rm_scores"][0, 3] = 0.25  # a reward before the last turn's end
    with pytest.raises(ValueError, match=r"rm_scores row 0 holds rewards at tokens \[3\], before its last turn ends"):
        worker.compute_log_prob(old_log_prob_input(already))

    mixed = legacy_batch(paths)
    mixed.non_tensor_batch[verl_actor.ACTOR_PROBES_KEY][1] = None  # a row of another agent loop
    with pytest.raises(ValueError, match=r"rows \[1\] of the old-log-prob batch carry no igpo_actor_probes"):
        worker.compute_log_prob(old_log_prob_input(mixed))

    wrong = legacy_batch(paths)
    wrong.non_tensor_batch[verl_actor.ACTOR_PROBES_KEY][2] = {**paths.rows[2].plan, "turn_starts": paths.rows[2].starts[:2]}
    with pytest.raises(ValueError, match=r"rows \[2\] have \[4\] turns \(runs of 1s in response_mask\) but \[2\] probe starts"):
        worker.compute_log_prob(old_log_prob_input(wrong))

    no_reward = legacy_batch(paths)
    no_reward.batch.pop("rm_scores")
    with pytest.raises(ValueError, match="carries igpo_actor_probes but no rm_scores"):
        worker.compute_log_prob(old_log_prob_input(no_reward))

    fused = old_log_prob_input(legacy_batch(paths))
    tu.assign_non_tensor(fused, use_fused_kernels=True)
    with pytest.raises(ValueError, match="use_fused_kernels=True with actor-mode probes"):
        worker.compute_log_prob(fused)

    worker.actor.engine.ulysses_sequence_parallel_size = 2  # what verl sets from fsdp_config (needs 2+ GPUs)
    with pytest.raises(ValueError, match="ulysses_sequence_parallel_size=2 with actor-mode probes"):
        worker.compute_log_prob(old_log_prob_input(legacy_batch(paths)))


def test_legacy_step_refuses_a_batch_the_stock_engine_left_unscored(policy, cpu_actor, monkeypatch):
    monkeypatch.setenv("VERL_ENGINE_VENDOR", "stock")
    config = config_for(policy, remove_padding=True, dynamic_bsz=False, micro_batch_size=2)
    worker = verl_cpu_engine.actor_worker(config)
    batch = legacy_batch(trajectories(policy.tokenizer, IGPOSettings()))
    with pytest.raises(RuntimeError, match="the actor engine is verl's own, not IGPO's"):
        RayPPOTrainer._compute_old_log_prob(SimpleNamespace(config=config, actor_rollout_wg=worker), batch)


def _mode_config(policy, *extra):
    return verl_cpu_engine.actor_config(policy.path, extra=tuple(extra))


@pytest.mark.parametrize(("override", "reason"), [
    ("actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2",
     "ulysses_sequence_parallel_size=2: Ulysses sequence parallelism splits every trajectory's tokens"),
    ("actor_rollout_ref.model.use_fused_kernels=True", "use_fused_kernels=True: the fused kernels return log-probs"),
    ("algorithm.rollout_correction.bypass_mode=True", "bypass_mode=True: verl skips the old-log-prob pass"),
    ("actor_rollout_ref.actor.strategy=megatron", "strategy='megatron': the probe engine is verl's FSDP engine"),
])
def test_probe_mode_is_actor_where_supported_and_refused_with_the_reason(policy, caplog, monkeypatch, override, reason):
    monkeypatch.setattr(verl_actor, "_logged", set())  # the warning is given once per process
    assert verl_actor.probe_mode_from_config(_mode_config(policy)) == "actor"
    assert verl_actor.probe_mode_from_config(_mode_config(policy, "+algorithm.igpo.probe_mode=server")) == "server"
    with pytest.raises(ValueError, match=rf"algorithm.igpo.probe_mode=actor cannot run here: .*{reason}"):
        verl_actor.probe_mode_from_config(_mode_config(policy, override, "+algorithm.igpo.probe_mode=actor"))
    with caplog.at_level(logging.WARNING, logger=verl_actor.MODULE_NAME):
        assert verl_actor.probe_mode_from_config(_mode_config(policy, override)) == "server"
    (record,) = [r for r in caplog.records if "scores its probes on the rollout server (server mode), because" in r.message]
    assert reason in record.message


def test_probe_mode_refuses_other_verl_releases_plugins_and_platforms(policy, monkeypatch):
    import verl

    explicit = _mode_config(policy, "+algorithm.igpo.probe_mode=actor")
    with pytest.raises(ValueError, match="must be one of \\['actor', 'server'\\] or unset, got 'gpu'"):
        verl_actor.probe_mode_from_config(_mode_config(policy, "+algorithm.igpo.probe_mode=gpu"))
    monkeypatch.setattr(verl, "__version__", "0.9.2")
    with pytest.raises(ValueError, match=r"verl 0.9.2 is installed: .* written against verl 0.9.1"):
        verl_actor.probe_mode_from_config(explicit)
    monkeypatch.undo()
    monkeypatch.setenv("VERL_USE_EXTERNAL_PLUGINS", "igpo,igpo_tool_agent")
    with pytest.raises(ValueError, match="VERL_USE_EXTERNAL_PLUGINS='igpo,igpo_tool_agent' excludes the 'igpo_actor' plugin"):
        verl_actor.probe_mode_from_config(explicit)
    monkeypatch.delenv("VERL_USE_EXTERNAL_PLUGINS")
    monkeypatch.setenv("VERL_ENGINE_VENDOR", "amd")  # e.g. ROCm: verl's registry builds its own engine
    with pytest.raises(ValueError, match="registry builds FSDPEngineWithLMHead on this platform"):
        verl_actor.probe_mode_from_config(explicit)


def test_settings_ignore_the_verl_side_probe_mode_key(policy):
    config = _mode_config(policy, "+algorithm.igpo.probe_mode=server", "+algorithm.igpo.ig_weight=0.5")
    assert igpo_verl.settings_from_config(config.algorithm) == IGPOSettings(ig_weight=0.5)


def test_the_legacy_hook_is_installed_on_verl_091_only(monkeypatch):
    import verl

    wrapped = RayPPOTrainer._compute_old_log_prob
    assert wrapped._igpo_wrapped and verl.__version__ == verl_actor.SUPPORTED_VERL_VERSION
    monkeypatch.setattr(RayPPOTrainer, "_compute_old_log_prob", wrapped.__wrapped__)
    monkeypatch.setattr(verl, "__version__", "0.10.0")
    assert verl_actor.patch_legacy_old_log_prob() is False
    assert RayPPOTrainer._compute_old_log_prob is wrapped.__wrapped__
    monkeypatch.setattr(verl, "__version__", verl_actor.SUPPORTED_VERL_VERSION)
    assert verl_actor.patch_legacy_old_log_prob() is True and RayPPOTrainer._compute_old_log_prob._igpo_wrapped


def test_engine_registration_is_idempotent_and_takes_the_nvidia_key():
    from verl.workers.engine import EngineRegistry

    verl_actor.register()
    registry = EngineRegistry._engines["language_model"]
    assert registry["fsdp2"][("cuda", "nvidia")] is verl_actor.IGPOFSDPEngineWithLMHead
    assert registry["fsdp"][("cuda", "nvidia")] is verl_actor.IGPOFSDPEngineWithLMHead
    assert registry["fsdp2"]["cuda"] is FSDPEngineWithLMHead  # verl's own stays for other vendors


def test_actor_turn_rewards_by_hand():
    """Two turns, m = log 0.2 then log 0.6, R = 1 at the last token after an observation; ig_weight 2."""
    rows = verl_actor.actor_turn_rewards(
        torch.log(torch.tensor([[0.2, 0.6]])), torch.tensor([[True, True]]),
        [torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])], [torch.tensor([1, 1, 0, 1, 1, 0])], IGPOSettings(ig_weight=2.0))
    torch.testing.assert_close(rows[0], torch.tensor([0.0, 0.8, 0.0, 0.0, 1.0, 0.0]))
