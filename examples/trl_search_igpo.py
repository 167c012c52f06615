"""IGPO with TRL on the reference trainer's world: a CPU run that learns to search.

    bash scripts/demo.sh                                   # once: writes runs/demo/{warm_start,data}
    python examples/trl_search_igpo.py --output_dir runs/trl_igpo

    igpo-train demo --budget mid --out runs/demo_mid       # a few minutes: docs/first_hour.md
    python examples/trl_search_igpo.py --demo_dir runs/demo_mid --budget mid --output_dir runs/trl_mid

What it does, top to bottom:

1. reads the demo's questions (``runs/demo/data/*.parquet``, the verl/Search-R1 layout) into a
   TRL dataset: ``prompt`` (the Search-R1 instruction as one user message), ``answers`` (the
   aliases) and ``hops``;
2. serves the demo's corpus (``runs/demo/data/corpus.jsonl``) with ``igpo-retrieve serve`` on a
   loopback port, the Search-R1 ``/retrieve`` API;
3. loads the demo's warm-start model (``runs/demo/warm_start``) and scores it on the held-out
   questions: greedy rollouts, exact match by hop count (the reference trainer's ``evaluate``);
4. trains it with ``IGPOTrainer`` + ``make_search_rollout_func`` (searches over HTTP, probes
   before every turn) + ``make_outcome_reward_func`` (answer F1, -2.0 for a malformed
   response), with TRL's own progress bar, logging and checkpoints in ``--output_dir``;
5. scores the trained model the same way, checks that every stage of the pipeline ran and gave the
   update a signal (``pipeline_check``: rollouts, probes, turns, information gain, advantages,
   gradient, weights; exit status 1 when it did not), and writes ``--output_dir/heldout_em.json``.

A run that cannot learn (the warm start of ``igpo-train demo --budget quick``, or a single round of
rollouts) says so at the start and at the end: a smoke run, whose held-out EM is not expected to
move; its pipeline check is what tells a working set-up from a broken one.

Its own flags (``--demo_dir``, ``--budget``, ``--max_turns``, ``--max_new_tokens``, ``--topk``,
``--threads``, ``--eval_batch_size``, ``--probe_layout``) are listed by ``--help``; every ``GRPOConfig`` field is a flag too
(``--learning_rate``, ``--max_steps``, ``--logging_steps``, ``--save_steps``, ...; ``--help_trl``
lists them all). The defaults below mirror the reference trainer's IGPO run
(``igpo-train demo``): 30 rounds of 8 questions x 8 rollouts (1,920 rollouts), each round two
AdamW steps of 32 rollouts (``steps_per_generation=2``, so ``max_steps=60``), learning rate 1e-4,
PPO clip 0.2, k3 KL 0.001 to the warm start, loss averaged over a rollout's tokens then over
rollouts, gradient norm clipped to 1, float32 on the CPU.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow.parquet as pq
import torch
from datasets import Dataset
from transformers import HfArgumentParser
from trl import GRPOConfig

import igpo_rewards
from igpo_rewards.agent.protocol import user_message
from igpo_rewards.agent.retrieval import HTTPRetriever
from igpo_rewards.integrations.trl import IGPOTrainer, make_outcome_reward_func, make_search_rollout_func
from igpo_rewards.reference_trainer.config import budget_note, quick_config
from igpo_rewards.reference_trainer.evaluation import evaluate
from igpo_rewards.reference_trainer.modeling import load_pretrained
from igpo_rewards.reference_trainer.world import load_qa_parquet


@dataclass
class SearchArguments:
    """The example's own flags (``--help`` lists them; every ``GRPOConfig`` field is a flag too, ``--help_trl``)."""

    demo_dir: str = field(default="runs/demo", metadata={"help": (
        "A demo run directory (igpo-train demo): warm_start/ (the model) and data/ (corpus.jsonl, train.parquet, "
        "heldout.parquet).")})
    budget: Literal["full", "mid", "quick"] = field(default="full", metadata={"help": (
        "full: the reference trainer's IGPO run (30 rounds). mid: fewer rounds that still learn visibly (minutes, "
        "from an `igpo-train demo --budget mid`). quick: one round, a smoke run that only checks the pipeline. "
        "Flags given explicitly override the budget's values (listed below).")})
    max_turns: int = field(default=4, metadata={"help": "Most turns per rollout (searches plus the answer), in training "
                                                         "and evaluation."})
    max_new_tokens: int = field(default=24, metadata={"help": "Most tokens generated per turn."})
    topk: int = field(default=3, metadata={"help": "Documents returned per search."})
    threads: int = field(default=1, metadata={"help": "Torch CPU threads (the reference trainer's demo runs each RL "
                                                       "process on one)."})
    eval_batch_size: int = field(default=64, metadata={"help": "Held-out questions per generate batch (the greedy "
                                                                "evaluation before and after training)."})
    probe_layout: str = field(default="packed", metadata={"help": (
        "How the probes are laid out in their forward: packed (copies after each trajectory) or kv_cache (a second "
        "pass over the trajectory's KV cache, what examples/trl_tools_igpo.py uses); same values up to float rounding.")})


# GRPOConfig values of the reference trainer's IGPO run (RLConfig defaults), for a CPU.
RUN_DEFAULTS = dict(
    output_dir="runs/trl_igpo",
    num_generations=8,  # G
    per_device_train_batch_size=32,  # one AdamW step on 32 rollouts ...
    steps_per_generation=2,  # ... two per round of 8 questions x 8 rollouts
    max_steps=60,  # 30 rounds
    learning_rate=1e-4,
    lr_scheduler_type="constant",
    weight_decay=0.0,
    max_grad_norm=1.0,
    epsilon=0.2,  # PPO clip
    beta=0.001,  # k3 KL to the reference (the warm start)
    loss_type="grpo",  # mean over a rollout's tokens, then over rollouts
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    logging_steps=2,  # once per round
    save_strategy="steps",
    save_steps=20,
    report_to="none",
    seed=0,
)


BUDGETS: dict[str, dict[str, Any]] = {
    "full": {},
    "mid": dict(max_steps=20, save_steps=20),
    "quick": dict(max_steps=2, logging_steps=1, save_steps=2),
}
"""``--budget`` -> the GRPOConfig values it changes from RUN_DEFAULTS (explicit flags win)."""


def qa_dataset(path: Path) -> tuple[Dataset, list]:
    """A verl/Search-R1 parquet of questions as a TRL dataset (its ``prompt`` column as written,
    ``answers``, ``hops``), and the questions themselves.

    ``igpo-train demo`` writes the prompt the reference trainer rolls out from (the Search-R1
    instruction with the question, one user message), so it is used as is, never wrapped again.

    Raises:
        ValueError: a row whose prompt is not that instruction (e.g. a demo written before the
            parquet held it), naming the row.
    """
    examples = load_qa_parquet(path)
    prompts = pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()
    for row, (prompt, example) in enumerate(zip(prompts, examples)):
        if prompt[-1]["content"] != user_message(example.question):
            raise ValueError(f"{path}: row {row}: the prompt is not the Search-R1 instruction the reference trainer uses "
                             f"(got {prompt[-1]['content']!r:.80}); re-run `igpo-train demo` to write the data again")
    rows = [{"prompt": prompt, "answers": list(e.answers), "hops": e.hops} for prompt, e in zip(prompts, examples)]
    return Dataset.from_list(rows), examples


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve_corpus(corpus: Path, *, timeout_s: float = 300.0) -> Iterator[str]:
    """``igpo-retrieve serve`` on ``corpus`` (a loopback port) for the ``with`` block; yields its URL."""
    command = shutil.which("igpo-retrieve", path=str(Path(sys.executable).parent)) or shutil.which("igpo-retrieve")
    if command is None:
        raise FileNotFoundError('igpo-retrieve is not installed: install the "server" extra (in this clone: '
                                'pip install ".[server]"; README, "Install")')
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # The server's stderr goes to a file: its reason lands in the error if it exits before serving
    # (a missing extra, a bad corpus), and is passed on to ours when the block ends otherwise.
    server_log = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen([command, "serve", "--corpus", str(corpus), "--port", str(port), "--log-level", "warning"],
                              stderr=server_log)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if server.poll() is not None:
                server_log.seek(0)
                said = "\n".join(server_log.read().strip().splitlines()[-5:]) or "(nothing on stderr)"
                server_log.truncate(0)
                raise RuntimeError(f"igpo-retrieve exited with status {server.returncode} before serving {url}; "
                                   f"it said:\n{said}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"igpo-retrieve did not answer on {url} within {timeout_s} s") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        server_log.seek(0)
        sys.stderr.write(server_log.read())  # what the server logged while serving
        server_log.close()


def heldout_em(model, tokenizer, retriever, examples, args: SearchArguments) -> dict:
    """Greedy rollouts on the held-out questions: EM/F1 overall and by hop count (eval.json layout)."""
    return evaluate(
        model, tokenizer, retriever, examples, max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
        topk=args.topk, batch_size=args.eval_batch_size,
    )


def _summary(scores: dict) -> str:
    hops = ", ".join(f"{hop}-hop {100 * s['em']:.1f}" for hop, s in scores["by_hops"].items())
    return f"EM {100 * scores['em']:.1f} ({hops}; n = {scores['n']})"


def _own_help(arguments: type, prog: str, description: str, defaults: dict) -> str:
    """``--help``: the example's flags, the GRPOConfig values it changes, and how to see TRL's."""
    own = HfArgumentParser(arguments, prog=prog, description=description)
    changed = "\n".join(f"  --{name} {value}" for name, value in defaults.items())
    budgets = "\n".join(f"  --budget {name}: " + (" ".join(f"--{key} {value}" for key, value in values.items()) or "(the values above)")
                         for name, values in BUDGETS.items())
    return (own.format_help() + "\nGRPOConfig values this example sets (the reference trainer's IGPO run; override them "
            f"with the same flags):\n{changed}\n\nWhat each --budget changes:\n{budgets}\n\nEvery other GRPOConfig "
            "field (TRL's) is a flag too: --help_trl lists all of them.\n")


def parse_arguments(
    argv: list[str] | None = None,
    *,
    arguments: type = SearchArguments,
    prog: str = "python examples/trl_search_igpo.py",
    description: str = __doc__.split("\n\n")[0],
    defaults: dict | None = None,
) -> tuple[SearchArguments, GRPOConfig]:
    """The example's flags (``arguments``) and TRL's ``GRPOConfig`` (``defaults``, by default
    ``RUN_DEFAULTS``, then the ``--budget``'s values, then the flags given); ``--help`` shows the
    example's own flags first and alone, ``--help_trl``
    every flag, a misspelled flag gets the nearest ones as suggestions (exit status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = RUN_DEFAULTS if defaults is None else defaults
    parser = HfArgumentParser((arguments, GRPOConfig), prog=prog)
    parser.set_defaults(**defaults)
    if "--help_trl" in argv or "--help-trl" in argv:
        parser.print_help()
        sys.exit(0)
    if "-h" in argv or "--help" in argv:
        print(_own_help(arguments, prog, description, defaults))
        sys.exit(0)
    args, config, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        flags = sorted({"--" + option[2:].replace("-", "_") for action in parser._actions for option in action.option_strings
                        if option.startswith("--")})
        problems = []
        for item in (arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")):
            near = difflib.get_close_matches("--" + item.lstrip("-").replace("-", "_"), flags, n=3)
            problems.append(f"unknown flag {item}" + (f"; did you mean {' or '.join(near)}?" if near else ""))
        print(f"{parser.prog}: error: {'; '.join(problems or [f'unexpected arguments {unknown}'])}\n"
              "(--help lists this example's flags, --help_trl TRL's too)", file=sys.stderr)
        sys.exit(2)
    if BUDGETS[args.budget]:  # the budget's values as defaults, so that explicit flags still win
        parser.set_defaults(**{**defaults, **BUDGETS[args.budget]})
        args, config, _ = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    return args, config


# -- smoke runs and the pipeline check ------------------------------------------------------------


def smoke_reasons(demo_dir: Path, config: GRPOConfig) -> list[str]:
    """Why this run cannot show learning (empty when it can): a warm start of the quick budget
    (``config.budget_note`` of the demo's config.json), or at most the quick budget's RL rounds."""
    reasons = []
    demo_config = demo_dir / "config.json"
    if demo_config.is_file():
        values = json.loads(demo_config.read_text(encoding="utf-8"))
        note = budget_note({"model": values.get("model"), "warm_start": values.get("warm_start")})
        if note:
            reasons.append(f"{demo_dir}'s warm start has {note.split(':')[0]} (the quick budget): it rarely writes a "
                           "well-formed turn and never a right answer")
    rounds = -(-config.max_steps // (config.steps_per_generation or 1))
    if 0 < rounds <= quick_config().rl.steps:
        reasons.append(f"{rounds} round{'s' * (rounds > 1)} of rollouts (--max_steps {config.max_steps})")
    return reasons


def smoke_notice(reasons: list[str]) -> str:
    """The banner of a smoke run: what it is, which zeros are expected, what to read instead."""
    return ("=" * 100 + "\nSMOKE RUN: " + "; ".join(reasons) + ".\nIt cannot learn: held-out EM is not expected to move (0.0 -> 0.0 is normal), most rewards are the "
            "format penalty -2, and a step whose every advantage is 0 logs loss 0 and grad_norm 0 (with a "
            "ZeroAdvantageWarning). Whether the set-up works is what the pipeline check at the end says. For a run that learns in minutes: igpo-train demo --budget mid --out runs/demo_mid, then this script with "
            "--demo_dir runs/demo_mid --budget mid (docs/first_hour.md).\n" + "=" * 100)


class RolloutRecorder:
    """Wraps a rollout function; keeps, per training rollout, its probe log-probs and the information
    gain of its non-final turns (the trainer's ``IGPOSettings``) for the pipeline check."""

    def __init__(self, rollout_func):
        self.rollout_func = rollout_func
        self.probes: list[list[float]] = []
        self.information_gain: list[float] = []

    def __call__(self, prompts: list, trainer: IGPOTrainer) -> dict:
        output = self.rollout_func(prompts, trainer)
        if trainer.model.training:
            probes = [list(map(float, row)) for row in output["igpo_answer_logprob"]]
            self.probes += probes
            padded = igpo_rewards.pad_turns(probes)
            gain = trainer.igpo_settings.information_gain(padded.values, padded.turn_mask)
            non_final = padded.turn_mask & ~igpo_rewards.final_turn_mask(padded.turn_mask)
            self.information_gain += gain[non_final].tolist()
        return output


def _logged(history: list[dict], key: str) -> list[float]:
    return [record[key] for record in history if isinstance(record.get(key), (int, float))]


def pipeline_check(recorder: RolloutRecorder, history: list[dict], weight_change: float) -> dict:
    """Did every stage run, and did the update get a signal? From the recorded rollouts, TRL's log
    history (``trainer.state.log_history``) and the largest weight change. Returns
    ``{"checks": [{"name", "value", "ok"}], "ok", "verdict"}``; ``ok`` is None for rows that are
    information only."""
    probes = [value for row in recorder.probes for value in row]
    finite = sum(math.isfinite(value) for value in probes)
    turns = [len(row) for row in recorder.probes]
    gains = recorder.information_gain
    collapsed = _logged(history, "igpo/zero_advantage_group_fraction")
    signal = 1.0 - sum(collapsed) / len(collapsed) if collapsed else 0.0
    grad_norms, losses = _logged(history, "grad_norm"), _logged(history, "loss")
    answered, zero_std = _logged(history, "igpo/answered_fraction"), _logged(history, "frac_reward_zero_std")
    rewards = _logged(history, "reward")
    mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    checks = [
        ("rollouts", f"{len(turns)} made", len(turns) > 0),
        ("probes", f"{len(probes)} scored for {sum(turns)} turns, {finite} finite"
         + (f"; p(answer) {math.exp(min(probes)):.3g} .. {math.exp(max(probes)):.3g}" if finite else ""),
         len(turns) > 0 and len(probes) == finite == sum(turns)),
        ("turns per rollout", f"mean {mean(turns):.2f}, max {max(turns, default=0)}; "
         f"{sum(n > 1 for n in turns)} of {len(turns)} rollouts searched before their last turn", None),
        ("answers", f"{100 * mean(answered):.0f}% of rollouts end with an <answer> (the rest: malformed or out of turns)", None),
        ("outcome rewards", f"mean {mean(rewards):.3f}; vary within {100 * (1 - mean(zero_std)):.0f}% of the groups", None),
        ("information gain", f"{len(gains)} non-final turns, {sum(g != 0 for g in gains)} nonzero"
         + (f", mean {mean(gains):+.4f}" if gains else ""),
         any(g != 0 for g in gains)),
        ("advantages", f"nonzero in {100 * signal:.0f}% of the groups", signal > 0),
        ("update", f"loss {mean(losses):.4f}, grad_norm max {max(grad_norms, default=0.0):.4f}, weights moved by up to "
         f"{weight_change:.3g}", max(grad_norms, default=0.0) > 0 and weight_change > 0),
    ]
    checks = [{"name": name, "value": value, "ok": ok} for name, value, ok in checks]
    return {"checks": checks, **_verdict(checks, turns, answered)}


def _verdict(checks: list[dict], turns: list[int], answered: list[float]) -> dict:
    status = {check["name"]: check["ok"] for check in checks}
    if not (status["rollouts"] and status["probes"]):
        return {"ok": False, "verdict": "BROKEN: no rollouts or probes missing/non-finite: the rollout function or the "
                                        "model's forward does not work"}
    if not (status["advantages"] and status["update"]):
        why = ("every rollout is one turn and none answers: the policy does not write the Search-R1 format (a warm start "
               "that is too weak, e.g. a demo of an older `igpo-train demo --quick`)"
               if max(turns) <= 1 and not any(answered) else
               "every completion of each group got the same turn rewards: check the reward function and its answers column")
        return {"ok": False, "verdict": f"NO LEARNING SIGNAL: every advantage was 0, so nothing was trained; {why}"}
    return {"ok": True, "verdict": "WORKING: rollouts, retrieval, probes, rewards, advantages and the update all ran, "
                                   "and the update had a signal"}


def format_check(check: dict) -> str:
    rows = [f"  [{'ok' if c['ok'] else '--' if c['ok'] is None else 'NO'}] {c['name']:<18} {c['value']}" for c in check["checks"]]
    return "pipeline check (training rollouts):\n" + "\n".join(rows) + f"\nverdict: {check['verdict']}"


def train(model, tokenizer, url: str, args: SearchArguments, config: GRPOConfig, train_dataset, eval_dataset) -> tuple:
    """IGPO with TRL: the Search-R1 rollout function (recorded for the pipeline check), the outcome
    reward. Returns the trainer, the recorder, the training seconds and the largest weight change."""
    recorder = RolloutRecorder(make_search_rollout_func(
        url, answers_column="answers", max_turns=args.max_turns, max_new_tokens=args.max_new_tokens, topk=args.topk,
        probe_layout=args.probe_layout,
    ))
    start = {name: value.detach().clone() for name, value in model.named_parameters()}
    trainer = IGPOTrainer(
        model=model,
        reward_funcs=[make_outcome_reward_func("answers")],
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,  # TRL's own evaluation (reward, turns) with --eval_strategy steps
        processing_class=tokenizer,
        rollout_func=recorder,
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    weight_change = max(float((value.detach() - start[name]).abs().max()) for name, value in trainer.model.named_parameters())
    return trainer, recorder, seconds, weight_change


def main(argv: list[str] | None = None) -> dict:
    """The run; returns what it writes to heldout_em.json (``pipeline_check["ok"]``: the exit status)."""
    args, config = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.demo_dir) / "data"
    train_dataset, _ = qa_dataset(data / "train.parquet")
    eval_dataset, heldout = qa_dataset(data / "heldout.parquet")
    smoke = smoke_reasons(Path(args.demo_dir), config)
    if smoke:
        print(smoke_notice(smoke))

    with serve_corpus(data / "corpus.jsonl") as url:
        # -- the warm start, scored on the held-out questions --------------------------------------
        model, tokenizer = load_pretrained(Path(args.demo_dir) / "warm_start")
        retriever = HTTPRetriever(url)
        before = heldout_em(model, tokenizer, retriever, heldout, args)
        print(f"warm start: {_summary(before)}")

        trainer, recorder, seconds, weight_change = train(model, tokenizer, url, args, config, train_dataset, eval_dataset)

        # -- the trained policy, scored the same way ---------------------------------------------------
        after = heldout_em(trainer.model, tokenizer, retriever, heldout, args)
        print(f"after {trainer.state.global_step} steps: {_summary(after)}")

    check = pipeline_check(recorder, trainer.state.log_history, weight_change)
    print(format_check(check))
    if smoke:
        print(smoke_notice(smoke))
    return write_result(trainer, config, "examples/trl_search_igpo.py", argv, seconds=seconds, before=before, after=after,
                        extra={"budget": args.budget, "smoke_run": smoke, "pipeline_check": check})


def write_result(trainer, config: GRPOConfig, script: str, argv: list[str] | None, *, seconds: float, before: dict,
                 after: dict, extra: dict | None = None) -> dict:
    """Writes ``--output_dir/heldout_em.json``: the command, steps, rollouts, the held-out scores before
    and after, TRL's log history (per logged step: loss, rewards, ``igpo/*``, ``step_time``) and
    ``extra`` (this example's budget, smoke-run reasons and pipeline check)."""
    rows_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * trainer.accelerator.num_processes
    result = {
        "command": " ".join(["python", script, *(sys.argv[1:] if argv is None else argv)]),
        "seed": config.seed,
        "optimizer_steps": trainer.state.global_step,
        "rollouts": trainer.state.global_step * rows_per_step // config.num_iterations,
        "train_seconds": seconds,
        "warm_start": before,
        "trained": after,
        "log_history": trainer.state.log_history,
        **(extra or {}),
    }
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout_em.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["pipeline_check"]["ok"] else 1)
