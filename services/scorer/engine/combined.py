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
  calibrated (``learned``). With more than three horizons the candidates are fitted on a replay
  two horizons back and judged (Brier score) on the replay one horizon back: a layer must carry
  over to the next period, so a calibration that held for one season only is not kept. With
  less, they are fitted on the accounts of even id and judged on the odd ones. The winner is
  refitted on the latest replay and used from then on.

``learn_layer`` is pure: the portfolio pass and ``kam backtest`` call it the same way, so the
backtest shows what the service would show.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

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
    columns = (rows[:, 0], rows[:, 1], rows[:, 2])
    weights = counts.astype(np.float64)
    bgnbd = _fit_one(
        "bgnbd", lambda: fit_bgnbd(*columns, weights=weights, start=previous_bgnbd), fits
    )
    if bgnbd is not None:
        fits.bgnbd, fits.bgnbd_source = bgnbd, "fitted"
    elif previous_bgnbd is not None:
        fits.bgnbd, fits.bgnbd_source = previous_bgnbd, "previous fit"
    pareto = _fit_one(
        "pareto_nbd", lambda: fit_pareto_nbd(*columns, weights=weights, start=previous_pareto), fits
    )
    if pareto is not None:
        fits.pareto_nbd, fits.pareto_source = pareto, "fitted"
    elif previous_pareto is not None:
        fits.pareto_nbd, fits.pareto_source = previous_pareto, "previous fit"
    return fits


_Params = TypeVar("_Params", BgNbdParams, ParetoNbdParams)


def _fit_one(name: BaseModel, fit: Callable[[], _Params], fits: ModelFits) -> _Params | None:
    """Run one model's fit, timed into ``fits.seconds``; the converged parameters, or None with
    the reason in ``fits.notes``."""
    started = time.perf_counter()
    try:
        params = fit()
    except (InsufficientDataError, ValueError, FloatingPointError) as exc:
        fits.notes.append(f"{MODEL_LABELS[name]} fit failed: {exc}")
        return None
    finally:
        fits.seconds[name] = round(time.perf_counter() - started, 4)
    if not params.converged:
        fits.notes.append(f"{MODEL_LABELS[name]} fit did not converge")
        return None
    return params


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
    judged_on: str = ""
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


@dataclass(frozen=True)
class Replay:
    """Accounts as they stood at an earlier cutoff (each base model's probability and the
    behavioural signals then) and what they did in the horizon after it (``outcome`` 1: no
    order), with their ids (``codes``)."""

    bases: Mapping[BaseModel, FloatArray]
    signals: Mapping[str, FloatArray]
    outcome: FloatArray
    codes: IntArray

    def usable(self, allowed: Sequence[BaseModel]) -> Replay | None:
        """The accounts every allowed base can score; None when too few, or one outcome only."""
        candidates = [b for b in allowed if b in self.bases]
        if not candidates:
            return None
        y = as_float_array(self.outcome, "outcome")
        known = np.isfinite(y)
        for b in candidates:
            known &= np.isfinite(self.bases[b])
        if int(known.sum()) < MIN_LAYER_ACCOUNTS or y[known].min() == y[known].max():
            return None
        return Replay(
            bases={b: np.asarray(self.bases[b])[known] for b in candidates},
            signals={k: np.asarray(v, dtype=np.float64)[known] for k, v in self.signals.items()},
            outcome=y[known],
            codes=np.asarray(self.codes)[known],
        )

    def take(self, rows: np.ndarray[Any, np.dtype[np.bool_]]) -> Replay:
        return Replay(
            bases={b: v[rows] for b, v in self.bases.items()},
            signals={k: v[rows] for k, v in self.signals.items()},
            outcome=self.outcome[rows],
            codes=self.codes[rows],
        )


def _fit_method(
    replay: Replay, base: BaseModel, method: Method, policy_weights: Mapping[str, float]
) -> LearnedLayer:
    p, y = replay.bases[base], replay.outcome
    if method == "policy":
        return LearnedLayer(base_model=base, method="policy")
    if method == "calibrated":
        adjusted, _ = adjust_log_odds(p, replay.signals, policy_weights)
        return LearnedLayer(base_model=base, method=method, platt=fit_platt(adjusted, y))
    weights = fit_signal_weights(p, replay.signals, y)
    adjusted, _ = adjust_log_odds(p, replay.signals, weights)
    return LearnedLayer(
        base_model=base, method=method, platt=fit_platt(adjusted, y), signal_weights=weights
    )


MAX_REPLAY_DAYS = 366


def replays_back(history_days: float, horizon_days: int) -> int:
    """How many replays (one horizon apart, going back from one horizon before now) the layer
    is learned on: as many as fit in the history with a horizon of it before the oldest, and
    no further back than about a year (the seasons, not the distant past). 0: no replay."""
    fits = int(history_days // horizon_days) - 1
    within_year = max(1, int(MAX_REPLAY_DAYS // horizon_days))
    return max(0, min(fits, within_year))


def _joined(first: Replay, second: Replay) -> Replay:
    bases = [b for b in first.bases if b in second.bases]
    return Replay(
        bases={b: np.concatenate([first.bases[b], second.bases[b]]) for b in bases},
        signals={k: np.concatenate([first.signals[k], second.signals[k]]) for k in first.signals},
        outcome=np.concatenate([first.outcome, second.outcome]),
        codes=np.concatenate([first.codes, second.codes]),
    )


def learn_layer(
    recent: Replay,
    policy_weights: Mapping[str, float],
    *,
    allowed: Sequence[BaseModel],
    earlier: Sequence[Replay] = (),
) -> LearnedLayer | None:
    """Choose and fit the base model and the layer on replays of history (see the module
    docstring); None when the replays cannot tell (too few accounts, one outcome only).

    With ``earlier`` replays (further back, up to a year), every candidate is fitted on them
    and judged on the ``recent`` one: what is chosen is what carried over to the next period.
    Without, the candidates are fitted on the recent replay's accounts of even id and judged on
    the odd ones. The winner is refitted on every replay given, so that a layer averages over
    the seasons the replays cover instead of carrying one season's level into the next."""
    now = recent.usable(allowed)
    if now is None:
        return None
    usable = [r for r in (e.usable(allowed) for e in earlier) if r is not None]
    before = None
    for replay in usable:
        before = replay if before is None else _joined(before, replay)
    bases = [b for b in allowed if b in now.bases and (before is None or b in before.bases)]
    if before is not None:
        fit_on, judge = before, now
    else:
        even = now.codes % 2 == 0
        fit_on, judge = now.take(even), now.take(~even)
        if (
            len(judge.outcome) < MIN_LAYER_ACCOUNTS // 4
            or fit_on.outcome.min() == fit_on.outcome.max()
            or judge.outcome.min() == judge.outcome.max()
        ):
            return None
    scores: dict[str, float] = {}
    predictions: dict[tuple[BaseModel, Method], FloatArray] = {}
    methods: tuple[Method, ...] = ("policy", "calibrated", "learned")
    for b in bases:
        for method in methods:
            layer = _fit_method(fit_on, b, method, policy_weights)
            p = layer.apply(judge.bases[b], judge.signals, policy_weights)
            predictions[(b, method)] = p
            scores[f"{b}/{method}"] = brier(p, judge.outcome)
    best_base, best_method = min(predictions, key=lambda key: scores[f"{key[0]}/{key[1]}"])
    judged = predictions[(best_base, best_method)]
    # Refitted on every period: a layer of one season is not applied to the next (measured on
    # a seasonal log: a 91-day layer refitted on the summer replay alone was off by 0.09 in one
    # decile in the autumn; see the README's backtest figures for the pooled one).
    final = _fit_method(
        now if before is None else _joined(before, now), best_base, best_method, policy_weights
    )
    return LearnedLayer(
        base_model=best_base,
        method=best_method,
        platt=final.platt,
        signal_weights=final.signal_weights,
        accounts=len(now.outcome) + (0 if before is None else len(before.outcome)),
        observed_no_purchase_rate=float(now.outcome.mean()),
        held_out_brier=scores,
        judged_on="next period" if before is not None else "held-out accounts",
        auc=auc(judged, judge.outcome),
        deciles=calibration_table(judged, judge.outcome),
    )
