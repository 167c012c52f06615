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


def test_sub_goal_targets_are_refused_until_the_probes_run_on_the_actor():
    with pytest.raises(ValueError, match=r"algorithm.igpo.subgoal_weight = 0.5: sub-goal targets are not available in "
                                         r"verl yet.*probes on the actor"):
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
    with pytest.raises(ValueError, match=r"algorithm.use_kl_in_reward=True with adv_estimator=igpo.*use_kl_loss=True"):
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

    (config,) = doc_blocks("yaml")
    path = tmp_path / "search_tool.yaml"
    path.write_text(config)
    (tool,) = initialize_tools_from_config(str(path))  # what verl's agent-loop workers call
    assert isinstance(tool, SearchTool) and tool.name == "search" and tool.topk == 3
    assert tool.retriever.url == "http://127.0.0.1:8000/retrieve"
    assert tool.tool_schema.function.parameters.required == ["query"]


def test_doc_command_composes_with_verls_config_and_names_loadable_pieces(tmp_path):
    """The page's main_ppo command, composed by Hydra with verl 0.9.1's own ppo_trainer config:
    every override is a valid key, and every class, module and setting it names loads."""
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.import_utils import load_class_from_fqn, load_extern_object

    import verl
    from igpo_rewards.integrations.verl_manager import IGPOAgentLoopManager

    (command,) = [block for block in doc_blocks("bash") if "main_ppo" in block]
    arguments = command.replace("\\\n", " ").split("verl.trainer.main_ppo", 1)[1].split()
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=arguments)
    rollout = config.actor_rollout_ref.rollout
    assert config.trainer.use_v1 is True  # verl 0.9's default trainer, not overridden
    assert config.algorithm.adv_estimator == "igpo" and config.algorithm.use_kl_in_reward is False
    assert IGPOSettings.from_mapping(config.algorithm.igpo) == IGPOSettings(max_turns=6)
    assert rollout.agent.default_agent_loop == "igpo_tool_agent"
    assert core_algos.get_adv_estimator_fn(config.algorithm.adv_estimator) is igpo_verl.compute_igpo_advantage
    assert load_class_from_fqn(rollout.agent.agent_loop_manager_class, "AgentLoopManager") is IGPOAgentLoopManager
    assert omega_conf_to_dataclass(rollout).agent.agent_loop_manager_class == rollout.agent.agent_loop_manager_class
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
