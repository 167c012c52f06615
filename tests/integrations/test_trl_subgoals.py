"""Sub-goal targets on TRL's path (docs/algorithm.md 7.1): ``make_search_rollout_func(subgoals_column=)``
probes each row's sub-goals with the answer in one forward, and ``IGPOTrainer`` weighs them.

- the trainer: synthetic rollouts with K_i targets per completion (trl_igpo_run.py); expected
  advantages from the float64 oracle on [B, T, K] probes with ``target_weights(K)`` and the target
  mask, on one process and on two (each with a different K: the trainer pads to the largest);
- the rollout function: on the reference trainer's world (gold chains as sub-goals), every
  target's probes equal ``score_probes`` of that target alone on the same trajectories;
- the refusals that keep sub-goals from being ignored or counted twice.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig

from igpo_rewards.agent.probes import score_probes
from igpo_rewards.integrations import IGPOSettings
from igpo_rewards.integrations.trl import IGPOTrainer, make_outcome_reward_func, make_search_rollout_func
from igpo_rewards.testing import reference
from igpo_rewards.testing.tiny import make_tiny_pretrained

from . import trl_igpo_run as run
from .test_trl import assert_rows_match, turns_of_tokens
from .test_trl_search import G, SETTINGS, dataset_rows, model, retriever, tokenizer, turn_starts_of, world  # noqa: F401

HERE = Path(__file__).resolve().parent


def expected_target_advantages(tokenizer, settings: IGPOSettings) -> list[np.ndarray]:
    """Token advantages of the synthetic batch from the oracle on [B, T, K] probes."""
    rows = [run.synthetic_completion(k, len(tokenizer), tokenizer.eos_token_id) for k in range(run.GLOBAL_ROWS)]
    targets = [run.synthetic_targets(k, row["igpo_answer_logprob"]) for k, row in enumerate(rows)]
    num_turns, num_targets = max(map(len, targets)), max(len(t[0]) for t in targets)
    probes = np.full((len(rows), num_turns, num_targets), np.nan)
    turn_mask = np.zeros((len(rows), num_turns), dtype=bool)
    target_mask = np.zeros((len(rows), num_targets), dtype=bool)
    for k, turns in enumerate(targets):
        probes[k, : len(turns), : len(turns[0])] = turns
        turn_mask[k, : len(turns)] = True
        target_mask[k, : len(turns[0])] = True
    turn_advantages = reference.igpo_advantages(
        probes, [row["outcome"] for row in rows], turn_mask, group_size=run.NUM_GENERATIONS,
        target_weights=settings.target_weights(num_targets), target_mask=target_mask, gamma=settings.gamma,
        **settings.reward_kwargs(), **settings.normalization_kwargs(), **settings.accumulation_kwargs(),
    ).advantages
    return [
        np.array([turn_advantages[k, turn] if turn >= 0 else 0.0 for turn in turns_of_tokens(row["env_mask"])])
        for k, row in enumerate(rows)
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_pretrained(tmp_path_factory.mktemp("tiny_llama"))


@pytest.mark.parametrize("igpo", [run.TARGET_SETTINGS, {"subgoal_weight": 1.0, "subgoal_potential": "probe",
                                                         "gain_clip": "positive", "accumulation": "sqrt_n"}])
def test_the_trainer_weighs_each_turns_targets(model_dir, tmp_path, igpo):
    trainer = run.make_trainer(model_dir, tmp_path, per_device_batch=run.GLOBAL_ROWS, igpo_settings=igpo,
                               rollout=run.target_rollout_func)
    advantages = run.score_local_slice(trainer)["advantages"]
    settings = IGPOSettings.from_mapping(igpo)
    expected = expected_target_advantages(trainer.processing_class, settings)
    assert_rows_match(advantages, expected)
    # the sub-goals move the result: the answer's probes alone give other advantages
    tokenizer = trainer.processing_class
    rows = [run.synthetic_completion(k, len(tokenizer), tokenizer.eos_token_id) for k in range(run.GLOBAL_ROWS)]
    answer_only = IGPOSettings.from_mapping({key: value for key, value in igpo.items() if key != "subgoal_weight"})
    assert any(not np.allclose(a, b) for a, b in zip(expected, _answer_only_advantages(rows, answer_only)))


def _answer_only_advantages(rows, settings: IGPOSettings) -> list[np.ndarray]:
    num_turns = max(len(row["igpo_answer_logprob"]) for row in rows)
    probes = np.zeros((len(rows), num_turns))
    turn_mask = np.zeros((len(rows), num_turns), dtype=bool)
    for k, row in enumerate(rows):
        probes[k, : len(row["igpo_answer_logprob"])] = row["igpo_answer_logprob"]
        turn_mask[k, : len(row["igpo_answer_logprob"])] = True
    turn_advantages = reference.igpo_advantages(
        probes, [row["outcome"] for row in rows], turn_mask, group_size=run.NUM_GENERATIONS, gamma=settings.gamma,
        **settings.reward_kwargs(), **settings.normalization_kwargs(), **settings.accumulation_kwargs(),
    ).advantages
    return [np.array([turn_advantages[k, t] if t >= 0 else 0.0 for t in turns_of_tokens(row["env_mask"])])
            for k, row in enumerate(rows)]


def test_two_processes_with_different_target_counts_give_the_one_process_advantages(model_dir, tmp_path):
    """Rank 0's completions have the answer alone (K = 1), rank 1's two or three targets: the trainer
    pads every process to the batch's K before gathering."""
    one = run.make_trainer(model_dir, tmp_path / "one", per_device_batch=run.GLOBAL_ROWS,
                           igpo_settings=run.TARGET_SETTINGS, rollout=run.target_rollout_func)
    single = run.score_local_slice(one)["advantages"]
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(HERE / "trl_igpo_run.py"), str(model_dir), str(tmp_path), "targets"]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=HERE)
    assert completed.returncode == 0, completed.stderr[-4000:]
    local = run.GLOBAL_ROWS // 2
    for rank in range(2):
        part = torch.load(tmp_path / f"rank{rank}.pt")["advantages"]
        width = part.shape[1]
        torch.testing.assert_close(part, single[rank * local : (rank + 1) * local, :width])


def _with_targets(targets_of):
    """``run.target_rollout_func`` with each completion's target lists passed through ``targets_of``."""
    def rollout(prompts, trainer):
        output = run.target_rollout_func(prompts, trainer)
        output["igpo_target_logprob"] = [targets_of(k, turns) for k, turns in enumerate(output["igpo_target_logprob"])]
        return output
    return rollout


@pytest.mark.parametrize(("rollout", "settings", "message"), [
    (run.rollout_func, {"subgoal_weight": 0.5}, r"igpo_settings.subgoal_weight = 0.5, but the rollout_func returned "
                                                r"no 'igpo_target_logprob'.*subgoals_column="),
    (run.target_rollout_func, {}, r"holds K = 3 targets but subgoal_weight is 0: the sub-goal probes would be ignored"),
    (_with_targets(lambda k, turns: [[turn[-1], *turn[:-1]] if len(turn) > 1 else turn for turn in turns]),
     run.TARGET_SETTINGS, r"igpo_target_logprob\[\d+\]: each turn's first target must be the answer"),
    (_with_targets(lambda k, turns: turns[:-1] if len(turns) > 1 else turns + turns), run.TARGET_SETTINGS,
     r"igpo_target_logprob\[0\] must hold, for each of the completion's \d turns"),
    (_with_targets(lambda k, turns: [turn[: 1 + (j % 2)] for j, turn in enumerate(turns)] if len(turns[0]) > 1
                   and len(turns) > 1 else turns), run.TARGET_SETTINGS, r"\(the same K every turn\); got \d turns with "
                                                                         r"\[1, 2\] targets"),
])
def test_target_probes_that_would_be_ignored_or_misread_are_refused(model_dir, tmp_path, rollout, settings, message):
    trainer = run.make_trainer(model_dir, tmp_path, per_device_batch=run.GLOBAL_ROWS, igpo_settings=settings,
                               rollout=rollout)
    with pytest.raises(ValueError, match=message):
        run.score_local_slice(trainer)


# --- the Search-R1 rollout function on the reference trainer's world --------------------------------


def rows_with_subgoals(examples):
    """The dataset rows of test_trl_search plus each question's gold chain without its answer."""
    return [{**row, "subgoals": list(example.gold_bridge_answers[:-1])}
            for row, example in zip(dataset_rows(examples), examples)]


@pytest.fixture(scope="module")
def trainer(world, tokenizer, model, tmp_path_factory):  # noqa: F811
    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trainer")), per_device_train_batch_size=G, num_generations=G, max_steps=1,
        beta=0.0, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no", seed=0,
    )
    return IGPOTrainer(
        model=copy.deepcopy(model), reward_funcs=[make_outcome_reward_func()], args=args,
        train_dataset=Dataset.from_list(rows_with_subgoals(world.train)), processing_class=tokenizer,
        rollout_func=lambda prompts, trainer: {}, igpo_settings={"subgoal_weight": 1.0},
    )


def call(rollout_func, trainer, rows, seed):
    """What TRL does: each row G times in a row, held by IGPOTrainer while the rollout runs."""
    batch = [row for row in rows for _ in range(G)]
    trainer.igpo_batch_inputs = batch
    torch.manual_seed(seed)
    try:
        return rollout_func([row["prompt"] for row in batch], trainer), batch
    finally:
        trainer.igpo_batch_inputs = None


@pytest.mark.parametrize("layout", ["packed", "kv_cache"])
def test_the_rollout_probes_every_target_of_every_turn(trainer, model, tokenizer, retriever, world, layout):  # noqa: F811
    examples = [world.train[i] for i in (1, 4, 0)]  # 3 hops (2 sub-goals), 2 hops (1), 1 hop (none)
    rows = rows_with_subgoals(examples)
    settings = dict(SETTINGS, probe_layout=layout, probe_batch_size=5)
    output, batch = call(make_search_rollout_func(retriever, subgoals_column="subgoals", **settings), trainer, rows, 7)
    plain, _ = call(make_search_rollout_func(retriever, **settings), trainer, rows, 7)
    assert output["completion_ids"] == plain["completion_ids"]  # probing more targets changes no rollout
    token_ids = [p + c for p, c in zip(output["prompt_ids"], output["completion_ids"])]
    starts = [turn_starts_of(mask, len(p)) for mask, p in zip(output["env_mask"], output["prompt_ids"])]
    targets = output["igpo_target_logprob"]
    for b, row in enumerate(batch):
        names = [row["answers"][0], *row["subgoals"]]
        assert len(targets[b]) == len(starts[b]) and all(len(turn) == len(names) for turn in targets[b])
        assert [turn[0] for turn in targets[b]] == output["igpo_answer_logprob"][b]
        with torch.no_grad():
            for k, name in enumerate(names):
                alone = score_probes(model, tokenizer, [token_ids[b]], [starts[b]], [name], probe_layout=layout)[0]
                torch.testing.assert_close(torch.tensor([turn[k] for turn in targets[b]]), alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(sum(output["igpo_answer_logprob"], [])),
                               torch.tensor(sum(plain["igpo_answer_logprob"], [])), rtol=1e-5, atol=1e-5)
    assert {len(turns[0]) for turns in targets} == {1, 2, 3}


def test_sub_goal_columns_that_would_be_ignored_or_counted_twice_are_refused(trainer, retriever, world):  # noqa: F811
    rollout = make_search_rollout_func(retriever, subgoals_column="subgoals", **SETTINGS)
    rows = rows_with_subgoals([world.train[1]])
    for change, error, message in [
        (lambda row: row.pop("subgoals"), ValueError, r"no column 'subgoals' \(the sub-goal targets, subgoals_column=\)"),
        (lambda row: row.update(subgoals="Kudis"), TypeError, r"column 'subgoals': the sub-goals must be a list of strings"),
        (lambda row: row.update(subgoals=["Kudis", ""]), ValueError, r"every sub-goal must be a non-empty string"),
        (lambda row: row.update(subgoals=["Hapova Group", "kruhirand"]), ValueError,
         r"the sub-goal 'kruhirand' is the answer itself \(target 0\)"),
        (lambda row: row.update(subgoals=["Kudis", "kudis"]), ValueError, r"repeated sub-goals \['Kudis', 'kudis'\]"),
    ]:
        bad = copy.deepcopy(rows)
        change(bad[0])
        with pytest.raises(error, match=message):
            call(rollout, trainer, bad, 0)
    unweighted = copy.copy(trainer)
    unweighted.igpo_settings = IGPOSettings()
    with pytest.raises(ValueError, match=r"subgoals_column='subgoals' probes sub-goal targets, but "
                                         r"igpo_settings.subgoal_weight is 0"):
        call(rollout, unweighted, rows, 0)
    none = copy.deepcopy(rows)
    none[0]["subgoals"] = None  # a question without sub-goals (a null in the parquet) has the answer alone
    output, _ = call(rollout, trainer, none, 0)
    assert {len(turn) for turns in output["igpo_target_logprob"] for turn in turns} == {1}
    with pytest.raises(TypeError, match="subgoals_column must be a str"):
        make_search_rollout_func(retriever, subgoals_column=["subgoals"])
