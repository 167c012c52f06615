"""IGPO's ground-truth probe before every turn, all probes of a batch scored in one packed forward.

``score_probes(model, tokenizer, token_ids, turn_starts, answers) -> [B, T]`` is the entry
point for integrations; ``packed_forward`` is the kernel under it, which also returns the log-probs
of the trajectory tokens (the PPO "old" log-probs a trainer needs from the same forward).

IGPO measures the policy's belief in the ground-truth answer a before each turn j
(ALGORITHM.md section 1): teacher-force the fixed probe text after the context so far and score
only the answer's tokens,

    m_{i,j} = (1/L) * sum_l log pi(a_l | context_{i,j}, probe text, a_<l),

where context_{i,j} = ``token_ids[:turn_spans[j][0]]`` (the prompt for j = 0; up to the end of
observation j-1 after). The probe suffix ("Now there's enough information to answer" then
``<answer> a </answer>``) is tokenized ONCE per example (``build_probe_suffix``); its answer
tokens are found by CHARACTER OFFSETS (``offset_mapping``): every token whose character span
overlaps the answer's characters is scored, so a token that BPE merged across the boundary
(" Paris" with its leading space) is scored whole, never miscounted. The suffix is appended
as token ids after each prefix, exactly as the naive reference does.

A trainer scores the probes in the old-log-prob forward it runs anyway (``packed_forward``),
in one of two layouts (``probe_layout``) that give the same numbers:

"packed" (default, ``build_packed_inputs``): ONE forward, one row per trajectory b with n_b
probes::

    [ trajectory tokens 0 .. S_b-1 | probe copy 0 | probe copy 1 | ... | copy n_b-1 | padding ]

* input ids: the trajectory, then n_b copies of the P_b suffix ids, then ``pad_token_id``.
* position ids: trajectory token t -> t; token k of copy j -> start_j + k (it continues its
  prefix); padding -> 0.
* 4D additive attention mask [B, 1, N, N] in the model's dtype: 0 where a query may attend,
  ``finfo(dtype).min`` where not. Trajectory tokens are causal among themselves; copy j sees
  trajectory positions [0, start_j) and its own copy causally, nothing else; padding sees only
  itself (no fully masked row, so no NaN).

The trajectory's outputs are unaffected by the copies (no trajectory query sees them), so the
one forward returns the old log-probs and every probe's answer log-probs at once. Its cost: the
dense mask makes every trajectory query also score the probe keys (masked out, but computed).

"kv_cache" (``build_probe_inputs``): the trajectory forward alone (a padded causal batch) keeps
its KV cache; a second pass runs every probe copy of the batch as T x P query slots (copy j of
row b at slots [j * P, j * P + P_b), same positions), under a [B, 1, Q, N + Q] mask: copy j sees
the cached keys [0, start_j) and its own copy causally; unused slots see only themselves. Only
the T x P probe tokens are computed beyond the trajectory forward, which needs no custom mask
(on a GPU it could use a flash/causal kernel).

``packed_forward`` does not touch autograd: call it under ``torch.no_grad()`` for old log-probs
+ probes, or with grad (the warm start's probe term; the update's new log-probs, without
probes). Dropout follows ``model.training``; the caller sets eval/train.

The tests compare both layouts, values and gradients, with one plain forward per probe (what
the authors' released code does); tests/benchmarks/test_probes.py times them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

import igpo_rewards
from igpo_rewards.agent.protocol import ANSWER_PLACEHOLDER, PROBE_TEMPLATE

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "PROBE_LAYOUTS",
    "PackedForward",
    "PackedInputs",
    "ProbeInputs",
    "ProbeSuffix",
    "build_packed_inputs",
    "build_probe_inputs",
    "build_probe_suffix",
    "packed_forward",
    "score_probes",
]



@dataclass(frozen=True)
class ProbeSuffix:
    """The tokenized probe text for one answer.

    Attributes:
        text: the suffix text (the template with the answer filled in).
        token_ids: its token ids (tokenized alone, no special tokens added), length P.
        answer_start, answer_end: ``token_ids[answer_start:answer_end]`` are the answer tokens
            (every token whose character span overlaps the answer's characters); L = their count.
    """

    text: str
    token_ids: tuple[int, ...]
    answer_start: int
    answer_end: int

    @property
    def num_answer_tokens(self) -> int:
        """L, the number of scored tokens."""
        return self.answer_end - self.answer_start


def build_probe_suffix(
    tokenizer: PreTrainedTokenizerBase, answer: str, *, template: str = PROBE_TEMPLATE
) -> ProbeSuffix:
    """Tokenize the probe suffix for ``answer`` and locate the answer's tokens by character offsets.

    The answer occupies characters ``[c0, c1)`` of ``text = template.replace("{answer}", answer)``
    with ``c0 = template.index("{answer}")``. Token i is an answer token iff its offset span
    ``[s, e)`` is non-empty and overlaps ``[c0, c1)``: a token that BPE merged across the boundary
    (the leading space in " Paris", or template text glued to the answer) is scored whole.

    Args:
        tokenizer: a fast tokenizer (offsets mapping needed).
        answer: the ground-truth answer string, non-empty.
        template: the probe text with exactly one ``{answer}``.

    Raises:
        TypeError: a slow tokenizer or a non-str answer.
        ValueError: an empty answer, a template without exactly one ``{answer}``, or no token
            overlapping the answer.

    Example:
        >>> from igpo_rewards.reference_trainer.modeling import train_tokenizer
        >>> tok = train_tokenizer(["Now there's enough information to answer Paris"] * 3, vocab_size=320)
        >>> suffix = build_probe_suffix(tok, "Paris")
        >>> tok.decode(suffix.token_ids[suffix.answer_start:suffix.answer_end])
        ' Paris'
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"tokenizer must be a fast tokenizer (offsets mapping), got {type(tokenizer).__name__}")
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    if not answer:
        raise ValueError("answer is empty: there is nothing to score")
    if template.count(ANSWER_PLACEHOLDER) != 1:
        raise ValueError(f"template must contain {ANSWER_PLACEHOLDER!r} exactly once, got {template!r}")
    char_start = template.index(ANSWER_PLACEHOLDER)
    char_end = char_start + len(answer)
    text = template.replace(ANSWER_PLACEHOLDER, answer)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    scored = [
        i
        for i, (start, end) in enumerate(encoding["offset_mapping"])
        if end > start and start < char_end and end > char_start
    ]
    if not scored:
        raise ValueError(f"no token of the probe text {text!r} overlaps the answer {answer!r}")
    return ProbeSuffix(
        text=text,
        token_ids=tuple(int(i) for i in encoding["input_ids"]),
        answer_start=scored[0],
        answer_end=scored[-1] + 1,
    )


class PackedInputs(NamedTuple):
    """Model inputs of a packed batch and where to read each log-prob (see the module docstring).

    Shapes: B trajectories, N packed length, K_t trajectory targets, K_p probe targets.
    A target (row b, source position src, token id) means: the logits at packed position
    ``src`` of row b score ``token``.
    """

    input_ids: torch.Tensor  # [B, N] long
    position_ids: torch.Tensor  # [B, N] long
    attention_mask: torch.Tensor  # [B, 1, N, N] additive, model dtype
    trajectory_targets: torch.Tensor  # [K_t, 4] long: row, source position, token id, token index t
    probe_targets: torch.Tensor  # [K_p, 5] long: row, source position, token id, probe j, answer index l
    sequence_length: int  # S = max trajectory length
    num_probes: int  # T = max probes per trajectory
    num_answer_tokens: int  # L = max answer tokens


def _check_batch(
    token_ids: Sequence[Sequence[int]],
    starts: Sequence[Sequence[int]] | None,
    suffixes: Sequence[ProbeSuffix | None] | None,
) -> tuple[list[list[int]], list[list[int]], list[ProbeSuffix | None]]:
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence) or len(token_ids) == 0:
        raise ValueError(f"token_ids must be a non-empty sequence of token id sequences, got {token_ids!r:.80}")
    rows = [list(map(int, row)) for row in token_ids]
    for b, row in enumerate(rows):
        if not row:
            raise ValueError(f"token_ids[{b}] is empty")
    if starts is None:
        if suffixes is not None:
            raise ValueError("suffixes given without probe_starts")
        return rows, [[] for _ in rows], [None for _ in rows]
    if suffixes is None:
        raise ValueError("probe_starts given without suffixes")
    if len(starts) != len(rows) or len(suffixes) != len(rows):
        raise ValueError(
            f"token_ids, probe_starts and suffixes must have one entry per trajectory, "
            f"got {len(rows)}, {len(starts)} and {len(suffixes)}"
        )
    start_rows = [list(map(int, row)) for row in starts]
    for b, (row, row_starts, suffix) in enumerate(zip(rows, start_rows, suffixes)):
        bad = [s for s in row_starts if not 1 <= s <= len(row)]
        if bad:
            raise ValueError(
                f"probe_starts[{b}] must lie in [1, {len(row)}] (len(token_ids[{b}])), got {bad}"
            )
        if row_starts and not isinstance(suffix, ProbeSuffix):
            raise TypeError(f"suffixes[{b}] must be a ProbeSuffix (trajectory {b} has probes), got {suffix!r}")
    return rows, start_rows, list(suffixes)


def build_packed_inputs(
    token_ids: Sequence[Sequence[int]],
    probe_starts: Sequence[Sequence[int]] | None = None,
    suffixes: Sequence[ProbeSuffix | None] | None = None,
    *,
    pad_token_id: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> PackedInputs:
    """Pack trajectories and their probe copies into one padded batch with a 4D attention mask.

    Args:
        token_ids: B trajectories, each a non-empty list of token ids (lengths S_b may differ).
        probe_starts: per trajectory, the start of each probe's context: probe j of trajectory b
            scores its answer after ``token_ids[b][:probe_starts[b][j]]``; each start in
            [1, S_b]. ``None``: no probes (a plain padded causal batch).
        suffixes: per trajectory, the ``ProbeSuffix`` of its answer (``None`` allowed for a
            trajectory without probes).
        pad_token_id: id written at padded positions (never attended to by a real token).
        dtype: dtype of the additive mask (the model's dtype).
        device: where the tensors go.

    Returns:
        ``PackedInputs``; row b has length S_b + n_b * P_b before right padding to N.

    Raises:
        ValueError / TypeError: empty batch or trajectory, mismatched lengths, a start outside
        [1, S_b], or a missing suffix.
    """
    rows, start_rows, suffix_rows = _check_batch(token_ids, probe_starts, suffixes)
    batch = len(rows)
    lengths = [
        len(row) + len(starts) * (len(suffix.token_ids) if starts else 0)
        for row, starts, suffix in zip(rows, start_rows, suffix_rows)
    ]
    width = max(lengths)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    segment = torch.full((batch, width), -2, dtype=torch.long)  # -1 trajectory, j copy j, -2 padding
    visible_until = torch.full((batch, width), -1, dtype=torch.long)  # last trajectory key a query sees
    trajectory_targets: list[torch.Tensor] = []
    probe_targets: list[list[int]] = []
    for b, (row, starts, suffix) in enumerate(zip(rows, start_rows, suffix_rows)):
        length = len(row)
        input_ids[b, :length] = torch.tensor(row, dtype=torch.long)
        position_ids[b, :length] = torch.arange(length)
        segment[b, :length] = -1
        visible_until[b, :length] = torch.arange(length)
        if length > 1:
            t = torch.arange(1, length)
            trajectory_targets.append(
                torch.stack([torch.full_like(t, b), t - 1, input_ids[b, 1:length], t], dim=1)
            )
        if not starts:
            continue
        copy_ids = torch.tensor(suffix.token_ids, dtype=torch.long)
        copy_length = len(suffix.token_ids)
        for j, start in enumerate(starts):
            offset = length + j * copy_length
            input_ids[b, offset : offset + copy_length] = copy_ids
            position_ids[b, offset : offset + copy_length] = start + torch.arange(copy_length)
            segment[b, offset : offset + copy_length] = j
            visible_until[b, offset : offset + copy_length] = start - 1
            for l, k in enumerate(range(suffix.answer_start, suffix.answer_end)):
                source = start - 1 if k == 0 else offset + k - 1
                probe_targets.append([b, source, suffix.token_ids[k], j, l])

    index = torch.arange(width)
    query, key = index[:, None], index[None, :]
    key_segment, query_segment = segment[:, None, :], segment[:, :, None]
    allowed = (
        ((key_segment == -1) & (key <= visible_until[:, :, None]))
        | ((query_segment >= 0) & (key_segment == query_segment) & (key <= query))
        | (key == query)
    )
    attention_mask = torch.zeros((batch, 1, width, width), dtype=dtype)
    attention_mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)

    trajectory_tensor = (
        torch.cat(trajectory_targets) if trajectory_targets else torch.zeros((0, 4), dtype=torch.long)
    )
    probe_tensor = torch.tensor(probe_targets, dtype=torch.long).reshape(-1, 5)
    return PackedInputs(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        attention_mask=attention_mask.to(device),
        trajectory_targets=trajectory_tensor.to(device),
        probe_targets=probe_tensor.to(device),
        sequence_length=max(len(row) for row in rows),
        num_probes=max(len(starts) for starts in start_rows),
        num_answer_tokens=max(
            (suffix.num_answer_tokens for starts, suffix in zip(start_rows, suffix_rows) if starts), default=0
        ),
    )


class ProbeInputs(NamedTuple):
    """Inputs of the probe pass that follows a trajectory forward (see ``build_probe_inputs``).

    Shapes: B trajectories, N the first pass's (padded) length, Q = T * P probe slots (T = max
    probes, P = longest suffix), K_p probe targets. Sources index the two passes' hidden states
    concatenated along the sequence: [0, N) the trajectory pass, N + q probe slot q.
    """

    input_ids: torch.Tensor  # [B, Q] long
    position_ids: torch.Tensor  # [B, Q] long
    attention_mask: torch.Tensor  # [B, 1, Q, N + Q] additive, model dtype: keys = cached trajectory, then slots
    probe_targets: torch.Tensor  # [K_p, 5] long: row, source position, token id, probe j, answer index l
    num_probes: int  # T
    num_answer_tokens: int  # L


def build_probe_inputs(
    token_ids: Sequence[Sequence[int]],
    probe_starts: Sequence[Sequence[int]],
    suffixes: Sequence[ProbeSuffix | None],
    *,
    cached_length: int | None = None,
    pad_token_id: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> ProbeInputs:
    """Every probe copy of a batch as one forward over the KV cache of the trajectory forward.

    Probe copy j of row b fills slots [j * P, j * P + P_b) (P = the batch's longest suffix, P_b
    row b's): its ids are the suffix ids, its positions ``start_j + k`` (it continues its
    prefix), and it attends to the cached trajectory keys [0, start_j) and to its own copy
    causally. Unused slots hold ``pad_token_id`` and attend only to themselves (no fully masked
    row, so no NaN). Answer token k of copy j is scored at the hidden state of the token before
    it: the trajectory's position ``start_j - 1`` for k = 0 (the prefix's last token), slot
    ``j * P + k - 1`` after.

    Args:
        token_ids, probe_starts, suffixes: as in ``build_packed_inputs`` (probes required).
        cached_length: N, the length of the first pass (its padded width); default max S_b.
        pad_token_id, dtype, device: as in ``build_packed_inputs``.

    Raises:
        ValueError / TypeError: as ``build_packed_inputs``; ``cached_length`` < max S_b.
    """
    rows, start_rows, suffix_rows = _check_batch(token_ids, probe_starts, suffixes)
    longest = max(len(row) for row in rows)
    cached = longest if cached_length is None else int(cached_length)
    if cached < longest:
        raise ValueError(f"cached_length must be >= the longest trajectory ({longest}), got {cached_length}")
    batch = len(rows)
    num_probes = max(len(starts) for starts in start_rows)
    width = max((len(suffix.token_ids) for starts, suffix in zip(start_rows, suffix_rows) if starts), default=0)
    slots = num_probes * width
    input_ids = torch.full((batch, slots), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((batch, slots), dtype=torch.long)
    copy_of_slot = torch.full((batch, slots), -1, dtype=torch.long)  # j, or -1 for an unused slot
    visible_until = torch.zeros((batch, slots), dtype=torch.long)  # cached keys [0, start_j) are visible
    probe_targets: list[list[int]] = []
    for b, (starts, suffix) in enumerate(zip(start_rows, suffix_rows)):
        if not starts:
            continue
        copy_ids = torch.tensor(suffix.token_ids, dtype=torch.long)
        size = len(suffix.token_ids)
        for j, start in enumerate(starts):
            offset = j * width
            input_ids[b, offset : offset + size] = copy_ids
            position_ids[b, offset : offset + size] = start + torch.arange(size)
            copy_of_slot[b, offset : offset + size] = j
            visible_until[b, offset : offset + size] = start
            for l, k in enumerate(range(suffix.answer_start, suffix.answer_end)):
                source = start - 1 if k == 0 else cached + offset + k - 1
                probe_targets.append([b, source, suffix.token_ids[k], j, l])

    slot = torch.arange(slots)
    sees_cache = torch.arange(cached)[None, None, :] < visible_until[:, :, None]  # [B, Q, N]
    query_copy, key_copy = copy_of_slot[:, :, None], copy_of_slot[:, None, :]
    sees_slots = ((query_copy >= 0) & (key_copy == query_copy) & (slot[None, :] <= slot[:, None])) | (
        slot[None, :] == slot[:, None]
    )  # [B, Q, Q]
    allowed = torch.cat([sees_cache, sees_slots], dim=2)
    attention_mask = torch.zeros((batch, 1, slots, cached + slots), dtype=dtype)
    attention_mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return ProbeInputs(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        attention_mask=attention_mask.to(device),
        probe_targets=torch.tensor(probe_targets, dtype=torch.long).reshape(-1, 5).to(device),
        num_probes=num_probes,
        num_answer_tokens=max(
            (suffix.num_answer_tokens for starts, suffix in zip(start_rows, suffix_rows) if starts), default=0
        ),
    )


class PackedForward(NamedTuple):
    """What ``packed_forward`` returns. B trajectories, S = max length, T = max probes, L = max answer tokens.

    Attributes:
        token_logprobs: [B, S] float32, ``log pi(token_ids[b][t] | token_ids[b][:t])`` at index t
            (aligned with the token it scores, so ``turn_spans`` index it directly); 0.0 at t = 0
            (nothing predicts the first token) and at padding.
        token_mask: [B, S] bool, True where ``token_logprobs`` is defined (1 <= t < S_b).
        probe_logprobs: [B, T, L] float32, log-prob of answer token l at probe j; 0.0 at padding.
        probe_mask: [B, T, L] bool, True at real answer tokens of real probes.
        answer_logprob: [B, T] float32, ``igpo_rewards.answer_logprob(probe_logprobs, probe_mask)``
            (length-normalized mean; 0.0 at padded probes), the input of ``igpo_advantages``.
        token_entropy: [B, S] float32 entropy of the distribution that produced token t (0.0
            where undefined), or ``None`` unless requested.
    """

    token_logprobs: torch.Tensor
    token_mask: torch.Tensor
    probe_logprobs: torch.Tensor
    probe_mask: torch.Tensor
    answer_logprob: torch.Tensor
    token_entropy: torch.Tensor | None


def _check_model(model: PreTrainedModel) -> None:
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"the packed forward needs attn_implementation 'sdpa' or 'eager' (custom 4D masks), "
            f"the model uses {implementation!r}; load it with attn_implementation='sdpa'"
        )
    if getattr(model.config, "final_logit_softcapping", None) is not None:
        raise ValueError("models with final_logit_softcapping are not supported by the packed forward")


def _cache_argument(model: PreTrainedModel, output: object) -> dict[str, object]:
    """The first pass's KV cache as the keyword the model's forward takes: ``cache`` in
    transformers >= 5.x (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    cache = getattr(output, "cache", None)
    if cache is None:
        cache = output.past_key_values
    keyword = "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"
    return {keyword: cache}


def _score(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    sources: torch.Tensor,
    tokens: torch.Tensor,
    *,
    chunk_size: int,
    entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob (and entropy) of ``tokens`` under the logits at ``hidden[rows, sources]``, in chunks."""
    head = model.get_output_embeddings()
    logprobs, entropies = [], []
    for begin in range(0, rows.shape[0], chunk_size):
        end = begin + chunk_size
        logits = head(hidden[rows[begin:end], sources[begin:end]]).float()
        log_softmax = torch.log_softmax(logits, dim=-1)
        logprobs.append(log_softmax.gather(-1, tokens[begin:end, None])[:, 0])
        if entropy:
            entropies.append(-(log_softmax.exp() * log_softmax).sum(-1))
    if not logprobs:
        empty = hidden.new_zeros((0,), dtype=torch.float32)
        return empty, (empty if entropy else None)
    return torch.cat(logprobs), (torch.cat(entropies) if entropy else None)


#: How ``packed_forward`` lays out the probes: "packed" (ONE forward, copies appended after the
#: trajectory) or "kv_cache" (a second pass of the copies over the trajectory forward's KV cache).
PROBE_LAYOUTS = ("packed", "kv_cache")


def packed_forward(
    model: PreTrainedModel,
    token_ids: Sequence[Sequence[int]],
    probe_starts: Sequence[Sequence[int]] | None = None,
    suffixes: Sequence[ProbeSuffix | None] | None = None,
    *,
    probe_layout: str = "packed",
    pad_token_id: int | None = None,
    return_entropy: bool = False,
    chunk_size: int = 1024,
) -> PackedForward:
    """Trajectory token log-probs (the PPO "old" ones) and every probe's answer log-probs.

    ``probe_layout`` chooses how the probes ride along (same results, up to float rounding):

    * ``"packed"`` (default): ONE forward over ``build_packed_inputs`` with the probe copies
      appended after each trajectory under one [B, 1, N, N] mask.
    * ``"kv_cache"``: the trajectory forward alone keeps its KV cache, then a second pass runs
      only the T x P probe slots against it (``build_probe_inputs``). No trajectory query
      scores a probe key, so the extra work is the ideal T x P tokens (docs/benchmarks.md
      measures both), and the first pass needs no custom mask.

    Gradients flow if autograd is on (the caller chooses with ``torch.no_grad()``). Logits are
    computed only at the positions that score something, ``chunk_size`` rows at a time, in
    float32 (the lm head is applied to the base model's last hidden state, as Llama/Qwen2/
    Mistral-style causal LMs do).

    Args:
        model: a causal LM with ``attn_implementation`` "sdpa" or "eager".
        token_ids: B trajectories (lengths may differ).
        probe_starts: per trajectory, where each probe's context ends (see
            ``build_packed_inputs``); ``None`` for no probes (then T = L = 0).
        suffixes: per trajectory, its ``ProbeSuffix``.
        probe_layout: "packed" or "kv_cache" (see above).
        pad_token_id: padding id; defaults to ``model.config.pad_token_id`` (or 0).
        return_entropy: also return the per-token entropy of the trajectory tokens.
        chunk_size: rows of logits materialised at once (memory bound for large vocabularies).

    Returns:
        ``PackedForward`` (shapes in its docstring), on the model's device.

    Raises:
        ValueError / TypeError: see ``build_packed_inputs``; an unsupported attention
        implementation; ``chunk_size`` < 1; an unknown ``probe_layout``.
    """
    _check_model(model)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if probe_layout not in PROBE_LAYOUTS:
        raise ValueError(f"probe_layout must be one of {PROBE_LAYOUTS}, got {probe_layout!r}")
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    device = model.get_input_embeddings().weight.device
    _check_batch(token_ids, probe_starts, suffixes)
    with_probes = probe_starts is not None and any(len(starts) for starts in probe_starts)
    cached = with_probes and probe_layout == "kv_cache"
    packed = build_packed_inputs(
        token_ids,
        None if cached else probe_starts,
        None if cached else suffixes,
        pad_token_id=pad_token_id,
        dtype=model.dtype,
        device=device,
    )
    first = model.base_model(
        input_ids=packed.input_ids,
        attention_mask=packed.attention_mask,
        position_ids=packed.position_ids,
        use_cache=cached,
    )
    hidden = first.last_hidden_state

    batch = packed.input_ids.shape[0]
    traj = packed.trajectory_targets
    values, entropy = _score(
        model, hidden, traj[:, 0], traj[:, 1], traj[:, 2], chunk_size=chunk_size, entropy=return_entropy
    )
    token_logprobs = hidden.new_zeros((batch, packed.sequence_length), dtype=torch.float32)
    token_logprobs = token_logprobs.index_put((traj[:, 0], traj[:, 3]), values)
    token_mask = torch.zeros((batch, packed.sequence_length), dtype=torch.bool, device=device)
    token_mask[traj[:, 0], traj[:, 3]] = True
    token_entropy = None
    if return_entropy:
        token_entropy = hidden.new_zeros((batch, packed.sequence_length), dtype=torch.float32)
        token_entropy = token_entropy.index_put((traj[:, 0], traj[:, 3]), entropy)

    if cached:
        # The probe pass: only the T x P probe queries, against the first pass's cached keys.
        probes = build_probe_inputs(
            token_ids, probe_starts, suffixes, cached_length=packed.input_ids.shape[1],
            pad_token_id=pad_token_id, dtype=model.dtype, device=device,
        )
        second = model.base_model(
            input_ids=probes.input_ids,
            attention_mask=probes.attention_mask,
            position_ids=probes.position_ids,
            use_cache=False,
            **_cache_argument(model, first),
        )
        hidden = torch.cat([hidden, second.last_hidden_state], dim=1)
        probe_logprobs, probe_mask = _probe_arrays(model, hidden, probes, chunk_size=chunk_size)
    else:
        probe_logprobs, probe_mask = _probe_arrays(model, hidden, packed, chunk_size=chunk_size)
    answer_logprob = igpo_rewards.answer_logprob(probe_logprobs, probe_mask)
    return PackedForward(token_logprobs, token_mask, probe_logprobs, probe_mask, answer_logprob, token_entropy)


def _probe_arrays(
    model: PreTrainedModel, hidden: torch.Tensor, packed: PackedInputs | ProbeInputs, *, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    batch = packed.input_ids.shape[0]
    shape = (batch, packed.num_probes, packed.num_answer_tokens)
    probe = packed.probe_targets
    values, _ = _score(model, hidden, probe[:, 0], probe[:, 1], probe[:, 2], chunk_size=chunk_size, entropy=False)
    where = (probe[:, 0], probe[:, 3], probe[:, 4])
    probe_logprobs = hidden.new_zeros(shape, dtype=torch.float32).index_put(where, values)
    probe_mask = torch.zeros(shape, dtype=torch.bool, device=hidden.device)
    probe_mask[where] = True
    return probe_logprobs, probe_mask


def score_probes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[Sequence[int]],
    turn_starts: Sequence[Sequence[int]],
    answers: Sequence[str],
    *,
    template: str = PROBE_TEMPLATE,
    probe_layout: str = "packed",
) -> torch.Tensor:
    """IGPO's probe before every turn of every trajectory: the [B, T] answer log-probs, one packed forward.

    Probe j of trajectory b teacher-forces the probe text after ``token_ids[b][:turn_starts[b][j]]``
    and returns the length-normalized log-prob of the answer's tokens
    (``igpo_rewards.answer_logprob``, the input of ``igpo_rewards.igpo_advantages``). Each
    distinct answer's suffix is tokenized once (``build_probe_suffix``).

    Runs under the caller's autograd mode: wrap it in ``torch.no_grad()`` to compute rewards.

    Args:
        model: an HF causal LM with ``attn_implementation`` "sdpa" or "eager".
        tokenizer: its fast tokenizer.
        token_ids: B trajectories: prompt, turns and observations, exactly as the model saw them.
        turn_starts: per trajectory, where each turn starts (the prompt's length for turn 0);
            each in [1, len(token_ids[b])]. T = the most turns in the batch.
        answers: per trajectory, the ground-truth answer probed (e.g. the first alias).
        template: the probe text with one ``{answer}``.
        probe_layout: "packed" (one forward) or "kv_cache" (see ``packed_forward``).

    Returns:
        [B, T] float32 on the model's device; 0.0 at padded turns (t >= len(turn_starts[b])).

    Raises:
        ValueError / TypeError: mismatched lengths, an empty answer, a start outside the
        trajectory, and what ``packed_forward`` raises.
    """
    if len(answers) != len(token_ids):
        raise ValueError(f"answers must have one entry per trajectory ({len(token_ids)}), got {len(answers)}")
    suffixes: dict[str, ProbeSuffix] = {}
    for answer in answers:
        if answer not in suffixes:
            suffixes[answer] = build_probe_suffix(tokenizer, answer, template=template)
    out = packed_forward(
        model,
        token_ids,
        turn_starts,
        [suffixes[answer] for answer in answers],
        probe_layout=probe_layout,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out.answer_logprob
