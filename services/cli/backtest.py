"""``kam backtest``: check the retention risk on a company's own order history.

The file is replayed up to a cutoff; the accounts are scored as the service would have scored them
that day (the same ``fit_bgnbd`` and ``assess_risk``, the same x, t_x, T, the default policy with
the chosen horizon), and the predicted probability of no order is compared with what happened in
the horizon after the cutoff, beside two naive baselines. Nothing after the cutoff reaches the
model; the outcome window must lie wholly inside the file.

What orders alone cannot tell (satisfaction, complaints, contacts, payments) is unknown, which the
risk treats as no evidence; the revenue-decline signal is computed from the file.

The baselines are scores, not probabilities. For their Brier score and calibration each is turned
into one by a one-feature logistic regression (Platt scaling of the feature) fitted at the earlier
cutoff ``cutoff - horizon``, whose outcome is known by the cutoff; without accounts at that
earlier date only their AUC is reported.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from numpy.typing import NDArray
from pydantic import ValidationError
from scipy import special

from services.scorer.engine import (
    DEFAULT_POLICY,
    CalibrationBin,
    RiskPolicy,
    ScoringPolicy,
    apply_platt,
    assess_base_risk,
    auc,
    behaviour_signals,
    brier,
    calibration_table,
    fit_platt,
    ordered_within,
    summarise_purchases,
)
from services.scorer.engine.arrays import FloatArray, IntArray
from services.scorer.engine.combined import (
    BASE_MODELS,
    MODEL_LABELS,
    LearnedLayer,
    ModelFits,
    Replay,
    choose_base,
    fit_models,
    learn_layer,
    max_decile_error,
    replays_back,
)
from services.scorer.engine.retention import MIN_CUSTOMERS

REQUIRED_COLUMNS = ("account_id", "date", "amount")
OPTIONAL_COLUMNS = ("cost",)


class BacktestError(Exception):
    """A problem with the input or the request, told to the user in one line (exit code 2)."""


# --------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transactions:
    """The file as columns: ``account`` codes index ``account_ids``; ``day`` is the calendar
    day as ``date.toordinal()``."""

    account: IntArray
    day: IntArray
    amount: FloatArray
    account_ids: list[str]

    @property
    def first_day(self) -> int:
        return int(self.day.min())

    @property
    def last_day(self) -> int:
        return int(self.day.max())


def parse_day(text: str) -> int:
    """The calendar day of an ISO date or datetime, as ``date.toordinal()``. A datetime with
    an offset is taken in UTC (as the service stores order times); one without, as written."""
    text = text.strip()
    if len(text) == 10:
        return date.fromisoformat(text).toordinal()
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.date().toordinal()


def _parse_amount(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _column_positions(header: list[str]) -> dict[str, int]:
    names = [name.strip().lower() for name in header]
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    expected = f"expected {', '.join(REQUIRED_COLUMNS)} and optionally cost"
    unknown = [name for name in names if name not in known]
    if unknown:
        raise BacktestError(f"unknown column(s) {', '.join(map(repr, unknown))} ({expected})")
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise BacktestError(f"missing column(s) {', '.join(missing)} ({expected})")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise BacktestError(f"column(s) named twice: {', '.join(repeated)}")
    return {name: names.index(name) for name in names}


def read_transactions(path: Path) -> Transactions:
    """Stream the CSV into compact columns (about 24 bytes per row). Every error names its
    line; blank lines are skipped."""
    from array import array

    accounts: dict[str, int] = {}
    # An export repeats few distinct dates: parse each once. Datetimes are nearly all distinct,
    # so they are parsed every time rather than cached (a cache would grow with the file).
    days_of: dict[str, int] = {}
    account, day, amount = array("q"), array("q"), array("d")
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise BacktestError(f"{path}: no such file") from None
    except OSError as exc:
        raise BacktestError(f"{path}: {exc.strerror or exc}") from None
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                raise BacktestError(f"{path}: the file is empty (expected a header line)")
            positions = _column_positions(header)
            width = len(header)
            account_at, date_at, amount_at = (positions[name] for name in REQUIRED_COLUMNS)
            cost_at = positions.get("cost")
            for row in reader:
                if not row:
                    continue
                line = reader.line_num
                if len(row) != width:
                    raise BacktestError(f"line {line}: {len(row)} fields, the header has {width}")
                account_id = row[account_at].strip()
                if not account_id:
                    raise BacktestError(f"line {line}: empty account_id")
                stamp = row[date_at]
                ordinal = days_of.get(stamp)
                if ordinal is None:
                    try:
                        ordinal = parse_day(stamp)
                    except ValueError:
                        raise BacktestError(
                            f"line {line}: unparsable date {stamp!r} (expected an ISO date such "
                            "as 2024-03-31 or a datetime such as 2024-03-31T14:05:00+01:00)"
                        ) from None
                    if len(stamp) <= 10:
                        days_of[stamp] = ordinal
                try:
                    value = _parse_amount(row[amount_at])
                except ValueError:
                    raise BacktestError(
                        f"line {line}: unparsable amount {row[amount_at]!r} (expected a number "
                        "such as 1234.50)"
                    ) from None
                if cost_at is not None and row[cost_at].strip():
                    try:
                        _parse_amount(row[cost_at])
                    except ValueError:
                        raise BacktestError(
                            f"line {line}: unparsable cost {row[cost_at]!r} (expected a number "
                            "or nothing)"
                        ) from None
                account.append(accounts.setdefault(account_id, len(accounts)))
                day.append(ordinal)
                amount.append(value)
        except csv.Error as exc:
            raise BacktestError(f"line {reader.line_num}: {exc}") from None
        except UnicodeDecodeError:
            raise BacktestError(f"{path}: not UTF-8 text") from None
    if not account:
        raise BacktestError(f"{path}: no transactions after the header")
    return Transactions(
        account=np.frombuffer(account, dtype=np.int64),
        day=np.frombuffer(day, dtype=np.int64),
        amount=np.frombuffer(amount, dtype=np.float64),
        account_ids=list(accounts),
    )


# --------------------------------------------------------------------------------------------
# The backtest
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreResult:
    """How one score did. ``probability`` is None for a baseline that could not be turned into
    one (then ``note`` says why and only the AUC is known)."""

    key: str
    label: str
    auc: float
    probability: FloatArray | None
    brier: float | None
    calibration: list[CalibrationBin] | None
    note: str | None = None
    max_decile_error: float | None = None


@dataclass(frozen=True)
class BacktestReport:
    """Everything the text and JSON reports show; ``account_ids`` and ``outcome`` align with each
    score's ``probability``."""

    source: str
    cutoff: date
    horizon_days: int
    occasion_window_days: int
    rows: int
    rows_to_cutoff: int
    accounts_in_file: int
    account_ids: list[str]
    outcome: FloatArray
    fits: ModelFits
    base_model: str
    layer: LearnedLayer | None
    layer_note: str
    baseline_fit: tuple[date, int] | None
    scores: list[ScoreResult]
    warnings: list[str]

    @property
    def horizon_end(self) -> date:
        return self.cutoff + timedelta(days=self.horizon_days)

    @property
    def no_purchase_rate(self) -> float:
        return float(self.outcome.mean())

    def as_dict(self) -> dict[str, Any]:
        """The JSON report: nan (e.g. an AUC with one outcome only) becomes null."""
        return {
            "file": self.source,
            "cutoff": self.cutoff.isoformat(),
            "horizon_days": self.horizon_days,
            "occasion_window_days": self.occasion_window_days,
            "outcome": {
                "event": "no order",
                "after": self.cutoff.isoformat(),
                "until": self.horizon_end.isoformat(),
            },
            "transactions": {"rows": self.rows, "rows_to_cutoff": self.rows_to_cutoff},
            "accounts": {
                "in_file": self.accounts_in_file,
                "scored": len(self.account_ids),
                "no_purchase_rate": self.no_purchase_rate,
            },
            "model": {
                "bgnbd": self.fits.bgnbd.as_dict(),
                "bgnbd_source": self.fits.bgnbd_source,
                "pareto_nbd": None
                if self.fits.pareto_nbd is None
                else self.fits.pareto_nbd.as_dict(),
                "pareto_nbd_source": self.fits.pareto_source,
                "fit_seconds": self.fits.seconds,
                "base_model": self.base_model,
                "learned_layer": None
                if self.layer is None
                else {
                    "base_model": self.layer.base_model,
                    "method": self.layer.method,
                    "slope": self.layer.platt.slope,
                    "intercept": self.layer.platt.intercept,
                    "signal_weights": self.layer.signal_weights,
                    "replay_accounts": self.layer.accounts,
                    "held_out_brier": self.layer.held_out_brier,
                },
                "learned_layer_note": self.layer_note,
                "signals_from_file": ["revenue_decline"],
                "signals_unknown": [
                    "satisfaction_drop",
                    "complaints_180d",
                    "contact_gap_ratio",
                    "late_payment_share",
                ],
            },
            "baseline_fit": None
            if self.baseline_fit is None
            else {"cutoff": self.baseline_fit[0].isoformat(), "accounts": self.baseline_fit[1]},
            "scores": {
                score.key: {
                    "label": score.label,
                    "auc": _finite(score.auc),
                    "brier": None if score.brier is None else _finite(score.brier),
                    "max_decile_error": None
                    if score.max_decile_error is None
                    else _finite(score.max_decile_error),
                    "mean_predicted": None
                    if score.probability is None
                    else float(score.probability.mean()),
                    "calibration": None
                    if score.calibration is None
                    else [b.as_dict() for b in score.calibration],
                    "note": score.note,
                }
                for score in self.scores
            },
            "warnings": self.warnings,
        }

    def as_text(self) -> str:
        p = self.fits.bgnbd
        q = self.fits.pareto_nbd
        accounts = len(self.account_ids)
        pareto = (
            "not fitted"
            if q is None
            else f"r={q.r:.3g} alpha={q.alpha:.3g} s={q.s:.3g} beta={q.beta:.3g} days "
            f"({self.fits.pareto_source})"
        )
        lines = [
            f"kam backtest: {self.source}",
            f"cutoff {self.cutoff}, horizon {self.horizon_days} days: the event is no order in "
            f"{self.cutoff + timedelta(days=1)} .. {self.horizon_end}",
            f"transactions: {self.rows:,} ({self.rows_to_cutoff:,} up to the cutoff); accounts: "
            f"{self.accounts_in_file:,} in the file, {accounts:,} with an order by the cutoff",
            f"buying occasions: orders within {self.occasion_window_days} days of an "
            "occasion's first order count once",
            f"BG/NBD r={p.r:.3g} alpha={p.alpha:.3g} days a={p.a:.3g} b={p.b:.3g} "
            f"({self.fits.bgnbd_source}); Pareto/NBD {pareto}",
            f"risk: base {MODEL_LABELS[self.base_model]}; {self.layer_note}; from the file: "
            "revenue decline; unknown: satisfaction, complaints, contacts, payments",
        ]
        if self.baseline_fit is not None:
            earlier, fitted_on = self.baseline_fit
            lines.append(
                f"baselines made probabilities by a one-feature logistic fitted at {earlier} "
                f"(cutoff - horizon) on {fitted_on:,} accounts"
            )
        lines.append("")
        width = 17
        lines.append(f"{'':22}" + "".join(f"{s.label:>{width}}" for s in self.scores))
        rows: list[tuple[str, list[str]]] = [
            ("AUC (higher better)", [_number(s.auc) for s in self.scores]),
            ("Brier (lower better)", [_number(s.brier) for s in self.scores]),
            ("max decile error", [_number(s.max_decile_error) for s in self.scores]),
            ("accounts", [f"{accounts:,}" for _ in self.scores]),
            ("no-order rate", [_number(self.no_purchase_rate) for _ in self.scores]),
            (
                "mean predicted",
                [
                    _number(None if s.probability is None else float(s.probability.mean()))
                    for s in self.scores
                ],
            ),
        ]
        for name, cells in rows:
            lines.append(f"{name:22}" + "".join(f"{cell:>{width}}" for cell in cells))
        rate = self.no_purchase_rate
        lines.append(
            f"(always predicting the no-order rate scores Brier {_number(rate * (1 - rate))}; "
            "AUC 0.5 is a coin toss)"
        )
        lines.append("")
        lines.append(
            "calibration: accounts in deciles of each score's predicted probability, "
            "mean predicted / observed no-order rate"
        )
        calibrated = [s for s in self.scores if s.calibration is not None]
        lines.append(f"{'decile':22}" + "".join(f"{s.label:>{width}}" for s in calibrated))
        deciles = max((len(s.calibration or []) for s in calibrated), default=0)
        for index in range(deciles):
            cells = []
            for score in calibrated:
                table = score.calibration or []
                bin_ = table[index] if index < len(table) else None
                cells.append(
                    "" if bin_ is None else f"{bin_.mean_predicted:.3f} / {bin_.observed_rate:.3f}"
                )
            lines.append(f"{index + 1:<22}" + "".join(f"{cell:>{width}}" for cell in cells))
        notes = [f"{s.label}: {s.note}" for s in self.scores if s.note]
        if notes or self.warnings:
            lines.append("")
        lines.extend(f"note: {note}" for note in notes)
        lines.extend(f"warning: {warning}" for warning in self.warnings)
        return "\n".join(lines) + "\n"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _number(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _day(ordinal: int) -> date:
    return date.fromordinal(ordinal)


def _risk_policy(horizon_days: int) -> RiskPolicy:
    try:
        return RiskPolicy.model_validate(
            {**DEFAULT_POLICY.risk.model_dump(), "horizon_days": horizon_days}
        )
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"]
        reason = reason[:1].lower() + reason[1:]
        raise BacktestError(f"--horizon-days {horizon_days}: {reason}") from None


def _check_window(transactions: Transactions, cutoff: int, horizon_days: int) -> None:
    first, last = transactions.first_day, transactions.last_day
    span = f"the file runs from {_day(first)} to {_day(last)}"
    if cutoff < first:
        raise BacktestError(f"--cutoff {_day(cutoff)} is before the data ({span})")
    if cutoff >= last:
        raise BacktestError(f"--cutoff {_day(cutoff)} leaves no data after it ({span})")
    if cutoff + horizon_days > last:
        # Accounts that would order after the file ends would count as lost: refuse.
        latest = _day(last - horizon_days)
        raise BacktestError(
            f"the horizon ends on {_day(cutoff + horizon_days)} but {span}: the outcome would "
            f"be wrong; use --cutoff {latest} or earlier, or a shorter --horizon-days"
        )


def _baseline_features(
    days_since_last_order: FloatArray, order_days: FloatArray
) -> list[tuple[str, str, FloatArray]]:
    """Each baseline as a feature that grows with the risk: log keeps a one-feature logistic
    close to the shape of either (the tenth order tells less than the second)."""
    return [
        ("days_since_last_order", "days since last", np.log1p(days_since_last_order)),
        ("order_count", "order count", -np.log(order_days)),
    ]


def _as_score(feature: FloatArray) -> FloatArray:
    # expit is monotone, so the ranking (the AUC) is the feature's own, and fit_platt's
    # logistic of the outcome on logit(expit(feature)) = feature is the one-feature logistic.
    return np.asarray(special.expit(feature), dtype=np.float64)


def backtest(
    transactions: Transactions,
    *,
    cutoff: date,
    horizon_days: int,
    source: str = "",
    policy: ScoringPolicy | None = None,
) -> BacktestReport:
    """Score every account with an order by ``cutoff`` from the data up to it, as the service
    would (``policy``, the default one, with the chosen horizon), and compare with whether it
    ordered in the ``horizon_days`` after it.

    As in the portfolio pass: the orders are counted in buying occasions of the policy's
    window; BG/NBD and Pareto/NBD are fitted at the cutoff (below the policy's minimum of
    accounts, the prior is used); and when the file covers more than two horizons before the
    cutoff, the layer is learned on a replay one horizon back (models fitted then, outcomes up
    to the cutoff) and applied at the cutoff."""
    risk = _risk_policy(horizon_days)
    policy = (policy or DEFAULT_POLICY).model_copy(update={"risk": risk})
    cut = cutoff.toordinal()
    _check_window(transactions, cut, horizon_days)
    columns = (transactions.account, transactions.day, transactions.amount)
    accounts = len(transactions.account_ids)
    window = policy.risk.occasion_window_days
    minimum = policy.population.min_fit_accounts

    summary = summarise_purchases(
        *columns, accounts=accounts, as_of=cut, occasion_window_days=window
    )
    scope = summary.has_orders
    if int(scope.sum()) < MIN_CUSTOMERS:
        raise BacktestError(
            f"too few accounts to fit the risk model by {cutoff}: {int(scope.sum())} with an "
            f"order, at least {MIN_CUSTOMERS} needed"
        )
    x, t_x, age = (v[scope] for v in (summary.frequency, summary.recency, summary.age))
    fits = fit_models(x, t_x, age, min_accounts=minimum)
    models = fits.models
    bases = models.bases(summary.frequency, summary.recency, summary.age, float(horizon_days))
    signals = behaviour_signals(summary.behaviour_facts(), policy.risk)
    ordered = ordered_within(*columns, accounts=accounts, after=cut, until=cut + horizon_days)
    outcome = (~ordered[scope]).astype(np.float64)

    earlier = cut - horizon_days
    layer, layer_note = _replay_layer(transactions, policy, cut=cut, fits=fits)
    base_name = choose_base(policy.risk.model, models, None if layer is None else layer.base_model)
    if layer is not None:
        final = layer.apply(bases[base_name], signals, policy.risk.signal_weights.model_dump())
    else:
        final = assess_base_risk(
            bases[base_name], summary.behaviour_facts(), policy.risk
        ).probability

    scores = [_probability_score("model", "model", final[scope], outcome)]
    for name in BASE_MODELS:
        if name in bases:
            label = {"bgnbd": "BG/NBD", "pareto_nbd": "Pareto/NBD", "average": "combined"}[name]
            scores.append(_probability_score(name, label, bases[name][scope], outcome))

    # Baselines: fit feature -> probability at the earlier cutoff, whose outcome window
    # (earlier, cut] is known on the cutoff day, then apply at the cutoff.
    before = summarise_purchases(
        *columns, accounts=accounts, as_of=earlier, occasion_window_days=window
    )
    earlier_scope = before.has_orders
    earlier_outcome = (
        ~ordered_within(*columns, accounts=accounts, after=earlier, until=cut)[earlier_scope]
    ).astype(np.float64)
    earlier_features = dict(
        (key, feature[earlier_scope])
        for key, _, feature in _baseline_features(before.days_since_last_order, before.order_days)
    )
    reason = _no_baseline_fit_reason(earlier_outcome, _day(earlier))
    for key, label, feature in _baseline_features(
        summary.days_since_last_order, summary.order_days
    ):
        score = _as_score(feature[scope])
        if reason is not None:
            scores.append(
                ScoreResult(key, label, auc(score, outcome), None, None, None, note=reason)
            )
            continue
        calibration = fit_platt(_as_score(earlier_features[key]), earlier_outcome)
        scores.append(_probability_score(key, label, apply_platt(score, calibration), outcome))

    warnings = list(fits.notes)
    if fits.bgnbd_source == "prior":
        warnings.append(
            f"fewer than {minimum} accounts with orders (the policy's minimum): the service "
            "would use the prior purchase model, as here"
        )
    if outcome.min() == outcome.max():
        warnings.append(
            "every account had the same outcome, so no score can rank them (AUC is n/a)"
        )
    day_mask = transactions.day <= cut
    return BacktestReport(
        source=source,
        cutoff=cutoff,
        horizon_days=horizon_days,
        occasion_window_days=window,
        rows=len(transactions.day),
        rows_to_cutoff=int(day_mask.sum()),
        accounts_in_file=accounts,
        account_ids=[transactions.account_ids[i] for i in np.flatnonzero(scope)],
        outcome=outcome,
        fits=fits,
        base_model=base_name,
        layer=layer,
        layer_note=layer_note,
        baseline_fit=None if reason is not None else (_day(earlier), len(earlier_outcome)),
        scores=scores,
        warnings=warnings,
    )


def _replay(
    transactions: Transactions, policy: ScoringPolicy, *, then: int, fits: ModelFits
) -> Replay | None:
    """The accounts as they stood at day ``then`` (models fitted on them then) and whether they
    ordered in the horizon after it; None when too few accounts had history then."""
    columns = (transactions.account, transactions.day, transactions.amount)
    accounts = len(transactions.account_ids)
    horizon = policy.risk.horizon_days
    before = summarise_purchases(
        *columns,
        accounts=accounts,
        as_of=then,
        occasion_window_days=policy.risk.occasion_window_days,
    )
    scope = before.has_orders
    x, t_x, age = (v[scope] for v in (before.frequency, before.recency, before.age))
    then_fits = fit_models(
        x,
        t_x,
        age,
        min_accounts=policy.population.min_fit_accounts,
        previous_bgnbd=fits.bgnbd,
        previous_pareto=fits.pareto_nbd,
    )
    if then_fits.bgnbd_source == "prior":
        return None
    signals = behaviour_signals(before.behaviour_facts(), policy.risk)
    ordered = ordered_within(*columns, accounts=accounts, after=then, until=then + horizon)
    return Replay(
        bases=then_fits.models.bases(x, t_x, age, float(horizon)),
        signals={name: values[scope] for name, values in signals.items()},
        outcome=(~ordered[scope]).astype(np.float64),
        codes=np.flatnonzero(scope),
    )


def _replay_layer(
    transactions: Transactions, policy: ScoringPolicy, *, cut: int, fits: ModelFits
) -> tuple[LearnedLayer | None, str]:
    """The layer the portfolio pass would use at ``cut``: learned on replays one horizon
    earlier and, history allowing, further back (``replays_back``), as ``learn_layer`` does;
    None (and why) when the file does not cover more than two horizons before ``cut``."""
    horizon = policy.risk.horizon_days
    covered = cut - transactions.first_day
    if covered <= 2 * horizon:
        return None, (
            f"no learned layer: the file covers {covered} days before the cutoff, not more "
            f"than two horizons ({2 * horizon})"
        )
    if fits.bgnbd_source == "prior":
        return None, "no learned layer: too few accounts to fit the models"
    recent = _replay(transactions, policy, then=cut - horizon, fits=fits)
    earlier = [
        replay
        for back in range(2, replays_back(covered, horizon) + 1)
        if (replay := _replay(transactions, policy, then=cut - back * horizon, fits=fits))
        is not None
    ]
    if recent is None:
        return None, "no learned layer: too few accounts with history one horizon before"
    layer = learn_layer(
        recent,
        policy.risk.signal_weights.model_dump(),
        allowed=list(BASE_MODELS) if policy.risk.model == "auto" else [policy.risk.model],
        earlier=earlier,
    )
    if layer is None:
        return None, "no learned layer: too few accounts, or one outcome only, one horizon before"
    chosen = layer.held_out_brier[f"{layer.base_model}/{layer.method}"]
    return layer, (
        f"learned layer: {layer.method} on {MODEL_LABELS[layer.base_model]}, chosen on "
        f"replays before {_day(cut - horizon)} ({layer.judged_on}, Brier {chosen:.4f}), "
        f"fitted on {layer.accounts:,} accounts"
    )


def _no_baseline_fit_reason(earlier_outcome: NDArray[np.float64], earlier: date) -> str | None:
    if len(earlier_outcome) < MIN_CUSTOMERS:
        return (
            f"AUC only: {len(earlier_outcome)} account(s) had ordered by {earlier} "
            f"(cutoff - horizon), fewer than {MIN_CUSTOMERS} to learn how the score maps to "
            "a probability without looking past the cutoff"
        )
    if earlier_outcome.min() == earlier_outcome.max():
        return (
            f"AUC only: the accounts of {earlier} (cutoff - horizon) all had the same outcome "
            "by the cutoff, nothing to learn a probability from"
        )
    return None


def _probability_score(
    key: str, label: str, probability: FloatArray, outcome: FloatArray
) -> ScoreResult:
    table = calibration_table(probability, outcome, bins=10)
    return ScoreResult(
        key=key,
        label=label,
        auc=auc(probability, outcome),
        probability=probability,
        brier=brier(probability, outcome),
        calibration=table,
        max_decile_error=max_decile_error(table),
    )


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _parse_cutoff(text: str) -> date:
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise BacktestError(
            f"--cutoff {text!r} is not a date (expected an ISO date such as 2024-06-30)"
        ) from None


def run_backtest(
    *,
    orders: str,
    cutoff: str,
    horizon_days: int,
    as_json: bool,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """The ``kam backtest`` command: the report on ``out``; an input problem as one line on
    ``err`` with exit code 2."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        cutoff_day = _parse_cutoff(cutoff)
        _risk_policy(horizon_days)  # a bad horizon is told before a long read
        transactions = read_transactions(Path(orders))
        report = backtest(transactions, cutoff=cutoff_day, horizon_days=horizon_days, source=orders)
    except BacktestError as exc:
        print(f"kam backtest: error: {exc}", file=err)
        return 2
    if as_json:
        json.dump(report.as_dict(), out, indent=2, allow_nan=False)
        out.write("\n")
    else:
        out.write(report.as_text())
    return 0
