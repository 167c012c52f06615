"""The test oracle of the probes: one plain forward per probe (what the authors' released code does).

Shares no code with ``igpo_rewards.agent.probes``' packed forward: the model's own forward (its
default causal mask and positions) over ``token_ids[b][:start] + suffix`` and its logits. Used by
the probe tests (values and gradients) and by the probe benchmark as way (a).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def naive_probe_logprobs(
    model: torch.nn.Module,
    token_ids: Sequence[Sequence[int]],
    probe_starts: Sequence[Sequence[int]],
    suffixes: Sequence,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, L] float32 log-probs of every probe's answer tokens and their bool mask.

    Probe j of row b scores answer token l (suffix token ``answer_start + l``) after
    ``token_ids[b][:probe_starts[b][j]] + suffix``; ``suffixes[b]`` is a ``ProbeSuffix``
    (``None`` for a row without probes).
    """
    device = model.get_input_embeddings().weight.device
    num_probes = max(len(starts) for starts in probe_starts)
    num_answer = max((s.num_answer_tokens for st, s in zip(probe_starts, suffixes) if st), default=0)
    probe_logprobs = torch.zeros((len(token_ids), num_probes, num_answer), dtype=torch.float32, device=device)
    probe_mask = torch.zeros((len(token_ids), num_probes, num_answer), dtype=torch.bool, device=device)
    for b, (row, starts, suffix) in enumerate(zip(token_ids, probe_starts, suffixes)):
        for j, start in enumerate(starts):
            sequence = torch.tensor([list(row[:start]) + list(suffix.token_ids)], dtype=torch.long, device=device)
            logits = model(input_ids=sequence, use_cache=False).logits[0].float()
            log_softmax = torch.log_softmax(logits, dim=-1)
            for l, k in enumerate(range(suffix.answer_start, suffix.answer_end)):
                probe_logprobs[b, j, l] = log_softmax[start + k - 1, suffix.token_ids[k]]
                probe_mask[b, j, l] = True
    return probe_logprobs, probe_mask
