"""Portfolio KPIs, checked against numbers worked out by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.portfolio.service import months_before
from services.scorer.summary import store_portfolio_summaries
from shared.enums import RiskBand, Tier
from tests import factories
from tests.conftest import MakeKey


def _ago(days: int) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


async def _book(session: AsyncSession) -> None:
    """Seven accounts, two managers (M-1 over capacity), orders inside the window, in the
    12 months before it, and older than both."""
    m1 = await factories.manager_row(session, "M-1", capacity=1)
    m2 = await factories.manager_row(session, "M-2", capacity=9)
    strategic = await factories.account_row(
        session,
        "A-S",
        tier=Tier.strategic,
        risk_probability=0.8,
        risk_band=RiskBand.critical,
        manager=m1,
    )
    key = await factories.account_row(
        session, "A-K", tier=Tier.key, risk_probability=0.1, risk_band=RiskBand.low, manager=m1
    )
    await factories.account_row(
        session, "A-K2", tier=Tier.key, risk_probability=0.6, risk_band=RiskBand.high, manager=m1
    )
    await factories.account_row(
        session, "A-K3", tier=Tier.key, risk_probability=0.2, risk_band=RiskBand.low
    )
    developing = await factories.account_row(session, "A-D", tier=Tier.developing, manager=m2)
    lost = await factories.account_row(session, "A-T", tier=Tier.standard, status="lost")
    unscored = await factories.account_row(session, "A-U", manager=m2)

    order = factories.order_row
    # A-S: 1000 (cost 600) and 500 (cost unknown) in the window; 400 the year before.
    await order(session, strategic, amount="1000.00", cost="600.00", ordered_at=_ago(30))
    await order(session, strategic, amount="500.00", cost=None, ordered_at=_ago(200))
    await order(session, strategic, amount="400.00", cost="100.00", ordered_at=_ago(400))
    # A-K: 2000 (cost 1500); a cancelled order that counts for nothing; 300 the year before.
    await order(session, key, amount="2000.00", cost="1500.00", ordered_at=_ago(60))
    await order(
        session, key, amount="9999.00", cost="1.00", ordered_at=_ago(10), status="cancelled"
    )
    await order(session, key, amount="300.00", cost="200.00", ordered_at=_ago(500))
    # A-D: 800 (cost 500) in the window; one order older than both windows.
    await order(session, developing, amount="800.00", cost="500.00", ordered_at=_ago(100))
    await order(session, developing, amount="700.00", cost="100.00", ordered_at=_ago(800))
    # A-T (lost): bought in both windows, still not retained.
    await order(session, lost, amount="100.00", cost="50.00", ordered_at=_ago(20))
    await order(session, lost, amount="600.00", cost="300.00", ordered_at=_ago(450))
    # A-U: bought the year before only.
    await order(session, unscored, amount="200.00", cost="100.00", ordered_at=_ago(700))

    survey = factories.survey_row
    await survey(session, strategic, satisfaction=5, occurred_at=_ago(10))
    await survey(session, key, satisfaction=2, occurred_at=_ago(40))
    await survey(session, developing, satisfaction=4, occurred_at=_ago(5))
    await survey(session, key, satisfaction=1, occurred_at=_ago(400))  # before the window
    await session.commit()
    # The window's figures are those the portfolio pass summarises (here without rescoring,
    # so that the tiers stay the ones set above).
    await store_portfolio_summaries(session, now=datetime.now(UTC))
    await session.commit()


def _tiers(body: dict[str, Any]) -> dict[str, tuple[int, int, str, str]]:
    return {
        t["tier"]: (t["accounts"], t["active_accounts"], t["revenue_12m"], t["gross_profit_12m"])
        for t in body["tiers"]
    }


async def test_portfolio_kpis_match_the_hand_computed_figures(
    client: httpx.AsyncClient, make_key: MakeKey, session: AsyncSession
) -> None:
    await _book(session)
    response = await client.get(
        "/v1/portfolio", headers={"Authorization": f"Bearer {await make_key('accounts:read')}"}
    )
    assert response.status_code == 200
    body = response.json()

    assert [t["tier"] for t in body["tiers"]] == [
        "strategic",
        "key",
        "developing",
        "standard",
        "unscored",
    ]
    assert _tiers(body) == {
        "strategic": (1, 1, "1500.00", "400.00"),
        "key": (3, 3, "2000.00", "500.00"),
        "developing": (1, 1, "800.00", "300.00"),
        "standard": (1, 0, "100.00", "50.00"),
        "unscored": (1, 1, "0.00", "0.00"),
    }
    assert body["accounts"] == 7
    assert Decimal(body["revenue_12m"]) == Decimal("4400.00")
    assert Decimal(body["gross_profit_12m"]) == Decimal("1250.00")
    assert body["key_share_of_gross_profit"] == pytest.approx(900 / 1250)
    assert body["key_share_of_revenue"] == pytest.approx(3500 / 4400)
    # Base: A-S, A-K, A-T, A-U bought the year before; A-S and A-K again, A-T is lost.
    assert body["retention"] == {"rate": 0.5, "base_accounts": 4, "retained_accounts": 2}
    assert body["satisfaction"]["answers"] == 3
    assert body["satisfaction"]["average"] == pytest.approx(11 / 3)

    at_risk = body["at_risk_key_accounts"]
    assert at_risk["count"] == 2
    assert [
        (a["external_id"], a["risk_band"], a["manager_external_id"]) for a in at_risk["accounts"]
    ] == [
        ("A-S", "critical", "M-1"),
        ("A-K2", "high", "M-1"),
    ]
    assert at_risk["accounts"][0]["name"] == "A-S GmbH"

    assert body["managers"] == [
        {
            "external_id": "M-1",
            "name": "M-1",
            "capacity": 1,
            "key_accounts": 3,
            "accounts": 3,
            "over_capacity": True,
        },
        {
            "external_id": "M-2",
            "name": "M-2",
            "capacity": 9,
            "key_accounts": 0,
            "accounts": 2,
            "over_capacity": False,
        },
    ]
    assert body["managers_over_capacity"] == 1
    assert body["unassigned_key_accounts"] == 1
    window_start = datetime.fromisoformat(body["window_start"])
    assert window_start == months_before(datetime.fromisoformat(body["evaluated_at"]), 12)


async def test_a_managers_portfolio_covers_their_accounts_only(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    await _book(session)

    m1 = (await client.get("/v1/managers/M-1/portfolio", headers=admin_headers)).json()
    assert _tiers(m1) == {
        "strategic": (1, 1, "1500.00", "400.00"),
        "key": (2, 2, "2000.00", "500.00"),
        "developing": (0, 0, "0.00", "0.00"),
        "standard": (0, 0, "0.00", "0.00"),
        "unscored": (0, 0, "0.00", "0.00"),
    }
    assert m1["key_share_of_gross_profit"] == 1.0
    assert m1["retention"] == {"rate": 1.0, "base_accounts": 2, "retained_accounts": 2}
    assert m1["satisfaction"] == {"average": 3.5, "answers": 2}
    assert m1["at_risk_key_accounts"]["count"] == 2
    assert m1["manager"] == {
        "external_id": "M-1",
        "name": "M-1",
        "capacity": 1,
        "key_accounts": 3,
        "accounts": 3,
        "over_capacity": True,
    }

    m2 = (await client.get("/v1/managers/M-2/portfolio", headers=admin_headers)).json()
    assert m2["accounts"] == 2
    assert m2["retention"] == {"rate": 0.0, "base_accounts": 1, "retained_accounts": 0}
    assert m2["key_share_of_gross_profit"] == 0.0
    assert m2["satisfaction"] == {"average": 4.0, "answers": 1}
    assert m2["at_risk_key_accounts"] == {"count": 0, "accounts": []}
    assert m2["manager"]["over_capacity"] is False

    # The lost account, with the revenue of its 12 months before it was lost (600 is older).
    lost = (await client.get("/v1/portfolio/lost", headers=admin_headers)).json()
    assert [(a["external_id"], a["revenue_12m_lost"]) for a in lost["accounts"]] == [
        ("A-T", "100.00")
    ]
    assert lost["reasons"] == [
        {"reason": "not recorded", "accounts": 1, "revenue_12m_lost": "100.00"}
    ]


async def test_unknown_manager_is_404(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.get("/v1/managers/NOPE/portfolio", headers=admin_headers)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


async def test_an_empty_portfolio_has_zeros_and_no_rates(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    body = (await client.get("/v1/portfolio", headers=admin_headers)).json()
    assert body["accounts"] == 0
    assert body["revenue_12m"] == "0.00"
    assert body["key_share_of_gross_profit"] is None
    assert body["key_share_of_revenue"] is None
    assert body["retention"] == {"rate": None, "base_accounts": 0, "retained_accounts": 0}
    assert body["satisfaction"] == {"average": None, "answers": 0}
    assert body["managers"] == []


async def test_portfolio_needs_accounts_read(client: httpx.AsyncClient, make_key: MakeKey) -> None:
    writer = {"Authorization": f"Bearer {await make_key('events:write')}"}
    assert (await client.get("/v1/portfolio", headers=writer)).status_code == 403
    assert (await client.get("/v1/managers/M-1/portfolio", headers=writer)).status_code == 403


def test_months_before_clamps_to_the_end_of_the_month() -> None:
    assert months_before(datetime(2024, 2, 29, 12, tzinfo=UTC), 12) == datetime(
        2023, 2, 28, 12, tzinfo=UTC
    )
    assert months_before(datetime(2026, 3, 31, tzinfo=UTC), 1) == datetime(2026, 2, 28, tzinfo=UTC)
    assert months_before(datetime(2026, 1, 15, tzinfo=UTC), 24) == datetime(2024, 1, 15, tzinfo=UTC)
