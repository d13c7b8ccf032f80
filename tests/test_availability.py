"""Postgres or Redis away: 503 with Retry-After, nothing acknowledged lost, and recovery without
a restart. The app reaches both through proxies the tests cut and restore."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, make_url, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.app import create_app
from services.scorer.worker import Scorer, create_worker
from shared.models import Account, DirtyAccount, Order
from shared.settings import Settings
from tests import factories
from tests.proxy import CuttableProxy, postgres_target


@pytest.fixture
async def pg_proxy(settings: Settings) -> AsyncIterator[CuttableProxy]:
    url = make_url(settings.database_url)
    query_host = url.query.get("host")
    proxy = CuttableProxy(
        **postgres_target(  # type: ignore[arg-type]
            query_host if isinstance(query_host, str) else None, url.host, url.port
        )
    )
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture
async def redis_proxy(settings: Settings) -> AsyncIterator[CuttableProxy]:
    parts = urlsplit(settings.redis_url)
    if parts.scheme == "unix":
        proxy = CuttableProxy(unix_path=parts.path)
    else:
        proxy = CuttableProxy(host=parts.hostname, port=parts.port or 6379)
    await proxy.start()
    yield proxy
    await proxy.stop()


def _db_url_via(settings: Settings, proxy: CuttableProxy) -> str:
    url = make_url(settings.database_url)
    return url.set(
        host="127.0.0.1",
        port=proxy.listen_port,
        query={k: v for k, v in url.query.items() if k != "host"},
    ).render_as_string(hide_password=False)


def _redis_url_via(settings: Settings, proxy: CuttableProxy) -> str:
    db = "15"
    parts = urlsplit(settings.redis_url)
    if parts.scheme == "unix":
        db = dict(p.split("=") for p in parts.query.split("&") if "=" in p).get("db", "0")
    elif parts.path.strip("/"):
        db = parts.path.strip("/")
    return f"redis://127.0.0.1:{proxy.listen_port}/{db}"


@pytest.fixture
async def proxied(
    settings: Settings, pg_proxy: CuttableProxy, redis_proxy: CuttableProxy
) -> AsyncIterator[httpx.AsyncClient]:
    proxied_settings = settings.model_copy(
        update={
            "database_url": _db_url_via(settings, pg_proxy),
            "redis_url": _redis_url_via(settings, redis_proxy),
        }
    )
    app: FastAPI = create_app(proxied_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


async def test_postgres_down_is_503_then_recovers(
    proxied: httpx.AsyncClient,
    pg_proxy: CuttableProxy,
    admin_headers: dict[str, str],
    session: AsyncSession,
) -> None:
    ok = await proxied.post(
        "/v1/orders", json=factories.order(external_id="SO-1"), headers=admin_headers
    )
    assert ok.status_code == 202

    pg_proxy.cut()
    for call in (
        proxied.post("/v1/orders", json=factories.order(external_id="SO-2"), headers=admin_headers),
        proxied.get("/v1/accounts", headers=admin_headers),
        proxied.post(
            "/v1/events",
            json={"events": [factories.batch_item("order", factories.order(external_id="SO-3"))]},
            headers=admin_headers,
        ),
    ):
        response = await call
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5"
        assert response.headers["content-type"] == "application/problem+json"
        assert "Traceback" not in response.text
    ready = await proxied.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["postgres"] == "unavailable"
    assert ready.json()["redis"] == "ok"

    pg_proxy.restore()
    again = await proxied.post(
        "/v1/orders", json=factories.order(external_id="SO-2"), headers=admin_headers
    )
    assert again.status_code == 202
    assert (await proxied.get("/readyz")).status_code == 200
    # exactly what was acknowledged is stored
    assert set(await session.scalars(select(Order.external_id))) == {"SO-1", "SO-2"}


async def test_redis_down_still_accepts_and_leaves_the_account_for_the_sweeper(
    proxied: httpx.AsyncClient,
    redis_proxy: CuttableProxy,
    admin_headers: dict[str, str],
    session: AsyncSession,
) -> None:
    redis_proxy.cut()
    ready = await proxied.get("/readyz")
    assert ready.status_code == 503
    assert ready.headers["retry-after"] == "5"
    assert ready.json()["redis"] == "unavailable"

    # Postgres is the record: the event is durable and the account stays marked dirty, so the
    # sweeper schedules its rescore once Redis is back. Refusing the event would only make the
    # producer resend it.
    response = await proxied.post("/v1/orders", json=factories.order("A-1"), headers=admin_headers)
    assert response.status_code == 202
    dirty = await session.scalar(
        select(Account.external_id).join(DirtyAccount).where(Account.external_id == "A-1")
    )
    assert dirty == "A-1"

    redis_proxy.restore()
    assert (await proxied.get("/readyz")).status_code == 200


@pytest.mark.parametrize(
    ("error", "retry_after"),
    [
        (asyncpg.exceptions.DeadlockDetectedError("deadlock detected"), "1"),
        (asyncpg.exceptions.SerializationError("could not serialize access"), "1"),
        (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"), "5"),
    ],
)
async def test_driver_errors_are_503_not_500(
    settings: Settings, error: Exception, retry_after: str
) -> None:
    """Statements after the first in an ingestion transaction go straight to asyncpg, so its
    own exceptions must be answered like SQLAlchemy's wrapped ones."""
    app = create_app(settings)

    @app.get("/boom")
    async def boom() -> None:
        raise error

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/boom")
    assert response.status_code == 503
    assert response.headers["retry-after"] == retry_after
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("fault", ["cut", "hang"])
async def test_redis_away_costs_a_write_at_most_the_enqueue_budget(
    proxied: httpx.AsyncClient,
    redis_proxy: CuttableProxy,
    admin_headers: dict[str, str],
    settings: Settings,
    session: AsyncSession,
    fault: str,
) -> None:
    getattr(redis_proxy, fault)()
    latencies = []
    for n in range(8):
        started = time.monotonic()
        response = await proxied.post(
            "/v1/orders", json=factories.order(f"A-{n}"), headers=admin_headers
        )
        latencies.append(time.monotonic() - started)
        assert response.status_code == 202
    # A hung Redis used to cost every write at least one socket timeout, one after another.
    assert max(latencies) < settings.redis_timeout_s
    assert await session.scalar(select(func.count()).select_from(DirtyAccount)) == 8
    redis_proxy.restore()


def _scorer_via(
    settings: Settings, *, pg: CuttableProxy | None = None, redis: CuttableProxy | None = None
) -> Scorer:
    update: dict[str, Any] = {"sweep_interval_s": 1}
    if pg is not None:
        update["database_url"] = _db_url_via(settings, pg)
    if redis is not None:
        update["redis_url"] = _redis_url_via(settings, redis)
    return create_worker(settings.model_copy(update=update))


async def _wait_clean(session: AsyncSession, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await session.rollback()
        if not await session.scalar(select(func.count()).select_from(DirtyAccount)):
            return True
        await asyncio.sleep(0.2)
    return False


@pytest.mark.parametrize("fault", ["cut", "hang"])
async def test_the_scorer_rides_out_a_redis_outage(
    client: httpx.AsyncClient,
    redis_proxy: CuttableProxy,
    admin_headers: dict[str, str],
    settings: Settings,
    session: AsyncSession,
    fault: str,
) -> None:
    scorer = _scorer_via(settings, redis=redis_proxy)
    running = asyncio.create_task(scorer.main())
    try:
        await client.post("/v1/orders", json=factories.order("A-1"), headers=admin_headers)
        assert await _wait_clean(session, 10)

        getattr(redis_proxy, fault)()
        await client.post("/v1/orders", json=factories.order("A-2"), headers=admin_headers)
        await asyncio.sleep(3)  # longer than the socket timeout: polls fail meanwhile
        assert not running.done()  # it used to exit here
        assert scorer.redis_outage.ongoing

        redis_proxy.restore()
        assert await _wait_clean(session, 15)
        assert not scorer.redis_outage.ongoing
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await scorer.close()


async def test_the_scorer_rides_out_a_postgres_outage(
    client: httpx.AsyncClient,
    pg_proxy: CuttableProxy,
    admin_headers: dict[str, str],
    settings: Settings,
    session: AsyncSession,
) -> None:
    scorer = _scorer_via(settings, pg=pg_proxy)
    running = asyncio.create_task(scorer.main())
    try:
        pg_proxy.cut()
        await client.post("/v1/orders", json=factories.order("A-1"), headers=admin_headers)
        await asyncio.sleep(2)
        assert not running.done()
        assert scorer.ctx["postgres_outage"].ongoing
        pg_proxy.restore()
        assert await _wait_clean(session, 20)  # the job's retry, or the sweeper's push
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await scorer.close()
