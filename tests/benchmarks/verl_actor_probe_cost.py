"""Actor-mode probes through verl 0.9.1's actor worker: probe tokens against the ideal T x P, and on
a GPU the milliseconds they add to the old-log-prob pass, next to the server-side probes.

Not collected by pytest (a script; run it from the repository root):

    python -m tests.benchmarks.verl_actor_probe_cost                 # CPU: token counts (tiny model)
    python -m tests.benchmarks.verl_actor_probe_cost --gpu           # one NVIDIA GPU: Qwen2.5-1.5B shape, bf16

Both go through ``ActorRolloutRefWorker(role="actor").compute_log_prob`` (verl's old-log-prob
pass: ``TrainingWorker.infer_batch`` -> the FSDP engine, fsdp2, remove-padding, dynamic batch
size) on synthetic trajectories in the legacy trainer's layout: a prompt, then T turns of a call
and an observation (the last turn without one), the probe plan of ``igpo_tool_agent``'s actor
mode, the outcome at the last token. Each configuration runs the batch with its probe plans and
without (verl's own pass), and reports per trajectory the probe query tokens the engine computed
(``igpo/probe_query_tokens``), the ideal T x P, and the tokens server-side probes would prefill
(sum over turns of context + P). Besides T = 4 and T = 10 for every trajectory (the shapes of
tests/benchmarks/verl_probe_cost_gpu.py) a "mixed" batch draws T in 1..10 per trajectory, so
rows of different probe lengths share micro-batches.

CPU (default): a tiny random Llama (hidden 64, 2 layers), prompt 50, call 10, observation 50,
P = 20, 16 trajectories, micro-batches of at most 2,000 tokens; the token counts are the result
(wall times on a shared CPU say little; ``--timings`` takes them anyway). Run through
tests/integrations/verl_cpu_engine.py.

GPU (``--gpu``; needs verl 0.9.1 with its requirements, ``pip install -e ".[verl]"``, and
flash-attn for verl's default attention): a random-weight model of Qwen2.5-1.5B's shape (bf16
mixed precision, flash_attention_2 when flash-attn imports, else sdpa), prompt 500, call 100,
observation 500, P = 20, 8 trajectories; the medians of ``--rounds`` timed calls with and
without probe plans (interleaved, after a warm-up) give the extra milliseconds and their share
of the pass (target: <= 15 % at T = 10); the server-side way (one forward per probe over
context + suffix with logits at every position, as ``prompt_logprobs`` computes) is timed on
the same weights. The probe values of the actor are checked against it (bf16: <= 0.05).

Prints one JSON line per batch shape.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

TURNS = {"T=4": [4], "T=10": [10], "mixed": list(range(1, 11))}
CPU = SimpleNamespace(prompt=50, call=10, observation=50, suffix=20, answer=4, trajectories=16, max_tokens=2000)
GPU = SimpleNamespace(prompt=500, call=100, observation=500, suffix=20, answer=4, trajectories=8, max_tokens=24576)


def trajectories(shape: SimpleNamespace, turn_choices: list[int], vocabulary: int, generator: torch.Generator) -> list:
    """Synthetic rows: prompt, then T turns of a call (+ an observation but after the last); the
    probe suffix ends in its answer (``answer`` tokens, then two closing tokens)."""
    from igpo_rewards.agent.probes import ProbeSuffix

    suffix = ProbeSuffix("", tuple(torch.randint(5, vocabulary, (shape.suffix,), generator=generator).tolist()),
                         answer_start=shape.suffix - shape.answer - 2, answer_end=shape.suffix - 2)
    rows = []
    for index in range(shape.trajectories):
        turns = turn_choices[int(torch.randint(len(turn_choices), (1,), generator=generator))]
        prompt = torch.randint(5, vocabulary, (shape.prompt,), generator=generator).tolist()
        response, mask, starts = [], [], []
        for turn in range(turns):
            starts.append(len(response))
            observation = shape.observation if turn < turns - 1 else 0
            response += torch.randint(5, vocabulary, (shape.call + observation,), generator=generator).tolist()
            mask += [1] * shape.call + [0] * observation
        rows.append(SimpleNamespace(prompt=prompt, response=response, mask=mask, starts=starts, suffix=suffix,
                                    outcome=float(index % 2), uid=f"q{index // 2}"))
    return rows


def legacy_batch(rows: list, *, with_plans: bool):
    """The rows as ``RayPPOTrainer._compute_old_log_prob`` sends them to the worker."""
    from verl import DataProto
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    from igpo_rewards.integrations import IGPOSettings
    from igpo_rewards.integrations.verl_actor import ACTOR_PROBES_KEY, actor_probe_plan

    width_prompt, width_response, count = max(len(r.prompt) for r in rows), max(len(r.response) for r in rows), len(rows)
    prompts = torch.zeros((count, width_prompt), dtype=torch.long)
    responses = torch.zeros((count, width_response), dtype=torch.long)
    attention = torch.zeros((count, width_prompt + width_response), dtype=torch.long)
    response_mask = torch.zeros((count, width_response), dtype=torch.long)
    rm_scores = torch.zeros((count, width_response))
    for b, row in enumerate(rows):
        prompts[b, width_prompt - len(row.prompt):] = torch.tensor(row.prompt)
        responses[b, : len(row.response)] = torch.tensor(row.response)
        attention[b, width_prompt - len(row.prompt): width_prompt + len(row.response)] = 1
        response_mask[b, : len(row.mask)] = torch.tensor(row.mask)
        rm_scores[b, len(row.response) - 1] = row.outcome
    non_tensors = {"uid": np.array([row.uid for row in rows], dtype=object)}
    if with_plans:
        plans = np.empty(count, dtype=object)
        plans[:] = [actor_probe_plan(prompt_length=len(row.prompt), turn_starts=row.starts, suffix=row.suffix,
                                     settings=IGPOSettings()) for row in rows]
        non_tensors[ACTOR_PROBES_KEY] = plans
    batch = DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], dim=1),
                 "attention_mask": attention, "position_ids": torch.clamp(torch.cumsum(attention, 1) - 1, min=0),
                 "response_mask": response_mask, "rm_scores": rm_scores},
        non_tensors=non_tensors,
    )
    batch.meta_info.update(temperature=1.0, global_token_num=attention.sum(-1).tolist())
    data = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(data, calculate_entropy=True, compute_loss=False)
    return data


def flat(values) -> list[int]:
    """A metric verl gathered per micro-batch (lists of lists across data-parallel ranks), flattened."""
    return [item for value in values for item in flat(value)] if isinstance(values, (list, tuple)) else [int(values)]


def total(values) -> int:
    return sum(flat(values))


def token_counts(rows: list, output) -> dict:
    from verl.utils import tensordict_utils as tu

    metrics = tu.get(output, "metrics")
    count = len(rows)
    ideal = sum(len(row.starts) * len(row.suffix.token_ids) for row in rows)
    query = total(metrics["igpo/probe_query_tokens"])
    assert total(metrics["igpo/probe_tokens"]) == ideal
    server = sum(len(row.prompt) + start + len(row.suffix.token_ids) for row in rows for start in row.starts)
    return {
        "trajectories": count,
        "mean_turns": round(sum(len(row.starts) for row in rows) / count, 2),
        "trajectory_tokens": round(sum(len(row.prompt) + len(row.response) for row in rows) / count, 1),
        "probe_query_tokens_per_trajectory": round(query / count, 1),
        "ideal_probe_tokens_per_trajectory": round(ideal / count, 1),
        "ratio_to_ideal": round(query / ideal, 3),
        "probe_forwards": total(metrics["igpo/probe_forwards"]),
        "micro_batches": len(flat(metrics["igpo/probe_forwards"])),
        "server_side_prefill_tokens_per_trajectory": round(server / count, 1),
    }


def save_model(directory: Path, *, gpu: bool) -> int:
    """Writes a random-weight causal LM (HF layout) and a tokenizer to ``directory``; returns the
    model's vocabulary size."""
    from igpo_rewards.testing.tiny import build_model, train_tokenizer

    tokenizer = train_tokenizer(["Now there's enough information to answer <answer> a </answer>"] * 8, vocab_size=300)
    if gpu:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                             num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                             rope_theta=1000000.0, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    else:
        model = build_model(tokenizer, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                            max_position_embeddings=4096, seed=0)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return model.config.vocab_size


def actor_config(path: Path, *, gpu: bool, shape: SimpleNamespace, attention: str):
    import verl
    from hydra import compose, initialize_config_dir

    overrides = [
        f"actor_rollout_ref.model.path={path}",
        f"+actor_rollout_ref.model.override_config.attn_implementation={attention}",
        "actor_rollout_ref.model.use_remove_padding=True",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.use_dynamic_bsz=True",
        f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={shape.max_tokens}",
        f"actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu={shape.max_tokens}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.rollout.n=1",
        "actor_rollout_ref.rollout.checkpoint_engine.backend=naive",
        "algorithm.adv_estimator=igpo",
    ]
    if not gpu:
        overrides += [
            "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
            "actor_rollout_ref.actor.fsdp_config.model_dtype=fp32",
            "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
            "+actor_rollout_ref.actor.fsdp_config.mixed_precision.reduce_dtype=fp32",
            "+actor_rollout_ref.actor.fsdp_config.mixed_precision.buffer_dtype=fp32",
        ]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def timed(call):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, 1000 * (time.perf_counter() - started)


def run(arguments: argparse.Namespace) -> None:
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from igpo_rewards.integrations import verl_actor

    gpu = arguments.gpu
    shape = GPU if gpu else CPU
    attention = "sdpa"
    if gpu:
        try:
            import flash_attn  # noqa: F401

            attention = "flash_attention_2"
        except ImportError:
            pass
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory)
        vocabulary = min(save_model(path, gpu=gpu), 150000)
        worker = ActorRolloutRefWorker(config=actor_config(path, gpu=gpu, shape=shape, attention=attention).actor_rollout_ref,
                                       role="actor")
        worker.init_model()
        assert isinstance(worker.actor.engine, verl_actor.IGPOFSDPEngineWithLMHead), type(worker.actor.engine)
        reference = None
        if gpu or arguments.timings:
            from transformers import AutoModelForCausalLM

            reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if gpu else torch.float32,
                                                             attn_implementation="sdpa").to("cuda" if gpu else "cpu").eval()
        generator = torch.Generator().manual_seed(0)
        for name, choices in TURNS.items():
            rows = trajectories(shape, choices, vocabulary, generator)
            with_plans, without = legacy_batch(rows, with_plans=True), legacy_batch(rows, with_plans=False)
            output = worker.compute_log_prob(with_plans.clone())
            report = {"batch": name, "device": torch.cuda.get_device_name() if gpu else "cpu", "attention": attention,
                      **token_counts(rows, output)}
            if reference is not None:
                report.update(timings(worker, reference, rows, with_plans, without, output, arguments.rounds))
            print(json.dumps(report), flush=True)
            assert report["ratio_to_ideal"] <= 1.2, report


def timings(worker, reference, rows, with_plans, without, output, rounds: int) -> dict:
    from verl.utils import tensordict_utils as tu

    from igpo_rewards.integrations.verl import ANSWER_LOGPROB_KEY

    from .verl_probe_cost_gpu import server_side

    times = {"with": [], "without": [], "server": []}
    server = None
    for round_index in range(rounds + 1):  # the first round warms up
        _, ms_without = timed(lambda: worker.compute_log_prob(without.clone()))
        _, ms_with = timed(lambda: worker.compute_log_prob(with_plans.clone()))
        with torch.no_grad():
            server, ms_server = timed(lambda: server_side(reference, [r.prompt + r.response for r in rows],
                                                          [[len(r.prompt) + s for s in r.starts] for r in rows],
                                                          [r.suffix for r in rows]))
        if round_index:
            times["with"].append(ms_with)
            times["without"].append(ms_without)
            times["server"].append(ms_server)
    actor = tu.get(output, ANSWER_LOGPROB_KEY)
    difference = max(float((row - server[b, : row.shape[0]]).abs().max()) for b, row in enumerate(actor.unbind()))
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "old_log_prob_pass_ms": round(median["without"], 1),
        "with_probes_ms": round(median["with"], 1),
        "actor_side_extra_ms": round(median["with"] - median["without"], 1),
        "actor_side_extra_share": round((median["with"] - median["without"]) / median["without"], 3),
        "server_side_probes_ms": round(median["server"], 1),
        "rounds": rounds,
        "max_abs_difference_to_server_side": round(difference, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="one NVIDIA GPU, the Qwen2.5-1.5B shape (bf16)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up)")
    parser.add_argument("--timings", action="store_true", help="on the CPU too: time both ways (always on a GPU)")
    arguments = parser.parse_args()
    if arguments.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29581"), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
        run(arguments)
        return
    from tests.integrations import verl_cpu_engine

    with verl_cpu_engine.cpu_actor_environment(port=29582):
        run(arguments)


if __name__ == "__main__":
    main()
