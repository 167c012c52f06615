"""Synthetic multi-turn rollouts for IGPOTrainer, shared by test_trl.py and its torchrun workers.

Run under ``torchrun --nproc_per_node N trl_igpo_run.py MODEL_DIR OUT_DIR [targets]``: every process builds
an IGPOTrainer on the tiny model in MODEL_DIR, scores its slice of the same global batch
(GLOBAL_ROWS completions, groups of NUM_GENERATIONS spread over the processes) and writes
its rows' advantages to OUT_DIR/rank{r}.pt. With ``targets`` the rollouts also carry sub-goal
targets (``target_rollout_func``) and the trainer weighs them (``TARGET_SETTINGS``).

Completion k of the global batch is a deterministic function of k (turn count, token ids,
observation lengths, probe log-probs, outcome), so one process and N processes see the same
data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

NUM_GENERATIONS = 4
GLOBAL_ROWS = 12  # 3 questions x 4 completions
EQUAL_OUTCOME_GROUP = 2  # every completion of question 2 gets outcome 1.0: GRPO's advantage collapse


def synthetic_completion(k: int, vocab_size: int, eos_id: int) -> dict:
    """Completion k: turns of generated tokens separated by observation tokens, and its probes."""
    rng = np.random.default_rng(1000 + k)
    num_turns = 1 + (k * 5 + k // NUM_GENERATIONS) % 3
    ids, env_mask = [], []
    for turn in range(num_turns):
        length = int(rng.integers(2, 5))
        ids += rng.integers(10, vocab_size - 1, size=length).tolist()
        env_mask += [1] * length
        if turn < num_turns - 1:
            observation = int(rng.integers(1, 4))
            ids += rng.integers(10, vocab_size - 1, size=observation).tolist()
            env_mask += [0] * observation
    ids[-1] = eos_id  # the answer turn ends the completion
    answer_logprob = np.log(rng.uniform(0.05, 0.95, size=num_turns))
    if k == 1 and num_turns >= 2:
        answer_logprob[1] = answer_logprob[0]  # an exact-zero information gain
    group = k // NUM_GENERATIONS
    outcome = 1.0 if group == EQUAL_OUTCOME_GROUP else float(np.round(rng.uniform(-0.5, 1.0), 2))
    return {
        "completion_ids": ids,
        "env_mask": env_mask,
        "igpo_answer_logprob": answer_logprob.tolist(),
        "outcome": outcome,
    }


def global_inputs() -> list[dict]:
    return [{"prompt": f"Question {k // NUM_GENERATIONS}: who wrote it?"} for k in range(GLOBAL_ROWS)]


def rollout_func(prompts: list, trainer) -> dict:
    """TRL rollout_func: completion k = process_index * len(prompts) + i of the global batch."""
    tokenizer = trainer.processing_class
    start = trainer.accelerator.process_index * len(prompts)
    rows = [synthetic_completion(start + i, len(tokenizer), tokenizer.eos_token_id) for i in range(len(prompts))]
    return {
        "prompt_ids": [tokenizer(prompt)["input_ids"] for prompt in prompts],
        "completion_ids": [row["completion_ids"] for row in rows],
        "logprobs": [[-1.0] * len(row["completion_ids"]) for row in rows],
        "env_mask": [row["env_mask"] for row in rows],
        "igpo_answer_logprob": [row["igpo_answer_logprob"] for row in rows],
        "outcome": [row["outcome"] for row in rows],
    }


TARGET_SETTINGS = {"subgoal_weight": 0.5}


def synthetic_targets(k: int, answer_logprob: list[float]) -> list[list[float]]:
    """Completion k's probes of its K_k targets per turn, the answer first. K_k = 1 on the first half of
    the global batch, 2 or 3 on the second: with two processes each has a different K."""
    rng = np.random.default_rng(2000 + k)
    count = 1 if k < GLOBAL_ROWS // 2 else 2 + k % 2
    subgoals = np.log(rng.uniform(0.05, 0.95, size=(len(answer_logprob), count - 1)))
    return [[answer, *row.tolist()] for answer, row in zip(answer_logprob, subgoals)]


def target_rollout_func(prompts: list, trainer) -> dict:
    """``rollout_func`` plus ``igpo_target_logprob``: each turn's probes of the completion's targets."""
    output = rollout_func(prompts, trainer)
    start = trainer.accelerator.process_index * len(prompts)
    output["igpo_target_logprob"] = [
        synthetic_targets(start + i, probes) for i, probes in enumerate(output["igpo_answer_logprob"])
    ]
    return output


def outcome_reward(prompts, completions, outcome, **kwargs):
    """Reward function: the synthetic outcome the rollout_func attached to each completion."""
    return list(outcome)


def make_trainer(model_dir, out_dir, per_device_batch: int, igpo_settings=None, rollout=rollout_func, **config):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from igpo_rewards.integrations.trl import IGPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = GRPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=per_device_batch,
        num_generations=NUM_GENERATIONS,
        max_steps=1,
        learning_rate=1e-2,
        beta=0.0,
        loss_type="grpo",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        **config,
    )
    return IGPOTrainer(
        model=model,
        reward_funcs=[outcome_reward],
        args=args,
        train_dataset=Dataset.from_list(global_inputs()),
        processing_class=tokenizer,
        rollout_func=rollout,
        igpo_settings=igpo_settings,
    )


def score_local_slice(trainer) -> dict:
    """Runs IGPOTrainer's scoring on this process's slice of the global batch."""
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    local = GLOBAL_ROWS // world
    trainer.model.train()
    output = trainer._generate_and_score_completions(global_inputs()[rank * local : (rank + 1) * local])
    return {"advantages": output["advantages"].cpu(), "completion_mask": output["completion_mask"].cpu()}


def main(argv: list[str]) -> int:
    import os

    import torch

    model_dir, out_dir, *mode = argv
    world = int(os.environ["WORLD_SIZE"])
    options = dict(igpo_settings=TARGET_SETTINGS, rollout=target_rollout_func) if mode == ["targets"] else {}
    trainer = make_trainer(model_dir, Path(out_dir) / "trainer", per_device_batch=GLOBAL_ROWS // world, **options)
    if trainer.accelerator.num_processes != world:
        raise RuntimeError(f"accelerate sees {trainer.accelerator.num_processes} processes, torchrun started {world}")
    result = score_local_slice(trainer)
    result["backend"] = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    torch.save(result, Path(out_dir) / f"rank{trainer.accelerator.process_index}.pt")
    trainer.accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
