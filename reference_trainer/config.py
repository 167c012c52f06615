"""The trainer's configuration: dataclasses with a docstring per field (tyro turns them into flags).

``RunConfig`` is the whole run: where the data and the model come from, the world's size,
the tiny model's size, the warm start, the RL loop and the evaluation. Every ``igpo-train``
subcommand takes it; flags override a TOML/YAML file given with ``--config FILE``, which
overrides the defaults of the world preset (``preset_config``, ``load_config_file``). ``quick_config`` is the
tiny budget of ``igpo-train demo --quick`` (the CI smoke test). ``validate_config`` raises a
``ValueError`` naming the field and the bad value.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from igpo_rewards.agent.probes import PROBE_LAYOUTS
from igpo_rewards.reference_trainer.world import MAX_HOPS
from igpo_rewards.settings import IGPOSettings


@dataclass
class WorldConfig:
    """The embedded synthetic world (``igpo_rewards.reference_trainer.world.build_world``)."""

    preset: Literal["default", "sparse"] = "default"
    """default: the demo's world. sparse: 1-4 hop questions, more name collisions, demonstrations only up to 2 hops, 6 turns (the defaults of every section it changes: see PRESETS)."""
    seed: int = 0
    """Seed of the world generator (entities, corpus, questions)."""
    num_train: int = 1000
    """Training questions (hops 1/2/3 balanced)."""
    num_heldout: int = 90
    """Held-out questions, about people never asked about in training."""
    num_countries: int = 6
    """Countries in the world."""
    cities_per_country: int = 3
    """Cities per country (the first one is the capital)."""
    num_organisations: int = 12
    """Organisations (employers)."""
    max_hops: int = 3
    """Longest question chains (1..4); hop counts 1..max_hops are balanced."""
    people_per_first_name: float = 2.5
    """About how many people share a first name (near-miss documents for a name query)."""
    people_per_surname: float = 3.3
    """About how many people share a surname."""


@dataclass
class TinyModelConfig:
    """The model built from scratch when no ``--model`` is given (``igpo_rewards.reference_trainer.modeling``)."""

    vocab_size: int = 2048
    """Byte-level BPE vocabulary trained on the world's text (tags are added on top); large enough that every name is one token."""
    hidden_size: int = 96
    """Transformer width."""
    num_layers: int = 3
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads (hidden_size / num_heads must be even)."""
    intermediate_size: int = 256
    """MLP width."""
    max_position_embeddings: int = 1024
    """Longest sequence: prompt + turns + observations (+ probe copies)."""


@dataclass
class WarmStartConfig:
    """Supervised fine-tuning on generated demonstrations (``igpo_rewards.reference_trainer.warm_start``)."""

    steps: int = 600
    """Optimizer steps of SFT."""
    batch_size: int = 16
    """Demonstrations per SFT step."""
    learning_rate: float = 3e-3
    """Peak AdamW learning rate of SFT and of the language-model phase: linear warm-up, then cosine decay to 10% of it."""
    warmup_steps: int = 20
    """Linear learning-rate warm-up steps."""
    noisy_query_prob: float = 0.1
    """Probability that a demonstration's search uses a corrupted query, then retries the right one."""
    skip_hop_prob: float = 0.5
    """Probability that a multi-hop demonstration stops searching one hop early and answers the bridge entity (wrong)."""
    think_prob: float = 0.0
    """Probability that a demonstration turn starts with a short <think> block."""
    rename_prob: float = 1.0
    """Probability that a demonstration's person gets a fresh name (first and last name of two other people), so names are copied, not recalled."""
    probe_weight: float = 0.3
    """Weight of the probe term of the SFT loss: the answer after the probe text, at the last probe of right demonstrations (0 = off; for models built from scratch)."""
    probe_fraction: float = 0.3
    """The probe term is on during this last fraction of the SFT steps (after the policy has learned to copy)."""
    pretrain_steps: int = 200
    """Language-model steps on corpus documents (people renamed) before SFT; for models built from scratch."""
    pretrain_batch_size: int = 64
    """Documents per language-model step."""
    max_hops: int = 0
    """Demonstrate only questions of at most this many hops (0 = all); harder ones are left for RL to discover."""


@dataclass
class RLConfig:
    """The RL loop (``igpo_rewards.reference_trainer.training``): rollouts, rewards, advantages, PPO update."""

    algorithm: Literal["igpo", "grpo"] = "igpo"
    """igpo: information-gain turn rewards + outcome (igpo_rewards.igpo_advantages); grpo: outcome only."""
    steps: int = 30
    """RL steps (one batch of rollouts and one round of updates each)."""
    questions_per_step: int = 8
    """Questions per step; each gets group_size rollouts."""
    group_size: int = 8
    """G, rollouts per question (the group of the normalization)."""
    max_turns: int = 4
    """Most turns per rollout (searches plus the answer); up to 10 for real data."""
    max_new_tokens: int = 24
    """Most tokens sampled in one turn."""
    topk: int = 3
    """Documents retrieved per search."""
    learning_rate: float = 1e-4
    """AdamW learning rate of the policy."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient norm clip (0 disables clipping)."""
    clip_ratio: float = 0.2
    """PPO clip epsilon: the ratio is clipped to [1 - eps, 1 + eps]."""
    kl_coef: float = 0.001
    """Weight of the k3 KL to the frozen warm-start reference in the loss (0 skips the reference forward)."""
    minibatches: int = 2
    """Minibatches per pass over the rollouts (whole groups, one optimizer step each): ppo_epochs x minibatches optimizer steps per RL step."""
    ppo_epochs: int = 1
    """Passes over the rollouts per RL step."""
    micro_batch_size: int = 32
    """Most rows per forward/backward (bounds memory; gradients are accumulated exactly)."""
    micro_batch_tokens: int = 4096
    """Most padded tokens (rows x longest row) per forward/backward, rows sorted by length (like verl's dynamic batch size); 0 = rows only. Bounds memory and padding, changes no result."""
    generation_batch_size: int = 64
    """Rows per generate call."""
    igpo: IGPOSettings = field(default_factory=IGPOSettings)
    """Every option of igpo_rewards.igpo_advantages / grpo_advantages, under the library's names (--rl.igpo.gamma, --rl.igpo.kind, --rl.igpo.eps, ...); GRPO uses scale, eps and ddof."""
    grpo_probes: bool = False
    """Also run the probes under GRPO (IG metrics only; the advantages stay outcome-only)."""
    probe_layout: Literal[PROBE_LAYOUTS] = "kv_cache"
    """Probes in the old-log-prob forward: a second pass of the probe copies over the trajectory pass's KV cache (the trajectory pass is then a plain causal forward; the faster one here), or the copies appended in ONE forward under a 4D mask ("packed"). Same numbers; docs/benchmarks.md."""
    eval_every: int = 5
    """Evaluate on held-out questions every this many steps (and at the end); 0 = only at the end."""
    checkpoint_every: int = 10
    """Write a checkpoint every this many steps (and at the end); 0 = only at the end."""
    case_studies_per_eval: int = 2
    """Trajectories (with per-turn IG and advantage) written to trajectories.jsonl at each evaluation step."""


@dataclass
class EvalConfig:
    """Greedy evaluation on held-out questions (``igpo_rewards.reference_trainer.evaluation``)."""

    max_questions: int = 0
    """Evaluate at most this many questions (0 = all)."""
    max_turns: int = 0
    """Most turns per rollout at evaluation (0 = the RL value)."""
    batch_size: int = 64
    """Rows per generate call."""


@dataclass
class RunConfig:
    """One run of ``igpo-train``: data, model, world, warm start, RL and evaluation settings."""

    out: str = "runs/demo"
    """Run directory: resolved config, metrics.jsonl, checkpoints, eval.json, report.md."""
    seed: int = 0
    """Seed of everything random in training (torch, Python); the world has its own seed."""
    threads: int = 1
    """Torch CPU threads (0 = torch's default). One is fastest for the tiny model, above all when other processes share the cores."""
    device: str = "cpu"
    """Torch device of the model ("cpu", "cuda", "cuda:1", ...)."""
    model: str | None = None
    """Path of a pretrained HF chat model (save_pretrained layout); default: a tiny model built from scratch."""
    init: str | None = None
    """Model or checkpoint directory: where train starts (also its frozen KL reference), what eval evaluates."""
    data: str | None = None
    """Training questions, verl/Search-R1 parquet; default: the synthetic world."""
    eval_data: str | None = None
    """Held-out questions, verl/Search-R1 parquet (default: a held-out share of --data, or the world's held-out set)."""
    corpus: str | None = None
    """Retrieval corpus, Search-R1 jsonl ({"id", "contents"} per line); needed with --data unless --retriever-url."""
    retriever_url: str | None = None
    """A Search-R1 /retrieve server to use instead of the local BM25 index."""
    eval_fraction: float = 0.1
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
}
"""``--world.preset`` name -> the defaults it changes, by section. ``sparse`` is the sparse-reward
regime of docs/trainer.md: 4-hop questions, twice the name sharing, a warm start that never sees
a question of more than 2 hops, and room for a 4-hop chain plus one retry (6 turns)."""


_QUICK_WORLD = {"sparse": dict(cities_per_country=3, num_organisations=6)}
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


def quick_config(config: RunConfig | None = None) -> RunConfig:
    """The tiny budget of ``demo --quick``: same pipeline, a few steps of everything.

    Fields that the caller changed from their (preset's) defaults are kept; only the budget
    (sizes and step counts) is shrunk.
    """
    config = config if config is not None else RunConfig()
    shrink = {
        "world": dict(num_train=30, num_heldout=12, num_countries=3, cities_per_country=2, num_organisations=4),
        "tiny": dict(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=768),
        "warm_start": dict(steps=6, batch_size=8, warmup_steps=2, pretrain_steps=4, pretrain_batch_size=16),
        "rl": dict(steps=2, questions_per_step=2, group_size=4, max_new_tokens=12, minibatches=1, eval_every=1, checkpoint_every=1),
        "eval": dict(max_questions=12),
    }
    shrink["world"].update(_QUICK_WORLD.get(config.world.preset, {}))
    _set_fields(config, shrink, unless_changed_from=preset_config(config.world.preset))
    return config


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
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
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
    validate_config(config)
    return config


def load_config_file(path: str | Path) -> RunConfig:
    """Read a ``RunConfig`` from a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON file.

    Missing keys keep the defaults of the file's ``world.preset`` (``preset_config``); sections
    are tables (``[rl]`` in TOML). Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` for an unreadable file, an unknown key or a bad value.
    """
    return config_from_values(read_config_values(path), where=str(path))


# --- validation --------------------------------------------------------------------------------


def _positive_int(where: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be an int >= {minimum}, got {value!r}")


def _number(where: str, value: Any, low: float = -math.inf, high: float = math.inf, *, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    if value < low or value > high or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise ValueError(f"{where} must be in {bracket}{low}, {high}], got {value!r}")


def _choice(where: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{where} must be one of {choices}, got {value!r}")


def validate_config(config: RunConfig) -> RunConfig:
    """Check every field's type and range; raises ``ValueError`` naming the field. Returns the config."""
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
    _positive_int("seed", config.seed, -(2**63))
    _positive_int("threads", config.threads, 0)
    _number("eval_fraction", config.eval_fraction, 0.0, 1.0)
    _choice("dtype", config.dtype, ("float32", "bfloat16", "float16"))
    for name in ("model", "init", "data", "eval_data", "corpus", "retriever_url"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{name} must be a non-empty path string or None, got {value!r}")
    if not isinstance(config.out, str) or not config.out:
        raise ValueError(f"out must be a non-empty path string, got {config.out!r}")
    world = config.world
    _choice("world.preset", world.preset, tuple(PRESETS))
    _positive_int("world.seed", world.seed, -(2**63))
    _positive_int("world.num_train", world.num_train)
    _positive_int("world.num_heldout", world.num_heldout)
    _positive_int("world.num_countries", world.num_countries, 2)
    _positive_int("world.cities_per_country", world.cities_per_country, 2)
    _positive_int("world.num_organisations", world.num_organisations)
    _positive_int("world.max_hops", world.max_hops)
    if world.max_hops > MAX_HOPS:
        raise ValueError(f"world.max_hops must be <= {MAX_HOPS} (the longest question kind), got {world.max_hops}")
    _number("world.people_per_first_name", world.people_per_first_name, 1.0)
    _number("world.people_per_surname", world.people_per_surname, 1.0)
    tiny = config.tiny
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
        _positive_int(f"tiny.{name}", getattr(tiny, name))
    warm = config.warm_start
    _positive_int("warm_start.steps", warm.steps, 0)
    _positive_int("warm_start.batch_size", warm.batch_size)
    _positive_int("warm_start.warmup_steps", warm.warmup_steps, 0)
    _number("warm_start.learning_rate", warm.learning_rate, 0.0, open_low=True)
    _positive_int("warm_start.pretrain_steps", warm.pretrain_steps, 0)
    _positive_int("warm_start.pretrain_batch_size", warm.pretrain_batch_size)
    _positive_int("warm_start.max_hops", warm.max_hops, 0)
    _number("warm_start.probe_weight", warm.probe_weight, 0.0)
    for name in ("noisy_query_prob", "skip_hop_prob", "think_prob", "rename_prob", "probe_fraction"):
        _number(f"warm_start.{name}", getattr(warm, name), 0.0, 1.0)
    rl = config.rl
    _choice("rl.algorithm", rl.algorithm, ("igpo", "grpo"))
    _choice("rl.probe_layout", rl.probe_layout, PROBE_LAYOUTS)
    _positive_int("rl.steps", rl.steps, 0)
    for name in ("questions_per_step", "group_size", "max_turns", "max_new_tokens", "topk", "minibatches",
                 "ppo_epochs", "micro_batch_size", "generation_batch_size"):
        _positive_int(f"rl.{name}", getattr(rl, name))
    for name in ("eval_every", "checkpoint_every", "case_studies_per_eval", "micro_batch_tokens"):
        _positive_int(f"rl.{name}", getattr(rl, name), 0)
    if rl.minibatches > rl.questions_per_step:
        raise ValueError(
            f"rl.minibatches ({rl.minibatches}) must be <= rl.questions_per_step ({rl.questions_per_step}): "
            "minibatches hold whole groups"
        )
    _number("rl.learning_rate", rl.learning_rate, 0.0, open_low=True)
    _number("rl.weight_decay", rl.weight_decay, 0.0)
    _number("rl.grad_clip", rl.grad_clip, 0.0)
    _number("rl.clip_ratio", rl.clip_ratio, 0.0, 1.0, open_low=True)
    _number("rl.kl_coef", rl.kl_coef, 0.0)
    if not isinstance(rl.igpo, IGPOSettings):  # its own fields are checked when it is built
        raise ValueError(f"rl.igpo must be an IGPOSettings, got {type(rl.igpo).__name__}")
    _positive_int("eval.max_questions", config.eval.max_questions, 0)
    _positive_int("eval.max_turns", config.eval.max_turns, 0)
    _positive_int("eval.batch_size", config.eval.batch_size)
    return config
