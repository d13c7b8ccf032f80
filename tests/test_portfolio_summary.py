"""The portfolio summary a pass stores, and the figures the worklist reads from the account
row: checked against the orders and snapshots they are computed from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from services.scorer.passes import (
    rescore_accounts,
    run_portfolio_pass,
    settling_reason,
    summarise_portfolio,
)
from services.scorer.summary import pareto
from shared.db import create_sessionmaker
from shared.models import Account, Order, PortfolioSummary, ScoreSnapshot
from shared.periods import months_before
from tests.portfolio import ordinary_accounts, send

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return create_sessionmaker(engine)


def test_the_pareto_curve_ranks_largest_first_and_marks_the_core() -> None:
    # 100 of 140 in total: 80% is 112, reached with the third account (60 + 30 + 30 >= 112).
    profits = [(Decimal(30), 3), (Decimal(60), 1), (Decimal(30), 2), (Decimal(20), 4)]
    curve = pareto(profits, points=2)
    assert curve["accounts"] == 4
    assert curve["core_accounts"] == 3
    assert curve["points"] == [
        {"share_of_accounts": 0.0, "share_of_gross_profit": 0.0},
        {"share_of_accounts": 0.5, "share_of_gross_profit": 90 / 140},
        {"share_of_accounts": 0.75, "share_of_gross_profit": 120 / 140},
        {"share_of_accounts": 1.0, "share_of_gross_profit": 1.0},
    ]
    # Nothing to share out: no points, no core.
    assert pareto([(Decimal(-5), 1), (Decimal(5), 2)]) == {
        "accounts": 2,
        "core_accounts": 0,
        "points": [],
    }
    assert pareto([]) == {"accounts": 0, "core_accounts": 0, "points": []}


async def test_a_pass_stores_the_summary_and_the_worklist_figures(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    specs = ordinary_accounts(30)
    await send(client, admin_headers, specs, NOW)
    assert await run_portfolio_pass(sessionmaker, now=NOW) == len(specs)
    await summarise_portfolio(sessionmaker, now=NOW)

    # Each account row carries its newest snapshot's listed figures.
    latest = (
        select(ScoreSnapshot)
        .ext(distinct_on(ScoreSnapshot.account_id))
        .order_by(ScoreSnapshot.account_id, ScoreSnapshot.computed_at.desc())
    )
    snapshots = {s.account_id: s for s in await session.scalars(latest)}
    accounts = list(await session.scalars(select(Account)))
    assert len(snapshots) == len(accounts) == len(specs)
    for account in accounts:
        snapshot = snapshots[account.id]
        assert account.revenue_12m == pytest.approx(snapshot.features["revenue_12m"])
        assert account.gross_profit_12m == pytest.approx(snapshot.features["gross_profit_12m"])
        risk = snapshot.drivers["risk"]
        assert account.first_risk_driver == (risk[0]["text"] if risk else None)
        assert account.risk_probability is not None
        assert account.gross_profit_12m is not None
        assert account.gross_profit_at_risk == pytest.approx(
            account.risk_probability * account.gross_profit_12m
        )

    # The stored summary is the pass's, and its money is that of the placed orders.
    [row] = list(await session.scalars(select(PortfolioSummary)))
    assert row.scope == "all"
    assert row.manager_id is None
    assert row.computed_at == NOW
    start = months_before(NOW, 12)
    placed = (Order.status == "placed", Order.ordered_at >= start, Order.ordered_at <= NOW)
    tier = func.coalesce(Account.tier, "unscored")
    revenue_by_tier = {
        t: revenue
        for t, revenue in await session.execute(
            select(tier, func.sum(Order.amount))
            .join(Account, Account.id == Order.account_id)
            .where(*placed)
            .group_by(tier)
        )
    }
    stored = row.figures["tiers"]
    with_revenue = {t: v["revenue_12m"] for t, v in stored.items() if v["revenue_12m"] != "0.00"}
    assert {t: Decimal(v) for t, v in with_revenue.items()} == {
        t: Decimal(v).quantize(Decimal("0.01")) for t, v in revenue_by_tier.items()
    }
    assert sum(v["accounts"] for v in stored.values()) == len(specs)
    costed = await session.scalar(
        select(func.count(func.distinct(Order.account_id))).where(*placed, Order.cost.is_not(None))
    )
    assert costed
    assert row.figures["pareto"]["accounts"] == costed
    trend_from = months_before(NOW, 11).replace(day=1, hour=0, minute=0, second=0)
    trend_revenue = await session.scalar(
        select(func.sum(Order.amount)).where(
            Order.status == "placed", Order.ordered_at >= trend_from, Order.ordered_at <= NOW
        )
    )
    assert trend_revenue is not None
    assert sum(Decimal(m["revenue"]) for m in row.figures["trend"]) == trend_revenue.quantize(
        Decimal("0.01")
    )
    assert row.figures["trend"][-1]["evaluated_accounts"] == len(specs)

    # The API says as of when: the pass.
    body = (await client.get("/v1/portfolio", headers=admin_headers)).json()
    assert datetime.fromisoformat(body["evaluated_at"]) == NOW
    assert Decimal(body["revenue_12m"]) == sum(
        (Decimal(v["revenue_12m"]) for v in stored.values()), Decimal(0)
    )
    curve = (await client.get("/v1/portfolio/pareto", headers=admin_headers)).json()
    assert datetime.fromisoformat(curve["evaluated_at"]) == NOW
    trend = (await client.get("/v1/portfolio/trend", headers=admin_headers)).json()
    assert datetime.fromisoformat(trend["evaluated_at"]) == NOW

    # A later pass replaces the summary.
    later = NOW + timedelta(hours=1)
    await run_portfolio_pass(sessionmaker, now=later)
    await summarise_portfolio(sessionmaker, now=later)
    session.expire_all()
    assert [r.computed_at for r in await session.scalars(select(PortfolioSummary))] == [later]


async def test_the_first_pass_is_asked_for_while_there_is_no_summary(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    specs = ordinary_accounts(12)
    await send(client, admin_headers, specs, NOW)
    ids = list(await session.scalars(select(Account.id)))
    async with sessionmaker() as s, s.begin():
        # Rescores fit the first population facts; no pass has stored a summary yet.
        assert await rescore_accounts(s, account_ids=ids, now=NOW) == len(specs)
    async with sessionmaker() as s:
        assert await settling_reason(s) == "no portfolio summary yet"
    await run_portfolio_pass(sessionmaker, now=NOW)
    await summarise_portfolio(sessionmaker, now=NOW)
    async with sessionmaker() as s:
        assert await settling_reason(s) != "no portfolio summary yet"
