"""IGPOSettings holds every option of igpo_advantages / grpo_advantages, and its methods pass them all."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

import igpo_rewards
from igpo_rewards import IGPOSettings
from igpo_rewards.testing import reference

# A runtime switch (host syncs on accelerators) and the batch layout and its targets, not hyperparameters.
NOT_SETTINGS = {"validate", "group_size", "target_weights", "target_mask"}
# Read by the methods themselves: the weight they give each sub-goal target (target_weights(K)).
METHOD_SETTINGS = {"subgoal_weight"}

# Every field away from its default, so a setting that is not passed on changes the result.
CHANGED = dict(gamma=0.9, kind="log_prob", mode="separate", weighting="trajectory", scale="std", eps=0.05, ddof=1,
               ig_weight=0.5, outcome_weight=2.0, log_prob_floor=-3.0, accumulation="sqrt_n", ig_advantage_scale=0.3,
               gain_clip="positive")


def keyword_options(function) -> set[str]:
    parameters = inspect.signature(function).parameters.values()
    return {p.name for p in parameters if p.kind is p.KEYWORD_ONLY} - NOT_SETTINGS


# Fields no core function takes: each is read by the adapter named here (and tested there).
ADAPTER_ONLY = {"allow_outcome_only": "igpo_rewards.integrations.verl (tests/integrations/test_verl.py)"}
# Not fields at all: keys under verl's ``algorithm.igpo`` that only the verl integration reads
# (settings_from_config leaves them out of IGPOSettings): ``probe_mode`` (tests/integrations/test_verl_actor.py).

MIRRORED = [igpo_rewards.igpo_advantages, igpo_rewards.grpo_advantages, igpo_rewards.advantages_from_token_rewards,
            igpo_rewards.turn_rewards, igpo_rewards.information_gain]


@pytest.mark.parametrize("function", MIRRORED)
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


def test_every_field_is_read_by_some_method():
    """A setting that nothing reads is an error waiting to happen: each field is an option of a
    function that a method mirrors (with the same name, so the method passes it)."""
    read = set().union(*(keyword_options(function) for function in MIRRORED))
    assert {field.name for field in dataclasses.fields(IGPOSettings)} - METHOD_SETTINGS == read | set(ADAPTER_ONLY)
    for function in MIRRORED:
        assert hasattr(IGPOSettings, function.__name__), function.__name__


def token_batch():
    """The turn-level batch() in verl's layout: each turn 2 generated tokens then a 1-token observation."""
    answer_logprob, outcome, turn_mask, group_ids = batch()
    response_mask = np.zeros((4, 9), dtype=np.int64)
    for row, turns in enumerate(turn_mask.sum(axis=1)):
        for turn in range(turns):
            response_mask[row, 3 * turn: 3 * turn + 2] = 1
    rewards = reference.turn_rewards(answer_logprob, outcome, turn_mask)
    return reference.place_turn_rewards(rewards, response_mask), response_mask, group_ids


def test_token_path_method_uses_every_setting():
    token_rewards, response_mask, group_ids = token_batch()
    options = {name: CHANGED[name] for name in ("gamma", "mode", "weighting", "scale", "eps", "ddof", "accumulation",
                                                "ig_advantage_scale")}
    got = IGPOSettings(**CHANGED).advantages_from_token_rewards(token_rewards, response_mask, group_ids)
    want = reference.advantages_from_token_rewards(token_rewards, response_mask, group_ids, **options)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    for name in options:
        if CHANGED[name] == getattr(IGPOSettings(), name):
            continue
        others = IGPOSettings(**{key: value for key, value in CHANGED.items() if key != name})
        assert not np.allclose(others.advantages_from_token_rewards(token_rewards, response_mask, group_ids), got), name
    np.testing.assert_allclose(IGPOSettings(**CHANGED).advantages_from_token_rewards(token_rewards, response_mask,
                                                                                      group_size=2), got, rtol=1e-12)


def test_turn_rewards_and_information_gain_methods_use_their_settings():
    answer_logprob, outcome, turn_mask, _ = batch()
    settings = IGPOSettings(**CHANGED)
    np.testing.assert_allclose(
        settings.turn_rewards(answer_logprob, outcome, turn_mask),
        reference.turn_rewards(answer_logprob, outcome, turn_mask, **settings.reward_kwargs()), rtol=1e-12)
    np.testing.assert_allclose(
        settings.information_gain(answer_logprob, turn_mask),
        reference.information_gain(answer_logprob, turn_mask, kind="log_prob", log_prob_floor=-3.0, gain_clip="positive"),
        rtol=1e-12)


def target_batch():
    """batch() with two sub-goal targets; row 2 lacks the second one (NaN there)."""
    answer_logprob, outcome, turn_mask, group_ids = batch()
    rng = np.random.default_rng(1)
    subgoals = np.where(turn_mask[:, :, None], np.log(rng.uniform(0.01, 1.0, (4, 3, 2))), 0.0)
    probes = np.concatenate([answer_logprob[:, :, None], subgoals], axis=2)
    target_mask = np.ones((4, 3), dtype=bool)
    target_mask[2, 2] = False
    probes[2, :, 2] = np.nan
    return probes, outcome, turn_mask, group_ids, target_mask


@pytest.mark.parametrize("potential", ["running_max", "probe"])
def test_subgoal_settings_weigh_the_sub_goal_targets(potential):
    probes, outcome, turn_mask, group_ids, target_mask = target_batch()
    settings = IGPOSettings(**CHANGED, subgoal_weight=0.5, subgoal_potential=potential)
    assert settings.target_weights(3) == [1.0, 0.5, 0.5]
    options = {key: value for key, value in CHANGED.items()}
    want = reference.igpo_advantages(probes, outcome, turn_mask, group_ids, target_weights=[1.0, 0.5, 0.5],
                                     target_mask=target_mask, subgoal_potential=potential, **options)
    got = settings.igpo_advantages(probes, outcome, turn_mask, group_ids, target_mask=target_mask)
    for field in want._fields:
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-9, atol=1e-12, err_msg=field)
    np.testing.assert_allclose(settings.turn_rewards(probes, outcome, turn_mask, target_mask=target_mask), want.rewards,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(settings.information_gain(probes, turn_mask, target_mask=target_mask),
                               want.information_gain, rtol=1e-12, atol=1e-12)
    # explicit weights win over subgoal_weight; the sub-goals' weight moves the result
    explicit = settings.igpo_advantages(probes, outcome, turn_mask, group_ids, target_mask=target_mask,
                                        target_weights=[1.0, 2.0, 0.0])
    assert not np.allclose(explicit.information_gain, got.information_gain)
    heavier = IGPOSettings(**CHANGED, subgoal_weight=2.0, subgoal_potential=potential)
    assert not np.allclose(heavier.information_gain(probes, turn_mask, target_mask=target_mask), want.information_gain)


def test_the_subgoal_slips_are_refused():
    probes, outcome, turn_mask, group_ids, target_mask = target_batch()
    with pytest.raises(ValueError, match=r"holds K = 3 targets but subgoal_weight is 0: the sub-goal probes would be "
                                         r"ignored; set subgoal_weight or pass target_weights"):
        IGPOSettings().igpo_advantages(probes, outcome, turn_mask, group_ids, target_mask=target_mask)
    with pytest.raises(ValueError, match=r"subgoal_weight = 0.5 but answer_logprob has shape \(4, 3\), the answer's "
                                         r"probes alone"):
        IGPOSettings(subgoal_weight=0.5).igpo_advantages(probes[:, :, 0], outcome, turn_mask, group_ids)
    with pytest.raises(ValueError, match="subgoal_weight = 0.5 but answer_logprob"):
        IGPOSettings(subgoal_weight=0.5).turn_rewards(probes[:, :, 0], outcome, turn_mask)
    # K = 1 probes with no sub-goal weight are the paper's IGPO, bit for bit
    plain = IGPOSettings().igpo_advantages(probes[:, :, 0], outcome, turn_mask, group_ids)
    one = IGPOSettings().igpo_advantages(probes[:, :, :1], outcome, turn_mask, group_ids)
    for field in plain._fields:
        np.testing.assert_array_equal(getattr(one, field), getattr(plain, field))


def test_max_turns_is_read_by_every_method_that_sees_turns():
    """IGPOSettings(max_turns=1) once ran a 3-turn batch through igpo_advantages without a word."""
    answer_logprob, outcome, turn_mask, group_ids = batch()
    token_rewards, response_mask, _ = token_batch()
    settings = IGPOSettings(max_turns=1)
    message = r"max_turns = 1 \(the most turns a rollout may have\), but rollouts \[0, 1, 3\] have \[3, 2, 3\] turns"
    with pytest.raises(ValueError, match=message):
        settings.igpo_advantages(answer_logprob, outcome, turn_mask, group_ids)
    with pytest.raises(ValueError, match=message):
        settings.turn_rewards(answer_logprob, outcome, turn_mask)
    with pytest.raises(ValueError, match=message):
        settings.information_gain(answer_logprob, turn_mask)
    with pytest.raises(ValueError, match=r"more runs of 1s than max_turns = 1 in rows \[0, 1, 3\]"):
        settings.advantages_from_token_rewards(token_rewards, response_mask, group_ids)
    # a cap the batch respects changes nothing
    capped, free = IGPOSettings(max_turns=3), IGPOSettings()
    np.testing.assert_array_equal(capped.igpo_advantages(answer_logprob, outcome, turn_mask, group_ids).advantages,
                                  free.igpo_advantages(answer_logprob, outcome, turn_mask, group_ids).advantages)
    np.testing.assert_array_equal(capped.advantages_from_token_rewards(token_rewards, response_mask, group_ids),
                                  free.advantages_from_token_rewards(token_rewards, response_mask, group_ids))


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
        ("mode", "both", ValueError, "igpo settings: mode must be one of ['joint', 'separate', 'turn_index']"),
        ("accumulation", "sqrt", ValueError, "igpo settings: accumulation must be one of ['discounted', 'sqrt_n']"),
        ("gain_clip", "relu", ValueError, "igpo settings: gain_clip must be one of ['none', 'positive']"),
        ("subgoal_potential", "max", ValueError,
         "igpo settings: subgoal_potential must be one of ['running_max', 'probe']"),
        ("ig_advantage_scale", float("nan"), ValueError, "igpo settings: ig_advantage_scale must be finite"),
        ("subgoal_weight", -0.5, ValueError, "igpo settings: subgoal_weight must be >= 0.0, got -0.5"),
        ("subgoal_weight", "1", TypeError, "igpo settings: subgoal_weight must be a real number"),
    ],
)
def test_bad_values_fail_at_construction_like_the_library_call(field, value, error, words):
    with pytest.raises(error) as raised:
        IGPOSettings(**{field: value})
    assert words in str(raised.value)
