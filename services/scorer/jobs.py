"""Job functions of the scorer. They are thin: load, call the engine, store, inside one
transaction that the job wrapper commits. arq may run a job more than once, so every job is
idempotent, keyed by the account id."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import structlog
from arq import Retry
from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.scorer.enqueue import (
    DELIVER_AFTER_COMMIT,
    enqueue_deliveries,
    enqueue_portfolio_pass,
    enqueue_rescores,
)
from services.scorer.passes import (
    latest_change_number,
    rescore_accounts,
    run_portfolio_pass,
    settling_reason,
)
from services.scorer.policies import active_policy
from services.scorer.webhook_delivery import (
    claim_delivery,
    due_deliveries,
    record_outcome,
    send_delivery,
)
from shared.models import Account, DirtyAccount
from shared.settings import Settings

log = structlog.get_logger(__name__)

# A sweep re-drives accounts that stayed dirty this long: longer than a debounced rescore takes.
SWEEP_GRACE = timedelta(seconds=10)
SWEEP_BATCH = 5000


@asynccontextmanager
async def job_session(ctx: dict[str, Any]) -> AsyncIterator[AsyncSession]:
    """The worker's one commit point; a database outage becomes an arq retry with backoff.
    Webhook deliveries the transaction created are pushed after the commit."""
    sessionmaker: async_sessionmaker[AsyncSession] = ctx["sessionmaker"]
    try:
        async with sessionmaker() as session, session.begin():
            yield session
    except (OperationalError, DBAPIError, OSError) as exc:
        tries: int = ctx.get("job_try", 1)
        log.warning("job_database_error", error=type(exc).__name__, job_try=tries)
        raise Retry(defer=min(60, 2**tries)) from exc
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
    except (OperationalError, DBAPIError, OSError) as exc:
        tries: int = ctx.get("job_try", 1)
        log.warning("job_database_error", error=type(exc).__name__, job_try=tries)
        raise Retry(defer=min(300, 5 * 2**tries)) from exc


async def settle_population(ctx: dict[str, Any]) -> bool:
    """Ask for a portfolio pass now when the portfolio grew or changed a lot since the last fit
    (a bulk load) and no new data arrived for the policy's ``population.quiet_seconds``, so a
    newcomer sees a settled picture within a minute of a load instead of at the next hour.
    Returns whether a pass was asked for."""
    async with job_session(ctx) as session:
        _, policy = await active_policy(session)
        seq = await latest_change_number(session)
        reason = await settling_reason(session)
    seen: dict[str, Any] = ctx.setdefault("settle", {"seq": None, "moved_at": 0.0})
    now = time.monotonic()
    if seen["seq"] != seq:
        seen["seq"], seen["moved_at"] = seq, now
    quiet = now - seen["moved_at"] >= policy.population.quiet_seconds
    if reason is None or not quiet:
        return False
    log.info("population_settling", reason=reason)
    return await enqueue_portfolio_pass(ctx["redis"])


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
        failed = await enqueue_rescores(ctx["redis"], ids, defer_s=0)
        log.info("swept_dirty_accounts", count=len(ids), failed=failed)
    return len(ids)


async def deliver_webhook(ctx: dict[str, Any], delivery_id: int) -> bool:
    """Attempt one webhook delivery, if it is due and first in line; returns whether an
    attempt was made. The HTTP request runs between two short transactions, never inside one."""
    settings: Settings = ctx["settings"]
    async with job_session(ctx) as session:
        claim = await claim_delivery(session, delivery_id=delivery_id, settings=settings)
    if claim is None:
        return False
    outcome = await send_delivery(claim, settings=settings)
    async with job_session(ctx) as session:
        follow_ups = await record_outcome(session, claim=claim, outcome=outcome, settings=settings)
    if follow_ups:
        await enqueue_deliveries(ctx["redis"], follow_ups)
    return True


async def sweep_webhook_deliveries(ctx: dict[str, Any]) -> int:
    """Push the deliveries whose time has come: retries fall due here, and a job lost to a
    Redis flush or a crash (or a lease left by a worker killed mid-send) is re-driven."""
    async with job_session(ctx) as session:
        ids = await due_deliveries(session)
    if ids:
        failed = await enqueue_deliveries(ctx["redis"], ids)
        log.info("swept_webhook_deliveries", count=len(ids), failed=failed)
    return len(ids)
