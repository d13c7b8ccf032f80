"""Defection analysis: the accounts lost in the last 12 months, why they left, what they were
worth, and what risk KAM showed for them before they were marked lost."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from decimal import Decimal

from sqlalchemy import and_, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.portfolio.schemas import ChurnReason, Defections, LostAccount
from services.api.portfolio.service import months_before
from shared.enums import AccountStatus, OrderStatus
from shared.models import Account, IngestEvent, Manager, Order, ScoreSnapshot

LOOKBACK_DAYS = (30, 90, 180)
UNKNOWN_REASON = "not recorded"


async def defection_analysis(
    session: AsyncSession, *, now: datetime, manager_id: int | None = None
) -> Defections:
    """The accounts marked lost in the 12 months up to ``now`` (all, or one manager's).

    An account is marked lost when the first account event saying ``status: lost`` arrived
    (or, without one on record, at its last update). Its revenue lost is that of its placed
    orders in the 12 months before; the risk shown N days before is that of its last
    evaluation at or before that moment (None: it had not been evaluated yet)."""
    marked = (
        select(func.min(IngestEvent.received_at))
        .where(
            IngestEvent.account_external_id == Account.external_id,
            IngestEvent.type == "account",
            IngestEvent.status != "stale",
            IngestEvent.payload["status"].as_string() == AccountStatus.lost.value,
        )
        .scalar_subquery()
    )
    lost = select(
        Account.id,
        Account.external_id,
        Account.name,
        Account.churn_reason,
        Account.tier,
        Manager.external_id.label("manager"),
        func.coalesce(marked, Account.updated_at).label("lost_at"),
    ).outerjoin(Manager, Manager.id == Account.manager_id)
    lost = lost.where(Account.status == AccountStatus.lost.value)
    if manager_id is not None:
        lost = lost.where(Account.manager_id == manager_id)
    lost_cte = lost.cte("lost")

    def risk_before(days: int) -> object:
        return (
            select(ScoreSnapshot.risk_probability)
            .where(
                ScoreSnapshot.account_id == lost_cte.c.id,
                ScoreSnapshot.computed_at
                <= lost_cte.c.lost_at - literal_column(f"interval '{days} days'"),
            )
            .order_by(ScoreSnapshot.computed_at.desc(), ScoreSnapshot.id.desc())
            .limit(1)
            .scalar_subquery()
        )

    revenue = (
        select(func.coalesce(func.sum(Order.amount), 0))
        .where(
            Order.account_id == lost_cte.c.id,
            Order.status == OrderStatus.placed.value,
            and_(
                Order.ordered_at >= lost_cte.c.lost_at - literal_column("interval '12 months'"),
                Order.ordered_at < lost_cte.c.lost_at,
            ),
        )
        .scalar_subquery()
    )
    query = (
        select(
            lost_cte.c.external_id,
            lost_cte.c.name,
            lost_cte.c.churn_reason,
            lost_cte.c.tier,
            lost_cte.c.manager,
            lost_cte.c.lost_at,
            revenue,
            *(risk_before(days) for days in LOOKBACK_DAYS),
        )
        .where(lost_cte.c.lost_at >= months_before(now, 12), lost_cte.c.lost_at <= now)
        .order_by(lost_cte.c.lost_at.desc(), lost_cte.c.external_id)
    )
    accounts = [
        LostAccount(
            external_id=external_id,
            name=name,
            churn_reason=reason,
            tier=tier,
            manager_external_id=manager,
            lost_at=lost_at,
            revenue_12m_lost=Decimal(revenue).quantize(Decimal("0.01")),
            risk_30d_before=r30,
            risk_90d_before=r90,
            risk_180d_before=r180,
        )
        for external_id, name, reason, tier, manager, lost_at, revenue, r30, r90, r180 in (
            await session.execute(query)
        )
    ]
    by_reason: dict[str, list[LostAccount]] = defaultdict(list)
    for account in accounts:
        by_reason[account.churn_reason or UNKNOWN_REASON].append(account)
    reasons = sorted(
        (
            ChurnReason(
                reason=reason,
                accounts=len(items),
                revenue_12m_lost=sum((a.revenue_12m_lost for a in items), Decimal(0)),
            )
            for reason, items in by_reason.items()
        ),
        key=lambda r: (-r.revenue_12m_lost, r.reason),
    )
    return Defections(
        evaluated_at=now,
        window_start=months_before(now, 12),
        lost_accounts=len(accounts),
        revenue_12m_lost=sum((a.revenue_12m_lost for a in accounts), Decimal(0)),
        reasons=reasons,
        accounts=accounts,
    )
