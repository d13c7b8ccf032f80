"""Reasons in words, with the numbers behind them."""

from __future__ import annotations

import math

import numpy as np

from services.scorer.engine.drivers import (
    Driver,
    explain_risk,
    explain_tier,
    explain_value,
    top_risk_drivers,
)
from services.scorer.engine.retention import BehaviourFacts
from services.scorer.engine.value import (
    AccountFeatures,
    decide_tier,
    population_percentiles,
    score_breakdown,
)
from shared.policy import ScoringPolicy, TierRules

POLICY = ScoringPolicy()


def _facts(**columns: float) -> BehaviourFacts:
    values = dict.fromkeys(BehaviourFacts.__dataclass_fields__, math.nan)
    values.update(columns)
    return BehaviourFacts(**{k: np.array([v]) for k, v in values.items()})


def test_top_risk_drivers_keeps_the_largest_positive_ones() -> None:
    contributions = {
        "purchase_pattern": np.array([1.4, -0.5]),
        "complaints_180d": np.array([0.5, 0.0]),
        "late_payment_share": np.array([0.9, 0.0]),
        "revenue_decline": np.array([0.2, np.nan]),
    }
    top = top_risk_drivers(contributions, k=3)
    assert top[0] == [
        ("purchase_pattern", 1.4),
        ("late_payment_share", 0.9),
        ("complaints_180d", 0.5),
    ]
    assert top[1] == []  # nothing raises this account's risk


def test_risk_drivers_speak_a_managers_language() -> None:
    facts = _facts(
        days_since_last_order=143.0,
        usual_gap_days=30.0,
        satisfaction_last=2.0,
        satisfaction_previous=4.0,
        complaints_180d=2.0,
        late_share=0.45,
        avg_days_late=12.0,
        revenue_growth=-0.35,
    )
    contributions = {
        "purchase_pattern": np.array([2.1]),
        "satisfaction_drop": np.array([0.8]),
        "complaints_180d": np.array([0.33]),
        "late_payment_share": np.array([0.18]),
        "revenue_decline": np.array([0.25]),
    }
    drivers = explain_risk(contributions, facts, k=5)[0]
    texts = [d.text for d in drivers]
    assert texts == [
        "no order for 143 days; usually orders every 30 days",
        "satisfaction fell from satisfied to dissatisfied",
        "2 complaints in the last 180 days",
        "revenue down 35% on the previous 12 months",
        "pays late on 45% of invoices, 12 days late on average",
    ]
    assert drivers[0].as_dict() == {
        "code": "purchase_pattern",
        "text": "no order for 143 days; usually orders every 30 days",
        "contribution": 2.1,
    }


def test_single_order_account_has_no_usual_rhythm() -> None:
    drivers = explain_risk({"purchase_pattern": np.array([1.0])}, _facts(days_since_last_order=1.0))
    assert drivers[0][0].text == "no order for 1 day; too few orders to know the usual rhythm"


def _features(**changes: float) -> AccountFeatures:
    base = {
        "revenue_12m": 2_000_000.0,
        "gross_profit_12m": 80_000.0,
        "margin_rate": 0.04,
        "orders_12m": 30.0,
        "days_since_last_order": 5.0,
        "usual_gap_days": 12.0,
        "categories_12m": 9.0,
        "revenue_growth": 0.05,
        "late_share": 0.0,
        "avg_days_late": 0.0,
        "strategic_fit": 3.0,
        "account_age_days": 3000.0,
        "profit_share_cum": 0.2,
    }
    return AccountFeatures.from_records([{**base, **changes}])


def test_tier_reasons_name_the_gate_and_its_limit() -> None:
    features = _features()
    decision = decide_tier(features, [82.0], POLICY)
    reasons = explain_tier(decision.tiers, decision.gates, np.array([82.0]), features, POLICY)[0]
    margin = next(r for r in reasons if r.code == "margin_below_floor")
    assert margin == Driver(
        "margin_below_floor", "gross margin 4% is below the 12% floor", value=0.04, limit=0.12
    )


def test_late_payer_reasons_explain_the_flag_and_the_cap() -> None:
    features = _features(margin_rate=0.3, late_share=0.45, avg_days_late=12.0)
    decision = decide_tier(features, [82.0], POLICY)
    reasons = explain_tier(decision.tiers, decision.gates, np.array([82.0]), features, POLICY)[0]
    texts = [r.text for r in reasons]
    assert (
        "pays late: 45% of invoices, 12 days late on average (limits 30% of invoices, "
        "15 days late); credit flag, the tier stays"
    ) in texts
    assert texts[0] == "value score 82 (the strategic threshold is 75)"
    capped = ScoringPolicy(tiers=TierRules(late_payment_cap="key"))
    decision = decide_tier(features, [82.0], capped)
    reasons = explain_tier(decision.tiers, decision.gates, np.array([82.0]), features, capped)[0]
    texts = [r.text for r in reasons]
    assert "tier capped at key until payments improve" in texts
    assert texts[0] == "value score 82"


def test_open_invoices_over_the_credit_limit_are_a_reason() -> None:
    features = _features(margin_rate=0.3, credit_used=1.25)
    decision = decide_tier(features, [82.0], POLICY)
    reasons = explain_tier(decision.tiers, decision.gates, np.array([82.0]), features, POLICY)[0]
    assert "open invoices at 125% of the credit limit" in [r.text for r in reasons]


def test_value_drivers_add_up_to_points() -> None:
    features = _features(margin_rate=0.3)
    population = population_percentiles(features)
    breakdown = score_breakdown(features, population, POLICY)
    drivers = explain_value(breakdown, features, k=9)[0]
    assert math.isclose(sum(d.contribution or 0.0 for d in drivers), float(breakdown.score[0]))
    assert all(d.text for d in drivers)
