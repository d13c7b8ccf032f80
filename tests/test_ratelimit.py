"""Rate limits on a real Redis: per key for writes and reads, per address for failed
authentication (with a lock-out), shared by replicas, 429 problems with their headers, and a
Redis outage (a real redis-server, killed) that lets requests through."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI

from services.api.app import create_app
from services.api.ratelimit import RATE_LIMIT_ERRORS
from shared.settings import Settings
from tests import factories
from tests.conftest import MakeKey

LIMITS = {
    "rate_limit_writes": "3/minute",
    "rate_limit_reads": "5/minute",
    "rate_limit_failed_auth": "4/minute",
}


@asynccontextmanager
async def _client(app: FastAPI, address: str = "10.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=(address, 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@asynccontextmanager
async def _app(settings: Settings, **changes: object) -> AsyncIterator[FastAPI]:
    app = create_app(settings.model_copy(update={**LIMITS, **changes}))
    async with app.router.lifespan_context(app):
        yield app


def _assert_429(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert response.headers["ratelimit-limit"] == str(limit)
    assert response.headers["ratelimit-remaining"] == "0"
    assert response.headers["ratelimit-reset"] == str(retry_after)
    assert response.headers["ratelimit-policy"] == f"{limit};w=60"
    assert response.json()["status"] == 429


async def test_writes_and_reads_are_limited_per_key(settings: Settings, make_key: MakeKey) -> None:
    key = {"Authorization": f"Bearer {await make_key('events:write', 'accounts:read')}"}
    other = {"Authorization": f"Bearer {await make_key('events:write')}"}
    async with _app(settings) as app, _client(app) as client:
        for _ in range(3):
            r = await client.post("/v1/orders", json=factories.order(), headers=key)
            assert r.status_code == 202, r.text
        _assert_429(await client.post("/v1/orders", json=factories.order(), headers=key), 3)
        # Reads have a limit of their own, and another key is counted apart.
        assert (await client.get("/v1/accounts", headers=key)).status_code == 200
        r = await client.post("/v1/orders", json=factories.order(), headers=other)
        assert r.status_code == 202
        for _ in range(4):
            assert (await client.get("/v1/accounts", headers=key)).status_code == 200
        _assert_429(await client.get("/v1/accounts", headers=key), 5)


async def test_limits_are_shared_by_replicas(settings: Settings, make_key: MakeKey) -> None:
    key = {"Authorization": f"Bearer {await make_key('events:write')}"}
    async with (
        _app(settings) as one,
        _app(settings) as two,
        _client(one) as a,
        _client(two) as b,
    ):
        for client in (a, b, a):
            r = await client.post("/v1/orders", json=factories.order(), headers=key)
            assert r.status_code == 202
        _assert_429(await b.post("/v1/orders", json=factories.order(), headers=key), 3)


async def test_failed_authentication_locks_the_address_out(
    settings: Settings, make_key: MakeKey
) -> None:
    good = {"Authorization": f"Bearer {await make_key('accounts:read')}"}
    bad = {"Authorization": "Bearer kam_00000000_wrong"}
    async with _app(settings) as app, _client(app) as client:
        for _ in range(4):
            assert (await client.get("/v1/accounts", headers=bad)).status_code == 401
        _assert_429(await client.get("/v1/accounts", headers=bad), 4)
        # Locked out: even the right key waits, so keys cannot be guessed at speed.
        _assert_429(await client.get("/v1/accounts", headers=good), 4)
        # A bad body without a key counts alike (it is answered before the body is judged).
        r = await client.post("/v1/orders", content=b"{", headers={"content-type": "text/plain"})
        _assert_429(r, 4)
        async with _client(app, address="10.0.0.2") as elsewhere:
            assert (await elsewhere.get("/v1/accounts", headers=good)).status_code == 200
    # Another replica learns it from Redis on the next failure from that address.
    async with _app(settings) as replica, _client(replica) as client:
        _assert_429(await client.get("/v1/accounts", headers=bad), 4)


async def test_rate_limits_can_be_turned_off(settings: Settings, make_key: MakeKey) -> None:
    key = {"Authorization": f"Bearer {await make_key('accounts:read')}"}
    async with _app(settings, rate_limit_enabled=False) as app, _client(app) as client:
        for _ in range(8):
            assert (await client.get("/v1/accounts", headers=key)).status_code == 200


def test_a_limit_that_does_not_parse_is_refused(settings: Settings) -> None:
    with pytest.raises(ValueError, match="not a rate limit"):
        Settings(rate_limit_writes="many per hour")


@pytest.fixture
def own_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own, to be killed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(  # noqa: S603
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],  # noqa: S607
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0", server
    finally:
        server.kill()
        server.wait()


async def test_redis_outage_fails_open_logged_and_counted(
    settings: Settings,
    make_key: MakeKey,
    own_redis: tuple[str, subprocess.Popen[bytes]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, server = own_redis
    key = {"Authorization": f"Bearer {await make_key('accounts:read')}"}
    async with _app(settings, redis_url=url) as app, _client(app) as client:
        for _ in range(5):
            assert (await client.get("/v1/accounts", headers=key)).status_code == 200
        _assert_429(await client.get("/v1/accounts", headers=key), 5)
        server.kill()
        server.wait()
        before = RATE_LIMIT_ERRORS._value.get()
        for _ in range(10):
            assert (await client.get("/v1/accounts", headers=key)).status_code == 200
        # One failure opens the breaker: Redis is not asked again for a while.
        assert RATE_LIMIT_ERRORS._value.get() == before + 1
    assert "rate_limit_unavailable" in capsys.readouterr().out
