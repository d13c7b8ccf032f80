"""The one seam through which jobs reach the queue.

Jobs are pushed only after the transaction that made them necessary has committed, and a failure
to push is logged, never raised: the ``dirty`` mark in Postgres is the truth, and the sweeper
re-drives any account whose job was lost (Redis down, wiped, or a crash between commit and push).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
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
    ids = sorted(set(account_ids))
    if not ids:
        return 0
    semaphore = asyncio.Semaphore(_MAX_IN_FLIGHT)
    redis_down = asyncio.Event()  # one failure is enough: do not wait out a timeout per account

    async def push(account_id: int) -> bool:
        async with semaphore:
            if redis_down.is_set():
                return False
            try:
                await redis.enqueue_job(
                    RESCORE_ACCOUNT,
                    account_id,
                    _job_id=rescore_job_id(account_id),
                    _defer_by=defer_s or None,
                )
            except (RedisError, OSError) as exc:
                redis_down.set()
                log.warning("enqueue_failed", account_id=account_id, error=type(exc).__name__)
                return False
            return True

    results = await asyncio.gather(*(push(i) for i in ids))
    failed = results.count(False)
    if failed:
        log.warning("rescores_left_to_sweeper", failed=failed, total=len(ids))
    return failed


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
