"""IGPOSettings holds every option of igpo_advantages / grpo_advantages, and its methods pass them all."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

import igpo_rewards
from igpo_rewards import IGPOSettings
from igpo_rewards.testing import reference

# A runtime switch (host syncs on accelerators) and the batch layout, not hyperparameters.
NOT_SETTINGS = {"validate", "group_size"}

# Every field away from its default, so a setting that is not passed on changes the result.
CHANGED = dict(gamma=0.9, kind="log_prob", mode="separate", weighting="trajectory", scale="std", eps=0.05, ddof=1,
               ig_weight=0.5, outcome_weight=2.0, log_prob_floor=-3.0)


def keyword_options(function) -> set[str]:
    parameters = inspect.signature(function).parameters.values()
    return {p.name for p in parameters if p.kind is p.KEYWORD_ONLY} - NOT_SETTINGS


@pytest.mark.parametrize("function", [igpo_rewards.igpo_advantages, igpo_rewards.grpo_advantages])
def test_every_option_is_a_field_with_the_same_name_and_default(function):
    fields = {field.name: field.default for field in dataclasses.fields(IGPOSettings)}
    defaults = {p.name: p.default for p in inspect.signature(function).parameters.values()}
    options = keyword_options(function)
    assert options <= set(fields), options - set(fields)
    assert {name: fields[name] for name in options} == {name: defaults[name] for name in options}


def batch():
    rng = np.random.default_rng(0)
    turn_mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=bool)
    answer_logprob = np.where(turn_mask, np.log(rng.uniform(1e-6, 1.0, (4, 3))), 0.0)
    answer_logprob[0, 1] = -np.inf  # the log-prob floor matters
    return answer_logprob, np.array([1.0, 0.0, -2.0, 0.5]), turn_mask, np.array([0, 0, 1, 1])


def test_igpo_advantages_method_uses_every_setting():
    answer_logprob, outcome, turn_mask, group_ids = batch()
    got = IGPOSettings(**CHANGED).igpo_advantages(answer_logprob, outcome, turn_mask, group_ids)
    want = reference.igpo_advantages(answer_logprob, outcome, turn_mask, group_ids, **CHANGED)
    np.testing.assert_allclose(got.advantages, want.advantages, rtol=1e-9, atol=1e-12)
    for name in CHANGED:  # setting any one of them back to its default moves the result
        if CHANGED[name] == getattr(IGPOSettings(), name):
            continue
        others = IGPOSettings(**{key: value for key, value in CHANGED.items() if key != name})
        moved = others.igpo_advantages(answer_logprob, outcome, turn_mask, group_ids)
        assert not np.allclose(moved.advantages, got.advantages), name
    unscaled = IGPOSettings(**{**CHANGED, "scale": "none"}).igpo_advantages(answer_logprob, outcome, turn_mask, group_ids)
    assert not np.allclose(unscaled.advantages, got.advantages)


def test_grpo_advantages_method_uses_scale_eps_ddof():
    outcome, group_ids = np.array([1.0, 0.0, 0.5, 0.5, 0.25]), np.array([0, 0, 1, 1, 1])
    for settings in (IGPOSettings(), IGPOSettings(scale="none"), IGPOSettings(eps=0.5, ddof=1)):
        expected = igpo_rewards.grpo_advantages(outcome, group_ids, scale=settings.scale, eps=settings.eps, ddof=settings.ddof)
        np.testing.assert_array_equal(settings.grpo_advantages(outcome, group_ids), expected)
    assert not np.allclose(IGPOSettings(eps=0.5, ddof=1).grpo_advantages(outcome, group_ids),
                           IGPOSettings().grpo_advantages(outcome, group_ids))


def test_integrations_import_the_same_class():
    from igpo_rewards.integrations import IGPOSettings as FromIntegrations

    assert FromIntegrations is IGPOSettings


def test_group_size_gives_the_same_advantages_as_contiguous_group_ids():
    answer_logprob, outcome, turn_mask, group_ids = batch()
    settings = IGPOSettings(**CHANGED)
    by_ids = settings.igpo_advantages(answer_logprob, outcome, turn_mask, group_ids)
    by_size = settings.igpo_advantages(answer_logprob, outcome, turn_mask, group_size=2)
    np.testing.assert_allclose(by_size.advantages, by_ids.advantages, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(settings.grpo_advantages(outcome, group_size=2),
                               settings.grpo_advantages(outcome, group_ids), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("field", "value", "error", "words"),
    [
        ("eps", float("inf"), ValueError, "eps must be finite"),
        ("eps", -1.0, ValueError, "eps must be >= 0"),
        ("gamma", 1.5, ValueError, "gamma must be in [0, 1]"),
        ("outcome_weight", float("nan"), ValueError, "igpo settings: outcome_weight must be finite"),
        ("log_prob_floor", "low", TypeError, "igpo settings: log_prob_floor must be a real number"),
        ("ddof", 1.0, TypeError, "igpo settings: ddof must be an int"),
        ("max_turns", 0, ValueError, "igpo settings: max_turns must be >= 1"),
        ("mode", "both", ValueError, "igpo settings: mode must be one of ['joint', 'separate']"),
    ],
)
def test_bad_values_fail_at_construction_like_the_library_call(field, value, error, words):
    with pytest.raises(error) as raised:
        IGPOSettings(**{field: value})
    assert words in str(raised.value)
