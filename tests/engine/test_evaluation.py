"""Calibration and evaluation: Platt scaling, learned signal weights, the calibration table,
AUC, Brier score and risk bands, on toy data whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special

from services.scorer.engine.arrays import FloatArray
from services.scorer.engine.retention import (
    PlattCalibration,
    apply_platt,
    auc,
    brier,
    calibration_table,
    fit_platt,
    fit_signal_weights,
    risk_band,
)
from shared.enums import RiskBand


def _miscalibrated(
    seed: int, slope: float, intercept: float, n: int = 20_000
) -> tuple[FloatArray, FloatArray]:
    """Predictions p whose true event probability is expit(slope * logit(p) + intercept)."""
    rng = np.random.default_rng(seed)
    p = special.expit(rng.normal(0.0, 1.5, n))
    truth = special.expit(slope * special.logit(p) + intercept)
    return p, (rng.random(n) < truth).astype(np.float64)


def test_platt_recovers_a_known_distortion() -> None:
    p, y = _miscalibrated(seed=1, slope=2.0, intercept=0.5)
    slope, intercept = fit_platt(p, y)
    assert slope == pytest.approx(2.0, rel=0.08)
    assert intercept == pytest.approx(0.5, abs=0.08)
    calibrated = apply_platt(p, PlattCalibration(slope, intercept))
    table = calibration_table(calibrated, y)
    assert max(abs(b.mean_predicted - b.observed_rate) for b in table) < 0.03
    assert brier(calibrated, y) < brier(p, y)


def test_platt_leaves_calibrated_predictions_alone() -> None:
    p, y = _miscalibrated(seed=2, slope=1.0, intercept=0.0)
    slope, intercept = fit_platt(p, y)
    assert slope == pytest.approx(1.0, abs=0.06)
    assert intercept == pytest.approx(0.0, abs=0.06)


def test_platt_stays_finite_on_separable_data() -> None:
    slope, intercept = fit_platt([0.1, 0.2, 0.8, 0.9], [0.0, 0.0, 1.0, 1.0])
    assert math.isfinite(slope)
    assert slope > 0
    assert math.isfinite(intercept)


def test_platt_needs_both_outcomes() -> None:
    with pytest.raises(ValueError, match="both outcomes"):
        fit_platt([0.1, 0.5], [1.0, 1.0])


def test_auc_known_values_and_ties() -> None:
    assert auc([0.1, 0.2, 0.8, 0.9], [0.0, 0.0, 1.0, 1.0]) == 1.0
    assert auc([0.9, 0.8, 0.2, 0.1], [0.0, 0.0, 1.0, 1.0]) == 0.0
    assert auc([0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 0.0, 1.0]) == 0.5
    # Pairs (pos, neg): (0.4 vs 0.1) win, (0.4 vs 0.4) tie, (0.8 vs both) win: (1 + .5 + 2) / 4.
    assert auc([0.1, 0.4, 0.4, 0.8], [0.0, 0.0, 1.0, 1.0]) == pytest.approx(0.875)
    assert math.isnan(auc([0.2, 0.3], [1.0, 1.0]))


def test_auc_matches_pairwise_count() -> None:
    rng = np.random.default_rng(3)
    p = np.round(rng.random(300), 1)  # many ties
    y = (rng.random(300) < p).astype(np.float64)
    pos, neg = p[y == 1], p[y == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(p, y) == pytest.approx(pairwise)


def test_brier_known_values() -> None:
    assert brier([1.0, 0.0], [1.0, 0.0]) == 0.0
    assert brier([0.5, 0.5], [1.0, 0.0]) == 0.25
    assert brier([0.2, 0.9, np.nan], [0.0, 0.0, 1.0]) == pytest.approx((0.04 + 0.81) / 2)


def test_outcomes_must_be_binary() -> None:
    with pytest.raises(ValueError, match="0/1"):
        brier([0.5], [2.0])


def test_calibration_table_deciles() -> None:
    p = np.linspace(0.0, 0.99, 100)
    y = (np.arange(100) % 2).astype(np.float64)
    table = calibration_table(p, y)
    assert [b.count for b in table] == [10] * 10
    assert table[0].lower == 0.0
    assert table[-1].upper == pytest.approx(0.99)
    assert all(b.observed_rate == 0.5 for b in table)
    assert table[3].mean_predicted == pytest.approx(p[30:40].mean())
    assert set(table[0].as_dict()) == {"lower", "upper", "count", "mean_predicted", "observed_rate"}


def test_signal_weights_are_learned_beyond_the_base_model() -> None:
    rng = np.random.default_rng(4)
    n = 20_000
    base = special.expit(rng.normal(0.0, 1.0, n))
    complaints = (rng.random(n) < 0.3).astype(np.float64)
    noise = rng.random(n)
    truth = special.expit(special.logit(base) + 1.2 * complaints)
    y = (rng.random(n) < truth).astype(np.float64)
    weights = fit_signal_weights(base, {"complaints_180d": complaints, "noise": noise}, y)
    assert weights["complaints_180d"] == pytest.approx(1.2, abs=0.12)
    assert 0.0 <= weights["noise"] < 0.1


def test_risk_bands_by_threshold() -> None:
    bands = risk_band([0.0, 0.249, 0.25, 0.5, 0.74, 0.75, 1.0, np.nan], (0.25, 0.5, 0.75))
    assert list(bands) == [
        RiskBand.low,
        RiskBand.low,
        RiskBand.medium,
        RiskBand.high,
        RiskBand.high,
        RiskBand.critical,
        RiskBand.critical,
        None,
    ]


def test_risk_band_thresholds_must_increase() -> None:
    with pytest.raises(ValueError, match="increasing"):
        risk_band([0.3], (0.5, 0.25, 0.75))
