"""The device mode's plumbing (IGPO_TEST_DEVICE) and the fast path's promise on CUDA: no host sync.

``test_the_fast_path_makes_no_host_sync`` runs every public function in the form a training loop
uses (``group_size=G`` or integer group ids on the device, ``max_turns=T`` on the token path,
``validate=False``) under ``torch.cuda.set_sync_debug_mode("error")``, where any operation that
waits for the GPU (``.item()``, a data-dependent shape, a blocking copy to or from the host)
raises; then compares the results with the float64 oracle. Without CUDA it is skipped with the
reason; run it with ``IGPO_TEST_DEVICE=cuda python -m pytest tests/test_core_*.py`` on a GPU
machine (docs/backends.md, "On a GPU").
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import igpo_rewards as igpo
from igpo_rewards.testing import reference

from . import backend_support
from .backend_support import DEVICE_ENV, device_of, test_device


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def test_the_device_mode_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert test_device() == "cpu" and device_of("torch") is None and device_of("jax") is None
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    assert (device_of("numpy"), device_of("torch"), device_of("jax")) == (None, "cuda", "gpu")
    monkeypatch.setenv(DEVICE_ENV, "gpu0")
    with pytest.raises(ValueError, match="IGPO_TEST_DEVICE must be one of"):
        test_device()


@pytest.mark.backends("torch")
def test_the_device_mode_puts_torch_arrays_on_cuda(backend, monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    if _cuda_available():
        assert backend_support.to_backend(np.zeros(2), "torch").device.type == "cuda"
    else:  # the mode really asks torch for CUDA: without a GPU the conversion fails
        with pytest.raises((RuntimeError, AssertionError)):
            backend_support.to_backend(np.zeros(2), "torch")


# B = 8 rollouts in G = 4 contiguous rollouts per question, T = 3 turns, S = 9 response tokens.
RESPONSE_MASK = np.array([
    [1, 1, 0, 0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 1, 1, 0, 0, 0], [1, 0, 1, 0, 1, 0, 0, 0, 0],
    [1, 1, 0, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 1, 1, 0, 1, 0],
], dtype=bool)
GROUP_IDS = np.repeat([0, 1], 4)
TURNS = 3


def _batch():
    """A turn-level and a token-level batch of the same rollouts (the token one in verl's layout)."""
    rng = np.random.default_rng(0)
    turns = reference.turn_index_from_response_mask(RESPONSE_MASK).max(axis=1) + 1
    turn_mask = np.arange(TURNS)[None, :] < turns[:, None]
    answer_logprob = np.where(turn_mask, -rng.exponential(2.0, size=turn_mask.shape), 0.0)
    outcome = np.array([1.0, 0.0, 0.5, -2.0, 1.0, 1.0, 0.0, 0.5])
    rewards = reference.turn_rewards(answer_logprob, outcome, turn_mask)
    token_level_rewards = reference.place_turn_rewards(rewards, RESPONSE_MASK, turn_mask=turn_mask)
    return answer_logprob, outcome, turn_mask, token_level_rewards


@pytest.mark.skipif(not _cuda_available(), reason="needs CUDA: torch.cuda.is_available() is False on this machine")
def test_the_fast_path_makes_no_host_sync():
    import torch

    answer_logprob, outcome, turn_mask, token_level_rewards = _batch()
    device = torch.device("cuda")
    logprob_t, outcome_t, token_rewards_t = (torch.tensor(a, dtype=torch.float32, device=device)
                                             for a in (answer_logprob, outcome, token_level_rewards))
    turn_mask_t = torch.tensor(turn_mask, device=device)
    response_mask_t = torch.tensor(RESPONSE_MASK, device=device)
    ids_t = torch.tensor(GROUP_IDS, device=device)
    torch.cuda.synchronize()

    torch.cuda.set_sync_debug_mode("error")
    try:
        results = {
            "igpo_advantages, group_size": igpo.igpo_advantages(
                logprob_t, outcome_t, turn_mask_t, group_size=4, validate=False).advantages,
            "igpo_advantages, device ids": igpo.igpo_advantages(
                logprob_t, outcome_t, turn_mask_t, ids_t, validate=False).advantages,
            "token path, group_size": igpo.advantages_from_token_rewards(
                token_rewards_t, response_mask_t, group_size=4, max_turns=TURNS, validate=False),
            "token path, device ids": igpo.advantages_from_token_rewards(
                token_rewards_t, response_mask_t, ids_t, max_turns=TURNS, validate=False),
            "grpo_advantages": igpo.grpo_advantages(outcome_t, group_size=4, validate=False),
            "zero_variance_group_fraction": igpo.zero_variance_group_fraction(outcome_t, ids_t, validate=False),
            "turn_index_from_response_mask": igpo.turn_index_from_response_mask(response_mask_t, validate=False),
        }
    finally:
        torch.cuda.set_sync_debug_mode(0)

    want_turn = reference.igpo_advantages(answer_logprob, outcome, turn_mask, GROUP_IDS).advantages
    want_tokens = reference.advantages_from_token_rewards(token_level_rewards, RESPONSE_MASK, GROUP_IDS)
    wanted = {
        "igpo_advantages, group_size": want_turn, "igpo_advantages, device ids": want_turn,
        "token path, group_size": want_tokens, "token path, device ids": want_tokens,
        "grpo_advantages": reference.grpo_advantages(outcome, GROUP_IDS),
        "zero_variance_group_fraction": reference.zero_variance_group_fraction(outcome, GROUP_IDS),
        "turn_index_from_response_mask": reference.turn_index_from_response_mask(RESPONSE_MASK),
    }
    for name, result in results.items():
        assert result.device.type == "cuda", name
        np.testing.assert_allclose(result.cpu().numpy(), wanted[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.skipif(not _cuda_available(), reason="needs CUDA: torch.cuda.is_available() is False on this machine")
def test_the_sync_check_catches_a_sync():
    """The check above can fail: a value read back to the host under the same mode raises."""
    import torch

    outcome = torch.tensor([1.0, 0.0], device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            igpo.grpo_advantages(outcome, group_size=2, validate=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
