"""arq worker definition: the functions and crons the scorer runs, and its lifecycle."""

from __future__ import annotations

from typing import Any

import structlog
from arq import cron
from arq.worker import Function, Worker, func

from services.scorer import jobs
from services.scorer.enqueue import (
    DELIVER_WEBHOOK,
    PORTFOLIO_JOB,
    RESCORE_ACCOUNT,
    create_redis,
)
from shared.db import create_engine, create_sessionmaker
from shared.settings import Settings

log = structlog.get_logger(__name__)


async def _startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    ctx["engine"] = create_engine(settings)
    ctx["sessionmaker"] = create_sessionmaker(ctx["engine"])
    log.info("scorer_started", queue=settings.queue_name)


async def _shutdown(ctx: dict[str, Any]) -> None:
    await ctx["engine"].dispose()
    log.info("scorer_stopped")


def functions(settings: Settings) -> list[Function]:
    # keep_result=0: a finished job leaves no result key behind, so the next enqueue with the same
    # job id is accepted at once instead of being swallowed as a duplicate.
    return [
        func(
            jobs.rescore_account,
            name=RESCORE_ACCOUNT,
            keep_result=0,
            timeout=settings.job_timeout_s,
            max_tries=8,
        ),
        func(
            jobs.portfolio_pass,
            name=PORTFOLIO_JOB,
            keep_result=0,
            timeout=settings.portfolio_pass_timeout_s,
            max_tries=5,
        ),
        func(
            jobs.deliver_webhook,
            name=DELIVER_WEBHOOK,
            keep_result=0,
            # the attempt, its two short transactions, and a margin
            timeout=int(settings.webhook_timeout_s) + 30,
            max_tries=5,
        ),
    ]


def _every(interval_s: int) -> set[int]:
    """The seconds of each minute at which a cron with this interval runs."""
    return set(range(0, 60, interval_s)) if interval_s < 60 else {0}


def create_worker(settings: Settings, *, burst: bool = False) -> Worker:
    """A worker bound to the configured Redis and Postgres; ``burst`` drains the queue and stops."""
    sweep_seconds = _every(settings.sweep_interval_s)
    return Worker(
        functions=functions(settings),
        cron_jobs=[
            cron(
                jobs.sweep_dirty_accounts,
                second=sweep_seconds,
                run_at_startup=True,
                unique=True,
                keep_result=0,
                timeout=120,
            ),
            cron(
                jobs.settle_population,
                second=_every(settings.settle_interval_s),
                run_at_startup=False,
                unique=True,
                keep_result=0,
                timeout=60,
            ),
            cron(
                jobs.sweep_webhook_deliveries,
                second=_every(settings.webhook_sweep_interval_s),
                run_at_startup=True,
                unique=True,
                keep_result=0,
                timeout=60,
            ),
            cron(
                jobs.portfolio_pass,
                name=f"cron:{PORTFOLIO_JOB}",
                minute=settings.portfolio_pass_minutes,
                second=0,
                unique=True,
                keep_result=0,
                timeout=settings.portfolio_pass_timeout_s,
            ),
        ],
        redis_pool=create_redis(settings),
        queue_name=settings.queue_name,
        on_startup=_startup,
        on_shutdown=_shutdown,
        ctx={"settings": settings},
        max_jobs=settings.worker_max_jobs,
        job_timeout=settings.job_timeout_s,
        keep_result=0,
        burst=burst,
        poll_delay=0.05,
        handle_signals=not burst,
        health_check_interval=30,
    )
