"""Ingestion: idempotency, versions, stubs, batches, and the dirty mark."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import asyncpg
import httpx
import pytest
from arq import Retry
from arq.connections import ArqRedis
from sqlalchemy import delete, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.api.ingest import service as ingest_service
from services.api.ingest.service import ingest_events
from services.scorer import jobs
from shared.db import create_sessionmaker
from shared.enums import ItemStatus
from shared.models import (
    Account,
    Contact,
    DirtyAccount,
    IngestEvent,
    Interaction,
    Manager,
    Order,
    Payment,
)
from shared.queue import rescore_job_id
from shared.schemas import OrderData, PaymentData
from shared.settings import Settings
from tests import factories
from tests.conftest import asyncpg_dsn


async def _count(session: AsyncSession, model: Any) -> int:
    return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def test_order_is_durable_before_202_and_marks_account_dirty(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    body = factories.order("A-1", external_id="SO-1")
    response = await client.post("/v1/orders", json=body, headers=admin_headers)
    assert response.status_code == 202
    assert response.json() == {"event_id": body["event_id"], "status": "accepted"}

    stored = await session.scalar(select(Order).where(Order.external_id == "SO-1"))
    assert stored is not None
    assert str(stored.amount) == "1000.00"
    assert stored.lines == [{"category": "tools", "quantity": "2", "amount": "1000.00"}]
    account = await session.scalar(select(Account).where(Account.external_id == "A-1"))
    assert account is not None
    assert account.source_version is None  # a stub until its account event arrives
    mark = await session.get(DirtyAccount, account.id)
    assert mark is not None
    assert mark.seq == 1


async def test_same_event_twice_is_a_duplicate_and_changes_nothing(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    body = factories.order("A-1", external_id="SO-1")
    first = await client.post("/v1/orders", json=body, headers=admin_headers)
    # The same body again, its keys in another order: the same event.
    second = await client.post(
        "/v1/orders", json=dict(reversed(body.items())), headers=admin_headers
    )
    assert first.json()["status"] == "accepted"
    assert second.status_code == 202
    assert second.json()["status"] == "duplicate"
    assert await _count(session, Order) == 1
    assert await _count(session, IngestEvent) == 1
    stored = await session.scalar(select(Order.amount))
    assert str(stored) == "1000.00"
    dirty_seq = await session.scalar(select(DirtyAccount.seq))
    assert dirty_seq == 1  # a duplicate does not ask for another rescore


async def test_same_batch_twice(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    events = [
        factories.batch_item("account", factories.account(), external_id="A-1"),
        factories.batch_item("order", factories.order("A-1")),
        factories.batch_item("contact", factories.contact("A-1")),
        factories.batch_item("interaction", factories.interaction("A-1")),
        factories.batch_item("payment", factories.payment("A-1")),
        factories.batch_item(
            "manager", {"event_id": "m1", "version": 1, "name": "Kim"}, external_id="M-1"
        ),
    ]
    first = await client.post("/v1/events", json={"events": events}, headers=admin_headers)
    second = await client.post("/v1/events", json={"events": events}, headers=admin_headers)
    assert first.status_code == 202
    assert first.json()["accepted"] == 6
    assert (first.json()["duplicates"], first.json()["rejected"]) == (0, 0)
    assert second.json()["accepted"] == 0
    assert second.json()["duplicates"] == 6
    assert [r["status"] for r in second.json()["results"]] == ["duplicate"] * 6
    for model in (Account, Order, Contact, Interaction, Payment, Manager):
        assert await _count(session, model) == 1, model.__name__
    assert await _count(session, IngestEvent) == 6


async def test_reordered_versions_keep_the_newest(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    newer = factories.order("A-1", external_id="SO-1", version=2, status="cancelled")
    older = factories.order("A-1", external_id="SO-1", version=1, status="placed")
    assert (await client.post("/v1/orders", json=newer, headers=admin_headers)).json()[
        "status"
    ] == "accepted"
    late = await client.post("/v1/orders", json=older, headers=admin_headers)
    assert late.json()["status"] == "stale"
    stored = await session.scalar(select(Order).where(Order.external_id == "SO-1"))
    assert stored is not None
    assert (stored.status, stored.source_version) == ("cancelled", 2)
    # the stale event is kept for audit, marked as such
    audit = await session.scalar(
        select(IngestEvent.status).where(IngestEvent.event_id == older["event_id"])
    )
    assert audit == "stale"


async def test_equal_version_with_new_event_id_is_stale(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    await client.post(
        "/v1/orders", json=factories.order(external_id="SO-1", amount="1.00"), headers=admin_headers
    )
    again = await client.post(
        "/v1/orders", json=factories.order(external_id="SO-1", amount="2.00"), headers=admin_headers
    )
    assert again.json()["status"] == "stale"
    assert str(await session.scalar(select(Order.amount))) == "1.00"


async def test_updated_at_orders_versions(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    def put(name: str, updated_at: str) -> dict[str, Any]:
        body = factories.account(name)
        del body["version"]
        return body | {"updated_at": updated_at}

    url = "/v1/accounts/A-1"
    r1 = await client.put(
        url, json=put("New name", "2026-11-02T10:00:00+01:00"), headers=admin_headers
    )
    r2 = await client.put(url, json=put("Old name", "2026-11-02T08:59:59Z"), headers=admin_headers)
    assert (r1.json()["status"], r2.json()["status"]) == ("accepted", "stale")
    assert await session.scalar(select(Account.name)) == "New name"


async def test_newest_of_several_versions_in_one_batch_wins(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    events = [
        factories.batch_item(
            "order", factories.order(external_id="SO-1", version=v, amount=f"{v}.00")
        )
        for v in (2, 5, 3)
    ]
    response = await client.post("/v1/events", json={"events": events}, headers=admin_headers)
    assert [r["status"] for r in response.json()["results"]] == ["stale", "accepted", "stale"]
    assert response.json()["accepted"] == 3
    assert response.json()["stale"] == 2
    assert str(await session.scalar(select(Order.amount))) == "5.00"


async def test_stub_account_is_filled_in_by_its_account_event(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    await client.post("/v1/orders", json=factories.order("A-9"), headers=admin_headers)
    stub = (await client.get("/v1/accounts/A-9", headers=admin_headers)).json()
    assert stub["stub"] is True
    assert stub["name"] is None
    assert stub["counts"]["orders"] == 1

    body = factories.account(
        "Acme", parent_external_id="G-1", manager_external_id="M-1", strategic_fit=4
    )
    assert (
        await client.put("/v1/accounts/A-9", json=body, headers=admin_headers)
    ).status_code == 202
    filled = (await client.get("/v1/accounts/A-9", headers=admin_headers)).json()
    assert filled["stub"] is False
    assert (filled["name"], filled["parent_external_id"], filled["manager_external_id"]) == (
        "Acme",
        "G-1",
        "M-1",
    )
    assert filled["counts"]["orders"] == 1
    assert filled["score"]["tier"] is None  # not scored yet
    # the group and the manager named by the account exist as stubs
    group = (await client.get("/v1/accounts/G-1", headers=admin_headers)).json()
    assert group["stub"] is True
    assert await session.scalar(select(Manager.external_id)) == "M-1"
    # the group is marked for a rescore too: its roll-up changed
    dirty = set(await session.scalars(select(Account.external_id).join(DirtyAccount)))
    assert dirty == {"A-9", "G-1"}


async def test_batch_rejects_bad_items_and_stores_the_rest(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    good = factories.batch_item("order", factories.order("A-1", external_id="SO-good"))
    bad_amount = factories.batch_item(
        "order", factories.order("A-2", external_id="SO-bad", amount="-5.00")
    )
    bad_type = {"type": "invoice", "event_id": "x-1"}
    tier_set = factories.batch_item("account", factories.account(), external_id="A-3", tier="key")
    not_object = 42
    response = await client.post(
        "/v1/events",
        json={"events": [good, bad_amount, bad_type, tier_set, not_object]},
        headers=admin_headers,
    )
    assert response.status_code == 202
    payload = response.json()
    assert (payload["accepted"], payload["rejected"]) == (1, 4)
    results = payload["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert results[1]["status"] == "rejected"
    assert results[1]["event_id"] == bad_amount["event_id"]
    assert any(e["field"] == "events.1.order.amount" for e in results[1]["errors"])
    assert results[2]["errors"][0]["type"] == "union_tag_invalid"
    assert any(e["field"].endswith(".tier") for e in results[3]["errors"])
    assert results[4]["event_id"] is None
    # nothing of a rejected event was written: not its row, its stub account, or its raw event
    assert set(await session.scalars(select(Order.external_id))) == {"SO-good"}
    assert set(await session.scalars(select(Account.external_id))) == {"A-1"}
    assert set(await session.scalars(select(IngestEvent.event_id))) == {good["event_id"]}


async def test_repeated_event_id_within_one_batch(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    item = factories.batch_item("order", factories.order(external_id="SO-1"))
    response = await client.post("/v1/events", json={"events": [item, item]}, headers=admin_headers)
    assert [r["status"] for r in response.json()["results"]] == ["accepted", "duplicate"]
    assert await _count(session, Order) == 1


async def _raw_records(session: AsyncSession) -> dict[str, Any]:
    rows = await session.execute(select(IngestEvent.event_id, IngestEvent.payload))
    return {event_id: payload for event_id, payload in rows}


async def test_raw_record_of_a_batch_event_is_its_item_as_received(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    account = factories.batch_item("account", factories.account(), external_id="A-1")
    # A number where the schema also takes a string: the record keeps what was sent.
    order = factories.batch_item("order", factories.order("A-1"), amount=1000.5)
    again = order | {"external_id": "SO-other"}  # a reused event_id, another body: refused
    contact = factories.batch_item("contact", factories.contact("A-2"))
    events = [account, order, again, contact]
    # Sent as written, with spaces and newlines: the body's text is where the records come from.
    text = "{\n  " + '"events" :\n[' + ",\n ".join(json.dumps(e) for e in events) + "]}"
    response = await client.post(
        "/v1/events",
        content=text.encode(),
        headers=admin_headers | {"content-type": "application/json"},
    )
    assert response.status_code == 202, response.text
    statuses = [r["status"] for r in response.json()["results"]]
    assert statuses == ["accepted", "accepted", "rejected", "accepted"]
    assert response.json()["results"][2]["errors"][0]["type"] == "event_id_reused"
    records = await _raw_records(session)
    assert records == {e["event_id"]: e for e in (account, order, contact)}

    # A batch of one goes the one-statement way; a batch with a rejected item is taken apart.
    single = factories.batch_item("payment", factories.payment("A-3"))
    payment = factories.batch_item("payment", factories.payment("A-3"))
    rejected = factories.batch_item("order", factories.order("A-3", amount="-1.00"))
    for batch in ([single], [payment, rejected]):
        response = await client.post("/v1/events", json={"events": batch}, headers=admin_headers)
        assert response.json()["results"][0]["status"] == "accepted", response.text
    records = await _raw_records(session)
    assert (records[single["event_id"]], records[payment["event_id"]]) == (single, payment)
    assert rejected["event_id"] not in records

    # A typed body with its id in the path: the record is the event the path and body make.
    body = factories.account("Acme")
    await client.put("/v1/accounts/A-4", json=body, headers=admin_headers)
    records = await _raw_records(session)
    assert records[body["event_id"]] == {"type": "account", **body, "external_id": "A-4"}


async def test_interaction_names_unknown_contact_creates_stub(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    body = factories.interaction("A-1", contact_external_id="C-77")
    assert (await client.post("/v1/interactions", json=body, headers=admin_headers)).json()[
        "status"
    ] == "accepted"
    stub = await session.scalar(select(Contact).where(Contact.external_id == "C-77"))
    assert stub is not None
    assert stub.name is None
    listed = (await client.get("/v1/accounts/A-1/interactions", headers=admin_headers)).json()
    assert listed["items"][0]["contact_external_id"] == "C-77"
    assert listed["items"][0]["satisfaction"] == 4


async def test_domain_rules_of_events(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    cases = [
        ("/v1/interactions", factories.interaction(kind="communication", satisfaction=2)),
        ("/v1/orders", factories.order() | {"currency": "euro"}),
        ("/v1/orders", factories.order() | {"version": 1, "updated_at": "2026-01-01T00:00:00Z"}),
        ("/v1/orders", factories.order(ordered_at="2026-10-01T10:00:00")),  # no offset
        ("/v1/orders", factories.order() | {"event_id": "x" * 129}),
        ("/v1/orders", factories.order() | {"external_id": "bad\u0000id"}),
        ("/v1/payments", factories.payment() | {"amount": "12.345"}),
    ]
    for path, body in cases:
        response = await client.post(path, json=body, headers=admin_headers)
        assert response.status_code == 422, (path, body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["errors"], response.text

    lost_without_status = factories.account(churn_reason="price")
    r = await client.put("/v1/accounts/A-1", json=lost_without_status, headers=admin_headers)
    assert r.status_code == 422
    own_parent = factories.account(parent_external_id="A-1")
    r = await client.put("/v1/accounts/A-1", json=own_parent, headers=admin_headers)
    assert r.status_code == 422
    assert "own parent" in r.json()["detail"]


async def test_lost_account_with_churn_reason(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    body = factories.account(status="lost", churn_reason="moved to a competitor on price")
    assert (
        await client.put("/v1/accounts/A-1", json=body, headers=admin_headers)
    ).status_code == 202
    got = (await client.get("/v1/accounts/A-1", headers=admin_headers)).json()
    assert (got["status"], got["churn_reason"]) == ("lost", "moved to a competitor on price")


async def test_each_typed_event_is_stored_once_with_its_stub_and_mark(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    redis: ArqRedis,
    settings: Settings,
) -> None:
    sent = [
        ("/v1/orders", factories.order("A-1"), Order),
        ("/v1/contacts", factories.contact("A-2"), Contact),
        ("/v1/interactions", factories.interaction("A-3"), Interaction),
        ("/v1/payments", factories.payment("A-4"), Payment),
    ]
    for path, body, model in sent:
        first = await client.post(path, json=body, headers=admin_headers)
        again = await client.post(path, json=body, headers=admin_headers)
        assert first.json() == {"event_id": body["event_id"], "status": "accepted"}, path
        assert again.json() == {"event_id": body["event_id"], "status": "duplicate"}, path
        assert await _count(session, model) == 1, path
        audit = await session.scalar(
            select(IngestEvent).where(IngestEvent.event_id == body["event_id"])
        )
        assert audit is not None
        assert (audit.status, audit.account_external_id) == (
            "accepted",
            body["account_external_id"],
        )
        assert audit.payload == {"type": path.removeprefix("/v1/").removesuffix("s"), **body}

    rows = await session.execute(select(Account.external_id, Account.id))
    accounts = {external_id: account_id for external_id, account_id in rows}
    assert set(accounts) == {"A-1", "A-2", "A-3", "A-4"}
    marked = await session.execute(select(DirtyAccount.account_id, DirtyAccount.seq))
    marks = {account_id: seq for account_id, seq in marked}
    # one change number each, in the order they arrived: the repeats took none
    assert marks == {accounts[f"A-{n}"]: n for n in range(1, 5)}
    queued = await redis.zrange(settings.queue_name, 0, -1)
    assert sorted(queued) == sorted(rescore_job_id(i).encode() for i in accounts.values())


async def test_order_of_a_subsidiary_marks_its_group_dirty(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    body = factories.account("Acme Nord", parent_external_id="G-1")
    await client.put("/v1/accounts/A-1", json=body, headers=admin_headers)
    await session.execute(delete(DirtyAccount))
    await session.commit()

    response = await client.post("/v1/orders", json=factories.order("A-1"), headers=admin_headers)
    assert response.json()["status"] == "accepted"
    dirty = set(await session.scalars(select(Account.external_id).join(DirtyAccount)))
    assert dirty == {"A-1", "G-1"}


async def test_stale_single_payment_changes_nothing_but_its_audit_record(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    newer = factories.payment("A-1", invoice_external_id="INV-1", version=2, paid_at=None)
    older = factories.payment("A-1", invoice_external_id="INV-1", version=1)
    await client.post("/v1/payments", json=newer, headers=admin_headers)
    await session.execute(delete(DirtyAccount))
    await session.commit()

    late = await client.post("/v1/payments", json=older, headers=admin_headers)
    assert late.json()["status"] == "stale"
    assert await session.scalar(select(Payment.paid_at)) is None
    assert await _count(session, DirtyAccount) == 0  # nothing changed: no rescore
    audit = await session.scalar(
        select(IngestEvent.status).where(IngestEvent.event_id == older["event_id"])
    )
    assert audit == "stale"


async def test_account_created_by_another_transaction_meanwhile(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    session: AsyncSession,
    database_url: str,
) -> None:
    """An order for an unseen account while another transaction creates that account: the
    order's statement waits for it, then cannot see the row it waited for (its snapshot is
    older) and must still find the account, store the order once and mark the account."""
    await client.get("/v1/accounts", headers=admin_headers)  # the key is verified and cached
    other = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        creating = other.transaction()
        await creating.start()
        await other.execute("INSERT INTO accounts (external_id) VALUES ('A-1')")
        body = factories.order("A-1", external_id="SO-1")
        posting = asyncio.create_task(client.post("/v1/orders", json=body, headers=admin_headers))
        for _ in range(500):
            waiting = await other.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting or posting.done():
                break
            await asyncio.sleep(0.01)
        assert waiting == 1, "the order's statement should wait for the account's insert"
        await creating.commit()
        response = await posting
    finally:
        await other.close()

    assert response.json() == {"event_id": body["event_id"], "status": "accepted"}
    account_id = await session.scalar(select(Account.id).where(Account.external_id == "A-1"))
    assert await _count(session, Account) == 1
    assert await session.scalar(select(Order.account_id)) == account_id
    assert await session.scalar(select(DirtyAccount.account_id)) == account_id
    assert await session.scalar(select(IngestEvent.status)) == "accepted"


async def test_single_event_committed_alone_is_all_or_nothing(
    engine: AsyncEngine, session: AsyncSession
) -> None:
    """On a session where nothing has run, ``commit_alone`` commits an applied event with its
    own statement; an event that is not applied (here stale) writes nothing that way, and is
    handled in the session's transaction, so rolling that back leaves no trace of it."""
    newer = PaymentData.model_validate(
        factories.payment("A-1", invoice_external_id="INV-1", version=2, paid_at=None)
    )
    older = PaymentData.model_validate(
        factories.payment("A-1", invoice_external_id="INV-1", version=1)
    )
    async with create_sessionmaker(engine)() as alone:
        statuses = await ingest_events(alone, [newer], api_key_id=None, commit_alone=True)
        await alone.rollback()  # too late: the statement was its own transaction
    assert statuses == [ItemStatus.accepted]
    assert await session.scalar(select(Payment.source_version)) == 2
    assert await session.scalar(select(IngestEvent.status)) == "accepted"
    assert await _count(session, DirtyAccount) == 1

    async with create_sessionmaker(engine)() as alone:
        statuses = await ingest_events(alone, [older], api_key_id=None, commit_alone=True)
        assert alone.in_transaction()
        await alone.rollback()
    assert statuses == [ItemStatus.stale]
    assert await _count(session, IngestEvent) == 1  # the stale event's record was rolled back
    assert await session.scalar(select(Payment.source_version)) == 2


async def test_a_deadlocked_ingestion_is_applied_again_before_any_503(
    engine: AsyncEngine, session: AsyncSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    order = OrderData.model_validate(factories.order("A-1", external_id="SO-1"))
    real = ingest_service._ingest_events
    calls = 0

    async def deadlocking_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        statuses = await real(*args, **kwargs)
        if calls == 1:  # written, then chosen as the deadlock victim: all of it rolls back
            raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
        return statuses

    monkeypatch.setattr(ingest_service, "_ingest_events", deadlocking_once)
    async with create_sessionmaker(engine)() as caller:
        statuses = await ingest_events(caller, [order], api_key_id=None)
        await caller.commit()
    assert calls == 2
    assert statuses == [ItemStatus.accepted]  # not "duplicate": the first try left nothing
    assert await _count(session, IngestEvent) == 1
    assert await _count(session, Order) == 1


async def test_a_single_event_stays_in_the_callers_transaction(
    engine: AsyncEngine, session: AsyncSession
) -> None:
    order = OrderData.model_validate(factories.order("A-1", external_id="SO-1"))
    async with create_sessionmaker(engine)() as caller:
        statuses = await ingest_events(caller, [order], api_key_id=None)
        await caller.rollback()
    assert statuses == [ItemStatus.accepted]
    assert await _count(session, IngestEvent) == 0
    assert await _count(session, Order) == 0


async def test_account_event_audit_record_is_the_body_with_its_type_and_id(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    body = factories.account("Acme Nord", credit_limit="50000.00")
    response = await client.put("/v1/accounts/A-1", json=body, headers=admin_headers)
    assert response.json()["status"] == "accepted"
    audit = await session.scalar(select(IngestEvent.payload))
    assert audit == {"type": "account", "external_id": "A-1", **body}


async def _deadlocks(session: AsyncSession) -> int:
    await session.execute(text("SELECT pg_stat_force_next_flush()"))
    await session.execute(text("SELECT pg_stat_clear_snapshot()"))
    count = await session.scalar(
        text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    )
    await session.rollback()
    return int(count or 0)


async def test_single_events_and_rescores_on_the_same_accounts_never_deadlock(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    engine: AsyncEngine,
    session: AsyncSession,
    settings: Settings,
) -> None:
    accounts = [f"A-{n}" for n in range(4)]
    for account in accounts:
        await client.post("/v1/orders", json=factories.order(account), headers=admin_headers)
    ids = list(await session.scalars(select(Account.id)))
    await session.rollback()
    before = await _deadlocks(session)
    ctx = {"sessionmaker": create_sessionmaker(engine), "settings": settings}
    deadline = asyncio.get_running_loop().time() + 3
    statuses: list[int] = []

    async def send(n: int) -> None:
        while asyncio.get_running_loop().time() < deadline:
            account = accounts[(n + len(statuses)) % len(accounts)]
            response = await client.post(
                "/v1/orders", json=factories.order(account), headers=admin_headers
            )
            statuses.append(response.status_code)

    async def rescore() -> None:
        while asyncio.get_running_loop().time() < deadline:
            for account_id in ids:
                with contextlib.suppress(Retry):  # an event arrived meanwhile: it runs again
                    await jobs.rescore_account(ctx, account_id)

    await asyncio.gather(*(send(n) for n in range(8)), *(rescore() for _ in range(4)))

    assert statuses
    assert set(statuses) == {202}
    assert await _deadlocks(session) == before
