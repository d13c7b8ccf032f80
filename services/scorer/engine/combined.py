"""The two population models together, and the layer learned from the service's own history.

The base risk is P(no order within the horizon) from a buy-till-you-die model of the account's
buying occasions. Two are fitted to the population: BG/NBD (an account may drop out right after
an occasion) and Pareto/NBD (it may drop out at any moment). They disagree most on accounts that
have been silent for a while, and neither is right for every portfolio, so:

- without history to judge them, the base is the **average** of the two probabilities;
- with history (more than two horizons), the replay scores the accounts as they stood one
  horizon ago and compares every candidate with what they did since: each base (BG/NBD,
  Pareto/NBD, average) with the policy's signal weights as they are (``policy``), then
  Platt-calibrated (``calibrated``), and with signal weights learned from the outcomes and then
  calibrated (``learned``). The candidates are fitted on the accounts of even code and judged on
  the odd ones (Brier score); the winner is refitted on all and used from then on.

``learn_layer`` is pure: the portfolio pass and ``kam backtest`` call it the same way, so the
backtest shows what the service would show.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from services.scorer.engine.arrays import FloatArray, IntArray, as_float_array
from services.scorer.engine.pareto import (
    ParetoNbdParams,
    fit_pareto_nbd,
    p_no_purchase_within_pareto,
)
from services.scorer.engine.retention import (
    IDENTITY_CALIBRATION,
    BgNbdParams,
    CalibrationBin,
    InsufficientDataError,
    PlattCalibration,
    adjust_log_odds,
    apply_platt,
    auc,
    brier,
    calibration_table,
    fit_bgnbd,
    fit_platt,
    fit_signal_weights,
    p_no_purchase_within,
)

BaseModel = Literal["bgnbd", "pareto_nbd", "average"]
Method = Literal["policy", "calibrated", "learned"]
BASE_MODELS: tuple[BaseModel, ...] = ("bgnbd", "pareto_nbd", "average")
Source = Literal["fitted", "previous fit", "prior"]
MODEL_LABELS = {"bgnbd": "BG/NBD", "pareto_nbd": "Pareto/NBD", "average": "average of both"}
# An uninformed but plausible purchase process (an occasion every ~45 days, ~8% chance of
# dropping out after each), used until the portfolio has enough accounts to fit its own.
PRIOR_BGNBD = BgNbdParams(r=1.0, alpha=45.0, a=0.5, b=6.0, converged=False)
MIN_LAYER_ACCOUNTS = 200
"""Fewer scored accounts than this in the replay cannot tell the candidates apart: the policy's
model is used as it is."""


def max_decile_error(table: Sequence[CalibrationBin]) -> float:
    """The largest gap between mean prediction and observed rate over the bins of a calibration
    table: how far off the number can be for a whole group of accounts."""
    if not table:
        return math.nan
    return max(abs(b.mean_predicted - b.observed_rate) for b in table)


@dataclass(frozen=True)
class RetentionModels:
    """The fitted population models. ``pareto_nbd`` is None when it could not be fitted; the
    base is then BG/NBD alone whatever was asked."""

    bgnbd: BgNbdParams
    pareto_nbd: ParetoNbdParams | None

    def bases(
        self, x: ArrayLike, t_x: ArrayLike, T: ArrayLike, horizon_days: float
    ) -> dict[BaseModel, FloatArray]:
        """P(no order within the horizon) under every model available, and their average."""
        out: dict[BaseModel, FloatArray] = {
            "bgnbd": p_no_purchase_within(self.bgnbd, x, t_x, T, horizon_days)
        }
        if self.pareto_nbd is not None:
            pareto = p_no_purchase_within_pareto(self.pareto_nbd, x, t_x, T, horizon_days)
            out["pareto_nbd"] = pareto
            out["average"] = np.asarray((out["bgnbd"] + pareto) / 2.0, dtype=np.float64)
        return out

    def available(self, base: BaseModel) -> BaseModel:
        """``base`` when it can be computed, else BG/NBD alone."""
        return base if self.pareto_nbd is not None or base == "bgnbd" else "bgnbd"


@dataclass
class ModelFits:
    """Both models as fitted (or kept, or the prior), where each came from, why, and how long
    each fit took (seconds)."""

    bgnbd: BgNbdParams = PRIOR_BGNBD
    bgnbd_source: Source = "prior"
    pareto_nbd: ParetoNbdParams | None = None
    pareto_source: Source = "prior"
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def models(self) -> RetentionModels:
        return RetentionModels(bgnbd=self.bgnbd, pareto_nbd=self.pareto_nbd)


def fit_models(
    x: FloatArray,
    t_x: FloatArray,
    T: FloatArray,
    *,
    min_accounts: int,
    previous_bgnbd: BgNbdParams | None = None,
    previous_pareto: ParetoNbdParams | None = None,
) -> ModelFits:
    """Fit BG/NBD and Pareto/NBD to these accounts' histories, each starting from its last fit.

    Below ``min_accounts`` accounts nothing is fitted: the prior BG/NBD is used (and no
    Pareto/NBD). A fit that fails or does not converge keeps the previous one (or, without one,
    the prior for BG/NBD and nothing for Pareto/NBD); ``notes`` says what happened."""
    fits = ModelFits()
    if len(x) < min_accounts:
        fits.notes.append(f"{len(x)} accounts with orders, under the {min_accounts} needed")
        return fits
    rows, counts = np.unique(np.column_stack([x, t_x, T]), axis=0, return_counts=True)
    weights = counts.astype(np.float64)

    started = time.perf_counter()
    bgnbd: BgNbdParams | None
    try:
        bgnbd = fit_bgnbd(rows[:, 0], rows[:, 1], rows[:, 2], weights=weights, start=previous_bgnbd)
    except (InsufficientDataError, ValueError, FloatingPointError) as exc:
        fits.notes.append(f"BG/NBD fit failed: {exc}")
        bgnbd = None
    fits.seconds["bgnbd"] = round(time.perf_counter() - started, 4)
    if bgnbd is not None and bgnbd.converged:
        fits.bgnbd, fits.bgnbd_source = bgnbd, "fitted"
    else:
        if bgnbd is not None:
            fits.notes.append("BG/NBD fit did not converge")
        if previous_bgnbd is not None:
            fits.bgnbd, fits.bgnbd_source = previous_bgnbd, "previous fit"

    started = time.perf_counter()
    pareto: ParetoNbdParams | None
    try:
        pareto = fit_pareto_nbd(
            rows[:, 0], rows[:, 1], rows[:, 2], weights=weights, start=previous_pareto
        )
    except (InsufficientDataError, ValueError, FloatingPointError) as exc:
        fits.notes.append(f"Pareto/NBD fit failed: {exc}")
        pareto = None
    fits.seconds["pareto_nbd"] = round(time.perf_counter() - started, 4)
    if pareto is not None and pareto.converged:
        fits.pareto_nbd, fits.pareto_source = pareto, "fitted"
    else:
        if pareto is not None:
            fits.notes.append("Pareto/NBD fit did not converge")
        if previous_pareto is not None:
            fits.pareto_nbd, fits.pareto_source = previous_pareto, "previous fit"
    return fits


def choose_base(
    choice: Literal["auto", "average", "bgnbd", "pareto_nbd"],
    models: RetentionModels,
    layer_base: str | None,
) -> BaseModel:
    """The base the risk uses: the policy's fixed choice, else the replay's winner (when a
    replay applies), else the average of the two models; BG/NBD alone when Pareto/NBD is not
    available."""
    if choice != "auto":
        return models.available(choice)
    for base in BASE_MODELS:
        if base == layer_base:
            return models.available(base)
    return models.available("average")


@dataclass(frozen=True)
class LearnedLayer:
    """What the replay chose: the base model, the method and its fitted parts, and the evidence
    (every candidate's held-out Brier score; AUC, deciles and their largest error of the
    winner on the held-out half)."""

    base_model: BaseModel
    method: Method
    platt: PlattCalibration = IDENTITY_CALIBRATION
    signal_weights: dict[str, float] | None = None
    accounts: int = 0
    observed_no_purchase_rate: float = math.nan
    held_out_brier: dict[str, float] = field(default_factory=dict)
    auc: float = math.nan
    deciles: list[CalibrationBin] = field(default_factory=list)

    @property
    def max_decile_error(self) -> float:
        return max_decile_error(self.deciles)

    def apply(
        self,
        base_p: ArrayLike,
        signals: Mapping[str, ArrayLike],
        policy_weights: Mapping[str, float],
    ) -> FloatArray:
        """The final probability from this layer's base probability and the signals."""
        weights = self.signal_weights if self.signal_weights is not None else policy_weights
        adjusted, _ = adjust_log_odds(base_p, signals, weights)
        return apply_platt(adjusted, self.platt)


def learn_layer(
    bases: Mapping[BaseModel, FloatArray],
    signals: Mapping[str, FloatArray],
    policy_weights: Mapping[str, float],
    outcome: ArrayLike,
    codes: IntArray,
    *,
    allowed: Sequence[BaseModel],
) -> LearnedLayer | None:
    """Choose and fit the base model and calibration layer on a replay (see the module
    docstring). ``bases`` and ``signals`` are the accounts as they stood one horizon ago,
    ``outcome`` 1 where they then made no order, ``codes`` their ids (even ones fit, odd ones
    judge). None when the replay cannot tell: too few accounts, or one outcome only."""
    y = as_float_array(outcome, "outcome")
    candidates_bases = [b for b in allowed if b in bases]
    if not candidates_bases:
        return None
    known = np.isfinite(y)
    for b in candidates_bases:
        known &= np.isfinite(bases[b])
    if int(known.sum()) < MIN_LAYER_ACCOUNTS:
        return None
    y = y[known]
    if y.min() == y.max():
        return None
    base_of = {b: bases[b][known] for b in candidates_bases}
    signal_of = {k: np.asarray(v, dtype=np.float64)[known] for k, v in signals.items()}
    fit_half = np.asarray(codes)[known] % 2 == 0
    test_half = ~fit_half
    if fit_half.sum() < MIN_LAYER_ACCOUNTS // 2 or test_half.sum() < MIN_LAYER_ACCOUNTS // 4:
        return None
    if y[fit_half].min() == y[fit_half].max() or y[test_half].min() == y[test_half].max():
        return None

    def fitted(base: FloatArray, method: Method, rows: Any) -> LearnedLayer:
        if method == "policy":
            return LearnedLayer(base_model="bgnbd", method="policy")
        if method == "calibrated":
            adjusted, _ = adjust_log_odds(base, signal_of, policy_weights)
            return LearnedLayer(
                base_model="bgnbd", method=method, platt=fit_platt(adjusted[rows], y[rows])
            )
        weights = fit_signal_weights(
            base[rows], {k: v[rows] for k, v in signal_of.items()}, y[rows]
        )
        adjusted, _ = adjust_log_odds(base, signal_of, weights)
        return LearnedLayer(
            base_model="bgnbd",
            method=method,
            platt=fit_platt(adjusted[rows], y[rows]),
            signal_weights=weights,
        )

    scores: dict[str, float] = {}
    predictions: dict[tuple[BaseModel, Method], FloatArray] = {}
    for b in candidates_bases:
        for method in ("policy", "calibrated", "learned"):
            layer = fitted(base_of[b], method, fit_half)
            p = layer.apply(base_of[b], signal_of, policy_weights)
            predictions[(b, method)] = p
            scores[f"{b}/{method}"] = brier(p[test_half], y[test_half])
    best_base, best_method = min(predictions, key=lambda key: scores[f"{key[0]}/{key[1]}"])
    held_out = predictions[(best_base, best_method)][test_half]
    final = fitted(base_of[best_base], best_method, np.ones_like(fit_half))
    return LearnedLayer(
        base_model=best_base,
        method=best_method,
        platt=final.platt,
        signal_weights=final.signal_weights,
        accounts=int(y.size),
        observed_no_purchase_rate=float(y.mean()),
        held_out_brier=scores,
        auc=auc(held_out, y[test_half]),
        deciles=calibration_table(held_out, y[test_half]),
    )
