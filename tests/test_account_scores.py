"""The scored side of accounts: tier overrides, score history, tier changes, drivers on the
account, and the list sorted by risk."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from arq.connections import ArqRedis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.enums import RiskBand, Tier
from shared.models import Account, DirtyAccount
from shared.queue import rescore_job_id
from shared.settings import Settings
from tests import factories
from tests.conftest import MakeKey

OVERRIDE = {"tier": "key", "reason": "Framework contract signed for 2027."}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _queued(redis: ArqRedis, settings: Settings) -> list[bytes]:
    return list(await redis.zrange(settings.queue_name, 0, -1))


async def test_override_is_set_marks_dirty_and_asks_for_a_rescore(
    client: httpx.AsyncClient,
    make_key: MakeKey,
    session: AsyncSession,
    redis: ArqRedis,
    settings: Settings,
) -> None:
    account = await factories.account_row(session, "A-1", tier=Tier.standard)
    await session.commit()
    expires = (datetime.now(UTC) + timedelta(days=90)).replace(microsecond=0)
    body = OVERRIDE | {"expires_at": expires.isoformat()}

    response = await client.put(
        "/v1/accounts/A-1/tier-override",
        json=body,
        headers=_bearer(await make_key("tiers:override")),
    )

    assert response.status_code == 200
    assert response.json() == {
        "external_id": "A-1",
        "tier": "standard",
        "override": {
            "tier": "key",
            "reason": OVERRIDE["reason"],
            "expires_at": expires.isoformat().replace("+00:00", "Z"),
        },
    }
    await session.refresh(account)
    assert account.tier_override == "key"
    assert account.tier_override_reason == OVERRIDE["reason"]
    assert account.tier_override_expires_at == expires
    assert await session.get(DirtyAccount, account.id) is not None
    assert await _queued(redis, settings) == [rescore_job_id(account.id).encode()]

    shown = await client.get("/v1/accounts/A-1", headers=_bearer(await make_key("accounts:read")))
    score = shown.json()["score"]
    assert score["tier_override"] == "key"
    assert score["tier_override_reason"] == OVERRIDE["reason"]


async def test_override_is_lifted_idempotently_and_rescored(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    redis: ArqRedis,
    settings: Settings,
) -> None:
    account = await factories.account_row(session, "A-1", tier=Tier.standard)
    await session.commit()
    await client.put("/v1/accounts/A-1/tier-override", json=OVERRIDE, headers=admin_headers)
    # The rescore ran: the mark and the job are gone.
    await session.delete(await session.get_one(DirtyAccount, account.id))
    await session.commit()
    await redis.flushdb()

    first = await client.delete("/v1/accounts/A-1/tier-override", headers=admin_headers)
    assert first.status_code == 204
    assert first.content == b""
    await session.refresh(account)
    assert account.tier_override is None
    assert account.tier_override_reason is None
    assert account.tier_override_expires_at is None
    assert await session.get(DirtyAccount, account.id) is not None
    assert await _queued(redis, settings) == [rescore_job_id(account.id).encode()]

    second = await client.delete("/v1/accounts/A-1/tier-override", headers=admin_headers)
    assert second.status_code == 204


async def _override_problem(client: httpx.AsyncClient, headers: dict[str, str], body: Any) -> Any:
    response = await client.put("/v1/accounts/A-1/tier-override", json=body, headers=headers)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    return response.json()["errors"][0]


async def test_invalid_overrides_are_422_and_change_nothing(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    account = await factories.account_row(session, "A-1", tier=Tier.standard)
    await session.commit()
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()

    error = await _override_problem(client, admin_headers, OVERRIDE | {"expires_at": past})
    assert error["field"] == "body.expires_at"
    assert "future" in error["message"]
    naive = await _override_problem(
        client, admin_headers, OVERRIDE | {"expires_at": "2099-01-01T00:00:00"}
    )
    assert naive["field"] == "body.expires_at"
    blank = await _override_problem(client, admin_headers, OVERRIDE | {"reason": "   "})
    assert blank["field"] == "body.reason"
    long = await _override_problem(client, admin_headers, OVERRIDE | {"reason": "x" * 501})
    assert long["field"] == "body.reason"
    missing = await _override_problem(client, admin_headers, {"tier": "key"})
    assert missing["field"] == "body.reason"
    tier = await _override_problem(client, admin_headers, OVERRIDE | {"tier": "platinum"})
    assert tier["field"] == "body.tier"

    await session.refresh(account)
    assert account.tier_override is None
    assert await session.get(DirtyAccount, account.id) is None


async def test_override_of_an_unknown_account_is_404(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    put = await client.put("/v1/accounts/NOPE/tier-override", json=OVERRIDE, headers=admin_headers)
    assert put.status_code == 404
    assert put.headers["content-type"] == "application/problem+json"
    delete = await client.delete("/v1/accounts/NOPE/tier-override", headers=admin_headers)
    assert delete.status_code == 404
    assert await session.scalar(select(Account.id)) is None


async def test_override_needs_its_scope(
    client: httpx.AsyncClient, make_key: MakeKey, session: AsyncSession
) -> None:
    await factories.account_row(session, "A-1")
    await session.commit()
    reader = _bearer(await make_key("accounts:read", "policy:write"))
    put = await client.put("/v1/accounts/A-1/tier-override", json=OVERRIDE, headers=reader)
    assert put.status_code == 403
    assert "tiers:override" in put.json()["detail"]
    delete = await client.delete("/v1/accounts/A-1/tier-override", headers=reader)
    assert delete.status_code == 403


async def test_account_shows_the_drivers_of_its_latest_snapshot(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    now = datetime.now(UTC)
    scored = await factories.account_row(session, "A-1", tier=Tier.key)
    await factories.account_row(session, "A-2")
    await factories.snapshot_row(
        session, scored, computed_at=now - timedelta(days=2), driver_code="old"
    )
    await factories.snapshot_row(
        session, scored, computed_at=now - timedelta(hours=1), driver_code="latest"
    )
    await session.commit()

    drivers = (await client.get("/v1/accounts/A-1", headers=admin_headers)).json()["score"]
    assert drivers["drivers"] == factories.drivers("latest")
    unscored = (await client.get("/v1/accounts/A-2", headers=admin_headers)).json()["score"]
    assert unscored["drivers"] is None
    assert unscored["tier"] is None


async def _pages(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], **params: Any
) -> list[list[Any]]:
    pages: list[list[Any]] = []
    cursor = None
    while True:
        query = params | ({"cursor": cursor} if cursor else {})
        response = await client.get(url, params=query, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


async def test_history_is_newest_first_paged_and_bounded_by_time(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    account = await factories.account_row(session, "A-1", tier=Tier.key)
    other = await factories.account_row(session, "A-2", tier=Tier.key)
    for day in range(5):
        await factories.snapshot_row(
            session, account, computed_at=start + timedelta(days=day), value_score=60.0 + day
        )
    # Two evaluations at the same instant are both listed, once each.
    await factories.snapshot_row(session, account, computed_at=start, value_score=59.0)
    await factories.snapshot_row(session, other, computed_at=start, value_score=1.0)
    await session.commit()

    url = "/v1/accounts/A-1/history"
    pages = await _pages(client, url, admin_headers, limit=2)
    assert [len(p) for p in pages] == [2, 2, 2]
    items = [i for p in pages for i in p]
    assert [i["value_score"] for i in items] == [64.0, 63.0, 62.0, 61.0, 59.0, 60.0]
    first = items[0]
    assert first["computed_at"] == "2026-01-05T00:00:00Z"
    assert first["policy_version"] == 1
    assert first["tier"] == "key"
    assert first["risk_band"] == "medium"
    assert first["drivers"] == factories.drivers()
    assert first["features"]["margin_rate"] == 0.21

    bounded = await _pages(
        client, url, admin_headers, since="2026-01-02T00:00:00Z", until="2026-01-04T00:00:00Z"
    )
    assert [i["value_score"] for p in bounded for i in p] == [62.0, 61.0]

    missing = await client.get("/v1/accounts/NOPE/history", headers=admin_headers)
    assert missing.status_code == 404
    bad = await client.get(url, params={"cursor": "nonsense"}, headers=admin_headers)
    assert bad.status_code == 400
    naive = await client.get(url, params={"since": "2026-01-02T00:00:00"}, headers=admin_headers)
    assert naive.status_code == 422


async def test_tier_changes_are_newest_first_and_paged(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    account = await factories.account_row(session, "A-1", tier=Tier.key)
    path = [None, Tier.standard, Tier.developing, Tier.key]
    for seq in range(1, 4):
        await factories.tier_change_row(
            session,
            account,
            seq=seq,
            from_tier=path[seq - 1],
            to_tier=path[seq],  # type: ignore[arg-type]
            changed_at=start + timedelta(days=30 * seq),
        )
    await session.commit()

    pages = await _pages(client, "/v1/accounts/A-1/tier-changes", admin_headers, limit=2)
    assert [len(p) for p in pages] == [2, 1]
    items = [i for p in pages for i in p]
    assert [(i["seq"], i["from_tier"], i["to_tier"]) for i in items] == [
        (3, "developing", "key"),
        (2, "standard", "developing"),
        (1, None, "standard"),
    ]
    assert items[0]["reasons"] == {"tier": [{"code": "score_above_key", "text": "change 3"}]}


async def _risk_setup(session: AsyncSession) -> None:
    manager = await factories.manager_row(session, "M-1")
    rows: list[tuple[str, Tier | None, float | None, RiskBand | None]] = [
        ("A-1", Tier.key, 0.30, RiskBand.medium),
        ("A-2", None, None, None),
        ("A-3", Tier.key, 0.90, RiskBand.critical),
        ("A-4", Tier.standard, 0.95, RiskBand.critical),
        ("A-5", Tier.key, 0.30, RiskBand.medium),
        ("A-6", Tier.strategic, 0.05, RiskBand.low),
        ("A-7", Tier.key, 0.60, RiskBand.high),
        ("A-8", None, None, None),
    ]
    for external_id, tier, risk, band in rows:
        await factories.account_row(
            session,
            external_id,
            tier=tier,
            risk_probability=risk,
            risk_band=band,
            manager=manager if external_id != "A-7" else None,
        )
    await session.commit()


async def test_sort_by_risk_puts_the_riskiest_first_and_unscored_last(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    await _risk_setup(session)
    expected = ["A-4", "A-3", "A-7", "A-1", "A-5", "A-6", "A-2", "A-8"]

    whole = await client.get("/v1/accounts", params={"sort": "risk"}, headers=admin_headers)
    assert [a["external_id"] for a in whole.json()["items"]] == expected

    for limit in (1, 2, 3):
        pages = await _pages(client, "/v1/accounts", admin_headers, sort="risk", limit=limit)
        assert [a["external_id"] for p in pages for a in p] == expected

    default = await client.get("/v1/accounts", headers=admin_headers)
    assert [a["external_id"] for a in default.json()["items"]] == sorted(expected)


async def test_sort_by_risk_combines_with_filters(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    await _risk_setup(session)

    async def ids(**params: Any) -> list[str]:
        pages = await _pages(client, "/v1/accounts", admin_headers, sort="risk", limit=1, **params)
        return [a["external_id"] for p in pages for a in p]

    assert await ids(tier="key") == ["A-3", "A-7", "A-1", "A-5"]
    assert await ids(tier="key", manager="M-1") == ["A-3", "A-1", "A-5"]
    assert await ids(risk_band="critical") == ["A-4", "A-3"]
    assert await ids(tier="key", risk_band="medium", manager="M-1") == ["A-1", "A-5"]


async def test_a_cursor_of_another_sort_is_400(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    await _risk_setup(session)
    by_id = await client.get("/v1/accounts", params={"limit": 1}, headers=admin_headers)
    cursor = by_id.json()["next_cursor"]
    mixed = await client.get(
        "/v1/accounts", params={"sort": "risk", "cursor": cursor}, headers=admin_headers
    )
    assert mixed.status_code == 400
    unknown = await client.get("/v1/accounts", params={"sort": "size"}, headers=admin_headers)
    assert unknown.status_code == 422


async def test_a_control_character_in_a_text_filter_is_422(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.get(
        "/v1/accounts", params={"industry": "v3\x00", "sort": "risk"}, headers=admin_headers
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "query.industry"
