"""The enqueue and consume path through a real arq worker on real Redis."""

from __future__ import annotations

import httpx
from arq.connections import ArqRedis
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.scorer import jobs
from services.scorer.enqueue import rescore_job_id
from shared.db import create_sessionmaker
from shared.models import Account, DirtyAccount
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
