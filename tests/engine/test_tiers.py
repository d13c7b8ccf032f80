"""Value score, tier gates, hysteresis and overrides: the key-account rules of the domain."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from services.scorer.engine.arrays import IntArray, ObjectArray
from services.scorer.engine.value import (
    AccountFeatures,
    PopulationPercentiles,
    apply_hysteresis,
    apply_override,
    cumulative_profit_share,
    decide_tier,
    percentile_rank,
    population_percentiles,
    score_breakdown,
    tier_codes,
    value_score,
)
from shared.enums import Tier
from shared.policy import ScoringPolicy, TierRules, ValueWeights

POLICY = ScoringPolicy()

# A healthy, sizeable account that passes every gate; tests change one thing at a time.
GOOD: dict[str, float] = {
    "revenue_12m": 600_000.0,
    "gross_profit_12m": 150_000.0,
    "margin_rate": 0.25,
    "orders_12m": 24.0,
    "days_since_last_order": 12.0,
    "usual_gap_days": 15.0,
    "categories_12m": 8.0,
    "revenue_growth": 0.1,
    "late_share": 0.05,
    "avg_days_late": 2.0,
    "strategic_fit": 4.0,
    "account_age_days": 2000.0,
    "profit_share_cum": 0.3,
}


def _accounts(*changes: dict[str, float]) -> AccountFeatures:
    return AccountFeatures.from_records([{**GOOD, **change} for change in changes])


def _population(seed: int = 0, n: int = 2000) -> AccountFeatures:
    """A portfolio with the usual long tail: few large accounts, many small ones."""
    rng = np.random.default_rng(seed)
    revenue = rng.lognormal(mean=np.log(50_000), sigma=1.2, size=n)
    margin = np.clip(rng.normal(0.2, 0.08, n), -0.05, 0.6)
    profit = revenue * margin
    orders = rng.poisson(np.clip(revenue / 20_000, 1, 60))
    late = np.where(rng.random(n) < 0.6, 0.0, rng.beta(1, 4, n))
    growth = np.where(rng.random(n) < 0.1, np.nan, rng.normal(0.03, 0.25, n))
    return AccountFeatures(
        revenue_12m=revenue,
        gross_profit_12m=profit,
        margin_rate=margin,
        orders_12m=orders.astype(np.float64),
        days_since_last_order=rng.exponential(40.0, n),
        usual_gap_days=rng.uniform(10, 90, n),
        categories_12m=rng.integers(1, 12, n).astype(np.float64),
        revenue_growth=growth,
        late_share=late,
        avg_days_late=late * 20,
        strategic_fit=rng.integers(1, 6, n).astype(np.float64),
        account_age_days=rng.uniform(100, 4000, n),
        profit_share_cum=cumulative_profit_share(profit),
        credit_used=np.where(rng.random(n) < 0.5, np.nan, rng.uniform(0, 1.5, n)),
    )


@pytest.fixture(scope="module")
def population() -> PopulationPercentiles:
    return population_percentiles(_population())


def _tiers(decision_tiers: ObjectArray) -> list[Tier]:
    return [Tier(t) for t in decision_tiers]


# ---- percentiles and the score ----------------------------------------------------------------


def test_percentile_rank_interpolates_and_shares_ties() -> None:
    cut = [0.0, 0.0, 0.0, 10.0, 20.0]  # levels 0, .25, .5, .75, 1
    ranks = percentile_rank([-1.0, 0.0, 5.0, 10.0, 15.0, 20.0, 99.0, np.nan], cut)
    np.testing.assert_allclose(ranks[:7], [0.0, 0.25, 0.625, 0.75, 0.875, 1.0, 1.0])
    assert math.isnan(ranks[7])
    assert percentile_rank([3.0], [])[0] == 0.5


def test_population_percentiles_round_trip_as_json(population: PopulationPercentiles) -> None:
    again = PopulationPercentiles.model_validate_json(population.model_dump_json())
    assert again == population
    assert len(population.cutpoints["revenue_12m"]) == 101
    with pytest.raises(ValueError, match="non-decreasing"):
        PopulationPercentiles(cutpoints={"revenue_12m": [2.0, 1.0]})


def test_score_is_0_to_100_and_the_parts_add_up(population: PopulationPercentiles) -> None:
    features = _population(seed=1, n=500)
    breakdown = score_breakdown(features, population, POLICY)
    assert ((breakdown.score >= 0) & (breakdown.score <= 100)).all()
    total = np.sum(np.vstack(list(breakdown.contributions.values())), axis=0)
    np.testing.assert_allclose(total, breakdown.score)
    # Ranks against a population drawn from the same process spread over the whole range.
    assert breakdown.score.min() < 30
    assert breakdown.score.max() > 70


def test_only_weight_ratios_matter(population: PopulationPercentiles) -> None:
    features = _accounts({}, {"revenue_12m": 20_000.0})
    doubled = ScoringPolicy(
        value_weights=ValueWeights(
            **{k: 2 * v for k, v in POLICY.value_weights.model_dump().items()}
        )
    )
    np.testing.assert_allclose(
        value_score(features, population, POLICY), value_score(features, population, doubled)
    )


def test_lapsing_and_late_paying_lower_the_score(population: PopulationPercentiles) -> None:
    scores = value_score(
        _accounts({}, {"days_since_last_order": 300.0}, {"late_share": 0.6}), population, POLICY
    )
    assert scores[1] < scores[0]
    assert scores[2] < scores[0]


def test_unknown_growth_and_fit_are_neutral(population: PopulationPercentiles) -> None:
    breakdown = score_breakdown(
        _accounts({"revenue_growth": math.nan, "strategic_fit": math.nan}), population, POLICY
    )
    assert breakdown.components["growth"][0] == 0.5
    assert breakdown.components["strategic_fit"][0] == 0.5


def test_cumulative_profit_share_marks_the_80_20_line() -> None:
    shares = cumulative_profit_share([10.0, 50.0, 30.0, -5.0, 10.0])
    np.testing.assert_allclose(shares, [0.9, 0.5, 0.8, 1.0, 1.0])


def test_features_reject_unknown_columns() -> None:
    with pytest.raises(ValueError, match="unknown feature"):
        AccountFeatures.from_records([{"revenue": 1.0}])
    row = _accounts({"strategic_fit": math.nan}).row(0)
    assert row["strategic_fit"] is None
    assert row["revenue_12m"] == 600_000.0


# ---- tier gates --------------------------------------------------------------------------------


def test_good_account_tiers_by_score() -> None:
    features = _accounts({}, {}, {}, {})
    decision = decide_tier(features, [90.0, 65.0, 40.0, 10.0], POLICY)
    assert _tiers(decision.tiers) == [Tier.strategic, Tier.key, Tier.standard, Tier.standard]
    # Developing is for accounts outside the profit core with potential: grow them.
    outside = _accounts(*[{"profit_share_cum": 0.95, "strategic_fit": 5.0}] * 2)
    assert _tiers(decide_tier(outside, [40.0, 10.0], POLICY).tiers) == [
        Tier.developing,
        Tier.standard,
    ]


def test_high_revenue_at_thin_margin_is_neither_key_nor_strategic(
    population: PopulationPercentiles,
) -> None:
    big_thin = {"revenue_12m": 5_000_000.0, "gross_profit_12m": 200_000.0, "margin_rate": 0.04}
    features = _accounts(big_thin, {**big_thin, "margin_rate": 0.2})
    scores = value_score(features, population, POLICY)
    assert scores[0] >= POLICY.tiers.key_threshold  # the score alone would make it key
    decision = decide_tier(features, scores, POLICY)
    assert decision.tiers[0] is Tier.standard
    assert decision.gates["margin_below_floor"][0]
    assert decision.tiers[1] in (Tier.key, Tier.strategic)  # the margin is what decided


def test_high_margin_on_tiny_revenue_is_not_key() -> None:
    tiny_rich = {
        "revenue_12m": 20_000.0,
        "gross_profit_12m": 12_000.0,
        "margin_rate": 0.6,
        "profit_share_cum": 0.97,
        "strategic_fit": 5.0,
    }
    decision = decide_tier(
        _accounts(tiny_rich, {**tiny_rich, "strategic_fit": 2.0}), [95.0] * 2, POLICY
    )
    assert decision.gates["revenue_below_key_minimum"].all()
    assert decision.tiers[0] is Tier.developing  # strategic fit 5: potential, not key
    assert decision.tiers[1] is Tier.standard


def test_a_late_payer_keeps_its_value_tier_with_a_flag_or_is_capped_at_key() -> None:
    features = _accounts({}, {"late_share": 0.45}, {"avg_days_late": 22.0})
    decision = decide_tier(features, [90.0] * 3, POLICY)
    assert _tiers(decision.tiers) == [Tier.strategic] * 3
    assert list(decision.gates["late_payer"]) == [False, True, True]
    assert not decision.gates["payment_cap_applied"].any()
    capped = ScoringPolicy(tiers=TierRules(late_payment_cap="key"))
    decision = decide_tier(features, [90.0] * 3, capped)
    assert _tiers(decision.tiers) == [Tier.strategic, Tier.key, Tier.key]
    assert list(decision.gates["payment_cap_applied"]) == [False, True, True]


def test_a_large_late_payer_is_never_developing() -> None:
    # The second-largest customer pays late: whatever the cap, it ends no lower than key, and
    # never "developing" (a label for small accounts worth growing).
    large = {"late_share": 0.6, "avg_days_late": 30.0, "revenue_growth": 0.5}
    for cap in ("none", "key"):
        policy = ScoringPolicy(tiers=TierRules(late_payment_cap=cap))
        for score in (62.0, 80.0):
            tier = decide_tier(_accounts(large), [score], policy).tiers[0]
            assert tier in (Tier.key, Tier.strategic), (cap, score, tier)


def test_open_invoices_over_the_credit_limit_raise_a_credit_flag() -> None:
    features = _accounts({"credit_used": 1.3}, {"credit_used": 0.4})
    decision = decide_tier(features, [70.0] * 2, POLICY)
    assert list(decision.gates["credit_limit_exceeded"]) == [True, False]


def test_strategic_needs_the_profit_core() -> None:
    decision = decide_tier(_accounts({"profit_share_cum": 0.93}), [90.0], POLICY)
    assert decision.tiers[0] is Tier.key
    assert decision.gates["outside_profit_core"][0]


def test_small_fast_grower_is_developing(population: PopulationPercentiles) -> None:
    small = {
        "revenue_12m": 30_000.0,
        "gross_profit_12m": 6_000.0,
        "margin_rate": 0.2,
        "orders_12m": 6.0,
        "revenue_growth": 0.8,
        "strategic_fit": 3.0,
        "profit_share_cum": 0.97,
    }
    features = _accounts(
        small,
        {**small, "revenue_growth": 0.05},  # small and flat
        {**small, "margin_rate": 0.05, "gross_profit_12m": 1_500.0},  # growing, but thin
    )
    scores = value_score(features, population, POLICY)
    decision = decide_tier(features, scores, POLICY)
    assert _tiers(decision.tiers) == [Tier.developing, Tier.standard, Tier.standard]
    assert decision.gates["fast_growth"][0]


# ---- hysteresis ----------------------------------------------------------------------------------


def _run(
    scores: list[float],
    start: Tier | None,
    changes: dict[str, float] | None = None,
    policy: ScoringPolicy = POLICY,
) -> list[Tier]:
    """Evaluate one account over time and return the tier after each evaluation."""
    features = _accounts(changes or {})
    held: ObjectArray = np.array([start], dtype=object)
    count: IntArray = np.zeros(1, dtype=np.int64)
    path: list[Tier] = []
    for score in scores:
        candidate = decide_tier(features, [score], policy).tiers
        held, count = apply_hysteresis(held, candidate, [score], count, policy)
        path.append(Tier(held[0]))
    return path


def test_hovering_at_the_threshold_does_not_flap() -> None:
    hovering = [59.5, 60.5, 59.8, 60.2, 59.1, 60.0, 59.9, 60.4, 59.6, 60.1]
    from_key = _run(hovering, start=Tier.key)
    assert set(from_key) == {Tier.key}
    from_below = _run(hovering, start=Tier.developing)
    assert from_below[0] is Tier.developing
    assert set(from_below[1:]) == {Tier.key}  # promoted once, then held


def test_sustained_drop_demotes_after_n_evaluations() -> None:
    path = _run([58.0, 58.0, 58.0], start=Tier.key)
    assert path == [Tier.key, Tier.key, Tier.standard]  # demote_after = 3


def test_a_supporting_evaluation_resets_the_count() -> None:
    path = _run([58.0, 58.0, 61.0, 58.0, 58.0, 58.0], start=Tier.key)
    assert path == [Tier.key] * 5 + [Tier.standard]


def test_falling_through_the_band_demotes_at_once() -> None:
    assert _run([54.0], start=Tier.key) == [Tier.standard]
    assert _run([69.0], start=Tier.strategic) == [Tier.key]


def test_promotion_is_immediate() -> None:
    assert _run([80.0], start=Tier.standard) == [Tier.strategic]
    assert _run([61.0], start=None) == [Tier.key]


def test_failed_gate_demotes_after_n_even_with_a_high_score() -> None:
    path = _run([80.0] * 3, start=Tier.strategic, changes={"margin_rate": 0.08})
    assert path == [Tier.strategic, Tier.strategic, Tier.standard]


def test_hysteresis_is_vectorised_over_accounts() -> None:
    held, count = apply_hysteresis(
        [Tier.key, "key", None, Tier.developing],
        [Tier.developing, Tier.developing, Tier.standard, Tier.key],
        [58.0, 50.0, 10.0, 65.0],
        [2, 0, 0, 0],
        POLICY,
    )
    assert list(held) == [Tier.developing, Tier.developing, Tier.standard, Tier.key]
    assert list(count) == [0, 0, 0, 0]
    assert list(tier_codes(held)) == [1, 1, 0, 2]


# ---- overrides -----------------------------------------------------------------------------------


def test_override_wins_until_it_expires() -> None:
    now = datetime(2026, 6, 1, tzinfo=UTC)
    tomorrow = now + timedelta(days=1)
    computed = [Tier.standard, Tier.standard, Tier.key, Tier.key]
    override = [Tier.key, Tier.strategic, None, Tier.standard]
    expires = [tomorrow, now - timedelta(seconds=1), None, None]
    assert list(apply_override(computed, override, expires, now)) == [
        Tier.key,  # in force
        Tier.standard,  # expired: back to what the data says
        Tier.key,  # no override
        Tier.standard,  # no expiry: pinned until lifted
    ]
    after = apply_override(computed, override, expires, tomorrow)
    assert after[0] is Tier.standard


def test_unknown_tier_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="platinum"):
        tier_codes(["platinum"])
