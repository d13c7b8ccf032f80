"""Job functions of the scorer. They are thin: load, call the engine, store, inside one
transaction that the job wrapper commits. arq may run a job more than once, so every job is
idempotent, keyed by the account id."""

from __future__ import annotations

import asyncio
import time
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
from services.scorer.passes import (
    latest_change_number,
    rescore_accounts,
    run_portfolio_pass,
    settling_reason,
    summarise_portfolio,
)
from services.scorer.policies import active_policy
from services.scorer.reclaim import JOB_PREFIX, Refusals, reclaim_orphans
from services.scorer.webhook_delivery import (
    Claim,
    EndpointSender,
    Outcome,
    claim_due,
    due_endpoints,
    record_outcomes,
)
from shared.models import Account, DirtyAccount
from shared.queue import (
    DELIVER_AFTER_COMMIT,
    DELIVER_WEBHOOKS,
    PORTFOLIO_JOB_ID,
    RESCORE_ACCOUNT,
    JobKey,
    delivery_job_id,
    enqueue_deliveries,
    enqueue_portfolio_pass,
    portfolio_queue,
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
# How long one endpoint's delivery job keeps claiming batches before it makes way (it runs
# again at once when more is due): well inside the job's timeout, which is
# ``DELIVERY_RUN_S + webhook_timeout_s + 30``.
DELIVERY_RUN_S = 30.0
_DB_ERRORS = (OperationalError, DBAPIError, OSError)


@asynccontextmanager
async def job_session(ctx: dict[str, Any]) -> AsyncIterator[AsyncSession]:
    """The worker's one commit point; a database outage becomes an arq retry with backoff
    (logged once per outage). The delivery jobs of the endpoints the transaction created
    deliveries for are pushed after the commit."""
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
    deliveries: set[str] = session.info.pop(DELIVER_AFTER_COMMIT, set())
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
        accounts = await run_portfolio_pass(ctx["sessionmaker"])
        if accounts is not None:
            await summarise_portfolio(ctx["sessionmaker"])
        return accounts
    except _DB_ERRORS as exc:
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
        await _push_and_reclaim(
            ctx, "swept_dirty_accounts", RESCORE_ACCOUNT, ids, rescore_job_id, rescore_queue
        )
    await _reclaim_portfolio_pass(ctx)
    return len(ids)


async def _reclaim_portfolio_pass(ctx: dict[str, Any]) -> None:
    """An on-demand pass a killed worker left in progress would refuse every later request
    for a pass until its in-progress key lapses (the pass's timeout, an hour): hand it back
    once no live worker's heartbeat names it. (Two passes never run at once either way: the
    pass takes an advisory lock.)"""
    settings: Settings = ctx["settings"]
    redis = ctx["redis"]
    if not await redis.exists(f"{JOB_PREFIX}{PORTFOLIO_JOB_ID}"):
        return
    await reclaim_orphans(
        redis,
        [PORTFOLIO_JOB_ID],
        queue=portfolio_queue(settings.queue_name),
        in_progress_ttl_s=settings.portfolio_pass_timeout_s + 10,
    )


async def _push_and_reclaim(
    ctx: dict[str, Any],
    event: str,
    function: str,
    ids: list[JobKey],
    job_id: Callable[[JobKey], str],
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


async def deliver_webhooks(ctx: dict[str, Any], endpoint_id: str) -> int:
    """Deliver what is due for one endpoint, in batches, until nothing is due; returns the
    attempts made. One job per endpoint (its job id), so one worker sends to an endpoint at a
    time, at most ``KAM_WEBHOOK_ENDPOINT_CONCURRENCY`` requests at once over one keep-alive
    client. The HTTP requests run between two short transactions per batch, never inside one."""
    settings: Settings = ctx["settings"]
    endpoint = uuid.UUID(endpoint_id)
    sender: EndpointSender | None = None
    attempts = 0
    started = asyncio.get_running_loop().time()
    try:
        while True:
            async with job_session(ctx) as session:
                claims = await claim_due(session, endpoint_id=endpoint, settings=settings)
            if not claims:
                return attempts
            if sender is None or sender.url != claims[0].url:
                if sender is not None:
                    await sender.aclose()
                sender = EndpointSender(
                    claims[0].url,
                    settings=settings,
                    concurrency=settings.webhook_endpoint_concurrency,
                )
            await sender.check()  # the address, checked again for every batch
            start_by = time.monotonic() + settings.webhook_lease_margin_s / 2
            outcomes = await sender.send_all(claims, start_by=start_by)
            results = [(c, o) for c, o in zip(claims, outcomes, strict=True) if o is not None]
            released = [c for c, o in zip(claims, outcomes, strict=True) if o is None]
            attempts += len(results)
            enabled = await _record(ctx, endpoint, results, released)
            if not enabled:
                return attempts
            if asyncio.get_running_loop().time() - started > DELIVERY_RUN_S:
                # Make way for other endpoints' jobs; run again at once for the rest.
                raise Retry(defer=0.01)
    finally:
        if sender is not None:
            await sender.aclose()


async def _record(
    ctx: dict[str, Any],
    endpoint_id: uuid.UUID,
    results: list[tuple[Claim, Outcome]],
    released: list[Claim],
) -> bool:
    """Record a batch's attempts, whatever it takes short of a lease running out: an attempt
    left unrecorded is sent again after the lease without a trace of the first. Rows Postgres
    refuses are recorded again without the receivers' excerpts; a lost connection is retried
    with backoff until shortly before the first lease ends."""
    settings: Settings = ctx["settings"]
    sessionmaker: async_sessionmaker[AsyncSession] = ctx["sessionmaker"]
    outage: Outage | None = ctx.get("postgres_outage")
    lease_until = min(claim.lease_until for claim in [*(c for c, _ in results), *released])
    wait = 0.2
    while True:
        try:
            async with sessionmaker() as session, session.begin():
                enabled = await record_outcomes(
                    session,
                    endpoint_id=endpoint_id,
                    results=results,
                    settings=settings,
                    released=released,
                )
        except _DB_ERRORS as exc:
            transient = isinstance(exc, OperationalError | InterfaceError | OSError) or (
                isinstance(exc, DBAPIError) and exc.connection_invalidated
            )
            if not transient and any(outcome.excerpt is not None for _, outcome in results):
                log.warning(
                    "webhook_excerpts_refused",
                    endpoint_id=str(endpoint_id),
                    error=type(exc).__name__,
                )
                results = [(claim, replace(outcome, excerpt=None)) for claim, outcome in results]
                continue
            if outage is not None:
                outage.failed(exc)
            left_s = (lease_until - datetime.now(UTC)).total_seconds() - 5
            if left_s <= 0:
                log.error(
                    "webhook_outcomes_unrecorded",
                    endpoint_id=str(endpoint_id),
                    deliveries=[claim.delivery_id for claim, _ in results],
                    error=type(exc).__name__,
                )
                raise
            await asyncio.sleep(min(wait, left_s))
            wait = min(wait * 2, 5.0)
            continue
        if outage is not None:
            outage.succeeded()
        return enabled


async def sweep_webhook_deliveries(ctx: dict[str, Any]) -> int:
    """Push the deliveries whose time has come: retries fall due here, and a job lost to a
    Redis flush or a crash (or a lease left by a worker killed mid-send) is re-driven."""
    async with job_session(ctx) as session:
        ids = [str(endpoint_id) for endpoint_id in await due_endpoints(session)]
    if ids:
        await _push_and_reclaim(
            ctx, "swept_webhook_deliveries", DELIVER_WEBHOOKS, ids, delivery_job_id, webhook_queue
        )
    return len(ids)
