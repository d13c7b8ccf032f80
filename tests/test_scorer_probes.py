"""The scorer's HTTP port: liveness, a readiness that asks Postgres and Redis (one of them
really down), and metrics of jobs, queue, dirty accounts, portfolio pass and webhooks."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine

from services.scorer.observability import ProbeServer
from services.scorer.worker import create_worker
from shared.db import create_engine, create_sessionmaker
from shared.queue import PORTFOLIO_JOB, create_redis, enqueue_portfolio_pass
from shared.settings import Settings
from tests import factories
from tests.conftest import RunWorker
from tests.live import free_port


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@asynccontextmanager
async def _probes(ctx: dict[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    server = ProbeServer(ctx)
    await server.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            yield client
    finally:
        await server.stop()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the metrics")


async def test_metrics_follow_the_work(
    settings: Settings,
    engine: AsyncEngine,
    redis: ArqRedis,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    run_worker: RunWorker,
) -> None:
    ctx = {"settings": settings, "sessionmaker": create_sessionmaker(engine), "redis": redis}
    async with _probes(ctx) as probes:
        assert (await probes.get("/healthz")).status_code == 200
        ready = await probes.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ok", "postgres": "ok", "redis": "ok"}

        for account in ("A-1", "A-2", "A-3"):
            await client.post("/v1/orders", json=factories.order(account), headers=admin_headers)
        text = (await probes.get("/metrics")).text
        assert _metric(text, "kam_dirty_accounts") == 3
        assert _metric(text, "kam_dirty_oldest_age_seconds") >= 0
        assert _metric(text, "kam_scorer_queue_depth") == 3

        rescored = _sample("kam_scorer_jobs_total", function="rescore_account", outcome="success")
        await run_worker()
        assert (
            _sample("kam_scorer_jobs_total", function="rescore_account", outcome="success")
            == rescored + 3
        )
        assert _sample("kam_scorer_job_duration_seconds_count", function="rescore_account") >= 3
        text = (await probes.get("/metrics")).text
        assert _metric(text, "kam_dirty_accounts") == 0
        assert _metric(text, "kam_dirty_oldest_age_seconds") == 0
        assert _metric(text, "kam_scorer_queue_depth") == 0
        assert 'kam_webhook_deliveries{status="pending"}' in text
        assert "kam_webhook_oldest_pending_age_seconds" in text

        passes = _sample("kam_scorer_jobs_total", function=PORTFOLIO_JOB, outcome="success")
        assert await enqueue_portfolio_pass(redis)
        await run_worker()
        assert _sample("kam_scorer_jobs_total", function=PORTFOLIO_JOB, outcome="success") == (
            passes + 1
        )
        text = (await probes.get("/metrics")).text
        assert _metric(text, "kam_portfolio_pass_duration_seconds") > 0
        assert _metric(text, "kam_portfolio_pass_accounts_written") == 3
        assert _metric(text, "kam_portfolio_pass_last_success_timestamp_seconds") > 0

        assert (await probes.get("/nothing")).status_code == 404
        assert (await probes.post("/metrics")).status_code == 405


@pytest.fixture
def own_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
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


async def test_readyz_reports_a_dependency_that_is_down(
    settings: Settings, engine: AsyncEngine, own_redis: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, server = own_redis
    own = settings.model_copy(update={"redis_url": url})
    redis = create_redis(own)
    ctx = {"settings": own, "sessionmaker": create_sessionmaker(engine), "redis": redis}
    try:
        async with _probes(ctx) as probes:
            assert (await probes.get("/readyz")).status_code == 200
            server.kill()
            server.wait()
            down = await probes.get("/readyz")
            assert down.status_code == 503
            assert down.json() == {
                "status": "unavailable",
                "postgres": "ok",
                "redis": "unavailable",
            }
            assert (await probes.get("/healthz")).status_code == 200  # alive all the same
            metrics = await probes.get("/metrics")  # the figures it can read, no error
            assert metrics.status_code == 200
            assert "kam_scorer_scrape_errors_total" in metrics.text
    finally:
        await redis.aclose()

    # Postgres away: nothing listens where the URL points.
    dead = settings.model_copy(
        update={"database_url": f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/x"}
    )
    dead_engine = create_engine(dead)
    redis = create_redis(settings)
    ctx = {"settings": dead, "sessionmaker": create_sessionmaker(dead_engine), "redis": redis}
    try:
        async with _probes(ctx) as probes:
            down = await probes.get("/readyz")
            assert down.status_code == 503
            assert down.json()["postgres"] == "unavailable"
            assert down.json()["redis"] == "ok"
    finally:
        await redis.aclose()
        await dead_engine.dispose()


async def test_worker_opens_its_port_and_closes_it(settings: Settings) -> None:
    worker = create_worker(settings.model_copy(update={"scorer_http_port": 0}), burst=True)
    try:
        await worker.main()
    finally:
        await worker.close()
    server = worker.ctx["probe_server"]
    assert isinstance(server, ProbeServer)  # opened at startup
    assert server._server is not None
    assert not server._server.is_serving()  # and closed at shutdown
