"""Portfolio KPIs. The figures of the 12-month window (per tier revenue, gross profit, revenue
at risk and retention; satisfaction; the 80/20 curve; the monthly trend) are read from the
summary the last portfolio pass stored (``services.scorer.summary``), as of that pass: they
would otherwise aggregate every order on every view. What the accounts hold now (the tier and
risk matrix, the key accounts at risk, the managers' loads) is read live, set-based."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any, TypeVarTuple

from sqlalchemy import ColumnElement, Select, and_, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.keys.service import Principal
from services.api.portfolio.schemas import (
    AtRiskAccount,
    AtRiskKeyAccounts,
    ManagerLoad,
    ParetoCurve,
    Portfolio,
    PortfolioKpis,
    Retention,
    Satisfaction,
    TierBandCell,
    TierBucket,
    TierKpi,
    TrendMonth,
)
from services.scorer.summary import TREND_MONTHS, scope_of
from shared.enums import AccountStatus, RiskBand, Tier
from shared.models import Account, Manager, PortfolioSummary
from shared.periods import months_before

__all__ = ["months_before"]

KEY_TIERS = (Tier.strategic.value, Tier.key.value)
AT_RISK_BANDS = (RiskBand.high.value, RiskBand.critical.value)
AT_RISK_LISTED = 20
_CENT = Decimal("0.01")


async def stored_summary(
    session: AsyncSession, *, manager_id: int | None
) -> tuple[datetime | None, dict[str, Any]]:
    """The last pass's summary of every account (``manager_id`` None) or of one manager's:
    (when it was computed, its figures); (None, {}) before the first pass, and for a manager
    without accounts or not known."""
    row = (
        await session.execute(
            select(PortfolioSummary.computed_at, PortfolioSummary.figures).where(
                PortfolioSummary.scope == scope_of(manager_id)
            )
        )
    ).first()
    if row is not None:
        return row[0], row[1]
    if manager_id is None:
        return None, {}
    computed_at = await session.scalar(
        select(PortfolioSummary.computed_at).where(PortfolioSummary.scope == scope_of(None))
    )
    return computed_at, {}


Row = TypeVarTuple("Row")


def _in_scope(query: Select[*Row], manager_id: int | None) -> Select[*Row]:
    return query if manager_id is None else query.where(Account.manager_id == manager_id)


def _share(part: Decimal, whole: Decimal) -> float | None:
    return float(part / whole) if whole > 0 else None


async def portfolio_kpis(
    session: AsyncSession, *, now: datetime, manager_id: int | None = None
) -> PortfolioKpis:
    """The KPIs over every account, or over those of one manager: per tier the accounts,
    revenue and gross profit of the 12 months up to the last portfolio pass (``evaluated_at``;
    ``now`` before the first pass); the key accounts' shares; repeat-purchase retention; survey
    satisfaction; and the key accounts at risk now."""
    computed_at, figures = await stored_summary(session, manager_id=manager_id)
    as_of = computed_at or now
    stored = figures.get("tiers", {})
    tiers = []
    base = retained = 0
    for tier in TierBucket:
        row = stored.get(tier.value, {})
        base += row.get("bought_before", 0)
        retained += row.get("retained", 0)
        tiers.append(
            TierKpi(
                tier=tier,
                accounts=row.get("accounts", 0),
                active_accounts=row.get("active_accounts", 0),
                revenue_12m=Decimal(row.get("revenue_12m", 0)).quantize(_CENT),
                gross_profit_12m=Decimal(row.get("gross_profit_12m", 0)).quantize(_CENT),
                revenue_at_risk_12m=Decimal(row.get("revenue_at_risk_12m", 0)).quantize(_CENT),
            )
        )
    revenue_total = sum((t.revenue_12m for t in tiers), Decimal(0))
    profit_total = sum((t.gross_profit_12m for t in tiers), Decimal(0))
    key = [t for t in tiers if t.tier.value in KEY_TIERS]
    return PortfolioKpis(
        evaluated_at=as_of,
        window_start=months_before(as_of, 12),
        tiers=tiers,
        accounts=sum(t.accounts for t in tiers),
        revenue_12m=revenue_total,
        gross_profit_12m=profit_total,
        key_share_of_gross_profit=_share(
            sum((t.gross_profit_12m for t in key), Decimal(0)), profit_total
        ),
        key_share_of_revenue=_share(sum((t.revenue_12m for t in key), Decimal(0)), revenue_total),
        revenue_at_risk_12m=sum((t.revenue_at_risk_12m for t in key), Decimal(0)),
        tier_band_matrix=await _tier_band_matrix(session, manager_id=manager_id),
        retention=Retention(
            rate=retained / base if base else None,
            base_accounts=base,
            retained_accounts=retained,
        ),
        satisfaction=Satisfaction.model_validate(
            figures.get("satisfaction", {"average": None, "answers": 0})
        ),
        at_risk_key_accounts=await _at_risk(session, manager_id=manager_id),
    )


def _key_account(*conditions: ColumnElement[bool]) -> ColumnElement[bool]:
    return and_(
        Account.tier.in_(KEY_TIERS), Account.status == AccountStatus.active.value, *conditions
    )


async def _at_risk(session: AsyncSession, *, manager_id: int | None) -> AtRiskKeyAccounts:
    query = _in_scope(
        select(
            Account.external_id,
            Account.name,
            Account.tier,
            Account.risk_band,
            Account.risk_probability,
            Manager.external_id,
            func.count().over(),
        )
        .outerjoin(Manager, Manager.id == Account.manager_id)
        .where(_key_account(Account.risk_band.in_(AT_RISK_BANDS)))
        .order_by(Account.risk_probability.desc().nulls_last(), Account.id)
        .limit(AT_RISK_LISTED),
        manager_id,
    )
    rows = (await session.execute(query)).all()
    return AtRiskKeyAccounts(
        count=rows[0][-1] if rows else 0,
        accounts=[
            AtRiskAccount.model_validate(
                {
                    "external_id": external_id,
                    "name": name,
                    "tier": tier,
                    "risk_band": band,
                    "risk_probability": probability,
                    "manager_external_id": manager,
                }
            )
            for external_id, name, tier, band, probability, manager, _ in rows
        ],
    )


async def manager_loads(
    session: AsyncSession, *, manager_id: int | None = None
) -> list[ManagerLoad]:
    """Each manager's active key and strategic accounts against their capacity, the most
    overloaded first."""
    key_accounts = func.count(Account.id).filter(_key_account())
    query = (
        select(
            Manager.external_id,
            Manager.name,
            Manager.capacity,
            key_accounts,
            func.count(Account.id),
        )
        .outerjoin(Account, Account.manager_id == Manager.id)
        .group_by(Manager.id)
        .order_by((key_accounts - Manager.capacity).desc(), Manager.external_id)
    )
    if manager_id is not None:
        query = query.where(Manager.id == manager_id)
    return [
        ManagerLoad(
            external_id=external_id,
            name=name,
            capacity=capacity,
            key_accounts=keys,
            accounts=accounts,
            over_capacity=keys > capacity,
        )
        for external_id, name, capacity, keys, accounts in await session.execute(query)
    ]


async def viewer_manager_id(session: AsyncSession, viewer: Principal) -> int | None:
    """The manager a key is restricted to, as the ``manager_id`` the KPIs take; None for a key
    that sees every account. A restriction to a manager not (yet) known matches nothing."""
    if viewer.manager is None:
        return None
    manager_id = await session.scalar(
        select(Manager.id).where(Manager.external_id == viewer.manager)
    )
    return manager_id if manager_id is not None else -1


async def unassigned_key_accounts(session: AsyncSession) -> int:
    """Active key and strategic accounts that no manager looks after."""
    query = select(func.count()).where(_key_account(Account.manager_id.is_(None)))
    return int(await session.scalar(query) or 0)


async def _tier_band_matrix(session: AsyncSession, *, manager_id: int | None) -> list[TierBandCell]:
    tier = func.coalesce(Account.tier, TierBucket.unscored.value)
    band = func.coalesce(Account.risk_band, "none")
    query = _in_scope(
        select(tier, band, func.count())
        .where(Account.status == AccountStatus.active.value)
        .group_by(tier, band),
        manager_id,
    )
    counts = {(t, b): n for t, b, n in await session.execute(query)}
    return [
        TierBandCell(tier=t, risk_band=b, accounts=counts.get((t.value, b), 0))
        for t in TierBucket
        for b in [*(band.value for band in RiskBand), "none"]
    ]


async def pareto_curve(session: AsyncSession, *, manager_id: int | None = None) -> ParetoCurve:
    """The 80/20 curve as of the last portfolio pass: accounts ranked by gross profit of the 12
    months up to it, largest first, and the cumulative share of gross profit against the share
    of accounts, at about 50 evenly spaced ranks; ``core_accounts`` is how many of the largest
    bring 80% of it (the profit core). Accounts with placed orders whose cost is known count."""
    computed_at, figures = await stored_summary(session, manager_id=manager_id)
    curve = figures.get("pareto", {"accounts": 0, "core_accounts": 0, "points": []})
    return ParetoCurve.model_validate(curve | {"evaluated_at": computed_at})


async def kpi_trend(
    session: AsyncSession, *, now: datetime, manager_id: int | None = None
) -> tuple[datetime | None, list[TrendMonth]]:
    """The last 12 calendar months (UTC) up to the last portfolio pass, oldest first, as that
    pass computed them: revenue and gross profit of the placed orders of the month, and, from
    the score snapshots, each account's last evaluation of the month: how many were key or
    strategic, how many of those were at high or critical risk, and their mean risk. A month
    without evaluations has no tier figures (null). Before the first pass: the months up to
    ``now``, empty."""
    computed_at, figures = await stored_summary(session, manager_id=manager_id)
    stored = figures.get("trend")
    if stored is not None:
        return computed_at, [TrendMonth.model_validate(month) for month in stored]
    as_of = computed_at or now
    empty = []
    for k in range(TREND_MONTHS):
        first = months_before(as_of, TREND_MONTHS - 1 - k)
        empty.append(
            TrendMonth(
                month=date(first.year, first.month, 1),
                to_date=k == TREND_MONTHS - 1,
                revenue=Decimal("0.00"),
                gross_profit=Decimal("0.00"),
                evaluated_accounts=0,
                key_accounts=None,
                at_risk_key_accounts=None,
                mean_risk_key_accounts=None,
            )
        )
    return computed_at, empty


async def portfolio(session: AsyncSession, *, viewer: Principal, now: datetime) -> Portfolio:
    """The portfolio KPIs ``viewer`` may see, with the managers' loads: everything, or for a
    key restricted to a manager, that manager's accounts and load alone."""
    manager_id = await viewer_manager_id(session, viewer)
    kpis = await portfolio_kpis(session, now=now, manager_id=manager_id)
    managers = await manager_loads(session, manager_id=manager_id) if manager_id != -1 else []
    return Portfolio(
        **dict(kpis),
        managers=managers,
        managers_over_capacity=sum(m.over_capacity for m in managers),
        unassigned_key_accounts=(
            await unassigned_key_accounts(session) if manager_id is None else 0
        ),
    )
