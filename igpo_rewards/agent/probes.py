"""IGPO's ground-truth probe before every turn, all probes of a batch scored in one forward.

``score_probes(model, tokenizer, token_ids, turn_starts, answers) -> [B, T]`` is the entry point
for integrations ([B, T, K] when ``answers`` holds lists of targets). Under it, everything works on one padded batch of tensors that a trainer builds
once per step (``pad_token_ids``, ``suffix_table``):

- ``probe_forward``: the log-probs of chosen trajectory tokens (the PPO "old" log-probs) and the
  answer log-probs of every probe, from one forward;
- ``token_logprobs``: the log-probs of chosen tokens from a plain causal forward (no probes), for
  the update's new log-probs, a reference model, or language-model training.

Several targets (docs/algorithm.md, section 7.1): a probe may score K targets per turn, the
answer and sub-goals such as a multi-hop question's bridge entities. ``target_table`` builds a
``SuffixTable`` with a target axis (row b: the answer's suffix, then its sub-goals'); both layouts
then run K suffixes per turn slot in the same forward, and the outputs gain a K axis
(``answer_logprob`` [B, T, K]). ``score_probes`` takes a list of targets per trajectory. With one
target every index reduces to the one-target layout, so the tensors are the same.

IGPO measures the policy's belief in the ground-truth answer a before each turn j
(docs/algorithm.md, section 1): teacher-force the fixed probe text after the context so far and score
only the answer's tokens,

    m_{i,j} = (1/L) * sum_l log pi(a_l | context_{i,j}, probe text, a_<l),

where context_{i,j} = ``token_ids[:turn_starts[j]]`` (the prompt for j = 0; up to the end of
observation j-1 after). The probe suffix ("Now there's enough information to answer" then
``<answer> a </answer>``) is tokenized ONCE per answer (``build_probe_suffix``); its answer
tokens are found by CHARACTER OFFSETS (``offset_mapping``): every token whose character span
overlaps the answer's characters is scored, so a token that BPE merged across the boundary
(" Paris" with its leading space) is scored whole, never miscounted. The suffix is appended as
token ids after each prefix, exactly as one forward per probe would see it.

Batches are right-padded ([B, S] ids and [B] lengths). A forward without probe copies is the
model's ordinary causal attention: with right padding no real token attends to a pad, so no mask
is passed at all and SDPA takes its causal fast path (no [B, 1, S, S] mask is built). Logits are
computed only where a log-prob is asked for (``token_mask``, the probes' answer tokens), in
float32, ``chunk_size`` rows at a time: with a large vocabulary the head costs as much as the
layers, and a trainer needs it on the generated tokens only.

``probe_forward`` lays the probes out in one of two ways (``probe_layout``), same numbers:

"packed" (default, ``build_packed_inputs``): ONE forward, one row per trajectory b with n_b
probes of suffix length P_b::

    [ trajectory tokens 0 .. S_b-1 | probe copy 0 | probe copy 1 | ... | copy n_b-1 | padding ]

* input ids: the trajectory, then n_b copies of the suffix ids, then ``pad_token_id``;
* position ids: trajectory token t -> t; token k of copy j -> start_j + k (it continues its
  prefix); padding -> 0;
* a 4D additive mask [B, 1, N, N] (0 where a query may attend, ``finfo(dtype).min`` where not):
  trajectory tokens are causal among themselves; copy j sees trajectory positions [0, start_j)
  and its own copy causally, nothing else; padding sees only itself (no fully masked row).

No trajectory query sees a copy, so the one forward returns the old log-probs and every probe.
Its cost: the dense mask makes every trajectory query also score the probe keys (masked out,
but computed), and the attention cannot take the causal fast path.

"kv_cache" (``build_probe_inputs``): the trajectory forward alone (plain causal, fast path)
keeps its KV cache; a second pass runs every probe copy as T x P query slots (copy j of row b at
slots [j * P, j * P + P_b), same positions) under a [B, 1, Q, N + Q] mask: copy j sees the cached
keys [0, start_j) and its own copy causally; unused slots see only themselves. Only the T x P
probe tokens are computed beyond the trajectory forward.

``cached_probe_forward`` scores the probes over the KV cache of a trajectory forward someone
else ran (an RL trainer's old-log-prob pass: verl's actor engine, see
``igpo_rewards.integrations.verl_actor``), padded (one cache row per trajectory) or packed (all
trajectories in one row). Its layout (``build_cached_probe_groups``) puts each row's copies back
to back, n_b * P_b query slots, and runs rows of similar probe length together, one forward per
group over the keys the group reads: at most (1 + ``max_padding``) x the ideal T x P probe tokens,
where "kv_cache" gives every row T_max x P_max slots.

Neither function touches autograd: call them under ``torch.no_grad()`` for old log-probs and
rewards, or with grad (an SFT probe term, the update's new log-probs). Dropout follows
``model.training``. The inputs are built with tensor operations only (no loop per token, probe
or row). The tests compare both layouts, values and gradients, with one plain forward per probe
(what the authors' released code does); tests/benchmarks/test_probes.py times them.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

import igpo_rewards
from igpo_rewards import _checks
from igpo_rewards.agent.protocol import ANSWER_PLACEHOLDER, PROBE_TEMPLATE

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "PROBE_LAYOUTS",
    "CachedProbeForward",
    "CachedProbeGroup",
    "PackedInputs",
    "ProbeForward",
    "ProbeInputs",
    "ProbeSuffix",
    "SuffixTable",
    "build_cached_probe_groups",
    "build_packed_inputs",
    "build_probe_inputs",
    "build_probe_suffix",
    "cached_probe_forward",
    "pad_token_ids",
    "probe_forward",
    "score_probes",
    "suffix_table",
    "target_table",
    "token_logprobs",
]

#: How ``probe_forward`` lays out the probes: "packed" (ONE forward, copies appended after the
#: trajectory) or "kv_cache" (a second pass of the copies over the trajectory forward's KV cache).
PROBE_LAYOUTS = ("packed", "kv_cache")


# --- the probe text of one answer ---------------------------------------------------------------


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
        >>> from igpo_rewards.testing.tiny import train_tokenizer
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


# --- a batch as tensors -------------------------------------------------------------------------


class SuffixTable(NamedTuple):
    """The probe suffix of every row of a batch, as tensors (P = the longest suffix).

    One target per row (``suffix_table``), or K (``target_table``: an extra target axis; target
    0 the answer, absent targets have length 0).

    Attributes:
        token_ids: [B, P] (or [B, K, P]) long, row b's suffix ids then 0.
        lengths: [B] (or [B, K]) long, P_b (0: row b has no target k).
        answer_start, answer_end: [B] (or [B, K]) long, the answer tokens of row b's suffix.
    """

    token_ids: torch.Tensor
    lengths: torch.Tensor
    answer_start: torch.Tensor
    answer_end: torch.Tensor

    def rows(self, index: torch.Tensor) -> SuffixTable:
        """The table of rows ``index`` (a micro batch)."""
        return SuffixTable(*(part[index] for part in self))

    @property
    def num_targets(self) -> int:
        """K: 1 for a table of one suffix per row, else the size of the target axis."""
        return 1 if self.lengths.dim() == 1 else int(self.lengths.shape[1])

    @property
    def target_mask(self) -> torch.Tensor:
        """[B, K] bool, which targets each row has (``igpo_rewards``' ``target_mask``); [B, 1] all
        True for one suffix per row."""
        return (self.lengths if self.lengths.dim() == 2 else self.lengths[:, None]) > 0


def _padded(rows: Sequence[Sequence[int]], *, pad: int, device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    flat = torch.tensor([int(item) for row in rows for item in row], dtype=torch.long)
    width = int(lengths.max()) if len(rows) else 0
    padded = torch.full((len(rows), width), pad, dtype=torch.long)
    padded[torch.arange(width)[None, :] < lengths[:, None]] = flat
    return padded.to(device), lengths.to(device)


def pad_token_ids(
    token_ids: Sequence[Sequence[int]], *, pad_token_id: int = 0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad B token id sequences: ``(input_ids [B, S] long, lengths [B] long)``, S = the longest.

    Raises:
        TypeError: not a sequence of token id sequences. ValueError: no sequence, or an empty one.
    """
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
        raise TypeError(f"token_ids must be a sequence of token id sequences, got {type(token_ids).__name__}")
    if len(token_ids) == 0:
        raise ValueError("token_ids must be a non-empty sequence of token id sequences, got an empty one")
    for b, row in enumerate(token_ids):
        if len(row) == 0:
            raise ValueError(f"token_ids[{b}] is empty")
    return _padded(token_ids, pad=pad_token_id, device=device)


def suffix_table(suffixes: Sequence[ProbeSuffix], *, device: torch.device | str | None = None) -> SuffixTable:
    """The ``SuffixTable`` of one ``ProbeSuffix`` per row (the G rollouts of a question share one)."""
    for b, suffix in enumerate(suffixes):
        if not isinstance(suffix, ProbeSuffix):
            raise TypeError(f"suffixes[{b}] must be a ProbeSuffix, got {suffix!r:.80}")
    token_ids, lengths = _padded([suffix.token_ids for suffix in suffixes], pad=0, device=device)
    bounds = torch.tensor([[s.answer_start, s.answer_end] for s in suffixes], dtype=torch.long, device=device)
    return SuffixTable(token_ids, lengths, bounds[:, 0], bounds[:, 1])


def target_table(
    targets: Sequence[Sequence[ProbeSuffix]], *, device: torch.device | str | None = None
) -> SuffixTable:
    """The ``SuffixTable`` of K targets per row: row b's list is [answer, sub-goal 1, ...].

    Rows may have different numbers of targets (K = the longest list); a row's missing targets
    have length 0 and are absent from ``target_mask``. P = the longest suffix of the batch.

    Raises:
        TypeError: a row that is not a sequence of ``ProbeSuffix``.
        ValueError: an empty row (every row has the answer), or no row.

    Example:
        >>> table = target_table([[ProbeSuffix("", (5, 6, 7), 1, 3)], [ProbeSuffix("", (5, 8), 1, 2), ProbeSuffix("", (9,), 0, 1)]])
        >>> table.token_ids.tolist(), table.target_mask.tolist()
        ([[[5, 6, 7], [0, 0, 0]], [[5, 8, 0], [9, 0, 0]]], [[True, False], [True, True]])
    """
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence) or not len(targets):
        raise ValueError(f"targets must be a non-empty sequence of rows (lists of ProbeSuffix), got {targets!r:.80}")
    for b, row in enumerate(targets):
        if isinstance(row, ProbeSuffix) or not isinstance(row, Sequence):
            raise TypeError(f"targets[{b}] must be a list of ProbeSuffix (the answer first), got {row!r:.80}")
        if not row:
            raise ValueError(f"targets[{b}] is empty: every row needs its answer as target 0")
        for k, suffix in enumerate(row):
            if not isinstance(suffix, ProbeSuffix):
                raise TypeError(f"targets[{b}][{k}] must be a ProbeSuffix, got {suffix!r:.80}")
    num_targets = max(len(row) for row in targets)
    width = max(len(suffix.token_ids) for row in targets for suffix in row)
    token_ids = torch.zeros((len(targets), num_targets, width), dtype=torch.long)
    fields = torch.zeros((3, len(targets), num_targets), dtype=torch.long)
    for b, row in enumerate(targets):
        for k, suffix in enumerate(row):
            token_ids[b, k, : len(suffix.token_ids)] = torch.tensor(suffix.token_ids, dtype=torch.long)
            fields[:, b, k] = torch.tensor([len(suffix.token_ids), suffix.answer_start, suffix.answer_end])
    return SuffixTable(token_ids.to(device), *(field.to(device) for field in fields))


def _with_target_axis(suffixes: SuffixTable) -> SuffixTable:
    """The table with a target axis ([B, K, P], [B, K] fields): a one-suffix table gets K = 1."""
    if suffixes.lengths.dim() == 2:
        return suffixes
    return SuffixTable(suffixes.token_ids[:, None, :], *(part[:, None] for part in suffixes[1:]))


def _check_probes(lengths: torch.Tensor, turn_starts: torch.Tensor, turn_mask: torch.Tensor, suffixes: SuffixTable) -> None:
    batch = lengths.shape[0]
    if turn_starts.shape != turn_mask.shape or turn_starts.dim() != 2 or turn_starts.shape[0] != batch:
        raise ValueError(
            f"turn_starts and turn_mask must both be [B, T] with B = {batch}, got {tuple(turn_starts.shape)} "
            f"and {tuple(turn_mask.shape)}"
        )
    if suffixes.lengths.dim() not in (1, 2) or suffixes.lengths.shape[0] != batch:
        raise ValueError(f"suffixes must have one row per trajectory ({batch}), got {suffixes.lengths.shape[0]}")
    outside = turn_mask & ((turn_starts < 1) | (turn_starts > lengths[:, None]))
    if bool(outside.any()):
        b, j = (int(i) for i in outside.nonzero()[0])
        raise ValueError(
            f"turn_starts[{b}, {j}] = {int(turn_starts[b, j])} must lie in [1, {int(lengths[b])}] (the length of row {b})"
        )


# --- the two probe layouts ----------------------------------------------------------------------


class _Slots(NamedTuple):
    """Where each probe copy lies: for every position, its copy j, its suffix token k and whether
    it holds a copy token (shapes of the positions, e.g. [B, N])."""

    copy: torch.Tensor
    token: torch.Tensor
    used: torch.Tensor


def _slots(offset: torch.Tensor, size: torch.Tensor, count: torch.Tensor) -> _Slots:
    """Positions ``offset`` (relative to the first copy) in copies of ``size`` tokens, ``count`` copies."""
    copy = torch.div(offset, size.clamp(min=1), rounding_mode="floor")
    token = offset - copy * size
    used = (offset >= 0) & (copy < count)
    return _Slots(copy.clamp(0, None), token.clamp(0, None), used)


def _answer_targets(
    turn_starts: torch.Tensor, turn_mask: torch.Tensor, table: SuffixTable, copy_start: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sources, tokens, mask)`` [B, T, K, L] of a table with a target axis: answer token l of
    target k at probe j is scored at the hidden state ``sources`` (the prefix's last token for
    suffix token 0, else the copy's previous token, ``copy_start[b, j, k] + t - 1``) and is the id
    ``tokens``."""
    width = int((table.answer_end - table.answer_start).max()) if turn_mask.numel() else 0
    num_targets, suffix_width = table.token_ids.shape[1:]
    t = table.answer_start[:, None, :, None] + torch.arange(width, device=turn_starts.device)
    mask = turn_mask[:, :, None, None] & (t < table.answer_end[:, None, :, None])
    t = torch.minimum(t, (table.lengths[:, None, :, None] - 1).clamp(min=0)).expand(-1, turn_mask.shape[1], -1, -1)
    sources = torch.where(t == 0, turn_starts[:, :, None, None] - 1, copy_start[:, :, :, None] + t - 1)
    flat = t + torch.arange(num_targets, device=t.device)[:, None] * suffix_width  # target k's token t
    ids = table.token_ids.reshape(t.shape[0], -1)
    tokens = ids.gather(1, flat.reshape(t.shape[0], -1)).reshape(t.shape)
    return sources.clamp(min=0), tokens, mask


def _without_target_axis(suffixes: SuffixTable, *targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The [B, T, K, L] answer targets as [B, T, L] for a one-suffix table (K = 1), as they are otherwise."""
    return targets if suffixes.lengths.dim() == 2 else tuple(part[:, :, 0] for part in targets)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A [B, 1, Q, K] additive float mask from a [B, Q, K] bool one."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class PackedInputs(NamedTuple):
    """Model inputs of the "packed" layout (module docstring) and where each probe is read.

    Shapes: B trajectories, N packed length, T probes, L answer tokens; the probe fields are
    [B, T, K, L] for a table of K targets (``target_table``).
    """

    input_ids: torch.Tensor  # [B, N] long
    position_ids: torch.Tensor  # [B, N] long
    attention_mask: torch.Tensor  # [B, 1, N, N] additive, model dtype
    probe_sources: torch.Tensor  # [B, T, L] long: packed position whose logits score the token
    probe_tokens: torch.Tensor  # [B, T, L] long
    probe_mask: torch.Tensor  # [B, T, L] bool: a real answer token of a real probe


def build_packed_inputs(
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    turn_starts: torch.Tensor,
    turn_mask: torch.Tensor,
    suffixes: SuffixTable,
    *,
    pad_token_id: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PackedInputs:
    """The trajectories and their probe copies in one padded batch with a 4D mask (module docstring).

    Args:
        input_ids: [B, S] right-padded trajectories; lengths: [B] their lengths S_b.
        turn_starts: [B, T] where probe j's context ends (each in [1, S_b] where ``turn_mask``).
        turn_mask: [B, T] bool, the real probes (a prefix of each row).
        suffixes: the probe suffix of each row (``suffix_table``), or its K targets
            (``target_table``): then every probe has K copies, copy (j, k) the (j * K + k)-th, each
            P_b = the row's longest target suffix wide (an absent target's copy is unused).
        pad_token_id: id at padded positions; dtype: dtype of the additive mask (the model's).

    Returns:
        ``PackedInputs``; row b has length S_b + n_b * K * P_b before right padding to N, on the
        device of ``input_ids``.
    """
    _check_probes(lengths, turn_starts, turn_mask, suffixes)
    device = input_ids.device
    table = _with_target_axis(suffixes)
    num_probes, num_targets = turn_mask.shape[1], table.token_ids.shape[1]
    size = table.lengths.max(dim=1).values  # P_b: every copy of row b as wide as its longest target suffix
    copies = turn_mask.sum(1) * num_targets
    width = int((lengths + copies * size).max())
    position = torch.arange(width, device=device)[None, :]
    in_trajectory = position < lengths[:, None]
    slots = _slots(position - lengths[:, None], size[:, None], copies[:, None])
    probe = torch.div(slots.copy, num_targets, rounding_mode="floor")  # copy c = (probe j, target k)
    target = slots.copy - probe * num_targets
    used = slots.used & (slots.token < table.lengths.gather(1, target))
    start = turn_starts.gather(1, probe.clamp(max=max(num_probes - 1, 0)))
    trajectory_ids = torch.nn.functional.pad(input_ids, (0, width - input_ids.shape[1]), value=pad_token_id)
    suffix_ids = table.token_ids.reshape(len(lengths), -1).gather(1, target * table.token_ids.shape[2] + slots.token)
    ids = torch.where(in_trajectory, trajectory_ids, torch.where(used, suffix_ids, pad_token_id))
    positions = torch.where(in_trajectory, position, torch.where(used, start + slots.token, 0))
    segment = torch.where(in_trajectory, -1, torch.where(used, slots.copy, -2))
    visible = torch.where(in_trajectory, position, torch.where(used, start - 1, -1))
    key, query = position[:, None, :], position[:, :, None]
    allowed = (
        ((segment[:, None, :] == -1) & (key <= visible[:, :, None]))
        | ((segment[:, :, None] >= 0) & (segment[:, None, :] == segment[:, :, None]) & (key <= query))
        | (key == query)
    )
    copy_index = torch.arange(num_probes * num_targets, device=device).reshape(num_probes, num_targets)
    copy_start = lengths[:, None, None] + copy_index * size[:, None, None]
    targets = _answer_targets(turn_starts, turn_mask, table, copy_start)
    return PackedInputs(ids, positions, _additive(allowed, dtype), *_without_target_axis(suffixes, *targets))


class ProbeInputs(NamedTuple):
    """Inputs of the "kv_cache" layout's probe pass, after a trajectory pass of width N.

    Shapes: Q = T * K * P probe slots (P = the longest suffix, K targets; K = 1 for one suffix per
    row). Sources index the two passes' hidden states concatenated along the sequence: [0, N) the
    trajectory pass, N + q probe slot q. The probe fields are [B, T, K, L] for a table of K targets.
    """

    input_ids: torch.Tensor  # [B, Q] long
    position_ids: torch.Tensor  # [B, Q] long
    attention_mask: torch.Tensor  # [B, 1, Q, N + Q] additive: keys = cached trajectory, then slots
    probe_sources: torch.Tensor  # [B, T, L] long
    probe_tokens: torch.Tensor  # [B, T, L] long
    probe_mask: torch.Tensor  # [B, T, L] bool


def build_probe_inputs(
    turn_starts: torch.Tensor,
    turn_mask: torch.Tensor,
    suffixes: SuffixTable,
    *,
    cached_length: int,
    pad_token_id: int = 0,
    dtype: torch.dtype = torch.float32,
) -> ProbeInputs:
    """Every probe copy of a batch as one pass over the KV cache of the trajectory pass.

    Copy j of row b fills slots [j * P, j * P + P_b): its ids are the suffix ids, its positions
    ``start_j + k`` (it continues its prefix), and it attends to the cached keys [0, start_j) and
    to its own copy causally. Unused slots hold ``pad_token_id`` and attend only to themselves.
    Answer token k of copy j is scored at the cached position ``start_j - 1`` for k = 0, else at
    slot ``j * P + k - 1``. ``cached_length`` is N, the first pass's padded width.

    With K targets (``target_table``) every turn slot holds K copies: copy c = j * K + k (probe j,
    target k) fills slots [c * P, c * P + P_{b,k}) with target k's suffix, the same rules otherwise
    (an absent target's slots are unused). With K = 1 every index is the one above.
    """
    device = turn_starts.device
    table = _with_target_axis(suffixes)
    num_rows, num_probes = turn_mask.shape
    num_targets, width = table.token_ids.shape[1:]
    slot = torch.arange(num_probes * num_targets * width, device=device)[None, :]
    copy = torch.div(slot, width, rounding_mode="floor")  # copy c = (probe j, target k): c = j * K + k
    token = slot - copy * width
    probe = torch.div(copy, num_targets, rounding_mode="floor").expand(num_rows, -1)
    target = (copy - probe * num_targets).expand(num_rows, -1)
    used = turn_mask.gather(1, probe) & (token < table.lengths.gather(1, target))
    start = turn_starts.gather(1, probe)
    ids = torch.where(used, table.token_ids.reshape(num_rows, -1).gather(1, target * width + token), pad_token_id)
    sees_cache = used[:, :, None] & (torch.arange(cached_length, device=device)[None, None, :] < start[:, :, None])
    same_copy = (copy[:, :, None] == copy[:, None, :]) & (slot[:, None, :] <= slot[:, :, None])
    sees_slots = (used[:, :, None] & same_copy) | (slot[:, :, None] == slot[:, None, :])
    copy_index = torch.arange(num_probes * num_targets, device=device).reshape(1, num_probes, num_targets)
    copy_start = (cached_length + copy_index * width).expand(num_rows, -1, -1)
    sources, tokens, mask = _without_target_axis(suffixes, *_answer_targets(turn_starts, turn_mask, table, copy_start))
    allowed = torch.cat([sees_cache, sees_slots], dim=2)
    return ProbeInputs(ids, torch.where(used, start + token, 0), _additive(allowed, dtype), sources, tokens, mask)


# --- the cached layout: probe copies over the KV cache of any trajectory forward ------------------


class CachedProbeGroup(NamedTuple):
    """One forward of the cached layout (``build_cached_probe_groups``): the probe copies of G
    trajectories over the first N cached keys of each. Q = the most probe tokens of a row in the
    group; T probes, L answer tokens (those of the whole batch).
    """

    rows: torch.Tensor  # [G] long: the batch rows of this group
    input_ids: torch.Tensor  # [G, Q] long: each row's copies back to back, then padding
    position_ids: torch.Tensor  # [G, Q] long
    attention_mask: torch.Tensor  # [G, 1, Q, N + Q] additive: keys = the row's cached keys [0, N), then slots
    num_keys: int  # N: the cached keys the group reads (the latest probe start of its rows)
    probe_sources: torch.Tensor  # [G, T, L] long: query slot whose logits score answer token l of probe j
    probe_tokens: torch.Tensor  # [G, T, L] long
    probe_mask: torch.Tensor  # [G, T, L] bool


def _group_rows(probe_tokens: Sequence[int], max_padding: float) -> list[list[int]]:
    """Rows with probes, longest first, cut into groups whose padded slots (rows x the longest)
    stay within (1 + ``max_padding``) x the group's probe tokens."""
    order = sorted((row for row, count in enumerate(probe_tokens) if count > 0), key=lambda row: -probe_tokens[row])
    groups: list[list[int]] = []
    total = 0
    for row in order:
        if groups and (len(groups[-1]) + 1) * probe_tokens[groups[-1][0]] <= (1 + max_padding) * (total + probe_tokens[row]):
            groups[-1].append(row)
            total += probe_tokens[row]
        else:
            groups.append([row])
            total = probe_tokens[row]
    return groups


def _check_cached_probes(turn_starts: torch.Tensor, turn_mask: torch.Tensor, suffixes: SuffixTable, max_padding: float) -> None:
    if turn_starts.dim() != 2 or turn_starts.shape != turn_mask.shape:
        raise ValueError(
            f"turn_starts and turn_mask must both be [B, T], got {tuple(turn_starts.shape)} and {tuple(turn_mask.shape)}"
        )
    if suffixes.lengths.dim() != 1:
        raise ValueError(f"the cached layout takes one suffix per row (suffix_table), got a table of "
                         f"{suffixes.num_targets} targets per row (target_table)")
    if suffixes.lengths.shape != (turn_starts.shape[0],):
        raise ValueError(f"suffixes must have one row per trajectory ({turn_starts.shape[0]}), got {suffixes.lengths.shape[0]}")
    if isinstance(max_padding, bool) or not isinstance(max_padding, (int, float)):
        raise TypeError(f"max_padding must be a float, got {type(max_padding).__name__}")
    if not max_padding >= 0:
        raise ValueError(f"max_padding must be >= 0, got {max_padding}")
    low = turn_mask & (turn_starts < 1)
    if bool(low.any()):
        b, j = (int(i) for i in low.nonzero()[0])
        raise ValueError(f"turn_starts[{b}, {j}] = {int(turn_starts[b, j])} must be >= 1 (a probe needs a context)")
    answer_first = turn_mask.any(dim=1) & (suffixes.answer_start < 1)
    if bool(answer_first.any()):
        row = int(answer_first.nonzero()[0, 0])
        raise ValueError(
            f"suffixes row {row} starts with its answer (answer_start = 0): the cached layout scores every answer "
            "token from the probe copy's own slots, so the probe text needs a token before the answer"
        )


def build_cached_probe_groups(
    turn_starts: torch.Tensor,
    turn_mask: torch.Tensor,
    suffixes: SuffixTable,
    *,
    max_padding: float = 0.1,
    pad_token_id: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[CachedProbeGroup]:
    """The probe copies of a batch, laid out over the KV cache a trajectory forward kept.

    Row b's n_b copies (one per probe, P_b tokens each) lie back to back in its query slots:
    copy j at slots [r * P_b, (r + 1) * P_b) with r its rank among the row's probes; token k
    has position ``start_j + k`` and attends to the row's cached keys [0, start_j) and to its own
    copy causally. Answer token k of copy j is scored at slot r * P_b + k - 1. So a row costs
    exactly its n_b * P_b probe tokens. Rows are grouped (longest first) so that a group's padded
    slots, G x its longest row, stay within (1 + ``max_padding``) x its probe tokens: every group
    is one forward of [G, Q] queries, and the batch costs at most (1 + ``max_padding``) x the ideal
    sum_b n_b * P_b query tokens. It takes one target per row (``suffix_table``; a
    ``target_table`` is refused). Padding slots hold ``pad_token_id`` and attend only to themselves.

    Args:
        turn_starts, turn_mask: [B, T]: probe j of row b (where ``turn_mask``) scores the answer
            after the row's first ``turn_starts[b, j]`` tokens (>= 1).
        suffixes: the probe suffix of each row (``suffix_table``); its answer must not start at
            token 0 (the cached layout has no slot before the copy).
        max_padding: the padding allowed per group, as a fraction of its probe tokens (0: only
            rows with the same number of probe tokens share a forward).
        pad_token_id: id of the padding slots; dtype: dtype of the additive mask (the
            attention's compute dtype).

    Returns:
        The groups, each with its rows, inputs, mask and where each answer token is read; rows
        without probes are in no group.

    Raises:
        ValueError: mismatched shapes, a table of K targets, a start < 1, an answer at suffix
            token 0, ``max_padding`` < 0.
        TypeError: ``max_padding`` not a number.
    """
    turn_mask = turn_mask.to(torch.bool)
    _check_cached_probes(turn_starts, turn_mask, suffixes, max_padding)
    probe_tokens = (turn_mask.sum(dim=1) * suffixes.lengths).tolist()
    return [
        _cached_group(torch.tensor(rows, device=turn_starts.device), turn_starts, turn_mask, suffixes,
                      pad_token_id=pad_token_id, dtype=dtype)
        for rows in _group_rows(probe_tokens, max_padding)
    ]


def _cached_group(
    rows: torch.Tensor, turn_starts: torch.Tensor, turn_mask: torch.Tensor, suffixes: SuffixTable, *, pad_token_id: int, dtype: torch.dtype
) -> CachedProbeGroup:
    starts, mask, table = turn_starts[rows], turn_mask[rows], suffixes.rows(rows)
    size, count = table.lengths[:, None], mask.sum(dim=1, keepdim=True)
    copy_offset = (mask.long().cumsum(dim=1) - 1) * size  # [G, T]: first slot of probe j's copy
    slot = torch.arange(int((count * size).max()), device=starts.device)[None, :]
    copy, token, used = _slots(slot, size, count)  # [G, Q]: the copy's rank, its token, a real slot
    turn_of_copy = torch.argsort((~mask).long(), dim=1, stable=True)  # the probes' turns, in order
    start = starts.gather(1, turn_of_copy.gather(1, copy.clamp(max=mask.shape[1] - 1)))
    ids = torch.where(used, table.token_ids.gather(1, token.clamp(max=table.token_ids.shape[1] - 1)), pad_token_id)
    num_keys = int(starts.masked_fill(~mask, 0).max())
    sees_cache = used[:, :, None] & (torch.arange(num_keys, device=starts.device)[None, None, :] < start[:, :, None])
    same_copy = (copy[:, :, None] == copy[:, None, :]) & (slot[:, None, :] <= slot[:, :, None])
    sees_slots = (used[:, :, None] & same_copy) | (slot[:, :, None] == slot[:, None, :])
    targets = _answer_targets(starts, mask, _with_target_axis(table), copy_offset[:, :, None])
    sources, tokens, answer_mask = _without_target_axis(table, *targets)
    allowed = torch.cat([sees_cache, sees_slots], dim=2)
    return CachedProbeGroup(rows, ids, torch.where(used, start + token, 0), _additive(allowed, dtype), num_keys,
                            sources, tokens, answer_mask)


# --- the forwards ---------------------------------------------------------------------------------


class ProbeForward(NamedTuple):
    """What ``probe_forward`` returns. B trajectories, S = ``input_ids`` width, T probes, L answer tokens.

    Attributes:
        token_logprobs: [B, S] float32, ``log pi(input_ids[b, t] | input_ids[b, :t])`` where
            ``token_mask`` is True (aligned with the token it scores), 0.0 elsewhere.
        token_entropy: [B, S] float32 entropy of the distribution that produced token t where
            ``token_mask`` is True (0.0 elsewhere), or ``None`` unless requested.
        probe_logprobs: [B, T, L] float32, log-prob of answer token l at probe j; 0.0 at padding.
        probe_mask: [B, T, L] bool, True at real answer tokens of real probes.
        answer_logprob: [B, T] float32, ``igpo_rewards.answer_logprob(probe_logprobs, probe_mask)``
            (length-normalized mean; 0.0 at padded probes), the input of ``igpo_advantages``.

    For a table of K targets (``target_table``) the probe fields have a target axis:
    ``probe_logprobs`` and ``probe_mask`` [B, T, K, L], ``answer_logprob`` [B, T, K] (0.0 for a
    target a row does not have: ``SuffixTable.target_mask`` marks them).
    """

    token_logprobs: torch.Tensor
    token_entropy: torch.Tensor | None
    probe_logprobs: torch.Tensor
    probe_mask: torch.Tensor
    answer_logprob: torch.Tensor


def _check_model(model: PreTrainedModel, *, custom_mask: bool) -> None:
    implementation = getattr(model.config, "_attn_implementation", None)
    if custom_mask and implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"the probe forward needs attn_implementation 'sdpa' or 'eager' (custom 4D masks), "
            f"the model uses {implementation!r}; load it with attn_implementation='sdpa'"
        )
    if getattr(model.config, "final_logit_softcapping", None) is not None:
        raise ValueError("models with final_logit_softcapping are not supported by the probe forward")


def _cache_argument(model: PreTrainedModel, output: object) -> dict[str, object]:
    """The first pass's KV cache as the keyword the model's forward takes: ``cache`` in
    transformers >= 5.x (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    cache = getattr(output, "cache", None)
    if cache is None:
        cache = output.past_key_values
    keyword = "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"
    return {keyword: cache}


def _score(
    model: PreTrainedModel, hidden: torch.Tensor, tokens: torch.Tensor, *, chunk_size: int, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``tokens`` [K] (and the entropy) under the logits of ``hidden`` [K, H], in chunks."""
    head = model.get_output_embeddings()
    logprobs, entropies = [], []
    for begin in range(0, tokens.shape[0], chunk_size):
        log_softmax = torch.log_softmax(head(hidden[begin : begin + chunk_size]).float(), dim=-1)
        logprobs.append(log_softmax.gather(-1, tokens[begin : begin + chunk_size, None])[:, 0])
        if entropy:
            entropies.append(-(log_softmax.exp() * log_softmax).sum(-1))
    empty = hidden.new_zeros((0,), dtype=torch.float32)
    values = torch.cat(logprobs) if logprobs else empty
    return values, ((torch.cat(entropies) if entropies else empty) if entropy else None)


def _scatter(shape: tuple[int, ...], where: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A float32 tensor of ``shape``, ``values`` at the True positions of ``where``, 0 elsewhere
    (differentiable in ``values``)."""
    return values.new_zeros(shape).masked_scatter(where, values)


def _trajectory_scores(
    model: PreTrainedModel, hidden: torch.Tensor, input_ids: torch.Tensor, token_mask: torch.Tensor, *, chunk_size: int, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, S] log-probs (and entropies) of the tokens where ``token_mask``, scored at position t - 1."""
    rows, columns = token_mask.nonzero(as_tuple=True)
    values, entropies = _score(model, hidden[rows, columns - 1], input_ids[rows, columns], chunk_size=chunk_size, entropy=entropy)
    shape = tuple(token_mask.shape)
    return _scatter(shape, token_mask, values), (_scatter(shape, token_mask, entropies) if entropy else None)


def _probe_scores(
    model: PreTrainedModel, hidden: torch.Tensor, inputs: PackedInputs | ProbeInputs, *, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    rows = rows.reshape(-1, *[1] * (inputs.probe_mask.dim() - 1)).expand_as(inputs.probe_mask)
    where = inputs.probe_mask
    values, _ = _score(
        model, hidden[rows[where], inputs.probe_sources[where]], inputs.probe_tokens[where], chunk_size=chunk_size, entropy=False
    )
    return _scatter(tuple(where.shape), where, values), where


def _token_mask(token_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    if token_mask is None:
        return torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    if token_mask.shape != input_ids.shape:
        raise ValueError(f"token_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(token_mask.shape)}")
    token_mask = token_mask.to(torch.bool)
    if bool(token_mask[:, 0].any()):
        raise ValueError("token_mask[:, 0] must be False: nothing predicts the first token")
    return token_mask


def token_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    token_mask: torch.Tensor,
    *,
    return_entropy: bool = False,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the tokens where ``token_mask`` under a plain causal forward (no probes).

    ``input_ids`` [B, S] is right-padded and ``token_mask`` [B, S] must be False on padding and
    at t = 0; no attention mask is passed (the SDPA causal fast path; no real token sees a pad).

    Returns:
        ``(logprobs [B, S] float32, entropy [B, S] float32 or None)``, 0.0 where not masked.
    """
    _check_model(model, custom_mask=False)
    chunk_size = _checks.check_positive_count("chunk_size", chunk_size)
    token_mask = _token_mask(token_mask, input_ids)
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    return _trajectory_scores(model, hidden, input_ids, token_mask, chunk_size=chunk_size, entropy=return_entropy)


def probe_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    turn_starts: torch.Tensor,
    turn_mask: torch.Tensor,
    suffixes: SuffixTable,
    *,
    token_mask: torch.Tensor | None = None,
    probe_layout: str = "packed",
    pad_token_id: int | None = None,
    return_entropy: bool = False,
    chunk_size: int = 1024,
) -> ProbeForward:
    """Every probe's answer log-probs and the log-probs of the tokens where ``token_mask``, one forward.

    Args:
        model: a causal LM with ``attn_implementation`` "sdpa" or "eager" (Llama/Qwen2/Mistral
            style: the lm head on the base model's last hidden state).
        input_ids: [B, S] right-padded trajectories; lengths: [B] their lengths.
        turn_starts, turn_mask: [B, T]: probe j of row b (where ``turn_mask``) scores the answer
            after ``input_ids[b, :turn_starts[b, j]]``; each start in [1, lengths[b]].
        suffixes: the probe suffix of each row (``suffix_table``), or K targets per row
            (``target_table``: the probe outputs gain a target axis, ``ProbeForward``).
        token_mask: [B, S] bool, the trajectory tokens to score (e.g. the generated ones);
            ``None`` scores none (probes only).
        probe_layout: "packed" or "kv_cache" (module docstring).
        pad_token_id: padding id of the packed layout; defaults to the model's (or 0).
        return_entropy: also the entropy at the ``token_mask`` tokens.
        chunk_size: rows of logits materialised at once.

    Returns:
        ``ProbeForward`` on the model's device.

    Raises:
        ValueError: mismatched shapes, a start outside its row, an unknown layout, an attention
            implementation that takes no custom mask, ``chunk_size`` < 1.
        TypeError: ``probe_layout`` not a str, ``chunk_size`` not an int.
    """
    _check_model(model, custom_mask=True)
    _checks.check_choice("probe_layout", probe_layout, PROBE_LAYOUTS)
    chunk_size = _checks.check_positive_count("chunk_size", chunk_size)
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    token_mask = _token_mask(token_mask, input_ids)
    turn_mask = turn_mask.to(torch.bool)
    _check_probes(lengths, turn_starts, turn_mask, suffixes)
    if not bool(turn_mask.any()):  # no probe at all: the plain causal forward
        logprobs, entropy = token_logprobs(model, input_ids, token_mask, return_entropy=return_entropy, chunk_size=chunk_size)
        target_axis = (suffixes.num_targets,) if suffixes.lengths.dim() == 2 else ()
        empty = logprobs.new_zeros((*turn_mask.shape, *target_axis, 0))
        return ProbeForward(logprobs, entropy, empty, empty.bool(), logprobs.new_zeros((*turn_mask.shape, *target_axis)))
    if probe_layout == "packed":
        inputs = build_packed_inputs(input_ids, lengths, turn_starts, turn_mask, suffixes, pad_token_id=pad_token_id, dtype=model.dtype)
        hidden = model.base_model(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids, use_cache=False
        ).last_hidden_state
    else:
        first = model.base_model(input_ids=input_ids, use_cache=True)
        inputs = build_probe_inputs(
            turn_starts, turn_mask, suffixes, cached_length=input_ids.shape[1], pad_token_id=pad_token_id, dtype=model.dtype
        )
        second = model.base_model(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
            use_cache=False, **_cache_argument(model, first),
        )
        hidden = torch.cat([first.last_hidden_state, second.last_hidden_state], dim=1)
    logprobs, entropy = _trajectory_scores(model, hidden, input_ids, token_mask, chunk_size=chunk_size, entropy=return_entropy)
    probe_logprobs, probe_mask = _probe_scores(model, hidden, inputs, chunk_size=chunk_size)
    return ProbeForward(logprobs, entropy, probe_logprobs, probe_mask, igpo_rewards.answer_logprob(probe_logprobs, probe_mask))


class CachedProbeForward(NamedTuple):
    """What ``cached_probe_forward`` returns. B trajectories, T probes, L answer tokens.

    Attributes:
        probe_logprobs: [B, T, L] float32, log-prob of answer token l at probe j; 0.0 at padding.
        probe_mask: [B, T, L] bool, True at real answer tokens of real probes.
        answer_logprob: [B, T] float32, ``igpo_rewards.answer_logprob(probe_logprobs, probe_mask)``.
        query_tokens: the query slots the probe forwards computed (padding included).
        probe_tokens: the ideal: sum_b n_b * P_b, the probe tokens themselves.
        forwards: how many forwards (groups) that took.
    """

    probe_logprobs: torch.Tensor
    probe_mask: torch.Tensor
    answer_logprob: torch.Tensor
    query_tokens: int
    probe_tokens: int
    forwards: int


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside wrappers that keep it as ``.module`` (torch FSDP1, DDP)."""
    while not hasattr(model, "config") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


@contextlib.contextmanager
def _attention_taking_custom_masks(model: torch.nn.Module) -> Iterator[None]:
    """Runs the block with attention "sdpa" unless the model's already takes 4D additive masks
    ("sdpa", "eager"): flash-attention kernels take none. transformers picks the attention
    function from ``config._attn_implementation`` at every forward."""
    config = _hf_model(model).config
    current = config._attn_implementation
    if current in ("sdpa", "eager"):
        yield
        return
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = current


def _group_cache(cache: object, key_rows: torch.Tensor, key_offsets: torch.Tensor, rows: torch.Tensor, num_keys: int) -> object:
    """A new ``DynamicCache`` holding, for each row of ``rows``, its cached keys and values [0, num_keys)."""
    from transformers import DynamicCache

    positions = key_offsets[rows][:, None] + torch.arange(num_keys, device=key_offsets.device)[None, :]
    cache_rows = key_rows[rows][:, None].expand_as(positions)
    layers = []
    for layer in cache.layers:
        positions_in_layer = positions.clamp(max=layer.keys.shape[2] - 1)  # past a row's own keys: masked
        layers.append(tuple(
            states[cache_rows, :, positions_in_layer].permute(0, 2, 1, 3) for states in (layer.keys, layer.values)
        ))
    return DynamicCache(ddp_cache_data=layers)


def _check_cache(cache: object, key_rows: torch.Tensor, key_offsets: torch.Tensor, turn_starts: torch.Tensor, turn_mask: torch.Tensor) -> None:
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None or layer.keys.dim() != 4 for layer in layers):
        raise TypeError(f"cache must be a transformers Cache whose layers hold [R, H, K, D] keys, got {type(cache).__name__}")
    if any(getattr(layer, "is_sliding", False) for layer in layers):
        raise ValueError("cache has sliding-window layers: their keys do not cover the whole context")
    batch = turn_starts.shape[0]
    if key_rows.shape != (batch,) or key_offsets.shape != (batch,):
        raise ValueError(
            f"key_rows and key_offsets must be [B] with B = {batch}, got {tuple(key_rows.shape)} and {tuple(key_offsets.shape)}"
        )
    rows, keys = layers[0].keys.shape[0], layers[0].keys.shape[2]
    needed = key_offsets + turn_starts.masked_fill(~turn_mask, 0).max(dim=1).values
    outside = (key_rows < 0) | (key_rows >= rows) | (key_offsets < 0) | (needed > keys)
    if bool(outside.any()):
        b = int(outside.nonzero()[0, 0])
        raise ValueError(
            f"row {b} reads cache row {int(key_rows[b])}, keys [{int(key_offsets[b])}, {int(needed[b])}), but the cache "
            f"has {rows} rows of {keys} keys"
        )


def cached_probe_forward(
    model: PreTrainedModel,
    cache: object,
    turn_starts: torch.Tensor,
    turn_mask: torch.Tensor,
    suffixes: SuffixTable,
    *,
    key_rows: torch.Tensor | None = None,
    key_offsets: torch.Tensor | None = None,
    max_padding: float = 0.1,
    pad_token_id: int | None = None,
    dtype: torch.dtype | None = None,
) -> CachedProbeForward:
    """Every probe's answer log-probs, scored over the KV cache a trajectory forward kept.

    The trajectory forward is the caller's (an RL trainer's old-log-prob forward with
    ``use_cache=True``); its cache may be padded (one cache row per trajectory) or packed (all
    trajectories in one row, as remove-padding forwards keep it): row b's token t is cached at
    row ``key_rows[b]``, key ``key_offsets[b] + t``. The probe copies then run in the groups of
    ``build_cached_probe_groups``, each group one forward over the keys it reads, so only the
    probe tokens are computed (at most (1 + ``max_padding``) x their number) and logits only
    where an answer token is scored. Models whose attention takes no 4D mask (flash attention)
    run these forwards with "sdpa".

    Args:
        model: a causal LM (an HF model, or a wrapper that calls one, e.g. torch FSDP).
        cache: the trajectory forward's ``DynamicCache``: per layer keys/values [R, H, K, D].
        turn_starts, turn_mask, suffixes: as for ``build_cached_probe_groups``; probe j of row b
            sees the row's first ``turn_starts[b, j]`` cached tokens.
        key_rows, key_offsets: [B] long; default ``arange(B)`` and 0 (a padded cache).
        max_padding: see ``build_cached_probe_groups``.
        pad_token_id: id of padding slots; defaults to the model's (or 0).
        dtype: the attention's compute dtype (the mask's); defaults to the model's.

    Returns:
        ``CachedProbeForward`` on the device of ``turn_starts``.

    Raises:
        ValueError / TypeError: what ``build_cached_probe_groups`` raises, a cache that is not a
        transformers cache of full-attention layers, keys a row would read outside the cache.
    """
    turn_mask = turn_mask.to(torch.bool)
    device = turn_starts.device
    batch, num_turns = turn_mask.shape
    key_rows = torch.arange(batch, device=device) if key_rows is None else key_rows.to(device)
    key_offsets = torch.zeros(batch, dtype=torch.long, device=device) if key_offsets is None else key_offsets.to(device)
    _check_model(model, custom_mask=False)
    _check_cached_probes(turn_starts, turn_mask, suffixes, max_padding)
    _check_cache(cache, key_rows, key_offsets, turn_starts, turn_mask)
    config = _hf_model(model).config
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    groups = build_cached_probe_groups(turn_starts, turn_mask, suffixes, max_padding=max_padding,
                                       pad_token_id=pad_token_id, dtype=dtype or _hf_model(model).dtype)
    width = int((suffixes.answer_end - suffixes.answer_start).max()) if batch else 0
    probe_logprobs = torch.zeros((batch, num_turns, width), dtype=torch.float32, device=device)
    probe_mask = torch.zeros((batch, num_turns, width), dtype=torch.bool, device=device)
    with _attention_taking_custom_masks(model):
        for group in groups:
            values = _score_group(model, cache, key_rows, key_offsets, group)
            answer = group.probe_mask.shape[2]
            probe_mask[group.rows, :, :answer] = group.probe_mask
            probe_logprobs[group.rows, :, :answer] = _scatter(tuple(group.probe_mask.shape), group.probe_mask, values)
    query_tokens = sum(group.input_ids.numel() for group in groups)
    probe_tokens = int((turn_mask.sum(dim=1) * suffixes.lengths).sum())
    return CachedProbeForward(probe_logprobs, probe_mask, igpo_rewards.answer_logprob(probe_logprobs, probe_mask),
                              query_tokens, probe_tokens, len(groups))


def _score_group(model: PreTrainedModel, cache: object, key_rows: torch.Tensor, key_offsets: torch.Tensor, group: CachedProbeGroup) -> torch.Tensor:
    """The log-probs of the group's answer tokens (where ``group.probe_mask``), one forward."""
    forward_parameters = inspect.signature(_hf_model(model).forward).parameters
    keyword = "cache" if "cache" in forward_parameters else "past_key_values"
    kept = torch.unique(group.probe_sources[group.probe_mask])  # sorted: the slots whose logits are read
    extra = {"logits_to_keep": kept} if "logits_to_keep" in forward_parameters else {}
    output = model(input_ids=group.input_ids, position_ids=group.position_ids, attention_mask=group.attention_mask,
                   use_cache=False, **{keyword: _group_cache(cache, key_rows, key_offsets, group.rows, group.num_keys)},
                   **extra)
    sources = torch.searchsorted(kept, group.probe_sources) if extra else group.probe_sources
    rows = torch.arange(group.rows.shape[0], device=sources.device)[:, None, None].expand_as(sources)
    where = group.probe_mask
    logits = output.logits[rows[where], sources[where]]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, group.probe_tokens[where][:, None])[:, 0]


def score_probes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[Sequence[int]],
    turn_starts: Sequence[Sequence[int]],
    answers: Sequence[str | Sequence[str]],
    *,
    template: str = PROBE_TEMPLATE,
    probe_layout: str = "packed",
) -> torch.Tensor:
    """IGPO's probe before every turn of every trajectory: the [B, T] answer log-probs, one forward.

    Probe j of trajectory b teacher-forces the probe text after ``token_ids[b][:turn_starts[b][j]]``
    and returns the length-normalized log-prob of the answer's tokens
    (``igpo_rewards.answer_logprob``, the input of ``igpo_rewards.igpo_advantages``). Each
    distinct answer's suffix is tokenized once (``build_probe_suffix``).

    Several targets: when some ``answers[b]`` is a list of strings (the answer first, then the
    sub-goals, e.g. a multi-hop question's bridge entities), every turn is probed for each target
    of its row, all in the same forward (``target_table``), and the result is [B, T, K] with
    K = the longest list; target k of row b is present when k < len(answers[b]) (a plain string
    counts as a list of one), and absent targets read 0.0.

    Runs under the caller's autograd mode: wrap it in ``torch.no_grad()`` to compute rewards.

    Args:
        model: an HF causal LM with ``attn_implementation`` "sdpa" or "eager".
        tokenizer: its fast tokenizer.
        token_ids: B trajectories: prompt, turns and observations, exactly as the model saw them.
        turn_starts: per trajectory, where each turn starts (the prompt's length for turn 0);
            each in [1, len(token_ids[b])]. T = the most turns in the batch.
        answers: per trajectory, the ground-truth answer probed (e.g. the first alias), or a
            non-empty list of targets, the answer first.
        template: the probe text with one ``{answer}``.
        probe_layout: "packed" (one forward) or "kv_cache" (see ``probe_forward``).

    Returns:
        [B, T] float32 on the model's device when every answer is a string, [B, T, K] when some
        is a list; 0.0 at padded turns (t >= len(turn_starts[b])) and absent targets.

    Raises:
        ValueError / TypeError: mismatched lengths, an empty trajectory, answer or target list,
        a target that is not a string, a start outside its trajectory, and what
        ``probe_forward`` raises.
    """
    if len(answers) != len(token_ids) or len(turn_starts) != len(token_ids):
        raise ValueError(
            f"turn_starts and answers must have one entry per trajectory ({len(token_ids)}), "
            f"got {len(turn_starts)} and {len(answers)}"
        )
    device = model.get_input_embeddings().weight.device
    input_ids, lengths = pad_token_ids(token_ids, pad_token_id=tokenizer.pad_token_id or 0, device=device)
    starts, turn_counts = _padded(turn_starts, pad=0, device=device)
    turn_mask = torch.arange(starts.shape[1], device=device)[None, :] < turn_counts[:, None]
    if all(isinstance(answer, str) for answer in answers):
        distinct = {answer: build_probe_suffix(tokenizer, answer, template=template) for answer in dict.fromkeys(answers)}
        suffixes = suffix_table([distinct[answer] for answer in answers], device=device)
    else:
        suffixes = _target_suffixes(tokenizer, answers, template=template, device=device)
    return probe_forward(
        model, input_ids, lengths, starts, turn_mask, suffixes, probe_layout=probe_layout, pad_token_id=tokenizer.pad_token_id
    ).answer_logprob


def _target_suffixes(
    tokenizer: PreTrainedTokenizerBase, answers: Sequence[str | Sequence[str]], *, template: str, device: torch.device
) -> SuffixTable:
    """The ``target_table`` of per-row target lists (a string is a list of one), each distinct
    target tokenized once."""
    rows = []
    for b, targets in enumerate(answers):
        targets = [targets] if isinstance(targets, str) else targets
        if not isinstance(targets, Sequence) or not targets:
            raise ValueError(f"answers[{b}] must be a str or a non-empty list of str (the answer first), got {targets!r:.80}")
        for k, target in enumerate(targets):
            if not isinstance(target, str):
                raise TypeError(f"answers[{b}][{k}] must be a str, got {type(target).__name__}")
        rows.append(list(targets))
    distinct = {text: build_probe_suffix(tokenizer, text, template=template)
                for text in dict.fromkeys(text for row in rows for text in row)}
    return target_table([[distinct[text] for text in row] for row in rows], device=device)
