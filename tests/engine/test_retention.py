"""BG/NBD retention model: parameter recovery, the no-purchase probability and its calibration
on data drawn from a known process, and the behavioural adjustment."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.scorer.engine.retention import (
    BehaviourFacts,
    BgNbdParams,
    InsufficientDataError,
    SimulatedCohort,
    _expected_purchases_by_integration,
    _log_likelihood,
    _log_likelihood_gradient,
    adjust_log_odds,
    assess_risk,
    auc,
    behaviour_signals,
    bgnbd_log_likelihood,
    calibration_table,
    expected_purchases,
    fit_bgnbd,
    p_alive,
    p_no_purchase_within,
    simulate_bgnbd,
)
from shared.policy import RiskPolicy

# A B2B-like process in days: about one order a month while alive (r/alpha = 0.03/day), and a
# drop-out chance of ~17% after each order.
TRUE = BgNbdParams(r=1.2, alpha=40.0, a=0.8, b=4.0)
# Loyal accounts: rare drop-out, so many are alive and the risk spreads over the whole range.
LOYAL = BgNbdParams(r=0.9, alpha=60.0, a=0.6, b=8.0)
HORIZON = 90.0
N = 5000


def _cohort(params: BgNbdParams, seed: int, n: int = N) -> SimulatedCohort:
    rng = np.random.default_rng(seed)
    ages = rng.uniform(180.0, 730.0, n)  # accounts first ordered 6 months to 2 years ago
    return simulate_bgnbd(params, n, ages, rng, horizon_days=HORIZON)


@pytest.fixture(scope="module")
def cohort() -> SimulatedCohort:
    return _cohort(TRUE, seed=11)


@pytest.fixture(scope="module")
def fitted(cohort: SimulatedCohort) -> BgNbdParams:
    return fit_bgnbd(cohort.x, cohort.t_x, cohort.T)


def _relative_error(estimate: float, truth: float) -> float:
    return abs(estimate - truth) / truth


def test_fit_recovers_known_parameters(fitted: BgNbdParams) -> None:
    assert fitted.converged
    assert fitted.n == N
    assert _relative_error(fitted.r, TRUE.r) < 0.15
    assert _relative_error(fitted.alpha, TRUE.alpha) < 0.15
    assert _relative_error(fitted.a, TRUE.a) < 0.25
    assert _relative_error(fitted.b, TRUE.b) < 0.25


def test_fit_is_the_maximum_of_the_likelihood(cohort: SimulatedCohort, fitted: BgNbdParams) -> None:
    at_fit = bgnbd_log_likelihood(fitted, cohort.x, cohort.t_x, cohort.T)
    assert at_fit == pytest.approx(fitted.log_likelihood)
    assert at_fit >= bgnbd_log_likelihood(TRUE, cohort.x, cohort.t_x, cohort.T)
    nudged = BgNbdParams(r=fitted.r * 1.1, alpha=fitted.alpha, a=fitted.a, b=fitted.b)
    assert at_fit > bgnbd_log_likelihood(nudged, cohort.x, cohort.t_x, cohort.T)


def test_a_fit_from_the_last_fit_finds_the_same_maximum(
    cohort: SimulatedCohort, fitted: BgNbdParams
) -> None:
    # The hourly pass starts from the last fit: it must land on the same optimum, whether the
    # start is that optimum or well off it.
    for start in (fitted, BgNbdParams(r=3.0, alpha=10.0, a=0.2, b=20.0)):
        again = fit_bgnbd(cohort.x, cohort.t_x, cohort.T, start=start)
        assert again.converged
        assert again.log_likelihood == pytest.approx(fitted.log_likelihood, rel=1e-7)
        assert again.r == pytest.approx(fitted.r, rel=1e-3)
        assert again.alpha == pytest.approx(fitted.alpha, rel=1e-3)
        assert again.b == pytest.approx(fitted.b, rel=1e-2)


def test_fit_with_count_weights_equals_fit_on_repeated_rows(cohort: SimulatedCohort) -> None:
    # One row per distinct (x, t_x, T) with its count is how a large portfolio is compressed.
    x = np.round(cohort.x[:800])
    t_x = np.round(cohort.t_x[:800] / 30.0) * 30.0
    ages = np.full(800, 720.0)
    rows = np.column_stack([x, t_x, ages])
    distinct, counts = np.unique(rows, axis=0, return_counts=True)
    weighted = fit_bgnbd(distinct[:, 0], distinct[:, 1], distinct[:, 2], weights=counts)
    plain = fit_bgnbd(x, t_x, ages)
    assert weighted.log_likelihood == pytest.approx(plain.log_likelihood, rel=1e-5)
    assert weighted.r == pytest.approx(plain.r, rel=1e-2)
    assert weighted.a == pytest.approx(plain.a, rel=5e-2)


def test_fit_refuses_too_few_accounts() -> None:
    with pytest.raises(InsufficientDataError, match="at least 20"):
        fit_bgnbd([1.0] * 19, [10.0] * 19, [30.0] * 19)


def test_fit_refuses_history_without_repeat_orders() -> None:
    with pytest.raises(InsufficientDataError, match="repeat"):
        fit_bgnbd([0.0] * 30, [0.0] * 30, [100.0] * 30)


def test_fit_rejects_recency_beyond_age() -> None:
    with pytest.raises(ValueError, match="recency <= age"):
        fit_bgnbd([1.0] * 30, [50.0] * 30, [40.0] * 30)


def test_p_no_purchase_is_a_probability(cohort: SimulatedCohort) -> None:
    p = p_no_purchase_within(TRUE, cohort.x, cohort.t_x, cohort.T, HORIZON)
    assert np.isfinite(p).all()
    assert ((p >= 0.0) & (p <= 1.0)).all()


def test_risk_rises_as_time_passes_without_an_order() -> None:
    ages = np.array([100.0, 150.0, 200.0, 300.0, 500.0])
    p = p_no_purchase_within(TRUE, np.full(5, 4.0), np.full(5, 90.0), ages, HORIZON)
    assert (np.diff(p) > 0).all()


def test_risk_falls_with_more_orders_in_the_same_span() -> None:
    x = np.array([1.0, 3.0, 6.0, 12.0])
    p = p_no_purchase_within(TRUE, x, np.full(4, 300.0), np.full(4, 310.0), HORIZON)
    assert (np.diff(p) < 0).all()


def test_risk_rises_as_the_last_order_recedes() -> None:
    t_x = np.array([350.0, 250.0, 150.0, 50.0])  # same age and frequency, older last order
    p = p_no_purchase_within(TRUE, np.full(4, 5.0), t_x, np.full(4, 360.0), HORIZON)
    assert (np.diff(p) > 0).all()


def test_risk_shrinks_with_a_longer_horizon() -> None:
    p = p_no_purchase_within(TRUE, [3.0] * 3, [100.0] * 3, [200.0] * 3, [30.0, 90.0, 180.0])
    assert (np.diff(p) < 0).all()
    assert p_no_purchase_within(TRUE, [3.0], [100.0], [200.0], 0.0)[0] == pytest.approx(1.0)


def test_p_alive_is_not_the_purchase_probability() -> None:
    # An account with no repeat order is surely alive in BG/NBD, yet may well not order soon.
    alive = p_alive(TRUE, [0.0], [0.0], [200.0])
    quiet = p_no_purchase_within(TRUE, [0.0], [0.0], [200.0], HORIZON)
    assert alive[0] == 1.0
    assert quiet[0] > 0.2
    expected = ((TRUE.alpha + 200.0) / (TRUE.alpha + 200.0 + HORIZON)) ** TRUE.r
    assert quiet[0] == pytest.approx(expected)


def test_unknown_history_gives_nan_not_a_guess() -> None:
    p = p_no_purchase_within(TRUE, [np.nan, 2.0], [np.nan, 30.0], [np.nan, 60.0], HORIZON)
    assert math.isnan(p[0])
    assert 0.0 < p[1] < 1.0


def test_predicted_no_purchase_rates_are_calibrated_per_decile(
    cohort: SimulatedCohort, fitted: BgNbdParams
) -> None:
    p = p_no_purchase_within(fitted, cohort.x, cohort.t_x, cohort.T, HORIZON)
    observed = (cohort.purchases_in_horizon == 0).astype(np.float64)
    table = calibration_table(p, observed, bins=10)
    assert sum(b.count for b in table) == N
    gaps = [abs(b.mean_predicted - b.observed_rate) for b in table]
    assert max(gaps) < 0.07, gaps
    assert auc(p, observed) > 0.85


def test_calibration_holds_out_of_sample_for_loyal_accounts() -> None:
    # Fit on one cohort, predict another drawn from the same process.
    train, test = _cohort(LOYAL, seed=21), _cohort(LOYAL, seed=22)
    params = fit_bgnbd(train.x, train.t_x, train.T)
    p = p_no_purchase_within(params, test.x, test.t_x, test.T, HORIZON)
    observed = (test.purchases_in_horizon == 0).astype(np.float64)
    table = calibration_table(p, observed)
    assert table[0].mean_predicted < 0.2
    assert table[-1].mean_predicted > 0.8
    gaps = [abs(b.mean_predicted - b.observed_rate) for b in table]
    assert max(gaps) < 0.07, gaps


def test_expected_purchases_matches_simulation_and_integration() -> None:
    rng = np.random.default_rng(5)
    cohort = simulate_bgnbd(TRUE, 40_000, 365.0, rng, horizon_days=1.0)
    closed = expected_purchases(TRUE, [30.0, 365.0])
    assert closed[1] == pytest.approx(cohort.x.mean(), rel=0.03)
    integrated = _expected_purchases_by_integration(TRUE, np.array([30.0, 365.0]))
    np.testing.assert_allclose(closed, integrated, rtol=1e-6)


def test_expected_purchases_without_closed_form() -> None:
    # a <= 1: the closed form's E[1/p] diverges, the integral does not.
    params = BgNbdParams(r=1.0, alpha=30.0, a=0.7, b=3.0)
    rng = np.random.default_rng(6)
    cohort = simulate_bgnbd(params, 40_000, 180.0, rng, horizon_days=1.0)
    assert expected_purchases(params, 180.0)[0] == pytest.approx(cohort.x.mean(), rel=0.03)


def test_adjust_log_odds_moves_in_the_signed_direction() -> None:
    base = np.array([0.2, 0.2, 0.2])
    signals = {"complaints_180d": np.array([0.0, 1.0, 1.0]), "bonus": np.array([0.0, 0.0, 1.0])}
    adjusted, contributions = adjust_log_odds(
        base, signals, {"complaints_180d": 0.7, "bonus": -2.0}
    )
    assert adjusted[0] == pytest.approx(0.2)
    assert adjusted[1] > 0.2
    assert adjusted[2] < adjusted[1]
    # An odds ratio of e^0.7 at full signal.
    odds = adjusted[1] / (1 - adjusted[1])
    assert odds == pytest.approx(0.25 * math.exp(0.7))
    np.testing.assert_allclose(contributions["complaints_180d"], [0.0, 0.7, 0.7])
    np.testing.assert_allclose(contributions["bonus"], [0.0, 0.0, -2.0])


def test_adjust_log_odds_clips_certainty_and_ignores_unknown_signals() -> None:
    adjusted, contributions = adjust_log_odds(
        [0.0, 1.0, 0.5], {"complaints_180d": [np.nan, 1.0, np.nan]}, {"complaints_180d": 1.0}
    )
    assert 0.0 < adjusted[0] < 1e-5  # no longer "certain": a signal could move it
    assert adjusted[1] < 1.0
    assert adjusted[2] == pytest.approx(0.5)
    assert contributions["complaints_180d"][2] == 0.0


def test_adjust_log_odds_refuses_a_signal_without_weight() -> None:
    with pytest.raises(ValueError, match="complaint"):
        adjust_log_odds([0.3], {"complaint": [1.0]}, {"complaints_180d": 1.0})


def _facts(n: int, **columns: list[float]) -> BehaviourFacts:
    blank = {name: [math.nan] * n for name in BehaviourFacts.__dataclass_fields__}
    blank.update(columns)
    return BehaviourFacts(**{k: np.asarray(v, dtype=np.float64) for k, v in blank.items()})


def test_behaviour_signals_are_normalised_and_neutral_when_unknown() -> None:
    facts = _facts(
        4,
        satisfaction_last=[5.0, 2.0, 1.0, math.nan],
        satisfaction_previous=[5.0, 4.0, math.nan, math.nan],
        complaints_180d=[0.0, 1.0, 6.0, math.nan],
        days_since_last_contact=[30.0, 120.0, 400.0, math.nan],
        late_share=[0.0, 0.5, 1.0, math.nan],
        revenue_growth=[0.2, -0.3, -2.0, math.nan],
    )
    signals = behaviour_signals(facts, RiskPolicy())
    np.testing.assert_allclose(signals["satisfaction_drop"], [0.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(signals["complaints_180d"], [0.0, 1 / 3, 1.0, 0.0])
    np.testing.assert_allclose(signals["contact_gap_ratio"], [0.0, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(signals["late_payment_share"], [0.0, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(signals["revenue_decline"], [0.0, 0.3, 1.0, 0.0])


def test_assess_risk_composes_base_signals_and_bands() -> None:
    policy = RiskPolicy()
    facts = _facts(
        3,
        days_since_last_order=[10.0, 10.0, math.nan],
        complaints_180d=[0.0, 3.0, 0.0],
    )
    x, t_x, ages = [6.0, 6.0, math.nan], [300.0, 300.0, math.nan], [310.0, 310.0, math.nan]
    risk = assess_risk(TRUE, x, t_x, ages, facts, policy, reference_p=0.5)
    assert risk.base_p[0] == risk.base_p[1]
    assert risk.probability[1] > risk.probability[0]
    assert risk.contributions["complaints_180d"][1] == pytest.approx(0.5)
    assert risk.contributions["purchase_pattern"][0] < 0  # orders steadily: lowers the risk
    assert math.isnan(risk.probability[2])
    assert risk.band[2] is None
    assert risk.band[0] is not None


def test_likelihood_gradient_matches_finite_differences(cohort: SimulatedCohort) -> None:
    x, t_x, ages = cohort.x[:300], cohort.t_x[:300] / 365.0, cohort.T[:300] / 365.0
    point = (1.1, 0.12, 0.9, 3.5)  # r, alpha (years), a, b

    def total(r: float, alpha: float, a: float, b: float) -> float:
        return float(_log_likelihood(r, alpha, a, b, x, t_x, ages).sum())

    _, gradient = _log_likelihood_gradient(*point, x, t_x, ages)
    for j in range(4):
        step = 1e-6 * point[j]
        up = tuple(v + step if i == j else v for i, v in enumerate(point))
        down = tuple(v - step if i == j else v for i, v in enumerate(point))
        numeric = (total(*up) - total(*down)) / (2 * step)
        assert gradient[:, j].sum() == pytest.approx(numeric, rel=1e-4)


def test_a_weighted_fit_counts_accounts_not_rows() -> None:
    # 30 accounts in three distinct histories: enough accounts, though only three rows
    params = fit_bgnbd([0, 2, 5], [0, 100, 300], [400, 400, 400], weights=[10, 10, 10])
    assert params.n == 30
    with pytest.raises(InsufficientDataError):
        fit_bgnbd([0, 2, 5], [0, 100, 300], [400, 400, 400], weights=[5, 5, 5])
