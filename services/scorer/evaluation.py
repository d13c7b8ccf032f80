"""Evaluation: score, tier (gates, hysteresis, override) and risk of many accounts at once.

Pure: a feature table, the accounts' stored tier state, the population facts and the policy in;
the results (and, when asked, the reasons in words) out. The rescore, the portfolio pass and
the policy preview all evaluate through ``evaluate``, so they cannot disagree.

Hysteresis holds only a tier decided in the current population generation (``tier_basis``): a
tier given for the first time, or decided against a population that has since grown or been
reloaded, follows the data at the next evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from services.scorer.engine import (
    RiskAssessment,
    ScoringPolicy,
    apply_hysteresis,
    apply_override,
    assess_base_risk,
    decide_tier,
    explain_risk,
    explain_tier,
    explain_value,
    override_active,
    score_breakdown,
)
from services.scorer.engine.arrays import FloatArray
from services.scorer.engine.value import tier_threshold
from services.scorer.features import FeatureTable
from services.scorer.population import PRIOR_REASON, PopulationFacts, purchase_history
from shared.enums import Tier

# The pass writes a snapshot when something a reader would notice moved, and at least daily:
# each account at the pass in its hour of the day (its id modulo 24, UTC), so the daily
# snapshots spread over the day's passes instead of all falling into one.
SNAPSHOT_EVERY = timedelta(hours=24)
SNAPSHOT_SLOTS = 24
SNAPSHOT_SCORE_STEP = 1.0
SNAPSHOT_RISK_STEP = 0.02


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
    tier_basis: list[int | None]
    population_fit_id: list[int | None]
    scored_at: list[datetime | None]

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
            tier_basis=[self.tier_basis[i] for i in picks],
            population_fit_id=[self.population_fit_id[i] for i in picks],
            scored_at=[self.scored_at[i] for i in picks],
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
    tier_basis: list[int | None]
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
            tier_basis=[self.tier_basis[i] for i in picks],
            drivers=None if self.drivers is None else [self.drivers[i] for i in picks],
        )

    def basis_moved(self, state: AccountState) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """Which accounts' tier basis (the generation their tier was decided in) changed: the
        pass stores it even where nothing a reader sees moved."""
        return np.array(
            [a != b for a, b in zip(state.tier_basis, self.tier_basis, strict=True)],
            dtype=np.bool_,
        )

    def needs_snapshot(
        self,
        state: AccountState,
        now: datetime,
        account_id: np.ndarray[Any, np.dtype[np.int64]] | None = None,
    ) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """Which accounts' results a reader of the history would notice: a new tier or band,
        the score or the risk moved by a step, a demotion held back by hysteresis, the tier by
        the data moved, an override ended, or no snapshot for a day. With
        ``account_id`` (the portfolio pass), an account whose daily slot this hour is also
        gets one, unless it has had one within the hour."""
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
        # The tier by the data moved (under an override): written, and every write of the
        # figures has its snapshot, so an account's figures are always its newest snapshot's.
        computed_moved = np.array(
            [a != b for a, b in zip(state.computed_tier, self.computed_tier, strict=True)],
            dtype=np.bool_,
        )
        daily = np.zeros(len(other), dtype=np.bool_)
        if account_id is not None:
            hour_ago = now - timedelta(hours=1)
            in_slot = account_id % SNAPSHOT_SLOTS == now.astimezone(UTC).hour % SNAPSHOT_SLOTS
            daily = in_slot & np.array(
                [last is not None and last <= hour_ago for last in state.snapshot_at],
                dtype=np.bool_,
            )
        return np.asarray(
            other
            | daily
            | score_moved
            | risk_moved
            | held_longer
            | computed_moved
            | self.override_expired
        )


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
    # Hysteresis holds a tier only if it was decided in this population generation; any other
    # (given for the first time, or against a smaller or half-loaded portfolio) follows the data.
    holdable = [basis == population.generation for basis in state.tier_basis]
    previous = [t if ok else None for t, ok in zip(state.computed_tier, holdable, strict=True)]
    held, counts = apply_hysteresis(
        previous, candidate, breakdown.score, state.demotion_count, policy
    )
    has_orders = table.has_orders
    basis: list[int | None] = [
        population.generation if before is not None and data else None
        for before, data in zip(state.computed_tier, has_orders, strict=True)
    ]
    # A lost account is not a key account, whatever the hysteresis would keep.
    held = np.where(table.lost, Tier.standard.value, held.astype(str))
    counts = np.where(table.lost, 0, counts)
    published = apply_override(held, state.override_tier, state.override_expires_at, now)
    in_force = override_active(state.override_tier, state.override_expires_at, now)
    expired = np.array([t is not None for t in state.override_tier], dtype=np.bool_) & ~in_force

    risk, assessment = risk_of(table, population, policy)
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
            risk=risk,
            population=population,
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
        tier_basis=basis,
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
    risk: FloatArray,
    population: PopulationFacts,
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
        else:
            if math.isfinite(float(risk[i])):
                entry["summary"] = {
                    "code": "risk",
                    "text": (
                        f"{float(risk[i]) * 100:.0f}% risk of no order in the next "
                        f"{policy.risk.horizon_days} days"
                    ),
                    "value": round(float(risk[i]), 4),
                }
            if population.on_prior and math.isfinite(float(risk[i])):
                entry["risk"].append(
                    {
                        "code": "prior_model",
                        "text": (
                            f"risk from the prior purchase model: {PRIOR_REASON} "
                            f"({population.accounts_with_orders} of "
                            f"{policy.population.min_fit_accounts} needed)"
                        ),
                    }
                )
        if not table.lost[i] and held[i] != candidate[i]:
            held_tier = Tier(held[i])
            threshold = tier_threshold(held_tier, policy)
            score = float(breakdown.score[i])
            count = int(state.demotion_count[i]) + 1
            of = f"{count} of {policy.hysteresis.demote_after} evaluations"
            why = (
                f"score {score:.0f} is below {threshold:.0f}"
                if score < threshold
                else f"the data points to {candidate[i]}"
            )
            entry["hysteresis"] = {
                "code": "held",
                "text": f"kept at {held_tier.value}: {why} for {of}",
                "candidate_tier": str(candidate[i]),
            }
            # First among the tier's reasons: the others explain the tier the data points to.
            entry["tier"].insert(0, {"code": "held", "text": entry["hysteresis"]["text"]})
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


def risk_of(
    table: FeatureTable, population: PopulationFacts, policy: ScoringPolicy
) -> tuple[FloatArray, RiskAssessment]:
    """The retention risk of every account: the base from the population models (as the policy
    and the replay chose), the behavioural signals, the learned layer where it applies. Lost
    accounts have none."""
    x, t_x, T = purchase_history(table)
    models = population.models()
    base = models.bases(x, t_x, T, float(policy.risk.horizon_days))[population.base_model(policy)]
    assessment = assess_base_risk(
        base,
        table.behaviour(),
        policy.risk,
        calibration=population.calibration.platt(policy),
        signal_weights=population.calibration.weights(policy),
        reference_p=population.reference_p,
    )
    probability = np.where(table.lost, np.nan, assessment.probability)
    return np.asarray(probability, dtype=np.float64), assessment
