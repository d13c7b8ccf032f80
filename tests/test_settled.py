"""A picture that settles and holds: after a bulk load, tiers and bands stop moving; a first
tier is not held; a rescore racing a pass leaves every account equal to its newest snapshot;
the purchase occasions of the SQL equal the backtest's."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import pytest
from arq.connections import ArqRedis
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from services.cli.demo import generate_portfolio, send_events
from services.scorer import jobs, passes
from services.scorer.engine import ScoringPolicy, summarise_purchases
from services.scorer.features import load_features
from services.scorer.policies import create_policy_version
from services.scorer.population import latest_population
from shared.db import create_sessionmaker
from shared.models import Account, ScoreSnapshot, TierChange
from shared.settings import Settings
from tests.conftest import RunWorker
from tests.portfolio import AccountSpec, ordinary_accounts, send

STAR = AccountSpec("STAR", amount=60_000, margin=0.32, every_days=14, categories=6, strategic_fit=5)


@pytest.fixture
def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return create_sessionmaker(engine)


async def _picture(session: AsyncSession) -> dict[int, tuple[Any, ...]]:
    session.expire_all()
    rows = await session.execute(
        select(Account.id, Account.tier, Account.risk_band).order_by(Account.id)
    )
    return {row[0]: (row[1], row[2]) for row in rows.all()}


async def _tier_changes(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(TierChange)) or 0)


async def test_after_a_demo_load_and_a_quiet_minute_further_passes_change_nothing(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
    redis: ArqRedis,
    settings: Settings,
    run_worker: RunWorker,
) -> None:
    now = datetime.now(UTC)
    events = generate_portfolio(200, seed=7, years=2.0, now=now)
    client.headers.update(admin_headers)
    # The scorer works while the load is under way: its first facts come from a part of it.
    part = len(events) // 3
    assert (await send_events(client, events[:part], batch_size=500)).rejected == 0
    await run_worker()
    assert (await send_events(client, events[part:], batch_size=500)).rejected == 0
    await run_worker()
    async with sessionmaker() as s:
        latest = await latest_population(s)
        assert latest is not None
        first_fit = latest[1]
        assert await passes.settling_reason(s) is not None  # a bulk load since the last fit

    # The settle check asks for a pass once no new data arrived for the quiet period.
    ctx: dict[str, Any] = {"sessionmaker": sessionmaker, "redis": redis, "settings": settings}
    assert await jobs.settle_population(ctx) is False  # it has just seen the data move
    ctx["settle"]["moved_at"] = time.monotonic() - 61  # one quiet minute later
    assert await jobs.settle_population(ctx) is True
    assert len(await redis.queued_jobs(queue_name=settings.queue_name)) == 1
    await run_worker()  # runs the pass
    async with sessionmaker() as s:
        latest = await latest_population(s)
        assert latest is not None
        settled = latest[1]
        assert settled.generation == first_fit.generation + 1
        assert settled.accounts_with_orders >= 150
        assert settled.bgnbd_source == "fitted"
        assert await passes.settling_reason(s) is None
    assert await jobs.settle_population(ctx) is False  # nothing left to settle

    picture = await _picture(session)
    changes = await _tier_changes(session)
    # More passes than the demotion rule counts: nothing moves.
    for minutes in (1, 2, 3, 4):
        await passes.run_portfolio_pass(
            sessionmaker, now=datetime.now(UTC) + timedelta(minutes=minutes)
        )
    assert await _picture(session) == picture
    assert await _tier_changes(session) == changes

    # A distribution a head of sales accepts: key + strategic close to the accounts inside the
    # 80/20 profit core, developing a minority, and no large late payer called "developing".
    counts = dict(
        (await session.execute(select(Account.tier, func.count()).group_by(Account.tier))).all()
    )
    key_accounts = counts.get("key", 0) + counts.get("strategic", 0)
    latest_features = (
        select(ScoreSnapshot.features)
        .where(ScoreSnapshot.account_id == Account.id)
        .order_by(ScoreSnapshot.computed_at.desc(), ScoreSnapshot.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    rows = (
        await session.execute(
            select(Account.tier, latest_features).where(Account.status == "active")
        )
    ).all()
    core = [
        (tier, f)
        for tier, f in rows
        if (f["gross_profit_12m"] or 0) > 0 and f["profit_share_cum"] <= 0.8
    ]
    assert 0.6 * len(core) <= key_accounts <= 1.2 * len(core), (counts, len(core))
    assert counts.get("developing", 0) <= 0.25 * sum(counts.values()), counts
    late_in_core = [tier for tier, f in core if (f["late_share"] or 0) > 0.3]
    assert late_in_core, "the demo has late payers in the profit core"
    assert "developing" not in late_in_core


async def test_a_first_tier_is_not_held_but_a_confirmed_one_is(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    await send(client, admin_headers, [*ordinary_accounts(40), STAR], now)
    await passes.run_portfolio_pass(sessionmaker, now=now)
    session.expire_all()
    star = await session.scalar(select(Account).where(Account.external_id == "STAR"))
    assert star is not None
    assert star.tier in {"strategic", "key"}
    assert star.tier_basis is None  # given for the first time
    first = star.tier
    score = star.value_score
    assert score is not None
    # Thresholds just above the score: the data points one tier lower, inside the band.
    policy = ScoringPolicy.model_validate(
        {
            "tiers": {
                "strategic_threshold": min(score + 2, 99.5),
                "key_threshold": min(score + 1, 99.0),
                "developing_threshold": 10.0,
            },
            "hysteresis": {"band": 5.0, "demote_after": 3},
        }
    )
    async with sessionmaker() as s, s.begin():
        await create_policy_version(s, policy=policy, comment="tighter", created_by="test")
    await passes.run_portfolio_pass(sessionmaker, now=now + timedelta(hours=1))
    session.expire_all()
    star = await session.scalar(select(Account).where(Account.external_id == "STAR"))
    assert star is not None
    # Not held: the first tier follows the data at once.
    assert star.tier != first
    assert star.tier_basis is not None


async def test_a_rescore_racing_a_pass_leaves_every_account_equal_to_its_newest_snapshot(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    await send(client, admin_headers, [*ordinary_accounts(30), STAR], now)
    await run_worker()
    await passes.run_portfolio_pass(sessionmaker)
    star_id = await session.scalar(select(Account.id).where(Account.external_id == "STAR"))
    assert star_id is not None
    # New data for the account, so the next pass fits different facts.
    await send(client, admin_headers, [*ordinary_accounts(30, prefix="MORE")], now)
    async with sessionmaker() as s:
        stale = await latest_population(s)
    assert stale is not None
    real_read_state = vars(passes)["read_state"]
    real_latest = vars(passes)["latest_population"]

    async def read_then_race(s: AsyncSession) -> dict[int, Any]:
        rows: dict[int, Any] = await real_read_state(s)
        # Between the pass's read and its writes, a rescore that had read the facts the pass
        # has just replaced (it started before they were committed) writes the account.

        async def superseded(_: AsyncSession) -> Any:
            return stale

        monkeypatch.setattr(passes, "latest_population", superseded)
        async with sessionmaker() as r, r.begin():
            await passes.rescore_accounts(r, account_ids=[star_id])
        monkeypatch.setattr(passes, "latest_population", real_latest)
        return rows

    monkeypatch.setattr(passes, "read_state", read_then_race)
    await passes.run_portfolio_pass(sessionmaker)
    monkeypatch.setattr(passes, "read_state", real_read_state)
    async with sessionmaker() as s:
        fresh = await latest_population(s)
        dirty = await s.scalar(
            text("SELECT count(*) FROM dirty_accounts WHERE account_id = :i"), {"i": star_id}
        )
    assert fresh is not None
    assert dirty == 1  # the pass handed it back for a rescore with its facts
    monkeypatch.setattr(jobs, "SWEEP_GRACE", timedelta(0))  # the sweeper re-drives the mark
    await run_worker()
    session.expire_all()
    star = await session.get(Account, star_id)
    assert star is not None
    assert star.population_fit_id == fresh[0]
    # Every account: its figures are its newest snapshot's.
    newest = (
        select(ScoreSnapshot)
        .where(ScoreSnapshot.account_id == Account.id)
        .order_by(ScoreSnapshot.computed_at.desc(), ScoreSnapshot.id.desc())
        .limit(1)
        .correlate(Account)
        .lateral()
    )
    rows = (
        await session.execute(
            select(
                Account.id,
                Account.tier,
                Account.value_score,
                Account.risk_probability,
                Account.risk_band,
                newest.c.tier,
                newest.c.value_score,
                newest.c.risk_probability,
                newest.c.risk_band,
            ).join(newest, text("true"))
        )
    ).all()
    assert len(rows) == 61
    for row in rows:
        assert tuple(row[1:5]) == tuple(row[5:9]), row


async def test_the_occasions_of_the_sql_equal_the_backtests(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    """Bursty orders: the same (x, t_x, T) from the service's SQL and from the backtest."""
    rng = np.random.default_rng(5)
    as_of = datetime(2026, 6, 30, 18, 0, tzinfo=UTC)
    accounts: dict[str, list[datetime]] = {}
    for a in range(25):
        day, times = 0.0, []
        while day < 700:
            day += float(rng.choice([1, 2, 3, 6, 7, 8, 15, 40, 90]))
            moment = datetime(2024, 7, 1, tzinfo=UTC) + timedelta(
                days=day, hours=int(rng.integers(0, 23))
            )
            if moment <= as_of:
                times.append(moment)
        accounts[f"OCC-{a:02d}"] = times
    items = [
        {
            "type": "order",
            "event_id": f"occ-{external}-{k}",
            "version": 1,
            "external_id": f"SO-{external}-{k}",
            "account_external_id": external,
            "ordered_at": moment.isoformat(),
            "amount": "100.00",
            "cost": "60.00",
            "currency": "EUR",
        }
        for external, times in accounts.items()
        for k, moment in enumerate(times)
    ]
    for start in range(0, len(items), 900):
        response = await client.post(
            "/v1/events", json={"events": items[start : start + 900]}, headers=admin_headers
        )
        assert response.status_code == 202, response.text
    codes = {external: n for n, external in enumerate(sorted(accounts))}
    account = np.array([codes[e] for e, times in accounts.items() for _ in times])
    days = np.array([t.date().toordinal() for times in accounts.values() for t in times])
    for window in (1, 7, 30):
        async with sessionmaker() as s, s.begin():
            table = await load_features(s, as_of=as_of, occasion_window_days=window)
            ids = {
                int(row[0]): str(row[1])
                for row in (await s.execute(select(Account.id, Account.external_id))).all()
            }
        summary = summarise_purchases(
            account,
            days,
            np.full(len(days), 100.0),
            accounts=len(codes),
            as_of=as_of.date().toordinal(),
            occasion_window_days=window,
        )
        for i, account_id in enumerate(table.account_id):
            code = codes[ids[int(account_id)]]
            sql = tuple(float(table.columns[k][i]) for k in ("x", "t_x", "T"))
            backtest = (summary.frequency[code], summary.recency[code], summary.age[code])
            assert sql == backtest, (window, ids[int(account_id)])
    assert date(2026, 6, 30).toordinal() == as_of.date().toordinal()
