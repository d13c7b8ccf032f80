"""API keys, scopes and the visibility of contact PII."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from services.api.app import create_app
from shared.settings import Settings
from tests import factories
from tests.conftest import MakeKey


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer kam_deadbeef_notarealkey"},
        {"Authorization": "Bearer garbage"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
)
async def test_missing_or_wrong_key_is_401(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await client.post("/v1/orders", json=factories.order(), headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["status"] == 401


async def test_tampered_secret_with_a_real_prefix_is_401(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    key = await make_key("events:write")
    tampered = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    response = await client.post("/v1/orders", json=factories.order(), headers=_bearer(tampered))
    assert response.status_code == 401


async def test_missing_scope_is_403(client: httpx.AsyncClient, make_key: MakeKey) -> None:
    reader = await make_key("accounts:read")
    writer = await make_key("events:write")
    write = await client.post("/v1/orders", json=factories.order(), headers=_bearer(reader))
    assert write.status_code == 403
    assert "events:write" in write.json()["detail"]
    read = await client.get("/v1/accounts", headers=_bearer(writer))
    assert read.status_code == 403
    admin_only = await client.get("/v1/api-keys", headers=_bearer(writer))
    assert admin_only.status_code == 403
    assert (await client.get("/v1/accounts", headers=_bearer(reader))).status_code == 200


async def test_health_needs_no_key(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {
        "status": "ok",
        "postgres": None,
        "redis": None,
    }
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "postgres": "ok", "redis": "ok"}


async def test_revoked_key_is_refused_at_once(
    client: httpx.AsyncClient, admin_headers: dict[str, str], make_key: MakeKey
) -> None:
    created = await client.post(
        "/v1/api-keys", json={"name": "erp", "scopes": ["events:write"]}, headers=admin_headers
    )
    assert created.status_code == 201
    key, prefix = created.json()["key"], created.json()["prefix"]
    assert key.startswith(f"kam_{prefix}_")
    ok = await client.post("/v1/orders", json=factories.order(), headers=_bearer(key))
    assert ok.status_code == 202  # and now the key is in the verifier's cache

    listed = (await client.get("/v1/api-keys", headers=admin_headers)).json()
    erp = next(k for k in listed if k["prefix"] == prefix)
    assert "key" not in erp
    assert erp["last_used_at"] is not None

    revoked = await client.delete(f"/v1/api-keys/{prefix}", headers=admin_headers)
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    refused = await client.post("/v1/orders", json=factories.order(), headers=_bearer(key))
    assert refused.status_code == 401


async def test_unknown_scope_is_rejected(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.post(
        "/v1/api-keys", json={"name": "x", "scopes": ["everything"]}, headers=admin_headers
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"].startswith("body.scopes")


async def test_contact_pii_only_with_pii_scope(
    client: httpx.AsyncClient, admin_headers: dict[str, str], make_key: MakeKey
) -> None:
    await client.post(
        "/v1/contacts", json=factories.contact("A-1", external_id="C-1"), headers=admin_headers
    )
    reader = await make_key("accounts:read")
    pii_reader = await make_key("accounts:read", "pii:read")

    plain = (await client.get("/v1/accounts/A-1/contacts", headers=_bearer(reader))).json()
    assert plain["pii_included"] is False
    [contact] = plain["items"]
    assert contact["external_id"] == "C-1"
    assert contact["role"] == "decision_maker"
    for field in ("name", "email", "phone", "address", "gender", "birth_year"):
        assert contact[field] is None
    assert "Erika" not in str(plain)
    assert "example.com" not in str(plain)

    full = (await client.get("/v1/accounts/A-1/contacts", headers=_bearer(pii_reader))).json()
    assert full["pii_included"] is True
    assert (full["items"][0]["name"], full["items"][0]["email"]) == (
        "Erika Muster",
        "erika@example.com",
    )


async def test_a_key_revoked_elsewhere_is_refused_by_every_process_within_a_second(
    client: httpx.AsyncClient, admin_headers: dict[str, str], settings: Settings
) -> None:
    created = await client.post(
        "/v1/api-keys", json={"name": "erp", "scopes": ["events:write"]}, headers=admin_headers
    )
    key, prefix = created.json()["key"], created.json()["prefix"]
    other = create_app(settings)  # another API process, with its own cache of verified keys
    async with (
        other.router.lifespan_context(other),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=other), base_url="http://other"
        ) as elsewhere,
    ):
        ok = await elsewhere.post("/v1/orders", json=factories.order(), headers=_bearer(key))
        assert ok.status_code == 202  # the key is now in the other process's cache

        revoked = await client.delete(f"/v1/api-keys/{prefix}", headers=admin_headers)
        assert revoked.status_code == 200
        await asyncio.sleep(1.0)
        refused = await elsewhere.post("/v1/orders", json=factories.order(), headers=_bearer(key))
        assert refused.status_code == 401
