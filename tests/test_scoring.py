"""The scorer against real Postgres: tiers that respect the key-account rules, hysteresis,
overrides, risk that rises as an account goes quiet, and the history it keeps."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from services.scorer import features
from services.scorer.engine import ScoringPolicy
from services.scorer.features import (
    Aggregates,
    build_feature_table,
    load_aggregates,
    load_features,
    store_aggregates,
)
from services.scorer.passes import rescore_accounts, run_portfolio_pass
from services.scorer.policies import active_policy, create_policy_version
from services.scorer.preview import preview_policy
from shared.db import create_sessionmaker
from shared.models import (
    Account,
    AccountAggregate,
    DirtyAccount,
    PopulationFit,
    ScoreSnapshot,
    TierChange,
)
from tests import factories
from tests.conftest import RunWorker
from tests.portfolio import AccountSpec, ordinary_accounts, send


def _ts(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


NOW = datetime.now(UTC).replace(microsecond=0)

STAR = AccountSpec("STAR", amount=60_000, margin=0.32, every_days=14, categories=6, strategic_fit=5)
BIG_THIN = AccountSpec("BIG-THIN", amount=90_000, margin=0.03, every_days=12, categories=5)
TINY_RICH = AccountSpec("TINY-RICH", amount=400, margin=0.75, every_days=14, categories=4)
LATE_BIG = AccountSpec(
    "LATE-BIG",
    amount=60_000,
    margin=0.30,
    every_days=14,
    categories=6,
    late_share=0.7,
    days_late=45,
)


@pytest.fixture
def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return create_sessionmaker(engine)


async def _account(session: AsyncSession, external_id: str) -> Account:
    session.expire_all()
    account = await session.scalar(select(Account).where(Account.external_id == external_id))
    assert account is not None
    return account


async def _latest_snapshot(session: AsyncSession, account_id: int) -> ScoreSnapshot:
    snapshot = await session.scalar(
        select(ScoreSnapshot)
        .where(ScoreSnapshot.account_id == account_id)
        .order_by(ScoreSnapshot.id.desc())
        .limit(1)
    )
    assert snapshot is not None
    return snapshot


def _codes(drivers: list[dict[str, Any]]) -> set[str]:
    return {d["code"] for d in drivers}


async def test_tiers_follow_the_key_account_rules(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    specs = [*ordinary_accounts(40), STAR, BIG_THIN, TINY_RICH, LATE_BIG]
    await send(client, admin_headers, specs, NOW)

    assert await run_portfolio_pass(sessionmaker, now=NOW) == len(specs)

    star = await _account(session, "STAR")
    assert star.tier in {"strategic", "key"}
    star_id = star.id
    big_thin = await _account(session, "BIG-THIN")
    assert big_thin.tier not in {"strategic", "key"}
    thin = await _latest_snapshot(session, big_thin.id)
    assert "margin_below_floor" in _codes(thin.drivers["tier"])
    assert thin.features["margin_rate"] == pytest.approx(0.03, abs=0.005)
    tiny = await _account(session, "TINY-RICH")
    assert tiny.tier not in {"strategic", "key"}
    assert (await _latest_snapshot(session, tiny.id)).features["revenue_12m"] < 100_000
    late = await _account(session, "LATE-BIG")
    # A large late payer keeps the tier its value earns, with a credit flag: not "developing".
    assert late.tier in {"strategic", "key"}
    late_drivers = (await _latest_snapshot(session, late.id)).drivers
    assert "late_payer" in _codes(late_drivers["tier"])
    late_text = next(d["text"] for d in late_drivers["tier"] if d["code"] == "late_payer")
    assert late_text.startswith("pays late: ")
    assert "credit flag" in late_text
    # every account got a first tier: a tier change from nothing, numbered 1
    changes = await session.scalar(
        select(func.count()).select_from(TierChange).where(TierChange.seq == 1)
    )
    assert changes == len(specs)
    # the 80/20 line is in the snapshot, and the value drivers speak in words
    star_snapshot = await _latest_snapshot(session, star_id)
    assert star_snapshot.features["revenue_12m"] == pytest.approx(60_000 * 26, rel=0.1)
    assert 0 < star_snapshot.features["profit_share_cum"] <= 0.8  # inside the 80/20 core
    assert all(d["text"] for d in star_snapshot.drivers["value"])


async def test_a_second_pass_writes_history_but_no_tier_change(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    await send(client, admin_headers, [*ordinary_accounts(30), STAR], NOW)
    await run_portfolio_pass(sessionmaker, now=NOW)
    # an hour later nothing a reader would notice has moved: the history gets no new snapshot
    # but the daily one of the accounts whose slot this hour is, and the other accounts keep
    # the figures of their last snapshot
    later = NOW + timedelta(hours=1)
    await run_portfolio_pass(sessionmaker, now=later)
    per_account = select(ScoreSnapshot.account_id, func.count()).group_by(ScoreSnapshot.account_id)
    counts = dict((await session.execute(per_account)).all())
    in_slot = {i for i in counts if i % 24 == later.hour}
    assert {i for i, n in counts.items() if n == 2} == in_slot
    assert {i for i, n in counts.items() if n == 1} == set(counts) - in_slot
    quiet = await session.get_one(Account, min(set(counts) - in_slot))
    assert quiet.scored_at == NOW
    last = await _latest_snapshot(session, quiet.id)
    assert (quiet.value_score, quiet.risk_probability) == (last.value_score, last.risk_probability)
    # a day on, every account gets its daily snapshot, changed or not
    await run_portfolio_pass(sessionmaker, now=NOW + timedelta(hours=25))
    star = await _account(session, "STAR")
    total = await session.scalar(select(func.count()).select_from(ScoreSnapshot))
    assert total == 2 * 31 + len(in_slot)
    assert star.tier_change_seq == 1
    assert await session.scalar(select(func.count()).select_from(PopulationFit)) == 3
    version, _ = await active_policy(session)
    assert (await _latest_snapshot(session, star.id)).policy_version == version


async def test_a_tier_is_held_through_noise_and_demoted_after_consecutive_evaluations(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    await send(client, admin_headers, [*ordinary_accounts(40), STAR], NOW)
    await run_portfolio_pass(sessionmaker, now=NOW)
    # A first tier is provisional (the next evaluation follows the data); the second pass
    # confirms it, and from then on hysteresis holds it.
    await run_portfolio_pass(sessionmaker, now=NOW + timedelta(minutes=1))
    star = await _account(session, "STAR")
    assert star.tier is not None
    assert star.tier_basis is not None
    assert star.value_score is not None
    held = star.tier
    score = star.value_score
    # A policy whose thresholds sit just above the account's score: the data now points one
    # tier lower, but the score is inside the hysteresis band below the held tier's threshold.
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

    tiers = []
    for hour in (1, 2, 3):
        await run_portfolio_pass(sessionmaker, now=NOW + timedelta(hours=hour))
        tiers.append((await _account(session, "STAR")).tier)
    # held twice, demoted on the third consecutive evaluation below: one change, no flapping
    assert tiers[0] == held
    assert tiers[1] == held
    assert tiers[2] != held
    star = await _account(session, "STAR")
    assert star.tier_change_seq == 2
    second = await _latest_snapshot(session, star.id)
    assert second.tier == tiers[2]
    held_snapshots = list(
        await session.scalars(
            select(ScoreSnapshot)
            .where(ScoreSnapshot.account_id == star.id)
            .order_by(ScoreSnapshot.id)
        )
    )
    assert "hysteresis" in held_snapshots[1].drivers
    assert "hysteresis" in held_snapshots[2].drivers


async def test_an_override_pins_the_tier_until_it_expires(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    await send(client, admin_headers, [*ordinary_accounts(30), TINY_RICH], NOW)
    await run_portfolio_pass(sessionmaker, now=NOW)
    tiny = await _account(session, "TINY-RICH")
    computed = tiny.tier
    assert computed not in {"strategic", "key"}
    await session.execute(
        update(Account)
        .where(Account.id == tiny.id)
        .values(
            tier_override="key",
            tier_override_reason="new framework contract signed",
            tier_override_expires_at=NOW + timedelta(days=30),
        )
    )
    await session.commit()

    async with sessionmaker() as s, s.begin():
        await rescore_accounts(s, account_ids=[tiny.id], now=NOW + timedelta(minutes=5))
    tiny = await _account(session, "TINY-RICH")
    assert tiny.tier == "key"
    assert tiny.computed_tier == computed
    pinned = await _latest_snapshot(session, tiny.id)
    assert "new framework contract signed" in pinned.drivers["override"]["text"]
    change = await session.scalar(
        select(TierChange).where(TierChange.account_id == tiny.id, TierChange.seq == 2)
    )
    assert change is not None
    assert (change.from_tier, change.to_tier) == (computed, "key")

    # after the expiry the data decides again, and the override is cleared
    async with sessionmaker() as s, s.begin():
        await rescore_accounts(s, account_ids=[tiny.id], now=NOW + timedelta(days=31))
    tiny = await _account(session, "TINY-RICH")
    assert tiny.tier == computed
    assert tiny.tier_override is None
    assert tiny.tier_change_seq == 3


async def test_risk_rises_as_an_account_stops_ordering_and_time_passes(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    steady = AccountSpec("STEADY", every_days=20, last_days_ago=5)
    quiet = AccountSpec("QUIET", every_days=20, first_days_ago=690, last_days_ago=150)
    await send(client, admin_headers, [*ordinary_accounts(40), steady, quiet], NOW)
    await run_portfolio_pass(sessionmaker, now=NOW)

    steady_account = await _account(session, "STEADY")
    steady_id, steady_risk = steady_account.id, steady_account.risk_probability
    quiet_account = await _account(session, "QUIET")
    quiet_id, quiet_risk = quiet_account.id, quiet_account.risk_probability
    assert steady_risk is not None
    assert quiet_risk is not None
    assert quiet_risk > steady_risk + 0.2
    drivers = (await _latest_snapshot(session, quiet_id)).drivers["risk"]
    assert any("no order for 150 days; usually orders every 20" in d["text"] for d in drivers), (
        drivers
    )

    risks = [steady_risk]
    for days in (30, 60, 120):
        async with sessionmaker() as s, s.begin():
            await rescore_accounts(s, account_ids=[steady_id], now=NOW + timedelta(days=days))
        account = await _account(session, "STEADY")
        assert account.risk_probability is not None
        risks.append(account.risk_probability)
    assert risks == sorted(risks)
    assert risks[-1] > risks[0] + 0.2


async def test_a_lost_account_is_lost_not_at_risk(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    gone = AccountSpec("GONE", amount=60_000, every_days=14, last_days_ago=200, status="lost")
    await send(client, admin_headers, [*ordinary_accounts(30), gone], NOW)
    await run_portfolio_pass(sessionmaker, now=NOW)
    account = await _account(session, "GONE")
    assert account.tier == "standard"
    assert account.risk_probability is None
    assert account.risk_band is None
    assert (await _latest_snapshot(session, account.id)).drivers["status"]["code"] == "lost"


async def test_preview_writes_nothing_and_predicts_the_moves(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    await send(client, admin_headers, [*ordinary_accounts(40), STAR, BIG_THIN], NOW)
    await run_portfolio_pass(sessionmaker, now=NOW)
    before = {
        model.__tablename__: await session.scalar(select(func.count()).select_from(model))
        for model in (ScoreSnapshot, TierChange, PopulationFit, Account)
    }
    # a generous draft: lower thresholds promote accounts at once (no hysteresis on promotion)
    draft = ScoringPolicy.model_validate(
        {
            "tiers": {
                "strategic_threshold": 50,
                "key_threshold": 30,
                "developing_threshold": 5,
                "min_revenue_key": 0,
                "margin_floor": 0.0,
            }
        }
    )
    async with sessionmaker() as s, s.begin():
        preview = await preview_policy(s, draft=draft, now=NOW)
    after = {
        model.__tablename__: await session.scalar(select(func.count()).select_from(model))
        for model in (ScoreSnapshot, TierChange, PopulationFit, Account)
    }
    assert after == before
    assert preview.accounts == 42
    assert preview.tier_moves, "a much lower bar must move some accounts"
    assert sum(m.accounts for m in preview.tier_moves) + preview.unchanged_tier == 42

    # what the preview said is what applying the policy does
    async with sessionmaker() as s, s.begin():
        await create_policy_version(s, policy=draft, comment=None, created_by="test")
    tiers_before = dict((await session.execute(select(Account.external_id, Account.tier))).all())
    await run_portfolio_pass(sessionmaker, now=NOW)
    session.expire_all()
    tiers_after = dict((await session.execute(select(Account.external_id, Account.tier))).all())
    moved = sum(1 for k, v in tiers_after.items() if tiers_before[k] != v)
    assert moved == sum(m.accounts for m in preview.tier_moves)
    assert {t.value: n for t, n in preview.tiers_draft.items()} == {
        t: sum(1 for v in tiers_after.values() if v == t)
        for t in ("strategic", "key", "developing", "standard")
    }


async def test_an_accepted_event_reaches_a_new_snapshot_through_the_worker(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
    run_worker: RunWorker,
) -> None:
    await send(client, admin_headers, [*ordinary_accounts(30), STAR], NOW)
    await run_worker()  # the rescores the ingestion asked for
    star = await _account(session, "STAR")
    star_id = star.id
    first = await _latest_snapshot(session, star_id)
    assert await session.scalar(select(func.count()).select_from(DirtyAccount)) == 0
    assert await session.scalar(select(func.count()).select_from(PopulationFit)) == 1

    big_order = {
        "event_id": "ev-big",
        "version": 1,
        "external_id": "SO-BIG",
        "account_external_id": "STAR",
        "ordered_at": (NOW - timedelta(hours=1)).isoformat(),
        "amount": "250000.00",
        "cost": "150000.00",
        "currency": "EUR",
        "status": "placed",
        "lines": [{"category": "machines", "quantity": "1", "amount": "250000.00"}],
    }
    response = await client.post("/v1/orders", json=big_order, headers=admin_headers)
    assert response.status_code == 202
    worker = await run_worker()
    assert worker.jobs_failed == 0
    second = await _latest_snapshot(session, star_id)
    assert second.id > first.id
    assert second.features["revenue_12m"] == pytest.approx(
        first.features["revenue_12m"] + 250_000, rel=1e-6
    )
    assert await session.scalar(select(func.count()).select_from(DirtyAccount)) == 0


def _bgnbd_history(
    rng: np.random.Generator, n: int, *, now: datetime
) -> list[tuple[int, datetime]]:
    """Orders of ``n`` accounts drawn from a known BG/NBD process (r=0.8, alpha=40 days,
    a=0.6, b=4), each first seen 200-700 days before ``now``."""
    orders: list[tuple[int, datetime]] = []
    for account in range(n):
        rate = rng.gamma(0.8, 1 / 40.0)
        dropout = rng.beta(0.6, 4.0)
        age = float(rng.uniform(200, 700))
        day = 0.0
        orders.append((account, now - timedelta(days=age)))
        while True:
            if rng.random() < dropout:
                break  # dropped out right after this order
            day += rng.exponential(1 / rate)
            if day >= age:
                break
            orders.append((account, now - timedelta(days=age - day)))
    return orders


async def test_the_risk_is_calibrated_on_a_history_from_a_known_process(
    engine: AsyncEngine,
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    rng = np.random.default_rng(7)
    orders = _bgnbd_history(rng, 2000, now=NOW)
    async with engine.begin() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        await raw.executemany(
            "INSERT INTO accounts (id, external_id, source_version) "
            "OVERRIDING SYSTEM VALUE VALUES ($1, $2, 1)",
            [(i + 1, f"S-{i}") for i in range(2000)],
        )
        await raw.executemany(
            "INSERT INTO orders (account_id, external_id, ordered_at, amount, cost, currency, "
            "status, source_version) VALUES ($1, $2, $3, 100, 70, 'EUR', 'placed', 1)",
            [(a + 1, f"SO-{k}", at) for k, (a, at) in enumerate(orders)],
        )

    await run_portfolio_pass(sessionmaker, now=NOW)

    facts = await session.scalar(select(PopulationFit.facts))
    assert facts is not None
    calibration = facts["calibration"]
    assert calibration["accounts"] > 1500  # the accounts with an order before the cut-off
    assert calibration["auc"] > 0.75
    # predicted and observed no-purchase rates agree per decile: ~190 accounts a decile give a
    # standard error of at most 0.036, so 0.12 is more than three of them
    for decile in calibration["deciles"]:
        assert abs(decile["mean_predicted"] - decile["observed_rate"]) < 0.12, decile
    assert facts["bgnbd_source"] == "fitted"
    # data drawn from BG/NBD itself: the fitted model alone is already calibrated, and whatever
    # method won on held-out accounts scored no worse than the policy's model as is
    scores = calibration["held_out_brier"]
    methods = ("policy", "calibrated", "learned")
    bases = ("bgnbd", "pareto_nbd", "average")
    assert set(scores) == {f"{b}/{m}" for b in bases for m in methods}
    chosen = f"{calibration['base_model']}/{calibration['method']}"
    assert scores[chosen] == min(scores.values())
    assert calibration["max_decile_error"] < 0.12
    assert facts["pareto_source"] == "fitted"
    assert set(facts["fit_seconds"]) == {"bgnbd", "pareto_nbd"}

    # the replay is redone daily, not on every pass
    await run_portfolio_pass(sessionmaker, now=NOW + timedelta(hours=1))
    await run_portfolio_pass(sessionmaker, now=NOW + timedelta(hours=25))
    cutoffs = [
        facts["calibration"]["cutoff"]
        for facts in await session.scalars(select(PopulationFit.facts).order_by(PopulationFit.id))
    ]
    assert cutoffs[0] == cutoffs[1]
    assert cutoffs[2] != cutoffs[1]


async def test_a_portfolio_pass_on_demand_runs_in_the_worker(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    make_key: Any,
    session: AsyncSession,
    redis: Any,
    run_worker: RunWorker,
) -> None:
    await send(client, admin_headers, [*ordinary_accounts(25), STAR], NOW)
    await redis.flushdb()  # only the pass asked for below is queued
    reader = {"Authorization": f"Bearer {await make_key('accounts:read')}"}
    denied = await client.post("/v1/portfolio/rescore", headers=reader)
    assert denied.status_code == 403

    response = await client.post("/v1/portfolio/rescore", headers=admin_headers)
    assert response.status_code == 202
    assert response.json() == {"queued": True}
    again = await client.post("/v1/portfolio/rescore", headers=admin_headers)
    assert again.status_code == 202  # coalesced with the one already queued
    worker = await run_worker()
    assert worker.jobs_failed == 0
    assert await session.scalar(select(func.count()).select_from(PopulationFit)) == 1
    scored = await session.scalar(
        select(func.count()).select_from(Account).where(Account.scored_at.is_not(None))
    )
    assert scored == 26


async def test_every_accounts_features_agree_with_the_one_statement_of_a_rescore(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    # The full aggregation runs its parts on connections of their own; a rescore of a few
    # accounts runs one statement; a savepoint (the policy preview) runs one statement too.
    specs = [*ordinary_accounts(12), STAR, BIG_THIN, LATE_BIG]
    await send(client, admin_headers, specs, NOW)
    async with sessionmaker() as session, session.begin():
        everything = await load_features(session, as_of=NOW, occasion_window_days=7)
        ids = [int(i) for i in everything.account_id]
        some = await load_features(session, as_of=NOW, occasion_window_days=7, account_ids=ids)
        async with session.begin_nested():
            nested = await load_features(session, as_of=NOW, occasion_window_days=7)
    assert len(everything) == len(specs)
    for other in (some, nested):
        assert np.array_equal(other.account_id, everything.account_id)
        assert set(other.columns) == set(everything.columns)
        for name, column in everything.columns.items():
            assert np.array_equal(other.columns[name], column, equal_nan=True), name
    assert np.isfinite(everything.columns["categories_12m"]).all()
    assert everything.columns["invoices_12m"].sum() > 0


def _assert_same_features(got: Any, expected: Any) -> None:
    assert np.array_equal(got.account_id, expected.account_id)
    assert set(got.columns) == set(expected.columns)
    for name, column in expected.columns.items():
        # Days late of open invoices are computed from stored sums: equal to well under a second.
        assert np.allclose(got.columns[name], column, rtol=0, atol=1e-6, equal_nan=True), name


async def test_a_pass_reuses_stored_aggregates_only_while_they_hold(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    sessionmaker: async_sessionmaker[AsyncSession],
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    quiet = AccountSpec(
        "QUIET", every_days=45, last_days_ago=120, surveys=[4, 3], complaints_days_ago=[170]
    )
    specs = [*ordinary_accounts(12), STAR, LATE_BIG, quiet]
    await send(client, admin_headers, specs, NOW)
    extra = [
        # open past its due date: its days late grow as time passes, with no event
        factories.batch_item(
            "payment", factories.payment("STAR", due_at=_ts(NOW - timedelta(days=5)), paid_at=None)
        ),
        # due later: it enters the invoices window then
        factories.batch_item(
            "payment",
            factories.payment("QUIET", due_at=_ts(NOW + timedelta(days=20)), paid_at=None),
        ),
        # dated ahead: it counts from its date on
        factories.batch_item(
            "order", factories.order("N-1", ordered_at=_ts(NOW + timedelta(days=9)))
        ),
    ]
    response = await client.post("/v1/events", json={"events": extra}, headers=admin_headers)
    assert response.json()["accepted"] == len(extra), response.text
    assert (await run_worker()).jobs_failed == 0  # the rescores clear every mark
    # The pass after the rescores (a pass as of a time before them would hand their accounts
    # back for a rescore rather than write an older view over them).
    assert await run_portfolio_pass(sessionmaker, now=datetime.now(UTC)) == len(specs)
    # Mixed reuse whatever the share of accounts to aggregate again.
    monkeypatch.setattr(features, "REAGGREGATE_ALL_ABOVE", 1.0)

    async def both(at: datetime) -> tuple[Aggregates, Any]:
        async with sessionmaker() as session, session.begin():
            reused = await load_aggregates(session, as_of=at, occasion_window_days=7, reuse=True)
            anew = await load_features(session, as_of=at, occasion_window_days=7)
        _assert_same_features(build_feature_table(reused), anew)
        return reused, anew

    # An hour later no row entered or left a window: every account reused, nothing aggregated.
    reused, anew = await both(NOW + timedelta(hours=1))
    assert not reused.fresh.any()
    ids = {int(i): n for n, i in enumerate(anew.account_id)}
    async with sessionmaker() as session:
        rows = await session.execute(select(Account.external_id, Account.id))
        row = {external_id: ids[account_id] for external_id, account_id in rows}
    assert anew.columns["avg_days_late"][row["STAR"]] > 0

    # Weeks later orders, invoices and a complaint have left or entered windows: those accounts
    # are aggregated again, the others still reused, and all agree with a full aggregation.
    reused, anew = await both(NOW + timedelta(days=12))
    assert 0 < reused.fresh.sum() < len(reused)
    for moved in ("QUIET", "N-1"):
        assert reused.fresh[row[moved]], moved

    # New data makes its account's stored row useless until it is aggregated again.
    order = factories.order("LATE-BIG", ordered_at=_ts(NOW - timedelta(days=1)))
    assert (await client.post("/v1/orders", json=order, headers=admin_headers)).status_code == 202
    reused, anew = await both(NOW + timedelta(hours=2))
    assert reused.fresh[row["LATE-BIG"]]
    assert reused.fresh.sum() == 1

    # Its rescore keeps what it aggregated, with the change it includes: the next pass takes it.
    assert (await run_worker()).jobs_failed == 0
    reused, anew = await both(NOW + timedelta(hours=3))
    assert not reused.fresh.any()
    assert anew.columns["orders_12m"][row["LATE-BIG"]] == 27


async def test_stored_aggregates_never_go_back_to_an_earlier_change(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    await send(client, admin_headers, [STAR], NOW)
    async with sessionmaker() as session, session.begin():
        now = await load_aggregates(
            session, as_of=NOW, occasion_window_days=7, account_ids=[], reuse=False
        )
        everything = await load_aggregates(session, as_of=NOW, occasion_window_days=7)
        assert len(now) == 0
        assert await store_aggregates(session, everything) == 1
    seq = int(everything.seq[0])
    assert seq > 0  # the mark's change number
    older = replace(everything, as_of=NOW + timedelta(days=1), seq=everything.seq - 1)
    async with sessionmaker() as session, session.begin():
        await store_aggregates(session, older)
    async with sessionmaker() as session:
        stored = await session.get_one(AccountAggregate, int(everything.account_id[0]))
        assert (stored.seq, stored.as_of) == (seq, NOW)
        assert len(stored.aggregate_values) == len(features.VALUE_COLUMNS)
