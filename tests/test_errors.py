"""Bad input: problem+json answers naming the field, limits, and never a 500."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.app import create_app
from shared.models import Order
from shared.settings import Settings
from tests import factories


async def test_unknown_and_score_fields_are_rejected(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    for field, value in (
        ("tier", "strategic"),
        ("risk_probability", 0.1),
        ("value_score", 99),
        ("colour", "red"),
    ):
        response = await client.put(
            "/v1/accounts/A-1", json=factories.account() | {field: value}, headers=admin_headers
        )
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["errors"] == [
            {
                "field": f"body.{field}",
                "message": "Extra inputs are not permitted",
                "type": "extra_forbidden",
            }
        ]
        assert field in problem["detail"]


async def test_validation_problem_names_the_field(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.post(
        "/v1/orders", json=factories.order(amount="-1.00"), headers=admin_headers
    )
    problem = response.json()
    assert response.status_code == 422
    assert problem["title"] == "Request validation failed"
    assert problem["instance"] == "/v1/orders"
    assert [e["field"] for e in problem["errors"]] == ["body.amount", "body.lines.0.amount"]
    assert "-1.00" not in response.text  # input values are not echoed back


async def test_null_version_is_refused_at_its_field(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    for name, body in [
        ("version", factories.order() | {"version": None}),
        ("updated_at", factories.order() | {"updated_at": None}),
    ]:
        response = await client.post("/v1/orders", json=body, headers=admin_headers)
        assert response.status_code == 422
        [error] = response.json()["errors"]
        assert error["field"] == f"body.{name}"
        assert "leave it out" in error["message"]

    item = factories.batch_item("order", factories.order() | {"version": None})
    response = await client.post("/v1/events", json={"events": [item]}, headers=admin_headers)
    [result] = response.json()["results"]
    assert result["status"] == "rejected"
    assert [e["field"] for e in result["errors"]] == ["events.0.order.version"]


async def test_body_over_the_limit_is_413(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    big = json.dumps(
        {"events": [factories.batch_item("order", factories.order())], "padding": "x" * 1_100_000}
    )
    response = await client.post(
        "/v1/events", content=big, headers=admin_headers | {"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted on the stream
        for _ in range(12):
            yield b"x" * 100_000

    streamed = await client.post(
        "/v1/events", content=chunks(), headers=admin_headers | {"content-type": "application/json"}
    )
    assert streamed.status_code == 413


async def test_batch_over_the_event_limit_is_refused_whole(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    events = [factories.batch_item("order", factories.order()) for _ in range(1001)]
    response = await client.post("/v1/events", json={"events": events}, headers=admin_headers)
    assert response.status_code == 422
    assert "1001" in response.json()["detail"]
    assert response.json()["errors"][0]["field"] == "body.events"
    assert await session.scalar(select(func.count()).select_from(Order)) == 0


async def test_batch_envelope_errors(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    json_headers = admin_headers | {"content-type": "application/json"}
    for body, field in (
        (b"{not json", "body"),
        (b"[]", "body.events"),
        (b'{"events": []}', "body.events"),
        (b'{"events": [], "extra": 1}', "body.extra"),
    ):
        response = await client.post("/v1/events", content=body, headers=json_headers)
        assert response.status_code == 422, body
        assert response.json()["errors"][0]["field"] == field


async def test_not_found_and_bad_cursor(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    missing = await client.get("/v1/accounts/nope", headers=admin_headers)
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    bad = await client.get("/v1/accounts", params={"cursor": "!!!"}, headers=admin_headers)
    assert bad.status_code == 400
    assert "cursor" in bad.json()["detail"]
    unknown_route = await client.get("/v1/nothing-here", headers=admin_headers)
    assert unknown_route.status_code == 404
    assert unknown_route.headers["content-type"] == "application/problem+json"


async def test_pagination_walks_every_account_once(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    events = [
        factories.batch_item(
            "account",
            factories.account(f"Account {i}", region="north" if i % 2 else "south"),
            external_id=f"A-{i}",
        )
        for i in range(25)
    ]
    await client.post("/v1/events", json={"events": events}, headers=admin_headers)
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": 7, "region": "north"}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/v1/accounts", params=params, headers=admin_headers)).json()
        seen += [item["external_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(f"A-{i}" for i in range(25) if i % 2)
    assert len(seen) == len(set(seen))


async def test_orders_pagination_newest_first(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    events = [
        factories.batch_item(
            "order",
            factories.order(
                "A-1", external_id=f"SO-{day:02d}", ordered_at=f"2026-10-{day:02d}T10:00:00Z"
            ),
        )
        for day in range(1, 13)
    ]
    await client.post("/v1/events", json={"events": events}, headers=admin_headers)
    first = (
        await client.get("/v1/accounts/A-1/orders", params={"limit": 5}, headers=admin_headers)
    ).json()
    assert [o["external_id"] for o in first["items"]] == [f"SO-{d:02d}" for d in (12, 11, 10, 9, 8)]
    second = (
        await client.get(
            "/v1/accounts/A-1/orders",
            params={"limit": 5, "cursor": first["next_cursor"]},
            headers=admin_headers,
        )
    ).json()
    assert [o["external_id"] for o in second["items"]] == [f"SO-{d:02d}" for d in (7, 6, 5, 4, 3)]


async def test_unknown_query_parameter_is_rejected(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.get("/v1/accounts", params={"teir": "key"}, headers=admin_headers)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "query.teir"
    assert (
        await client.get("/v1/accounts", params={"tier": "key"}, headers=admin_headers)
    ).status_code == 200


async def test_implausible_timestamps_are_rejected(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    for ordered_at in ("0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", 1700000000):
        response = await client.post(
            "/v1/orders",
            json=factories.order() | {"ordered_at": ordered_at},
            headers=admin_headers,
        )
        assert response.status_code == 422, ordered_at
        assert response.json()["errors"][0]["field"] == "body.ordered_at"


async def test_timestamps_at_the_edge_of_the_plausible_years(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    """The years are those of the time in UTC, not as written."""
    cases = {
        "1900-01-01T00:30:00+01:00": 422,  # 1899 in UTC
        "1900-01-01T00:30:00-01:00": 202,
        "2200-12-31T23:30:00-01:00": 422,  # 2201 in UTC
        "2200-12-31T22:30:00-01:00": 202,
        "1899-12-31T23:30:00-01:00": 202,  # 1900 in UTC
        "2201-01-01T00:30:00+01:00": 202,  # 2200 in UTC
    }
    for ordered_at, expected in cases.items():
        response = await client.post(
            "/v1/orders",
            json=factories.order() | {"ordered_at": ordered_at},
            headers=admin_headers,
        )
        assert response.status_code == expected, (ordered_at, response.text)


async def test_an_exhausted_pool_says_so_and_asks_for_a_retry(
    settings: Settings, admin_headers: dict[str, str]
) -> None:
    app = create_app(
        settings.model_copy(
            update={"db_pool_size": 1, "db_max_overflow": 0, "db_connect_timeout_s": 0.3}
        )
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with (
            app.state.engine.connect() as held,  # the pool's one connection, taken
            httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
        ):
            await held.execute(select(1))
            response = await client.get("/v1/accounts", headers=admin_headers)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/problem+json"
    assert "too many concurrent requests" in response.json()["detail"].lower()
    assert "unreachable" not in response.text


async def test_a_stalled_body_is_cut_with_408(
    settings: Settings, admin_headers: dict[str, str]
) -> None:
    app = create_app(settings.model_copy(update={"body_read_timeout_s": 0.3}))

    async def stalling() -> AsyncIterator[bytes]:
        yield b'{"events": ['
        await asyncio.sleep(5)
        yield b"]}"

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            started = asyncio.get_running_loop().time()
            response = await client.post("/v1/events", content=stalling(), headers=admin_headers)
            took = asyncio.get_running_loop().time() - started
    assert response.status_code == 408
    assert response.headers["connection"] == "close"
    assert response.headers["content-type"] == "application/problem+json"
    assert took < 5
