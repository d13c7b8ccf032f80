"""The scorer process: arq workers for its three roles, their crons, and their lifecycle.

Roles, each an arq worker on a queue of its own (``kam scorer --roles``; all three by default,
in one process, sharing one Postgres engine and one Redis pool):

- ``rescore``: account rescores and the two sweepers, on the base queue. Short jobs only, so
  arq's in-progress key of a job (its function timeout plus 10 s) lives well under a minute.
- ``webhooks``: webhook deliveries, one job per endpoint (so at most
  ``KAM_WEBHOOK_ENDPOINT_CONCURRENCY`` requests to an endpoint at once) in job slots of their
  own, so a slow or dead receiver delays neither scoring nor the other endpoints.
- ``portfolio``: the portfolio pass (hourly cron and on demand), the one long job, alone.

Every role rides out Redis outages (refused or hung): the poll loop backs off (capped at 5 s),
logs once when Redis goes and once when it is back, and carries on; it never exits. A Postgres
outage turns each job into a retry with backoff, also logged once per outage. On SIGTERM or
SIGINT each role stops taking jobs, lets running ones finish for ``KAM_SHUTDOWN_GRACE_S``, then
cancels the rest, which arq hands back to the queue for the next worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

import structlog
from arq import cron
from arq.connections import log_redis_info
from arq.utils import poll
from arq.worker import Worker, func
from redis.exceptions import RedisError

from services.scorer import jobs
from services.scorer.observability import instrument, start_probe_server, start_tracing
from services.scorer.outage import Outage
from services.scorer.reclaim import HEARTBEAT_S, HELD_TTL_S, held_key
from services.scorer.retention import expire_raw_payloads
from shared.db import create_engine, create_sessionmaker
from shared.queue import (
    DELIVER_WEBHOOKS,
    PORTFOLIO_JOB,
    RESCORE_ACCOUNT,
    JobRedis,
    create_redis,
    portfolio_queue,
    rescore_queue,
    webhook_queue,
)
from shared.settings import Settings

log = structlog.get_logger(__name__)

SWEEP_TIMEOUT_S = 30
# The scorer's own pushes (a sweep pushes thousands) get a longer budget than a request's.
WORKER_ENQUEUE_BUDGET_S = 5.0


class Role(StrEnum):
    rescore = "rescore"
    webhooks = "webhooks"
    portfolio = "portfolio"


ALL_ROLES = frozenset(Role)
_REDIS_ERRORS = (RedisError, OSError, TimeoutError)


class ResilientWorker(Worker):  # type: ignore[misc]  # arq is untyped
    """arq's worker, made to survive Redis outages and to keep a heartbeat per running job."""

    def __init__(self, *, role: Role, redis_outage: Outage, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.role = role
        self.redis_outage = redis_outage
        self._last_heartbeat = 0.0

    async def main(self) -> None:
        # arq's main(), with the first contact retried: a worker started while Redis is away
        # waits for it instead of exiting.
        while True:
            try:
                await log_redis_info(self.pool, lambda _: None)
            except _REDIS_ERRORS as exc:
                await asyncio.sleep(self.redis_outage.failed(exc))
                continue
            self.redis_outage.succeeded()
            break
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        async for _ in poll(self.poll_delay_s):
            await self._poll_iteration()
            if self.burst:
                try:
                    queued = await self.pool.zcard(self.queue_name)
                except _REDIS_ERRORS:
                    continue
                if queued == 0:
                    await asyncio.gather(*self.tasks.values(), return_exceptions=True)
                    return

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
            await self._heartbeat()
        except _REDIS_ERRORS as exc:
            await asyncio.sleep(self.redis_outage.failed(exc))
        else:
            self.redis_outage.succeeded()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # arq takes a job slot before the Redis round trip that starts the job and gives it
        # back only on the outcomes it expects: a connection error would leak the slot.
        try:
            await super().start_jobs(job_ids)
        except _REDIS_ERRORS:
            self.job_counter -= 1
            self.sem.release()
            raise

    async def _heartbeat(self) -> None:
        """Tell the sweepers which jobs a live worker holds (see services/scorer/reclaim.py)."""
        now = time.monotonic()
        if now - self._last_heartbeat < HEARTBEAT_S:
            return
        self._last_heartbeat = now
        running = [job_id for job_id, task in self.tasks.items() if not task.done()]
        if running:
            async with self.pool.pipeline(transaction=False) as pipe:
                for job_id in running:
                    pipe.psetex(held_key(job_id), int(HELD_TTL_S * 1000), self.role.value)
                await pipe.execute()

    async def close(self) -> None:
        # The pool and the engine are shared by the roles of the process: the Scorer closes them.
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        with contextlib.suppress(*_REDIS_ERRORS):
            await self.pool.delete(self.health_check_key)


def in_progress_ttl_s(worker: Worker) -> float:
    """How long arq keeps a started job's in-progress key on this worker's queue."""
    return float(worker.in_progress_timeout_s)


def _every(interval_s: int) -> set[int]:
    """The seconds of each minute at which a cron with this interval runs."""
    return set(range(0, 60, interval_s)) if interval_s < 60 else {0}


def _role_kwargs(role: Role, settings: Settings) -> dict[str, Any]:
    # keep_result=0 everywhere: a finished job leaves no result key behind, so the next enqueue
    # with the same job id is accepted at once instead of being swallowed as a duplicate.
    # Each role sets job_timeout to its own longest function, because arq keeps every job's
    # in-progress key for the worker's longest timeout plus 10 s.
    base = settings.queue_name
    if role is Role.rescore:
        return {
            "queue_name": rescore_queue(base),
            "functions": [
                func(
                    jobs.rescore_account,
                    name=RESCORE_ACCOUNT,
                    keep_result=0,
                    timeout=settings.job_timeout_s,
                    max_tries=8,
                )
            ],
            "cron_jobs": [
                cron(
                    jobs.sweep_dirty_accounts,
                    second=_every(settings.sweep_interval_s),
                    run_at_startup=True,
                    unique=True,
                    keep_result=0,
                    timeout=SWEEP_TIMEOUT_S,
                ),
                cron(
                    jobs.sweep_webhook_deliveries,
                    second=_every(settings.webhook_sweep_interval_s),
                    run_at_startup=True,
                    unique=True,
                    keep_result=0,
                    timeout=SWEEP_TIMEOUT_S,
                ),
                cron(
                    jobs.settle_population,
                    second=_every(settings.settle_interval_s),
                    run_at_startup=False,
                    unique=True,
                    keep_result=0,
                    timeout=SWEEP_TIMEOUT_S,
                ),
            ],
            "max_jobs": settings.worker_max_jobs,
            "job_timeout": max(settings.job_timeout_s, SWEEP_TIMEOUT_S),
        }
    if role is Role.webhooks:
        # a run of batches, then a last batch (its attempts start within half the lease
        # margin and take at most the attempt timeout), its transactions, and a margin
        last_batch_s = settings.webhook_lease_margin_s / 2 + settings.webhook_timeout_s
        timeout = int(jobs.DELIVERY_RUN_S + last_batch_s) + 30
        return {
            "queue_name": webhook_queue(base),
            "functions": [
                func(
                    jobs.deliver_webhooks,
                    name=DELIVER_WEBHOOKS,
                    keep_result=0,
                    timeout=timeout,
                    # a busy endpoint's job makes way every DELIVERY_RUN_S by retrying
                    max_tries=100,
                )
            ],
            "cron_jobs": [],
            "max_jobs": settings.webhook_max_jobs,
            "job_timeout": timeout,
        }
    return {
        "queue_name": portfolio_queue(base),
        "functions": [
            func(
                jobs.portfolio_pass,
                name=PORTFOLIO_JOB,
                keep_result=0,
                timeout=settings.portfolio_pass_timeout_s,
                max_tries=5,
            )
        ],
        "cron_jobs": [
            cron(
                jobs.portfolio_pass,
                name=f"cron:{PORTFOLIO_JOB}",
                minute=settings.portfolio_pass_minutes,
                second=0,
                unique=True,
                keep_result=0,
                timeout=settings.portfolio_pass_timeout_s,
            ),
            # Daily, at a quiet minute: raw event bodies past their retention period.
            cron(
                expire_raw_payloads,
                hour={3},
                minute={17},
                second=0,
                unique=True,
                keep_result=0,
                timeout=3600,
            ),
        ],
        "max_jobs": 1,
        "job_timeout": settings.portfolio_pass_timeout_s,
    }


class Scorer:
    """The roles of one scorer process: arq workers sharing one context (engine, Redis pool)."""

    def __init__(self, settings: Settings, *, roles: Iterable[Role], burst: bool) -> None:
        self.settings = settings
        self.burst = burst
        self.redis: JobRedis = create_redis(settings, enqueue_budget_s=WORKER_ENQUEUE_BUDGET_S)
        self.redis_outage = Outage("redis")
        self.ctx: dict[str, Any] = {
            "settings": settings,
            "postgres_outage": Outage("postgres"),
            "in_progress_ttl_s": {},
        }
        self.workers: list[ResilientWorker] = []
        for role in sorted(set(roles)):
            worker = ResilientWorker(
                role=role,
                redis_outage=self.redis_outage,
                redis_pool=self.redis,
                on_startup=self._startup,
                ctx=self.ctx,
                keep_result=0,
                burst=burst,
                poll_delay=0.05,
                handle_signals=False,
                job_completion_wait=settings.shutdown_grace_s,
                health_check_interval=30,
                **_role_kwargs(role, settings),
            )
            self.ctx["in_progress_ttl_s"][worker.queue_name] = in_progress_ttl_s(worker)
            self.workers.append(instrument(worker))

    @property
    def queues(self) -> list[str]:
        return [worker.queue_name for worker in self.workers]

    @property
    def tasks(self) -> dict[str, asyncio.Task[Any]]:
        return {job_id: t for worker in self.workers for job_id, t in worker.tasks.items()}

    @property
    def jobs_complete(self) -> int:
        return sum(worker.jobs_complete for worker in self.workers)

    @property
    def jobs_failed(self) -> int:
        return sum(worker.jobs_failed for worker in self.workers)

    async def _startup(self, ctx: dict[str, Any]) -> None:
        if "engine" in ctx:  # every role calls it; the first one sets up the shared context
            return
        ctx["engine"] = create_engine(self.settings)
        ctx["sessionmaker"] = create_sessionmaker(ctx["engine"])
        ctx["probe_server"] = await start_probe_server(ctx)
        start_tracing(ctx)
        log.info("scorer_started", queues=self.queues)

    async def main(self) -> None:
        """Run every role until stopped; in burst mode, until every queue is empty (one role's
        jobs can queue another's, so the roles run again until none has work)."""
        if not self.burst:
            await asyncio.gather(*(worker.async_run() for worker in self.workers))
            return
        for _ in range(50):
            await asyncio.gather(*(worker.main() for worker in self.workers))
            counts = [await self.redis.zcard(queue) for queue in self.queues]
            if not any(counts):
                return

    def stop(self, signum: signal.Signals) -> None:
        """Stop taking jobs; finish running ones within the grace period, hand back the rest."""
        log.info("scorer_stopping", signal=signum.name, grace_s=self.settings.shutdown_grace_s)
        for worker in self.workers:
            worker.handle_sig_wait_for_completion(signum)

    async def close(self) -> None:
        if self.ctx.get("probe_server") is not None:
            await self.ctx["probe_server"].stop()
        await asyncio.gather(*(worker.close() for worker in self.workers))
        if "engine" in self.ctx:
            await self.ctx["engine"].dispose()
        with contextlib.suppress(*_REDIS_ERRORS):
            await self.redis.aclose()
        log.info("scorer_stopped")

    async def serve(self) -> None:
        """The process's life: signal handlers, the roles, and a clean close."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop, signum)
        try:
            await asyncio.gather(
                *(worker.async_run() for worker in self.workers), return_exceptions=True
            )
        finally:
            await self.close()


def create_worker(
    settings: Settings, *, burst: bool = False, roles: Iterable[Role] = ALL_ROLES
) -> Scorer:
    """The scorer's roles bound to the configured Redis and Postgres; ``burst`` drains the
    queues and stops. Call it inside the event loop that will run it."""
    return Scorer(settings, roles=roles, burst=burst)


def run_scorer_process(settings: Settings, roles: Iterable[Role] = ALL_ROLES) -> None:
    """``kam scorer``: run until SIGTERM/SIGINT."""

    async def run() -> None:
        await create_worker(settings, roles=roles).serve()

    asyncio.run(run())
