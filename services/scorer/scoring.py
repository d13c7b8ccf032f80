"""Scoring with the database: load features in SQL, call the engine, store the results.

- ``run_portfolio_pass``: refit the population facts (percentiles, the 80/20 curve, the
  retention model and, when history allows, its calibration), then rescore every account in
  chunks, each chunk one transaction.
- ``rescore_accounts``: a few dirty accounts against the stored population facts.
- ``preview_policy``: what a draft policy would change, in a read-only transaction.

Every rescore writes a snapshot per account; a tier change also writes a ``tier_changes`` row
with the next per-account sequence number, in the same transaction, under a row lock on the
account so that a rescore and the pass never race for one sequence number.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from services.scorer.engine import (
    IDENTITY_CALIBRATION,
    BgNbdParams,
    InsufficientDataError,
    PlattCalibration,
    PopulationPercentiles,
    ScoringPolicy,
    adjust_log_odds,
    apply_hysteresis,
    apply_override,
    apply_platt,
    assess_risk,
    auc,
    brier,
    calibration_table,
    cumulative_profit_share,
    decide_tier,
    explain_risk,
    explain_tier,
    explain_value,
    fit_bgnbd,
    fit_platt,
    fit_signal_weights,
    override_active,
    population_percentiles,
    score_breakdown,
)
from services.scorer.engine.arrays import FloatArray
from services.scorer.features import (
    FeatureTable,
    build_feature_table,
    load_aggregates,
    load_features,
    store_aggregates,
)
from services.scorer.policies import LOCK_NAMESPACE, active_policy
from services.scorer.webhook_events import record_account_events
from shared.enums import RiskBand, Tier
from shared.models import PopulationFit
from shared.schemas import BandMove, PolicyPreview, TierMove

log = structlog.get_logger(__name__)

PASS_CHUNK = 1000
REPLAY_EVERY = timedelta(hours=24)
# The pass writes a snapshot when something a reader would notice moved, and at least daily:
# each account at the pass in its hour of the day (its id modulo 24, UTC), so the daily
# snapshots spread over the day's passes instead of all falling into one.
SNAPSHOT_EVERY = timedelta(hours=24)
SNAPSHOT_SLOTS = 24
SNAPSHOT_SCORE_STEP = 1.0
SNAPSHOT_RISK_STEP = 0.02
PORTFOLIO_PASS_LOCK = 2
FIRST_POPULATION_LOCK = 3
# An uninformed but plausible purchase process (an order every ~45 days, ~8% chance of dropping
# out after each), used until the portfolio has enough history to fit its own.
PRIOR_BGNBD = BgNbdParams(r=1.0, alpha=45.0, a=0.5, b=6.0, converged=False)
MIN_CALIBRATION_ACCOUNTS = 200
CURVE_POINTS = 1001


# --------------------------------------------------------------------------------------------
# Population facts
# --------------------------------------------------------------------------------------------


class _Facts(BaseModel):
    # Stored JSON: a field an older or newer version wrote and this one does not know is ignored.
    model_config = ConfigDict(extra="ignore", frozen=True)


class ProfitCurve(_Facts):
    """The 80/20 curve sampled: gross profit (descending) and the share of total profit brought
    by accounts at or above it; a single rescore places an account on it by interpolation."""

    gross_profit: list[float]
    share: list[float]

    def place(self, gross_profit: FloatArray) -> FloatArray:
        profit = np.nan_to_num(gross_profit, nan=0.0)
        if not self.gross_profit:
            return np.ones_like(profit)
        # np.interp needs ascending x: walk the curve from the smallest profit up.
        xs = np.asarray(self.gross_profit[::-1])
        ys = np.asarray(self.share[::-1])
        placed = np.interp(profit, xs, ys, left=1.0, right=float(ys[-1]))
        return np.asarray(np.where(profit <= 0, 1.0, placed), dtype=np.float64)


class Calibration(_Facts):
    """What the replay of history at ``cutoff`` showed, and what the service uses from it.

    Three ways to turn the model into a probability are fitted on the even account ids and
    compared on the odd ones (Brier score): ``policy`` (BG/NBD shifted by the policy's signal
    weights, as is), ``calibrated`` (the same, Platt-calibrated) and ``learned`` (signal weights
    learned from the outcomes on top of BG/NBD, then Platt-calibrated). The winner is refitted on
    all accounts; ``used`` is False when the policy's own model won (nothing is changed).
    ``held_out_brier`` has every method's score, ``auc`` and ``deciles`` are the winner's on the
    held-out half."""

    used: bool
    method: Literal["policy", "calibrated", "learned"] = "policy"
    slope: float = 1.0
    intercept: float = 0.0
    signal_weights: dict[str, float] | None = None
    cutoff: datetime | None = None
    accounts: int = 0
    observed_no_purchase_rate: float | None = None
    auc: float | None = None
    held_out_brier: dict[str, float] = {}
    deciles: list[dict[str, float | int]] = []
    reason: str | None = None
    weights_basis: dict[str, float] | None = None  # the policy's signal weights replayed

    def applies(self, horizon_days: int, fitted_for: int) -> bool:
        return self.used and horizon_days == fitted_for

    def platt(self, horizon_days: int, fitted_for: int) -> PlattCalibration:
        if not self.applies(horizon_days, fitted_for):
            return IDENTITY_CALIBRATION
        return PlattCalibration(slope=self.slope, intercept=self.intercept)

    def weights(self, horizon_days: int, fitted_for: int) -> dict[str, float] | None:
        if not self.applies(horizon_days, fitted_for):
            return None
        return self.signal_weights


class PopulationFacts(_Facts):
    """Everything a single rescore needs to know about the population (the stored JSON)."""

    percentiles: PopulationPercentiles
    profit_curve: ProfitCurve
    bgnbd: dict[str, float | int | bool | None]
    bgnbd_source: str  # "fitted", "previous fit" or "prior"
    reference_p: float
    horizon_days: int
    calibration: Calibration

    def params(self) -> BgNbdParams:
        return BgNbdParams.from_dict(self.bgnbd)


def _profit_curve(gross_profit: FloatArray) -> ProfitCurve:
    profit = np.sort(np.clip(np.nan_to_num(gross_profit, nan=0.0), 0.0, None))[::-1]
    profit = profit[profit > 0]
    if profit.size == 0:
        return ProfitCurve(gross_profit=[], share=[])
    share = np.cumsum(profit) / profit.sum()
    picks = np.unique(np.linspace(0, profit.size - 1, min(CURVE_POINTS, profit.size)).astype(int))
    return ProfitCurve(
        gross_profit=[float(v) for v in profit[picks]], share=[float(v) for v in share[picks]]
    )


def _purchase_history(table: FeatureTable) -> tuple[FloatArray, FloatArray, FloatArray]:
    c = table.columns
    return c["x"], c["t_x"], c["T"]


def _fit_retention(table: FeatureTable, previous: BgNbdParams | None) -> tuple[BgNbdParams, str]:
    """Fit BG/NBD to the active accounts with orders; keep the previous fit (or the prior) when
    the data cannot identify the model."""
    usable = table.has_orders & ~table.lost
    x, t_x, T = (column[usable] for column in _purchase_history(table))
    if x.size:
        rows, counts = np.unique(np.column_stack([x, t_x, np.floor(T)]), axis=0, return_counts=True)
        try:
            params = fit_bgnbd(rows[:, 0], rows[:, 1], rows[:, 2], weights=counts, start=previous)
        except InsufficientDataError as exc:
            log.info("retention_fit_skipped", reason=str(exc))
        else:
            if params.converged:
                return params, "fitted"
            log.info("retention_fit_not_converged", params=params.as_dict())
    if previous is not None:
        return previous, "previous fit"
    return PRIOR_BGNBD, "prior"


def _risk(
    table: FeatureTable,
    params: BgNbdParams,
    policy: ScoringPolicy,
    *,
    calibration: PlattCalibration,
    reference_p: float,
    signal_weights: dict[str, float] | None = None,
) -> tuple[FloatArray, Any]:
    x, t_x, T = _purchase_history(table)
    assessment = assess_risk(
        params,
        x,
        t_x,
        T,
        table.behaviour(),
        policy.risk,
        calibration=calibration,
        signal_weights=signal_weights,
        reference_p=reference_p,
    )
    probability = np.where(table.lost, np.nan, assessment.probability)
    return np.asarray(probability, dtype=np.float64), assessment


def _replay_calibration(
    then: FeatureTable,
    now: FeatureTable,
    policy: ScoringPolicy,
    previous: BgNbdParams | None,
) -> Calibration:
    """Score the accounts as they stood one horizon ago, compare with what they did since, and
    keep a calibration (or learned signal weights) only where it predicts held-out accounts
    better than the policy's model as is."""
    cutoff = then.as_of
    scored = then.has_orders & ~then.lost
    if int(scored.sum()) < MIN_CALIBRATION_ACCOUNTS:
        return Calibration(used=False, cutoff=cutoff, reason="too few accounts with history")
    params, _ = _fit_retention(then, previous)
    probability, assessment = _risk(
        then, params, policy, calibration=IDENTITY_CALIBRATION, reference_p=0.5
    )
    ids = then.account_id[scored]
    p = probability[scored]
    base = assessment.base_p[scored]
    signals = {name: values[scored] for name, values in assessment.signals.items()}
    position = np.clip(np.searchsorted(now.account_id, ids), 0, max(len(now) - 1, 0))
    found = now.account_id[position] == ids
    last_gap = now.columns["days_since_last_order"][position]
    horizon = float(policy.risk.horizon_days)
    # No order in (cutoff, now] <=> the last order as of now is at least a horizon old.
    outcome = np.where(found, ~(last_gap < horizon), True).astype(np.float64)
    keep = np.isfinite(p) & np.isfinite(base)
    ids, p, base, outcome = ids[keep], p[keep], base[keep], outcome[keep]
    signals = {name: values[keep] for name, values in signals.items()}
    if p.size < MIN_CALIBRATION_ACCOUNTS or outcome.min() == outcome.max():
        return Calibration(used=False, cutoff=cutoff, reason="outcomes do not vary")

    def learned(fit: np.ndarray[Any, np.dtype[np.bool_]]) -> tuple[dict[str, float], Any]:
        weights = fit_signal_weights(
            base[fit], {k: v[fit] for k, v in signals.items()}, outcome[fit]
        )
        adjusted, _ = adjust_log_odds(base, signals, weights)
        return weights, (adjusted, fit_platt(adjusted[fit], outcome[fit]))

    fit_half, test_half = ids % 2 == 0, ids % 2 == 1
    platt = fit_platt(p[fit_half], outcome[fit_half])
    weights, (adjusted, learned_platt) = learned(fit_half)
    candidates = {
        "policy": p,
        "calibrated": apply_platt(p, platt),
        "learned": apply_platt(adjusted, learned_platt),
    }
    scores = {name: brier(q[test_half], outcome[test_half]) for name, q in candidates.items()}
    method = min(scores, key=lambda name: scores[name])
    held_out = candidates[method][test_half]
    summary = {
        "cutoff": cutoff,
        "accounts": int(p.size),
        "observed_no_purchase_rate": float(outcome.mean()),
        "auc": auc(held_out, outcome[test_half]),
        "held_out_brier": scores,
        "deciles": [b.as_dict() for b in calibration_table(held_out, outcome[test_half])],
    }
    everyone = np.ones_like(fit_half)
    if method == "calibrated":
        final = fit_platt(p, outcome)
        return Calibration(
            used=True,
            method="calibrated",
            slope=final.slope,
            intercept=final.intercept,
            **summary,
        )
    if method == "learned":
        weights, (_, final) = learned(everyone)
        return Calibration(
            used=True,
            method="learned",
            slope=final.slope,
            intercept=final.intercept,
            signal_weights=weights,
            **summary,
        )
    return Calibration(
        used=False, reason="the policy's model predicted held-out accounts best", **summary
    )


def _logit(p: FloatArray) -> FloatArray:
    clipped = np.clip(p, 1e-9, 1 - 1e-9)
    return np.asarray(np.log(clipped / (1.0 - clipped)), dtype=np.float64)


async def latest_population(session: AsyncSession) -> PopulationFacts | None:
    facts = await session.scalar(
        select(PopulationFit.facts).order_by(PopulationFit.id.desc()).limit(1)
    )
    if facts is None:
        return None
    try:
        return PopulationFacts.model_validate(facts)
    except ValidationError as exc:
        # Facts in a shape this version cannot read are as good as none: they get refitted.
        log.warning("population_facts_unreadable", errors=exc.error_count())
        return None


async def fit_population(
    session: AsyncSession,
    *,
    table: FeatureTable,
    policy: ScoringPolicy,
    previous: PopulationFacts | None,
) -> PopulationFacts:
    """The population facts from every account's features as of ``table.as_of`` (plus, when the
    stored history covers more than two horizons, a replay one horizon back)."""
    active = ~table.lost
    share = cumulative_profit_share(np.where(active, table.columns["gross_profit_12m"], 0.0))
    percentiles = population_percentiles(table.take(active).value_features(share[active]))
    previous_params = previous.params() if previous and previous.bgnbd_source != "prior" else None
    params, source = _fit_retention(table, previous_params)

    horizon_days = policy.risk.horizon_days
    first_order_age = table.columns["T"][table.has_orders]
    history_days = float(first_order_age.max()) if first_order_age.size else 0.0
    weights_basis = policy.risk.signal_weights.model_dump()
    reusable = (
        previous is not None
        and previous.calibration.cutoff is not None
        and previous.horizon_days == horizon_days
        and previous.calibration.weights_basis == weights_basis
        and previous.calibration.cutoff + timedelta(days=horizon_days) > table.as_of - REPLAY_EVERY
    )
    if history_days > 2 * horizon_days and reusable:
        # The replay looks a horizon back; an hour more of history changes little, and it costs
        # a second full feature aggregation. It is redone daily, or when the policy's risk
        # settings change.
        assert previous is not None
        calibration = previous.calibration
    elif history_days > 2 * horizon_days:
        cutoff = table.as_of - timedelta(days=horizon_days)
        then = await load_features(session, as_of=cutoff)
        calibration = _replay_calibration(then, table, policy, previous_params).model_copy(
            update={"weights_basis": weights_basis}
        )
    else:
        calibration = Calibration(
            used=False, reason=f"history covers {history_days:.0f} days, under two horizons"
        )
    base, _ = _risk(table, params, policy, calibration=IDENTITY_CALIBRATION, reference_p=0.5)
    base_known = base[np.isfinite(base)]
    reference_p = float(np.median(base_known)) if base_known.size else 0.5
    return PopulationFacts(
        percentiles=percentiles,
        profit_curve=_profit_curve(np.where(active, table.columns["gross_profit_12m"], 0.0)),
        bgnbd=params.as_dict(),
        bgnbd_source=source,
        reference_p=min(max(reference_p, 1e-6), 1 - 1e-6),
        horizon_days=horizon_days,
        calibration=calibration,
    )


# --------------------------------------------------------------------------------------------
# Evaluation (pure: arrays in, results out)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountState:
    """What is stored about each account's tier, in the order of the feature table."""

    tier: list[str | None]
    computed_tier: list[str | None]
    demotion_count: np.ndarray[Any, np.dtype[np.int64]]
    override_tier: list[str | None]
    override_reason: list[str | None]
    override_expires_at: list[datetime | None]
    risk_band: list[str | None]
    tier_change_seq: list[int]
    value_score: FloatArray
    risk_probability: FloatArray
    snapshot_at: list[datetime | None]

    def take(self, mask: np.ndarray[Any, np.dtype[np.bool_]]) -> AccountState:
        picks = np.flatnonzero(mask)
        return AccountState(
            tier=[self.tier[i] for i in picks],
            computed_tier=[self.computed_tier[i] for i in picks],
            demotion_count=self.demotion_count[mask],
            override_tier=[self.override_tier[i] for i in picks],
            override_reason=[self.override_reason[i] for i in picks],
            override_expires_at=[self.override_expires_at[i] for i in picks],
            risk_band=[self.risk_band[i] for i in picks],
            tier_change_seq=[self.tier_change_seq[i] for i in picks],
            value_score=self.value_score[mask],
            risk_probability=self.risk_probability[mask],
            snapshot_at=[self.snapshot_at[i] for i in picks],
        )


@dataclass(frozen=True)
class Evaluation:
    """The outcome for each account of the feature table."""

    score: FloatArray
    profit_share: FloatArray
    computed_tier: list[str]
    demotion_count: np.ndarray[Any, np.dtype[np.int64]]
    tier: list[str]
    risk: FloatArray
    band: list[str | None]
    override_expired: np.ndarray[Any, np.dtype[np.bool_]]
    drivers: list[dict[str, Any]] | None

    def take(self, mask: np.ndarray[Any, np.dtype[np.bool_]]) -> Evaluation:
        picks = np.flatnonzero(mask)
        return Evaluation(
            score=self.score[mask],
            profit_share=self.profit_share[mask],
            computed_tier=[self.computed_tier[i] for i in picks],
            demotion_count=self.demotion_count[mask],
            tier=[self.tier[i] for i in picks],
            risk=self.risk[mask],
            band=[self.band[i] for i in picks],
            override_expired=self.override_expired[mask],
            drivers=None if self.drivers is None else [self.drivers[i] for i in picks],
        )

    def needs_snapshot(
        self,
        state: AccountState,
        now: datetime,
        account_id: np.ndarray[Any, np.dtype[np.int64]] | None = None,
    ) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """Which accounts' results a reader of the history would notice: a new tier or band,
        the score or the risk moved by a step, a demotion held back by hysteresis, an override
        ended, or no snapshot for a day. With ``account_id`` (the portfolio pass), an account
        whose daily slot this hour is also gets one, unless it has had one within the hour."""
        with np.errstate(invalid="ignore"):
            score_moved = ~(np.abs(self.score - state.value_score) < SNAPSHOT_SCORE_STEP)
            risk_moved = ~(np.abs(self.risk - state.risk_probability) < SNAPSHOT_RISK_STEP)
        risk_moved &= ~(np.isnan(self.risk) & np.isnan(state.risk_probability))
        other = np.array(
            [
                last is None
                or last <= now - SNAPSHOT_EVERY
                or state.tier[i] != self.tier[i]
                or state.risk_band[i] != self.band[i]
                for i, last in enumerate(state.snapshot_at)
            ],
            dtype=np.bool_,
        )
        held_longer = self.demotion_count != state.demotion_count  # hysteresis counting
        daily = np.zeros(len(other), dtype=np.bool_)
        if account_id is not None:
            hour_ago = now - timedelta(hours=1)
            in_slot = account_id % SNAPSHOT_SLOTS == now.astimezone(UTC).hour % SNAPSHOT_SLOTS
            daily = in_slot & np.array(
                [last is not None and last <= hour_ago for last in state.snapshot_at],
                dtype=np.bool_,
            )
        return np.asarray(
            other | daily | score_moved | risk_moved | held_longer | self.override_expired
        )

    def needs_write(
        self,
        state: AccountState,
        now: datetime,
        account_id: np.ndarray[Any, np.dtype[np.int64]] | None = None,
    ) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """Which accounts' stored state a portfolio pass must update: those that need a
        snapshot, and those whose tier by the data moved under an override. The others keep
        the figures of their last snapshot (within a score step and a risk step of now)."""
        computed_moved = np.array(
            [a != b for a, b in zip(state.computed_tier, self.computed_tier, strict=True)],
            dtype=np.bool_,
        )
        return np.asarray(self.needs_snapshot(state, now, account_id) | computed_moved)


def evaluate(
    table: FeatureTable,
    state: AccountState,
    population: PopulationFacts,
    policy: ScoringPolicy,
    *,
    now: datetime,
    profit_share: FloatArray | None = None,
    with_drivers: bool = True,
) -> Evaluation:
    """Score, tier (gates, hysteresis, override) and risk of every account in ``table``."""
    share = (
        profit_share
        if profit_share is not None
        else population.profit_curve.place(table.columns["gross_profit_12m"])
    )
    features = table.value_features(share)
    breakdown = score_breakdown(features, population.percentiles, policy)
    decision = decide_tier(features, breakdown.score, policy)
    candidate = np.where(table.lost, Tier.standard.value, decision.tiers.astype(str))
    held, counts = apply_hysteresis(
        state.computed_tier, candidate, breakdown.score, state.demotion_count, policy
    )
    # A lost account is not a key account, whatever the hysteresis would keep.
    held = np.where(table.lost, Tier.standard.value, held.astype(str))
    counts = np.where(table.lost, 0, counts)
    published = apply_override(held, state.override_tier, state.override_expires_at, now)
    in_force = override_active(state.override_tier, state.override_expires_at, now)
    expired = np.array([t is not None for t in state.override_tier], dtype=np.bool_) & ~in_force

    horizons = (policy.risk.horizon_days, population.horizon_days)
    risk, assessment = _risk(
        table,
        population.params(),
        policy,
        calibration=population.calibration.platt(*horizons),
        signal_weights=population.calibration.weights(*horizons),
        reference_p=population.reference_p,
    )
    bands: list[str | None] = [
        None if lost or not math.isfinite(p) else str(b)
        for lost, p, b in zip(table.lost, risk, assessment.band, strict=True)
    ]
    drivers = None
    if with_drivers:
        drivers = _drivers(
            table,
            state,
            features=features,
            breakdown=breakdown,
            decision=decision,
            candidate=candidate,
            held=held,
            published=published,
            in_force=in_force,
            expired=expired,
            contributions=assessment.contributions,
            policy=policy,
        )
    return Evaluation(
        score=breakdown.score,
        profit_share=np.asarray(share, dtype=np.float64),
        computed_tier=[str(t) for t in held],
        demotion_count=np.asarray(counts, dtype=np.int64),
        tier=[str(t) for t in published],
        risk=risk,
        band=bands,
        override_expired=expired,
        drivers=drivers,
    )


def _drivers(
    table: FeatureTable,
    state: AccountState,
    *,
    features: Any,
    breakdown: Any,
    decision: Any,
    candidate: Any,
    held: Any,
    published: Any,
    in_force: Any,
    expired: Any,
    contributions: dict[str, FloatArray],
    policy: ScoringPolicy,
) -> list[dict[str, Any]]:
    tier_reasons = explain_tier(decision.tiers, decision.gates, breakdown.score, features, policy)
    value_reasons = explain_value(breakdown, features)
    risk_reasons = explain_risk(contributions, table.behaviour())
    out: list[dict[str, Any]] = []
    for i in range(len(table)):
        entry: dict[str, Any] = {
            "tier": [d.as_dict() for d in tier_reasons[i]],
            "value": [d.as_dict() for d in value_reasons[i]],
            "risk": [d.as_dict() for d in risk_reasons[i]],
        }
        if table.lost[i]:
            entry["status"] = {"code": "lost", "text": "the account is marked lost"}
            entry["risk"] = []
        elif held[i] != candidate[i]:
            entry["hysteresis"] = {
                "code": "held",
                "text": (
                    f"kept at {held[i]} (the data points to {candidate[i]}; "
                    f"{int(state.demotion_count[i]) + 1} of {policy.hysteresis.demote_after} "
                    "evaluations needed to demote)"
                ),
            }
        if in_force[i]:
            expires = state.override_expires_at[i]
            until = f" until {expires.date().isoformat()}" if expires else ""
            entry["override"] = {
                "code": "override",
                "text": f"pinned at {published[i]} by a manager{until}: "
                f"{state.override_reason[i] or 'no reason given'}",
                "computed_tier": str(held[i]),
            }
        elif expired[i]:
            entry["override"] = {
                "code": "override_expired",
                "text": f"the manager's {state.override_tier[i]} override has expired",
            }
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------

_STATE_COLUMNS = """
SELECT id, tier, computed_tier, tier_demotion_count, tier_override, tier_override_reason,
       tier_override_expires_at, risk_band, tier_change_seq, value_score, risk_probability,
       snapshot_at
FROM accounts"""
_LOCK_STATE = f"{_STATE_COLUMNS} WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE"
_READ_STATE = f"{_STATE_COLUMNS} ORDER BY id"

_INSERT_SNAPSHOTS = """
INSERT INTO score_snapshots (account_id, computed_at, policy_version, features, value_score,
                             tier, risk_probability, risk_band, drivers)
SELECT u.account_id, $2::timestamptz, $3::integer, u.features::jsonb, u.score, u.tier, u.risk,
       u.band, u.drivers::jsonb
FROM unnest($1::bigint[], $4::text[], $5::float8[], $6::text[], $7::float8[], $8::text[],
            $9::text[]) AS u(account_id, features, score, tier, risk, band, drivers)
RETURNING id, account_id
"""

_UPDATE_ACCOUNTS = """
UPDATE accounts a SET
    tier = u.tier,
    tier_since = CASE WHEN a.tier IS DISTINCT FROM u.tier THEN $2::timestamptz
                      ELSE a.tier_since END,
    tier_change_seq = a.tier_change_seq + (a.tier IS DISTINCT FROM u.tier)::int,
    computed_tier = u.computed_tier,
    tier_demotion_count = u.demotion_count,
    value_score = u.score,
    risk_probability = u.risk,
    risk_band = u.band,
    scored_at = $2::timestamptz,
    tier_override = CASE WHEN u.override_expired THEN NULL ELSE a.tier_override END,
    tier_override_reason = CASE WHEN u.override_expired THEN NULL
                                ELSE a.tier_override_reason END,
    tier_override_expires_at = CASE WHEN u.override_expired THEN NULL
                                    ELSE a.tier_override_expires_at END,
    snapshot_at = CASE WHEN u.snapshot THEN $2::timestamptz ELSE a.snapshot_at END
FROM unnest($1::bigint[], $3::text[], $4::text[], $5::smallint[], $6::float8[], $7::float8[],
            $8::text[], $9::boolean[], $10::boolean[])
     AS u(id, tier, computed_tier, demotion_count, score, risk, band, override_expired, snapshot)
WHERE a.id = u.id
"""

_INSERT_TIER_CHANGES = """
INSERT INTO tier_changes (account_id, seq, from_tier, to_tier, changed_at, reasons, snapshot_id)
SELECT u.account_id, u.seq, u.from_tier, u.to_tier, $2::timestamptz, u.reasons::jsonb,
       u.snapshot_id
FROM unnest($1::bigint[], $3::integer[], $4::text[], $5::text[], $6::text[], $7::bigint[])
     AS u(account_id, seq, from_tier, to_tier, reasons, snapshot_id)
"""


async def _lock_state(session: AsyncSession, account_ids: list[int]) -> dict[int, Any]:
    connection = await session.connection()
    result = await connection.exec_driver_sql(_LOCK_STATE, (account_ids,))
    return {row[0]: row for row in result.all()}


async def _read_state(session: AsyncSession) -> dict[int, Any]:
    """Every account's stored state, without locks (the pass locks what it writes)."""
    connection = await session.connection()
    result = await connection.exec_driver_sql(_READ_STATE)
    return {row[0]: row for row in result.all()}


def _state_for(table: FeatureTable, rows: dict[int, Any]) -> AccountState:
    ordered = [rows.get(int(i)) for i in table.account_id]
    return AccountState(
        tier=[r[1] if r else None for r in ordered],
        computed_tier=[r[2] if r else None for r in ordered],
        demotion_count=np.array([r[3] if r else 0 for r in ordered], dtype=np.int64),
        override_tier=[r[4] if r else None for r in ordered],
        override_reason=[r[5] if r else None for r in ordered],
        override_expires_at=[r[6] if r else None for r in ordered],
        risk_band=[r[7] if r else None for r in ordered],
        tier_change_seq=[r[8] if r else 0 for r in ordered],
        value_score=np.array(
            [r[9] if r and r[9] is not None else math.nan for r in ordered], dtype=np.float64
        ),
        risk_probability=np.array(
            [r[10] if r and r[10] is not None else math.nan for r in ordered], dtype=np.float64
        ),
        snapshot_at=[r[11] if r else None for r in ordered],
    )


def _nullable(values: FloatArray) -> list[float | None]:
    return [None if not math.isfinite(v) else float(v) for v in values]


async def _store(
    session: AsyncSession,
    *,
    table: FeatureTable,
    state: AccountState,
    result: Evaluation,
    drivers: Sequence[dict[str, Any] | None],
    policy_version: int,
    now: datetime,
) -> int:
    """Write account state for every evaluated account, a snapshot for each that has drivers
    (``None`` = no snapshot this time), and the tier changes."""
    ids = [int(i) for i in table.account_id]
    snap = [i for i, d in enumerate(drivers) if d is not None]
    connection = await session.connection()
    snapshot_of: dict[int, int] = {}
    if snap:
        snapshots = await connection.exec_driver_sql(
            _INSERT_SNAPSHOTS,
            (
                [ids[i] for i in snap],
                now,
                policy_version,
                [
                    json.dumps(
                        table.record(i)
                        | {"profit_share_cum": round(float(result.profit_share[i]), 6)}
                    )
                    for i in snap
                ],
                [float(result.score[i]) for i in snap],
                [result.tier[i] for i in snap],
                _nullable(result.risk[snap]),
                [result.band[i] for i in snap],
                [json.dumps(drivers[i]) for i in snap],
            ),
        )
        rows: list[Any] = list(snapshots.all())
        snapshot_of = {int(row[1]): int(row[0]) for row in rows}
    await connection.exec_driver_sql(
        _UPDATE_ACCOUNTS,
        (
            ids,
            now,
            result.tier,
            result.computed_tier,
            [int(c) for c in result.demotion_count],
            [float(s) for s in result.score],
            _nullable(result.risk),
            result.band,
            [bool(e) for e in result.override_expired],
            [d is not None for d in drivers],
        ),
    )
    changed = [i for i in range(len(ids)) if state.tier[i] != result.tier[i]]
    assert all(drivers[i] is not None for i in changed), "a tier change always has a snapshot"
    if changed:
        await connection.exec_driver_sql(
            _INSERT_TIER_CHANGES,
            (
                [ids[i] for i in changed],
                now,
                [state.tier_change_seq[i] + 1 for i in changed],
                [state.tier[i] for i in changed],
                [result.tier[i] for i in changed],
                [
                    json.dumps(
                        {
                            "tier": driver["tier"],
                            **{
                                key: driver[key]
                                for key in ("hysteresis", "override", "status")
                                if key in driver
                            },
                        }
                    )
                    for driver in (drivers[i] for i in changed)
                    if driver is not None
                ],
                [snapshot_of[ids[i]] for i in changed],
            ),
        )
    await record_account_events(
        session,
        account_ids=ids,
        state=state,
        result=result,
        policy_version=policy_version,
        occurred_at=now,
    )
    return len(changed)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


async def rescore_accounts(
    session: AsyncSession, *, account_ids: list[int], now: datetime | None = None
) -> int:
    """Rescore these accounts against the stored population facts; returns how many were
    scored. Without population facts yet (a new installation) they are fitted first."""
    at = _now(now)
    version, policy = await active_policy(session)
    population = await latest_population(session)
    if population is None:
        # The first rescores of a new installation all find no facts: one fits, the others wait.
        await session.execute(
            select(func.pg_advisory_xact_lock(LOCK_NAMESPACE, FIRST_POPULATION_LOCK))
        )
        population = await latest_population(session)
    if population is None:
        everything = await load_features(session, as_of=at)
        population = await fit_population(session, table=everything, policy=policy, previous=None)
        session.add(
            PopulationFit(
                policy_version=version,
                evaluated_at=at,
                accounts=len(everything),
                facts=population.model_dump(mode="json"),
            )
        )
        await session.flush()
    rows = await _lock_state(session, sorted(set(account_ids)))
    aggregates = await load_aggregates(session, as_of=at, account_ids=sorted(rows))
    # Subsidiaries come back too (for the group roll-up); only the asked-for ones are scored,
    # and their aggregates kept for the next portfolio pass.
    asked = np.isin(aggregates.account_id, np.array(sorted(rows), dtype=np.int64))
    await store_aggregates(session, aggregates.take(asked))
    table = build_feature_table(aggregates).take(asked)
    if not len(table):
        return 0
    state = _state_for(table, rows)
    result = evaluate(table, state, population, policy, now=at)
    assert result.drivers is not None
    await _store(
        session,
        table=table,
        state=state,
        result=result,
        drivers=result.drivers,
        policy_version=version,
        now=at,
    )
    return len(table)


async def run_portfolio_pass(
    sessionmaker: async_sessionmaker[AsyncSession], *, now: datetime | None = None
) -> int | None:
    """Refit the population facts and rescore every account; returns the accounts scored, or
    None when another pass is running (an advisory lock lets one pass run at a time, whichever
    worker picked it up).

    The features are aggregated once, set-based; the accounts are then written in chunks of
    ``PASS_CHUNK``, each chunk its own transaction holding its accounts' row locks only while it
    writes, so ingestion and single rescores are never blocked for the whole pass."""
    engine: AsyncEngine = sessionmaker.kw["bind"]
    async with engine.connect() as guard:
        # A session-level lock on a connection of its own: it outlives the chunk transactions.
        lock = select(func.pg_try_advisory_lock(LOCK_NAMESPACE, PORTFOLIO_PASS_LOCK))
        locked = await guard.scalar(lock)
        await guard.commit()
        if not locked:
            log.info("portfolio_pass_skipped", reason="another pass is running")
            return None
        try:
            return await _portfolio_pass(sessionmaker, at=_now(now))
        finally:
            unlock = select(func.pg_advisory_unlock(LOCK_NAMESPACE, PORTFOLIO_PASS_LOCK))
            await guard.scalar(unlock)
            await guard.commit()


async def _portfolio_pass(sessionmaker: async_sessionmaker[AsyncSession], *, at: datetime) -> int:
    async with sessionmaker() as session, session.begin():
        version, policy = await active_policy(session)
        previous = await latest_population(session)
        # Stored aggregates that still hold are reused; the accounts whose data changed or
        # whose windows moved past one of their rows are aggregated now, and kept.
        aggregates = await load_aggregates(session, as_of=at, reuse=True)
        table = build_feature_table(aggregates)
        population = await fit_population(session, table=table, policy=policy, previous=previous)
        await store_aggregates(session, aggregates)
        session.add(
            PopulationFit(
                policy_version=version,
                evaluated_at=at,
                accounts=len(table),
                facts=population.model_dump(mode="json"),
            )
        )
    active = ~table.lost
    share = cumulative_profit_share(np.where(active, table.columns["gross_profit_12m"], 0.0))
    # Every account is evaluated against the state read here; only those whose stored state
    # must change are then written, in chunks, each its own transaction holding its accounts'
    # row locks only while it writes, so ingestion and single rescores are never blocked for
    # the whole pass.
    async with sessionmaker() as session, session.begin():
        rows = await _read_state(session)
    present = np.isin(table.account_id, np.fromiter(rows, dtype=np.int64, count=len(rows)))
    table, share = table.take(present), share[present]
    state = _state_for(table, rows)
    result = evaluate(
        table, state, population, policy, now=at, profit_share=share, with_drivers=False
    )
    to_write = np.flatnonzero(result.needs_write(state, at, table.account_id))
    changes = 0
    snapshots = 0
    written = 0
    for start in range(0, len(to_write), PASS_CHUNK):
        chunk = np.zeros(len(table), dtype=np.bool_)
        chunk[to_write[start : start + PASS_CHUNK]] = True
        part = table.take(chunk)
        async with sessionmaker() as session, session.begin():
            rows = await _lock_state(session, [int(i) for i in part.account_id])
            present = np.isin(part.account_id, np.fromiter(rows, dtype=np.int64, count=len(rows)))
            part_share = share[chunk][present]
            part = part.take(present)
            if not len(part):
                continue
            # The state again, now locked: a rescore may have written it since it was read.
            state = _state_for(part, rows)
            result = evaluate(
                part,
                state,
                population,
                policy,
                now=at,
                profit_share=part_share,
                with_drivers=False,
            )
            write = result.needs_write(state, at, part.account_id)
            if not write.any():
                continue
            part, part_share = part.take(write), part_share[write]
            state, result = state.take(write), result.take(write)
            # Reasons in words cost more than the scores: only for the snapshots written.
            wanted = result.needs_snapshot(state, at, part.account_id)
            drivers: list[dict[str, Any] | None] = [None] * len(part)
            if wanted.any():
                explained = evaluate(
                    part.take(wanted),
                    state.take(wanted),
                    population,
                    policy,
                    now=at,
                    profit_share=part_share[wanted],
                )
                assert explained.drivers is not None
                for i, entry in zip(np.flatnonzero(wanted), explained.drivers, strict=True):
                    drivers[i] = entry
            snapshots += int(wanted.sum())
            written += len(part)
            changes += await _store(
                session,
                table=part,
                state=state,
                result=result,
                drivers=drivers,
                policy_version=version,
                now=at,
            )
    log.info(
        "portfolio_pass_done",
        accounts=len(table),
        aggregated=int(aggregates.fresh.sum()),
        written=written,
        snapshots=snapshots,
        tier_changes=changes,
        retention_model=population.bgnbd_source,
        calibrated=population.calibration.used,
    )
    return len(table)


async def preview_policy(
    session: AsyncSession, *, draft: ScoringPolicy, now: datetime | None = None
) -> PolicyPreview:
    """What ``draft`` would publish for every account now, against what is published.

    Only reads: not even population facts are stored (when none exist yet they are fitted in
    memory). The API also runs it inside a savepoint that it always rolls back."""
    at = _now(now)
    table = await load_features(session, as_of=at, reuse=True)
    population = await latest_population(session)
    if population is None:
        population = await fit_population(session, table=table, policy=draft, previous=None)
    state_rows = await session.execute(
        text(
            "SELECT id, tier, computed_tier, tier_demotion_count, tier_override, "
            "tier_override_reason, tier_override_expires_at, risk_band, tier_change_seq, "
            "value_score, risk_probability, snapshot_at FROM accounts ORDER BY id"
        )
    )
    rows = {row[0]: row for row in state_rows.all()}
    state = _state_for(table, rows)
    share = cumulative_profit_share(np.where(~table.lost, table.columns["gross_profit_12m"], 0.0))
    result = evaluate(
        table, state, population, draft, now=at, profit_share=share, with_drivers=False
    )
    tier_moves = Counter(
        (before, after) for before, after in zip(state.tier, result.tier, strict=True)
    )
    band_moves = Counter(
        (before, after) for before, after in zip(state.risk_band, result.band, strict=True)
    )
    return PolicyPreview(
        accounts=len(table),
        evaluated_at=at,
        tier_moves=[
            TierMove(from_tier=Tier(a) if a else None, to_tier=Tier(b), accounts=count)
            for (a, b), count in sorted(tier_moves.items(), key=_move_key)
            if a != b
        ],
        band_moves=[
            BandMove(
                from_band=RiskBand(a) if a else None,
                to_band=RiskBand(b) if b else None,
                accounts=count,
            )
            for (a, b), count in sorted(band_moves.items(), key=_move_key)
            if a != b
        ],
        unchanged_tier=sum(c for (a, b), c in tier_moves.items() if a == b),
        unchanged_band=sum(c for (a, b), c in band_moves.items() if a == b),
        tiers_now=_tier_counts(state.tier),
        tiers_draft=_tier_counts(result.tier),
    )


def _move_key(item: tuple[tuple[str | None, str | None], int]) -> tuple[int, str, str]:
    (a, b), count = item
    return (-count, a or "", b or "")


def _tier_counts(tiers: Sequence[str | None]) -> dict[Tier, int]:
    counts = Counter(t for t in tiers if t is not None)
    return {tier: counts.get(tier.value, 0) for tier in Tier}
