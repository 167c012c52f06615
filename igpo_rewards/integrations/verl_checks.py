"""Start-up checks: can IGPO's per-turn rewards reach verl's advantage estimator under this
configuration and this data?

``IGPOAgentLoopManager.create`` (``igpo_rewards.integrations.verl_manager``) runs
:func:`check_config` and :func:`check_data_files` in verl's trainer process, with the whole
Hydra config, before any rollout (both trainers build the agent-loop manager before training
starts); its ``generate_sequences`` runs :func:`check_agent_names` on every training batch before
it is dispatched. Each problem is a :class:`Refusal` that names the setting (or the data column)
and the fix. :func:`enforce` raises one ``IGPOConfigError`` listing them all; the refusals marked
``outcome_only`` (the run would train on the outcome only) become a warning under the opt-in
``algorithm.igpo.allow_outcome_only=True``, the others never do.

docs/integrations/verl.md ("What is refused at start-up") lists every check and why.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from igpo_rewards.integrations import IGPOSettings
from igpo_rewards.integrations.verl import (
    AGENT_LOOP_MODULE,
    AGENT_LOOP_NAME,
    CONFIG_KEY,
    ESTIMATOR_NAME,
    MANAGER_CLASS,
    PROBE_MODE_KEY,
    PROBE_MODES,
    IGPOConfigError,
    OutcomeOnlyWarning,
    algorithm_config_problems,
    settings_from_config,
)

__all__ = [
    "SAMPLER_NAME",
    "SAMPLER_PATH",
    "Refusal",
    "check_agent_names",
    "check_batch_agent_names",
    "check_config",
    "check_data_files",
    "enforce",
    "in_igpo_worker",
    "manager_refusal",
    "mark_igpo_worker",
    "uses_v1_trainer",
]

SAMPLER_PATH = "pkg://igpo_rewards.integrations.verl_manager"
"""What ``trainer.v1.sampler.custom_sampler.path`` names under the V1 trainer."""
SAMPLER_NAME = "IGPOReplayBuffer"
"""What ``trainer.v1.sampler.custom_sampler.name`` names under the V1 trainer."""
AGENT_LOOP_TARGET = f"{AGENT_LOOP_MODULE}.IGPOToolAgentLoop"
SERVERS_WITH_PROMPT_LOGPROBS = ("vllm", "sglang")
"""verl's rollout servers that return ``prompt_logprobs`` (vllm_async_server.py, async_sglang_server.py)."""
ALLOW = "algorithm.igpo.allow_outcome_only=True"

logger = logging.getLogger(__name__)
_in_igpo_worker = False


@dataclass(frozen=True)
class Refusal:
    """One configuration problem: the setting (or data column), why IGPO refuses it, the fix."""

    setting: str
    reason: str
    fix: str
    outcome_only: bool
    """True when the run would train on the outcome only (the opt-in ``allow_outcome_only`` allows it)."""

    def __str__(self) -> str:
        allowed = f" (or {ALLOW} to train on the outcome only)" if self.outcome_only else ""
        return f"{self.setting} {self.reason} Fix: {self.fix}{allowed}."


def _select(config: Any, key: str, default: Any = None) -> Any:
    return OmegaConf.select(config, key, default=default) if OmegaConf.is_config(config) else default


def uses_v1_trainer(config: Any) -> bool:
    """Whether ``config`` runs verl's V1 trainer (``trainer.use_v1``, verl 0.9's default)."""
    return bool(_select(config, "trainer.use_v1", default=False))


def check_config(config: Any) -> list[Refusal]:
    """Every refusal for verl's whole Hydra config (the ``ppo_trainer`` tree ``main_ppo`` composes).

    Example:
      >>> check_config(OmegaConf.create({"algorithm": {"adv_estimator": "grpo"}}))[0].setting
      'algorithm.adv_estimator'
    """
    refusals: list[Refusal] = []
    for rule in (_estimator, _algorithm, _agent_loop, _agent_loop_file, _tools_and_turns, _reward_model,
                 _probe_mode, _v1_sampler):
        refusals.extend(rule(config))
    return refusals


def _estimator(config: Any) -> list[Refusal]:
    estimator = _select(config, "algorithm.adv_estimator")
    if estimator == ESTIMATOR_NAME:
        return []
    return [Refusal(
        "algorithm.adv_estimator", f"is {estimator!r}; IGPO's agent loop and manager write per-turn rewards that only "
        f"the {ESTIMATOR_NAME!r} estimator reads (another estimator would sum them into one outcome).",
        f"algorithm.adv_estimator={ESTIMATOR_NAME}", outcome_only=False)]


def _algorithm(config: Any) -> list[Refusal]:
    problems = algorithm_config_problems(_select(config, "algorithm"))
    return [Refusal(setting, why, fix, outcome_only=False) for setting, why, fix in problems]


def _agent_loop(config: Any) -> list[Refusal]:
    name = _select(config, "actor_rollout_ref.rollout.agent.default_agent_loop")
    if name == AGENT_LOOP_NAME:
        return []
    return [Refusal(
        "actor_rollout_ref.rollout.agent.default_agent_loop", f"is {name!r}, which scores no probes: every reward "
        f"would sit on the last turn.", f"actor_rollout_ref.rollout.agent.default_agent_loop={AGENT_LOOP_NAME}",
        outcome_only=True)]


def _agent_loop_file(config: Any) -> list[Refusal]:
    """An ``agent_loop_config_path`` file that maps the name igpo_tool_agent to another class
    (verl's workers load it into the registry, over the plugin's entry)."""
    path = _select(config, "actor_rollout_ref.rollout.agent.agent_loop_config_path")
    if not path:
        return []
    from verl.utils.import_utils import resolve_config_path

    resolved = resolve_config_path(path)
    entries = OmegaConf.load(resolved) if os.path.isfile(resolved) else []
    targets = [entry.get("_target_") for entry in entries if entry.get("name") == AGENT_LOOP_NAME]
    if all(target == AGENT_LOOP_TARGET for target in targets):
        return []
    return [Refusal(
        "actor_rollout_ref.rollout.agent.agent_loop_config_path", f"{path!r} registers the name {AGENT_LOOP_NAME!r} "
        f"as {targets[-1]!r}, not IGPO's {AGENT_LOOP_TARGET}.", f"remove the {AGENT_LOOP_NAME!r} entry from that file",
        outcome_only=False)]


def _tools_and_turns(config: Any) -> list[Refusal]:
    """No tools, or one assistant turn: every rollout has a single turn, and IGPO's only reward is the outcome."""
    multi_turn = "actor_rollout_ref.rollout.multi_turn"
    refusals = []
    tools = [_select(config, f"{multi_turn}.{key}") for key in ("tool_config_path", "function_tool_path")]
    if not any(tools):
        refusals.append(Refusal(
            f"{multi_turn}.tool_config_path", "is unset (and so is function_tool_path): with no tool the agent "
            "answers in one turn and there is no turn to reward but the last.",
            f"{multi_turn}.tool_config_path=<your tool config> (e.g. igpo_rewards.integrations.verl_search.SearchTool)",
            outcome_only=True))
    if _select(config, f"{multi_turn}.max_assistant_turns") == 1:
        refusals.append(Refusal(
            f"{multi_turn}.max_assistant_turns", "is 1: every rollout ends after one turn, so its only reward is the "
            "outcome.", f"{multi_turn}.max_assistant_turns=<the most turns a rollout may take, >= 2>",
            outcome_only=True))
    return refusals


def _reward_model(config: Any) -> list[Refusal]:
    """A colocated reward model (no resource pool of its own) scores after the rollout and writes
    ``rm_scores`` itself (verl's ``_compute_reward_colocate``), over the turn rewards."""
    model = "reward.reward_model"
    if not _select(config, f"{model}.enable") or _select(config, f"{model}.enable_resource_pool"):
        return []
    return [Refusal(
        f"{model}.enable", "is True without enable_resource_pool: verl then scores the batch with a colocated "
        "reward model after the rollout and writes its own rm_scores, replacing the per-turn rewards.",
        f"{model}.enable_resource_pool=True (the reward model's score then streams into the outcome R), or "
        f"{model}.enable=False with a reward function", outcome_only=True)]


def _probe_mode(config: Any) -> list[Refusal]:
    """Where the probes are scored (``algorithm.igpo.probe_mode``, as the agent loop decides it:
    ``verl_actor.probe_mode_from_config``). Actor mode: whatever keeps verl's actor from scoring
    them (``verl_actor.actor_mode_problems``: the verl release, the ``igpo_actor`` plugin, the
    actor's strategy, Ulysses sequence parallelism, fused kernels, bypass mode, the platform);
    server mode (chosen, or unset where the actor cannot score them): the rollout server."""
    setting = f"algorithm.{CONFIG_KEY}.{PROBE_MODE_KEY}"
    requested = _select(config, setting)
    if requested not in (None, *PROBE_MODES):
        return [Refusal(setting, f"is {requested!r}; it takes {' or '.join(map(repr, PROBE_MODES))}, or unset (actor "
                        "where verl's actor can score the probes, else server).", f"{setting}=actor (or server)",
                        outcome_only=False)]
    if requested == "server":
        return _rollout_server(config, because="")
    # verl_actor imports verl's FSDP engine and registers IGPO's: imported where actor mode is considered.
    from igpo_rewards.integrations.verl_actor import actor_mode_problems

    problems = actor_mode_problems(config)
    if not problems:
        return []
    if requested == "actor":
        return [Refusal(setting, f"is 'actor', but verl's actor cannot score the probes here: {'; '.join(problems)}.",
                        f"{setting}=server (the rollout server scores them), or change those settings",
                        outcome_only=False)]
    return _rollout_server(config, because=f" (unset, it is server mode here because {'; '.join(problems)})")


def _rollout_server(config: Any, *, because: str) -> list[Refusal]:
    """Server mode: the probes are the rollout server's ``prompt_logprobs``, which only vLLM and SGLang return."""
    name = _select(config, "actor_rollout_ref.rollout.name")
    if name in SERVERS_WITH_PROMPT_LOGPROBS:
        return []
    return [Refusal(
        "actor_rollout_ref.rollout.name", f"is {name!r}: in server probe mode{because} igpo_tool_agent scores its "
        f"probes with the rollout server's prompt_logprobs, which only verl's "
        f"{' and '.join(SERVERS_WITH_PROMPT_LOGPROBS)} servers return.",
        f"actor_rollout_ref.rollout.name=vllm (or sglang), or algorithm.{CONFIG_KEY}.{PROBE_MODE_KEY}=actor where "
        "verl's actor can score the probes", outcome_only=False)]


def _v1_sampler(config: Any) -> list[Refusal]:
    """Under V1, IGPO's sampler reports the failed agent-loop sessions as a metric; verl passes a
    custom sampler none of its own group-filter settings, so those would be dropped silently."""
    if not uses_v1_trainer(config):
        return []
    sampler = "trainer.v1.sampler"
    refusals = []
    path, name = (_select(config, f"{sampler}.custom_sampler.{key}") for key in ("path", "name"))
    if not _is_igpo_sampler(path, name):
        refusals.append(Refusal(
            f"{sampler}.custom_sampler", "is not IGPO's: under the V1 trainer it counts the failed agent-loop sessions "
            "and the skipped probes into the step's metrics (igpo/...) and stops the run past the failure limit.",
            f"{sampler}.custom_sampler.path={SAMPLER_PATH} {sampler}.custom_sampler.name={SAMPLER_NAME}",
            outcome_only=False))
    if _select(config, "algorithm.filter_groups.enable"):
        refusals.append(Refusal(
            "algorithm.filter_groups.enable", "is True: verl hands a custom sampler (IGPO's) none of its group-filter "
            "settings, so DAPO's filter would be dropped silently.", "algorithm.filter_groups.enable=False",
            outcome_only=False))
    if _select(config, f"{sampler}.sync_refill_failed_groups"):
        refusals.append(Refusal(
            f"{sampler}.sync_refill_failed_groups", "is True: verl hands a custom sampler (IGPO's) no refill setting, "
            "so it would be dropped silently.", f"{sampler}.sync_refill_failed_groups=False", outcome_only=False))
    return refusals


def _is_igpo_sampler(path: Any, name: Any) -> bool:
    if not path or not name:
        return False
    from verl.utils.import_utils import load_extern_object

    try:
        sampler = load_extern_object(path, name)
    except (ImportError, AttributeError, FileNotFoundError, RuntimeError):
        return False
    # Compared by name: importing verl_manager here would close an import cycle (it imports this module).
    return (getattr(sampler, "__module__", None), getattr(sampler, "__qualname__", None)) == (
        "igpo_rewards.integrations.verl_manager", "IGPOReplayBuffer")


def check_agent_names(names: Iterable[Any], *, where: str) -> list[Refusal]:
    """A refusal when some of ``names`` (the ``agent_name`` column of a dataset or a batch) is not
    ``igpo_tool_agent``: verl runs the agent loop a row names, over ``default_agent_loop``.

    Example:
      >>> check_agent_names(["igpo_tool_agent", "tool_agent", "tool_agent"], where="the batch")[0].reason
      "in the batch names agent loops other than 'igpo_tool_agent' (2 of 3 rows: ['tool_agent']); verl runs the agent loop a row names instead of default_agent_loop, and those loops score no probes."
    """
    values = [value.item() if hasattr(value, "item") else value for value in names]
    other = [value for value in values if value != AGENT_LOOP_NAME]
    if not other:
        return []
    kinds = sorted({repr(value) if not isinstance(value, str) else value for value in other})
    return [Refusal(
        "agent_name", f"in {where} names agent loops other than {AGENT_LOOP_NAME!r} ({len(other)} of {len(values)} "
        f"rows: {kinds[:5]}); verl runs the agent loop a row names instead of default_agent_loop, and those loops "
        f"score no probes.", f"write agent_name={AGENT_LOOP_NAME!r} into those rows, or drop the agent_name column "
        f"(verl's tool-agent preprocessing scripts write 'tool_agent' into every row)", outcome_only=True)]


def check_data_files(config: Any) -> list[Refusal]:
    """:func:`check_agent_names` on the ``agent_name`` column of the local parquet files in
    ``data.train_files`` (read with pyarrow, that column only). Other files are checked batch by
    batch in the manager's ``generate_sequences``."""
    import pyarrow.parquet as parquet

    files = _select(config, "data.train_files")
    files = [files] if isinstance(files, str) else list(files or [])
    refusals = []
    for path in files:
        if not (isinstance(path, str) and path.endswith(".parquet") and os.path.isfile(path)):
            continue
        if "agent_name" not in parquet.read_schema(path).names:
            continue
        column = parquet.read_table(path, columns=["agent_name"]).column("agent_name").to_pylist()
        refusals.extend(check_agent_names(column, where=f"data.train_files {path!r}"))
    return refusals


def check_batch_agent_names(names: Any, config: Any) -> None:
    """Refuses a training batch whose ``agent_name`` column (None: no such column) names other agent loops."""
    if names is not None:
        enforce(check_agent_names(names, where="a training batch"), config.algorithm,
                when="IGPOAgentLoopManager.generate_sequences, before the batch is dispatched")


def enforce(refusals: Sequence[Refusal], settings: IGPOSettings | Any, *, when: str) -> None:
    """Raises one IGPOConfigError listing ``refusals``; the ``outcome_only`` ones are only
    logged and warned (OutcomeOnlyWarning) when ``settings.allow_outcome_only`` (an IGPOSettings,
    or verl's ``algorithm`` config to read it from).

    Example:
      >>> enforce([Refusal("x.y", "is odd.", "x.y=1", outcome_only=True)], IGPOSettings(), when="at start-up")
      Traceback (most recent call last):
      ...
      igpo_rewards.integrations.verl.IGPOConfigError: IGPO cannot train with this verl configuration (at start-up): x.y is odd. Fix: x.y=1 (or algorithm.igpo.allow_outcome_only=True to train on the outcome only).
    """
    if not isinstance(settings, IGPOSettings):
        settings = settings_from_config(settings)
    allowed = [refusal for refusal in refusals if refusal.outcome_only and settings.allow_outcome_only]
    refused = [refusal for refusal in refusals if refusal not in allowed]
    if allowed:
        message = f"IGPO trains on the outcome only ({when}, allowed by {ALLOW}): " + " ".join(map(str, allowed))
        logger.warning(message)
        warnings.warn(message, OutcomeOnlyWarning, stacklevel=2)
    if refused:
        raise IGPOConfigError(f"IGPO cannot train with this verl configuration ({when}): "
                              + " ".join(map(str, refused)))


def mark_igpo_worker() -> None:
    """Called by IGPO's agent-loop workers: agent loops in this process run under IGPO's manager."""
    global _in_igpo_worker
    _in_igpo_worker = True


def in_igpo_worker() -> bool:
    """Whether this process is an agent-loop worker built by ``IGPOAgentLoopManager``."""
    return _in_igpo_worker


def manager_refusal() -> Refusal:
    """The legacy trainer without IGPO's manager: its workers rebuild the rows with the outcome at
    the last token and never read the per-turn rewards (refused by the agent loop, whose first
    rollout is the earliest code of igpo-rewards that runs without the manager)."""
    return Refusal(
        "actor_rollout_ref.rollout.agent.agent_loop_manager_class", "is not IGPO's: the legacy trainer's agent-loop "
        "workers rebuild each row with the outcome at its last token and drop the per-turn rewards.",
        f"+actor_rollout_ref.rollout.agent.agent_loop_manager_class={MANAGER_CLASS}", outcome_only=True)
