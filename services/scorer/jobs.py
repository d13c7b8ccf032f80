"""Job functions of the scorer. They are thin: load, call the engine, store, inside one
transaction that the job wrapper commits. arq may run a job more than once, so every job is
idempotent, keyed by the account id."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from arq import Retry
from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.scorer.outage import Outage
from services.scorer.reclaim import Refusals, reclaim_orphans
from services.scorer.scoring import rescore_accounts, run_portfolio_pass
from services.scorer.webhook_delivery import (
    Claim,
    Outcome,
    claim_delivery,
    due_deliveries,
    record_outcome,
    send_delivery,
)
from shared.models import Account, DirtyAccount, WebhookDelivery
from shared.queue import (
    DELIVER_AFTER_COMMIT,
    DELIVER_WEBHOOK,
    RESCORE_ACCOUNT,
    delivery_job_id,
    enqueue_deliveries,
    push_jobs,
    rescore_job_id,
    rescore_queue,
    webhook_queue,
)
from shared.settings import Settings

log = structlog.get_logger(__name__)

# A sweep re-drives accounts that stayed dirty this long: longer than a debounced rescore takes.
SWEEP_GRACE = timedelta(seconds=10)
SWEEP_BATCH = 5000
# A delivery whose endpoint is at its concurrency limit retries every second or so; after this
# many tries the job gives up and the webhook sweeper pushes the delivery again.
DELIVERY_MAX_TRIES = 60
_DB_ERRORS = (OperationalError, DBAPIError, OSError)


class EndpointSlots:
    """How many deliveries this process is sending to each endpoint, against a limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight: dict[uuid.UUID, int] = {}

    def try_take(self, endpoint_id: uuid.UUID) -> bool:
        taken = self.in_flight.get(endpoint_id, 0)
        if taken >= self.limit:
            return False
        self.in_flight[endpoint_id] = taken + 1
        return True

    def give_back(self, endpoint_id: uuid.UUID) -> None:
        left = self.in_flight.get(endpoint_id, 1) - 1
        if left:
            self.in_flight[endpoint_id] = left
        else:
            self.in_flight.pop(endpoint_id, None)


@asynccontextmanager
async def job_session(ctx: dict[str, Any]) -> AsyncIterator[AsyncSession]:
    """The worker's one commit point; a database outage becomes an arq retry with backoff.
    Webhook deliveries the transaction created are pushed after the commit."""
    sessionmaker: async_sessionmaker[AsyncSession] = ctx["sessionmaker"]
    outage: Outage | None = ctx.get("postgres_outage")
    try:
        async with sessionmaker() as session, session.begin():
            yield session
    except _DB_ERRORS as exc:
        tries: int = ctx.get("job_try", 1)
        if outage is None:
            log.warning("job_database_error", error=type(exc).__name__, job_try=tries)
        else:
            outage.failed(exc)  # one line per outage, not one per job
        raise Retry(defer=min(60, 2**tries)) from exc
    if outage is not None:
        outage.succeeded()
    deliveries: set[int] = session.info.pop(DELIVER_AFTER_COMMIT, set())
    if deliveries:
        await enqueue_deliveries(ctx["redis"], deliveries)


async def rescore_account(ctx: dict[str, Any], account_id: int) -> bool:
    """Recompute one account and clear its dirty mark, unless an event arrived meanwhile.

    When an event arrived meanwhile the mark stays and the job retries itself shortly (a lost
    retry is covered by the sweeper).
    """
    async with job_session(ctx) as session:
        seen_seq = await session.scalar(
            select(DirtyAccount.seq).where(DirtyAccount.account_id == account_id)
        )
        if seen_seq is None:
            return True  # not dirty (a repeated job), or the account is gone: nothing to do
        await rescore_accounts(session, account_ids=[account_id])
        cleared = await clear_dirty_mark(session, account_id=account_id, seen_seq=seen_seq)
    log.info("account_rescored", account_id=account_id, cleared=cleared)
    if cleared:
        # An event that commits between our commit and arq finishing this job finds the account
        # clean, marks it and asks for a job, which arq refuses: this job id is still taken.
        # Look once more, so that event waits for one debounce rather than for the sweeper.
        async with ctx["sessionmaker"]() as session:
            cleared = (
                await session.scalar(
                    select(DirtyAccount.seq).where(DirtyAccount.account_id == account_id)
                )
                is None
            )
    if not cleared:
        # Events arrived while this ran. They found the account already dirty and asked for no
        # job of their own, so run again (same job id) rather than wait for the sweeper.
        settings: Settings = ctx["settings"]
        raise Retry(defer=max(settings.rescore_debounce_s, 0.1))
    return cleared


async def clear_dirty_mark(session: AsyncSession, *, account_id: int, seen_seq: int) -> bool:
    """Clear the mark only if no event arrived since ``seen_seq`` was read."""
    result = await session.execute(
        delete(DirtyAccount).where(
            DirtyAccount.account_id == account_id, DirtyAccount.seq == seen_seq
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def portfolio_pass(ctx: dict[str, Any]) -> int | None:
    """Refit the population facts and rescore every account (hourly, and on demand)."""
    try:
        return await run_portfolio_pass(ctx["sessionmaker"])
    except _DB_ERRORS as exc:
        tries: int = ctx.get("job_try", 1)
        log.warning("job_database_error", error=type(exc).__name__, job_try=tries)
        raise Retry(defer=min(300, 5 * 2**tries)) from exc


async def sweep_dirty_accounts(ctx: dict[str, Any]) -> int:
    """Re-enqueue accounts still dirty after the grace period: a lost job loses nothing.

    An override that has expired is work too: its account is marked dirty here, so the tier
    falls back to what the data says within one sweep of the expiry."""
    async with job_session(ctx) as session:
        await session.execute(
            insert(DirtyAccount)
            .from_select(
                ["account_id", "since"],
                select(Account.id, func.now() - 2 * SWEEP_GRACE).where(
                    Account.tier_override.is_not(None),
                    Account.tier_override_expires_at <= func.now(),
                ),
            )
            .on_conflict_do_nothing()
        )
        ids = list(
            await session.scalars(
                select(DirtyAccount.account_id)
                .where(DirtyAccount.since < func.now() - SWEEP_GRACE)
                .order_by(DirtyAccount.since)
                .limit(SWEEP_BATCH)
            )
        )
    if ids:
        await _push_and_reclaim(
            ctx, "swept_dirty_accounts", RESCORE_ACCOUNT, ids, rescore_job_id, rescore_queue
        )
    return len(ids)


async def _push_and_reclaim(
    ctx: dict[str, Any],
    event: str,
    function: str,
    ids: list[int],
    job_id: Callable[[int], str],
    queue_of: Callable[[str], str],
) -> None:
    """Push a sweep's jobs; for each push arq refuses (the job id is taken), find out why and
    hand back the jobs a dead worker left behind (services/scorer/reclaim.py). The log line
    counts every outcome: a refusal is never reported as a success."""
    settings: Settings = ctx["settings"]
    queue = queue_of(settings.queue_name)
    result = await push_jobs(ctx["redis"], function, ids, job_id=job_id, queue=queue)
    refusals = Refusals()
    if result.refused:
        refusals = await reclaim_orphans(
            ctx["redis"],
            [job_id(i) for i in result.refused],
            queue=queue,
            in_progress_ttl_s=ctx.get("in_progress_ttl_s", {}).get(queue, 0),
        )
    log.info(
        event,
        count=len(ids),
        pushed=result.total - result.failed - len(result.refused),
        failed=result.failed,
        **refusals.as_log(),
    )


async def deliver_webhook(ctx: dict[str, Any], delivery_id: int) -> bool:
    """Attempt one webhook delivery, if it is due and first in line; returns whether an
    attempt was made. The HTTP request runs between two short transactions, never inside one."""
    settings: Settings = ctx["settings"]
    slots: EndpointSlots = ctx.setdefault(
        "endpoint_slots", EndpointSlots(settings.webhook_endpoint_concurrency)
    )
    async with job_session(ctx) as session:
        endpoint_id = await session.scalar(
            select(WebhookDelivery.endpoint_id).where(WebhookDelivery.id == delivery_id)
        )
    if endpoint_id is None:
        return False
    if not slots.try_take(endpoint_id):
        # This endpoint has its share of senders: wait without holding a job slot.
        raise Retry(defer=random.uniform(0.5, 1.5))  # noqa: S311
    try:
        async with job_session(ctx) as session:
            claim = await claim_delivery(session, delivery_id=delivery_id, settings=settings)
        if claim is None:
            return False
        outcome = await send_delivery(claim, settings=settings)
    finally:
        slots.give_back(endpoint_id)
    follow_ups = await _record(ctx, claim, outcome)
    if follow_ups:
        await enqueue_deliveries(ctx["redis"], follow_ups)
    return True


async def _record(ctx: dict[str, Any], claim: Claim, outcome: Outcome) -> list[int]:
    """Record the attempt, whatever it takes short of the lease running out: an attempt left
    unrecorded is sent again after the lease without a trace of the first. A row Postgres
    refuses is recorded again without the receiver's excerpt; a lost connection is retried
    with backoff until shortly before the lease ends."""
    settings: Settings = ctx["settings"]
    sessionmaker: async_sessionmaker[AsyncSession] = ctx["sessionmaker"]
    outage: Outage | None = ctx.get("postgres_outage")
    wait = 0.2
    while True:
        try:
            async with sessionmaker() as session, session.begin():
                follow_ups = await record_outcome(
                    session, claim=claim, outcome=outcome, settings=settings
                )
        except _DB_ERRORS as exc:
            transient = isinstance(exc, OperationalError | InterfaceError | OSError) or (
                isinstance(exc, DBAPIError) and exc.connection_invalidated
            )
            if not transient and outcome.excerpt is not None:
                log.warning(
                    "webhook_excerpt_refused",
                    delivery_id=claim.delivery_id,
                    error=type(exc).__name__,
                )
                outcome = replace(outcome, excerpt=None)
                continue
            if outage is not None:
                outage.failed(exc)
            left_s = (claim.lease_until - datetime.now(UTC)).total_seconds() - 5
            if left_s <= 0:
                log.error(
                    "webhook_outcome_unrecorded",
                    delivery_id=claim.delivery_id,
                    error=type(exc).__name__,
                    status_code=outcome.status_code,
                )
                raise
            await asyncio.sleep(min(wait, left_s))
            wait = min(wait * 2, 5.0)
            continue
        if outage is not None:
            outage.succeeded()
        return follow_ups


async def sweep_webhook_deliveries(ctx: dict[str, Any]) -> int:
    """Push the deliveries whose time has come: retries fall due here, and a job lost to a
    Redis flush or a crash (or a lease left by a worker killed mid-send) is re-driven."""
    async with job_session(ctx) as session:
        ids = await due_deliveries(session)
    if ids:
        await _push_and_reclaim(
            ctx, "swept_webhook_deliveries", DELIVER_WEBHOOK, ids, delivery_job_id, webhook_queue
        )
    return len(ids)
