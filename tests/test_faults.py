"""Faults as an operator meets them, on real processes: a private Postgres and Redis that the
tests stop, freeze and start again, and ``kam api`` / ``kam scorer`` processes they SIGKILL.

Each test is kept short (Redis is frozen for ``KAM_FAULT_FREEZE_S``, 20 s by default);
``-m "not faults"`` leaves the module out."""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest

from tests import factories
from tests.fault_stack import Stack, postgres_available, running_stack
from tests.webhook_receiver import Receiver, Reply

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(not postgres_available(), reason="needs Postgres 15 binaries and Redis"),
]

FREEZE_S = float(os.environ.get("KAM_FAULT_FREEZE_S", "20"))
TABLES = (
    "webhook_attempts, webhook_deliveries, webhook_events, webhook_endpoints, score_snapshots, "
    "dirty_accounts, orders, ingest_events, tier_changes, accounts"
)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(
        KAM_QUEUE_NAME="kam:faults",
        KAM_SWEEP_INTERVAL_S="2",
        KAM_WEBHOOK_SWEEP_INTERVAL_S="1",
        KAM_RESCORE_DEBOUNCE_S="0.1",
        KAM_WEBHOOK_TIMEOUT_S="2",
        KAM_WEBHOOK_LEASE_MARGIN_S="2",
        KAM_WEBHOOK_RETRY_SCHEDULE_S="[3, 3, 3, 3, 3, 3, 3, 3]",
        KAM_SHUTDOWN_GRACE_S="2",
    ) as stack:
        stack.start_api()
        yield stack


@pytest.fixture
async def db(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(
        host="127.0.0.1", port=stack.postgres.port, user="postgres", database="kam"
    )
    await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    yield conn
    await conn.close()


@pytest.fixture
async def api(stack: Stack, db: asyncpg.Connection) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers=stack.headers, timeout=30
    ) as client:
        yield client
    if stack.scorer is not None and stack.scorer.poll() is None:
        stack.kill_scorer()


async def _post_order(api: httpx.AsyncClient, account: str) -> tuple[int, float]:
    started = time.monotonic()
    response = await api.post("/v1/orders", json=factories.order(account))
    return response.status_code, time.monotonic() - started


async def _wait_until_clean(db: asyncpg.Connection, seconds: float) -> float | None:
    """Seconds until no account is dirty, or None if some still are after ``seconds``."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if await db.fetchval("SELECT count(*) FROM dirty_accounts") == 0:
            return time.monotonic() - started
        await asyncio.sleep(0.25)
    return None


async def test_a_scorer_killed_mid_load_leaves_nothing_dirty(
    stack: Stack, api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    stack.start_scorer()
    accounts = [f"K-{n}" for n in range(40)]

    async def load(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            batch = [factories.batch_item("order", factories.order(a)) for a in accounts[n::7]]
            response = await api.post("/v1/events", json={"events": batch})
            assert response.status_code == 202
            n = (n + 1) % 7

    await asyncio.gather(load(3), load(3))
    stack.kill_scorer()  # mid-load: rescores in progress, their arq keys left behind
    await asyncio.gather(load(1), load(1))
    stack.start_scorer()

    took = await _wait_until_clean(db, 60)
    assert took is not None, "accounts still dirty 60 s after the restart"
    scored = await db.fetchval("SELECT count(DISTINCT account_id) FROM score_snapshots")
    assert scored == len(accounts)


async def test_a_scorer_killed_mid_delivery_retries_after_the_lease(
    stack: Stack, api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    receiver = Receiver(script=[Reply(hang_s=30)])
    await receiver.start()
    try:
        stack.start_scorer()
        created = await api.post(
            "/v1/webhooks", json={"url": receiver.url, "event_types": ["account.tier_changed"]}
        )
        assert created.status_code == 201, created.text
        endpoint = created.json()
        sent = await api.post(f"/v1/webhooks/{endpoint['id']}/test")
        assert sent.status_code == 202
        await asyncio.wait_for(receiver.arrived.wait(), 30)
        stack.kill_scorer()  # the request in flight, nothing recorded
        killed_at = time.monotonic()
        stack.start_scorer()

        receiver.arrived.clear()
        await asyncio.wait_for(receiver.arrived.wait(), 45)
        retried_after = time.monotonic() - killed_at
        assert len(receiver.requests) == 2, "not retried"
        assert retried_after >= 2  # not before the lease ran out
        assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
        await asyncio.sleep(1)
        status, attempts = await db.fetchrow("SELECT status, attempts FROM webhook_deliveries")
        assert (status, attempts) == ("succeeded", 1)
    finally:
        await receiver.stop()


async def test_redis_stopped_then_frozen(
    stack: Stack, api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    stack.start_scorer()
    latencies: list[float] = []
    statuses: list[int] = []

    async def write_for(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            status, took = await _post_order(api, f"R-{n % 20}")
            statuses.append(status)
            latencies.append(took)
            n += 1
            await asyncio.sleep(0.05)

    await write_for(1)
    stack.redis.stop()
    await write_for(3)
    stack.redis.start()  # empty: every queued job is gone
    await write_for(1)
    stack.redis.freeze()
    await write_for(FREEZE_S)
    stack.redis.thaw()
    await write_for(1)

    assert set(statuses) == {202}
    # A request pays at most the enqueue budget (0.25 s) for a hung Redis, never a queue of
    # 2 s connection timeouts.
    assert max(latencies) < 1.5, sorted(latencies)[-5:]
    assert stack.scorer is not None
    assert stack.scorer.poll() is None, "the scorer exited"
    assert await _wait_until_clean(db, 40) is not None
    log = stack.scorer_log().read_text()
    assert log.count("dependency_unreachable") <= 4  # once per outage, not once per poll


async def test_postgres_stopped_is_503_then_recovers(
    stack: Stack, api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    stack.start_scorer()
    assert (await _post_order(api, "P-1"))[0] == 202
    await db.close()
    stack.postgres.stop()
    try:
        response = await api.post("/v1/orders", json=factories.order("P-2"))
        assert response.status_code == 503
        assert response.headers["retry-after"]
        assert response.headers["content-type"] == "application/problem+json"
    finally:
        stack.postgres.start()
    deadline = time.monotonic() + 20
    status = 0
    while status != 202 and time.monotonic() < deadline:
        status, _ = await _post_order(api, "P-2")
        await asyncio.sleep(0.2)
    assert status == 202
    conn = await asyncpg.connect(
        host="127.0.0.1", port=stack.postgres.port, user="postgres", database="kam"
    )
    try:
        assert await _wait_until_clean(conn, 40) is not None
    finally:
        await conn.close()
    assert stack.scorer is not None
    assert stack.scorer.poll() is None


async def test_real_world_receivers_neither_lose_attempts_nor_slow_scoring(
    stack: Stack, api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    replies = {
        "gzip": Reply(200, {"content-encoding": "gzip"}, gzip.compress(b'{"ok": true}' * 200)),
        "nul": Reply(200, {}, b"ok\x00\x00\xff"),
        "hanging": Reply(hang_s=30),
        "slow": Reply(hang_s=1.0),
    }
    receivers = {name: Receiver(default=reply) for name, reply in replies.items()}
    for receiver in receivers.values():
        await receiver.start()
    try:
        stack.start_scorer()
        endpoints: dict[str, str] = {}
        for name, receiver in receivers.items():
            created = await api.post(
                "/v1/webhooks", json={"url": receiver.url, "event_types": ["account.tier_changed"]}
            )
            endpoints[name] = created.json()["id"]
        for name, count in (("gzip", 3), ("nul", 3), ("hanging", 3), ("slow", 30)):
            for _ in range(count):
                assert (await api.post(f"/v1/webhooks/{endpoints[name]}/test")).status_code == 202

        # Events stream in while the slow receiver has 30 deliveries queued.
        latencies: list[float] = []
        for n in range(20):
            account = f"W-{n % 10}"
            status, _ = await _post_order(api, account)
            assert status == 202
            sent = time.monotonic()
            while await db.fetchval(
                "SELECT count(*) FROM dirty_accounts d JOIN accounts a ON a.id = d.account_id "
                "WHERE a.external_id = $1",
                account,
            ):
                assert time.monotonic() - sent < 20
                await asyncio.sleep(0.02)
            latencies.append(time.monotonic() - sent)
        assert statistics.median(latencies) < 2.0, latencies

        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            pending = await db.fetchval(
                "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending' "
                "AND endpoint_id <> $1",
                _uuid(endpoints["hanging"]),
            )
            if not pending:
                break
            await asyncio.sleep(0.5)
        for name in ("gzip", "nul", "slow"):
            rows = await db.fetch(
                "SELECT d.status, d.attempts, a.response_excerpt FROM webhook_deliveries d "
                "JOIN webhook_attempts a ON a.delivery_id = d.id WHERE d.endpoint_id = $1",
                _uuid(endpoints[name]),
            )
            assert len(rows) == len(receivers[name].requests), name  # each attempt once
            assert {(r["status"], r["attempts"]) for r in rows} == {("succeeded", 1)}, name
            assert all("\x00" not in (r["response_excerpt"] or "") for r in rows)
        assert receivers["slow"].most_in_flight <= 4
        hung = await db.fetch(
            "SELECT a.error FROM webhook_attempts a JOIN webhook_deliveries d "
            "ON d.id = a.delivery_id WHERE d.endpoint_id = $1",
            _uuid(endpoints["hanging"]),
        )
        assert hung
        assert all("timed out" in r["error"] for r in hung)
    finally:
        for receiver in receivers.values():
            await receiver.stop()


async def test_single_events_and_rescores_never_deadlock(
    stack: Stack, api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    stack.start_scorer()
    before = stack.postgres.log_text().count("deadlock detected")
    statuses: list[int] = []

    async def client(n: int) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            status, _ = await _post_order(api, f"D-{(n + len(statuses)) % 5}")
            statuses.append(status)

    await asyncio.gather(*(client(n) for n in range(12)))
    assert await _wait_until_clean(db, 30) is not None
    assert set(statuses) == {202}
    assert stack.postgres.log_text().count("deadlock detected") == before


def _uuid(value: str) -> uuid.UUID:
    return uuid.UUID(value)


async def test_sigterm_stops_the_scorer_within_its_grace_and_hands_back(
    stack: Stack, api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    receiver = Receiver(script=[Reply(hang_s=30)])
    await receiver.start()
    try:
        stack.start_scorer()
        created = await api.post(
            "/v1/webhooks",
            json={"url": receiver.url, "event_types": ["account.tier_changed"]},
        )
        await api.post(f"/v1/webhooks/{created.json()['id']}/test")
        await asyncio.wait_for(receiver.arrived.wait(), 30)
        assert stack.scorer is not None
        stopping = time.monotonic()
        stack.scorer.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(stack.scorer.wait, 20)
        # the grace (2 s here), then the running job is cancelled and handed back
        assert time.monotonic() - stopping < 10
        assert code == 0
        assert "scorer_stopped" in stack.scorer_log().read_text()

        stack.start_scorer()
        receiver.arrived.clear()
        await asyncio.wait_for(receiver.arrived.wait(), 30)  # delivered by the next scorer
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            row = await db.fetchrow("SELECT status, attempts FROM webhook_deliveries")
            if row["status"] == "succeeded":
                break
            await asyncio.sleep(0.2)
        assert row["status"] == "succeeded"
        recorded = await db.fetchval("SELECT count(*) FROM webhook_attempts")
        assert recorded <= len(receiver.requests)
    finally:
        await receiver.stop()
