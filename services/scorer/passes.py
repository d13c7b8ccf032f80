"""The two ways accounts get scored, and when the portfolio needs a full pass early.

- ``rescore_accounts``: a few dirty accounts against the stored population facts, under their
  row locks; the facts are read after the locks are taken, so a rescore never writes figures
  from facts a pass superseded before it locked.
- ``run_portfolio_pass``: refit the population facts, then rescore every account whose stored
  figures must change, in chunks, each chunk one transaction. An account that a concurrent
  rescore scored after the pass began is not overwritten with the pass's older view: if that
  rescore used the superseded facts, the account is marked dirty and rescored with the new
  ones; otherwise it is left as it is.
- ``summarise_portfolio``: what the portfolio pages read (``summary``), stored by the
  portfolio-pass job right after each pass, as a step of its own.
- ``settling_reason``: whether the portfolio grew or changed so much since the last fit (a bulk
  load) that a full pass should run as soon as the load goes quiet, instead of at the hour.

Every write of an account's figures writes its snapshot; a tier change also writes a
``tier_changes`` row with the next per-account sequence number, in the same transaction, under
the account's row lock.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import structlog
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from services.scorer.engine import ScoringPolicy, cumulative_profit_share
from services.scorer.evaluation import evaluate
from services.scorer.features import build_feature_table, load_aggregates, store_aggregates
from services.scorer.policies import LOCK_NAMESPACE, active_policy
from services.scorer.population import (
    PopulationFacts,
    fit_population,
    latest_population,
    population_row,
)
from services.scorer.storage import lock_state, read_state, state_for, store, store_basis
from services.scorer.summary import store_portfolio_summaries
from shared.models import PopulationFit

log = structlog.get_logger(__name__)

PASS_CHUNK = 1000
PORTFOLIO_PASS_LOCK = 2
FIRST_POPULATION_LOCK = 3

_MARK_DIRTY = """
INSERT INTO dirty_accounts (account_id) SELECT unnest($1::bigint[])
ON CONFLICT (account_id) DO NOTHING
"""


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


async def _store_population(
    session: AsyncSession, facts: PopulationFacts, *, policy_version: int, at: datetime
) -> int:
    row = PopulationFit(**population_row(facts, policy_version=policy_version, evaluated_at=at))
    session.add(row)
    await session.flush()
    return int(row.id)


async def _first_population(
    session: AsyncSession, *, policy: ScoringPolicy, policy_version: int, at: datetime
) -> tuple[int, PopulationFacts]:
    """The facts of a new installation: fitted once, by whichever rescore comes first."""
    await session.execute(select(func.pg_advisory_xact_lock(LOCK_NAMESPACE, FIRST_POPULATION_LOCK)))
    latest = await latest_population(session)
    if latest is not None:
        return latest
    aggregates = await load_aggregates(
        session, as_of=at, occasion_window_days=policy.risk.occasion_window_days
    )
    facts = await fit_population(
        session,
        table=build_feature_table(aggregates),
        policy=policy,
        previous=None,
        seqs=aggregates.seq,
    )
    return await _store_population(session, facts, policy_version=policy_version, at=at), facts


async def rescore_accounts(
    session: AsyncSession, *, account_ids: list[int], now: datetime | None = None
) -> int:
    """Rescore these accounts against the stored population facts; returns how many were
    scored. Without population facts yet (a new installation) they are fitted first."""
    version, policy = await active_policy(session)
    rows = await lock_state(session, sorted(set(account_ids)))
    # Under the locks: facts a pass committed before now are the ones used, and a pass that
    # commits newer ones later finds these accounts scored with older facts and rescores them.
    at = _now(now)
    latest = await latest_population(session)
    if latest is None:
        latest = await _first_population(session, policy=policy, policy_version=version, at=at)
    fit_id, population = latest
    aggregates = await load_aggregates(
        session,
        as_of=at,
        occasion_window_days=policy.risk.occasion_window_days,
        account_ids=sorted(rows),
    )
    # Subsidiaries come back too (for the group roll-up); only the asked-for ones are scored,
    # and their aggregates kept for the next portfolio pass.
    asked = np.isin(aggregates.account_id, np.array(sorted(rows), dtype=np.int64))
    await store_aggregates(session, aggregates.take(asked))
    table = build_feature_table(aggregates).take(asked)
    if not len(table):
        return 0
    state = state_for(table, rows)
    result = evaluate(table, state, population, policy, now=at)
    assert result.drivers is not None
    await store(
        session,
        table=table,
        state=state,
        result=result,
        drivers=result.drivers,
        policy_version=version,
        population_fit_id=fit_id,
        now=at,
    )
    return len(table)


async def run_portfolio_pass(
    sessionmaker: async_sessionmaker[AsyncSession], *, now: datetime | None = None
) -> int | None:
    """Refit the population facts and rescore every account; returns the accounts scored, or
    None when another pass is running (an advisory lock lets one pass run at a time, whichever
    worker picked it up).

    The features are aggregated once, set-based; the accounts are then written in chunks of
    ``PASS_CHUNK``, each chunk its own transaction holding its accounts' row locks only while it
    writes, so ingestion and single rescores are never blocked for the whole pass."""
    engine: AsyncEngine = sessionmaker.kw["bind"]
    async with engine.connect() as guard:
        # A session-level lock on a connection of its own: it outlives the chunk transactions.
        lock = select(func.pg_try_advisory_lock(LOCK_NAMESPACE, PORTFOLIO_PASS_LOCK))
        locked = await guard.scalar(lock)
        await guard.commit()
        if not locked:
            log.info("portfolio_pass_skipped", reason="another pass is running")
            return None
        try:
            return await _portfolio_pass(sessionmaker, at=_now(now))
        finally:
            unlock = select(func.pg_advisory_unlock(LOCK_NAMESPACE, PORTFOLIO_PASS_LOCK))
            await guard.scalar(unlock)
            await guard.commit()


async def _portfolio_pass(sessionmaker: async_sessionmaker[AsyncSession], *, at: datetime) -> int:
    async with sessionmaker() as session, session.begin():
        version, policy = await active_policy(session)
        latest = await latest_population(session)
        previous = latest[1] if latest is not None else None
        # Stored aggregates that still hold are reused; the accounts whose data changed or
        # whose windows moved past one of their rows are aggregated now, and kept.
        aggregates = await load_aggregates(
            session,
            as_of=at,
            occasion_window_days=policy.risk.occasion_window_days,
            reuse=True,
        )
        table = build_feature_table(aggregates)
        population = await fit_population(
            session, table=table, policy=policy, previous=previous, seqs=aggregates.seq
        )
        await store_aggregates(session, aggregates)
        fit_id = await _store_population(session, population, policy_version=version, at=at)
    active = ~table.lost
    share = cumulative_profit_share(np.where(active, table.columns["gross_profit_12m"], 0.0))
    # Every account is evaluated against the state read here; only those whose stored state
    # must change are then written, in chunks, each its own transaction holding its accounts'
    # row locks only while it writes, so ingestion and single rescores are never blocked for
    # the whole pass.
    async with sessionmaker() as session, session.begin():
        rows = await read_state(session)
    read_first = rows
    present = np.isin(table.account_id, np.fromiter(rows, dtype=np.int64, count=len(rows)))
    table, share = table.take(present), share[present]
    state = state_for(table, rows)
    result = evaluate(
        table, state, population, policy, now=at, profit_share=share, with_drivers=False
    )
    to_write = np.flatnonzero(
        result.needs_snapshot(state, at, table.account_id) | result.basis_moved(state)
    )
    changes = 0
    written = 0
    redone = 0
    for start in range(0, len(to_write), PASS_CHUNK):
        chunk = np.zeros(len(table), dtype=np.bool_)
        chunk[to_write[start : start + PASS_CHUNK]] = True
        part = table.take(chunk)
        async with sessionmaker() as session, session.begin():
            rows = await lock_state(session, [int(i) for i in part.account_id])
            present = np.isin(part.account_id, np.fromiter(rows, dtype=np.int64, count=len(rows)))
            part_share = share[chunk][present]
            part = part.take(present)
            if not len(part):
                continue
            # The state again, now locked: a rescore may have written it since it was read, or
            # scored it as of a later time than this pass. One that used these facts is newer
            # than this pass's view: it stays. One that used the facts this pass replaced is
            # rescored with these (marked dirty), never overwritten with an older view.
            state = state_for(part, rows)
            current = np.array([used == fit_id for used in state.population_fit_id])
            rewritten = np.array(
                [
                    rows[int(i)] != read_first.get(int(i)) or (scored is not None and scored > at)
                    for i, scored in zip(part.account_id, state.scored_at, strict=True)
                ],
                dtype=np.bool_,
            )
            stale = rewritten & ~current
            if stale.any():
                await (await session.connection()).exec_driver_sql(
                    _MARK_DIRTY, ([int(i) for i in part.account_id[stale]],)
                )
                redone += int(stale.sum())
            keep = ~(current | rewritten)
            if not keep.any():
                continue
            part, part_share, state = part.take(keep), part_share[keep], state.take(keep)
            result = evaluate(
                part,
                state,
                population,
                policy,
                now=at,
                profit_share=part_share,
                with_drivers=False,
            )
            write = result.needs_snapshot(state, at, part.account_id)
            basis_only = result.basis_moved(state) & ~write
            if basis_only.any():
                await store_basis(
                    session,
                    account_ids=[int(i) for i in part.account_id[basis_only]],
                    basis=[result.tier_basis[i] for i in np.flatnonzero(basis_only)],
                )
            if not write.any():
                continue
            part, part_share = part.take(write), part_share[write]
            state = state.take(write)
            # Reasons in words cost more than the scores: only for the accounts written.
            explained = evaluate(part, state, population, policy, now=at, profit_share=part_share)
            assert explained.drivers is not None
            written += len(part)
            changes += await store(
                session,
                table=part,
                state=state,
                result=explained,
                drivers=explained.drivers,
                policy_version=version,
                population_fit_id=fit_id,
                now=at,
            )
    log.info(
        "portfolio_pass_done",
        accounts=len(table),
        aggregated=int(aggregates.fresh.sum()),
        written=written,
        tier_changes=changes,
        rescored_again=redone,
        generation=population.generation,
        bgnbd=population.bgnbd_source,
        pareto_nbd=population.pareto_source,
        base_model=population.base_model(policy),
        calibrated=population.calibration.used,
        fit_seconds=population.fit_seconds,
    )
    return len(table)


_SETTLE_COUNTS = """
SELECT
    (SELECT count(*) FROM accounts),
    (SELECT count(*) FROM (
        SELECT account_id FROM account_aggregates WHERE seq > $1
        UNION
        SELECT account_id FROM dirty_accounts WHERE seq > $1
    ) changed),
    EXISTS (SELECT FROM portfolio_summaries)
"""


async def settling_reason(session: AsyncSession) -> str | None:
    """Why the population facts no longer describe the portfolio (it grew by more than the
    policy's ``refit_growth_share`` since the last fit, or more than ``bulk_load_share`` of
    the accounts changed since), or None. No facts, or no portfolio summary, yet with accounts
    present is a reason."""
    _, policy = await active_policy(session)
    latest = await latest_population(session)
    connection = await session.connection()
    change_seq = latest[1].change_seq if latest is not None else 0
    result = await connection.exec_driver_sql(_SETTLE_COUNTS, (change_seq,))
    counts: Any = result.one()
    accounts, changed, summarised = int(counts[0]), int(counts[1]), bool(counts[2])
    if latest is None:
        return "no population facts yet" if accounts else None
    if accounts and not summarised:
        # Rescores fitted the first facts, but the portfolio pages wait for a pass's summary.
        return "no portfolio summary yet"
    facts = latest[1]
    rules = policy.population
    if accounts - facts.accounts > rules.refit_growth_share * max(facts.accounts, 1):
        return f"the portfolio grew from {facts.accounts} to {accounts} accounts"
    if changed > rules.bulk_load_share * max(accounts, 1):
        return f"{changed} of {accounts} accounts changed since the last fit"
    return None


async def latest_change_number(session: AsyncSession) -> int:
    """The newest account change number handed out (moves with every ingested change)."""
    result = await session.execute(
        text("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM account_changes_seq")
    )
    return int(result.scalar_one())


async def summarise_portfolio(
    sessionmaker: async_sessionmaker[AsyncSession], *, now: datetime | None = None
) -> int:
    """Store what the portfolio pages show (``summary``), aggregated once after a pass instead
    of on every view; returns the scopes written. The portfolio-pass job runs it right after
    the pass, as a step of its own: the pages' aggregation over the orders and the snapshots
    (about 6 s at 100,000 accounts and 5M orders) is not the scoring's."""
    started = time.perf_counter()
    async with sessionmaker() as session, session.begin():
        scopes = await store_portfolio_summaries(session, now=_now(now))
    log.info(
        "portfolio_summary_done", scopes=scopes, seconds=round(time.perf_counter() - started, 3)
    )
    return scopes
