"""IGPO on TRL's own tool loop: the search is a TRL tool (or an environment), TRL runs the turns.

    bash scripts/demo.sh                                   # once: writes runs/demo/{warm_start,data}
    python examples/trl_tools_igpo.py --output_dir runs/trl_tools_igpo [--environment]

The same run as examples/trl_search_igpo.py (same data, warm start, retrieval server, GRPOConfig
defaults, evaluation), with TRL generating the turns instead of the project's rollout function:

1. reads the demo's questions into a TRL dataset (``prompt``, ``answers``, ``hops``) and serves
   the demo's corpus with ``igpo-retrieve serve`` on a loopback port;
2. loads the warm start and scores it on the held-out questions (greedy, the reference trainer's
   ``evaluate``);
3. ``use_search_r1_tool_protocol(model, tokenizer)``: the Search-R1 tool chat template, the
   response template that reads ``<search> q </search>`` as a call of the ``search`` tool, and
   ``</search>`` / ``</answer>`` as end-of-turn ids, so TRL's token sequences are the layout the
   warm start was trained on;
4. trains with ``IGPOTrainer(tools=[make_search_tool(url)])``, or with ``--environment``
   ``IGPOTrainer(environment_factory=...)`` (one ``SearchEnvironment`` per rollout): TRL's
   ``_tool_call_loop`` generates every turn (``max_tool_calling_iterations = max_turns - 1``,
   ``generation_kwargs={"max_new_tokens": --max_new_tokens}`` per turn), the trainer scores the
   probe before every turn on its own model and replaces TRL's advantages with IGPO's;
   ``make_outcome_reward_func("answers", tokenizer=tokenizer)`` scores the decoded completions;
5. restores the warm start's end-of-turn ids, scores the trained model the same way and writes
   ``--output_dir/heldout_em.json``.

Its own flags are those of examples/trl_search_igpo.py (``--probe_layout`` is fixed: this path
always probes over the KV cache) plus ``--environment``; ``--help`` lists them, ``--help_trl``
every ``GRPOConfig`` field. TRL's generation backend is TRL's own setting: ``--use_vllm`` with
``--vllm_mode colocate|server`` runs the same code (then set the per-turn cap with
``--generation_kwargs '{"max_tokens": 24}'``: vLLM's key); on this CPU example the backend is HF
``generate``, or transformers continuous batching with ``--use_transformers_continuous_batching``.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trl_search_igpo as rollout_example  # noqa: E402  (the rollout-function example: data, server, evaluation)

from igpo_rewards.agent.retrieval import HTTPRetriever  # noqa: E402
from igpo_rewards.integrations.trl import (  # noqa: E402
    IGPOTrainer,
    SearchEnvironment,
    make_outcome_reward_func,
    make_search_tool,
    use_search_r1_tool_protocol,
)
from igpo_rewards.reference_trainer.modeling import load_pretrained  # noqa: E402

SCRIPT = "examples/trl_tools_igpo.py"


@dataclass
class ToolArguments(rollout_example.SearchArguments):
    """The example's own flags (``--help`` lists them; every ``GRPOConfig`` field is a flag too, ``--help_trl``)."""

    environment: bool = field(default=False, metadata={"help": (
        "Give TRL environment_factory=partial(SearchEnvironment, retriever, topk=...) (one search environment per "
        "rollout) instead of tools=[make_search_tool(retriever, topk=...)]. Same rollouts.")})
    probe_layout: str = field(default="kv_cache", metadata={"help": (
        "Fixed on this path: IGPOTrainer probes TRL's tool loop over the KV cache (kv_cache).")})


def parse_arguments(argv: list[str] | None = None):
    """The flags: ``trl_search_igpo.parse_arguments`` with ``--environment``; the tool loop's per-turn
    settings derived from them; whether ``--max_completion_length`` was given."""
    args, config = rollout_example.parse_arguments(
        argv, arguments=ToolArguments, prog=f"python {SCRIPT}", description=__doc__.split("\n\n")[0]
    )
    if args.probe_layout != "kv_cache":
        print(f"python {SCRIPT}: error: --probe_layout is kv_cache on TRL's tool loop, got {args.probe_layout!r}",
              file=sys.stderr)
        sys.exit(2)
    argv = list(sys.argv[1:] if argv is None else argv)
    config.max_tool_calling_iterations = args.max_turns - 1  # the answer turn comes after the last search
    if not any(arg.split("=", 1)[0] in ("--generation_kwargs", "--generation-kwargs") for arg in argv):
        config.generation_kwargs = {"max_new_tokens": args.max_new_tokens}  # HF generate's per-turn cap
    return args, config, any(arg.split("=", 1)[0] in ("--max_completion_length", "--max-completion-length") for arg in argv)


def main(argv: list[str] | None = None) -> dict:
    """The run; returns what it writes to heldout_em.json."""
    args, config, completion_length_given = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.demo_dir) / "data"
    train_dataset, _ = rollout_example.qa_dataset(data / "train.parquet")
    eval_dataset, heldout = rollout_example.qa_dataset(data / "heldout.parquet")

    with rollout_example.serve_corpus(data / "corpus.jsonl") as url:
        # -- the warm start, scored on the held-out questions --------------------------------------
        model, tokenizer = load_pretrained(Path(args.demo_dir) / "warm_start")
        retriever = HTTPRetriever(url)
        before = rollout_example.heldout_em(model, tokenizer, retriever, heldout, args)
        print(f"warm start: {rollout_example._summary(before)}")

        # -- the Search-R1 protocol as TRL tool calls, the search as a tool or an environment ---------
        warm_start_eos = model.generation_config.eos_token_id
        use_search_r1_tool_protocol(model, tokenizer)
        if not completion_length_given:  # the rollout function's bound: prompt + completion within the model's context
            config.max_completion_length = model.config.max_position_embeddings
        if args.environment:
            tool_loop = {"environment_factory": functools.partial(SearchEnvironment, retriever, topk=args.topk)}
        else:
            tool_loop = {"tools": [make_search_tool(retriever, topk=args.topk)]}
        trainer = IGPOTrainer(
            model=model,
            reward_funcs=[make_outcome_reward_func("answers", tokenizer=tokenizer)],
            args=config,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,  # TRL's own evaluation (reward, turns) with --eval_strategy steps
            processing_class=tokenizer,
            answers_column="answers",
            **tool_loop,
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started

        # -- the trained policy, scored the same way as the warm start ---------------------------------
        trainer.model.generation_config.eos_token_id = warm_start_eos
        after = rollout_example.heldout_em(trainer.model, tokenizer, retriever, heldout, args)
        print(f"after {trainer.state.global_step} steps: {rollout_example._summary(after)}")

    return rollout_example.write_result(trainer, config, SCRIPT, argv, seconds=seconds, before=before, after=after)


if __name__ == "__main__":
    main()
