"""Test fixtures: a real Postgres migrated by alembic once per session, a real Redis, the app
over ASGI, and a real arq worker.

Database: ``KAM_DATABASE_URL`` when set, else an embedded Postgres under ``.kam/test``. Tests use
a database whose name contains ``test``; given another, they create ``<name>_test`` beside it
rather than wiping yours. Redis: ``KAM_REDIS_URL`` (db 15 unless the URL names one), else an
embedded Redis; the test db is flushed before every test.

Every test starts from empty tables. The API commits for real (a 202 must mean "in Postgres",
and the worker must see the data from its own connections), so isolation is by truncation
rather than by a rolled-back outer transaction.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
import httpx
import pytest
from arq.connections import ArqRedis
from fastapi import FastAPI
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.api.app import create_app
from services.api.keys.service import create_api_key, parse_scopes
from services.cli.main import migrate
from services.scorer.worker import create_worker
from shared.db import create_engine, create_sessionmaker
from shared.models import Base
from shared.queue import create_redis
from shared.settings import Environment, Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def service_urls() -> Iterator[tuple[str, str]]:
    database_url = os.environ.get("KAM_DATABASE_URL", "")
    redis_url = os.environ.get("KAM_REDIS_URL", "")
    with ExitStack() as stack:
        if not (database_url and redis_url):
            from services.cli.embedded import embedded_services

            urls = stack.enter_context(embedded_services(ROOT / ".kam" / "test", database="test"))
            database_url = database_url or urls.database_url
            redis_url = redis_url or urls.redis_url
        yield database_url, _test_redis_url(redis_url)


def _test_redis_url(url: str) -> str:
    if url.startswith("unix://"):
        return url if "db=" in url else f"{url}{'&' if '?' in url else '?'}db=15"
    scheme, _, rest = url.partition("://")
    host, _, db = rest.partition("/")
    return f"{scheme}://{host}/{db or '15'}"


def asyncpg_dsn(database_url: str) -> str:
    """The same URL in the form asyncpg itself takes."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _ensure_test_database(database_url: str) -> str:
    url = make_url(database_url)
    name = url.database or "postgres"
    if "test" in name:
        return database_url
    test_name = f"{name}_test"
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", test_name):
            await conn.execute(f'CREATE DATABASE "{test_name}"')
    finally:
        await conn.close()
    return url.set(database=test_name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
async def database_url(service_urls: tuple[str, str]) -> str:
    url = await _ensure_test_database(service_urls[0])
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:  # start from nothing, whatever an earlier run left behind
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    finally:
        await conn.close()
    await asyncio.to_thread(migrate, url)
    return url


@pytest.fixture(scope="session")
def settings(database_url: str, service_urls: tuple[str, str]) -> Settings:
    return Settings(
        env=Environment.test,
        database_url=database_url,
        redis_url=service_urls[1],
        queue_name=f"kam:test:{uuid4().hex[:8]}",
        rescore_debounce_s=0,
        db_connect_timeout_s=2,
        redis_timeout_s=1,
        log_level="WARNING",
        # The webhook receiver of the tests listens on loopback; a hung one is cut after 1 s.
        webhook_allowed_hosts={"127.0.0.1"},
        webhook_timeout_s=1.0,
        # The suite sends many wrong keys from one address; tests/test_ratelimit.py sets its own.
        rate_limit_failed_auth="100000/minute",
        rate_limit_writes="100000/minute",
        rate_limit_reads="100000/minute",
        scorer_http_port=None,  # tests/test_scorer_probes.py opens one of its own
    )


@pytest.fixture(scope="session")
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
async def redis(settings: Settings) -> AsyncIterator[ArqRedis]:
    client = create_redis(settings)
    yield client
    await client.aclose()


@pytest.fixture(autouse=True)
async def _clean_state(engine: AsyncEngine, redis: ArqRedis) -> None:
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    await redis.flushdb()


@pytest.fixture
async def session(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """A session for a test's own reads and setup; it sees what the app committed."""
    async with create_sessionmaker(engine)() as session:
        yield session


@pytest.fixture(scope="session")
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


MakeKey = Callable[..., Awaitable[str]]


@pytest.fixture
def make_key(engine: AsyncEngine) -> MakeKey:
    """``await make_key("events:write", "accounts:read")`` -> a new key's plaintext."""

    async def make(*scopes: str, name: str = "test") -> str:
        async with create_sessionmaker(engine)() as session, session.begin():
            _, plaintext = await create_api_key(
                session, name=name, scopes=parse_scopes(list(scopes))
            )
        return plaintext

    return make


@pytest.fixture
async def admin_key(make_key: MakeKey) -> str:
    return await make_key("admin", name="admin")


@pytest.fixture
async def admin_headers(admin_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {admin_key}"}


RunWorker = Callable[[], Awaitable[Any]]


@pytest.fixture
def run_worker(settings: Settings) -> RunWorker:
    """Run a real arq worker in burst mode until the queue is empty."""

    async def run() -> Any:
        worker = create_worker(settings, burst=True)
        try:
            await worker.main()
        finally:
            await worker.close()
        return worker

    return run
