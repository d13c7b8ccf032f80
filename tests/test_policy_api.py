"""The scoring-policy API: the default version, publishing, validation, scopes, the preview."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from arq.connections import ArqRedis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.scorer.engine.policy import DEFAULT_POLICY
from shared.enums import RiskBand, Tier
from shared.models import Base
from shared.models import ScoringPolicy as ScoringPolicyRow
from shared.queue import PORTFOLIO_JOB_ID, portfolio_queue
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
    # on the portfolio queue: a long pass never holds up the rescores on the main one
    queued = await redis.zrange(portfolio_queue(settings.queue_name), 0, -1)
    assert queued == [PORTFOLIO_JOB_ID.encode()]
    assert await redis.zcard(settings.queue_name) == 0

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
    assert await redis.zcard(portfolio_queue(settings.queue_name)) == 0


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
    assert {tier: n for tier, n in preview["tiers_now"].items() if n} == {"key": 1, "standard": 1}
    assert await _row_counts(session) == before
    assert await session.scalar(select(func.max(ScoringPolicyRow.version))) == 1
