"""The one seam through which jobs reach the queue.

Jobs are pushed only after the transaction that made them necessary has committed, and a failure
to push is logged, never raised: the ``dirty`` mark in Postgres is the truth, and the sweeper
re-drives any account whose job was lost (Redis down, wiped, or a crash between commit and push).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import cast

import structlog
from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool
from redis.exceptions import RedisError

from shared.settings import Settings

log = structlog.get_logger(__name__)

RESCORE_ACCOUNT = "rescore_account"
_MAX_IN_FLIGHT = 32


def rescore_job_id(account_id: int) -> str:
    """Fixed per account, so a burst of events for one account coalesces into one job."""
    return f"rescore:{account_id}"


def create_redis(settings: Settings) -> ArqRedis:
    """A lazily connecting client: creating it never fails, a dead Redis fails fast per call."""
    pool = ConnectionPool.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        retry_on_timeout=False,
        max_connections=64,
    )
    redis = cast(ArqRedis, ArqRedis.from_pool(pool))  # the client owns the pool: aclose() closes it
    redis.default_queue_name = settings.queue_name
    return redis


async def enqueue_rescores(redis: ArqRedis, account_ids: Iterable[int], *, defer_s: float) -> int:
    """Ask for a rescore of each account; returns how many pushes failed (0 when all went)."""
    failed, total = await _push_each(
        redis, RESCORE_ACCOUNT, account_ids, job_id=rescore_job_id, defer_s=defer_s
    )
    if failed:
        log.warning("rescores_left_to_sweeper", failed=failed, total=total)
    return failed


DELIVER_WEBHOOK = "deliver_webhook"
# The key of ``session.info`` under which a transaction collects the webhook deliveries it
# created; the commit point pushes their jobs after the commit.
DELIVER_AFTER_COMMIT = "webhook_delivery_ids"


def delivery_job_id(delivery_id: int) -> str:
    """Fixed per delivery: a push by the sweeper while the job waits or runs adds nothing."""
    return f"webhook:{delivery_id}"


async def enqueue_deliveries(redis: ArqRedis, delivery_ids: Iterable[int]) -> int:
    """Ask for each delivery to be attempted now; returns how many pushes failed. The schedule
    is in Postgres: a lost push only waits for the next sweep."""
    failed, total = await _push_each(redis, DELIVER_WEBHOOK, delivery_ids, job_id=delivery_job_id)
    if failed:
        log.warning("deliveries_left_to_sweeper", failed=failed, total=total)
    return failed


async def _push_each(
    redis: ArqRedis,
    function: str,
    ids: Iterable[int],
    *,
    job_id: Callable[[int], str],
    defer_s: float = 0,
) -> tuple[int, int]:
    """Push one job per id (a few at a time); returns (failed, total)."""
    unique = sorted(set(ids))
    if not unique:
        return 0, 0
    semaphore = asyncio.Semaphore(_MAX_IN_FLIGHT)
    redis_down = asyncio.Event()  # one failure is enough: do not wait out a timeout per job

    async def push(item: int) -> bool:
        async with semaphore:
            if redis_down.is_set():
                return False
            try:
                await redis.enqueue_job(
                    function, item, _job_id=job_id(item), _defer_by=defer_s or None
                )
            except (RedisError, OSError) as exc:
                redis_down.set()
                log.warning("enqueue_failed", job=function, id=item, error=type(exc).__name__)
                return False
            return True

    results = await asyncio.gather(*(push(i) for i in unique))
    return results.count(False), len(unique)


PORTFOLIO_JOB = "portfolio_pass"
PORTFOLIO_JOB_ID = "portfolio"


async def enqueue_portfolio_pass(redis: ArqRedis) -> bool:
    """Ask for a portfolio pass now (one at a time: the fixed job id coalesces requests).
    Returns False when Redis is unreachable; the hourly cron still runs the pass."""
    try:
        await redis.enqueue_job(PORTFOLIO_JOB, _job_id=PORTFOLIO_JOB_ID)
    except (RedisError, OSError) as exc:
        log.warning("enqueue_failed", job=PORTFOLIO_JOB, error=type(exc).__name__)
        return False
    return True
