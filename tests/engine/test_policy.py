"""The scoring policy validates what a PUT may change."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.policy import (
    DEFAULT_POLICY,
    RiskPolicy,
    ScoringPolicy,
    TierRules,
    ValueWeights,
)


def test_defaults_follow_the_design() -> None:
    rules = DEFAULT_POLICY.tiers
    assert (rules.strategic_threshold, rules.key_threshold) == (75.0, 60.0)
    assert rules.margin_floor == 0.12
    assert rules.profit_core_share == 0.8
    assert DEFAULT_POLICY.hysteresis.band == 5.0
    assert DEFAULT_POLICY.hysteresis.demote_after == 3
    assert DEFAULT_POLICY.risk.horizon_days == 90
    assert DEFAULT_POLICY.risk.band_thresholds == (0.25, 0.5, 0.75)


def test_round_trips_through_json() -> None:
    body = DEFAULT_POLICY.model_dump(mode="json")
    assert "version" not in body
    assert ScoringPolicy.model_validate(body) == DEFAULT_POLICY


def test_partial_body_takes_defaults() -> None:
    policy = ScoringPolicy.model_validate({"tiers": {"margin_floor": 0.2}})
    assert policy.tiers.margin_floor == 0.2
    assert policy.tiers.key_threshold == 60.0


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="extra"):
        ScoringPolicy.model_validate({"tiers": {"margin_flor": 0.2}})
    with pytest.raises(ValidationError, match="extra"):
        ScoringPolicy.model_validate({"version": 3})


def test_thresholds_must_be_ordered() -> None:
    with pytest.raises(ValidationError, match="ordered"):
        TierRules(strategic_threshold=60, key_threshold=70)
    with pytest.raises(ValidationError, match="ordered"):
        TierRules(developing_threshold=60)


def test_weights_must_be_non_negative_and_not_all_zero() -> None:
    with pytest.raises(ValidationError):
        ValueWeights(revenue=-0.1)
    zero = dict.fromkeys(ValueWeights.model_fields, 0.0)
    with pytest.raises(ValidationError, match="positive"):
        ValueWeights(**zero)


def test_risk_bands_must_be_ordered_probabilities() -> None:
    with pytest.raises(ValidationError, match="band_thresholds"):
        RiskPolicy(band_thresholds=(0.5, 0.25, 0.75))
    with pytest.raises(ValidationError, match="band_thresholds"):
        RiskPolicy(band_thresholds=(0.25, 0.5, 1.0))


def test_payment_cap_is_developing_or_standard() -> None:
    assert TierRules(late_payment_cap="key").late_payment_cap == "key"
    with pytest.raises(ValidationError):
        TierRules.model_validate({"late_payment_cap": "developing"})


def test_policy_is_immutable() -> None:
    with pytest.raises(ValidationError):
        DEFAULT_POLICY.tiers.margin_floor = 0.5  # type: ignore[misc]
