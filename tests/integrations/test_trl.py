"""IGPOTrainer (igpo_rewards.integrations.trl) on a tiny Llama and synthetic multi-turn rollouts.

The model and its byte-level BPE tokenizer are built locally (igpo_rewards.testing.tiny); the
rollouts come from a TRL rollout_func (trl_igpo_run.py) whose completion k is a function of k
alone. Expected advantages are computed from the same synthetic data with the float64 loop
oracle (igpo_rewards.testing.reference), with turns read off env_mask by a plain loop here.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trl
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from igpo_rewards.integrations import IGPOSettings
from igpo_rewards.integrations.trl import (
    SUPPORTED_TRL_VERSIONS,
    TESTED_TRL_VERSIONS,
    IGPOTrainer,
    SplitGroupWarning,
    ZeroAdvantageWarning,
    check_trl_version,
    token_turn_index,
    whole_group_permutation,
)
from igpo_rewards.testing import reference
from igpo_rewards.testing.tiny import make_tiny_pretrained

from . import trl_igpo_run as run

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_pretrained(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory):
    """The whole global batch scored by one process."""
    trainer = run.make_trainer(model_dir, tmp_path_factory.mktemp("trainer"), per_device_batch=run.GLOBAL_ROWS)
    return trainer, run.score_local_slice(trainer)


def turns_of_tokens(env_mask):
    """Turn of each token: a new turn starts at every 0 -> 1 step (plain loop, no library)."""
    turns, current, previous = [], -1, 0
    for value in env_mask:
        if value == 1 and previous == 0:
            current += 1
        turns.append(current if value == 1 else -1)
        previous = value
    return turns


def expected_advantages(tokenizer, settings: IGPOSettings) -> list[np.ndarray]:
    rows = [run.synthetic_completion(k, len(tokenizer), tokenizer.eos_token_id) for k in range(run.GLOBAL_ROWS)]
    num_turns = max(len(row["igpo_answer_logprob"]) for row in rows)
    answer_logprob = np.zeros((len(rows), num_turns))
    turn_mask = np.zeros((len(rows), num_turns), dtype=bool)
    for k, row in enumerate(rows):
        answer_logprob[k, : len(row["igpo_answer_logprob"])] = row["igpo_answer_logprob"]
        turn_mask[k, : len(row["igpo_answer_logprob"])] = True
    outcome = [row["outcome"] for row in rows]
    groups = [k // run.NUM_GENERATIONS for k in range(len(rows))]
    turn_advantages = reference.igpo_advantages(
        answer_logprob, outcome, turn_mask, groups, gamma=settings.gamma, **settings.reward_kwargs(),
        **settings.normalization_kwargs(),
    ).advantages
    return [
        np.array([turn_advantages[k, turn] if turn >= 0 else 0.0 for turn in turns_of_tokens(row["env_mask"])])
        for k, row in enumerate(rows)
    ]


def assert_rows_match(advantages: torch.Tensor, expected: list[np.ndarray], first_row: int = 0):
    for offset, row in enumerate(advantages):
        want = expected[first_row + offset]
        np.testing.assert_allclose(row[: want.size].numpy(), want, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(row[want.size :]) == 0  # padding


def test_advantages_equal_igpo_rewards_on_the_same_rollouts(one_process):
    trainer, result = one_process
    advantages = result["advantages"]
    assert advantages.dtype == torch.float32 and advantages.dim() == 2 and advantages.shape[0] == run.GLOBAL_ROWS
    expected = expected_advantages(trainer.processing_class, IGPOSettings())
    assert_rows_match(advantages, expected)
    # Question 2: every outcome is 1.0, so GRPO's advantages are all 0; IGPO's turn rewards are not.
    first = run.EQUAL_OUTCOME_GROUP * run.NUM_GENERATIONS
    group_two = advantages[first : first + run.NUM_GENERATIONS]
    assert torch.count_nonzero(group_two) > 0
    tokenizer = trainer.processing_class
    turns = [len(run.synthetic_completion(k, len(tokenizer), 0)["igpo_answer_logprob"]) for k in range(run.GLOBAL_ROWS)]
    assert sorted(set(turns)) == [1, 2, 3]
    assert trainer._metrics["train"]["igpo/turns_mean"][-1] == pytest.approx(np.mean(turns))
    collapsed = [not any(np.any(expected[k] != 0) for k in range(q * run.NUM_GENERATIONS, (q + 1) * run.NUM_GENERATIONS))
                 for q in range(run.GLOBAL_ROWS // run.NUM_GENERATIONS)]
    assert trainer._metrics["train"]["igpo/zero_advantage_group_fraction"][-1] == pytest.approx(np.mean(collapsed))


def test_trainer_passes_trls_contiguous_groups_as_group_size(model_dir, tmp_path, monkeypatch):
    """TRL yields each prompt num_generations times in a row: the trainer passes group_size and
    gets what group ids k // num_generations give."""
    method, seen = IGPOSettings.igpo_advantages, []

    def spy(settings, answer_logprob, outcome, turn_mask, group_ids=None, **kwargs):
        result = method(settings, answer_logprob, outcome, turn_mask, group_ids, **kwargs)
        options = {key: value for key, value in kwargs.items() if key != "group_size"}
        ids = torch.arange(answer_logprob.shape[0]) // run.NUM_GENERATIONS
        by_ids = method(settings, answer_logprob, outcome, turn_mask, ids, **options)
        seen.append((group_ids, kwargs.get("group_size"), result, by_ids))
        return result

    monkeypatch.setattr(IGPOSettings, "igpo_advantages", spy)  # the trainer calls its settings, not option by option
    trainer = run.make_trainer(model_dir, tmp_path, per_device_batch=run.GLOBAL_ROWS)
    run.score_local_slice(trainer)
    (group_ids, group_size, dense, by_ids), = seen
    assert group_ids is None and group_size == run.NUM_GENERATIONS
    for field in dense._fields:
        torch.testing.assert_close(getattr(dense, field), getattr(by_ids, field), rtol=1e-6, atol=1e-6)


def test_igpo_settings_reach_the_computation(model_dir, tmp_path):
    settings = {"gamma": 0.5, "mode": "separate", "weighting": "trajectory", "kind": "log_prob", "ig_weight": 2.0}
    trainer = run.make_trainer(model_dir, tmp_path, per_device_batch=run.GLOBAL_ROWS, igpo_settings=settings)
    advantages = run.score_local_slice(trainer)["advantages"]
    assert_rows_match(advantages, expected_advantages(trainer.processing_class, IGPOSettings.from_mapping(settings)))


def test_two_processes_give_the_same_advantages_as_one(one_process, model_dir, tmp_path):
    _, single = one_process
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        str(HERE / "trl_igpo_run.py"), str(model_dir), str(tmp_path),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=HERE)
    assert completed.returncode == 0, completed.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [rank["backend"] for rank in ranks] == ["gloo", "gloo"]
    local = run.GLOBAL_ROWS // 2
    for rank, part in enumerate(ranks):
        assert part["advantages"].shape[0] == local
        reference_rows = single["advantages"][rank * local : (rank + 1) * local]
        width = part["advantages"].shape[1]  # each process pads to its own longest completion
        torch.testing.assert_close(part["advantages"], reference_rows[:, :width])
        assert torch.count_nonzero(reference_rows[:, width:]) == 0


def test_one_training_step_uses_per_token_advantages(model_dir, tmp_path):
    trainer = run.make_trainer(model_dir, tmp_path, per_device_batch=run.GLOBAL_ROWS)
    before = [parameter.detach().clone() for parameter in trainer.model.parameters()]
    trainer.train()
    (batch,) = trainer._buffered_inputs
    assert batch["advantages"].shape == batch["completion_ids"].shape
    assert torch.count_nonzero(batch["advantages"] * (1 - batch["tool_mask"])) == 0  # nothing on env tokens
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert any(not torch.equal(old, new) for old, new in zip(before, trainer.model.parameters()))


def test_each_optimizer_step_trains_on_whole_groups(model_dir, tmp_path):
    """A round of 3 groups x 4 rollouts in 3 steps_per_generation minibatches of 4: TRL's row
    shuffle would mix the groups; IGPOTrainer's gives each minibatch one whole group, whose rows
    keep their IGPO advantages."""
    trainer = run.make_trainer(model_dir, tmp_path, per_device_batch=run.NUM_GENERATIONS, steps_per_generation=3)
    trainer.train()
    expected = expected_advantages(trainer.processing_class, trainer.igpo_settings)
    assert len(trainer._buffered_inputs) == 3
    seen_groups = []
    for minibatch in trainer._buffered_inputs:
        prompts = {tuple(row[mask.bool()].tolist()) for row, mask in zip(minibatch["prompt_ids"], minibatch["prompt_mask"])}
        assert len(prompts) == 1, "a minibatch mixes groups"
        completions = [row[mask.bool()].tolist() for row, mask in zip(minibatch["completion_ids"], minibatch["completion_mask"])]
        rows = [
            next(k for k in range(run.GLOBAL_ROWS) if run.synthetic_completion(k, len(trainer.processing_class), trainer.processing_class.eos_token_id)["completion_ids"] == ids)
            for ids in completions
        ]
        group = rows[0] // run.NUM_GENERATIONS
        assert rows == list(range(group * run.NUM_GENERATIONS, (group + 1) * run.NUM_GENERATIONS))
        for offset, k in enumerate(rows):
            assert_rows_match(minibatch["advantages"][offset : offset + 1], expected, first_row=k)
        seen_groups.append(group)
    assert sorted(seen_groups) == [0, 1, 2]


def test_whole_group_permutation():
    torch.manual_seed(3)
    order = whole_group_permutation(12, 4).tolist()
    assert sorted(order) == list(range(12))
    assert all(order[i : i + 4] == list(range(order[i], order[i] + 4)) and order[i] % 4 == 0 for i in range(0, 12, 4))
    orders = {tuple(whole_group_permutation(12, 4).tolist()) for _ in range(50)}
    assert len(orders) == 6  # every order of the 3 groups occurs, nothing else
    with pytest.raises(ValueError, match="num_rows=10, group_size=4"):
        whole_group_permutation(10, 4)
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        whole_group_permutation(10, 0)
    with pytest.raises(TypeError, match="group_size must be an int, got float 2.0"):
        whole_group_permutation(10, 2.0)


def test_minibatches_that_cannot_hold_whole_groups_warn(model_dir, tmp_path):
    """6 rollouts per minibatch with groups of 4: some group must be split, and the trainer says so."""
    trainer = run.make_trainer(model_dir, tmp_path, per_device_batch=6, steps_per_generation=2)
    with pytest.warns(SplitGroupWarning, match="num_generations = 4"):
        trainer.train()


def test_max_turns_is_the_width_and_a_hard_cap(model_dir, tmp_path):
    """igpo_settings.max_turns is the most turns a completion may have (the batch has up to 3)."""
    wide = run.make_trainer(model_dir, tmp_path / "a", per_device_batch=run.GLOBAL_ROWS, igpo_settings={"max_turns": 5})
    assert_rows_match(run.score_local_slice(wide)["advantages"], expected_advantages(wide.processing_class, IGPOSettings()))
    narrow = run.make_trainer(model_dir, tmp_path / "b", per_device_batch=run.GLOBAL_ROWS, igpo_settings={"max_turns": 2})
    with pytest.raises(ValueError, match=r"igpo_settings.max_turns = 2 \(the most turns a completion may have\), but a "
                                         r"completion of this batch has 3 turns"):
        run.score_local_slice(narrow)


def test_a_batch_without_signal_warns_with_the_count(model_dir, tmp_path):
    """Every completion is one malformed turn with the format penalty (the smallest TRL run's
    first batches): every advantage is 0, the step would train nothing, and the trainer says so."""

    def no_signal(prompts, trainer):
        output = run.rollout_func(prompts, trainer)
        output["outcome"] = [-2.0] * len(prompts)
        output["env_mask"] = [[1] * len(ids) for ids in output["completion_ids"]]  # one turn each
        output["igpo_answer_logprob"] = [[-1.5] for _ in prompts]
        return output

    trainer = run.make_trainer(model_dir, tmp_path, per_device_batch=run.GLOBAL_ROWS, rollout=no_signal)
    with pytest.warns(ZeroAdvantageWarning, match=r"all 12 completions of this batch \(3 groups of num_generations = 4\) "
                                                  r"have advantage 0 on every token.*\(every outcome reward is -2\)"):
        result = run.score_local_slice(trainer)
    assert torch.count_nonzero(result["advantages"]) == 0
    import warnings

    with warnings.catch_warnings():  # the usual synthetic batch has signal: no warning
        warnings.simplefilter("error", ZeroAdvantageWarning)
        run.score_local_slice(run.make_trainer(model_dir, tmp_path / "b", per_device_batch=run.GLOBAL_ROWS))


def test_explicit_turn_index_must_number_every_turn():
    with pytest.raises(ValueError, match=r"igpo_turn_index\[0\] must number the completion's turns 0, 1, ..., n - 1.*"
                                         r"got turns \[0, 2\]"):
        token_turn_index([4], None, [[0, 0, 2, 2]], 4)


def test_token_turn_index_from_env_mask_or_explicit_turns():
    from_mask = token_turn_index([4, 3], [[1, 0, 1, 1], [1, 1, 1]], None, 5)
    assert from_mask.tolist() == [[0, -1, 1, 1, -1], [0, 0, 0, -1, -1]]
    explicit = token_turn_index([4], None, [[0, 0, 1, 1]], 4)  # two turns with no observation between
    assert explicit.tolist() == [[0, 0, 1, 1]]
    assert token_turn_index([2], None, None, 3).tolist() == [[0, 0, -1]]
    with pytest.raises(ValueError, match=r"env_mask\[0\] has 3 values but completion 0 has 4 tokens"):
        token_turn_index([4], [[1, 0, 1]], None, 4)


def test_bad_rollouts_fail_loudly(model_dir, tmp_path):
    def without_probes(prompts, trainer):
        output = run.rollout_func(prompts, trainer)
        del output["igpo_answer_logprob"]
        return output

    def one_probe_short(prompts, trainer):
        output = run.rollout_func(prompts, trainer)
        output["igpo_answer_logprob"] = [row[:-1] if len(row) > 1 else row for row in output["igpo_answer_logprob"]]
        return output

    trainer = run.make_trainer(model_dir, tmp_path / "a", per_device_batch=run.GLOBAL_ROWS, rollout=without_probes)
    with pytest.raises(ValueError, match="rollout_func must return 'igpo_answer_logprob'"):
        run.score_local_slice(trainer)
    trainer = run.make_trainer(model_dir, tmp_path / "b", per_device_batch=run.GLOBAL_ROWS, rollout=one_probe_short)
    with pytest.raises(ValueError, match="one probe log-prob per turn"):
        run.score_local_slice(trainer)
    with pytest.raises(ValueError, match=r"needs TRL's tool loop \(tools=\[...\] or environment_factory=...\) or a "
                                         r"rollout_func .*; got neither"):
        IGPOTrainer(model=trainer.model, reward_funcs=[run.outcome_reward], args=trainer.args,
                    train_dataset=trainer.train_dataset, processing_class=trainer.processing_class)



def test_supported_trl_range_is_the_declared_and_tested_one():
    pyproject = (ROOT / "pyproject.toml").read_text()
    trl_extra = re.findall(r'"([^"]+)"', re.search(r"^trl = \[(.*)\]$", pyproject, flags=re.M).group(1))
    assert f"trl{SUPPORTED_TRL_VERSIONS}" in trl_extra
    bounds = {spec.operator: Version(spec.version) for spec in SpecifierSet(SUPPORTED_TRL_VERSIONS)}
    floor, newest = (Version(version) for version in TESTED_TRL_VERSIONS)
    assert set(bounds) == {">=", "<"} and floor == bounds[">="]
    assert (newest.major, newest.minor + 1) == (bounds["<"].major, bounds["<"].minor)
    # The floor job (scripts/test_trl_floor.sh) pins the floor of every `trl` extra requirement.
    pins = {
        name: Version(version)
        for name, version in re.findall(r"^([\w-]+)==(\S+)$", (ROOT / "constraints-trl-floor.txt").read_text(), re.M)
    }
    # The `hf` extra it includes (torch, tokenizers) is not pinned: torch is constraints-cpu.txt's CPU wheel.
    floors = {name: Version(version) for name, version in re.findall(r"^([\w-]+)>=([\d.]+)", "\n".join(trl_extra), re.M)}
    assert pins == floors and pins["trl"] == floor
    check_trl_version(trl.__version__)
    expected = os.environ.get("IGPO_EXPECT_TRL")  # set by scripts/test_trl_floor.sh
    if expected is not None:
        assert trl.__version__ == expected == TESTED_TRL_VERSIONS[0]


@pytest.mark.parametrize("version", ["1.0.0", "1.9.0", "1.16.0", "1.16.3"])
def test_trl_versions_in_the_range_pass(version):
    check_trl_version(version)


@pytest.mark.parametrize("version", ["0.29.1", "1.0.0rc1", "1.16.0rc1", "1.17.0.dev0", "1.17.0", "2.0.0"])
def test_other_trl_versions_are_refused_at_construction(version, monkeypatch):
    message = rf"supports trl>=1\.0,<1\.17 \(tested: 1\.0\.0 and 1\.16\.0\); found trl {re.escape(version)}\."
    with pytest.raises(RuntimeError, match=message):
        check_trl_version(version)
    monkeypatch.setattr(trl, "__version__", version)
    with pytest.raises(RuntimeError, match=message):
        IGPOTrainer(model="unused", reward_funcs=[run.outcome_reward], rollout_func=run.rollout_func)


def test_arguments_whose_meaning_differs_between_trl_releases_are_refused():
    common = dict(model="unused", reward_funcs=[run.outcome_reward], rollout_func=run.rollout_func)
    with pytest.raises(TypeError, match="at most 9 positional arguments .* got 10"):
        IGPOTrainer("unused", *[None] * 9, rollout_func=run.rollout_func)
    with pytest.raises(ValueError, match=r"either a rollout_func or TRL's tool loop, not both: TRL's tool loop \(tools=...\)"):
        IGPOTrainer(tools=[len], **common)
    with pytest.raises(ValueError, match=r"not both: TRL's tool loop \(environment_factory=...\)"):
        IGPOTrainer(environment_factory=object, **common)
    for name, value in (("answers_column", "answers"), ("subgoals_column", "subgoals"), ("probe_template", "{answer}"),
                        ("probe_batch_size", 8)):
        with pytest.raises(ValueError, match=rf"{name} configure the probes of TRL's tool loop; with a rollout_func"):
            IGPOTrainer(**common, **{name: value})


def test_verls_outcome_only_opt_in_is_refused():
    """allow_outcome_only is verl's opt-in; IGPOTrainer always scores the probes, so the setting
    would mean nothing here and is refused rather than ignored."""
    with pytest.raises(ValueError, match="allow_outcome_only is the verl integration's opt-in"):
        IGPOTrainer(model="unused", reward_funcs=[run.outcome_reward], rollout_func=run.rollout_func,
                    igpo_settings={"allow_outcome_only": True})
