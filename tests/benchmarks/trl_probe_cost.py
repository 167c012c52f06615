"""What IGPO's probes add to a TRL step, on TRL's tool loop and on the rollout function (a script, not a test).

    python tests/benchmarks/trl_probe_cost.py --demo_dir RUN --repeats 5 [--out costs.jsonl]

From the demo's warm start (``igpo-train demo``: ``RUN/warm_start``, ``RUN/data``), with the
examples' settings (one generation batch = 8 questions x G = 8 rollouts, at most 4 turns of at
most 24 tokens, 3 documents per search, one torch thread), it builds three trainers on the same
model weights and times one generation batch of each, ``--repeats`` times, each repeat on the
same questions and torch seed for all three (so (a) and (b) generate the same rollouts):

(a) ``GRPOTrainer(tools=[search])``: TRL's own step on its tool loop (no probes);
(b) ``IGPOTrainer(tools=[search])``: the same, plus the probe before every turn on the trainer's
    model (kv_cache layout) and IGPO's advantages;
(c) ``IGPOTrainer(rollout_func=make_search_rollout_func(...))``: the rollout-function path
    (kv_cache probes, as the tool loop's).

One generation batch is ``GRPOTrainer._generate_and_score_completions``: generation, tool calls,
rewards, TRL's old and reference log-probs (``beta=0.001`` as in the examples) and (b, c) the
probes and advantages. The examples train
``steps_per_generation = 2`` optimizer steps on each batch, so the extra seconds per optimizer
step are half the extra seconds per batch. The optimizer steps themselves are the same in all
three (the loss takes [B] or [B, C] advantages) and are not timed here.

Printed per repeat, one JSON line per trainer: wall and process CPU seconds of the batch,
``igpo/probe_seconds`` (the probe block's wall seconds) and the probe block's process CPU seconds
(the one probe helper both paths call, ``igpo_rewards.integrations.trl._probes.probe_log_probs``,
timed by a wrapper this script installs; on a shared machine CPU seconds vary far less than wall
seconds). Then the medians and (b) - (a). The
searches go to an in-process BM25 index (``BM25Retriever``) rather than ``igpo-retrieve``, so no
HTTP time enters the numbers. ``uptime`` is printed first and last: quote the load with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from igpo_rewards.agent.bm25 import BM25Retriever  # noqa: E402
from igpo_rewards.agent.protocol import user_message  # noqa: E402
from igpo_rewards.agent.retrieval import read_corpus_jsonl  # noqa: E402
from igpo_rewards.integrations.trl import (  # noqa: E402
    PROBE_SECONDS_KEY,
    IGPOTrainer,
    make_outcome_reward_func,
    make_search_rollout_func,
    make_search_tool,
    use_search_r1_tool_protocol,
)
from igpo_rewards.reference_trainer.modeling import load_pretrained  # noqa: E402
from igpo_rewards.reference_trainer.world import load_qa_parquet  # noqa: E402

WAYS = ("a_grpo_tools", "b_igpo_tools", "c_igpo_rollout_func")
_PROBE_CPU: list[float] = []


def _instrument_probes() -> None:
    """Times the process CPU of every probe block: both paths call ``probe_log_probs`` by the name they imported."""
    from igpo_rewards.integrations.trl import search, trainer

    original = trainer.probe_log_probs

    def timed(*args, **kwargs):
        started = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            _PROBE_CPU.append(time.process_time() - started)

    trainer.probe_log_probs = search.probe_log_probs = timed


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def build_trainers(demo_dir: Path, out: Path, *, questions: int, group_size: int, max_turns: int, max_new_tokens: int,
                   topk: int) -> tuple[dict, list[dict]]:
    """The three trainers of the module docstring on the warm start's weights, and one batch of rows."""
    examples = load_qa_parquet(demo_dir / "data" / "train.parquet")[:questions]
    rows = [{"prompt": [{"role": "user", "content": user_message(e.question)}], "answers": list(e.answers)} for e in examples]
    retriever = BM25Retriever(read_corpus_jsonl(demo_dir / "data" / "corpus.jsonl"))
    config = dict(  # the examples' round: one batch of questions x G rollouts, two optimizer steps, k3 KL to the start
        per_device_train_batch_size=questions * group_size // 2, steps_per_generation=2, num_generations=group_size,
        max_steps=2, beta=0.001, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        save_strategy="no", seed=0,
    )
    trainers = {}
    for way in WAYS:
        model, tokenizer = load_pretrained(demo_dir / "warm_start")
        dataset = Dataset.from_list(rows)
        if way == "c_igpo_rollout_func":
            trainers[way] = IGPOTrainer(
                model=model, reward_funcs=[make_outcome_reward_func("answers")], processing_class=tokenizer,
                args=GRPOConfig(output_dir=str(out / way), **config), train_dataset=dataset,
                rollout_func=make_search_rollout_func(retriever, max_turns=max_turns, max_new_tokens=max_new_tokens,
                                                      topk=topk, probe_layout="kv_cache"),
            )
            continue
        use_search_r1_tool_protocol(model, tokenizer)
        tool_config = GRPOConfig(
            output_dir=str(out / way), max_tool_calling_iterations=max_turns - 1, generation_kwargs={"max_new_tokens": max_new_tokens},
            max_completion_length=model.config.max_position_embeddings, **config,
        )
        trainer_class = GRPOTrainer if way == "a_grpo_tools" else IGPOTrainer
        trainers[way] = trainer_class(
            model=model, reward_funcs=[make_outcome_reward_func("answers", tokenizer=tokenizer)], processing_class=tokenizer,
            args=tool_config, train_dataset=dataset, tools=[make_search_tool(retriever, topk=topk)],
        )
    return trainers, [row for row in rows for _ in range(group_size)]


def time_batch(trainer, batch: list[dict], seed: int) -> dict:
    """Wall and CPU seconds of one generation batch (train mode), and its probe seconds."""
    trainer.model.train()
    torch.manual_seed(seed)
    _PROBE_CPU.clear()
    wall, cpu = time.perf_counter(), time.process_time()
    output = trainer._generate_and_score_completions([dict(row) for row in batch])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    probes = trainer._metrics["train"].get(PROBE_SECONDS_KEY) or [0.0]
    return {"wall_s": wall, "cpu_s": cpu, "probe_s": probes[-1], "probe_cpu_s": sum(_PROBE_CPU),
            "completion_tokens": int(output["completion_mask"].sum())}


def summarize(records: list[dict]) -> dict:
    """Medians per way and the tool loop's extra seconds per batch and per optimizer step ((b) - (a))."""
    medians = {way: {key: statistics.median(r[key] for r in records if r["way"] == way)
                     for key in ("wall_s", "cpu_s", "probe_s", "probe_cpu_s")} for way in WAYS if any(r["way"] == way for r in records)}
    extra = {key: medians["b_igpo_tools"][key] - medians["a_grpo_tools"][key] for key in ("wall_s", "cpu_s")}
    return {"medians": medians, "tools_extra_per_batch": extra,
            "tools_extra_per_optimizer_step": {key: value / 2 for key, value in extra.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo_dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--max_turns", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/igpo_trl_probe_cost"))
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _instrument_probes()
    print(json.dumps({"uptime_start": _uptime()}), flush=True)
    trainers, batch = build_trainers(args.demo_dir, args.work_dir, questions=args.questions, group_size=args.group_size,
                                     max_turns=args.max_turns, max_new_tokens=args.max_new_tokens, topk=args.topk)
    records = []
    for repeat in range(args.repeats):
        for way, trainer in trainers.items():
            record = {"repeat": repeat, "way": way, **time_batch(trainer, batch, seed=repeat)}
            records.append(record)
            print(json.dumps(record), flush=True)
    summary = {**summarize(records), "uptime_end": _uptime(), "command": " ".join([sys.executable, *sys.argv])}
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        args.out.write_text("\n".join(json.dumps(r) for r in [*records, summary]) + "\n")
    return summary


if __name__ == "__main__":
    main()
