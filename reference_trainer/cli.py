"""``igpo-train``: the console script (demo, train, eval, warm-start, diagnose, experiment, report).

    igpo-train demo [--budget mid|quick] [--out DIR]   world -> tokenizer -> model -> warm start
                                                  -> IGPO and GRPO from the same start
                                                  -> evaluation -> DIR/report.md
    igpo-train train --init DIR --out RUN [--rl.algorithm grpo] [--resume]
    igpo-train eval --init DIR --out DIR          greedy EM/F1 (by hop, per data source)
    igpo-train warm-start --out DIR               tokenizer + tiny model + warm start only
    igpo-train diagnose --init DIR --out DIR      outcome sparsity and probe signal at RL step 0
    igpo-train experiment --out DIR [--seeds 5] [--methods grpo igpo igpo_subgoals] [--quick]
                                                  per seed: warm start -> every method from it
                                                  -> DIR/experiment.json, DIR/report.md (paired
                                                  differences to GRPO with bootstrap intervals)
    igpo-train report --out DIR [--runs IGPO=RUN ...]   (or --experiment DIR/experiment.json)

Every subcommand but report takes the fields of ``config.RunConfig`` that it reads
(``config.SUBCOMMAND_READS``) as flags (``--rl.steps 100``, ``--warm-start.steps 50``, ...), and
``--config FILE`` (TOML/YAML/JSON) whose values the flags override. A flag the subcommand would
ignore (``eval --rl.steps 5``), or a config-file value other than the default that it would
ignore, is refused; a misspelled flag gets the nearest ones as suggestions. ``--model PATH`` (a
pretrained HF chat model), ``--data file.parquet`` and ``--corpus file.jsonl`` (verl/Search-R1
layouts) or ``--retriever-url`` swap the embedded world and tiny model for real ones; the code
path is the same. Errors about flags, paths, configs and data are printed as one line naming the
flag (and the subcommand's ``--help``) and exit with status 2.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import random
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import torch
import tyro

from igpo_rewards.agent.bm25 import BM25Retriever
from igpo_rewards.agent.protocol import INSTRUCTION, PROBE_TEMPLATE, observation_block
from igpo_rewards.agent.retrieval import HTTPRetriever, format_observation, read_corpus_jsonl, write_corpus_jsonl
from igpo_rewards.settings import IGPOSettings
from igpo_rewards.reference_trainer.config import (
    budget_config,
    budget_note,
    Count,
    FieldTypeError,
    FieldValueError,
    PositiveCount,
    RunConfig,
    check_field,
    config_from_values,
    field_paths,
    preset_config,
    SUBCOMMAND_READS,
    read_config_values,
    refused_path,
    subcommand_values,
    to_dict,
    validate_config,
)
from igpo_rewards.reference_trainer.evaluation import evaluate
from igpo_rewards.reference_trainer.methods import DEFAULT_METHODS, METHODS
from igpo_rewards.reference_trainer.files import append_jsonl, write_text_atomic
from igpo_rewards.reference_trainer.jobs import Job, JobFailed, run_jobs
from igpo_rewards.reference_trainer.modeling import load_pretrained, save_pretrained
from igpo_rewards.reference_trainer.report import paper_table, write_report
from igpo_rewards.reference_trainer.training import seed_everything, train
from igpo_rewards.reference_trainer.world import build_world, load_qa_parquet, write_qa_parquet
from igpo_rewards.testing.tiny import build_model, train_tokenizer

# --- subcommands ------------------------------------------------------------------------------------

EXPERIMENT_PRESET = "credit"
"""The world preset of ``igpo-train experiment`` unless ``--world.preset`` or the config file names one."""


@dataclass
class DemoCommand(RunConfig):
    """Build the world, warm start, train IGPO and GRPO from the same start, evaluate both, write report.md."""

    config: str | None = None
    """TOML/YAML/JSON file of config values; flags override it."""
    budget: Literal["full", "mid", "quick"] = "full"
    """full: the measured demo (30 RL steps; docs/trainer.md). mid: the same warm start, 10 RL steps: held-out EM rises above the warm start's in minutes (docs/first_hour.md). quick: the CI smoke test (under a minute; learns nothing, its report says so). The sizes and step counts each sets: config.BUDGETS; flags override them."""
    quick: bool = False
    """Same as --budget quick."""
    parallel: bool = True
    """Train IGPO and GRPO at the same time in two processes with one thread each."""


@dataclass
class TrainCommand(RunConfig):
    """RL (IGPO or GRPO, --rl.algorithm) from --init (a warm start) or --model, into --out."""

    config: str | None = None
    """TOML/YAML/JSON file of config values; flags override it."""


@dataclass
class EvalCommand(RunConfig):
    """Greedy evaluation of --init (a model or checkpoint directory) or --model on held-out questions."""

    config: str | None = None
    """TOML/YAML/JSON file of config values; flags override it."""


@dataclass
class WarmStartCommand(RunConfig):
    """Build the tokenizer and tiny model (or load --model), warm start it and save it into --out, with its held-out eval.json."""

    config: str | None = None
    """TOML/YAML/JSON file of config values; flags override it."""
    diagnose_steps: Count = 0
    """Also measure outcome sparsity and probe signal over this many RL steps' rollouts (diagnostics.json; 0 = skip)."""


@dataclass
class DiagnoseCommand(RunConfig):
    """Reward sparsity and probe signal of --init at RL step 0: sample the first steps' rollouts, run the probes, write --out/diagnostics.json."""

    config: str | None = None
    """TOML/YAML/JSON file of config values; flags override it."""
    steps: PositiveCount = 4
    """How many RL steps' worth of questions to sample (rl.questions_per_step x rl.group_size rollouts each)."""


@dataclass
class ExperimentCommand(RunConfig):
    """Methods compared in pairs (--methods; default GRPO, IGPO and IGPO with sub-goal targets): per seed one warm start, then every method from it, all evaluated on the same held-out questions; DIR/experiment.json and DIR/report.md with each method's paired difference to GRPO (overall and per hop count, 95% bootstrap intervals). Runs on the credit preset unless --world.preset (or the config file) names another: questions of 1-4 hops (balanced), twice the default world's name sharing, 400 held-out questions (100 per hop count), a warm start that demonstrates questions of at most 3 hops (1000 SFT steps), 6 turns per rollout, 100 RL steps of 8 questions x G = 16; the defaults below are the preset's. A --rl.igpo.* flag applies to every method unless the method sets that field."""

    config: str | None = None
    """TOML/YAML/JSON file of config values; flags override it."""
    methods: tuple[Literal[tuple(METHODS)], ...] = DEFAULT_METHODS
    """Methods to run from every warm start (grpo, the baseline of the paired differences, among them): igpo (the paper), grpo, igpo_subgoals (IGPO whose probes also score the gold chain's bridge entities, running-max potential), igpo_subgoals_probe (the same with the raw probe as potential), igpo_turn_index (per-turn-index pools), igpo_a2tgpo (turn-index pools, sqrt(n) accumulation, IG scale 0.3), igpo_subgoals_a2tgpo (both), igpo_positive (positive-clipped IG), igpo_no_ig and igpo_no_outcome (the paper's ablations). A re-run with more methods runs only the new ones."""
    seeds: PositiveCount = 5
    """S: warm starts, each followed by one run of every method (training seeds --seed .. --seed + S - 1)."""
    quick: bool = False
    """Tiny budget (the CI smoke test): same pipeline, a few steps of everything."""
    workers: PositiveCount = 2
    """Child processes at once, one thread each."""
    diagnose_steps: Count = 4
    """RL steps' worth of rollouts measured at step 0 from each warm start (outcome sparsity, probe signal; 0 = skip)."""


@dataclass
class ReportCommand:
    """Write report.md with plots from run directories (default: the igpo/ and grpo/ runs of a demo in --out), or rebuild an experiment's report from its experiment.json (--experiment)."""

    out: str | None = None
    """Directory of report.md (and of the demo whose runs are reported); default runs/demo, or with --experiment the directory of experiment.json."""
    runs: tuple[str, ...] = ()
    """Runs as LABEL=DIR (default: IGPO=OUT/igpo GRPO=OUT/grpo)."""
    warm_start_eval: str | None = None
    """eval.json of the warm-start policy (default: OUT/warm_start/eval.json when it exists)."""
    experiment: str | None = None
    """An experiment.json (igpo-train experiment): rebuild its report.md and plots from it alone; a leading <!-- ... --> comment of the report.md it replaces is kept (the published reports note there how they were made)."""


# --- data, retriever, model -------------------------------------------------------------------------


@dataclass
class Data:
    """Questions and the search engine of a run."""

    train: list[Any]
    heldout: list[Any]
    retriever: Any
    world: Any = None
    corpus: list[Any] | None = None


def _split(examples: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    count = max(1, round(len(examples) * fraction)) if fraction > 0 else 0
    if count >= len(examples):
        raise ValueError(f"eval_fraction {fraction} leaves no training question out of {len(examples)}")
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def build_data(config: RunConfig) -> Data:
    """The run's questions and retriever: --data/--corpus/--retriever-url, else the synthetic world."""
    if config.data is None and config.eval_data is None:
        if config.corpus is not None:
            raise ValueError("--corpus needs --data (or --eval-data): the synthetic world brings its own corpus")
        w = config.world
        world = build_world(
            w.seed, num_train=w.num_train, num_heldout=w.num_heldout, num_countries=w.num_countries,
            cities_per_country=w.cities_per_country, num_organisations=w.num_organisations, max_hops=w.max_hops,
            people_per_first_name=w.people_per_first_name, people_per_surname=w.people_per_surname,
        )
        retriever = HTTPRetriever(config.retriever_url) if config.retriever_url else BM25Retriever(world.corpus)
        return Data(world.train, world.heldout, retriever, world, world.corpus)
    if config.corpus is None and config.retriever_url is None:
        raise ValueError("--data needs a retrieval corpus: give --corpus file.jsonl or --retriever-url URL")
    if config.corpus is not None and not Path(config.corpus).is_file():
        raise FileNotFoundError(f"--corpus: file not found: {config.corpus}")
    corpus = read_corpus_jsonl(config.corpus) if config.corpus is not None else None
    retriever = HTTPRetriever(config.retriever_url) if config.retriever_url else BM25Retriever(corpus)
    train = load_qa_parquet(config.data) if config.data is not None else []
    if config.eval_data is not None:
        heldout = load_qa_parquet(config.eval_data)
    else:
        train, heldout = _split(train, config.eval_fraction, config.seed)
    return Data(train, heldout, retriever, corpus=corpus)


def tokenizer_texts(world: Any) -> list[str]:
    """What the tiny model's tokenizer is trained on: the corpus, the questions, the fixed texts.

    The instruction, the probe text and the observation layout are repeated so that BPE
    merges them into few tokens (they are in every sequence).
    """
    texts = [doc.contents for doc in world.corpus]
    texts += [example.question for example in world.train]
    texts += [format_observation(world.corpus[i : i + 3]) for i in range(0, len(world.corpus), 3)]
    texts += [INSTRUCTION, PROBE_TEMPLATE, observation_block("Doc 1(Title: \"x\") x")] * 50
    return texts


def build_policy(config: RunConfig, data: Data) -> tuple[Any, Any]:
    """``--model PATH`` loaded, or a tokenizer trained on the world's text and a tiny model built from scratch."""
    if config.model is not None:
        return load_pretrained(config.model, dtype=getattr(torch, config.dtype), device=config.device)
    if data.world is None:
        raise ValueError("with --data a pretrained model is needed: give --model PATH (the tiny model is built for the world)")
    tiny = config.tiny
    tokenizer = train_tokenizer(tokenizer_texts(data.world), vocab_size=tiny.vocab_size, model_max_length=tiny.max_position_embeddings)
    model = build_model(
        tokenizer, hidden_size=tiny.hidden_size, num_layers=tiny.num_layers, num_heads=tiny.num_heads,
        intermediate_size=tiny.intermediate_size, max_position_embeddings=tiny.max_position_embeddings, seed=config.seed,
    )
    return model.to(config.device), tokenizer


def _run_config(command: RunConfig) -> RunConfig:
    """The plain ``RunConfig`` part of a subcommand (drops the subcommand's own flags)."""
    return RunConfig(**{f.name: copy.deepcopy(getattr(command, f.name)) for f in dataclasses.fields(RunConfig)})


def _eval_kwargs(config: RunConfig) -> dict[str, Any]:
    return dict(
        max_turns=config.eval.max_turns or config.rl.max_turns, max_new_tokens=config.rl.max_new_tokens,
        topk=config.rl.topk, batch_size=config.eval.batch_size,
    )


# --- demo ----------------------------------------------------------------------------------------------


def warm_start_into(config: RunConfig, data: Data, warm_dir: Path, *, diagnose_steps: int = 0) -> dict[str, Any]:
    """Build the policy, warm start it, save it into ``warm_dir``, evaluate it; returns its eval.json.

    ``warm_dir`` gets the model (``save_pretrained``), ``metrics.jsonl`` (the losses), with
    ``diagnose_steps > 0`` ``diagnostics.json`` (``diagnostics.measure_signal``: outcome
    sparsity and probe signal at RL step 0), and last ``eval.json`` (held-out EM/F1).
    """
    model, tokenizer = build_policy(config, data)
    heldout = data.heldout[: config.eval.max_questions or None]
    if any(example.gold_queries for example in data.train) and config.warm_start.steps > 0:
        from igpo_rewards.reference_trainer.warm_start import warm_start

        history = warm_start(
            model, tokenizer, data.retriever, data.train, config.warm_start, corpus=data.corpus if config.model is None else None,
            topk=config.rl.topk, seed=config.seed, progress=config.progress,
        )
    else:
        print("warm start skipped: the questions have no gold search chains (or --warm-start.steps 0)", file=sys.stderr)
        history = []
    save_pretrained(model, tokenizer, warm_dir)
    write_text_atomic(warm_dir / "metrics.jsonl", "".join(json.dumps({"run": "warm_start", **h}) + "\n" for h in history))
    if diagnose_steps > 0:
        from igpo_rewards.reference_trainer.diagnostics import measure_signal

        signal = measure_signal(model, tokenizer, data.retriever, data.train, config.rl, steps=diagnose_steps, seed=config.seed,
                                progress=config.progress)
        write_text_atomic(warm_dir / "diagnostics.json", json.dumps(signal, indent=2))
    warm_eval = evaluate(model, tokenizer, data.retriever, heldout, step=0, progress=config.progress, **_eval_kwargs(config))
    write_text_atomic(warm_dir / "eval.json", json.dumps(warm_eval, indent=2))
    return warm_eval


def run_warm_start(command: WarmStartCommand) -> dict[str, Any]:
    """The warm start alone, into --out (what the demo and the experiment start RL from)."""
    config = _run_config(_validate_command(command))
    seed_everything(config)
    result = warm_start_into(config, build_data(config), Path(config.out), diagnose_steps=command.diagnose_steps)
    print(f"warm start: held-out EM {100 * result['em']:.1f}  F1 {100 * result['f1']:.1f}  (n = {result['n']}) -> {config.out}")
    return result


def _budgeted_config(command: DemoCommand | ExperimentCommand) -> RunConfig:
    """The command's validated config with its budget's sizes and step counts (``config.budget_config``):
    ``--budget`` (demo), or the quick budget under --quick."""
    config = _run_config(_validate_command(command))
    budget = getattr(command, "budget", "full")
    if command.quick and budget not in ("full", "quick"):
        raise UsageError(f"--quick is short for --budget quick; give one of them, not --quick with --budget {budget}")
    return validate_config(budget_config(config, "quick" if command.quick else budget))


def run_demo(command: DemoCommand) -> Path:
    """The README's pipeline; returns the path of report.md."""
    config = _budgeted_config(command)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seed_everything(config)

    # -- data: the world (or --data/--corpus), written in the Search-R1 layouts -------------------
    data = build_data(config)
    data_dir = out / "data"
    if data.world is not None:
        write_corpus_jsonl(data.world.corpus, data_dir / "corpus.jsonl")
        write_qa_parquet(data.train, data_dir / "train.parquet", split="train")
        write_qa_parquet(data.heldout, data_dir / "heldout.parquet", split="test")
    write_text_atomic(out / "config.json", json.dumps(to_dict(config), indent=2))

    # -- tokenizer + model, then the warm start (SFT on imperfect demonstrations) -------------------
    warm_dir = out / "warm_start"
    warm_eval = warm_start_into(config, data, warm_dir)

    # -- IGPO and GRPO from the same warm start (everything but the advantages identical) -----------
    children = []
    for label in ("igpo", "grpo"):
        child = copy.deepcopy(config)
        child.rl.algorithm = label
        child.init, child.model, child.out, child.resume = str(warm_dir), None, str(out / label), False
        if data.world is not None:
            child.data, child.eval_data, child.corpus = (
                str(data_dir / "train.parquet"), str(data_dir / "heldout.parquet"), str(data_dir / "corpus.jsonl"),
            )
        child.progress = False
        if command.parallel:
            child.threads = 1
        config_path = out / f"{label}.config.json"
        write_text_atomic(config_path, json.dumps(subcommand_values(child, "train"), indent=2))
        for stale in (out / label / "eval.json", out / f"{label}.log"):  # a new warm start: the runs start over
            stale.unlink(missing_ok=True)
        children.append(Job(label, ("train", "--config", str(config_path)), out / f"{label}.log", done=out / label / "eval.json",
                            progress_file=out / label / "metrics.jsonl", total=child.rl.steps + 1))
    run_jobs(children, workers=2 if command.parallel else 1, progress=config.progress)

    # -- report, and one metrics.jsonl with every run's records ---------------------------------------
    report = write_report({"IGPO": out / "igpo", "GRPO": out / "grpo"}, out, warm_start_eval=warm_dir / "eval.json")
    merged = out / "metrics.jsonl"
    merged.unlink(missing_ok=True)
    append_jsonl(merged, [{"run": "warm_start", "step": 0, "heldout_em": warm_eval["em"], "heldout_f1": warm_eval["f1"]}])
    for label in ("igpo", "grpo"):
        lines = (out / label / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        append_jsonl(merged, [{"run": label, **json.loads(line)} for line in lines if line.strip()])
    results = {label: json.loads((out / label / "eval.json").read_text(encoding="utf-8")) for label in ("igpo", "grpo")}
    elapsed = time.perf_counter() - started
    print(
        f"held-out EM: warm start {100 * warm_eval['em']:.1f}, IGPO {100 * results['igpo']['em']:.1f}, "
        f"GRPO {100 * results['grpo']['em']:.1f}  ({elapsed / 60:.1f} min) -> {report}"
    )
    write_text_atomic(out / "timing.json", json.dumps({"seconds": elapsed}))
    note = budget_note(to_dict(config))
    if note:
        print(f"SMOKE RUN ({note}); report.md says so too. For a run that learns in a few minutes: igpo-train demo "
              f"--budget mid (docs/first_hour.md)")
    return Path(report)


# --- train / eval / report ------------------------------------------------------------------------------


def run_train(command: TrainCommand) -> dict[str, Any]:
    """One RL run from --init (or --model) into --out (``training.train`` seeds it); returns its final evaluation."""
    config = _run_config(_validate_command(command))
    init = config.init or config.model
    if init is None:
        raise ValueError("train needs --init DIR (e.g. DIR/warm_start of a demo) or --model PATH")
    if not Path(init).is_dir():
        raise FileNotFoundError(f"--init/--model: directory not found: {init}")
    data = build_data(config)
    if not data.train:
        raise ValueError("no training questions (give --data file.parquet)")
    return train(config, init=init, run_dir=config.out, retriever=data.retriever, train_examples=data.train, eval_examples=data.heldout)


def _load_policy(config: RunConfig, subcommand: str, init_hint: str) -> tuple[str, Any, Any, Data]:
    """Seed, then load --init (or --model) and build the data: ``(path, model, tokenizer, data)``."""
    path = config.init or config.model
    if path is None:
        raise ValueError(f"{subcommand} needs --init DIR ({init_hint}) or --model PATH")
    seed_everything(config)
    model, tokenizer = load_pretrained(path, dtype=getattr(torch, config.dtype), device=config.device)
    return path, model, tokenizer, build_data(config)


def run_eval(command: EvalCommand) -> dict[str, Any]:
    """Greedy EM/F1 of --init (or --model) on the held-out questions; writes --out/eval.json."""
    config = _run_config(_validate_command(command))
    path, model, tokenizer, data = _load_policy(config, "eval", "a model or checkpoint directory")
    examples = data.heldout[: config.eval.max_questions or None]
    result = evaluate(model, tokenizer, data.retriever, examples, progress=config.progress, **_eval_kwargs(config))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "eval.json", json.dumps(result, indent=2))
    print(f"EM {100 * result['em']:.1f}  F1 {100 * result['f1']:.1f}  (n = {result['n']}) -> {out / 'eval.json'}")
    if result["by_hops"]:
        print("by hops: " + ", ".join(f"{h}: EM {100 * s['em']:.1f} (n = {s['n']})" for h, s in result["by_hops"].items()))
    print("\n".join(paper_table({Path(path).name: result})))
    return result


def run_diagnose(command: DiagnoseCommand) -> dict[str, Any]:
    """``diagnostics.measure_signal`` of --init (or --model) on the training questions; writes --out/diagnostics.json."""
    from igpo_rewards.reference_trainer.diagnostics import format_signal, measure_signal

    config = _run_config(_validate_command(command))
    _, model, tokenizer, data = _load_policy(config, "diagnose", "e.g. DIR/warm_start of a demo")
    result = measure_signal(model, tokenizer, data.retriever, data.train, config.rl, steps=command.steps, seed=config.seed,
                            progress=config.progress)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "diagnostics.json", json.dumps(result, indent=2))
    print(format_signal(result) + f"\n-> {out / 'diagnostics.json'}")
    return result


def run_experiment(command: ExperimentCommand) -> Path:
    """``experiment.run_experiment`` with the command's config (quick budget with --quick)."""
    from igpo_rewards.reference_trainer.experiment import run_experiment as experiment

    config = _budgeted_config(command)
    report = experiment(config, Path(config.out), seeds=command.seeds, methods=command.methods, workers=command.workers,
                        diagnose_steps=command.diagnose_steps, progress=config.progress)
    print(f"experiment report -> {report}")
    return report


def rebuild_experiment_report(experiment_json: Path, out: Path) -> Path:
    """``experiment_report.write_experiment_report`` of an experiment.json into ``out``, keeping a
    leading ``<!-- ... -->`` comment of the report.md it replaces."""
    from igpo_rewards.reference_trainer.experiment_report import write_experiment_report

    if not experiment_json.is_file():
        raise FileNotFoundError(f"--experiment: file not found: {experiment_json}")
    try:
        experiment = json.loads(experiment_json.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{experiment_json}: not valid JSON ({error.msg} at line {error.lineno})") from None
    old = out / "report.md"
    text = old.read_text(encoding="utf-8") if old.is_file() else ""
    header = text[: text.index("-->") + 3] + "\n\n" if text.startswith("<!--") and "-->" in text else ""
    report = write_experiment_report(experiment, out)
    if header:
        write_text_atomic(report, header + report.read_text(encoding="utf-8"))
    return report


def run_report(command: ReportCommand) -> Path:
    """report.md from run directories, or an experiment's from its experiment.json."""
    if command.experiment is not None:
        out = Path(command.out) if command.out is not None else Path(command.experiment).parent
        report = rebuild_experiment_report(Path(command.experiment), out)
        print(report)
        return report
    out = Path(command.out or "runs/demo")
    runs = {}
    for item in command.runs or (f"IGPO={out / 'igpo'}", f"GRPO={out / 'grpo'}"):
        label, separator, directory = item.partition("=")
        if not separator or not label or not directory:
            raise ValueError(f"--runs items must look like LABEL=DIR, got {item!r}")
        runs[label] = Path(directory)
    warm = command.warm_start_eval
    if warm is None and (out / "warm_start" / "eval.json").is_file():
        warm = str(out / "warm_start" / "eval.json")
    report = write_report(runs, out, warm_start_eval=Path(warm) if warm else None)
    print(report)
    return Path(report)


# --- entry point: subcommand, flags, config file ----------------------------------------------------------

COMMANDS: dict[str, type] = {
    "demo": DemoCommand, "train": TrainCommand, "eval": EvalCommand, "warm-start": WarmStartCommand,
    "diagnose": DiagnoseCommand, "experiment": ExperimentCommand, "report": ReportCommand,
}
"""Subcommand name -> its dataclass (the flags); ``config.SUBCOMMAND_READS`` says which ``RunConfig`` fields each reads."""

RUNNERS = {DemoCommand: run_demo, TrainCommand: run_train, EvalCommand: run_eval, WarmStartCommand: run_warm_start,
           ExperimentCommand: run_experiment, DiagnoseCommand: run_diagnose, ReportCommand: run_report}


class UsageError(ValueError):
    """A flag, flag value or config-file key that ``igpo-train SUBCOMMAND`` refuses (exit status 2)."""


def _flag(path: str) -> str:
    """The flag of a dotted field path, as tyro spells it: ``rl.group_size`` -> ``--rl.group-size``."""
    return "--" + path.replace("_", "-")


def command_flags(name: str) -> dict[str, str]:
    """Every flag of subcommand ``name`` (bools also as ``--no-...``) -> the dotted field path it sets."""
    command_type = COMMANDS[name]
    paths = dict(field_paths()) if issubclass(command_type, RunConfig) else {}
    run_fields = {item.name for item in dataclasses.fields(RunConfig)} if issubclass(command_type, RunConfig) else set()
    own = typing.get_type_hints(command_type)
    paths.update({item.name: own[item.name] for item in dataclasses.fields(command_type) if item.name not in run_fields})
    flags = {}
    for path, annotation in paths.items():
        flags[_flag(path)] = path
        if typing.get_args(annotation)[:1] == (bool,) or annotation is bool:
            head, _, last = path.rpartition(".")
            flags[_flag(f"{head}.no_{last}" if head else f"no_{last}")] = path
    return flags


def given_flags(name: str, args: list[str]) -> dict[str, str]:
    """The dotted field paths that ``args`` sets -> the flag as the user typed it.

    Raises:
        UsageError: an unknown flag (with the nearest flags of the subcommand as suggestions) or a
            flag the subcommand would ignore (``config.refused_path``); every such flag is listed.
    """
    flags = command_flags(name)
    given, problems = {}, []
    for arg in args:
        if not arg.startswith("--") or arg == "--help":
            continue
        typed = arg.split("=", 1)[0]
        spelled = "--" + typed[2:].replace("_", "-")
        if spelled not in flags:
            near = difflib.get_close_matches(spelled, list(flags), n=3, cutoff=0.6)
            problems.append(f"unknown flag {typed}" + (f"; did you mean {' or '.join(near)}?" if near else ""))
            continue
        path = flags[spelled]
        reason = refused_path(name, path) if name in SUBCOMMAND_READS and path in field_paths() else None
        if reason is not None:
            problems.append(f"{typed} is refused: {reason}")
        given[path] = typed
    if problems:
        raise UsageError("; ".join(problems))
    return given


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + str(key)] = value
    return flat


def _check_file_keys(name: str, values: dict[str, Any], defaults: RunConfig, path: str) -> None:
    """A config-file value that ``name`` would ignore is refused unless it is the default (a
    resolved config.json holds every field)."""
    problems = []
    for key, value in _flatten(values).items():
        if key not in field_paths():
            continue  # an unknown key: from_dict names it
        default = functools.reduce(getattr, key.split("."), defaults)
        reason = refused_path(name, key)
        if reason is not None and value != default:
            problems.append(f"{path}: {key} = {value!r} is refused: {reason}")
    if problems:
        raise UsageError("; ".join(problems))


def _defaults(name: str, args: list[str]) -> Any:
    """The subcommand's defaults: the world preset's <- ``--config FILE``. The preset is
    ``--world.preset``, else the file's ``world.preset``, else (experiment) ``EXPERIMENT_PRESET``."""
    command_type = COMMANDS[name]
    if not issubclass(command_type, RunConfig):
        return None
    path = _flag_value(args, "--config")
    values = read_config_values(path) if path else {}
    preset = _flag_value(args, "--world.preset")
    file_preset = isinstance(values.get("world"), dict) and "preset" in values["world"]
    if preset is None and not file_preset and name == "experiment":
        preset = EXPERIMENT_PRESET
    if values and name in SUBCOMMAND_READS:
        _check_file_keys(name, values, preset_config(preset or (values.get("world") or {}).get("preset", "default")), path)
    base = config_from_values(values, preset=preset, where=str(path))
    fields = {item.name: copy.deepcopy(getattr(base, item.name)) for item in dataclasses.fields(RunConfig)}
    if name == "experiment" and "out" not in values:
        fields["out"] = "runs/experiment"
    return command_type(**fields)


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag VALUE`` or ``--flag=VALUE``; the last one wins)."""
    found = None
    for index, item in enumerate(argv):
        if item == flag and index + 1 < len(argv):
            found = argv[index + 1]
        elif item.startswith(flag + "="):
            found = item.split("=", 1)[1]
    return found


def _scalar(text: str, annotation: Any) -> Any:
    """``text`` as a value of a scalar field type (float, int, str, X | None), or ``_UNPARSED``."""
    kinds = [kind for kind in typing.get_args(annotation) if kind is not type(None)] or [annotation]
    if len(kinds) < len(typing.get_args(annotation)) and text == "None":
        return None
    try:
        return kinds[0](text) if kinds[0] in (float, int, str) else _UNPARSED
    except ValueError:
        return _UNPARSED


_UNPARSED = object()


def _check_settings_flags(args: list[str], given: dict[str, str]) -> None:
    """Each ``--rl.igpo.FIELD VALUE`` checked as ``IGPOSettings`` will check it, before tyro builds
    the settings: tyro reports a refusal there under its internal name (``rl.igpo``), not the flag.
    A value of the wrong type is left to tyro, whose message names the flag."""
    types = typing.get_type_hints(IGPOSettings)
    for path, typed in given.items():
        name = path.removeprefix("rl.igpo.")
        text = _flag_value(args, typed)
        if not path.startswith("rl.igpo.") or name not in types or text is None:
            continue
        value = _scalar(text, types[name])
        if value is _UNPARSED:
            continue
        try:
            IGPOSettings(**{name: value})
        except (TypeError, ValueError) as error:
            raise UsageError(f"{typed} {text}: {error}") from None


def _validate_command(command: Any) -> Any:
    """``validate_config`` of the ``RunConfig`` part, and the subcommand's own fields against their types."""
    if isinstance(command, RunConfig):
        validate_config(_run_config(command))
    run_fields = {item.name for item in dataclasses.fields(RunConfig)} if isinstance(command, RunConfig) else set()
    types = typing.get_type_hints(type(command), include_extras=True)
    for item in dataclasses.fields(command):
        if item.name not in run_fields:
            check_field(item.name, getattr(command, item.name), types[item.name])
    return command


def _description(name: str) -> str:
    """The subcommand's ``--help`` text: its docstring, then which flags it reads (``SUBCOMMAND_READS``)."""
    doc = COMMANDS[name].__doc__
    reads = SUBCOMMAND_READS.get(name)
    if reads is None:
        return doc
    sections = {item.name for item in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(getattr(RunConfig(), item.name))}
    flags = [_flag(path) + (".*" if path in sections or path == "rl.igpo" else "") for path in reads.paths]
    ignored = [_flag(path) for path in reads.ignored if path in field_paths()]
    return (f"{doc}\n\nReads {', '.join(flags)}" + (f" (except {', '.join(ignored)})" if ignored else "")
            + " and its own flags; any other flag below is refused.")


def _parse_without_subcommand(argv: list[str]) -> Any:
    """``igpo-train [--help]``: tyro's overview of every subcommand (or its error for a missing one)."""
    if argv and not argv[0].startswith("-"):
        near = difflib.get_close_matches(argv[0], list(COMMANDS), n=2)
        raise UsageError(f"unknown subcommand {argv[0]!r}" + (f"; did you mean {' or '.join(near)}?" if near else "")
                         + f"; the subcommands are {', '.join(COMMANDS)}")
    command_type = Union[tuple(Annotated[cls, tyro.conf.subcommand(name)] for name, cls in COMMANDS.items())]
    return tyro.cli(command_type, args=argv, prog="igpo-train", description=__doc__.split("\n\n")[0])


def parse(argv: list[str]) -> Any:
    """The subcommand object for ``argv``: defaults <- world preset <- ``--config FILE`` <- flags, validated.

    The preset (``--world.preset``, else the config file's ``world.preset``) sets the defaults
    that the file and the other flags then override.

    Raises:
        UsageError: an unknown subcommand or flag, a flag or config-file value the subcommand
            would ignore, or a bad value (named by its flag when it came from one).
    """
    if not argv or argv[0] not in COMMANDS:
        return _parse_without_subcommand(argv)
    name, args = argv[0], argv[1:]
    given = given_flags(name, args)
    command_type = COMMANDS[name]
    _check_settings_flags(args, given)
    try:
        command = tyro.cli(command_type, args=args, default=_defaults(name, args), prog=f"igpo-train {name}",
                           description=_description(name))
        return _validate_command(command)
    except (FieldTypeError, FieldValueError) as error:
        if error.field in given:  # a value from a flag: name the flag as typed
            raise UsageError(str(error).replace(error.field, given[error.field], 1)) from None
        raise


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 for a bad flag, path, config or dataset, 1 for a failed job)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv and argv[0] in COMMANDS else None
    prog = f"igpo-train {name}" if name else "igpo-train"
    try:
        command = parse(argv)
        RUNNERS[type(command)](command)
    except UsageError as error:
        listing = "its flags" if name else "the subcommands"
        print(f"{prog}: error: {error}\n(`{prog} --help` lists {listing})", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, FieldTypeError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except JobFailed as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
