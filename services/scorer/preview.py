"""What a draft policy would change: both policies evaluated at one moment from one state.

Only reads. The active policy is evaluated exactly as the next portfolio pass would (the same
stored state, the same single hysteresis step), and so is the draft; the difference between the
two is the draft's effect alone, so the active policy previews as no move at all.

What the draft changes is re-derived: a draft with other risk settings (horizon, occasion
window, model choice, signal weights, population rules) gets population facts fitted for it in
memory, the replay calibration for its horizon included, from features aggregated with its
occasion window.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from services.scorer.engine import ScoringPolicy, cumulative_profit_share
from services.scorer.evaluation import Evaluation, evaluate
from services.scorer.features import FeatureTable, build_feature_table, load_aggregates
from services.scorer.policies import active_policy
from services.scorer.population import PopulationFacts, fit_population, latest_population
from services.scorer.storage import state_for
from shared.enums import RiskBand, Tier
from shared.schemas import (
    BandMove,
    ManagerLoad,
    MovedAccount,
    PolicyPreview,
    PortfolioKpis,
    TierFigures,
    TierMove,
)

_ACCOUNTS = """
SELECT a.id, a.external_id, a.name, m.external_id, m.name, m.capacity
FROM accounts a LEFT JOIN managers m ON m.id = a.manager_id
"""
_MANAGERS = "SELECT external_id, name, capacity FROM managers ORDER BY external_id"
_STATE = (
    "SELECT id, tier, computed_tier, tier_demotion_count, tier_override, "
    "tier_override_reason, tier_override_expires_at, risk_band, tier_change_seq, "
    "value_score, risk_probability, snapshot_at, tier_basis, population_fit_id, scored_at "
    "FROM accounts ORDER BY id"
)


async def _population_for(
    session: AsyncSession,
    policy: ScoringPolicy,
    *,
    at: datetime,
    stored: PopulationFacts | None,
) -> tuple[FeatureTable, Any, PopulationFacts]:
    """The features (with the policy's occasion window) and the population facts the policy
    would score with: the stored facts when they were fitted for the same risk and population
    settings, else facts fitted now in memory (in the stored facts' generation, so that the
    hysteresis step is the one the pass would take)."""
    aggregates = await load_aggregates(
        session, as_of=at, occasion_window_days=policy.risk.occasion_window_days, reuse=True
    )
    table = build_feature_table(aggregates)
    same_settings = (
        stored is not None
        and stored.horizon_days == policy.risk.horizon_days
        and stored.occasion_window_days == policy.risk.occasion_window_days
    )
    if stored is not None and same_settings and _same_risk_basis(stored, policy):
        return table, aggregates, stored
    fitted = await fit_population(
        session, table=table, policy=policy, previous=stored, seqs=aggregates.seq
    )
    if stored is not None:
        fitted = fitted.model_copy(update={"generation": stored.generation})
    return table, aggregates, fitted


def _same_risk_basis(stored: PopulationFacts, policy: ScoringPolicy) -> bool:
    calibration = stored.calibration
    if calibration.cutoff is None:  # no replay: nothing in the facts depends on the weights
        return True
    return (
        calibration.weights_basis == policy.risk.signal_weights.model_dump()
        and calibration.model_choice == policy.risk.model
    )


async def preview_policy(
    session: AsyncSession,
    *,
    draft: ScoringPolicy,
    now: datetime | None = None,
    offset: int = 0,
    limit: int = 50,
) -> PolicyPreview:
    """What ``draft`` would publish for every account now, against what the active policy
    would publish at the same moment. Only reads: not even population facts are stored."""
    at = now if now is not None else datetime.now(UTC)
    _, active = await active_policy(session)
    latest = await latest_population(session)
    stored = latest[1] if latest is not None else None
    table_now, _, facts_now = await _population_for(session, active, at=at, stored=stored)
    if draft == active:
        table_draft, facts_draft = table_now, facts_now
    else:
        table_draft, _, facts_draft = await _population_for(session, draft, at=at, stored=stored)
    rows = {row[0]: row for row in (await session.execute(text(_STATE))).all()}
    # One set of accounts on both sides (an account created between the reads is left out).
    common = np.intersect1d(
        np.intersect1d(table_now.account_id, table_draft.account_id),
        np.fromiter(rows, dtype=np.int64, count=len(rows)),
    )
    table_now = table_now.take(np.isin(table_now.account_id, common))
    table_draft = table_draft.take(np.isin(table_draft.account_id, common))
    state = state_for(table_now, rows)
    share = cumulative_profit_share(
        np.where(~table_now.lost, table_now.columns["gross_profit_12m"], 0.0)
    )
    current = evaluate(
        table_now, state, facts_now, active, now=at, profit_share=share, with_drivers=False
    )
    proposed = evaluate(
        table_draft, state, facts_draft, draft, now=at, profit_share=share, with_drivers=False
    )
    tier_moves = Counter(zip(current.tier, proposed.tier, strict=True))
    band_moves = Counter(zip(current.band, proposed.band, strict=True))

    accounts = {row[0]: row for row in (await session.execute(text(_ACCOUNTS))).all()}
    managers = list((await session.execute(text(_MANAGERS))).all())
    moved = np.array([a != b for a, b in zip(current.tier, proposed.tier, strict=True)])
    moved_rows = np.flatnonzero(moved)
    page = moved_rows[offset : offset + limit]
    reasons: list[str | None] = []
    if page.size:
        pick = np.zeros(len(table_draft), dtype=np.bool_)
        pick[page] = True
        explained = evaluate(
            table_draft.take(pick),
            state.take(pick),
            facts_draft,
            draft,
            now=at,
            profit_share=share[pick],
        )
        assert explained.drivers is not None
        reasons = [_main_reason(d) for d in explained.drivers]
    moved_accounts = []
    for i, reason in zip(page, reasons, strict=True):
        account = accounts[int(table_draft.account_id[i])]
        moved_accounts.append(
            MovedAccount(
                external_id=account[1],
                name=account[2],
                from_tier=Tier(current.tier[i]),
                to_tier=Tier(proposed.tier[i]),
                from_band=_band(current.band[i]),
                to_band=_band(proposed.band[i]),
                reason=reason,
            )
        )
    return PolicyPreview(
        accounts=len(table_now),
        evaluated_at=at,
        tier_moves=[
            TierMove(from_tier=Tier(a) if a else None, to_tier=Tier(b), accounts=count)
            for (a, b), count in sorted(tier_moves.items(), key=_move_key)
            if a != b
        ],
        band_moves=[
            BandMove(from_band=_band(a), to_band=_band(b), accounts=count)
            for (a, b), count in sorted(band_moves.items(), key=_move_key)
            if a != b
        ],
        unchanged_tier=sum(c for (a, b), c in tier_moves.items() if a == b),
        unchanged_band=sum(c for (a, b), c in band_moves.items() if a == b),
        tiers_now=_tier_counts(current.tier),
        tiers_draft=_tier_counts(proposed.tier),
        kpis_now=_kpis(table_now, current, accounts, managers),
        kpis_draft=_kpis(table_draft, proposed, accounts, managers),
        moved_accounts=moved_accounts,
        moved_total=int(moved_rows.size),
        offset=offset,
        limit=limit,
        exact=True,
        notes=_notes(active, draft, facts_draft),
    )


def _notes(active: ScoringPolicy, draft: ScoringPolicy, facts: PopulationFacts) -> list[str]:
    notes = []
    if draft.risk != active.risk or draft.population != active.population:
        notes.append("population facts fitted for the draft's risk settings")
        if not facts.calibration.used and facts.calibration.reason:
            notes.append(f"no calibration for the draft: {facts.calibration.reason}")
    return notes


def _main_reason(drivers: dict[str, Any]) -> str | None:
    for key in ("override", "hysteresis", "status"):
        if key in drivers:
            return str(drivers[key]["text"])
    tier = drivers.get("tier") or []
    gates = [r for r in tier if r.get("code") != "score"]
    chosen = gates[0] if gates else (tier[0] if tier else None)
    return None if chosen is None else str(chosen["text"])


def _band(value: str | None) -> RiskBand | None:
    return RiskBand(value) if value else None


def _kpis(
    table: FeatureTable,
    result: Evaluation,
    accounts: dict[int, Any],
    managers: Sequence[Any],
) -> PortfolioKpis:
    revenue = np.nan_to_num(table.columns["revenue_12m"], nan=0.0)
    profit = np.nan_to_num(table.columns["gross_profit_12m"], nan=0.0)
    tiers = np.array(result.tier, dtype=object)
    figures = {
        tier: TierFigures(
            accounts=int((tiers == tier.value).sum()),
            revenue_12m=round(float(revenue[tiers == tier.value].sum()), 2),
            gross_profit_12m=round(float(profit[tiers == tier.value].sum()), 2),
        )
        for tier in Tier
    }
    key = (tiers == Tier.key.value) | (tiers == Tier.strategic.value)
    positive = np.clip(profit, 0.0, None)
    total = float(positive.sum())
    load: dict[str | None, int] = defaultdict(int)
    for account_id, is_key in zip(table.account_id, key, strict=True):
        if is_key:
            load[accounts[int(account_id)][3]] += 1
    loads = [
        ManagerLoad(
            manager=m[0],
            name=m[1],
            capacity=m[2],
            key_accounts=load.get(m[0], 0),
            over_capacity=load.get(m[0], 0) > m[2],
        )
        for m in managers
    ]
    if load.get(None):
        loads.append(
            ManagerLoad(
                manager=None,
                name=None,
                capacity=None,
                key_accounts=load[None],
                over_capacity=False,
            )
        )
    return PortfolioKpis(
        tiers=figures,
        key_profit_share=round(float(positive[key].sum()) / total, 6) if total > 0 else None,
        managers=loads,
    )


def _move_key(item: tuple[tuple[str | None, str | None], int]) -> tuple[int, str, str]:
    (a, b), count = item
    return (-count, a or "", b or "")


def _tier_counts(tiers: Sequence[str | None]) -> dict[Tier, int]:
    counts = Counter(t for t in tiers if t is not None)
    return {tier: counts.get(tier.value, 0) for tier in Tier}
