"""The scorer's metrics and probes, on a small HTTP port of its own (``KAM_SCORER_HTTP_PORT``).

* ``GET /healthz``: 200 while the process runs (a liveness probe).
* ``GET /readyz``: 200 when Postgres and Redis both answer now, else 503 naming which is down
  (a readiness probe; it asks them on every call).
* ``GET /metrics``: Prometheus text: jobs by function and outcome with their durations, the
  queue's depth, dirty accounts and the age of the oldest, the portfolio pass's duration and
  accounts written, webhook deliveries by status and the age of the oldest pending one. The
  figures read from Postgres and Redis are taken at scrape time.

Jobs are measured by wrapping the worker's functions (``instrument``), so the job modules stay
unaware of metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from arq import Retry
from arq.worker import Worker
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.tracing import instrument_clients, tracer_provider
from shared.queue import PORTFOLIO_JOB
from shared.settings import Settings

log = structlog.get_logger(__name__)

JOBS = Counter(
    "kam_scorer_jobs_total",
    "Jobs run, by function and outcome (success, retry, error, cancelled).",
    ["function", "outcome"],
)
JOB_DURATION = Histogram(
    "kam_scorer_job_duration_seconds",
    "Time a job ran, by function.",
    ["function"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600),
)
PORTFOLIO_PASS_SECONDS = Gauge(
    "kam_portfolio_pass_duration_seconds", "Duration of the last finished portfolio pass."
)
PORTFOLIO_PASS_FINISHED = Gauge(
    "kam_portfolio_pass_last_success_timestamp_seconds",
    "When the last portfolio pass finished (Unix time).",
)
PORTFOLIO_ACCOUNTS_WRITTEN = Gauge(
    "kam_portfolio_pass_accounts_written", "Accounts the last portfolio pass wrote."
)
QUEUE_DEPTH = Gauge("kam_scorer_queue_depth", "Jobs waiting in the queue (due or deferred).")
DIRTY_ACCOUNTS = Gauge("kam_dirty_accounts", "Accounts marked for a rescore.")
OLDEST_DIRTY_AGE = Gauge(
    "kam_dirty_oldest_age_seconds", "Age of the oldest dirty mark (0 when none)."
)
WEBHOOK_DELIVERIES = Gauge(
    "kam_webhook_deliveries",
    "Webhook deliveries by status (pending, succeeded, failed).",
    ["status"],
)
OLDEST_PENDING_DELIVERY_AGE = Gauge(
    "kam_webhook_oldest_pending_age_seconds",
    "Age of the oldest pending webhook delivery (0 when none).",
)
SCRAPE_ERRORS = Counter(
    "kam_scorer_scrape_errors_total",
    "Scrapes whose figures from Postgres or Redis could not be read (the last ones stay).",
    ["source"],
)

_PORTFOLIO_FUNCTIONS = {PORTFOLIO_JOB, f"cron:{PORTFOLIO_JOB}"}
_CHECK_TIMEOUT_S = 2.0


def start_tracing(ctx: dict[str, Any]) -> None:
    """Trace the worker's jobs and their clients when the ``OTEL_*`` variables ask for it
    (``services/tracing.py``); a provider already in ``ctx`` (tests) is used as it is."""
    provider = ctx.get("tracer_provider") or tracer_provider("kam-scorer")
    if provider is None:
        return
    ctx["tracer_provider"] = provider
    instrument_clients(provider, ctx["engine"])


def instrument(worker: Worker) -> Worker:
    """Measure every function and cron job of ``worker``."""
    for name, function in worker.functions.items():
        function.coroutine = _measured(name, function.coroutine)
    return worker


def _measured(name: str, coroutine: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(coroutine)
    async def run(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        outcome = "error"
        provider: TracerProvider | None = ctx.get("tracer_provider")
        span = (
            provider.get_tracer("kam.scorer").start_as_current_span(f"job {name}")
            if provider is not None
            else contextlib.nullcontext()
        )
        try:
            with span:
                result = await coroutine(ctx, *args, **kwargs)
            outcome = "success"
        except Retry:
            outcome = "retry"
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"  # a timeout, or the worker stopping
            raise
        finally:
            elapsed = time.perf_counter() - started
            JOBS.labels(name, outcome).inc()
            JOB_DURATION.labels(name).observe(elapsed)
        if name in _PORTFOLIO_FUNCTIONS:
            PORTFOLIO_PASS_SECONDS.set(elapsed)
            PORTFOLIO_PASS_FINISHED.set(time.time())
            if isinstance(result, int):
                PORTFOLIO_ACCOUNTS_WRITTEN.set(result)
        return result

    return run


_STATE = """
SELECT
    (SELECT count(*) FROM dirty_accounts),
    (SELECT coalesce(extract(epoch FROM now() - min(since)), 0) FROM dirty_accounts),
    (SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)
        FROM webhook_deliveries WHERE status = 'pending')
"""
_DELIVERIES = "SELECT status, count(*) FROM webhook_deliveries GROUP BY status"


async def refresh(ctx: dict[str, Any]) -> None:
    """Read the gauges that describe the state in Postgres and Redis."""
    settings: Settings = ctx["settings"]
    sessionmaker: async_sessionmaker[AsyncSession] = ctx["sessionmaker"]
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT_S), sessionmaker() as session:
            dirty, oldest_dirty, oldest_pending = (await session.execute(text(_STATE))).one()
            rows = (await session.execute(text(_DELIVERIES))).all()
        by_status: dict[str, int] = {str(status): int(n) for status, n in rows}
        DIRTY_ACCOUNTS.set(dirty)
        OLDEST_DIRTY_AGE.set(float(oldest_dirty))
        OLDEST_PENDING_DELIVERY_AGE.set(float(oldest_pending))
        for status in ("pending", "succeeded", "failed"):
            WEBHOOK_DELIVERIES.labels(status).set(by_status.get(status, 0))
    except Exception as exc:
        SCRAPE_ERRORS.labels("postgres").inc()
        log.warning("metrics_unavailable", source="postgres", error=type(exc).__name__)
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT_S):
            QUEUE_DEPTH.set(await ctx["redis"].zcard(settings.queue_name))
    except Exception as exc:
        SCRAPE_ERRORS.labels("redis").inc()
        log.warning("metrics_unavailable", source="redis", error=type(exc).__name__)


async def readiness(ctx: dict[str, Any]) -> dict[str, bool]:
    """Whether Postgres and Redis answer now."""
    sessionmaker: async_sessionmaker[AsyncSession] = ctx["sessionmaker"]

    async def postgres() -> bool:
        try:
            async with asyncio.timeout(_CHECK_TIMEOUT_S), sessionmaker() as session:
                await session.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    async def redis() -> bool:
        try:
            async with asyncio.timeout(_CHECK_TIMEOUT_S):
                await ctx["redis"].ping()
        except Exception:
            return False
        return True

    pg_ok, redis_ok = await asyncio.gather(postgres(), redis())
    return {"postgres": pg_ok, "redis": redis_ok}


class ProbeServer:
    """A minimal HTTP/1.1 server for the three paths above (one request per connection)."""

    def __init__(self, ctx: dict[str, Any]) -> None:
        self._ctx = ctx
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)
        log.info("scorer_http_listening", host=host, port=self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request_line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # headers: nothing here needs them
                method, _, rest = request_line.decode("latin-1").partition(" ")
                path = rest.split(" ", 1)[0].split("?", 1)[0]
                status, content_type, body = await self._answer(method, path)
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + (body if method != "HEAD" else b"")
                )
                await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    async def _answer(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/healthz":
            return "200 OK", "application/json", b'{"status":"ok"}'
        if path == "/readyz":
            state = await readiness(self._ctx)
            ready = all(state.values())
            body = (
                '{"status":"%s","postgres":"%s","redis":"%s"}'  # noqa: UP031 - fixed words
                % (
                    "ok" if ready else "unavailable",
                    "ok" if state["postgres"] else "unavailable",
                    "ok" if state["redis"] else "unavailable",
                )
            ).encode()
            return ("200 OK" if ready else "503 Service Unavailable"), "application/json", body
        if path == "/metrics":
            await refresh(self._ctx)
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest()
        return "404 Not Found", "text/plain", b"not found\n"


async def start_probe_server(ctx: dict[str, Any]) -> ProbeServer | None:
    """Start the probe server when ``KAM_SCORER_HTTP_PORT`` is set; None when it is not."""
    settings: Settings = ctx["settings"]
    if settings.scorer_http_port is None:
        return None
    server = ProbeServer(ctx)
    await server.start(settings.scorer_http_host, settings.scorer_http_port)
    return server
