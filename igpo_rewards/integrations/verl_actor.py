"""IGPO's probes scored by verl's actor in its old-log-prob pass ("actor" probe mode).

In actor mode ``igpo_tool_agent`` sends no probe to the rollout server. Each trajectory records
only its probe plan (``ACTOR_PROBES_KEY``: where each kept turn starts in prompt + response, the
probe suffix's token ids and where its answer tokens are, and the reward settings); its
``rm_scores`` keep verl's layout (the outcome R at the last token). The probes are then scored
where PPO runs a forward over every trajectory anyway: verl's old-log-prob pass
(``ActorRolloutRefWorker.compute_log_prob`` -> ``TrainingWorker.infer_batch`` -> the FSDP engine's
``forward_step``; verl 0.9 has no ``DataParallelPPOActor``). :class:`IGPOFSDPEngineWithLMHead`,
verl's ``FSDPEngineWithLMHead`` registered in verl's ``EngineRegistry`` under the more specific
key (cuda, nvidia), keeps that forward's KV cache (a forward hook sets ``use_cache=True``; verl's
own input preparation, forward and log-prob code run unchanged) and scores the probe copies over
it with ``igpo_rewards.agent.probes.cached_probe_forward``: only the T x P probe tokens on top of
the forward. It writes the probe log-probs (``igpo_answer_logprob``) and ``rm_scores`` with
IGPO's turn rewards (w_ig * IG at each turn's last token, w_out * R at the last turn's) into
the pass's output, one row per trajectory:

* **V1 trainer**: verl's TransferQueue bridge writes every tensor of a worker's output back to the
  trajectory's row, so ``_compute_advantage`` reads the turn rewards. No patch.
* **Legacy trainer** (``trainer.use_v1=False``): ``RayPPOTrainer._compute_old_log_prob`` keeps only
  the log-probs of the worker's output. :func:`patch_legacy_old_log_prob` (applied when this
  module is imported, on verl 0.9.1 only) wraps it: it captures the worker's output and writes its
  ``rm_scores`` in place into ``batch.batch["rm_scores"]``, the tensor ``fit`` already took as the
  reward (``extract_reward``) before the estimator.

verl >= 0.9 imports this module through the ``verl.plugins`` entry point ``igpo_actor``. Without a
probe plan in the batch, in the reference policy (a ``forward_only`` engine, or the actor with its
LoRA adapter disabled) or in a training step, the engine is verl's own, call for call.

The probes of actor mode are the actor's log-probs (training weights, the trainer's kernels);
those of server mode the rollout server's; both score the current policy at temperature 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from omegaconf import OmegaConf
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_name
from verl.workers.engine import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

import igpo_rewards
from igpo_rewards.agent.probes import ProbeSuffix, _hf_model, cached_probe_forward, pad_token_ids, suffix_table
from igpo_rewards.integrations import IGPOSettings
from igpo_rewards.integrations.verl import (
    ACTOR_PROBES_KEY,
    ANSWER_LOGPROB_KEY,
    PROBE_MODE_KEY,
    PROBE_MODES,
    igpo_token_scores,
)

__all__ = [
    "ACTOR_PROBES_KEY",
    "PROBE_MODES",
    "SUPPORTED_VERL_VERSION",
    "IGPOFSDPEngineWithLMHead",
    "actor_mode_problems",
    "actor_probe_plan",
    "actor_turn_rewards",
    "patch_legacy_old_log_prob",
    "probe_mode_from_config",
    "register",
]

SUPPORTED_VERL_VERSION = "0.9.1"
"""The verl release the engine subclass and the legacy trainer's hook are written and tested against."""
PLUGIN_NAME = "igpo_actor"
MODULE_NAME = "igpo_rewards.integrations.verl_actor"
ENGINE_KEY = {"model_type": "language_model", "backend": ["fsdp", "fsdp2"], "device": "cuda", "vendor": "nvidia"}
MAX_PADDING = 0.1
"""Query-slot padding allowed per probe forward (``cached_probe_forward``): at most 1.1 x the ideal T x P."""

logger = logging.getLogger(MODULE_NAME)
_logged: set[str] = set()


# --- which mode: read once per process from verl's config ---------------------------------------


def _select(config: Any, key: str, default: Any = None) -> Any:
    if OmegaConf.is_config(config):
        return OmegaConf.select(config, key, default=default)
    node = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else getattr(node, part, None)
        if node is None:
            return default
    return node


def actor_mode_problems(config: Any) -> list[str]:
    """Why verl's actor cannot score the probes under ``config`` (verl's full Hydra config), as
    messages naming the setting; empty when it can.

    Checked: the verl release, the ``igpo_actor`` plugin being installed and enabled, the actor
    strategy (FSDP: fsdp, fsdp2), Ulysses sequence parallelism, fused kernels, rollout-correction
    bypass mode (no old-log-prob pass), that verl's engine registry, on this process's platform,
    builds the probe engine, and (legacy trainer) that its old-log-prob step is wrapped. The
    answer is computed once per process for each combination of these.
    """
    import verl
    from verl.utils.device import get_vendor

    parallel = max(int(_select(config, "actor_rollout_ref.actor.ulysses_sequence_parallel_size", 1) or 1),
                   int(_select(config, "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size", 1) or 1))
    return list(_problems(
        verl.__version__, _select(config, "actor_rollout_ref.actor.strategy"), parallel,
        bool(_select(config, "actor_rollout_ref.model.use_fused_kernels", False)),
        bool(_select(config, "algorithm.rollout_correction.bypass_mode", False)),
        bool(_select(config, "trainer.use_v1", True)),
        tuple(os.getenv(name) for name in ("VERL_USE_EXTERNAL_PLUGINS", "VERL_ENGINE_DEVICE", "VERL_ENGINE_VENDOR")),
        (get_device_name(), get_vendor()),
    ))


@functools.lru_cache(maxsize=64)
def _problems(version: str, strategy: Any, parallel: int, fused: bool, bypass: bool, v1: bool,
              environment: tuple, platform: tuple) -> tuple[str, ...]:
    del environment, platform  # read again below; part of the cache key
    problems = []
    if version != SUPPORTED_VERL_VERSION:
        problems.append(
            f"verl {version} is installed: the actor's probe engine and the legacy trainer's hook are written "
            f"against verl {SUPPORTED_VERL_VERSION} (pip install 'verl=={SUPPORTED_VERL_VERSION}')"
        )
    plugin = _plugin_problem()
    if plugin:
        problems.append(plugin)
    if strategy not in ENGINE_KEY["backend"]:
        problems.append(f"actor_rollout_ref.actor.strategy={strategy!r}: the probe engine is verl's FSDP engine (fsdp, fsdp2)")
    if parallel > 1:
        problems.append(
            f"actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size={parallel}: Ulysses sequence parallelism "
            "splits every trajectory's tokens (so its KV cache) across the group's ranks, and a probe copy needs its whole "
            "context; the probe pass would need Ulysses' all-to-all over the cache"
        )
    if fused:
        problems.append("actor_rollout_ref.model.use_fused_kernels=True: the fused kernels return log-probs without logits "
                        "or a KV cache")
    if bypass:
        problems.append("algorithm.rollout_correction.bypass_mode=True: verl skips the old-log-prob pass, where the actor "
                        "scores the probes")
    if strategy in ENGINE_KEY["backend"]:
        engine = EngineRegistry.get_engine_cls(ENGINE_KEY["model_type"], strategy)
        if not issubclass(engine, IGPOFSDPEngineWithLMHead):
            problems.append(
                f"verl's engine registry builds {engine.__name__} on this platform (device "
                f"{os.getenv('VERL_ENGINE_DEVICE') or get_device_name()!r}); the probe engine is registered for NVIDIA "
                "CUDA (device 'cuda', vendor 'nvidia')"
            )
    if not v1 and version == SUPPORTED_VERL_VERSION and not patch_legacy_old_log_prob():
        problems.append("trainer.use_v1=False: the legacy trainer's old-log-prob step could not be wrapped")
    return tuple(problems)


def _plugin_problem() -> str | None:
    """Why verl's worker processes would not load the ``igpo_actor`` plugin (None if they will)."""
    if not any(entry.name == PLUGIN_NAME for entry in importlib.metadata.entry_points(group="verl.plugins")):
        return (f"the verl.plugins entry point {PLUGIN_NAME!r} is not installed (igpo-rewards is not pip-installed "
                "here), so verl's workers would not load the probe engine")
    policy = os.getenv("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
    if policy == "none" or (policy != "auto" and PLUGIN_NAME not in {name.strip() for name in policy.split(",")}):
        return (f"VERL_USE_EXTERNAL_PLUGINS={os.environ['VERL_USE_EXTERNAL_PLUGINS']!r} excludes the {PLUGIN_NAME!r} "
                "plugin, so verl's workers would not load the probe engine")
    return None


def probe_mode_from_config(config: Any) -> str:
    """Where the agent loop's probes are scored: ``"actor"`` or ``"server"``.

    ``algorithm.igpo.probe_mode``: ``actor`` (refused, with every reason, where the actor cannot
    score them: :func:`actor_mode_problems`), ``server`` (the rollout server's prompt log-probs),
    or unset: actor where supported, else server, with a warning naming why (once per process).

    Raises:
      ValueError: another value, or ``actor`` where the actor cannot score the probes.
    """
    requested = _select(config, f"algorithm.igpo.{PROBE_MODE_KEY}")
    if requested is not None and requested not in PROBE_MODES:
        raise ValueError(f"algorithm.igpo.{PROBE_MODE_KEY} must be one of {list(PROBE_MODES)} or unset, got {requested!r}")
    if requested == "server":
        return "server"
    problems = actor_mode_problems(config)
    if not problems:
        return "actor"
    reasons = "; ".join(problems)
    if requested == "actor":
        raise ValueError(f"algorithm.igpo.{PROBE_MODE_KEY}=actor cannot run here: {reasons}. "
                         f"Set algorithm.igpo.{PROBE_MODE_KEY}=server to score the probes on the rollout server.")
    message = f"igpo_tool_agent scores its probes on the rollout server (server mode), because {reasons}"
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)
    return "server"


# --- the probe plan a trajectory carries ------------------------------------------------------------


def actor_probe_plan(
    *,
    prompt_length: int,
    turn_starts: Sequence[int],
    suffix: ProbeSuffix,
    settings: IGPOSettings,
    probe_token_limit: int | None = None,
) -> dict[str, Any]:
    """One trajectory's probe plan (what the agent loop stores under ``ACTOR_PROBES_KEY``).

    Args:
      prompt_length: the prompt's tokens before the response.
      turn_starts: where each kept turn starts in the response (one per run of 1s of its mask).
      suffix: the probe suffix (the first alias of the ground truth).
      settings: the reward settings (``kind``, weights, floor, ``max_turns``).
      probe_token_limit: the longest probe (context + suffix) that is scored, as in server mode
        (the rollout server's context); a longer one repeats the last scored value (IG 0), or
        is -inf when none was scored. None: no limit.

    Returns:
      ``{"turn_starts": [...], "suffix_ids": [...], "answer_span": [start, end], "settings": {...},
      "probe_token_limit": ...}``, turn starts counted in prompt + response: probe j sees the first
      ``turn_starts[j]`` tokens.

    Example:
      >>> plan = actor_probe_plan(prompt_length=5, turn_starts=[0, 7], settings=IGPOSettings(),
      ...                         suffix=ProbeSuffix("t", (11, 12, 13), answer_start=1, answer_end=2))
      >>> plan["turn_starts"], plan["suffix_ids"], plan["answer_span"]
      ([5, 12], [11, 12, 13], [1, 2])
    """
    return {
        "turn_starts": [int(prompt_length) + int(start) for start in turn_starts],
        "suffix_ids": [int(token) for token in suffix.token_ids],
        "answer_span": [int(suffix.answer_start), int(suffix.answer_end)],
        "settings": dataclasses.asdict(settings),
        "probe_token_limit": None if probe_token_limit is None else int(probe_token_limit),
    }


def _plans(micro_batch: Any) -> list[dict[str, Any]]:
    plans = tu.get(micro_batch, ACTOR_PROBES_KEY)
    rows = int(micro_batch.batch_size[0])
    if not isinstance(plans, list) or len(plans) != rows:
        raise ValueError(f"{ACTOR_PROBES_KEY} must hold one probe plan per trajectory ({rows}), got {plans!r:.200}")
    missing = [row for row, plan in enumerate(plans) if not isinstance(plan, Mapping)]
    if missing:
        raise ValueError(
            f"rows {missing[:5]} of the old-log-prob batch carry no {ACTOR_PROBES_KEY} while others do: every "
            f"trajectory must come from igpo_tool_agent in actor mode"
        )
    return plans


# --- turn rewards from the actor's probes -------------------------------------------------------------


def actor_turn_rewards(
    answer_logprob: torch.Tensor,
    turn_mask: torch.Tensor,
    rm_scores: Sequence[torch.Tensor],
    response_mask: Sequence[torch.Tensor],
    settings: IGPOSettings,
) -> list[torch.Tensor]:
    """Each trajectory's ``rm_scores`` with IGPO's turn rewards, from the probes and its outcome.

    Args:
      answer_logprob: [B, T] probe log-probs; turn_mask: [B, T] prefix mask, n_b = the row's turns.
      rm_scores: B rows [S_b] in verl's outcome layout: zero except, at or after the last turn's
        last token, the outcome R (what verl's streaming reward writes).
      response_mask: B rows [S_b]; run j of 1s is turn j.
      settings: the reward settings.

    Returns:
      B rows [S_b] in ``rm_scores``' dtype: w_ig * IG at the end of every turn but the last,
      w_out * R at the end of the last (``igpo_token_scores``).

    Raises:
      ValueError: a row whose number of turns differs from its probes, or whose ``rm_scores``
        hold a reward before its last turn's end (turn rewards already written, or another
        reward path).
    """
    lengths = [int(row.shape[0]) for row in response_mask]
    if not lengths or min(lengths) == 0:
        raise ValueError(f"response_mask rows must be non-empty, got lengths {lengths}")
    masks = torch.nn.utils.rnn.pad_sequence(list(response_mask), batch_first=True).to(turn_mask.device)
    runs = igpo_rewards.num_turns_from_response_mask(masks)
    counts = turn_mask.sum(dim=1)
    if not torch.equal(runs, counts):
        rows = (runs != counts).nonzero()[:, 0].tolist()[:5]
        raise ValueError(f"rows {rows} have {runs[rows].tolist()} turns (runs of 1s in response_mask) but "
                         f"{counts[rows].tolist()} probe starts in {ACTOR_PROBES_KEY}")
    outcomes = []
    for row, (scores, mask) in enumerate(zip(rm_scores, response_mask)):
        last_end = int(mask.nonzero().max())
        early = scores[: last_end].nonzero()[:, 0].tolist()
        if early:
            raise ValueError(
                f"rm_scores row {row} holds rewards at tokens {early[:5]}, before its last turn ends (token {last_end}): "
                "actor-mode probes need verl's outcome layout (R at the last token), not rewards written per turn already"
            )
        outcomes.append(float(scores.sum()))
    scores = igpo_token_scores(answer_logprob.double(), torch.tensor(outcomes, dtype=torch.float64, device=masks.device),
                               masks, turn_mask=turn_mask, config=settings)
    return [scores[row, :length].to(rm_scores[row].dtype).to(rm_scores[row].device) for row, length in enumerate(lengths)]


def _scored_probes(plans: list[dict[str, Any]]) -> list[int]:
    """How many probes of each row are scored: those whose context plus suffix fits the plan's
    ``probe_token_limit`` (contexts only grow, so a prefix of the turns)."""
    scored = []
    for plan in plans:
        limit, size = plan.get("probe_token_limit"), len(plan["suffix_ids"])
        scored.append(sum(1 for start in plan["turn_starts"] if limit is None or start + size <= limit))
    return scored


def _with_skipped_probes(answer_logprob: torch.Tensor, scored: list[int], counts: list[int]) -> torch.Tensor:
    """[B, T] probe values with the skipped probes of each row (turns scored[b] .. counts[b] - 1)
    repeating the row's last scored value, or -inf when none was scored (server mode's rule)."""
    width = max(counts)
    values = torch.nn.functional.pad(answer_logprob, (0, width - answer_logprob.shape[1]))
    for row, (done, count) in enumerate(zip(scored, counts)):
        if done < count:
            values[row, done:count] = values[row, done - 1] if done else float("-inf")
    return values


def _settings(plans: list[dict[str, Any]]) -> IGPOSettings:
    values = plans[0]["settings"]
    differing = [row for row, plan in enumerate(plans) if plan["settings"] != values]
    if differing:
        raise ValueError(f"rows {differing[:5]} of one batch carry other reward settings in {ACTOR_PROBES_KEY} than row 0")
    return IGPOSettings.from_mapping(values)


# --- the engine ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _keeping_kv_cache(module: torch.nn.Module) -> Iterator[dict[str, Any]]:
    """Within the block, forwards of ``module`` run with ``use_cache=True`` and the last one's
    cache is kept in the yielded dict (key ``"cache"``)."""
    kept: dict[str, Any] = {}

    def before(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "use_cache": True}

    def after(_module: Any, _args: tuple, _kwargs: dict, output: Any) -> None:
        cache = getattr(output, "cache", None)
        kept["cache"] = cache if cache is not None else getattr(output, "past_key_values", None)

    handles = [module.register_forward_pre_hook(before, with_kwargs=True),
               module.register_forward_hook(after, with_kwargs=True)]
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


class IGPOFSDPEngineWithLMHead(FSDPEngineWithLMHead):
    """verl's FSDP actor engine whose old-log-prob pass also scores IGPO's probes (module docstring).

    ``forward_step`` scores probes only when the micro-batch carries ``ACTOR_PROBES_KEY``, the pass is
    forward-only, the engine trains (not a ``forward_only`` reference engine) and the LoRA adapter
    is on; otherwise it is verl's. Refused at the probe pass, naming the reason: Ulysses sequence
    parallelism, fused kernels, multi-modal inputs (3-D position ids).
    """

    _igpo_adapter_disabled = False

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """verl's (the reference policy of a LoRA actor); no probes are scored inside it."""
        with super().disable_adapter():
            self._igpo_adapter_disabled = True
            try:
                yield
            finally:
                self._igpo_adapter_disabled = False

    def _scores_probes(self, micro_batch: Any, forward_only: bool) -> bool:
        return (forward_only and ACTOR_PROBES_KEY in micro_batch.keys() and not self.engine_config.forward_only
                and not self._igpo_adapter_disabled)

    def forward_step(self, micro_batch: Any, loss_function: Any, forward_only: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        if not self._scores_probes(micro_batch, forward_only):
            return super().forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)
        self._check_probe_pass(micro_batch)
        plans = _plans(micro_batch)
        packed = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
        if packed and _hf_model(self.module).config._attn_implementation in ("sdpa", "eager"):
            # transformers builds the packed (block-diagonal) mask only for forwards without a KV
            # cache; with sdpa/eager this micro-batch runs right-padded instead (flash attention
            # reads the packing from the position ids either way)
            micro_batch = micro_batch.copy()
            tu.assign_non_tensor(micro_batch, use_remove_padding=False)
            packed = False
        with _keeping_kv_cache(self.module) as kept:
            loss, output = super().forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)
        if kept.get("cache") is None:
            raise RuntimeError(f"the model's forward returned no KV cache (use_cache=True): {type(self.module).__name__}")
        scored = _scored_probes(plans)
        probes = self._probe_pass(micro_batch, kept.pop("cache"), plans, scored, packed=packed)
        answer_logprob = _with_skipped_probes(probes.answer_logprob.detach(), scored, [len(p["turn_starts"]) for p in plans])
        output["model_output"].update(self._rewards(micro_batch, plans, answer_logprob))
        output["metrics"].update({"igpo/probe_query_tokens": probes.query_tokens, "igpo/probe_tokens": probes.probe_tokens,
                                  "igpo/probe_forwards": probes.forwards,
                                  "igpo/probes_skipped": sum(len(p["turn_starts"]) for p in plans) - sum(scored)})
        return loss, output

    def _check_probe_pass(self, micro_batch: Any) -> None:
        if self.ulysses_sequence_parallel_size > 1:
            raise ValueError(
                f"ulysses_sequence_parallel_size={self.ulysses_sequence_parallel_size} with actor-mode probes: each rank "
                "holds a slice of every trajectory's KV cache and a probe needs its whole context; set "
                f"algorithm.igpo.{PROBE_MODE_KEY}=server"
            )
        if tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False):
            raise ValueError(f"use_fused_kernels=True with actor-mode probes: fused kernels return no logits; set "
                             f"algorithm.igpo.{PROBE_MODE_KEY}=server")
        if micro_batch["position_ids"].dim() == 3:
            raise ValueError("actor-mode probes take text models (2-D position ids); this batch has multi-modal "
                             f"(3-D) position ids: set algorithm.igpo.{PROBE_MODE_KEY}=server")

    def _probe_pass(self, micro_batch: Any, cache: Any, plans: list[dict[str, Any]], scored: list[int], *, packed: bool) -> Any:
        """The scored probes of the micro-batch (the first ``scored[b]`` of row b) over the cache."""
        device = cache.layers[0].keys.device
        lengths = micro_batch["input_ids"].offsets().diff().tolist()
        starts = [[int(start) for start in plan["turn_starts"]] for plan in plans]
        outside = [row for row, (row_starts, length) in enumerate(zip(starts, lengths))
                   if not row_starts or min(row_starts) < 1 or max(row_starts) > length]
        if outside:
            row = outside[0]
            raise ValueError(f"{ACTOR_PROBES_KEY} of row {row}: turn starts {starts[row]} must be 1..{lengths[row]} "
                             f"(the trajectory's tokens), at least one")
        turn_starts, _ = pad_token_ids(starts, device=device)
        turn_mask = torch.arange(turn_starts.shape[1], device=device)[None, :] < torch.tensor(scored, device=device)[:, None]
        suffixes = suffix_table([ProbeSuffix("", tuple(plan["suffix_ids"]), *plan["answer_span"]) for plan in plans],
                                device=device)
        if packed:  # one cache row: trajectory b's keys start at its offset in the packed sequence
            key_rows = torch.zeros(len(plans), dtype=torch.long, device=device)
            key_offsets = micro_batch["input_ids"].offsets()[:-1].to(device)
        else:
            key_rows, key_offsets = torch.arange(len(plans), device=device), None
        dtype = getattr(self, "_autocast_dtype", torch.bfloat16)
        autocast = (contextlib.nullcontext() if dtype == torch.float32
                    else torch.autocast(device_type=get_device_name(), dtype=dtype))
        with autocast:
            return cached_probe_forward(self.module, cache, turn_starts, turn_mask, suffixes, key_rows=key_rows,
                                        key_offsets=key_offsets, max_padding=MAX_PADDING, pad_token_id=0, dtype=dtype)

    def _rewards(self, micro_batch: Any, plans: list[dict[str, Any]], answer_logprob: torch.Tensor) -> dict[str, torch.Tensor]:
        if "rm_scores" not in micro_batch.keys():
            raise ValueError(
                f"the old-log-prob batch carries {ACTOR_PROBES_KEY} but no rm_scores: actor-mode probes need the outcome "
                "reward before the old-log-prob pass (verl's streaming reward loop)"
            )
        counts = [len(plan["turn_starts"]) for plan in plans]
        turn_mask = torch.arange(answer_logprob.shape[1], device=answer_logprob.device)[None, :] < torch.tensor(
            counts, device=answer_logprob.device)[:, None]
        rewards = actor_turn_rewards(answer_logprob, turn_mask, list(micro_batch["rm_scores"].unbind()),
                                     list(micro_batch["response_mask"].unbind()), _settings(plans))
        values = [answer_logprob[row, :count].float().cpu() for row, count in enumerate(counts)]
        return {
            "rm_scores": torch.nested.as_nested_tensor([row.cpu() for row in rewards], layout=torch.jagged),
            ANSWER_LOGPROB_KEY: torch.nested.as_nested_tensor(values, layout=torch.jagged),
        }


# --- the legacy trainer: its old-log-prob step keeps only the log-probs -------------------------------------


def patch_legacy_old_log_prob() -> bool:
    """Wraps ``RayPPOTrainer._compute_old_log_prob`` (verl 0.9.1's legacy trainer) so the turn
    rewards of actor-mode probes reach the estimator; a no-op for batches without probe plans.

    Returns:
      True if the method is wrapped (now or before), False on other verl releases (the agent
      loop then refuses actor mode: :func:`actor_mode_problems`).
    """
    import verl
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    original = RayPPOTrainer._compute_old_log_prob
    if getattr(original, "_igpo_wrapped", False):
        return True
    if verl.__version__ != SUPPORTED_VERL_VERSION:
        return False

    @functools.wraps(original)
    def _compute_old_log_prob(self: Any, batch: Any) -> Any:
        if ACTOR_PROBES_KEY not in batch.non_tensor_batch:
            return original(self, batch)
        with _capturing(self.actor_rollout_wg, "compute_log_prob") as outputs:
            result = original(self, batch)
        _write_legacy_rm_scores(batch, outputs[-1])
        return result

    _compute_old_log_prob._igpo_wrapped = True
    RayPPOTrainer._compute_old_log_prob = _compute_old_log_prob
    return True


@contextlib.contextmanager
def _capturing(target: Any, name: str) -> Iterator[list[Any]]:
    """Within the block, ``target.name(...)`` also appends its result to the yielded list."""
    outputs: list[Any] = []
    original = getattr(target, name)
    had_own = name in vars(target)

    def call(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        outputs.append(result)
        return result

    setattr(target, name, call)
    try:
        yield outputs
    finally:
        if had_own:
            setattr(target, name, original)
        else:
            delattr(target, name)


def _write_legacy_rm_scores(batch: Any, output: Any) -> None:
    scores = tu.get(output, "rm_scores")
    if scores is None:
        raise RuntimeError(
            f"the batch carries {ACTOR_PROBES_KEY} but the actor's old-log-prob pass returned no rm_scores: the actor "
            "engine is verl's own, not IGPO's (the verl.plugins entry point 'igpo_actor' is not loaded in the worker "
            f"processes, or their platform is not NVIDIA CUDA); set algorithm.igpo.{PROBE_MODE_KEY}=server"
        )
    target = batch.batch["rm_scores"]
    rows = torch.stack(list(scores.unbind())) if scores.is_nested else scores
    if tuple(rows.shape) != tuple(target.shape):
        raise ValueError(f"the actor returned rm_scores {tuple(rows.shape)} for a batch of rm_scores {tuple(target.shape)}")
    target.copy_(rows.to(target.dtype))


# --- registration -------------------------------------------------------------------------------------------


def register() -> None:
    """Registers :class:`IGPOFSDPEngineWithLMHead` in verl's ``EngineRegistry`` for FSDP language
    models on NVIDIA CUDA (``get_engine_cls`` tries the (device, vendor) key before verl's own
    device-only one); idempotent. On verl 0.9.1 also wraps the legacy trainer's old-log-prob step.

    Raises:
      RuntimeError: another engine holds the key.
    """
    registry = EngineRegistry._engines.setdefault(ENGINE_KEY["model_type"], {})
    key = (ENGINE_KEY["device"], ENGINE_KEY["vendor"])
    holders = {registry.get(backend, {}).get(key) for backend in ENGINE_KEY["backend"]} - {None}
    if holders - {IGPOFSDPEngineWithLMHead}:
        raise RuntimeError(f"verl's engine registry already maps {key} to {sorted(h.__name__ for h in holders)}")
    if not holders:
        EngineRegistry.register(**ENGINE_KEY)(IGPOFSDPEngineWithLMHead)
    patch_legacy_old_log_prob()


def _register_at_import() -> None:
    try:
        register()
    except Exception:
        # verl logs a plugin that fails to load only at debug level: make this one visible.
        logger.error("igpo_rewards could not register the actor-side probe engine", exc_info=True)
        raise


_register_at_import()
