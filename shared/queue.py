"""The one seam through which the API and the scorer reach the job queue: job names, job ids,
queue names and the ``enqueue`` functions. Both processes import it; neither imports the other.

Jobs are pushed only after the transaction that made them necessary has committed, and a failure
to push is logged, never raised: the ``dirty`` mark and the pending deliveries in Postgres are the
truth, and the scorer's sweepers re-drive whatever a lost push left behind (Redis down, wiped, or
a crash between commit and push).

Three queues, so that no kind of job waits behind another kind: rescores and the sweepers on the
base queue (``KAM_QUEUE_NAME``), webhook deliveries on ``<base>:webhooks``, the portfolio pass on
``<base>:portfolio``.

A hung or dead Redis costs a request about ``KAM_ENQUEUE_BUDGET_S`` once: each push has that
long, the pushes in flight give up together and the rest of the request's are skipped; after a
failure the pushes of the next ``KAM_ENQUEUE_PAUSE_S`` are skipped at once (left to the
sweepers) instead of each waiting out a connection timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

import structlog
from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession

from shared.settings import Settings

log = structlog.get_logger(__name__)

RESCORE_ACCOUNT = "rescore_account"
DELIVER_WEBHOOKS = "deliver_webhooks"
PORTFOLIO_JOB = "portfolio_pass"
PORTFOLIO_JOB_ID = "portfolio"
# The key of ``session.info`` under which a transaction collects the endpoints it created
# deliveries for; the commit point pushes their jobs after the commit.
DELIVER_AFTER_COMMIT = "webhook_endpoint_ids"

_MAX_IN_FLIGHT = 32
JobKey = TypeVar("JobKey", int, str)


def rescore_queue(base: str) -> str:
    """Rescores and the sweepers: short jobs only, so a lost worker's keys lapse in seconds."""
    return base


def webhook_queue(base: str) -> str:
    """Webhook deliveries: a slow receiver holds a slot here, never a rescore's."""
    return f"{base}:webhooks"


def portfolio_queue(base: str) -> str:
    """The portfolio pass: the one long job, with its own timeout."""
    return f"{base}:portfolio"


def rescore_job_id(account_id: int) -> str:
    """Fixed per account, so a burst of events for one account coalesces into one job."""
    return f"rescore:{account_id}"


def delivery_job_id(endpoint_id: str) -> str:
    """Fixed per endpoint: one job delivers what is due for the endpoint, so one worker sends
    to it at a time (at its concurrency limit), and a push while the job waits adds nothing."""
    return f"webhooks:{endpoint_id}"


class JobRedis(ArqRedis):  # type: ignore[misc]  # arq is untyped
    """arq's client with the enqueue budget and the pause after a failure."""

    enqueue_budget_s: float = 0.25
    enqueue_pause_s: float = 2.0
    paused_until: float = 0.0  # monotonic time before which pushes are skipped

    def pause(self) -> None:
        if not self.is_paused():
            log.warning("enqueue_paused", seconds=self.enqueue_pause_s)
        self.paused_until = time.monotonic() + self.enqueue_pause_s

    def is_paused(self) -> bool:
        return time.monotonic() < self.paused_until


def create_redis(settings: Settings, *, enqueue_budget_s: float | None = None) -> JobRedis:
    """A lazily connecting client: creating it never fails, a dead Redis fails fast per call.
    ``enqueue_budget_s`` overrides the per-call budget (the scorer's sweepers push thousands)."""
    pool = ConnectionPool.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        retry_on_timeout=False,
        max_connections=64,
    )
    redis = cast(JobRedis, JobRedis.from_pool(pool))  # the client owns the pool: aclose() closes it
    redis.default_queue_name = rescore_queue(settings.queue_name)
    redis.enqueue_budget_s = enqueue_budget_s or settings.enqueue_budget_s
    redis.enqueue_pause_s = settings.enqueue_pause_s
    return redis


def deliver_after_commit(session: AsyncSession, endpoint_ids: Iterable[Any]) -> None:
    """Ask the commit point to push these endpoints' delivery jobs once the transaction
    commits (call it with the endpoints of the deliveries the transaction created or made due)."""
    wanted = {str(endpoint_id) for endpoint_id in endpoint_ids}
    if wanted:
        pending: set[str] = session.info.setdefault(DELIVER_AFTER_COMMIT, set())
        pending.update(wanted)


async def enqueue_rescores(redis: ArqRedis, account_ids: Iterable[int], *, defer_s: float) -> int:
    """Ask for a rescore of each account; returns how many pushes failed (0 when all went)."""
    result = await push_jobs(
        redis,
        RESCORE_ACCOUNT,
        account_ids,
        job_id=rescore_job_id,
        queue=rescore_queue(redis.default_queue_name),
        defer_s=defer_s,
    )
    if result.failed:
        log.warning("rescores_left_to_sweeper", failed=result.failed, total=result.total)
    return result.failed


async def enqueue_deliveries(redis: ArqRedis, endpoint_ids: Iterable[str]) -> int:
    """Ask for each endpoint's due deliveries to be attempted now; returns how many pushes
    failed. The schedule is in Postgres: a lost push only waits for the next sweep."""
    result = await push_jobs(
        redis,
        DELIVER_WEBHOOKS,
        endpoint_ids,
        job_id=delivery_job_id,
        queue=webhook_queue(redis.default_queue_name),
    )
    if result.failed:
        log.warning("deliveries_left_to_sweeper", failed=result.failed, total=result.total)
    return result.failed


async def enqueue_portfolio_pass(redis: ArqRedis) -> bool:
    """Ask for a portfolio pass now (one at a time: the fixed job id coalesces requests).
    Returns False when Redis is unreachable; the hourly cron still runs the pass."""
    result = await push_jobs(
        redis,
        PORTFOLIO_JOB,
        [0],
        job_id=lambda _: PORTFOLIO_JOB_ID,
        queue=portfolio_queue(redis.default_queue_name),
        with_argument=False,
    )
    return not result.failed


class PushResult:
    """How a batch of pushes went: ``refused`` are the ids arq turned down because their job
    id is taken (queued, running, or left behind by a dead worker)."""

    __slots__ = ("failed", "refused", "total")

    def __init__(self, *, total: int, failed: int, refused: list[Any]) -> None:
        self.total = total
        self.failed = failed
        self.refused = refused


async def push_jobs(
    redis: ArqRedis,
    function: str,
    ids: Iterable[JobKey],
    *,
    job_id: Callable[[JobKey], str],
    queue: str,
    defer_s: float = 0,
    with_argument: bool = True,
) -> PushResult:
    """Push one job per id (a few at a time), each within the client's enqueue budget."""
    unique = sorted(set(ids))
    if not unique:
        return PushResult(total=0, failed=0, refused=[])
    paused = getattr(redis, "is_paused", None)
    if paused is not None and paused():
        return PushResult(total=len(unique), failed=len(unique), refused=[])
    budget: float | None = getattr(redis, "enqueue_budget_s", None)
    semaphore = asyncio.Semaphore(_MAX_IN_FLIGHT)
    redis_down = asyncio.Event()  # one failure is enough: do not wait out a timeout per job
    outcome: dict[JobKey, bool | None] = {}  # True pushed, None refused, absent failed

    async def push(item: JobKey) -> None:
        async with semaphore:
            if redis_down.is_set():
                return
            args: tuple[Any, ...] = (item,) if with_argument else ()
            try:
                # Per push, not per request: a large batch on a busy but healthy Redis takes
                # as long as it takes, while the pushes in flight to a hung one all give up
                # together after one budget, and the rest are skipped.
                async with asyncio.timeout(budget):
                    job = await redis.enqueue_job(
                        function,
                        *args,
                        _job_id=job_id(item),
                        _queue_name=queue,
                        _defer_by=defer_s or None,
                    )
            except (RedisError, OSError, TimeoutError) as exc:
                if not redis_down.is_set():
                    error = "no answer within the budget" if isinstance(exc, TimeoutError) else ""
                    log.warning("enqueue_failed", job=function, error=error or type(exc).__name__)
                redis_down.set()
                return
            outcome[item] = True if job is not None else None

    await asyncio.gather(*(push(i) for i in unique))
    if redis_down.is_set() and hasattr(redis, "pause"):
        redis.pause()
    refused = [i for i in unique if i in outcome and outcome[i] is None]
    return PushResult(total=len(unique), failed=len(unique) - len(outcome), refused=refused)
