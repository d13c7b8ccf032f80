"""Webhooks end to end: the API registers endpoints, the scorer writes events in its own
transactions and a real arq worker delivers them to a real HTTP receiver on loopback, signed
as Standard Webhooks says (checked with the ``standardwebhooks`` library itself)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis
from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from standardwebhooks import Webhook

from services.api.app import create_app
from services.scorer.jobs import job_session
from services.scorer.passes import rescore_accounts, run_portfolio_pass
from services.scorer.webhook_delivery import (
    claim_delivery,
    record_outcome,
    retry_delay,
    send_delivery,
)
from services.scorer.webhook_events import (
    announced_band_change,
    announced_tier_change,
    remember_deliveries,
)
from services.scorer.webhook_targets import UnsafeTarget, resolve_target
from services.scorer.worker import create_worker
from shared.db import create_sessionmaker
from shared.models import Account, WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent
from shared.settings import Settings
from tests.conftest import MakeKey, RunWorker
from tests.factories import account_row
from tests.portfolio import AccountSpec, ordinary_accounts, send
from tests.webhook_receiver import Receiver, Reply

NOW = datetime.now(UTC).replace(microsecond=0)
STAR = AccountSpec("STAR", amount=60_000, margin=0.32, every_days=14, categories=6, strategic_fit=5)
TINY_RICH = AccountSpec("TINY-RICH", amount=400, margin=0.75, every_days=14, categories=4)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.stop()


async def _register(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    url: str,
    types: tuple[str, ...] = ("account.tier_changed",),
) -> dict[str, Any]:
    response = await client.post(
        "/v1/webhooks", json={"url": url, "event_types": list(types)}, headers=headers
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def _send_test(client: httpx.AsyncClient, headers: dict[str, str], endpoint_id: str) -> int:
    response = await client.post(f"/v1/webhooks/{endpoint_id}/test", headers=headers)
    assert response.status_code == 202, response.text
    delivery_id: int = response.json()["delivery_id"]
    return delivery_id


async def _delivery(session: AsyncSession, delivery_id: int) -> WebhookDelivery:
    session.expire_all()
    delivery = await session.get(WebhookDelivery, delivery_id)
    assert delivery is not None
    return delivery


async def _due_now(session: AsyncSession, delivery_id: int | None = None) -> None:
    """Move retries (and leases) into the past instead of waiting for them."""
    query = update(WebhookDelivery).where(WebhookDelivery.status == "pending")
    if delivery_id is not None:
        query = query.where(WebhookDelivery.id == delivery_id)
    await session.execute(query.values(next_attempt_at=func.now() - timedelta(seconds=1)))
    await session.commit()


def _verify(secret: str, request: Any) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(secret).verify(request.body, request.headers)
    return payload


# --------------------------------------------------------------------------------------------
# Delivery
# --------------------------------------------------------------------------------------------


async def test_a_delivery_is_signed_and_verifies(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    receiver: Receiver,
    run_worker: RunWorker,
    session: AsyncSession,
    redis: ArqRedis,
) -> None:
    endpoint = await _register(client, admin_headers, receiver.url)
    secret = endpoint["secret"]
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    delivery_id = await _send_test(client, admin_headers, endpoint["id"])
    assert await redis.exists(f"arq:job:webhook:{delivery_id}")  # pushed after the commit
    assert receiver.requests == []  # the API never sends

    await run_worker()

    [request] = receiver.requests
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-signature"].startswith("v1,")
    payload = _verify(secret, request)
    assert payload["type"] == "webhook.test"
    assert payload["data"]["endpoint_id"] == endpoint["id"]
    delivery = await _delivery(session, delivery_id)
    assert (delivery.status, delivery.attempts) == ("succeeded", 1)
    assert request.headers["webhook-id"] == delivery.event_id
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(
            request.body, request.headers
        )


async def test_retries_keep_the_webhook_id_and_sign_afresh(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    receiver: Receiver,
    run_worker: RunWorker,
    session: AsyncSession,
) -> None:
    receiver.script = [Reply(500), Reply(502, body=b"upstream down"), Reply(500)]
    endpoint = await _register(client, admin_headers, receiver.url)
    delivery_id = await _send_test(client, admin_headers, endpoint["id"])

    await run_worker()
    first = await _delivery(session, delivery_id)
    assert (first.status, first.attempts) == ("pending", 1)
    assert first.next_attempt_at is not None
    wait = first.next_attempt_at - datetime.now(UTC)
    assert timedelta(seconds=2) < wait < timedelta(seconds=7)  # 5 s, jittered
    for _ in range(3):
        await asyncio.sleep(1.05)  # a new second: a new timestamp, hence a new signature
        await _due_now(session, delivery_id)
        await run_worker()

    assert len(receiver.requests) == 4
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    assert len({r.headers["webhook-signature"] for r in receiver.requests}) == 4
    for request in receiver.requests:
        _verify(endpoint["secret"], request)
    delivery = await _delivery(session, delivery_id)
    assert (delivery.status, delivery.attempts) == ("succeeded", 4)

    log = await client.get(f"/v1/webhooks/{endpoint['id']}/deliveries", headers=admin_headers)
    assert log.status_code == 200
    [item] = log.json()["items"]
    assert [a["status_code"] for a in item["attempt_log"]] == [500, 502, 500, 204]
    assert item["attempt_log"][1]["response_excerpt"] == "upstream down"
    assert all(a["latency_ms"] is not None for a in item["attempt_log"])
    shown = await client.get(f"/v1/webhooks/{endpoint['id']}", headers=admin_headers)
    assert shown.json()["failing_since"] is None  # the success cleared it


async def test_a_hanging_receiver_is_cut_at_the_timeout(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    receiver: Receiver,
    run_worker: RunWorker,
    session: AsyncSession,
    settings: Settings,
) -> None:
    receiver.script = [Reply(hang_s=30)]
    endpoint = await _register(client, admin_headers, receiver.url)
    delivery_id = await _send_test(client, admin_headers, endpoint["id"])

    started = time.monotonic()
    await run_worker()
    assert time.monotonic() - started < settings.webhook_timeout_s + 3

    delivery = await _delivery(session, delivery_id)
    assert (delivery.status, delivery.attempts) == ("pending", 1)
    attempt = await session.scalar(select(WebhookAttempt))
    assert attempt is not None
    assert attempt.status_code is None
    assert attempt.error is not None
    assert "timed out" in attempt.error
    assert attempt.latency_ms is not None
    assert attempt.latency_ms >= 900


async def test_410_disables_the_endpoint(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    receiver: Receiver,
    run_worker: RunWorker,
    session: AsyncSession,
) -> None:
    receiver.script = [Reply(410)]
    endpoint = await _register(client, admin_headers, receiver.url)
    delivery_id = await _send_test(client, admin_headers, endpoint["id"])

    await run_worker()

    assert (await _delivery(session, delivery_id)).status == "failed"
    shown = (await client.get(f"/v1/webhooks/{endpoint['id']}", headers=admin_headers)).json()
    assert shown["enabled"] is False
    assert "410" in shown["disabled_reason"]
    assert shown["disabled_at"] is not None
    # a disabled endpoint gets nothing, not even a test
    again = await client.post(f"/v1/webhooks/{endpoint['id']}/test", headers=admin_headers)
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"


async def test_a_redirect_is_a_failure_and_is_not_followed(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    receiver: Receiver,
    run_worker: RunWorker,
    session: AsyncSession,
) -> None:
    receiver.script = [Reply(302, headers={"location": f"{receiver.url}/elsewhere"})]
    endpoint = await _register(client, admin_headers, receiver.url)
    delivery_id = await _send_test(client, admin_headers, endpoint["id"])

    await run_worker()

    assert len(receiver.requests) == 1
    delivery = await _delivery(session, delivery_id)
    assert (delivery.status, delivery.attempts) == ("pending", 1)
    attempt = await session.scalar(select(WebhookAttempt))
    assert attempt is not None
    assert attempt.status_code == 302
    assert attempt.error is not None
    assert "not followed" in attempt.error


async def test_retry_after_is_honoured(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    receiver: Receiver,
    run_worker: RunWorker,
    session: AsyncSession,
) -> None:
    receiver.script = [Reply(429, headers={"retry-after": "600"})]
    endpoint = await _register(client, admin_headers, receiver.url)
    delivery_id = await _send_test(client, admin_headers, endpoint["id"])

    await run_worker()

    delivery = await _delivery(session, delivery_id)
    assert delivery.status == "pending"
    assert delivery.next_attempt_at is not None
    assert delivery.next_attempt_at - datetime.now(UTC) > timedelta(seconds=590)


def test_the_retry_schedule_is_jittered_and_ends(settings: Settings) -> None:
    schedule = settings.webhook_retry_schedule_s
    assert schedule == [5, 300, 1800, 7200, 18000, 36000, 36000]
    for attempts, base in enumerate(schedule, start=1):
        waits = {retry_delay(attempts, settings=settings) for _ in range(20)}
        assert len(waits) > 1
        for wait in waits:
            assert wait is not None
            assert base * 0.8 <= wait.total_seconds() <= base * 1.2
    assert retry_delay(len(schedule) + 1, settings=settings) is None
    long_wait = retry_delay(1, settings=settings, retry_after=timedelta(minutes=3))
    assert long_wait == timedelta(minutes=3)


async def test_the_last_retry_fails_the_delivery_and_days_of_failure_disable(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    receiver: Receiver,
    run_worker: RunWorker,
    session: AsyncSession,
    settings: Settings,
) -> None:
    receiver.default = Reply(500)
    endpoint = await _register(client, admin_headers, receiver.url)
    first = await _send_test(client, admin_headers, endpoint["id"])
    second = await _send_test(client, admin_headers, endpoint["id"])
    # the first has had all its tries but one; the endpoint has failed for under 5 days
    await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == first)
        .values(attempts=len(settings.webhook_retry_schedule_s))
    )
    await session.execute(
        update(WebhookEndpoint).values(failing_since=func.now() - timedelta(days=4))
    )
    await session.commit()
    await _due_now(session)

    await run_worker()

    assert (await _delivery(session, first)).status == "failed"
    assert (await _delivery(session, second)).status == "pending"
    shown = (await client.get(f"/v1/webhooks/{endpoint['id']}", headers=admin_headers)).json()
    assert shown["enabled"] is True

    await session.execute(
        update(WebhookEndpoint).values(failing_since=func.now() - timedelta(days=5, minutes=1))
    )
    await session.commit()
    await _due_now(session)
    await run_worker()

    shown = (await client.get(f"/v1/webhooks/{endpoint['id']}", headers=admin_headers)).json()
    assert shown["enabled"] is False
    assert "failed since" in shown["disabled_reason"]
    failed = await client.get(
        f"/v1/webhooks/{endpoint['id']}/deliveries",
        params={"status": "failed"},
        headers=admin_headers,
    )
    assert [d["id"] for d in failed.json()["items"]] == [first]


async def test_rotation_signs_with_both_secrets_for_a_day(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    endpoint = await _register(client, admin_headers, receiver.url)
    old = endpoint["secret"]
    rotated = await client.post(
        f"/v1/webhooks/{endpoint['id']}/rotate-secret", headers=admin_headers
    )
    assert rotated.status_code == 200
    new = rotated.json()["secret"]
    assert new != old
    expires = datetime.fromisoformat(rotated.json()["previous_secret_expires_at"])
    assert timedelta(hours=23) < expires - datetime.now(UTC) <= timedelta(hours=24)

    await _send_test(client, admin_headers, endpoint["id"])
    await run_worker()

    [request] = receiver.requests
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    _verify(old, request)
    _verify(new, request)


async def test_a_worker_killed_mid_delivery_and_a_redis_flush_lose_nothing(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    receiver: Receiver,
    run_worker: RunWorker,
    session: AsyncSession,
    settings: Settings,
    redis: ArqRedis,
) -> None:
    receiver.script = [Reply(hang_s=30)]
    endpoint = await _register(client, admin_headers, receiver.url)
    delivery_id = await _send_test(client, admin_headers, endpoint["id"])

    worker = create_worker(settings, burst=True)
    main = asyncio.create_task(worker.main())
    await asyncio.wait_for(receiver.arrived.wait(), 10)
    # The worker dies with the request in flight: no outcome recorded, its jobs gone.
    jobs = [*worker.tasks.values(), main]
    for task in jobs:
        task.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)
    worker.tasks.clear()
    await worker.close()
    await redis.flushdb()

    delivery = await _delivery(session, delivery_id)
    assert (delivery.status, delivery.attempts) == ("pending", 0)  # leased, not lost
    await _due_now(session)  # instead of waiting out the lease
    await run_worker()  # the sweeper finds it in Postgres

    assert len(receiver.requests) == 2
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    delivery = await _delivery(session, delivery_id)
    assert (delivery.status, delivery.attempts) == ("succeeded", 1)
    assert await session.scalar(select(func.count()).select_from(WebhookEvent)) == 1
    await run_worker()
    assert len(receiver.requests) == 2  # nothing more goes out


async def test_one_accounts_events_go_out_in_order(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    receiver: Receiver,
    run_worker: RunWorker,
    session: AsyncSession,
) -> None:
    endpoint = await _register(client, admin_headers, receiver.url)
    account = await account_row(session, "ACME")
    other = await account_row(session, "OTHER")
    for event_id, account_id, seq in (
        ("msg_1", account.id, 1),
        ("msg_2", account.id, 2),
        ("msg_3", other.id, 1),
    ):
        session.add(
            WebhookEvent(
                id=event_id,
                type="account.tier_changed",
                account_id=account_id,
                account_seq=seq,
                payload={"type": "account.tier_changed", "data": {"sequence": seq}},
            )
        )
        await session.flush()
        session.add(
            WebhookDelivery(
                event_id=event_id, endpoint_id=endpoint["id"], next_attempt_at=func.now()
            )
        )
        await session.flush()
    await session.commit()
    receiver.by_id = {"msg_1": [Reply(500)]}  # the first of ACME's fails

    await run_worker()

    # ACME's second waits behind its first; the other account's goes (in either order)
    assert sorted(r.headers["webhook-id"] for r in receiver.requests) == ["msg_1", "msg_3"]
    await _due_now(session)
    await run_worker()
    ids = [r.headers["webhook-id"] for r in receiver.requests]
    assert [i for i in ids if i != "msg_3"] == ["msg_1", "msg_1", "msg_2"]
    assert ids.count("msg_3") == 1
    statuses = await session.scalars(select(WebhookDelivery.status))
    assert set(statuses) == {"succeeded"}


async def test_redeliver_resends_with_the_same_webhook_id(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    endpoint = await _register(client, admin_headers, receiver.url)
    delivery_id = await _send_test(client, admin_headers, endpoint["id"])
    await run_worker()

    response = await client.post(
        f"/v1/webhooks/{endpoint['id']}/deliveries/{delivery_id}/redeliver",
        headers=admin_headers,
    )
    assert response.status_code == 202
    assert response.json()["status"] == "pending"
    await run_worker()

    assert len(receiver.requests) == 2
    assert receiver.requests[0].headers["webhook-id"] == receiver.requests[1].headers["webhook-id"]
    log = await client.get(f"/v1/webhooks/{endpoint['id']}/deliveries", headers=admin_headers)
    [item] = log.json()["items"]
    assert item["status"] == "succeeded"
    assert len(item["attempt_log"]) == 2
    missing = await client.post(
        f"/v1/webhooks/{endpoint['id']}/deliveries/999999/redeliver", headers=admin_headers
    )
    assert missing.status_code == 404


# --------------------------------------------------------------------------------------------
# Events from the scorer
# --------------------------------------------------------------------------------------------


async def test_tier_changes_from_the_scorer_reach_the_receiver(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    receiver: Receiver,
    run_worker: RunWorker,
    session: AsyncSession,
    engine: AsyncEngine,
) -> None:
    endpoint = await _register(
        client,
        admin_headers,
        receiver.url,
        types=("account.tier_changed", "account.risk_band_changed"),
    )
    await send(client, admin_headers, [*ordinary_accounts(30), STAR, TINY_RICH], NOW)

    await run_worker()  # the rescores the ingestion asked for, then their deliveries

    accounts = list(await session.scalars(select(Account)))
    above_standard = {a.external_id for a in accounts if a.tier != "standard"}
    assert "STAR" in above_standard
    payloads = [_verify(endpoint["secret"], r) for r in receiver.requests]
    first_tiers = [p for p in payloads if p["type"] == "account.tier_changed"]
    # an account's first tier is announced only when it is above standard
    assert {p["data"]["account"]["external_id"] for p in first_tiers} == above_standard
    assert len(first_tiers) == len(above_standard)
    star = next(p for p in first_tiers if p["data"]["account"]["external_id"] == "STAR")
    data = star["data"]
    assert data["previous_tier"] is None
    assert data["sequence"] == 1
    assert data["tier"] in {"strategic", "key"}
    assert data["account"] == {"external_id": "STAR", "name": "Account STAR"}
    assert isinstance(data["value_score"], float)
    assert data["risk_band"] in {"low", "medium", "high", "critical"}
    assert data["policy_version"] >= 1
    assert data["reasons"]["tier"]
    assert star["timestamp"] == data["occurred_at"]
    assert not {"email", "phone", "contacts"} & set(json.dumps(star).split('"'))

    # A manager's override moves TINY-RICH's tier: the event follows the scorer's commit.
    tiny = next(a for a in accounts if a.external_id == "TINY-RICH")
    tiny_tier, tiny_id = tiny.tier, tiny.id
    assert tiny_tier != "strategic"
    await session.execute(
        update(Account)
        .where(Account.id == tiny_id)
        .values(tier_override="strategic", tier_override_reason="framework contract")
    )
    await session.commit()
    before = len(receiver.requests)
    async with create_sessionmaker(engine)() as scoring, scoring.begin():
        await rescore_accounts(scoring, account_ids=[tiny_id])
    await run_worker()  # nothing was pushed (the test committed, not a job): the sweeper sends

    moved = [
        p
        for p in (_verify(endpoint["secret"], r) for r in receiver.requests[before:])
        if p["type"] == "account.tier_changed"
    ]
    [change] = moved
    assert change["data"]["account"]["external_id"] == "TINY-RICH"
    assert (change["data"]["previous_tier"], change["data"]["tier"]) == (tiny_tier, "strategic")
    # the account's second tier change, whether or not its first (to standard) was announced
    assert change["data"]["sequence"] == 2
    assert change["data"]["reasons"]["override"]["code"] == "override"


async def test_a_risk_band_move_from_the_portfolio_pass_and_a_rescore(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    receiver: Receiver,
    run_worker: RunWorker,
    session: AsyncSession,
    engine: AsyncEngine,
    redis: ArqRedis,
) -> None:
    endpoint = await _register(
        client, admin_headers, receiver.url, types=("account.risk_band_changed",)
    )
    steady = AccountSpec("STEADY", every_days=20, last_days_ago=5)
    await send(client, admin_headers, [*ordinary_accounts(40), steady], NOW)
    await redis.flushdb()  # the pass below scores everything; no need for the rescores
    sessionmaker = create_sessionmaker(engine)
    await run_portfolio_pass(sessionmaker, now=NOW)
    # a first band is not a move: nothing to announce
    assert await session.scalar(select(func.count()).select_from(WebhookEvent)) == 0
    steady_id = await session.scalar(select(Account.id).where(Account.external_id == "STEADY"))
    assert steady_id is not None
    band_before = await session.scalar(select(Account.risk_band).where(Account.id == steady_id))

    async with sessionmaker() as scoring, scoring.begin():
        await rescore_accounts(scoring, account_ids=[steady_id], now=NOW + timedelta(days=120))
    await run_worker()

    moves = [
        p
        for p in (_verify(endpoint["secret"], r) for r in receiver.requests)
        if p["data"]["account"]["external_id"] == "STEADY"
    ]
    [move] = moves
    assert move["type"] == "account.risk_band_changed"
    assert move["data"]["previous_risk_band"] == band_before
    assert move["data"]["risk_band"] != band_before
    assert move["data"]["risk_probability"] > 0
    assert "sequence" not in move["data"]


def test_which_changes_are_announced() -> None:
    assert announced_tier_change(None, "key")
    assert not announced_tier_change(None, "standard")  # the first pass stays quiet
    assert announced_tier_change("key", "standard")
    assert not announced_tier_change("key", "key")
    assert announced_band_change("low", "high")
    assert not announced_band_change(None, "high")
    assert not announced_band_change("high", None)  # lost: the tier change says it
    assert not announced_band_change("low", "low")


async def test_an_endpoint_deleted_during_an_attempt(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    engine: AsyncEngine,
    settings: Settings,
) -> None:
    endpoint = await _register(client, admin_headers, "http://127.0.0.1:9/hook")
    delivery_id = await _send_test(client, admin_headers, endpoint["id"])
    sessionmaker = create_sessionmaker(engine)
    async with sessionmaker() as s, s.begin():
        claim = await claim_delivery(s, delivery_id=delivery_id, settings=settings)
    assert claim is not None
    async with sessionmaker() as s, s.begin():  # a second job finds it leased
        assert await claim_delivery(s, delivery_id=delivery_id, settings=settings) is None
    outcome = await send_delivery(claim, settings=settings)  # nothing listens on port 9
    assert outcome.status_code is None
    assert outcome.error
    deleted = await client.delete(f"/v1/webhooks/{endpoint['id']}", headers=admin_headers)
    assert deleted.status_code == 204
    async with sessionmaker() as s, s.begin():
        assert await record_outcome(s, claim=claim, outcome=outcome, settings=settings) == []


async def test_the_worker_pushes_deliveries_after_its_commit(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    receiver: Receiver,
    engine: AsyncEngine,
    redis: ArqRedis,
    session: AsyncSession,
) -> None:
    await _register(client, admin_headers, receiver.url)
    await session.execute(
        insert(Account).values(external_id="A-1", name="A-1 GmbH", source_version=1, tier="key")
    )
    await session.commit()
    ctx: dict[str, Any] = {"sessionmaker": create_sessionmaker(engine), "redis": redis}
    async with job_session(ctx) as job:
        account_id = await job.scalar(select(Account.id))
        assert account_id is not None
        await job.execute(
            insert(WebhookEvent).values(
                id="msg_x", type="account.tier_changed", account_id=account_id, payload={}
            )
        )
        endpoint_id = await job.scalar(select(WebhookEndpoint.id))
        delivery = WebhookDelivery(
            event_id="msg_x", endpoint_id=endpoint_id, next_attempt_at=func.now()
        )
        job.add(delivery)
        await job.flush()
        remember_deliveries(job, [delivery.id])
        assert not await redis.exists(f"arq:job:webhook:{delivery.id}")  # not before the commit
    assert await redis.exists(f"arq:job:webhook:{delivery.id}")


async def test_no_subscriber_no_event(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    run_worker: RunWorker,
    session: AsyncSession,
) -> None:
    await send(client, admin_headers, [*ordinary_accounts(10), STAR], NOW)
    await run_worker()
    assert await session.scalar(select(func.count()).select_from(WebhookEvent)) == 0


# --------------------------------------------------------------------------------------------
# Endpoints API and the SSRF guard
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hook",
        "https://10.0.0.1/hook",
        "https://10.255.1.2:8443/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "https://0.0.0.0/hook",
        "https://224.0.0.1/hook",
        "https://localhost/hook",
        "https://0x7f000001/hook",  # 127.0.0.1 spelled as one hex number
        "https://2130706433/hook",  # and as one decimal number
        "https://[fe80::1%25eth0]/hook",
        "http://93.184.215.14/hook",  # public, but not https
        "https://user:pw@93.184.215.14/hook",
        "ftp://93.184.215.14/hook",
        "not a url",
    ],
)
async def test_the_guard_refuses(url: str) -> None:
    with pytest.raises(UnsafeTarget):
        await resolve_target(url, allowed_hosts=set())


async def test_the_guard_pins_the_checked_address() -> None:
    target = await resolve_target("https://93.184.215.14:8443/a?b=1", allowed_hosts=set())
    assert target.url == "https://93.184.215.14:8443/a?b=1"
    assert str(target.address) == "93.184.215.14"
    v6 = await resolve_target("https://[2606:4700::1111]/x", allowed_hosts=set())
    assert v6.url == "https://[2606:4700::1111]/x"
    assert v6.host_header == "[2606:4700::1111]"
    allowed = await resolve_target("http://127.0.0.1:9/x", allowed_hosts={"127.0.0.1"})
    assert allowed.address is None


@pytest.fixture
async def strict_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API as in production: no host is allow-listed."""
    app = create_app(settings.model_copy(update={"webhook_allowed_hosts": set()}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield c


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hook",
        "https://10.1.2.3/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
        "https://localhost/hook",
        "http://127.0.0.1:8080/hook",
    ],
)
async def test_registration_refuses_blocked_addresses(
    strict_client: httpx.AsyncClient, admin_headers: dict[str, str], url: str
) -> None:
    response = await strict_client.post(
        "/v1/webhooks",
        json={"url": url, "event_types": ["account.tier_changed"]},
        headers=admin_headers,
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert [e["field"] for e in response.json()["errors"]] == ["body.url"]


async def test_the_address_is_checked_again_at_send(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    receiver: Receiver,
    run_worker: RunWorker,
    session: AsyncSession,
) -> None:
    endpoint = await _register(client, admin_headers, receiver.url)
    # as if DNS now pointed the name somewhere private
    await session.execute(
        update(WebhookEndpoint).values(url=f"https://10.0.0.7:{receiver.port}/hooks")
    )
    await session.commit()
    delivery_id = await _send_test(client, admin_headers, endpoint["id"])

    await run_worker()

    assert receiver.requests == []
    attempt = await session.scalar(
        select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id)
    )
    assert attempt is not None
    assert attempt.error is not None
    assert attempt.error.startswith("refused")


async def test_endpoint_lifecycle(
    client: httpx.AsyncClient, admin_headers: dict[str, str], make_key: MakeKey
) -> None:
    manager = {"Authorization": f"Bearer {await make_key('webhooks:manage')}"}
    reader = {"Authorization": f"Bearer {await make_key('accounts:read')}"}
    created = await client.post(
        "/v1/webhooks",
        json={
            "url": "http://127.0.0.1:9/hook",
            "event_types": ["account.risk_band_changed", "account.tier_changed"],
            "description": "CRM",
        },
        headers=manager,
    )
    assert created.status_code == 201
    endpoint_id = created.json()["id"]
    forbidden = await client.get("/v1/webhooks", headers=reader)
    assert forbidden.status_code == 403

    listed = (await client.get("/v1/webhooks", headers=manager)).json()["items"]
    assert [e["id"] for e in listed] == [endpoint_id]
    assert "secret" not in listed[0]

    patched = await client.patch(
        f"/v1/webhooks/{endpoint_id}",
        json={"enabled": False, "event_types": ["account.tier_changed"]},
        headers=manager,
    )
    assert patched.status_code == 200
    assert patched.json()["enabled"] is False
    assert patched.json()["event_types"] == ["account.tier_changed"]
    assert patched.json()["disabled_reason"]
    enabled = await client.patch(
        f"/v1/webhooks/{endpoint_id}", json={"enabled": True}, headers=manager
    )
    assert enabled.json()["enabled"] is True
    assert enabled.json()["disabled_reason"] is None
    bad_url = await client.patch(
        f"/v1/webhooks/{endpoint_id}", json={"url": "https://10.0.0.1/x"}, headers=manager
    )
    assert bad_url.status_code == 422
    assert bad_url.json()["errors"][0]["field"] == "body.url"

    deleted = await client.delete(f"/v1/webhooks/{endpoint_id}", headers=manager)
    assert deleted.status_code == 204
    gone = await client.get(f"/v1/webhooks/{endpoint_id}", headers=manager)
    assert gone.status_code == 404
    unknown_type = await client.post(
        "/v1/webhooks",
        json={"url": "http://127.0.0.1:9/hook", "event_types": ["account.deleted"]},
        headers=manager,
    )
    assert unknown_type.status_code == 422


async def test_the_delivery_log_pages_with_a_cursor(
    client: httpx.AsyncClient, admin_headers: dict[str, str], receiver: Receiver
) -> None:
    endpoint = await _register(client, admin_headers, receiver.url)
    ids = [await _send_test(client, admin_headers, endpoint["id"]) for _ in range(5)]
    seen: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, "status": "pending"}
        if cursor:
            params["cursor"] = cursor
        page = await client.get(
            f"/v1/webhooks/{endpoint['id']}/deliveries", params=params, headers=admin_headers
        )
        assert page.status_code == 200
        seen += [d["id"] for d in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)
    bad = await client.get(
        f"/v1/webhooks/{endpoint['id']}/deliveries",
        params={"cursor": "nope"},
        headers=admin_headers,
    )
    assert bad.status_code == 400
