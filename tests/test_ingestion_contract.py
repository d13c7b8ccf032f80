"""The ingestion contract: optional versions, reused event ids, content types, JSON errors by
line and column, authentication before the body, strict decimals, UTF-8 only, and an OpenAPI
document in standard JSON Schema words."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.body import json_media_type_problem, json_syntax_problem
from shared.models import Order
from tests import factories


def _unversioned(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "version"}


async def _order_state(session: AsyncSession) -> tuple[str, int | None]:
    session.expire_all()
    row = (await session.execute(select(Order.status, Order.source_version))).one()
    return row[0], row[1]


async def test_without_a_version_arrival_order_decides(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    for status in ("placed", "cancelled", "returned"):
        body = _unversioned(factories.order(external_id="SO-1", status=status))
        response = await client.post("/v1/orders", json=body, headers=admin_headers)
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "accepted"
        assert (await _order_state(session))[0] == status
    shown = await client.get("/v1/accounts/A-1/orders", headers=admin_headers)
    assert shown.json()["items"][0]["version"] is None


async def test_mixed_versions_compare_with_the_newest_version_applied(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    async def send(body: dict[str, Any]) -> str:
        response = await client.post("/v1/orders", json=body, headers=admin_headers)
        assert response.status_code == 202, response.text
        return str(response.json()["status"])

    assert await send(factories.order(external_id="SO-1", version=5, status="placed")) == (
        "accepted"
    )
    # No version: applied as it arrives, the stored version stays 5.
    unversioned = _unversioned(factories.order(external_id="SO-1", status="cancelled"))
    assert await send(unversioned) == "accepted"
    assert await _order_state(session) == ("cancelled", 5)
    # A version older than the newest applied is stale, though it arrived later.
    assert await send(factories.order(external_id="SO-1", version=3, status="placed")) == "stale"
    assert await _order_state(session) == ("cancelled", 5)
    assert await send(factories.order(external_id="SO-1", version=6, status="returned")) == (
        "accepted"
    )
    assert await _order_state(session) == ("returned", 6)


async def test_unversioned_events_in_one_batch_the_later_wins(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    events = [
        factories.batch_item("order", _unversioned(factories.order(external_id="SO-1", status=s)))
        for s in ("cancelled", "placed", "returned")
    ]
    response = await client.post("/v1/events", json={"events": events}, headers=admin_headers)
    assert response.status_code == 202, response.text
    assert [r["status"] for r in response.json()["results"]] == ["stale", "stale", "accepted"]
    assert (await _order_state(session))[0] == "returned"


async def test_unversioned_account_is_not_a_stub(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    body = _unversioned(factories.account(name="Nordwerk"))
    response = await client.put("/v1/accounts/A-9", json=body, headers=admin_headers)
    assert response.status_code == 202, response.text
    account = (await client.get("/v1/accounts/A-9", headers=admin_headers)).json()
    assert account["name"] == "Nordwerk"
    assert account["version"] is None
    stubs = await client.get("/v1/accounts", params={"stub": "true"}, headers=admin_headers)
    assert stubs.json()["items"] == []


async def test_reused_event_id_with_another_body_is_a_conflict(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    body = factories.order(event_id="erp-77", external_id="SO-1", amount="10.00")
    assert (await client.post("/v1/orders", json=body, headers=admin_headers)).status_code == 202
    changed = body | {"amount": "11.00"}
    response = await client.post("/v1/orders", json=changed, headers=admin_headers)
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert "erp-77" in response.json()["detail"]
    assert response.json()["errors"][0]["type"] == "event_id_reused"
    assert str(await session.scalar(select(Order.amount))) == "10.00"
    # The same body again, whitespace and key order aside, is still a duplicate.
    text = json.dumps(dict(reversed(body.items())), indent=3)
    again = await client.post(
        "/v1/orders", content=text, headers=admin_headers | {"content-type": "application/json"}
    )
    assert again.status_code == 202
    assert again.json()["status"] == "duplicate"


async def test_reused_event_id_in_a_batch_is_rejected_alone(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    first = factories.batch_item("order", factories.order(event_id="erp-1", amount="1.00"))
    assert (
        await client.post("/v1/events", json={"events": [first]}, headers=admin_headers)
    ).status_code == 202
    other = factories.batch_item("order", factories.order(event_id="erp-2"))
    reused = first | {"amount": "2.00"}
    # The item-by-item path (an invalid item in the batch) checks alike.
    invalid = factories.batch_item("order", factories.order(event_id="erp-3", currency="euro"))
    for events, expected in (
        ([first, reused, other], ["duplicate", "rejected", "accepted"]),
        ([reused, invalid], ["rejected", "rejected"]),
    ):
        response = await client.post("/v1/events", json={"events": events}, headers=admin_headers)
        assert response.status_code == 202, response.text
        results = response.json()["results"]
        assert [r["status"] for r in results] == expected
        assert results[expected.index("rejected")]["errors"][0]["type"] == "event_id_reused"


@pytest.mark.parametrize(
    ("path", "method"),
    [("/v1/orders", "POST"), ("/v1/events", "POST"), ("/v1/accounts/A-1", "PUT")],
)
@pytest.mark.parametrize(
    "content_type", ["text/plain", None, "application/json; charset=latin-1", "application/xml"]
)
async def test_wrong_content_type_is_415(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    path: str,
    method: str,
    content_type: str | None,
) -> None:
    headers = dict(admin_headers)
    if content_type is not None:
        headers["content-type"] = content_type
    response = await client.request(method, path, content=b'{"a": 1}', headers=headers)
    assert response.status_code == 415, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "json" in response.json()["detail"].lower()


async def test_json_suffix_types_are_json(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.post(
        "/v1/orders",
        content=json.dumps(factories.order()),
        headers=admin_headers | {"content-type": "application/vnd.kam+json; charset=UTF-8"},
    )
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("path", ["/v1/orders", "/v1/events"])
async def test_invalid_json_is_named_by_line_and_column(
    client: httpx.AsyncClient, admin_headers: dict[str, str], path: str
) -> None:
    text = '{\n  "event_id": "e-1",\n  "version": 1,,\n}'
    response = await client.post(
        path, content=text, headers=admin_headers | {"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert "line 3, column 16" in response.json()["detail"]
    assert response.json()["errors"][0]["type"] == "json_invalid"


@pytest.mark.parametrize(
    ("content", "content_type"),
    [(b"{not json", "application/json"), (b'{"a": 1}', "text/plain"), (b"\xff\xfe{", None)],
)
@pytest.mark.parametrize("path", ["/v1/orders", "/v1/events"])
async def test_authentication_comes_before_the_body(
    client: httpx.AsyncClient, path: str, content: bytes, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    for auth in ({}, {"Authorization": "Bearer kam_00000000_not-a-real-key"}):
        response = await client.post(path, content=content, headers=headers | auth)
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("amount", ["1_000", " 1.00 ", "1.00 ", "+1.00", "1e3", "0x10"])
async def test_decimals_are_plain_digits(
    client: httpx.AsyncClient, admin_headers: dict[str, str], amount: str
) -> None:
    body = factories.order(amount=amount)
    response = await client.post("/v1/orders", json=body, headers=admin_headers)
    assert response.status_code == 422, response.text
    assert any(e["field"] == "body.amount" for e in response.json()["errors"])


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-8-sig"])
async def test_bodies_must_be_utf8(
    client: httpx.AsyncClient, admin_headers: dict[str, str], encoding: str
) -> None:
    for path in ("/v1/orders", "/v1/events"):
        body = json.dumps(factories.order() if path == "/v1/orders" else {"events": []})
        response = await client.post(
            path,
            content=body.encode(encoding),
            headers=admin_headers | {"content-type": "application/json"},
        )
        assert response.status_code == 422, (encoding, path, response.text)
        assert "UTF-8" in response.json()["detail"]


async def test_invalid_utf8_inside_the_body(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    body = json.dumps(factories.order(external_id="XX")).encode().replace(b'"XX"', b'"\xc3\x28"')
    for path in ("/v1/orders", "/v1/events"):
        response = await client.post(
            path, content=body, headers=admin_headers | {"content-type": "application/json"}
        )
        assert response.status_code == 422, response.text
        assert "UTF-8" in response.json()["detail"]


def test_media_types_pure() -> None:
    assert json_media_type_problem("application/json") is None
    assert json_media_type_problem("Application/JSON; charset=utf-8") is None
    assert json_media_type_problem("application/problem+json") is None
    assert json_media_type_problem("application/jsonx") is not None
    assert json_media_type_problem("application/json; charset=utf-16") is not None
    assert json_media_type_problem(None) is not None


def test_json_syntax_pure() -> None:
    assert json_syntax_problem(b'{"a": [1, 2]}') is None
    problem = json_syntax_problem(b'{"a":\n [1 2]}')
    assert problem is not None
    assert "line 2, column 5" in (problem.detail or "")
    assert json_syntax_problem(b"[" * 100_000) is not None


def test_openapi_bounds_are_standard_json_schema(openapi: dict[str, Any]) -> None:
    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in {"ge", "le", "gt", "lt", "max_digits", "decimal_places"}:
                    found.append(f"{path}/{key}")
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(openapi, "")
    assert found == []
    amount = openapi["components"]["schemas"]["OrderData"]["properties"]["amount"]
    assert amount["anyOf"][0]["minimum"] == 0
    assert amount["anyOf"][1]["pattern"] == "^[0-9]{1,12}(\\.[0-9]{1,2})?$"
    order = openapi["paths"]["/v1/orders"]["post"]
    assert {"401", "403", "409", "413", "415", "422", "429", "503"} <= set(order["responses"])
    assert "version" not in order.get("required", [])


@pytest.fixture
def openapi(client: httpx.AsyncClient) -> dict[str, Any]:
    from services.api.app import create_app
    from shared.settings import Settings

    return create_app(Settings()).openapi()
