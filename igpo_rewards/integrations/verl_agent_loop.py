"""IGPO's verl agent loop ``igpo_tool_agent``: verl's tool agent loop plus the probe before every turn.

verl >= 0.9 imports this module through the ``verl.plugins`` entry point ``igpo_tool_agent`` that
igpo-rewards declares, which registers :class:`IGPOToolAgentLoop` in verl's agent-loop registry:
``actor_rollout_ref.rollout.agent.default_agent_loop=igpo_tool_agent`` needs no file of the user's.

Where the probes are scored is ``algorithm.igpo.probe_mode`` (``verl_actor.probe_mode_from_config``):
``actor`` (the default where verl's actor supports it) records only the probe plan of each
trajectory (``ACTOR_PROBES_KEY``: where each turn starts, the suffix's token ids and
answer span, the reward settings) and leaves ``rm_scores`` in verl's layout: the actor scores
the probes in its old-log-prob pass and writes the turn rewards (``igpo_rewards.integrations.verl_actor``).
``server`` scores them on the rollout server, as follows.

Before each assistant turn j (docs/algorithm.md, section 1) the loop sends the probe sequence

    context_j (the prompt, or everything up to the end of observation j-1) + probe suffix

to the policy's own rollout server through verl's ``server_manager.generate`` with
``max_tokens=1`` and ``prompt_logprobs=0`` (the route verl's distillation teacher uses), and
averages the log-probs of the answer tokens into m_{i,j}. The suffix is the paper's probe text
with the row's ground truth (first alias), tokenized once per trajectory; its answer tokens are
located by character offsets (``build_probe_suffix``, as the reference trainer does).

A trajectory stays ONE output row (as ``tool_agent`` makes it): one run of 1s in
``response_mask`` per assistant turn, one probe per run. The output's ``extra_fields`` carry

* ``igpo_answer_logprob``: the n probe log-probs, one per turn in the (truncated) response;
* ``igpo_probe_prefill_tokens``: how many tokens the probe requests made the server prefill;
* ``igpo_probes_skipped``: how many of those n probes did not fit the server's context (below).

**Probes longer than the server's context.** verl's vLLM and SGLang servers refuse a request of
more than ``max_model_len - 1`` tokens (``actor_rollout_ref.rollout.max_model_len``, else the
model's ``max_position_embeddings``, as the servers resolve it). A probe whose context plus suffix
is longer is not sent: its value repeats the last probe that fitted (``-inf`` when none did), so
the information gain of that turn and of every later one is exactly 0 (contexts only grow) and
the final turn keeps its outcome reward. The rollout goes on; the skipped probes are counted.
Actor mode applies the same rule: the probe plan carries the limit, and the actor skips the same probes.

**Async trainers.** Under V1's ``colocate_async`` / ``separate_async`` modes the client is verl's
``FullyAsyncLLMServerClient``, whose ``generate`` rebuilds the server's answer without its prompt
log-probs; the probe goes through the base ``LLMServerClient.generate`` of the same client (same
load balancer, same server), and a request the server aborted for a weight sync is sent again
(every second, at most ``PROBE_ABORT_RETRIES`` times, then an error).

The loop returns an :class:`IGPOAgentLoopOutput`, whose ``as_dict()`` (what verl 0.9's default
V1 trainer writes to the TransferQueue, after the streaming reward put the outcome into
``reward_score``) writes ``rm_scores`` with w_ig * IG at each turn's last token and the outcome
on the final turn. The legacy trainer rebuilds its rows without calling ``as_dict()``;
``igpo_rewards.integrations.verl_manager`` covers it.

Probe requests never touch the trajectory's own state: their ``extra_fields`` (prompt log-probs,
weight version) are not merged into the trajectory's (``ToolAgentLoop`` merges the first
generation's ``extra_fields``, the staleness tags, only while the trajectory's are empty, so the
probe values are added only after the loop ends); the weight versions the probes ran under widen
``min_global_steps`` / ``max_global_steps``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import PrivateAttr
from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, register
from verl.experimental.agent_loop.tool_agent_loop import AgentData, AgentState, ToolAgentLoop
from verl.workers.rollout.llm_server import FullyAsyncLLMServerClient, LLMServerClient

import igpo_rewards
from igpo_rewards.agent.probes import ProbeSuffix, build_probe_suffix
from igpo_rewards.agent.protocol import PROBE_TEMPLATE
from igpo_rewards.integrations import IGPOSettings
from igpo_rewards.integrations.verl import (
    ACTOR_PROBES_KEY,
    ANSWER_LOGPROB_KEY,
    IGPOConfigError,
    igpo_token_scores,
    settings_from_config,
)

__all__ = [
    "AGENT_LOOP_NAME",
    "PROBE_ABORT_RETRIES",
    "PROBES_SKIPPED_KEY",
    "PROBE_SAMPLING_PARAMS",
    "PROBE_TOKENS_KEY",
    "IGPOAgentLoopOutput",
    "IGPOToolAgentLoop",
    "probe_answer",
    "probe_logprob_from_server_output",
    "probe_token_limit",
]

AGENT_LOOP_NAME = "igpo_tool_agent"
"""The name ``actor_rollout_ref.rollout.agent.default_agent_loop`` takes."""
PROBE_TOKENS_KEY = "igpo_probe_prefill_tokens"
"""``extra_fields`` key of the number of tokens the trajectory's probe requests prefilled."""
PROBES_SKIPPED_KEY = "igpo_probes_skipped"
"""``extra_fields`` key of the number of the trajectory's probes that did not fit the server's context."""
PROBE_SAMPLING_PARAMS: dict[str, Any] = {"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0}
"""A probe request: one output token, the log-prob of every prompt token (vLLM's ``prompt_logprobs``;
verl's SGLang server maps it to ``logprob_start_len=0``). Temperature does not enter prompt log-probs."""
PROBE_ABORT_RETRIES = 600
"""How many times a probe the server aborted (a weight sync in the async trainers) is sent again, one second apart."""
ABORTED = ("aborted", "abort")
"""The ``stop_reason`` of a request verl's servers aborted (``FullyAsyncLLMServerClient`` retries on these)."""

logger = logging.getLogger(__name__)
_warned = set()


def _warn_once(key: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
    """Logs ``message`` once per process (per ``key``)."""
    if key not in _warned:
        _warned.add(key)
        logger.log(level, message, *args)


def probe_token_limit(max_model_len: int | None, max_position_embeddings: int) -> int:
    """The longest probe request verl's servers accept: ``max_model_len - 1`` tokens (one token of
    room to generate), with ``max_model_len`` defaulting to the model's ``max_position_embeddings``
    as verl's vLLM and SGLang servers resolve it.

    Example:
      >>> probe_token_limit(None, 32768), probe_token_limit(4096, 32768)
      (32767, 4095)
    """
    return int(max_model_len if max_model_len else max_position_embeddings) - 1


@functools.lru_cache(maxsize=8)
def _max_position_embeddings(config_path: str, trust_remote_code: bool) -> int:
    """The model's ``max_position_embeddings`` (its HF config read once per process, as verl's servers read it)."""
    from transformers import AutoConfig
    from verl.utils.fs import copy_to_local
    from verl.workers.rollout.utils import get_max_position_embeddings

    hf_config = AutoConfig.from_pretrained(copy_to_local(config_path), trust_remote_code=trust_remote_code)
    return get_max_position_embeddings(hf_config)


def probe_answer(reward_model: Any, extra_info: Any = None) -> str:
    """The answer a row's probes score: the first alias of its ground truth.

    Read from ``reward_model["ground_truth"]`` (the verl/Search-R1 parquet layout), else from
    ``extra_info["ground_truth"]``; aliases are a list or one string joined by
    ``"<|answer_split|>"`` (``igpo_rewards.split_ground_truth``), or Search-R1's
    ``{"target": [...]}``.

    Raises:
      ValueError: neither column holds a ground truth. TypeError: an unreadable ground truth.

    Example:
      >>> probe_answer({"ground_truth": "Kaleno<|answer_split|>Kaleno City", "style": "rule"})
      'Kaleno'
    """
    for source in (reward_model, extra_info):
        if isinstance(source, Mapping) and source.get("ground_truth") is not None:
            truth = source["ground_truth"]
            if isinstance(truth, Mapping) and "target" in truth:
                truth = truth["target"]
            return igpo_rewards.split_ground_truth(truth)[0]
    raise ValueError(
        "igpo_tool_agent needs each row's ground truth for its probes, in reward_model['ground_truth'] or "
        f"extra_info['ground_truth']; got reward_model={reward_model!r:.120} and extra_info={extra_info!r:.120}"
    )


def probe_logprob_from_server_output(
    extra_fields: Mapping[str, Any], sequence_ids: Sequence[int], context_length: int, suffix: ProbeSuffix
) -> float:
    """m = mean log-prob of the answer tokens, from a probe request's prompt log-probs.

    verl's rollout servers return, for a request of N prompt tokens with ``prompt_logprobs=0``,
    ``extra_fields["prompt_logprobs"]`` [N][1] where row p - 1 is log pi(token p | tokens < p)
    (the last row is padding) and ``extra_fields["prompt_ids"]`` [N][1] with token p in row p - 1.

    Args:
      extra_fields: the server output's ``extra_fields``.
      sequence_ids: the N token ids sent (context + suffix).
      context_length: where the suffix starts in ``sequence_ids``.
      suffix: the probe suffix; its answer tokens are scored.

    Raises:
      IGPOConfigError: no prompt log-probs (a server that ignores ``prompt_logprobs``).
      ValueError: a length other than N, or scored ids other than the ones sent (each names the field).
    """
    logprobs = extra_fields.get("prompt_logprobs")
    if logprobs is None:
        raise IGPOConfigError(
            "the rollout server returned no extra_fields['prompt_logprobs'] for an igpo_tool_agent probe request; "
            "the probes need a rollout server that honours prompt_logprobs (verl's vllm or sglang server)"
        )
    if len(logprobs) != len(sequence_ids):
        raise ValueError(
            f"extra_fields['prompt_logprobs'] must hold one row per prompt token: the probe request of "
            f"{len(sequence_ids)} tokens got {len(logprobs)} prompt log-probs from the rollout server"
        )
    ids = extra_fields.get("prompt_ids")
    positions = range(context_length + suffix.answer_start, context_length + suffix.answer_end)
    if ids is not None:
        scored = [int(ids[p - 1][0]) for p in positions]
        sent = [int(sequence_ids[p]) for p in positions]
        if scored != sent:
            raise ValueError(
                f"extra_fields['prompt_ids']: the rollout server scored token ids {scored} where the probe sent {sent}"
            )
    values = np.array([[[float(logprobs[p - 1][0]) for p in positions]]], dtype=np.float64)
    return float(igpo_rewards.answer_logprob(values, np.ones(values.shape, dtype=bool))[0, 0])


class IGPOAgentLoopOutput(AgentLoopOutput):
    """verl's ``AgentLoopOutput`` whose ``as_dict()`` writes IGPO's per-turn ``rm_scores``.

    ``as_dict()`` is what verl 0.9's V1 trainer stores for each trajectory once the streaming
    reward has put the outcome R into ``reward_score``: the stock layout holds R at the last
    token only; here ``rm_scores`` [S] = ``igpo_token_scores`` of the probes in
    ``extra_fields["igpo_answer_logprob"]`` and R (w_ig * IG at the end of every turn but the
    last, w_out * R at the end of the last). Without ``reward_score`` there is no ``rm_scores``,
    as in verl. :meth:`keep_outcome_only` (validation rows) keeps verl's layout.
    """

    _settings: IGPOSettings = PrivateAttr(default_factory=IGPOSettings)
    _outcome_only: bool = PrivateAttr(default=False)

    @classmethod
    def from_output(cls, output: AgentLoopOutput, settings: IGPOSettings) -> IGPOAgentLoopOutput:
        """The same output (same fields, same set of fields given) with IGPO's ``as_dict()``."""
        values = {name: getattr(output, name) for name in type(output).model_fields}
        converted = cls.model_construct(_fields_set=set(output.model_fields_set), **values)
        converted._settings = settings
        return converted

    def keep_outcome_only(self) -> None:
        """Keep verl's layout (R at the last token), e.g. for validation, whose score is the rm_scores sum."""
        self._outcome_only = True

    def as_dict(self) -> dict[str, Any]:
        fields = super().as_dict()
        plan = fields["extra_fields"].pop(ACTOR_PROBES_KEY, None)
        if plan is not None:  # actor mode: the actor's old-log-prob pass reads the plan and writes rm_scores
            fields[ACTOR_PROBES_KEY] = plan
            return fields
        if "rm_scores" in fields and not self._outcome_only:
            fields["rm_scores"] = self.turn_reward_scores(fields["response_mask"])
        return fields

    def turn_reward_scores(self, response_mask: torch.Tensor) -> torch.Tensor:
        """[S] float32 token scores: IGPO's turn rewards at the turn ends of ``response_mask`` [S]."""
        probes = [float(value) for value in self.extra_fields[ANSWER_LOGPROB_KEY]]
        scores = igpo_token_scores(
            torch.tensor([probes], dtype=torch.float64),
            torch.tensor([float(self.reward_score)], dtype=torch.float64),
            torch.as_tensor(response_mask)[None],
            turn_mask=torch.ones((1, len(probes)), dtype=torch.bool),
            config=self._settings,
        )
        return scores[0].to(torch.float32)


@dataclass
class _Probes:
    """One trajectory's probes: the suffix, and per assistant turn where it starts in the response
    and whether its probe was skipped (longer than the server's context)."""

    suffix: ProbeSuffix
    values: list[float] = field(default_factory=list)
    turn_starts: list[int] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    prefill_tokens: int = 0
    global_steps: list[int] = field(default_factory=list)


@register(AGENT_LOOP_NAME)
class IGPOToolAgentLoop(ToolAgentLoop):
    """verl's ``ToolAgentLoop`` (same config, tools, tool parser and token layout) plus the probes.

    The hyperparameters that shape the rewards (``kind``, ``ig_weight``, ``outcome_weight``,
    ``log_prob_floor``) come from ``algorithm.igpo`` (see ``igpo_rewards.integrations.verl``).
    """

    probe_template: str = PROBE_TEMPLATE

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # verl_actor is a verl plugin too: imported where it is used, so that importing it first (which
        # makes verl load this module as a plugin) never finds it half-initialized.
        from igpo_rewards.integrations.verl_actor import probe_mode_from_config

        self.igpo_settings = settings_from_config(self.config.get("algorithm"))
        self.igpo_probe_mode = probe_mode_from_config(self.config)
        self._probes: _Probes | None = None  # verl builds one agent loop per trajectory
        self.probe_token_limit = self._probe_token_limit()

    def _check_manager(self) -> None:
        """Refuses the legacy trainer without ``IGPOAgentLoopManager`` (its workers drop the per-turn
        rewards): verl's legacy worker awaits every trajectory, so the first rollout stops the run.
        Under V1 the rewards reach the estimator without it (``IGPOAgentLoopOutput.as_dict``), and
        a refusal would only make verl's async modes evict and refill the group forever: an error
        in the log, once per process, says what is lost (the start-up checks, the failure metric
        and limit)."""
        # verl_checks imports this module's siblings: imported here, not at the top, so that importing
        # it first never finds this module half-initialized through verl's plugin loading.
        from igpo_rewards.integrations.verl_checks import enforce, in_igpo_worker, manager_refusal, uses_v1_trainer

        if in_igpo_worker():
            return
        if uses_v1_trainer(self.config):
            refusal = manager_refusal()
            _warn_once("no-manager", "igpo_tool_agent runs without IGPO's agent-loop manager: the start-up checks "
                       "(docs/integrations/verl.md) and the failed-session metric and limit are off. Set %s",
                       refusal.fix, level=logging.ERROR)
            return
        if "legacy-allowed" not in _warned:
            enforce([manager_refusal()], self.igpo_settings, when="igpo_tool_agent under the legacy trainer")
            _warned.add("legacy-allowed")  # allowed by the opt-in: warned once

    def _probe_token_limit(self) -> int:
        """The longest probe request the rollout server takes (:func:`probe_token_limit`)."""
        rollout, model = self.config.actor_rollout_ref.rollout, self.config.actor_rollout_ref.model
        max_model_len = rollout.get("max_model_len")
        if max_model_len:
            return probe_token_limit(max_model_len, 0)
        config_path = model.get("hf_config_path") or model.path
        positions = _max_position_embeddings(config_path, bool(model.get("trust_remote_code", False)))
        return probe_token_limit(None, positions)

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> IGPOAgentLoopOutput:
        self._check_manager()  # here, not in __init__: hydra would wrap the error in its own
        answer = probe_answer(kwargs.get("reward_model"), kwargs.get("extra_info"))
        self._probes = _Probes(build_probe_suffix(self.tokenizer, answer, template=self.probe_template))
        output = await super().run(sampling_params, **kwargs)
        return self._finish(output)

    async def _handle_generating_state(
        self, agent_data: AgentData, sampling_params: dict[str, Any], ignore_termination: bool = False
    ) -> AgentState:
        if self.igpo_probe_mode == "server":
            await self._probe(agent_data)
        self._probes.turn_starts.append(len(agent_data.response_mask))
        return await super()._handle_generating_state(agent_data, sampling_params, ignore_termination)

    async def _probe(self, agent_data: AgentData) -> None:
        """m_{i,j} for the next turn j: the probe suffix after the current context, scored by the
        server; a probe longer than the server's context repeats the last value (IG 0, see the module)."""
        probes = self._probes
        context = list(agent_data.prompt_ids)
        sequence = context + list(probes.suffix.token_ids)
        if len(sequence) > self.probe_token_limit:
            _warn_once("skipped", "igpo_tool_agent: a probe of %d tokens does not fit the rollout server's context "
                       "(at most %d tokens); it is skipped and its turn's information gain is 0 (counted in "
                       "extra_fields[%r]; shown once per process)", len(sequence), self.probe_token_limit,
                       PROBES_SKIPPED_KEY)
            probes.values.append(probes.values[-1] if probes.values else float("-inf"))
            probes.skipped.append(True)
            return
        probes.values.append(await self._score_probe_on_server(agent_data, sequence, len(context)))
        probes.skipped.append(False)

    async def _score_probe_on_server(self, agent_data: AgentData, sequence: list[int], context_length: int) -> float:
        """One probe request (``PROBE_SAMPLING_PARAMS``) for ``sequence`` = context + suffix; returns
        the mean prompt log-prob of the suffix's answer tokens. Under ``FullyAsyncLLMServerClient``
        it takes the base ``LLMServerClient.generate`` (the async client's own drops the prompt
        log-probs), and a request the server aborted is sent again."""
        client = self.server_manager
        generate = client.generate
        if isinstance(client, FullyAsyncLLMServerClient):
            generate = functools.partial(LLMServerClient.generate, client)
        for _ in range(PROBE_ABORT_RETRIES):
            output = await generate(
                request_id=agent_data.request_id,
                prompt_ids=sequence,
                sampling_params=dict(PROBE_SAMPLING_PARAMS),
                image_data=agent_data.image_data,
                video_data=agent_data.video_data,
                mm_processor_output=agent_data.mm_processor_output,
                audio_data=agent_data.audio_data,
                mm_processor_kwargs=agent_data.mm_processor_kwargs,
            )
            if output.stop_reason not in ABORTED:
                break
            await asyncio.sleep(1.0)
        else:
            raise RuntimeError(f"igpo_tool_agent: the rollout server aborted a probe request {PROBE_ABORT_RETRIES} "
                               f"times in a row (one retry per second)")
        self._probes.prefill_tokens += len(sequence)
        if output.extra_fields.get("global_steps") is not None:
            self._probes.global_steps.append(output.extra_fields["global_steps"])
        return probe_logprob_from_server_output(output.extra_fields, sequence, context_length, self._probes.suffix)

    def _finish(self, output: AgentLoopOutput) -> IGPOAgentLoopOutput:
        """Keeps the probes of the turns in the (truncated) response, one per run of 1s."""
        probes = self._probes
        run_starts = _run_starts(output.response_mask)
        kept = _turn_of_each_run(run_starts, probes.turn_starts)
        if kept is None:
            raise ValueError(
                f"igpo_tool_agent: response_mask has runs of 1s starting at {run_starts} but the "
                f"assistant turns started at {probes.turn_starts}; each turn must be exactly one run of 1s"
            )
        if self.igpo_probe_mode == "actor":
            self._record_probe_plan(output, [probes.turn_starts[turn] for turn in kept])
            return IGPOAgentLoopOutput.from_output(output, self.igpo_settings)
        output.extra_fields[ANSWER_LOGPROB_KEY] = [probes.values[turn] for turn in kept]
        output.extra_fields[PROBE_TOKENS_KEY] = probes.prefill_tokens
        output.extra_fields[PROBES_SKIPPED_KEY] = sum(probes.skipped[turn] for turn in kept)
        _widen_weight_versions(output.extra_fields, probes.global_steps)
        return IGPOAgentLoopOutput.from_output(output, self.igpo_settings)

    def _record_probe_plan(self, output: AgentLoopOutput, turn_starts: list[int]) -> None:
        """Actor mode: the probe plan of the kept turns (``verl_actor.actor_probe_plan``) and how many
        of its probes do not fit the server's context (the actor skips the same ones, server mode's rule)."""
        from igpo_rewards.integrations.verl_actor import actor_probe_plan

        plan = actor_probe_plan(prompt_length=len(output.prompt_ids), turn_starts=turn_starts, suffix=self._probes.suffix,
                                settings=self.igpo_settings, probe_token_limit=self.probe_token_limit)
        lengths = [start + len(plan["suffix_ids"]) for start in plan["turn_starts"]]
        skipped = sum(length > self.probe_token_limit for length in lengths)
        if skipped:
            _warn_once("skipped", "igpo_tool_agent: a probe of %d tokens does not fit the rollout server's context "
                       "(at most %d tokens); the actor skips it and its turn's information gain is 0 (counted in "
                       "extra_fields[%r]; shown once per process)", max(lengths), self.probe_token_limit,
                       PROBES_SKIPPED_KEY)
        output.extra_fields[ACTOR_PROBES_KEY] = plan
        output.extra_fields[PROBES_SKIPPED_KEY] = skipped


def _run_starts(mask: Sequence[int]) -> list[int]:
    """Where each run of 1s (turn) of a response mask starts: the first token of each turn of
    ``igpo_rewards.turn_index_from_response_mask``."""
    row = np.asarray([list(mask)], dtype=np.int64).reshape(1, -1)
    index = igpo_rewards.turn_index_from_response_mask(row)[0]
    num_turns = int(igpo_rewards.num_turns_from_response_mask(row)[0])
    return [int(np.argmax(index == turn)) for turn in range(num_turns)]


def _turn_of_each_run(run_starts: list[int], turn_starts: list[int]) -> list[int] | None:
    """The assistant turn each run belongs to (the last turn started at or before it), or None
    when two runs fall in one turn (a turn split by 0-mask tokens)."""
    turns = [int(np.searchsorted(turn_starts, start, side="right")) - 1 for start in run_starts]
    if any(turn < 0 for turn in turns) or len(set(turns)) != len(turns):
        return None
    return turns


def _widen_weight_versions(extra_fields: dict[str, Any], probe_steps: list[int]) -> None:
    """min/max_global_steps of the trajectory also cover the weight versions its probes ran under."""
    if not probe_steps:
        return
    for key, pick in (("min_global_steps", min), ("max_global_steps", max)):
        current = extra_fields.get(key)
        extra_fields[key] = pick(probe_steps) if current is None else pick(current, *probe_steps)
