"""Portfolio KPIs, computed set-based in Postgres: a fixed handful of statements whatever the
number of accounts, never a query or a Python loop per account."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import TypeVarTuple

from sqlalchemy import ColumnElement, Select, and_, func, select
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.keys.service import Principal
from services.api.portfolio.schemas import (
    AtRiskAccount,
    AtRiskKeyAccounts,
    ManagerLoad,
    ParetoCurve,
    ParetoPoint,
    Portfolio,
    PortfolioKpis,
    Retention,
    Satisfaction,
    TierBandCell,
    TierBucket,
    TierKpi,
    TrendMonth,
)
from shared.enums import AccountStatus, InteractionKind, OrderStatus, RiskBand, Tier
from shared.models import Account, Interaction, Manager, Order, ScoreSnapshot

KEY_TIERS = (Tier.strategic.value, Tier.key.value)
AT_RISK_BANDS = (RiskBand.high.value, RiskBand.critical.value)
AT_RISK_LISTED = 20
_CENT = Decimal("0.01")


def months_before(moment: datetime, months: int) -> datetime:
    """``moment`` minus whole months, clamped to the month's last day, as Postgres does
    (2024-02-29 minus 12 months is 2023-02-28)."""
    index = moment.year * 12 + moment.month - 1 - months
    year, month = divmod(index, 12)
    day = moment.day
    while True:
        try:
            return moment.replace(year=year, month=month + 1, day=day)
        except ValueError:
            day -= 1


Row = TypeVarTuple("Row")


def _in_scope(query: Select[*Row], manager_id: int | None) -> Select[*Row]:
    return query if manager_id is None else query.where(Account.manager_id == manager_id)


def _share(part: Decimal, whole: Decimal) -> float | None:
    return float(part / whole) if whole > 0 else None


async def portfolio_kpis(
    session: AsyncSession, *, now: datetime, manager_id: int | None = None
) -> PortfolioKpis:
    """The KPIs over every account, or over those of one manager: per tier the accounts,
    revenue and gross profit of the 12 months up to ``now``; the key accounts' shares;
    repeat-purchase retention; survey satisfaction; and the key accounts at risk."""
    start = months_before(now, 12)
    previous_start = months_before(now, 24)
    in_window = and_(Order.ordered_at >= start, Order.ordered_at <= now)
    in_previous = and_(Order.ordered_at >= previous_start, Order.ordered_at < start)
    orders = select(
        Order.account_id,
        func.sum(Order.amount).filter(in_window).label("revenue"),
        func.sum(Order.amount - Order.cost)
        .filter(in_window, Order.cost.is_not(None))
        .label("gross_profit"),
        func.bool_or(in_window).label("bought_now"),
        func.bool_or(in_previous).label("bought_before"),
    ).where(
        Order.status == OrderStatus.placed.value,
        Order.ordered_at >= previous_start,
        Order.ordered_at <= now,
    )
    if manager_id is not None:
        orders = orders.where(
            Order.account_id.in_(select(Account.id).where(Account.manager_id == manager_id))
        )
    per_account = orders.group_by(Order.account_id).subquery("per_account")

    active = Account.status == AccountStatus.active.value
    bucket = func.coalesce(Account.tier, TierBucket.unscored.value)
    by_tier = _in_scope(
        select(
            bucket,
            func.count(),
            func.count().filter(active),
            func.coalesce(func.sum(per_account.c.revenue), 0),
            func.coalesce(func.sum(per_account.c.gross_profit), 0),
            func.count().filter(per_account.c.bought_before),
            func.count().filter(per_account.c.bought_before, per_account.c.bought_now, active),
            func.coalesce(
                func.sum(per_account.c.revenue * Account.risk_probability).filter(active), 0
            ),
        )
        .select_from(Account)
        .outerjoin(per_account, per_account.c.account_id == Account.id)
        .group_by(bucket),
        manager_id,
    )
    rows = {row[0]: row[1:] for row in await session.execute(by_tier)}
    tiers = []
    base = retained = 0
    for tier in TierBucket:
        accounts, active_accounts, revenue, gross_profit, before, kept, at_risk = rows.get(
            tier.value, (0, 0, Decimal(0), Decimal(0), 0, 0, 0.0)
        )
        base += before
        retained += kept
        tiers.append(
            TierKpi(
                tier=tier,
                accounts=accounts,
                active_accounts=active_accounts,
                revenue_12m=Decimal(revenue).quantize(_CENT),
                gross_profit_12m=Decimal(gross_profit).quantize(_CENT),
                revenue_at_risk_12m=Decimal(str(at_risk)).quantize(_CENT),
            )
        )
    revenue_total = sum((t.revenue_12m for t in tiers), Decimal(0))
    profit_total = sum((t.gross_profit_12m for t in tiers), Decimal(0))
    key = [t for t in tiers if t.tier.value in KEY_TIERS]
    return PortfolioKpis(
        evaluated_at=now,
        window_start=start,
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
        satisfaction=await _satisfaction(session, start=start, now=now, manager_id=manager_id),
        at_risk_key_accounts=await _at_risk(session, manager_id=manager_id),
    )


async def _satisfaction(
    session: AsyncSession, *, start: datetime, now: datetime, manager_id: int | None
) -> Satisfaction:
    query = select(func.avg(Interaction.satisfaction), func.count(Interaction.satisfaction)).where(
        Interaction.kind == InteractionKind.survey.value,
        Interaction.occurred_at >= start,
        Interaction.occurred_at <= now,
    )
    if manager_id is not None:
        query = query.join(Account, Account.id == Interaction.account_id).where(
            Account.manager_id == manager_id
        )
    average, answers = (await session.execute(query)).one()
    return Satisfaction(average=float(average) if average is not None else None, answers=answers)


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


async def pareto_curve(
    session: AsyncSession, *, now: datetime, manager_id: int | None = None, points: int = 50
) -> ParetoCurve:
    """The 80/20 curve: accounts ranked by gross profit of the 12 months up to ``now``, largest
    first, and the cumulative share of gross profit against the share of accounts, at about
    ``points`` evenly spaced ranks; ``core_accounts`` is how many of the largest bring 80% of it
    (the profit core). Accounts with placed orders whose cost is known count."""
    start = months_before(now, 12)
    gross_profit = func.sum(Order.amount - Order.cost)
    per_account = _in_scope(
        select(Order.account_id, gross_profit.label("gp"))
        .join(Account, Account.id == Order.account_id)
        .where(
            Order.status == OrderStatus.placed.value,
            Order.cost.is_not(None),
            Order.ordered_at >= start,
            Order.ordered_at <= now,
        )
        .group_by(Order.account_id),
        manager_id,
    ).subquery("per_account")
    gp = per_account.c.gp
    ranked = select(
        func.row_number().over(order_by=(gp.desc(), per_account.c.account_id)).label("rank"),
        func.sum(gp)
        .over(order_by=(gp.desc(), per_account.c.account_id), rows=(None, 0))
        .label("cumulative"),
        func.count().over().label("accounts"),
        func.sum(gp).over().label("total"),
        gp.label("gp"),
    ).subquery("ranked")
    rows = (
        await session.execute(
            select(
                ranked.c.rank,
                ranked.c.cumulative,
                ranked.c.accounts,
                ranked.c.total,
                ranked.c.gp,
            ).order_by(ranked.c.rank)
        )
    ).all()
    if not rows or rows[0].total <= 0:
        return ParetoCurve(accounts=len(rows), core_accounts=0, points=[])
    accounts, total = rows[0].accounts, rows[0].total
    core = sum(1 for row in rows if row.cumulative - row.gp < total * Decimal("0.8"))
    step = max(1, accounts // points)
    curve = [ParetoPoint(share_of_accounts=0.0, share_of_gross_profit=0.0)] + [
        ParetoPoint(
            share_of_accounts=row.rank / accounts,
            share_of_gross_profit=float(row.cumulative / total),
        )
        for row in rows
        if row.rank % step == 0 or row.rank == accounts or row.rank == core
    ]
    return ParetoCurve(accounts=accounts, core_accounts=core, points=curve)


async def kpi_trend(
    session: AsyncSession, *, now: datetime, manager_id: int | None = None, months: int = 12
) -> list[TrendMonth]:
    """The last ``months`` calendar months (UTC) up to ``now``, oldest first: revenue and gross
    profit of the placed orders of the month, and, from the score snapshots, each account's
    last evaluation of the month: how many were key or strategic, how many of those were at
    high or critical risk, and their mean risk. A month without evaluations has no tier
    figures (null)."""
    first = months_before(now, months - 1).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    month = func.date_trunc("month", Order.ordered_at, "UTC")
    order_rows = await session.execute(
        _in_scope(
            select(
                month,
                func.sum(Order.amount),
                func.sum(Order.amount - Order.cost).filter(Order.cost.is_not(None)),
            )
            .join(Account, Account.id == Order.account_id)
            .where(
                Order.status == OrderStatus.placed.value,
                Order.ordered_at >= first,
                Order.ordered_at <= now,
            )
            .group_by(month),
            manager_id,
        )
    )
    money = {m.date(): (revenue, profit) for m, revenue, profit in order_rows}
    snapshot_month = func.date_trunc("month", ScoreSnapshot.computed_at, "UTC")
    last_of_month = (
        _in_scope(
            select(
                snapshot_month.label("month"),
                ScoreSnapshot.tier,
                ScoreSnapshot.risk_band,
                ScoreSnapshot.risk_probability,
            )
            .join(Account, Account.id == ScoreSnapshot.account_id)
            .where(ScoreSnapshot.computed_at >= first, ScoreSnapshot.computed_at <= now)
            .ext(distinct_on(snapshot_month, ScoreSnapshot.account_id))
            .order_by(
                snapshot_month,
                ScoreSnapshot.account_id,
                ScoreSnapshot.computed_at.desc(),
                ScoreSnapshot.id.desc(),
            ),
            manager_id,
        )
    ).subquery("last_of_month")
    is_key = last_of_month.c.tier.in_(KEY_TIERS)
    tier_rows = await session.execute(
        select(
            last_of_month.c.month,
            func.count(),
            func.count().filter(is_key),
            func.count().filter(is_key, last_of_month.c.risk_band.in_(AT_RISK_BANDS)),
            func.avg(last_of_month.c.risk_probability).filter(is_key),
        ).group_by(last_of_month.c.month)
    )
    tiers = {m.date(): (n, key, at_risk, risk) for m, n, key, at_risk, risk in tier_rows}
    out = []
    for k in range(months):
        start = months_before(now, months - 1 - k).replace(
            day=1, hour=0, minute=0, second=0, microsecond=0
        )
        revenue, profit = money.get(start.date(), (None, None))
        evaluated, key, at_risk, risk = tiers.get(start.date(), (0, None, None, None))
        out.append(
            TrendMonth(
                month=start.date(),
                to_date=k == months - 1,
                revenue=Decimal(revenue or 0).quantize(_CENT),
                gross_profit=Decimal(profit or 0).quantize(_CENT),
                evaluated_accounts=evaluated,
                key_accounts=key,
                at_risk_key_accounts=at_risk,
                mean_risk_key_accounts=float(risk) if risk is not None else None,
            )
        )
    return out


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
