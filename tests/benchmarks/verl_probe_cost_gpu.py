"""Server-side probes against the actor-side packed forward on a GPU, at the paper's number of turns.

Not collected by pytest (a GPU script). A server-side probe (``igpo_tool_agent`` through vLLM or
SGLang with ``prompt_logprobs``) prefills its whole context plus the suffix and computes logits at
every prompt position; the actor-side way runs the old-log-prob forward (which PPO needs anyway)
with its KV cache and then only the T x P probe tokens (``probe_forward(probe_layout="kv_cache")``).
Both are timed here on the same random-weight model of Qwen2.5-1.5B's shape (bf16, SDPA) over
synthetic trajectories: a prompt, then T turns of a call and an observation; the probes' answer
log-probs of the two ways are compared (<= 0.05 in bf16).

    python tests/benchmarks/verl_probe_cost_gpu.py [--turns 4 10] [--trajectories 8] [--rounds 3] [--smoke]

Prints one JSON line per T (tokens and milliseconds of each way). docs/integrations/verl.md quotes a
run made with the kernel of main 55f3554 (``packed_forward``, the same KV-cache layout).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from igpo_rewards.agent.probes import ProbeSuffix, pad_token_ids, probe_forward, suffix_table, token_logprobs

PROMPT, CALL, OBSERVATION, SUFFIX, ANSWER = 500, 100, 500, 20, 4


def model_like_qwen25_1p5b(device: str, *, smoke: bool = False) -> LlamaForCausalLM:
    sizes = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12)
    if smoke:  # a CPU check of the script itself
        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = LlamaConfig(vocab_size=151936, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True, **sizes)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa",
                                              dtype=torch.float32 if smoke else torch.bfloat16)
    return model.eval()


def trajectories(count: int, turns: int, generator: torch.Generator) -> tuple[list[list[int]], list[list[int]], list[ProbeSuffix]]:
    token_ids, starts = [], []
    for _ in range(count):
        row = torch.randint(0, 150000, (PROMPT,), generator=generator).tolist()
        row_starts = []
        for turn in range(turns):
            row_starts.append(len(row))
            row += torch.randint(0, 150000, (CALL,), generator=generator).tolist()
            if turn < turns - 1:
                row += torch.randint(0, 150000, (OBSERVATION,), generator=generator).tolist()
        token_ids.append(row)
        starts.append(row_starts)
    suffix_ids = tuple(torch.randint(0, 150000, (SUFFIX,), generator=generator).tolist())
    suffix = ProbeSuffix(text="", token_ids=suffix_ids, answer_start=SUFFIX - ANSWER - 2, answer_end=SUFFIX - 2)
    return token_ids, starts, [suffix] * count


def server_side(model, token_ids, starts, suffixes) -> torch.Tensor:
    """One request per probe: forward over context + suffix, log-probs at every position (prompt_logprobs)."""
    values = torch.zeros((len(token_ids), max(len(s) for s in starts)))
    for b, (row, row_starts, suffix) in enumerate(zip(token_ids, starts, suffixes)):
        for j, start in enumerate(row_starts):
            sequence = torch.tensor([row[:start] + list(suffix.token_ids)], device=model.device)
            logprobs = torch.log_softmax(model(input_ids=sequence, use_cache=False).logits[0].float(), dim=-1)
            positions = torch.arange(start + suffix.answer_start, start + suffix.answer_end, device=model.device)
            values[b, j] = logprobs[positions - 1, sequence[0, positions]].mean().cpu()
    return values


def timed(function, *args, **kwargs):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = function(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, 1000 * (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, nargs="+", default=[4, 10])
    parser.add_argument("--trajectories", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (checks the script)")
    arguments = parser.parse_args()
    model = model_like_qwen25_1p5b("cpu" if arguments.smoke else "cuda", smoke=arguments.smoke)
    generator = torch.Generator().manual_seed(0)
    for turns in arguments.turns:
        token_ids, starts, suffixes = trajectories(arguments.trajectories, turns, generator)
        input_ids, lengths = pad_token_ids(token_ids, device=model.device)
        turn_starts, _ = pad_token_ids(starts, device=model.device)
        turn_mask = torch.ones(turn_starts.shape, dtype=torch.bool, device=model.device)
        positions = torch.arange(input_ids.shape[1], device=model.device)[None, :]
        scored = (positions >= PROMPT) & (positions < lengths[:, None])  # the response's old log-probs
        table = suffix_table(suffixes, device=model.device)
        times: dict[str, list[float]] = {"server_side": [], "actor_forward": [], "actor_forward_with_probes": []}
        with torch.no_grad():
            for _ in range(arguments.rounds + 1):  # the first round warms up
                server, ms_server = timed(server_side, model, token_ids, starts, suffixes)
                _, ms_forward = timed(token_logprobs, model, input_ids, scored)
                actor, ms_actor = timed(probe_forward, model, input_ids, lengths, turn_starts, turn_mask, table,
                                        token_mask=scored, probe_layout="kv_cache", pad_token_id=0)
                for name, value in (("server_side", ms_server), ("actor_forward", ms_forward),
                                    ("actor_forward_with_probes", ms_actor)):
                    times[name].append(value)
        difference = (server - actor.answer_logprob.float().cpu()).abs().max().item()
        median = {name: statistics.median(values[1:]) for name, values in times.items()}
        print(json.dumps({
            "turns": turns,
            "trajectories": arguments.trajectories,
            "trajectory_tokens": sum(len(row) for row in token_ids) // len(token_ids),
            "server_side_tokens_per_trajectory": sum(sum(s + SUFFIX for s in row) for row in starts) // len(starts),
            "ideal_probe_tokens_per_trajectory": turns * SUFFIX,
            "server_side_ms": round(median["server_side"], 1),
            "actor_forward_ms": round(median["actor_forward"], 1),
            "actor_forward_with_probes_ms": round(median["actor_forward_with_probes"], 1),
            "actor_side_extra_ms": round(median["actor_forward_with_probes"] - median["actor_forward"], 1),
            "max_abs_difference": difference,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        }), flush=True)
        assert difference < 0.05, difference


if __name__ == "__main__":
    main()
