"""The enqueue and consume path through a real arq worker on real Redis."""

from __future__ import annotations

import httpx
from arq.connections import ArqRedis
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.scorer import jobs
from services.scorer.outage import Outage
from services.scorer.reclaim import HELD_TTL_S, IN_PROGRESS_PREFIX, held_key, reclaim_orphans
from services.scorer.worker import SWEEP_TIMEOUT_S, Role, create_worker
from shared.db import create_sessionmaker
from shared.models import Account, DirtyAccount
from shared.queue import (
    PORTFOLIO_JOB_ID,
    enqueue_portfolio_pass,
    portfolio_queue,
    rescore_job_id,
)
from shared.settings import Settings
from tests import factories
from tests.conftest import RunWorker


async def test_accepted_event_is_enqueued_once_and_consumed(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    redis: ArqRedis,
    settings: Settings,
    run_worker: RunWorker,
) -> None:
    events = [factories.batch_item("order", factories.order("A-1")) for _ in range(5)]
    await client.post("/v1/events", json={"events": events}, headers=admin_headers)
    await client.post("/v1/orders", json=factories.order("A-1"), headers=admin_headers)
    account_id = await session.scalar(select(Account.id).where(Account.external_id == "A-1"))
    assert account_id is not None
    # six events, one coalesced job with the account's fixed id
    queued = await redis.zrange(settings.queue_name, 0, -1)
    assert queued == [rescore_job_id(account_id).encode()]

    worker = await run_worker()
    assert worker.jobs_complete >= 1
    assert worker.jobs_failed == 0
    assert await session.get(DirtyAccount, account_id) is None
    assert await redis.zcard(settings.queue_name) == 0


async def test_rescore_keeps_the_mark_when_an_event_arrived_meanwhile(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    engine: AsyncEngine,
) -> None:
    await client.post("/v1/orders", json=factories.order("A-1"), headers=admin_headers)
    account_id = await session.scalar(select(Account.id))
    assert account_id is not None
    seen = await session.scalar(
        select(DirtyAccount.seq).where(DirtyAccount.account_id == account_id)
    )
    await session.commit()
    assert seen == 1

    # a new event commits while the rescore that read ``seen`` is still working
    await client.post("/v1/orders", json=factories.order("A-1"), headers=admin_headers)

    async with session.begin():
        cleared = await jobs.clear_dirty_mark(session, account_id=account_id, seen_seq=seen)
    assert cleared is False
    newer = await session.scalar(select(DirtyAccount.seq))
    assert newer is not None
    assert newer > seen
    await session.commit()

    # the next rescore reads the newer mark and clears it
    sessionmaker = create_sessionmaker(engine)
    assert await jobs.rescore_account({"sessionmaker": sessionmaker}, account_id) is True
    assert await session.scalar(select(func.count()).select_from(DirtyAccount)) == 0


async def test_sweeper_reenqueues_dirty_accounts_after_redis_is_wiped(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    redis: ArqRedis,
    settings: Settings,
    run_worker: RunWorker,
) -> None:
    for account in ("A-1", "A-2", "A-3"):
        await client.post("/v1/orders", json=factories.order(account), headers=admin_headers)
    await redis.flushdb()  # every queued job is gone
    # the marks are older than the sweeper's grace period
    await session.execute(
        update(DirtyAccount).values(since=DirtyAccount.since - jobs.SWEEP_GRACE * 2)
    )
    await session.commit()

    worker = await run_worker()  # the sweep runs at startup, then the rescores it enqueued
    assert worker.jobs_failed == 0
    assert await session.scalar(select(func.count()).select_from(DirtyAccount)) == 0


async def test_a_rescores_in_progress_key_lives_seconds_not_the_passs_hour(
    settings: Settings,
) -> None:
    scorer = create_worker(settings)
    ttl = {worker.role: worker.in_progress_timeout_s for worker in scorer.workers}
    # arq keeps a started job's key for its worker's longest timeout + 10 s: the pass's hour
    # stays on the portfolio queue.
    assert ttl[Role.rescore] == max(settings.job_timeout_s, SWEEP_TIMEOUT_S) + 10 <= 60
    assert ttl[Role.webhooks] <= 100
    assert ttl[Role.portfolio] == settings.portfolio_pass_timeout_s + 10
    assert len(set(scorer.queues)) == 3
    await scorer.close()


async def _leave_in_progress(redis: ArqRedis, job_id: str, *, age_s: float, ttl_s: float) -> None:
    """What a worker killed mid-job leaves behind: the job queued and marked in progress."""
    await redis.psetex(f"{IN_PROGRESS_PREFIX}{job_id}", int((ttl_s - age_s) * 1000), b"1")


async def test_the_sweeper_hands_back_a_job_a_killed_worker_left(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    redis: ArqRedis,
    settings: Settings,
    run_worker: RunWorker,
) -> None:
    await client.post("/v1/orders", json=factories.order("A-1"), headers=admin_headers)
    account_id = await session.scalar(select(Account.id))
    assert account_id is not None
    ttl = create_worker(settings).ctx["in_progress_ttl_s"][settings.queue_name]
    await _leave_in_progress(redis, rescore_job_id(account_id), age_s=HELD_TTL_S + 1, ttl_s=ttl)
    await session.execute(
        update(DirtyAccount).values(since=DirtyAccount.since - jobs.SWEEP_GRACE * 2)
    )
    await session.commit()

    await run_worker()  # the startup sweep finds the orphan; the poll after runs it

    assert await session.scalar(select(func.count()).select_from(DirtyAccount)) == 0
    assert not await redis.exists(f"{IN_PROGRESS_PREFIX}{rescore_job_id(account_id)}")


async def test_a_job_a_live_worker_holds_is_left_alone(redis: ArqRedis, settings: Settings) -> None:
    queue = settings.queue_name
    await redis.enqueue_job("rescore_account", 1, _job_id="rescore:1")
    await redis.enqueue_job("rescore_account", 2, _job_id="rescore:2")
    await redis.enqueue_job("rescore_account", 3, _job_id="rescore:3")
    await redis.enqueue_job("rescore_account", 4, _job_id="rescore:4")
    old = HELD_TTL_S + 5
    await _leave_in_progress(redis, "rescore:1", age_s=old, ttl_s=40)  # orphan
    await _leave_in_progress(redis, "rescore:2", age_s=old, ttl_s=40)
    await redis.set(held_key("rescore:2"), b"rescore")  # a live worker's heartbeat names it
    await _leave_in_progress(redis, "rescore:3", age_s=1, ttl_s=40)  # just started
    # rescore:4 waits in the queue

    refusals = await reclaim_orphans(
        redis, [f"rescore:{n}" for n in (1, 2, 3, 4)], queue=queue, in_progress_ttl_s=40
    )

    assert refusals.as_log() == {"waiting": 1, "running": 2, "reclaimed": 1, "stale": 0}
    assert refusals.reclaimed == ["rescore:1"]
    assert not await redis.exists(f"{IN_PROGRESS_PREFIX}rescore:1")
    assert await redis.exists(f"{IN_PROGRESS_PREFIX}rescore:2")
    assert await redis.exists(f"{IN_PROGRESS_PREFIX}rescore:3")


async def test_outage_logs_once_and_backs_off_to_a_cap() -> None:
    outage = Outage("redis", first_wait_s=0.1, max_wait_s=1.0)
    waits = [outage.failed(ConnectionError()) for _ in range(8)]
    assert waits[:4] == [0.1, 0.2, 0.4, 0.8]
    assert max(waits) == 1.0
    assert outage.ongoing
    outage.succeeded()
    assert not outage.ongoing
    assert outage.failed(ConnectionError()) == 0.1


async def test_the_sweeper_hands_back_a_portfolio_pass_a_killed_worker_left(
    engine: AsyncEngine, redis: ArqRedis, settings: Settings
) -> None:
    assert await enqueue_portfolio_pass(redis)
    ttl = settings.portfolio_pass_timeout_s + 10
    await _leave_in_progress(redis, PORTFOLIO_JOB_ID, age_s=HELD_TTL_S + 1, ttl_s=ttl)
    ctx = {"sessionmaker": create_sessionmaker(engine), "settings": settings, "redis": redis}

    await jobs.sweep_dirty_accounts(ctx)

    assert not await redis.exists(f"{IN_PROGRESS_PREFIX}{PORTFOLIO_JOB_ID}")
    # still queued: the next poll of a portfolio worker runs it
    assert await redis.zscore(portfolio_queue(settings.queue_name), PORTFOLIO_JOB_ID)
