"""IGPO as verl's advantage estimator "igpo" (igpo_rewards.integrations.verl), against verl itself.

verl's CPU-importable parts are installed by scripts/setup.sh (verl with --no-deps plus the
``verl-cpu`` extra). The batches are built by hand in verl's layout: each row is a list of
segments (generated tokens, observation tokens, padding), so the turn of every token and the
last token of every turn are known without the library; expected values come from the float64
loop oracle (igpo_rewards.testing.reference) on those hand-placed turn rewards.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import igpo_rewards
from igpo_rewards.integrations import IGPOSettings
from igpo_rewards.integrations import verl as igpo_verl
from igpo_rewards.testing import reference

from verl import DataProto
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.ray_trainer import apply_kl_penalty, compute_advantage

GEN, OBS, PAD = "gen", "obs", "pad"
SEQ_LEN = 14

# Seven rollouts of three questions, groups interleaved. Per row: (uid, segments, turn rewards).
# Row 0 has an exact-zero information gain, row 1 an outcome of exactly 0, row 4 ends on an
# observation (its outcome sits on the last observation token, where verl's reward managers put
# it), and the "q9" group has identical rewards everywhere (advantages exactly 0).
ROWS = [
    ("q7", [(GEN, 3), (OBS, 2), (GEN, 2), (OBS, 2), (GEN, 3), (PAD, 2)], [0.30, 0.0, 1.0]),
    ("q7", [(GEN, 4), (OBS, 3), (GEN, 4), (PAD, 3)], [-0.20, 0.0]),
    ("q2", [(GEN, 5), (PAD, 9)], [1.0]),
    ("q7", [(GEN, 2), (OBS, 2), (GEN, 2), (OBS, 2), (GEN, 2), (OBS, 2), (GEN, 2)], [0.10, 0.25, -0.05, 0.5]),
    ("q2", [(GEN, 2), (OBS, 3), (GEN, 2), (OBS, 3), (PAD, 4)], [0.40, -2.0]),
    ("q9", [(GEN, 3), (OBS, 2), (GEN, 3), (PAD, 6)], [0.0, 0.0]),
    ("q9", [(GEN, 6), (PAD, 8)], [0.0]),
]
MAX_TURNS = 4


def layout(segments):
    """Response mask, turn of every token (-1: none), last token of every turn, last non-pad token."""
    mask, turn_of_token, turn_ends = [], [], []
    turn = -1
    for kind, length in segments:
        if kind == GEN:
            turn += 1
            turn_ends.append(len(mask) + length - 1)
        mask += [1 if kind == GEN else 0] * length
        turn_of_token += [turn if kind == GEN else -1] * length
    last_filled = sum(length for kind, length in segments if kind != PAD) - 1
    assert len(mask) == SEQ_LEN
    return mask, turn_of_token, turn_ends, last_filled


def build_batch():
    """(uids, response_mask [B,S], token_level_scores [B,S], turn_rewards [B,T], turn_mask [B,T], turn_of_token)."""
    uids, masks, scores, rewards, turn_mask, turn_of_token = [], [], [], [], [], []
    for uid, segments, row_rewards in ROWS:
        mask, token_turns, ends, last_filled = layout(segments)
        row_scores = [0.0] * SEQ_LEN
        for turn, end in enumerate(ends[:-1]):
            row_scores[end] = row_rewards[turn]
        # the outcome at the last non-padding token (an observation token for row 4)
        row_scores[last_filled] = row_rewards[-1]
        uids.append(uid)
        masks.append(mask)
        scores.append(row_scores)
        rewards.append(row_rewards + [0.0] * (MAX_TURNS - len(row_rewards)))
        turn_mask.append([True] * len(row_rewards) + [False] * (MAX_TURNS - len(row_rewards)))
        turn_of_token.append(token_turns)
    return (
        np.array(uids, dtype=object),
        torch.tensor(masks, dtype=torch.int64),
        torch.tensor(scores, dtype=torch.float32),
        np.array(rewards),
        np.array(turn_mask),
        np.array(turn_of_token),
    )


def to_tokens(turn_values, turn_of_token):
    """out[b, s] = turn_values[b, turn_of_token[b, s]], 0 where the token belongs to no turn."""
    out = np.zeros(turn_of_token.shape)
    for b, s in np.argwhere(turn_of_token >= 0):
        out[b, s] = turn_values[b, turn_of_token[b, s]]
    return out


def oracle_token_advantages(turn_rewards, turn_mask, uids, turn_of_token, settings: IGPOSettings):
    normalized = reference.group_normalize(turn_rewards, turn_mask, uids, **settings.normalization_kwargs())
    return to_tokens(reference.discounted_returns(normalized, turn_mask, gamma=settings.gamma), turn_of_token)


def algorithm_config(igpo=None, **overrides):
    values = {"adv_estimator": "igpo", "gamma": 1.0, "lam": 1.0, "use_kl_in_reward": False}
    values.update(overrides)
    if igpo is not None:
        values["igpo"] = igpo
    return OmegaConf.create(values)


def make_data(uids, response_mask, token_level_rewards, **extra_tensors):
    tensors = {"response_mask": response_mask, "token_level_rewards": token_level_rewards, **extra_tensors}
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": uids})


def run_verl(data, config):
    """verl's own compute_advantage, as its trainers call it (adv_estimator from the config)."""
    return compute_advantage(
        data, adv_estimator=config.adv_estimator, gamma=config.gamma, lam=config.lam, num_repeat=4, config=config
    )


def test_the_verl_pins_job_installs_verls_own_requirements():
    """constraints-verl-pins.txt pins verl and a transformers verl's metadata allows; the verl-pins
    job (scripts/test_verl_pins.sh, which sets IGPO_EXPECT_*) imports exactly those."""
    import importlib.metadata

    import transformers
    from packaging.requirements import Requirement

    import verl

    text = (Path(__file__).resolve().parents[2] / "constraints-verl-pins.txt").read_text(encoding="utf-8")
    pins = dict(re.findall(r"^([\w-]+)==([\w.]+)$", text, flags=re.M))
    assert set(pins) == {"verl", "transformers"} and pins["verl"] == importlib.metadata.version("verl")
    (allowed,) = [Requirement(line) for line in importlib.metadata.requires("verl")
                  if Requirement(line).name == "transformers" and Requirement(line).marker is None]
    assert pins["transformers"] in allowed.specifier, (pins["transformers"], str(allowed.specifier))
    expected_verl, expected_transformers = os.environ.get("IGPO_EXPECT_VERL"), os.environ.get("IGPO_EXPECT_TRANSFORMERS")
    if expected_verl is not None:  # the verl-pins job
        assert verl.__version__ == expected_verl == pins["verl"]
        assert transformers.__version__ == expected_transformers == pins["transformers"]


def test_import_verl_registers_igpo_through_the_entry_point():
    code = (
        "import sys, verl\n"
        "from verl.trainer.ppo.core_algos import get_adv_estimator_fn\n"
        "from verl.experimental.agent_loop.agent_loop import _agent_loop_registry\n"
        "fn = get_adv_estimator_fn('igpo')\n"
        "print(fn.__module__, fn.__name__, 'igpo_rewards.integrations.verl' in sys.modules)\n"
        "print(_agent_loop_registry['igpo_tool_agent']['_target_'])\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("VERL_USE_EXTERNAL")}
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "igpo_rewards.integrations.verl", "compute_igpo_advantage", "True",
        "igpo_rewards.integrations.verl_agent_loop.IGPOToolAgentLoop",
    ]


def test_any_verl_module_of_igpo_rewards_imported_first_leaves_every_plugin_registered():
    """Importing one of these modules first makes verl load its plugins (import verl), which import
    the others: no import cycle may leave a plugin half-loaded (verl would log it at debug level).
    The three plugins: the estimator, the agent loop and the actor's probe engine."""
    modules = ["verl_checks", "verl_manager", "verl_agent_loop", "_verl_v1", "verl_search", "verl_actor"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("VERL_USE_EXTERNAL")}
    code = ("import importlib, sys; importlib.import_module('igpo_rewards.integrations.' + sys.argv[1]); "
            "from igpo_rewards.integrations.verl import check_agent_loop_registered, check_registered; "
            "check_registered(); check_agent_loop_registered(); "
            "from verl.workers.engine import EngineRegistry; "
            "engine = EngineRegistry._engines['language_model']['fsdp2'][('cuda', 'nvidia')]; "
            "assert engine.__name__ == 'IGPOFSDPEngineWithLMHead', engine")
    processes = {module: subprocess.Popen([sys.executable, "-W", "ignore", "-c", code, module], env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) for module in modules}
    failed = {module: process.communicate(timeout=600)[1][-1500:] for module, process in processes.items()}
    assert all(processes[module].returncode == 0 for module in modules), {
        module: error for module, error in failed.items() if processes[module].returncode}


def test_start_up_check_says_why_igpo_is_missing_when_plugins_are_disabled():
    env = dict(os.environ, VERL_USE_EXTERNAL_PLUGINS="none")
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "igpo_rewards.integrations.verl"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 1
    assert "advantage estimator 'igpo' is not registered" in result.stderr
    assert "agent loop 'igpo_tool_agent' is not registered" in result.stderr
    assert result.stderr.count("VERL_USE_EXTERNAL_PLUGINS='none'") == 2


def test_registry_holds_the_igpo_estimator():
    assert core_algos.get_adv_estimator_fn("igpo") is igpo_verl.compute_igpo_advantage
    igpo_verl.register()  # idempotent
    igpo_verl.check_registered()
    igpo_verl.check_agent_loop_registered()


@pytest.mark.parametrize(
    "igpo",
    [None, {"gamma": 0.9, "mode": "separate", "weighting": "trajectory"}, {"scale": "none", "ddof": 1}],
    ids=["paper-defaults", "separate-trajectory-discounted", "mean-only-ddof1"],
)
def test_verl_compute_advantage_matches_igpo_rewards(igpo):
    uids, response_mask, scores, turn_rewards, turn_mask, turn_of_token = build_batch()
    config = algorithm_config(igpo)
    data = run_verl(make_data(uids, response_mask, scores.clone()), config)
    settings = IGPOSettings.from_mapping(igpo)

    advantages = data.batch["advantages"]
    assert advantages.dtype == torch.float32 and advantages.shape == (len(ROWS), SEQ_LEN)
    assert torch.equal(data.batch["returns"], advantages)
    expected = oracle_token_advantages(turn_rewards, turn_mask, uids, turn_of_token, settings)
    np.testing.assert_allclose(advantages.numpy(), expected, rtol=1e-5, atol=1e-6)
    # bit-for-bit the library's own result on the same tensors
    library = settings.advantages_from_token_rewards(scores, response_mask, torch.tensor([0, 0, 1, 0, 1, 2, 2]))
    assert torch.equal(advantages, library)
    # the all-equal group gets exactly 0, and nothing leaks onto observation/padding tokens
    assert torch.count_nonzero(advantages[5:]) == 0
    assert torch.count_nonzero(advantages[response_mask == 0]) == 0


def test_the_pool_and_accumulation_variants_reach_verls_estimator():
    """algorithm.igpo.mode=turn_index, accumulation=sqrt_n and ig_advantage_scale go through verl's own
    compute_advantage to igpo_rewards.advantages_from_token_rewards (checked against the float64 oracle)."""
    uids, response_mask, scores, _, _, _ = build_batch()
    igpo = {"mode": "turn_index", "accumulation": "sqrt_n", "ig_advantage_scale": 0.3, "gamma": 0.9}
    data = run_verl(make_data(uids, response_mask, scores.clone()), algorithm_config(igpo))
    expected = reference.advantages_from_token_rewards(scores.numpy(), response_mask.numpy(), list(uids), **igpo)
    np.testing.assert_allclose(data.batch["advantages"].numpy(), expected, rtol=1e-5, atol=1e-6)
    paper = run_verl(make_data(uids, response_mask, scores.clone()), algorithm_config())
    assert not torch.allclose(paper.batch["advantages"], data.batch["advantages"])


def test_sub_goal_targets_are_refused_until_the_actors_probe_pass_scores_them():
    with pytest.raises(ValueError, match=r"algorithm.igpo.subgoal_weight = 0.5: sub-goal targets are not available in "
                                         r"verl yet.*K targets in the actor's probe pass"):
        igpo_verl.settings_from_config(algorithm_config({"subgoal_weight": 0.5}))
    uids, response_mask, scores, _, _, _ = build_batch()
    with pytest.raises(ValueError, match="subgoal_weight"):
        run_verl(make_data(uids, response_mask, scores.clone()), algorithm_config({"subgoal_weight": 1.0}))
    with pytest.raises(ValueError, match="subgoal_weight"):
        igpo_verl.igpo_token_scores(np.log([[0.2, 0.5]]), [1.0], [[1, 0, 1]], config=IGPOSettings(subgoal_weight=1.0))


def test_kl_in_reward_is_refused_instead_of_dropped():
    """verl's use_kl_in_reward puts a KL penalty on every generated token; IGPO reads a turn's reward
    at its last token, so the rest would be lost: refused by config, and by the token layout itself."""
    uids, response_mask, scores, _, _, _ = build_batch()
    generator = torch.Generator().manual_seed(0)
    old_log_probs = -torch.rand(response_mask.shape, generator=generator) - 0.1
    ref_log_prob = -torch.rand(response_mask.shape, generator=generator) - 0.1
    data = DataProto.from_dict(
        tensors={
            "response_mask": response_mask,
            "token_level_scores": scores.clone(),
            "old_log_probs": old_log_probs,
            "ref_log_prob": ref_log_prob,
        },
        non_tensors={"uid": uids},
    )
    data, _ = apply_kl_penalty(data, core_algos.FixedKLController(0.05), kl_penalty="kl")
    rewards = data.batch["token_level_rewards"]
    assert torch.all(rewards[response_mask == 1] != 0)  # every generated token carries a reward
    with pytest.raises(ValueError, match=r"algorithm\.use_kl_in_reward is True: .*use_kl_loss=True"):
        run_verl(data, algorithm_config(use_kl_in_reward=True))
    with pytest.raises(ValueError, match=r"nonzero rewards on generated tokens before the last token of their turn.*"
                                         r"use_kl_in_reward"):
        run_verl(data, algorithm_config(use_kl_in_reward=False))


def test_rm_scores_from_probes_then_verl_advantages_equal_igpo_advantages():
    uids, response_mask, _, _, turn_mask, turn_of_token = build_batch()
    turns_per_row = turn_mask.sum(axis=1)
    rng = np.random.default_rng(3)
    answer_logprob = np.where(turn_mask, np.log(rng.uniform(0.01, 0.99, size=turn_mask.shape)), 0.0)
    answer_logprob[0, 2] = answer_logprob[0, 1]  # an exact-zero information gain
    outcome = np.array([1.0, 0.0, 0.5, 1.0, -2.0, 0.0, 0.0])
    probes = np.empty(len(ROWS), dtype=object)
    for row, count in enumerate(turns_per_row):
        probes[row] = [float(value) for value in answer_logprob[row, :count]]  # what an agent loop stores
    data = DataProto.from_dict(
        tensors={"response_mask": response_mask},
        non_tensors={"uid": uids, igpo_verl.ANSWER_LOGPROB_KEY: probes},
    )

    rm_scores = igpo_verl.assemble_igpo_rm_scores(data, outcome.tolist())

    expected_turn_rewards = reference.turn_rewards(answer_logprob, outcome, turn_mask)
    expected_scores = np.zeros((len(ROWS), SEQ_LEN))
    for b, (_, segments, _) in enumerate(ROWS):
        _, _, ends, _ = layout(segments)
        for turn, end in enumerate(ends):
            expected_scores[b, end] = expected_turn_rewards[b, turn]
    assert rm_scores.dtype == torch.float32
    np.testing.assert_allclose(rm_scores.numpy(), expected_scores, rtol=1e-6, atol=1e-6)

    data = run_verl(make_data(uids, response_mask, rm_scores), algorithm_config())
    expected = to_tokens(reference.igpo_advantages(answer_logprob, outcome, turn_mask, uids).advantages, turn_of_token)
    np.testing.assert_allclose(data.batch["advantages"].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_token_scores_take_kind_and_weights_from_the_config():
    answer_logprob = np.log([[0.2, 0.5, 0.4]])
    mask = [[1, 1, 0, 1, 0, 0, 1, 1, 0]]
    config = algorithm_config({"kind": "log_prob", "ig_weight": 0.5, "outcome_weight": 2.0})
    scores = igpo_verl.igpo_token_scores(answer_logprob, [0.75], mask, config=config)
    expected = np.zeros((1, 9))
    expected[0, 1] = 0.5 * (np.log(0.5) - np.log(0.2))
    expected[0, 3] = 0.5 * (np.log(0.4) - np.log(0.5))
    expected[0, 7] = 2.0 * 0.75
    np.testing.assert_allclose(scores, expected, rtol=1e-12)


def test_group_ids_from_uids_numbers_groups_by_first_appearance():
    ids = igpo_verl.group_ids_from_uids(np.array(["x", "y", "x", 7, "z", 7], dtype=object))
    assert ids.dtype == torch.int64 and ids.tolist() == [0, 1, 0, 2, 3, 2]


def test_bad_inputs_fail_loudly():
    uids, response_mask, scores, *_ = build_batch()
    with pytest.raises(ValueError, match="uid"):
        igpo_verl.compute_igpo_advantage(scores, response_mask, index=None, config=algorithm_config())
    with pytest.raises(ValueError, match=r"algorithm\.igpo.*unknown key\(s\) \['gama'\]"):
        igpo_verl.compute_igpo_advantage(scores, response_mask, index=uids, config=algorithm_config({"gama": 0.5}))
    with pytest.raises(ValueError, match="mode must be one of"):
        igpo_verl.compute_igpo_advantage(scores, response_mask, index=uids, config=algorithm_config({"mode": "pooled"}))
    with pytest.raises(ValueError, match="one entry per row"):
        igpo_verl.compute_igpo_advantage(scores, response_mask, index=uids[:3], config=None)
    with pytest.raises(ValueError, match=r"rows \[0\] have \[3\] values in .igpo_answer_logprob. but \[2\] turns"):
        probes = np.empty(1, dtype=object)
        probes[0] = [-1.0, -0.5, -0.2]
        data = DataProto.from_dict(
            tensors={"response_mask": torch.tensor([[1, 0, 1, 0]])}, non_tensors={igpo_verl.ANSWER_LOGPROB_KEY: probes}
        )
        igpo_verl.assemble_igpo_rm_scores(data, [1.0])
    with pytest.raises(ValueError, match=r"non_tensor_batch has no 'igpo_answer_logprob' column.*extra_fields"):
        data = DataProto.from_dict(tensors={"response_mask": torch.tensor([[1, 0]])}, non_tensors={"uid": uids[:1]})
        igpo_verl.assemble_igpo_rm_scores(data, [1.0])


def test_check_registered_explains_each_failure(monkeypatch):
    import importlib.metadata

    registry = core_algos.ADV_ESTIMATOR_REGISTRY
    monkeypatch.delitem(registry, "igpo")
    monkeypatch.delenv("VERL_USE_EXTERNAL_PLUGINS", raising=False)

    broken = importlib.metadata.EntryPoint(name="igpo", value="igpo_rewards_no_such_module", group="verl.plugins")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [broken])
    with pytest.raises(RuntimeError, match="ModuleNotFoundError.*igpo_rewards_no_such_module"):
        igpo_verl.check_registered()

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [])
    with pytest.raises(RuntimeError, match="no 'verl.plugins' entry point named 'igpo'"):
        igpo_verl.check_registered()

    monkeypatch.setitem(registry, "igpo", core_algos.get_adv_estimator_fn("grpo_passk"))
    with pytest.raises(RuntimeError, match="not IGPO's"):
        igpo_verl.check_registered()


def test_check_agent_loop_registered_explains_each_failure(monkeypatch):
    import importlib.metadata

    from verl.experimental.agent_loop import agent_loop

    monkeypatch.delitem(agent_loop._agent_loop_registry, "igpo_tool_agent")
    monkeypatch.delenv("VERL_USE_EXTERNAL_PLUGINS", raising=False)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [])
    with pytest.raises(RuntimeError, match="no 'verl.plugins' entry point named 'igpo_tool_agent'"):
        igpo_verl.check_agent_loop_registered()
    monkeypatch.setitem(agent_loop._agent_loop_registry, "igpo_tool_agent", {"_target_": "somewhere.Else"})
    with pytest.raises(RuntimeError, match="'somewhere.Else', not IGPO's"):
        igpo_verl.check_agent_loop_registered()


DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "integrations", "verl.md")


def doc_blocks(language):
    with open(DOC, encoding="utf-8") as handle:
        return re.findall(rf"```{language}\n(.*?)```", handle.read(), flags=re.S)


def test_doc_search_tool_config_builds_the_search_tool(tmp_path):
    from verl.tools.tool_registry import initialize_tools_from_config

    from igpo_rewards.integrations.verl_search import SearchTool

    config = doc_blocks("yaml")[0]
    path = tmp_path / "search_tool.yaml"
    path.write_text(config)
    (tool,) = initialize_tools_from_config(str(path))  # what verl's agent-loop workers call
    assert isinstance(tool, SearchTool) and tool.name == "search" and tool.topk == 3
    assert tool.retriever.url == "http://127.0.0.1:8000/retrieve"
    assert tool.tool_schema.function.parameters.required == ["query"]


def compose_verl_config(arguments):
    """verl's ppo_trainer config composed by Hydra from verl's own config directory, as
    ``verl.trainer.main_ppo`` (``@hydra.main(config_path="config", config_name="ppo_trainer")``) does."""
    from hydra import compose, initialize_config_dir

    import verl

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(arguments))


def main_ppo_commands():
    """Every ``python -m verl.trainer.main_ppo`` command in the page's bash blocks, as its overrides,
    once per trainer: as written (V1 unless it sets trainer.use_v1), then with trainer.use_v1=False;
    the V1 commands also in the async modes the page says they run in (trainer.v1.trainer_mode)."""
    commands = []
    for number, command in enumerate(command for block in doc_blocks("bash")
                                     for command in re.split(r"\n(?=\S)", block.replace("\\\n", " "))
                                     if "verl.trainer.main_ppo" in command):
        arguments = command.split("verl.trainer.main_ppo", 1)[1].split()
        if not any(argument.startswith("trainer.use_v1=") for argument in arguments):
            commands.append(pytest.param(arguments, id=f"command{number}-v1"))
            for mode in ("colocate_async", "separate_async"):
                commands.append(pytest.param([*arguments, f"trainer.v1.trainer_mode={mode}"], id=f"command{number}-{mode}"))
            arguments = [*arguments, "trainer.use_v1=False"]
        commands.append(pytest.param(arguments, id=f"command{number}-legacy"))
    return commands


def validate_as_main_ppo(config):
    """What ``verl.trainer.main_ppo.main`` runs before it starts Ray (its lines after @hydra.main)."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))


def test_the_page_has_main_ppo_commands_for_both_trainers():
    ids = [param.id for param in main_ppo_commands()]
    assert ids and any(i.endswith("-v1") for i in ids) and any(i.endswith("-legacy") for i in ids), ids


@pytest.mark.parametrize("arguments", main_ppo_commands())
def test_every_main_ppo_command_on_the_page_passes_verls_validate_config(arguments):
    """The page's commands, composed with verl 0.9.1's own Hydra config and validated exactly as
    main_ppo does before any rollout (verl's validate_config, called with main_ppo's arguments);
    then IGPO's own start-up checks, which IGPOAgentLoopManager.create runs in the trainer."""
    from igpo_rewards.integrations.verl_checks import check_config

    config = compose_verl_config(arguments)
    validate_as_main_ppo(config)
    assert check_config(config) == []


def test_the_commands_without_micro_batch_settings_fail_verls_validate_config():
    """What the page's command lacked: the check above is verl's, not a formality."""
    (arguments, *_), *_ = [param.values for param in main_ppo_commands()]
    arguments = [argument for argument in arguments if "use_dynamic_bsz" not in argument]
    with pytest.raises(Exception, match="ppo_micro_batch_size"):
        validate_as_main_ppo(compose_verl_config(arguments))


def test_every_yaml_block_on_the_page_is_a_tool_config_verl_builds(tmp_path):
    """The page's YAML blocks are tool configs (what actor_rollout_ref.rollout.multi_turn.tool_config_path
    names); verl's initialize_tools_from_config builds each (a trainer config in YAML would need
    validate_config like the commands above)."""
    from verl.tools.tool_registry import initialize_tools_from_config

    blocks = doc_blocks("yaml")
    assert blocks
    for index, block in enumerate(blocks):
        assert OmegaConf.create(block).keys() == {"tools"}, f"YAML block {index} is not a tool config"
        path = tmp_path / f"tools{index}.yaml"
        path.write_text(block)
        assert initialize_tools_from_config(str(path))


def test_main_ppo_itself_validates_the_pages_command(tmp_path):
    """verl.trainer.main_ppo.main as shipped (hydra.main, auto_set_device, validate_config) on the
    page's first command, in a fresh process, stopped where it would start Ray (run_ppo); for
    both trainers."""
    by_id = {param.id: param.values[0] for param in main_ppo_commands()}
    v1, legacy = by_id["command0-v1"], by_id["command0-legacy"]
    script = (
        "import sys\n"
        "import verl.trainer.main_ppo as main_ppo\n"
        "main_ppo.run_ppo = lambda config, task_runner_class: print('VALIDATED', config.trainer.use_v1, "
        "task_runner_class.__name__ if hasattr(task_runner_class, '__name__') else type(task_runner_class).__name__)\n"
        "sys.argv = ['main_ppo', *sys.argv[1:]]\n"
        "main_ppo.main()\n"
    )
    for arguments, expected in ((v1, "VALIDATED True"), (legacy, "VALIDATED False")):
        result = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", script, *arguments, f"hydra.run.dir={tmp_path}", "hydra.output_subdir=null"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert expected in result.stdout, result.stdout[-2000:]


def test_doc_command_names_loadable_pieces(tmp_path):
    """Every class, module and setting the page's command names loads, and composes to what the page says."""
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.import_utils import load_class_from_fqn, load_extern_object

    from igpo_rewards.integrations.verl_manager import IGPOAgentLoopManager, IGPOReplayBuffer

    arguments = main_ppo_commands()[0].values[0]
    config = compose_verl_config(arguments)
    rollout = config.actor_rollout_ref.rollout
    assert config.trainer.use_v1 is True  # verl 0.9's default trainer, not overridden
    assert config.algorithm.adv_estimator == "igpo" and config.algorithm.use_kl_in_reward is False
    assert IGPOSettings.from_mapping(config.algorithm.igpo) == IGPOSettings(max_turns=6)
    assert rollout.agent.default_agent_loop == "igpo_tool_agent"
    assert core_algos.get_adv_estimator_fn(config.algorithm.adv_estimator) is igpo_verl.compute_igpo_advantage
    assert load_class_from_fqn(rollout.agent.agent_loop_manager_class, "AgentLoopManager") is IGPOAgentLoopManager
    assert omega_conf_to_dataclass(rollout).agent.agent_loop_manager_class == rollout.agent.agent_loop_manager_class
    sampler = config.trainer.v1.sampler.custom_sampler
    assert load_extern_object(sampler.path, sampler.name) is IGPOReplayBuffer
    reward = config.reward.custom_reward_function
    assert load_extern_object(reward.path, reward.name) is igpo_verl.compute_score
    assert rollout.multi_turn.tool_config_path == "search_tool.yaml" and rollout.multi_turn.format == "hermes"
    igpo_verl._check_algorithm_config(config.algorithm)  # verl's default rollout_correction is accepted


def test_contiguous_uids_take_the_group_size_path_with_the_same_advantages(monkeypatch):
    """verl repeats each prompt rollout.n times in a row: the estimator sees G contiguous rows per
    uid, passes group_size=G (no factorization) and gets what the group-ids path gives."""
    _, response_mask, scores, turn_rewards, turn_mask, turn_of_token = build_batch()
    rows = [2, 4, 5, 6, 0, 1]  # q2, q2, q9, q9, q7, q7: G = 2 contiguous rollouts per uid
    uids = np.array(["4f1c-q2", "4f1c-q2", "9a0e-q9", "9a0e-q9", "77b3-q7", "77b3-q7"], dtype=object)
    seen = []
    library, method = igpo_rewards.advantages_from_token_rewards, IGPOSettings.advantages_from_token_rewards

    def spy(*args, **kwargs):
        seen.append({key: kwargs[key] for key in ("group_ids", "group_size") if key in kwargs})
        return method(*args, **kwargs)

    monkeypatch.setattr(IGPOSettings, "advantages_from_token_rewards", spy)  # the estimator calls its settings
    for igpo in (None, {"mode": "separate", "weighting": "trajectory", "gamma": 0.9}):
        data = run_verl(make_data(uids, response_mask[rows], scores[rows].clone()), algorithm_config(igpo))
        assert seen[-1] == {"group_size": 2}
        settings = IGPOSettings.from_mapping(igpo)
        by_ids = library(scores[rows], response_mask[rows], torch.tensor([0, 0, 1, 1, 2, 2]), gamma=settings.gamma,
                         **settings.normalization_kwargs())
        torch.testing.assert_close(data.batch["advantages"], by_ids, rtol=1e-6, atol=1e-6)
        expected = oracle_token_advantages(turn_rewards[rows], turn_mask[rows], uids, turn_of_token[rows], settings)
        np.testing.assert_allclose(data.batch["advantages"].numpy(), expected, rtol=1e-5, atol=1e-6)
    # The interleaved batch of the other tests keeps the group-ids path.
    uids_interleaved, *_ = build_batch()
    run_verl(make_data(uids_interleaved, response_mask, scores.clone()), algorithm_config())
    assert set(seen[-1]) == {"group_ids"}


# ---------------------------------------------------------------------------------------------
# Outcome-only batches, start-up refusals, the data's agent_name column
# ---------------------------------------------------------------------------------------------

MULTI_TURN_MASK = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 0, 0, 0]])
OUTCOME_ONLY = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0], [0.0, -2.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("rewards", "mask", "refused"),
    [
        (OUTCOME_ONLY, MULTI_TURN_MASK, True),
        (torch.tensor([[0.0, 0.3, 0.0, 1.0, 0.0], [0.0, -2.0, 0.0, 0.0, 0.0]]), MULTI_TURN_MASK, False),
        (torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]]),
         torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]), False),  # single-turn rows: nothing to miss
    ],
    ids=["outcome-only", "with-a-turn-reward", "single-turn"],
)
def test_outcome_only_multi_turn_batch_is_refused(rewards, mask, refused, monkeypatch):
    index = np.array(["q", "q"], dtype=object)
    monkeypatch.setattr(igpo_verl, "_warned_outcome_only", False)
    if not refused:
        with warnings.catch_warnings():
            warnings.simplefilter("error", igpo_verl.OutcomeOnlyWarning)
            igpo_verl.compute_igpo_advantage(rewards, mask, index=index, config=algorithm_config())
        return
    with pytest.raises(igpo_verl.IGPOConfigError, match=r"1 of 2 rollouts have several turns.*allow_outcome_only=True"):
        igpo_verl.compute_igpo_advantage(rewards, mask, index=index, config=algorithm_config())


def test_the_opt_in_turns_the_outcome_only_error_into_one_warning(monkeypatch):
    index = np.array(["q", "q"], dtype=object)
    config = algorithm_config({"allow_outcome_only": True})
    monkeypatch.setattr(igpo_verl, "_warned_outcome_only", False)
    with pytest.warns(igpo_verl.OutcomeOnlyWarning, match="allowed by algorithm.igpo.allow_outcome_only=True"):
        advantages, _ = igpo_verl.compute_igpo_advantage(OUTCOME_ONLY, MULTI_TURN_MASK, index=index, config=config)
    expected = IGPOSettings().advantages_from_token_rewards(OUTCOME_ONLY, MULTI_TURN_MASK, group_size=2)
    assert torch.equal(advantages, expected)
    with warnings.catch_warnings():  # once per process
        warnings.simplefilter("error")
        igpo_verl.compute_igpo_advantage(OUTCOME_ONLY, MULTI_TURN_MASK, index=index, config=config)


def test_without_information_gain_weight_earlier_turns_are_zero_by_design(monkeypatch):
    """ig_weight=0 (the paper's ablation) puts 0 at every earlier turn end: not an outcome-only slip."""
    monkeypatch.setattr(igpo_verl, "_warned_outcome_only", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        igpo_verl.compute_igpo_advantage(OUTCOME_ONLY, MULTI_TURN_MASK, index=np.array(["q", "q"], dtype=object),
                                         config=algorithm_config({"ig_weight": 0.0}))


def page_command(*extra):
    """The page's first main_ppo command (V1) with ``extra`` overrides, composed by Hydra."""
    return compose_verl_config([*main_ppo_commands()[0].values[0], *extra])


@pytest.fixture
def no_worker_actors(monkeypatch):
    """IGPOAgentLoopManager.create as both trainers call it, with the worker actors not started."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopManager

    async def no_actors(self):
        self.agent_loop_workers = []

    monkeypatch.setattr(AgentLoopManager, "_init_agent_loop_workers", no_actors)


def create_manager(config):
    from igpo_rewards.integrations.verl_manager import IGPOAgentLoopManager

    return IGPOAgentLoopManager.create(config=config, llm_client=None, teacher_client=None, reward_loop_worker_handles=None)


REFUSED = [  # (overrides, the setting the error names, words of the fix, outcome-only: the opt-in allows it)
    (["actor_rollout_ref.rollout.agent.default_agent_loop=tool_agent"],
     "actor_rollout_ref.rollout.agent.default_agent_loop", "default_agent_loop=igpo_tool_agent", True),
    (["reward.reward_model.enable=True"], "reward.reward_model.enable", "enable_resource_pool=True", True),
    (["actor_rollout_ref.rollout.multi_turn.tool_config_path=null"],
     "actor_rollout_ref.rollout.multi_turn.tool_config_path", "tool_config_path=<your tool config>", True),
    (["actor_rollout_ref.rollout.multi_turn.max_assistant_turns=1"],
     "actor_rollout_ref.rollout.multi_turn.max_assistant_turns", "max_assistant_turns=<the most turns", True),
    (["algorithm.use_kl_in_reward=True"], "algorithm.use_kl_in_reward", "actor_rollout_ref.actor.use_kl_loss=True", False),
    (["algorithm.rollout_correction.rollout_rs=token_k1"], "algorithm.rollout_correction.rollout_rs",
     "bypass_mode=True", False),
    (["algorithm.adv_estimator=grpo"], "algorithm.adv_estimator", "algorithm.adv_estimator=igpo", False),
    (["actor_rollout_ref.rollout.name=trtllm", "+algorithm.igpo.probe_mode=server"], "actor_rollout_ref.rollout.name",
     "rollout.name=vllm", False),
    (["+algorithm.igpo.probe_mode=gpu"], "algorithm.igpo.probe_mode", "probe_mode=actor (or server)", False),
    (["+algorithm.igpo.probe_mode=actor", "algorithm.rollout_correction.bypass_mode=True"], "algorithm.igpo.probe_mode",
     "probe_mode=server", False),
    (["trainer.v1.sampler.custom_sampler.path=null"], "trainer.v1.sampler.custom_sampler",
     "custom_sampler.name=IGPOReplayBuffer", False),
    (["algorithm.filter_groups.enable=True", "algorithm.filter_groups.metric=acc"], "algorithm.filter_groups.enable",
     "filter_groups.enable=False", False),
    (["trainer.v1.sampler.sync_refill_failed_groups=True"], "trainer.v1.sampler.sync_refill_failed_groups",
     "sync_refill_failed_groups=False", False),
]


@pytest.mark.parametrize(("overrides", "setting", "fix", "outcome_only"), REFUSED,
                         ids=[case[1].rsplit(".", 1)[-1] for case in REFUSED])
def test_start_up_refuses_what_keeps_turn_rewards_from_the_estimator(overrides, setting, fix, outcome_only,
                                                                      no_worker_actors):
    """IGPOAgentLoopManager.create (both trainers call it before any rollout) refuses each setting
    by name, with the fix; the opt-in allow_outcome_only turns only the outcome-only ones into a warning."""
    config = page_command(*overrides)
    with pytest.raises(igpo_verl.IGPOConfigError, match=re.escape(setting) + r" .*Fix: .*" + re.escape(fix)):
        create_manager(config)
    allowed = page_command(*overrides, "+algorithm.igpo.allow_outcome_only=True")
    if outcome_only:
        with pytest.warns(igpo_verl.OutcomeOnlyWarning, match=re.escape(setting)):
            create_manager(allowed)
    else:
        with pytest.raises(igpo_verl.IGPOConfigError, match=re.escape(setting)):
            create_manager(allowed)


@pytest.mark.parametrize("use_v1", [True, False])
def test_actor_mode_refusals_are_start_up_refusals_naming_every_reason(use_v1, no_worker_actors):
    """What keeps verl's actor from scoring the probes (verl_actor.actor_mode_problems) is refused by
    IGPOAgentLoopManager.create under probe_mode=actor, every reason in one error; unset, those
    settings make it server mode, where the rollout server must return prompt log-probs."""
    trainer = [] if use_v1 else ["trainer.use_v1=False"]
    blockers = ["algorithm.rollout_correction.bypass_mode=True",
                "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2"]
    config = page_command(*trainer, *blockers, "+algorithm.igpo.probe_mode=actor")
    with pytest.raises(igpo_verl.IGPOConfigError, match=r"algorithm.igpo.probe_mode is 'actor', but verl's actor cannot "
                                                       r"score the probes here: .*ulysses_sequence_parallel_size=2.*"
                                                       r"bypass_mode=True.*Fix: algorithm.igpo.probe_mode=server"):
        create_manager(config)
    create_manager(page_command(*trainer, *blockers))  # unset: server mode with verl's vllm server
    with pytest.raises(igpo_verl.IGPOConfigError, match=r"actor_rollout_ref.rollout.name is 'trtllm': in server probe "
                                                       r"mode \(unset, it is server mode here because .*bypass_mode=True"):
        create_manager(page_command(*trainer, *blockers, "actor_rollout_ref.rollout.name=trtllm"))
    # actor mode, chosen or unset, reads no prompt log-probs: any rollout server
    for mode in ([], ["+algorithm.igpo.probe_mode=actor"]):
        create_manager(page_command(*trainer, *mode, "actor_rollout_ref.rollout.name=trtllm"))


def test_the_legacy_trainer_takes_no_sampler_settings(no_worker_actors):
    from igpo_rewards.integrations.verl_manager import IGPOAgentLoopManager

    config = page_command("trainer.use_v1=False", "trainer.v1.sampler.custom_sampler.path=null")
    assert type(create_manager(config)) is IGPOAgentLoopManager


def test_an_agent_loop_file_that_renames_igpo_tool_agent_is_refused(tmp_path, no_worker_actors):
    path = tmp_path / "agent_loops.yaml"
    path.write_text("- name: igpo_tool_agent\n  _target_: verl.experimental.agent_loop.tool_agent_loop.ToolAgentLoop\n")
    config = page_command(f"actor_rollout_ref.rollout.agent.agent_loop_config_path={path}")
    with pytest.raises(igpo_verl.IGPOConfigError, match=r"agent_loop_config_path .*registers the name 'igpo_tool_agent'"):
        create_manager(config)
    path.write_text("- name: igpo_tool_agent\n  _target_: igpo_rewards.integrations.verl_agent_loop.IGPOToolAgentLoop\n"
                    "- name: mine\n  _target_: verl.experimental.agent_loop.tool_agent_loop.ToolAgentLoop\n")
    create_manager(config)


def write_rows(path, agent_names):
    """Rows as verl's tool-agent preprocessing scripts write them (examples/data_preprocess/*_tool_agent_loop.py)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"data_source": ["nq"] * len(agent_names),
            "prompt": [[{"role": "user", "content": f"question {i}?"}] for i in range(len(agent_names))],
            "reward_model": [{"ground_truth": "Kaleno", "style": "rule"}] * len(agent_names)}
    if agent_names[0] is not None:
        rows["agent_name"] = list(agent_names)
    pq.write_table(pa.table(rows), path)
    return path


@pytest.mark.parametrize("use_v1", [True, False])
def test_training_data_naming_another_agent_loop_is_refused_at_start_up(tmp_path, use_v1, no_worker_actors):
    """verl runs the agent loop a row names: rows with agent_name=tool_agent would score no probes."""
    trainer = [] if use_v1 else ["trainer.use_v1=False"]
    tool_rows = write_rows(tmp_path / "tool.parquet", ["tool_agent", "igpo_tool_agent", "tool_agent"])
    config = page_command(*trainer, f"data.train_files={tool_rows}")
    with pytest.raises(igpo_verl.IGPOConfigError, match=r"agent_name in data.train_files .*tool.parquet.* \(2 of 3 rows: "
                                                       r"\['tool_agent'\]\).*Fix: write agent_name='igpo_tool_agent' "
                                                       r"into those rows, or drop the agent_name column"):
        create_manager(config)
    for name, names in (("igpo.parquet", ["igpo_tool_agent"] * 3), ("plain.parquet", [None])):
        create_manager(page_command(*trainer, f"data.train_files=[{write_rows(tmp_path / name, names)}]"))


def test_a_batch_naming_another_agent_loop_is_refused_before_dispatch(no_worker_actors):
    """The manager checks every training batch in the trainer process before its workers see it
    (the data may not be a local parquet file); validation batches are not checked."""
    from verl.utils import tensordict_utils

    from igpo_rewards.integrations._verl_v1 import agent_names

    names = np.array(["igpo_tool_agent", "tool_agent"], dtype=object)
    legacy = create_manager(page_command("trainer.use_v1=False"))
    with pytest.raises(igpo_verl.IGPOConfigError, match=r"agent_name in a training batch .*1 of 2 rows"):
        legacy.generate_sequences(DataProto.from_dict(non_tensors={"agent_name": names, "uid": names}))
    v1 = create_manager(page_command())
    batch = tensordict_utils.get_tensordict({"agent_name": names, "uid": np.array(["a", "b"], dtype=object)})
    assert agent_names(batch) == ["igpo_tool_agent", "tool_agent"]
    with pytest.raises(igpo_verl.IGPOConfigError, match=r"agent_name in a training batch .*1 of 2 rows"):
        v1.generate_sequences(batch)
    shared = tensordict_utils.get_tensordict({"uid": np.array(["a", "b"], dtype=object)})
    tensordict_utils.assign_non_tensor_data(shared, "agent_name", "tool_agent")  # one value for the whole batch
    assert agent_names(shared) == ["tool_agent", "tool_agent"]


# ---------------------------------------------------------------------------------------------
# Failed agent-loop sessions and IGPO's replay buffer
# ---------------------------------------------------------------------------------------------


def test_session_ledger_counts_and_stops_past_the_limit():
    from igpo_rewards.integrations.verl_manager import FAILED_SESSIONS_LIMIT, FAILURE_WINDOW, SessionFailureError, SessionLedger

    assert (FAILED_SESSIONS_LIMIT, FAILURE_WINDOW) == (12, 256)  # the limit docs/integrations/verl.md states
    ledger = SessionLedger()
    ledger.add({"failed": [True] * 12 + [False] * 200, "errors": ["ValueError: a"], "probes_skipped": 3})
    assert ledger.metrics() == {"training/igpo/sessions": 212, "training/igpo/failed_sessions": 12,
                                "training/igpo/probes_skipped": 3}
    assert ledger.metrics()["training/igpo/sessions"] == 0  # counted since the last report
    ledger.add({"failed": [False] * 56})  # the 12 failures leave the window of the last 256 sessions
    ledger.add({"failed": [True] * 12 + [False] * 232, "errors": ["ValueError: b"]})  # 12 of the last 256: allowed
    assert ledger.metrics()["training/igpo/failed_sessions"] == 12
    with pytest.raises(SessionFailureError, match=r"13 of the last 256 agent-loop sessions failed \(IGPO allows at most "
                                                  r"12 of the last 256\); the last errors: \['ValueError: a', "
                                                  r"'ValueError: b', 'ValueError: c'\]"):
        ledger.add({"failed": [True], "errors": ["ValueError: c"]})
    with pytest.raises(igpo_verl.IGPOConfigError, match="refused for its configuration.*no prompt_logprobs"):
        SessionLedger().add({"failed": [True], "config_errors": ["the server returned no prompt_logprobs"]})


def test_igpo_replay_buffer_is_verls_own_for_each_trainer_mode():
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

    from igpo_rewards.integrations.verl_manager import IGPOReplayBuffer

    common = {"trainer_config": OmegaConf.create({}), "max_off_policy_threshold": None, "max_off_policy_strategy": "drop",
              "sampler_kwargs": OmegaConf.create({}), "refill_fn": None}
    sync = IGPOReplayBuffer(trainer_mode="sync", **common)
    assert isinstance(sync, ReplayBuffer) and not isinstance(sync, ReplayBufferAsync)
    for mode in ("colocate_async", "separate_async"):
        assert isinstance(IGPOReplayBuffer(trainer_mode=mode, **common), ReplayBufferAsync)


# ---------------------------------------------------------------------------------------------
# verl's own prompt log-prob extractors (vLLM, SGLang) on synthetic engine outputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
def test_verls_prompt_logprob_extractors_feed_the_probe_reading(flavor):
    """verl's extract_prompt_logprobs (vLLM) and _extract_prompt_logprobs_sglang, compiled from
    verl's installed source, on each engine's output layout: the layout probe_logprob_from_server_output
    reads, and the probe value is the mean of the answer tokens' log-probs (hand-computed)."""
    from transformers import PreTrainedTokenizerFast

    from igpo_rewards.agent.probes import build_probe_suffix
    from igpo_rewards.integrations.verl_agent_loop import probe_logprob_from_server_output
    from igpo_rewards.testing.tiny import train_tokenizer

    from .verl_harness import VERL_EXTRACTORS, engine_prompt_logprobs, verl_function

    relative_path, name, namespace = VERL_EXTRACTORS[flavor]
    extract = verl_function(relative_path, name, namespace)
    assert extract.__code__.co_filename.endswith(relative_path)  # verl's own file, not a copy
    tokenizer = train_tokenizer(["Now there's enough information to answer <answer> Kaleno City </answer>"] * 4,
                                vocab_size=300, min_frequency=1)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    suffix = build_probe_suffix(tokenizer, "Kaleno City")
    context = [5, 6, 7]
    sequence = context + list(suffix.token_ids)
    values = [-0.125 * position for position in range(1, len(sequence))]  # log pi(token p | < p) = -p/8
    fields = engine_prompt_logprobs(flavor, sequence, values)
    assert fields["prompt_ids"] == [[token] for token in sequence[1:]] + [[0]]
    assert fields["prompt_logprobs"] == [[value] for value in values] + [[0.0]]
    answer = range(len(context) + suffix.answer_start, len(context) + suffix.answer_end)
    expected = sum(-0.125 * position for position in answer) / len(answer)
    assert probe_logprob_from_server_output(fields, sequence, len(context), suffix) == pytest.approx(expected, abs=1e-12)


def test_a_server_without_prompt_logprobs_is_a_configuration_error():
    from igpo_rewards.integrations.verl_agent_loop import probe_logprob_from_server_output

    with pytest.raises(igpo_verl.IGPOConfigError, match=r"no extra_fields\['prompt_logprobs'\].*vllm or sglang"):
        probe_logprob_from_server_output({"global_steps": 3}, [1, 2, 3], 1, None)
