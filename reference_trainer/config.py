"""The trainer's configuration: dataclasses with a docstring per field (tyro turns them into flags).

``RunConfig`` is the whole run: where the data and the model come from, the world's size,
the tiny model's size, the warm start, the RL loop and the evaluation. Every ``igpo-train``
subcommand takes it; flags override a TOML/YAML file given with ``--config FILE``, which
overrides the defaults of the world preset (``preset_config``, ``load_config_file``). ``quick_config`` is the
tiny budget of ``igpo-train demo --quick`` (the CI smoke test).

Each field declares its constraint in its type (``PositiveCount``, ``Fraction``,
``Annotated[int, Bounds(2)]``, a ``Literal`` of choices, ...), and a section with constraints
between fields has a ``check_relations`` method; ``validate_config`` walks the dataclasses and
checks every field against its declaration (``TypeError`` for a wrong type, ``ValueError`` for a
bad value, both naming the field as ``FieldTypeError`` / ``FieldValueError`` with its dotted path).

``SUBCOMMAND_READS`` declares which fields each subcommand reads; ``refused_path`` says why a
field that a subcommand would ignore is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import math
import numbers
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union


from igpo_rewards import _checks
from igpo_rewards.agent.probes import PROBE_LAYOUTS
from igpo_rewards.reference_trainer.world import MAX_HOPS
from igpo_rewards.settings import IGPOSettings

# --- constraints, declared in the fields' types ----------------------------------------------------


class FieldValueError(ValueError):
    """A config field holds a bad value; ``field`` is its dotted path (``"rl.group_size"``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class FieldTypeError(TypeError):
    """A config field holds a value of the wrong type; ``field`` is its dotted path."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Bounds:
    """The range of a number field, declared in its type: ``Annotated[int, Bounds(2)]`` is an int >= 2."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False

    def check(self, where: str, value: float) -> None:
        if self.low <= value <= self.high and not (self.open_low and value == self.low):
            return
        if self.high == math.inf:
            wanted = f"{'>' if self.open_low else '>='} {self.low}"
        else:
            wanted = f"in {'(' if self.open_low else '['}{self.low}, {self.high}]"
        raise ValueError(f"{where} must be {wanted}, got {value!r}")


@dataclass(frozen=True)
class NonEmpty:
    """A string field that must not be empty (paths, URLs, devices); None passes where the type allows it."""

    def check(self, where: str, value: str | None) -> None:
        if value == "":
            raise ValueError(f"{where} must be a non-empty string, got ''")


Count = Annotated[int, Bounds(0)]
"""An int >= 0 (0 often means "off" or "all")."""
PositiveCount = Annotated[int, Bounds(1)]
"""An int >= 1."""
Seed = Annotated[int, Bounds(-(2**63), 2**64 - 1)]
"""Any seed torch accepts."""
Fraction = Annotated[float, Bounds(0.0, 1.0)]
"""A probability or share in [0, 1]."""
NonNegative = Annotated[float, Bounds(0.0)]
"""A float >= 0."""
Positive = Annotated[float, Bounds(0.0, open_low=True)]
"""A float > 0."""
Text = Annotated[str, NonEmpty()]
"""A non-empty string (a path, a device)."""
OptionalText = Annotated[Union[str, None], NonEmpty()]
"""A path or URL, or None for "not given"."""


# --- the configuration ---------------------------------------------------------------------------------


@dataclass
class WorldConfig:
    """The embedded synthetic world (``igpo_rewards.reference_trainer.world.build_world``)."""

    preset: Literal["default", "sparse", "credit"] = "default"
    """default: the demo's world. sparse: 1-4 hop questions, more name collisions, demonstrations only up to 2 hops, 6 turns. credit: the sparse world with 400 held-out questions, demonstrations up to 3 hops (1000 SFT steps) and the experiment's RL budget (G = 16). The defaults of every section a preset changes: see PRESETS."""
    seed: Seed = 0
    """Seed of the world generator (entities, corpus, questions)."""
    num_train: PositiveCount = 1000
    """Training questions (hop counts 1..max_hops balanced)."""
    num_heldout: PositiveCount = 90
    """Held-out questions, about people never asked about in training."""
    num_countries: Annotated[int, Bounds(2)] = 6
    """Countries in the world."""
    cities_per_country: Annotated[int, Bounds(2)] = 3
    """Cities per country (the first one is the capital)."""
    num_organisations: PositiveCount = 12
    """Organisations (employers)."""
    max_hops: Annotated[int, Bounds(1, MAX_HOPS)] = 3
    """Longest question chains (1..4); hop counts 1..max_hops are balanced (default world 3, sparse preset 4)."""
    people_per_first_name: Annotated[float, Bounds(1.0)] = 2.5
    """About how many people share a first name (near-miss documents for a name query)."""
    people_per_surname: Annotated[float, Bounds(1.0)] = 3.3
    """About how many people share a surname."""


@dataclass
class TinyModelConfig:
    """The model built from scratch when no ``--model`` is given (``igpo_rewards.reference_trainer.modeling``)."""

    vocab_size: PositiveCount = 2048
    """Byte-level BPE vocabulary trained on the world's text (tags are added on top); large enough that every name is one token."""
    hidden_size: PositiveCount = 96
    """Transformer width."""
    num_layers: PositiveCount = 3
    """Transformer blocks."""
    num_heads: PositiveCount = 4
    """Attention heads (hidden_size / num_heads must be even)."""
    intermediate_size: PositiveCount = 256
    """MLP width."""
    max_position_embeddings: PositiveCount = 1024
    """Longest sequence: prompt + turns + observations (+ probe copies)."""

    def check_relations(self, prefix: str) -> None:
        """Rotary embeddings need an even head width: ``hidden_size / num_heads`` must be an even integer."""
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise FieldValueError(f"{prefix}hidden_size", f"{prefix}hidden_size ({self.hidden_size}) / {prefix}num_heads "
                                  f"({self.num_heads}) must be an even integer (the head width)")


@dataclass
class WarmStartConfig:
    """Supervised fine-tuning on generated demonstrations (``igpo_rewards.reference_trainer.warm_start``)."""

    steps: Count = 600
    """Optimizer steps of SFT."""
    batch_size: PositiveCount = 16
    """Demonstrations per SFT step."""
    learning_rate: Positive = 3e-3
    """Peak AdamW learning rate of SFT and of the language-model phase: linear warm-up, then cosine decay to 10% of it."""
    warmup_steps: Count = 20
    """Linear learning-rate warm-up steps."""
    noisy_query_prob: Fraction = 0.1
    """Probability that a demonstration's search uses a corrupted query, then retries the right one."""
    skip_hop_prob: Fraction = 0.5
    """Probability that a multi-hop demonstration stops searching one hop early and answers the bridge entity (wrong)."""
    think_prob: Fraction = 0.0
    """Probability that a demonstration turn starts with a short <think> block."""
    rename_prob: Fraction = 1.0
    """Probability that a demonstration's person gets a fresh name (first and last name of two other people), so names are copied, not recalled."""
    probe_weight: NonNegative = 0.3
    """Weight of the probe term of the SFT loss: the answer after the probe text, at the last probe of right demonstrations (0 = off; for models built from scratch)."""
    probe_fraction: Fraction = 0.3
    """The probe term is on during this last fraction of the SFT steps (after the policy has learned to copy)."""
    pretrain_steps: Count = 200
    """Language-model steps on corpus documents (people renamed) before SFT; for models built from scratch."""
    pretrain_batch_size: PositiveCount = 64
    """Documents per language-model step."""
    max_hops: Count = 0
    """Demonstrate only questions of at most this many hops (0 = all); harder ones are left for RL to discover."""


@dataclass
class RLConfig:
    """The RL loop (``igpo_rewards.reference_trainer.training``): rollouts, rewards, advantages, PPO update."""

    algorithm: Literal["igpo", "grpo"] = "igpo"
    """igpo: information-gain turn rewards + outcome (igpo_rewards.igpo_advantages); grpo: outcome only."""
    steps: Count = 30
    """RL steps (one batch of rollouts and one round of updates each)."""
    questions_per_step: PositiveCount = 8
    """Questions per step; each gets group_size rollouts."""
    group_size: PositiveCount = 8
    """G, rollouts per question (the group of the normalization)."""
    max_turns: PositiveCount = 4
    """Most turns per rollout (searches plus the answer); up to 10 for real data (default world 4, sparse preset 6)."""
    max_new_tokens: PositiveCount = 24
    """Most tokens sampled in one turn."""
    topk: PositiveCount = 3
    """Documents retrieved per search."""
    learning_rate: Positive = 1e-4
    """AdamW learning rate of the policy."""
    weight_decay: NonNegative = 0.0
    """AdamW weight decay."""
    grad_clip: NonNegative = 1.0
    """Gradient norm clip (0 disables clipping)."""
    clip_ratio: Annotated[float, Bounds(0.0, 1.0, open_low=True)] = 0.2
    """PPO clip epsilon: the ratio is clipped to [1 - eps, 1 + eps]."""
    kl_coef: NonNegative = 0.001
    """Weight of the k3 KL to the frozen warm-start reference in the loss (0 skips the reference forward)."""
    minibatches: PositiveCount = 2
    """Minibatches per pass over the rollouts (whole groups, one optimizer step each): ppo_epochs x minibatches optimizer steps per RL step."""
    ppo_epochs: PositiveCount = 1
    """Passes over the rollouts per RL step."""
    micro_batch_size: PositiveCount = 32
    """Most rows per forward/backward (bounds memory; gradients are accumulated exactly)."""
    micro_batch_tokens: Count = 4096
    """Most padded tokens (rows x longest row) per forward/backward, rows sorted by length (like verl's dynamic batch size); 0 = rows only. Bounds memory and padding, changes no result."""
    generation_batch_size: PositiveCount = 64
    """Rows per generate call."""
    igpo: IGPOSettings = field(default_factory=IGPOSettings)
    """Every option of igpo_rewards.igpo_advantages / grpo_advantages, under the library's names (--rl.igpo.gamma, --rl.igpo.kind, --rl.igpo.eps, ...); GRPO uses scale, eps and ddof."""
    grpo_probes: bool = False
    """Also run the probes under GRPO (IG metrics only; the advantages stay outcome-only)."""
    probe_layout: Literal[PROBE_LAYOUTS] = "kv_cache"
    """Probes in the old-log-prob forward: a second pass of the probe copies over the trajectory pass's KV cache (the trajectory pass is then a plain causal forward; the faster one here), or the copies appended in ONE forward under a 4D mask ("packed"). Same numbers; docs/benchmarks.md."""
    eval_every: Count = 5
    """Evaluate on held-out questions every this many steps (and at the end); 0 = only at the end."""
    eval_at_start: bool = True
    """Evaluate the starting policy at step 0 (the experiment turns it off: its warm start's eval.json is that evaluation)."""
    checkpoint_every: Count = 10
    """Write a checkpoint every this many steps (and at the end); 0 = only at the end."""
    case_studies_per_eval: Count = 2
    """Trajectories (with per-turn IG and advantage) written to trajectories.jsonl at each evaluation step."""

    def check_relations(self, prefix: str) -> None:
        """Minibatches hold whole groups: at most one minibatch per question of the step. The verl
        integration's opt-in ``igpo.allow_outcome_only`` has no meaning here (the trainer always
        scores the probes), so it is refused rather than ignored."""
        if self.minibatches > self.questions_per_step:
            raise FieldValueError(f"{prefix}minibatches", f"{prefix}minibatches ({self.minibatches}) must be <= "
                                  f"{prefix}questions_per_step ({self.questions_per_step}): minibatches hold whole groups")
        if self.igpo.allow_outcome_only:
            raise FieldValueError(f"{prefix}igpo.allow_outcome_only", f"{prefix}igpo.allow_outcome_only is the verl "
                                  f"integration's opt-in (algorithm.igpo.allow_outcome_only); igpo-train always scores the "
                                  f"probes, so it has no meaning here")


@dataclass
class EvalConfig:
    """Greedy evaluation on held-out questions (``igpo_rewards.reference_trainer.evaluation``)."""

    max_questions: Count = 0
    """Evaluate at most this many questions (0 = all)."""
    max_turns: Count = 0
    """Most turns per rollout at evaluation (0 = the RL value)."""
    batch_size: PositiveCount = 64
    """Rows per generate call."""


@dataclass
class RunConfig:
    """One run of ``igpo-train``: data, model, world, warm start, RL and evaluation settings."""

    out: Text = "runs/demo"
    """Run directory: resolved config, metrics.jsonl, checkpoints, eval.json, report.md."""
    seed: Seed = 0
    """Seed of everything random in training (torch, Python); the world has its own seed."""
    threads: Count = 1
    """Torch CPU threads (0 = torch's default). One is fastest for the tiny model, above all when other processes share the cores."""
    device: Text = "cpu"
    """Torch device of the model ("cpu", "cuda", "cuda:1", ...)."""
    model: OptionalText = None
    """Path of a pretrained HF chat model (save_pretrained layout); default: a tiny model built from scratch."""
    init: OptionalText = None
    """Model or checkpoint directory: where train starts (also its frozen KL reference), what eval evaluates."""
    data: OptionalText = None
    """Training questions, verl/Search-R1 parquet; default: the synthetic world."""
    eval_data: OptionalText = None
    """Held-out questions, verl/Search-R1 parquet (default: a held-out share of --data, or the world's held-out set)."""
    corpus: OptionalText = None
    """Retrieval corpus, Search-R1 jsonl ({"id", "contents"} per line); needed with --data unless --retriever-url."""
    retriever_url: OptionalText = None
    """A Search-R1 /retrieve server to use instead of the local BM25 index."""
    eval_fraction: Fraction = 0.1
    """Share of --data held out for evaluation when --eval-data is not given."""
    resume: bool = False
    """Continue from the latest checkpoint in the run directory."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of a loaded --model (bfloat16 for 7B models on a GPU)."""
    progress: bool = True
    """Show tqdm progress bars."""
    world: WorldConfig = field(default_factory=WorldConfig)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "sparse": {
        "world": dict(max_hops=4, num_heldout=120, cities_per_country=4, people_per_first_name=5.0, people_per_surname=6.0),
        "warm_start": dict(max_hops=2),
        "rl": dict(max_turns=6),
    },
    "credit": {
        "world": dict(max_hops=4, num_heldout=400, cities_per_country=4, people_per_first_name=5.0, people_per_surname=6.0),
        "warm_start": dict(max_hops=3, steps=1000),
        "rl": dict(max_turns=6, steps=100, questions_per_step=8, group_size=16, eval_every=20, checkpoint_every=20),
    },
}
"""``--world.preset`` name -> the defaults it changes, by section. ``sparse`` is the sparse-reward
regime of docs/trainer.md: 4-hop questions, twice the name sharing, a warm start that never sees
a question of more than 2 hops, and room for a 4-hop chain plus one retry (6 turns). ``credit``
is the world of the credit-assignment experiment (``igpo-train experiment``'s default): the
sparse world with 400 held-out questions (100 per hop count), a warm start that demonstrates up
to 3 hops with 1000 SFT steps (so it finishes some 3-hop questions, and credit for progress on
a chain has something to act on) and the RL budget that fits 5 seeds x 3 methods into about two
hours on 2 CPU cores: 100 steps of 8 questions x G = 16 rollouts, held-out evaluation every 20."""


_QUICK_WORLD = {"sparse": dict(cities_per_country=3, num_organisations=6), "credit": dict(cities_per_country=3, num_organisations=6)}
"""World sizes of the quick budget per preset where the default ones are too small (4-hop
questions need people whose employer is based outside a capital)."""


def _set_fields(config: RunConfig, sections: dict[str, dict[str, Any]], *, unless_changed_from: RunConfig | None = None) -> None:
    """Set ``sections``' values on ``config``; with ``unless_changed_from``, only on fields still equal to it."""
    for section, values in sections.items():
        current = getattr(config, section)
        for name, value in values.items():
            if unless_changed_from is None or getattr(current, name) == getattr(getattr(unless_changed_from, section), name):
                setattr(current, name, value)


def preset_config(preset: str = "default") -> RunConfig:
    """The defaults of a world preset: ``RunConfig()`` with ``PRESETS[preset]`` applied.

    Flags and config files override these defaults like any other (``igpo-train`` applies the
    preset first, whether it comes from ``--world.preset`` or from the config file).

    Example:
        >>> config = preset_config("sparse")
        >>> config.world.preset, config.world.max_hops, config.warm_start.max_hops, config.rl.max_turns
        ('sparse', 4, 2, 6)
    """
    if preset not in PRESETS:
        raise ValueError(f"world.preset must be one of {tuple(PRESETS)}, got {preset!r}")
    config = RunConfig()
    config.world.preset = preset
    _set_fields(config, PRESETS[preset])
    return config


BUDGETS: dict[str, dict[str, dict[str, Any]]] = {
    "full": {},
    "mid": {
        "rl": dict(steps=10),
    },
    "quick": {
        "world": dict(num_train=30, num_heldout=12, num_countries=3, cities_per_country=2, num_organisations=4),
        "tiny": dict(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=768),
        "warm_start": dict(steps=150, batch_size=8, warmup_steps=2, pretrain_steps=4, pretrain_batch_size=16),
        "rl": dict(steps=2, questions_per_step=2, group_size=4, max_new_tokens=12, minibatches=1, eval_every=1, checkpoint_every=1),
        "eval": dict(max_questions=12),
    },
}
"""``igpo-train demo --budget NAME`` -> the sizes and step counts it changes, by section (``budget_config``).

full: the defaults, the demo docs/trainer.md measures. mid: the default world, model and warm
start (so the same weights as the full demo's, the start that examples/trl_search_igpo.py's
numbers come from) with 10 RL steps instead of 30: held-out EM rises within those steps, and
the run takes minutes (docs/first_hour.md gives its numbers). A shorter warm start is not
cheaper in practice: one of 400 SFT steps answers about a quarter of the held-out questions and
10 RL steps from it do not raise that visibly. quick: a world, a model and every step count
shrunk to the CI smoke test (``quick_config``), too small to learn; its 150 SFT steps still
write well-formed searches now and then, so the probes, information gain and advantages are not
all zero and the update has a gradient."""


def budget_config(config: RunConfig | None = None, budget: str = "full") -> RunConfig:
    """``config`` (default ``RunConfig()``) with the sizes and step counts of ``BUDGETS[budget]``.

    Fields that the caller changed from their (preset's) defaults are kept; only the budget
    (sizes and step counts) changes.

    Example:
        >>> mid = budget_config(budget="mid")
        >>> (mid.warm_start.steps, mid.rl.steps)
        (600, 10)
        >>> budget_config(RunConfig(rl=RLConfig(steps=5)), "mid").rl.steps  # a value the caller changed is kept
        5
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {tuple(BUDGETS)}, got {budget!r}")
    config = config if config is not None else RunConfig()
    sizes = copy.deepcopy(BUDGETS[budget])
    if budget == "quick":
        sizes["world"].update(_QUICK_WORLD.get(config.world.preset, {}))
    _set_fields(config, sizes, unless_changed_from=preset_config(config.world.preset))
    return config


def quick_config(config: RunConfig | None = None) -> RunConfig:
    """The tiny budget of ``demo --quick`` (``--budget quick``) and ``experiment --quick``: same
    pipeline, a few steps of everything (``budget_config(config, "quick")``)."""
    return budget_config(config, "quick")


# --- what each subcommand reads ---------------------------------------------------------------------


@dataclass(frozen=True)
class Reads:
    """The config fields a subcommand reads: dotted paths (a section stands for all its fields),
    minus ``ignored`` (path -> why the subcommand does not read it)."""

    paths: tuple[str, ...]
    ignored: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def covers(self, path: str) -> bool:
        """Whether the field at dotted ``path`` is read."""
        return _under(path, self.paths) and not _under(path, tuple(self.ignored))


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == prefix or path.startswith(prefix + ".") for prefix in prefixes)


_RUN = ("out", "seed", "threads", "device", "progress")
_DATA = ("model", "data", "eval_data", "corpus", "retriever_url", "eval_fraction", "dtype", "world")
_EVALUATION = ("eval", "rl.max_turns", "rl.max_new_tokens", "rl.topk")
_STEP0 = ("rl.questions_per_step", "rl.group_size", "rl.max_turns", "rl.max_new_tokens", "rl.topk", "rl.generation_batch_size",
          "rl.igpo", "rl.probe_layout", "rl.micro_batch_size", "rl.micro_batch_tokens")

SUBCOMMAND_READS: dict[str, Reads] = {
    "demo": Reads(_RUN + _DATA + ("tiny", "warm_start", "rl", "eval"), {"rl.algorithm": "it trains both IGPO and GRPO"}),
    "train": Reads(_RUN + _DATA + ("init", "resume", "rl", "eval")),
    "eval": Reads(_RUN + _DATA + ("init",) + _EVALUATION),
    "warm-start": Reads(_RUN + _DATA + ("tiny", "warm_start") + _EVALUATION + _STEP0),
    "diagnose": Reads(_RUN + _DATA + ("init",) + _STEP0),
    "experiment": Reads(
        ("out", "seed", "device", "progress", "retriever_url", "world", "tiny", "warm_start", "rl", "eval"),
        {"rl.algorithm": "it runs the methods of --methods",
         "rl.eval_at_start": "every run's step 0 is its seed's warm-start evaluation",
         "threads": "every job runs on one thread; --workers sets how many run at once",
         "resume": "running the same command again resumes it"},
    ),
}
"""Subcommand -> the ``RunConfig`` fields it reads (with ``--diagnose-steps``, warm-start reads the
step-0 diagnostics' RL fields too). A flag, or a config-file value other than the default, outside
them is refused (``refused_path``): the subcommand would ignore it."""

_WHY = {
    "tiny": "the model is loaded from --init/--model",
    "warm_start": "the warm start is --init's",
    "init": "it builds its own starting point",
    "resume": "only train resumes a run",
    "model": "it runs on the embedded world and the tiny model",
    "data": "it runs on the embedded world (--world.preset)",
    "eval_data": "it runs on the embedded world (--world.preset)",
    "corpus": "it runs on the embedded world (--world.preset)",
    "eval_fraction": "it runs on the embedded world (--world.preset)",
    "dtype": "it builds the tiny model (float32)",
    "rl": "it runs no RL step",
}


def refused_path(subcommand: str, path: str) -> str | None:
    """Why ``subcommand`` refuses the field at dotted ``path`` (it would ignore it), or None when it reads it.

    Example:
        >>> refused_path("experiment", "rl.algorithm")
        'experiment does not read rl.algorithm (it runs the methods of --methods); train reads it'
        >>> refused_path("train", "rl.algorithm") is None
        True
    """
    reads = SUBCOMMAND_READS[subcommand]
    if reads.covers(path):
        return None
    why = next((reads.ignored[prefix] for prefix in reads.ignored if _under(path, (prefix,))), None)
    if why is None:
        section = next((prefix for prefix in (path, path.split(".")[0]) if prefix in _WHY), None)
        why = _WHY[section] if section else "nothing in it uses this setting"
    readers = [name for name, other in SUBCOMMAND_READS.items() if other.covers(path)]
    also = f"; {', '.join(readers)} {'reads' if len(readers) == 1 else 'read'} it" if readers else ""
    return f"{subcommand} does not read {path} ({why}){also}"


def field_paths(cls: type = None, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of ``cls`` (default ``RunConfig``) by dotted path -> its annotation; ``IGPOSettings``'s fields included."""
    cls = RunConfig if cls is None else cls
    paths = {}
    for name, annotation in _field_types(cls).items():
        bare = typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation
        if _is_section(bare) or bare is IGPOSettings:
            paths.update(field_paths(bare, f"{prefix}{name}."))
        else:
            paths[prefix + name] = annotation
    return paths


def subcommand_values(config: RunConfig, subcommand: str) -> dict[str, Any]:
    """``to_dict(config)`` without the fields ``subcommand`` does not read: the config file of a child job."""

    def keep(values: dict[str, Any], prefix: str) -> dict[str, Any]:
        kept = {}
        for name, value in values.items():
            path = prefix + name
            if isinstance(value, dict):
                inner = keep(value, path + ".")
                if inner:
                    kept[name] = inner
            elif SUBCOMMAND_READS[subcommand].covers(path):
                kept[name] = value
        return kept

    return keep(to_dict(config), "")


def budget_note(values: Mapping[str, Any]) -> str | None:
    """Why a run of this config (``to_dict`` layout, possibly partial) is a smoke run, or None.

    A budget at or below ``quick_config``'s (RL steps, or SFT steps of a model built from scratch)
    is too small to learn anything: its numbers only show that the pipeline runs.

    Example:
        >>> budget_note(to_dict(quick_config()))
        '2 RL steps, 150 SFT steps of a model built from scratch: the quick budget, too small to learn; the numbers only show that the pipeline runs'
        >>> budget_note(to_dict(RunConfig())) is None
        True
    """
    quick = quick_config(RunConfig())
    rl, warm = values.get("rl") or {}, values.get("warm_start") or {}
    reasons = []
    if isinstance(rl.get("steps"), int) and rl["steps"] <= quick.rl.steps:
        reasons.append(f"{rl['steps']} RL steps")
    if values.get("model") is None and isinstance(warm.get("steps"), int) and warm["steps"] <= quick.warm_start.steps:
        reasons.append(f"{warm['steps']} SFT steps of a model built from scratch")
    if not reasons:
        return None
    return f"{', '.join(reasons)}: the quick budget, too small to learn; the numbers only show that the pipeline runs"


# --- files --------------------------------------------------------------------------------------


def to_dict(config: Any) -> dict[str, Any]:
    """A plain JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def from_dict(values: dict[str, Any], *, cls: type = RunConfig, where: str = "config", base: Any = None) -> Any:
    """Build a config dataclass from a (nested) dict over ``base`` (default ``cls()``); unknown
    keys raise ``ValueError`` naming them."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a table/mapping, got {type(values).__name__}")
    base = base if base is not None else cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        near = {key: difflib.get_close_matches(key, list(fields), n=1) for key in unknown}
        hints = "".join(f" (did you mean {near[key][0]!r} for {key!r}?)" for key in unknown if near[key])
        raise ValueError(f"{where}: unknown key(s) {unknown}{hints}; known keys: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(base, name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = from_dict(value, cls=type(default), where=f"{where}.{name}", base=default)
        else:
            kwargs[name] = value
    return dataclasses.replace(copy.deepcopy(base), **kwargs)


def read_config_values(path: str | Path) -> dict[str, Any]:
    """The raw nested dict of a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON config file.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an unreadable one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python < 3.11
                import tomli as tomllib
            values = tomllib.loads(text)
        elif suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
    except Exception as error:  # the parsers' own error types
        raise ValueError(f"cannot parse config file {path}: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a table/mapping, got {type(values).__name__}")
    return values


def config_from_values(values: dict[str, Any], *, preset: str | None = None, where: str = "config") -> RunConfig:
    """A ``RunConfig``: the defaults of ``preset`` (default: the ``world.preset`` in ``values``,
    else "default") with ``values`` on top, validated."""
    world = values.get("world")
    if preset is None:
        preset = world.get("preset", "default") if isinstance(world, dict) else "default"
    config = from_dict(values, where=where, base=preset_config(preset))
    try:
        validate_config(config)
    except (FieldTypeError, FieldValueError) as error:
        raise type(error)(error.field, f"{where}: {error}") from None
    return config


def load_config_file(path: str | Path) -> RunConfig:
    """Read a ``RunConfig`` from a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON file.

    Missing keys keep the defaults of the file's ``world.preset`` (``preset_config``); sections
    are tables (``[rl]`` in TOML). Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` for an unreadable file, an unknown key or a bad value.
    """
    return config_from_values(read_config_values(path), where=str(path))


# --- validation: every field against the constraint its type declares --------------------------------


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _is_section(annotation: Any) -> bool:
    """A nested config dataclass of this module (``IGPOSettings`` checks itself when it is built)."""
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation) and annotation.__module__ == __name__


def _check_type(where: str, value: Any, kind: Any) -> None:
    """``value`` against a plain type or a ``Literal``: the library's checkers (``igpo_rewards._checks``)."""
    if typing.get_origin(kind) is Literal:
        _checks.check_choice(where, value, typing.get_args(kind))
    elif kind is bool:
        _checks.check_flag(where, value)
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{where} must be an int, got {type(value).__name__} {value!r}")
    elif kind is float:
        _checks.real_number(where, value)
    elif isinstance(typing.get_origin(kind) or kind, type) and not isinstance(value, typing.get_origin(kind) or kind):
        expected = typing.get_origin(kind) or kind
        raise TypeError(f"{where} must be a {expected.__name__}, got {type(value).__name__} {value!r}")


def check_field(where: str, value: Any, annotation: Any) -> None:
    """Check one field's value against its annotation (type, Optional, Literal choices, ``Bounds``, ``NonEmpty``).

    Raises ``FieldTypeError`` / ``FieldValueError`` naming ``where``.
    """
    constraints = ()
    if typing.get_origin(annotation) is Annotated:
        annotation, *constraints = typing.get_args(annotation)
    is_union = typing.get_origin(annotation) in (Union, types.UnionType)
    kinds = [kind for kind in typing.get_args(annotation) if kind is not type(None)] if is_union else [annotation]
    if value is None and len(kinds) < len(typing.get_args(annotation)):
        return
    try:
        _check_type(where, value, kinds[0])
        for constraint in constraints:
            if hasattr(constraint, "check"):
                constraint.check(where, value)
    except TypeError as error:
        raise FieldTypeError(where, str(error)) from None
    except ValueError as error:
        raise FieldValueError(where, str(error)) from None


def _validate_section(section: Any, prefix: str) -> None:
    types = _field_types(type(section))
    for item in dataclasses.fields(section):
        where, value, annotation = prefix + item.name, getattr(section, item.name), types[item.name]
        bare = typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation
        if _is_section(bare):
            if not isinstance(value, bare):
                raise FieldTypeError(where, f"{where} must be a {bare.__name__}, got {type(value).__name__}")
            _validate_section(value, where + ".")
        else:
            check_field(where, value, annotation)
    if hasattr(section, "check_relations"):
        section.check_relations(prefix)


def validate_config(config: RunConfig) -> RunConfig:
    """Check every field against the constraint its type declares (and each section's
    ``check_relations``); raises ``FieldTypeError`` / ``FieldValueError`` naming the field. Returns the config.

    Example:
        >>> config = RunConfig()
        >>> config.rl.group_size = 0
        >>> try:
        ...     validate_config(config)
        ... except FieldValueError as error:
        ...     print(f"{type(error).__name__} on {error.field}: {error}")
        FieldValueError on rl.group_size: rl.group_size must be >= 1, got 0
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
    _validate_section(config, "")
    return config
