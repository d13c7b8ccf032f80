"""The scoring-policy API: the default version, publishing, validation, scopes, the preview."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from arq.connections import ArqRedis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.scorer.enqueue import PORTFOLIO_JOB_ID
from shared.enums import RiskBand, Tier
from shared.models import Base
from shared.models import ScoringPolicy as ScoringPolicyRow
from shared.policy import DEFAULT_POLICY
from shared.settings import Settings
from tests import factories
from tests.conftest import MakeKey


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_empty_database_answers_the_default_as_version_1(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    response = await client.get(
        "/v1/scoring-policy", headers=_bearer(await make_key("accounts:read"))
    )
    assert response.status_code == 200
    body = response.json()
    assert body["version"] == 1
    assert body["active"] is True
    assert body["policy"] == DEFAULT_POLICY.model_dump(mode="json")
    assert body["created_by"] == "kam"
    assert body["comment"] == "default policy"


async def test_put_publishes_version_2_and_asks_for_a_portfolio_pass(
    client: httpx.AsyncClient,
    make_key: MakeKey,
    session: AsyncSession,
    redis: ArqRedis,
    settings: Settings,
) -> None:
    writer = _bearer(await make_key("policy:write", "accounts:read", name="policy-admin"))
    body = {"policy": {"tiers": {"key_threshold": 65.0}}, "comment": "Raise the key bar."}
    response = await client.put("/v1/scoring-policy", json=body, headers=writer)

    assert response.status_code == 200
    answer = response.json()
    assert answer["version"] == 2
    assert answer["active"] is True
    assert answer["comment"] == "Raise the key bar."
    assert answer["created_by"] == "policy-admin"
    assert answer["policy"]["tiers"]["key_threshold"] == 65.0
    # Fields left out take their defaults.
    assert answer["policy"]["tiers"]["strategic_threshold"] == 75.0
    assert answer["policy"]["risk"] == DEFAULT_POLICY.risk.model_dump(mode="json")

    rows = list(await session.scalars(select(ScoringPolicyRow).order_by(ScoringPolicyRow.version)))
    assert [(r.version, r.active) for r in rows] == [(1, False), (2, True)]
    queued = await redis.zrange(settings.queue_name, 0, -1)
    assert queued == [PORTFOLIO_JOB_ID.encode()]

    current = await client.get("/v1/scoring-policy", headers=writer)
    assert current.json()["version"] == 2


async def test_putting_the_active_policy_again_publishes_nothing(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    redis: ArqRedis,
    settings: Settings,
) -> None:
    body = {"policy": {"risk": {"horizon_days": 120}}, "comment": "longer horizon"}
    first = await client.put("/v1/scoring-policy", json=body, headers=admin_headers)
    await redis.flushdb()
    again = await client.put(
        "/v1/scoring-policy", json=body | {"comment": "retry"}, headers=admin_headers
    )

    assert first.json()["version"] == again.json()["version"] == 2
    assert again.json()["comment"] == "longer horizon"
    assert await session.scalar(select(func.max(ScoringPolicyRow.version))) == 2
    assert await redis.zcard(settings.queue_name) == 0


async def _put_problem(client: httpx.AsyncClient, headers: dict[str, str], body: Any) -> Any:
    response = await client.put("/v1/scoring-policy", json=body, headers=headers)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    return response.json()


async def test_invalid_policies_are_422_naming_the_field(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    unordered = {"tiers": {"strategic_threshold": 50.0, "key_threshold": 60.0}}
    problem = await _put_problem(client, admin_headers, {"policy": unordered})
    assert problem["errors"][0]["field"] == "body.policy.tiers"
    assert "strategic_threshold > key_threshold" in problem["errors"][0]["message"]

    problem = await _put_problem(client, admin_headers, {"policy": {"tiers": {"bogus": 1}}})
    assert problem["errors"][0]["field"] == "body.policy.tiers.bogus"

    bands = {"risk": {"band_thresholds": [0.5, 0.25, 0.75]}}
    problem = await _put_problem(client, admin_headers, {"policy": bands})
    assert problem["errors"][0]["field"] == "body.policy.risk"

    lax = {"risk": {"horizon_days": "90", "signal_weights": {"revenue_decline": True}}}
    problem = await _put_problem(client, admin_headers, {"policy": lax})
    assert [e["field"] for e in problem["errors"]] == [
        "body.policy.risk.horizon_days",
        "body.policy.risk.signal_weights.revenue_decline",
    ]

    problem = await _put_problem(client, admin_headers, {"policy": {}, "comment": "x" * 501})
    assert problem["errors"][0]["field"] == "body.comment"

    problem = await _put_problem(client, admin_headers, {"comment": "no policy"})
    assert problem["errors"][0]["field"] == "body.policy"

    assert await session.scalar(select(func.count()).select_from(ScoringPolicyRow)) == 0


async def test_policy_calls_need_their_scopes(client: httpx.AsyncClient, make_key: MakeKey) -> None:
    reader = _bearer(await make_key("accounts:read"))
    writer = _bearer(await make_key("policy:write"))
    body: dict[str, Any] = {"policy": {}}

    put = await client.put("/v1/scoring-policy", json=body, headers=reader)
    assert put.status_code == 403
    assert "policy:write" in put.json()["detail"]
    preview = await client.post("/v1/scoring-policy/preview", json=body, headers=reader)
    assert preview.status_code == 403
    get = await client.get("/v1/scoring-policy", headers=writer)
    assert get.status_code == 403
    assert (await client.get("/v1/scoring-policy")).status_code == 401


async def test_preview_rejects_an_invalid_draft(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    draft = {"policy": {"hysteresis": {"band": -1}}}
    response = await client.post("/v1/scoring-policy/preview", json=draft, headers=admin_headers)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "body.policy.hysteresis.band"


async def _row_counts(session: AsyncSession) -> dict[str, int]:
    counts = {}
    for table in Base.metadata.sorted_tables:
        counts[table.name] = int(await session.scalar(select(func.count()).select_from(table)) or 0)
    return counts


async def test_preview_answers_the_moves_and_writes_nothing(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    """Needs the scorer's ``preview_policy``."""
    now = datetime.now(UTC)
    manager = await factories.manager_row(session, "M-1")
    big = await factories.account_row(
        session, "A-1", tier=Tier.key, risk_probability=0.2, risk_band=RiskBand.low, manager=manager
    )
    small = await factories.account_row(
        session, "A-2", tier=Tier.standard, risk_probability=0.6, risk_band=RiskBand.high
    )
    for account, amount in ((big, "250000.00"), (small, "900.00")):
        await factories.order_row(
            session, account, amount=amount, cost=None, ordered_at=now - timedelta(days=20)
        )
    await factories.snapshot_row(session, big, computed_at=now - timedelta(hours=1))
    await session.commit()
    before = await _row_counts(session)

    draft = {"policy": {"tiers": {"key_threshold": 30.0, "developing_threshold": 10.0}}}
    response = await client.post("/v1/scoring-policy/preview", json=draft, headers=admin_headers)

    assert response.status_code == 200
    preview = response.json()
    assert preview["accounts"] == 2
    assert sum(preview["tiers_draft"].values()) == 2
    # Both sides evaluated now: under the active policy the big account is not key (revenue
    # under the key minimum); the draft's lower threshold cannot change that either.
    assert sum(preview["tiers_now"].values()) == 2
    assert preview["moved_total"] == len(preview["moved_accounts"])
    assert set(preview["kpis_now"]["tiers"]) == {"strategic", "key", "developing", "standard"}
    assert preview["exact"] is True
    assert await _row_counts(session) == before
    assert await session.scalar(select(func.max(ScoringPolicyRow.version))) == 1


async def _scored_portfolio(
    client: httpx.AsyncClient, admin_headers: dict[str, str], engine: Any
) -> None:
    from services.scorer.passes import run_portfolio_pass
    from shared.db import create_sessionmaker
    from tests.portfolio import AccountSpec, ordinary_accounts, send

    now = datetime.now(UTC).replace(microsecond=0)
    star = AccountSpec("STAR", amount=60_000, margin=0.32, every_days=14, categories=6)
    await send(client, admin_headers, [*ordinary_accounts(40), star], now)
    await run_portfolio_pass(create_sessionmaker(engine))


async def test_previewing_the_active_policy_moves_nothing(
    client: httpx.AsyncClient, admin_headers: dict[str, str], engine: Any
) -> None:
    await _scored_portfolio(client, admin_headers, engine)
    active = (await client.get("/v1/scoring-policy", headers=admin_headers)).json()["policy"]
    response = await client.post(
        "/v1/scoring-policy/preview", json={"policy": active}, headers=admin_headers
    )
    assert response.status_code == 200, response.text
    preview = response.json()
    assert preview["accounts"] == 41
    assert preview["tier_moves"] == []
    assert preview["band_moves"] == []
    assert preview["moved_total"] == 0
    assert preview["moved_accounts"] == []
    assert preview["tiers_now"] == preview["tiers_draft"]
    assert preview["kpis_now"] == preview["kpis_draft"]


async def test_a_preview_lists_the_accounts_that_move_and_the_kpi_deltas(
    client: httpx.AsyncClient, admin_headers: dict[str, str], engine: Any
) -> None:
    await _scored_portfolio(client, admin_headers, engine)
    # Nobody reaches key or strategic any more.
    draft = {"tiers": {"strategic_threshold": 99.9, "key_threshold": 99.8}}
    response = await client.post(
        "/v1/scoring-policy/preview?limit=1", json={"policy": draft}, headers=admin_headers
    )
    assert response.status_code == 200, response.text
    preview = response.json()
    now_key = preview["tiers_now"]["key"] + preview["tiers_now"]["strategic"]
    assert now_key >= 1
    assert preview["tiers_draft"]["key"] + preview["tiers_draft"]["strategic"] == 0
    assert preview["moved_total"] >= now_key
    [moved] = preview["moved_accounts"]  # one page of one
    assert moved["from_tier"] in {"key", "strategic"}
    assert moved["to_tier"] in {"developing", "standard"}
    assert moved["external_id"]
    assert moved["reason"]
    assert preview["kpis_draft"]["key_profit_share"] == 0
    assert preview["kpis_now"]["key_profit_share"] > 0
    now_key_revenue = sum(
        preview["kpis_now"]["tiers"][t]["revenue_12m"] for t in ("key", "strategic")
    )
    assert now_key_revenue > 0
    second = await client.post(
        "/v1/scoring-policy/preview?limit=1&offset=1", json={"policy": draft}, headers=admin_headers
    )
    if preview["moved_total"] > 1:
        assert second.json()["moved_accounts"][0]["external_id"] != moved["external_id"]


async def test_a_preview_of_another_horizon_refits_for_it(
    client: httpx.AsyncClient, admin_headers: dict[str, str], engine: Any
) -> None:
    await _scored_portfolio(client, admin_headers, engine)
    draft = {"risk": {"horizon_days": 180, "occasion_window_days": 3}}
    response = await client.post(
        "/v1/scoring-policy/preview", json={"policy": draft}, headers=admin_headers
    )
    assert response.status_code == 200, response.text
    preview = response.json()
    assert "population facts fitted for the draft's risk settings" in preview["notes"]
    assert preview["exact"] is True
