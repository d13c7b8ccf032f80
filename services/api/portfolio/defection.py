"""Defection analysis: the accounts lost in the last 12 months, why they left, what they were
worth, and what risk KAM showed for them before they were marked lost. The accounts and their
figures are those the last portfolio pass stored (``services.scorer.summary``), as of that pass;
the reasons are summed here."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.portfolio.schemas import ChurnReason, Defections, LostAccount
from services.scorer.summary import scope_of
from shared.models import PortfolioSummary
from shared.periods import months_before

LOOKBACK_DAYS = (30, 90, 180)
UNKNOWN_REASON = "not recorded"


async def defection_analysis(
    session: AsyncSession, *, now: datetime, manager_id: int | None = None
) -> Defections:
    """The accounts marked lost in the 12 months up to the last portfolio pass (all, or one
    manager's); ``now`` stands in before the first pass.

    An account is marked lost when the first account event saying ``status: lost`` arrived
    (or, without one on record, at its last update). Its revenue lost is that of its placed
    orders in the 12 months before; the risk shown N days before is that of its last
    evaluation at or before that moment (None: it had not been evaluated yet)."""
    row = (
        await session.execute(
            select(PortfolioSummary.computed_at, PortfolioSummary.lost).where(
                PortfolioSummary.scope == scope_of(manager_id)
            )
        )
    ).first()
    as_of: datetime | None = row[0] if row is not None else None
    stored: list[Any] = row[1] if row is not None else []
    if as_of is None and manager_id is not None:
        # A manager without lost accounts in the window has no row of their own.
        as_of = await session.scalar(
            select(PortfolioSummary.computed_at).where(PortfolioSummary.scope == scope_of(None))
        )
    as_of = as_of or now
    accounts = [LostAccount.model_validate(account) for account in stored]
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
        evaluated_at=as_of,
        window_start=months_before(as_of, 12),
        lost_accounts=len(accounts),
        revenue_12m_lost=sum((a.revenue_12m_lost for a in accounts), Decimal(0)),
        reasons=reasons,
        accounts=accounts,
    )
