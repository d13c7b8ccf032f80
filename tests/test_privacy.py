"""Privacy: erasure of a contact's personal data everywhere (proven on a dump of the whole
database and on the server's own log), no return of erased data with later events, the account
export with and without `pii:read`, summaries behind `pii:read`, and raw-body retention."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.scorer.retention import expire_raw_payloads
from shared.db import create_sessionmaker
from shared.models import ContactErasure, IngestEvent
from shared.privacy import CONTACT_PII_FIELDS, INTERACTION_PII_FIELDS
from shared.settings import Settings
from tests import factories
from tests.conftest import MakeKey, asyncpg_dsn
from tests.live import live_api

NAME = "Ottilie Quaxmeyer"
EMAIL = "ottilie.quaxmeyer@example.org"
NEW_EMAIL = "o.quaxmeyer.second@example.org"
PHONE = "+49 30 5550199"
ADDRESS = "Quaxweg 7, 12345 Berlin"
SUMMARY = "Complained about the Zwiebelfisch deliveries again"
LATER_NAME = "Quaxmeyer Returned"
LATER_SUMMARY = "Brambleberry survey after erasure"
ERASED = [NAME, EMAIL, NEW_EMAIL, PHONE, ADDRESS, SUMMARY, LATER_NAME, LATER_SUMMARY]


@pytest.fixture(scope="module")
def live(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """The API in a process of its own, logging everything (DEBUG, JSON) to a file."""
    log_file = tmp_path_factory.mktemp("privacy") / "api.log"
    with live_api(settings, log_file, KAM_LOG_LEVEL="DEBUG", KAM_LOG_JSON="true") as url:
        yield url, log_file


def _pg_dump() -> str:
    """A pg_dump able to dump the test server: the one pgserver ships, else one on PATH."""
    # Found, not imported: importing pgserver sets up directories the tests do not need.
    spec = importlib.util.find_spec("pgserver")
    bundled = (
        Path(spec.origin).parent / "pginstall" / "bin" / "pg_dump"
        if spec is not None and spec.origin
        else None
    )
    found = str(bundled) if bundled is not None and bundled.exists() else shutil.which("pg_dump")
    assert found, "pg_dump is needed (installed with the 'embedded' extra)"
    return found


async def _database_dump(database_url: str) -> str:
    result = await asyncio.to_thread(
        subprocess.run,
        [_pg_dump(), "--data-only", "--no-owner", f"--dbname={asyncpg_dsn(database_url)}"],
        capture_output=True,
        check=True,
    )
    return result.stdout.decode()


async def _rows_holding(engine: AsyncEngine, value: str) -> list[str]:
    """Tables with a row whose text (every column) holds ``value``."""
    found = []
    async with engine.connect() as conn:
        tables = (
            await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
        ).scalars()
        for table in list(tables):
            hit = await conn.scalar(
                text(f'SELECT count(*) FROM "{table}" t WHERE t::text LIKE :v'),  # noqa: S608
                {"v": f"%{value}%"},
            )
            if hit:
                found.append(table)
    return found


async def _send(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    def ok(r: httpx.Response) -> None:
        assert r.status_code == 202, r.text

    ok(await client.put("/v1/accounts/A-1", json=factories.account(), headers=headers))
    contact = factories.contact(
        "A-1", external_id="C-1", name=NAME, email=EMAIL, phone=PHONE, address=ADDRESS
    )
    ok(await client.post("/v1/contacts", json=contact, headers=headers))
    newer = factories.contact("A-1", external_id="C-1", version=2, name=NAME, email=NEW_EMAIL)
    item = factories.batch_item("contact", newer)
    ok(await client.post("/v1/events", json={"events": [item]}, headers=headers))
    interaction = factories.interaction("A-1", contact_external_id="C-1", summary=SUMMARY)
    ok(await client.post("/v1/interactions", json=interaction, headers=headers))
    ok(await client.post("/v1/orders", json=factories.order("A-1"), headers=headers))


async def test_erasure_leaves_no_trace_in_the_database_or_the_log(
    live: tuple[str, Path],
    make_key: MakeKey,
    engine: AsyncEngine,
    settings: Settings,
    session: AsyncSession,
) -> None:
    url, log_file = live
    writer = {"Authorization": f"Bearer {await make_key('events:write')}"}
    reader = {"Authorization": f"Bearer {await make_key('accounts:read', 'pii:read')}"}
    eraser = {"Authorization": f"Bearer {await make_key('pii:erase')}"}
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        await _send(client, writer)
        before = await _database_dump(settings.database_url)
        assert NAME in before
        assert SUMMARY in before
        listed = await client.get("/v1/accounts/A-1/contacts", headers=reader)
        assert listed.json()["items"][0]["name"] == NAME

        refused = await client.delete("/v1/contacts/C-1", headers=reader)
        assert refused.status_code == 403
        assert (await client.delete("/v1/contacts/C-404", headers=eraser)).status_code == 404

        erased = await client.delete("/v1/contacts/C-1", headers=eraser)
        assert erased.status_code == 200, erased.text
        answer = erased.json()
        assert answer["contact_external_id"] == "C-1"
        assert answer["account_external_id"] == "A-1"
        # The row's fields that held a value (version 2 sent no address; its raw record did).
        assert sorted(answer["fields"]) == ["email", "name", "phone"]
        assert answer["raw_events"] == 3  # two contact events and the interaction's
        assert answer["interaction_summaries"] == 1

        # Later events do not bring the personal data back.
        later = factories.contact("A-1", external_id="C-1", version=3, name=LATER_NAME)
        r = await client.post("/v1/contacts", json=later, headers=writer)
        assert r.status_code == 202
        survey = factories.interaction(
            "A-1", contact_external_id="C-1", summary=LATER_SUMMARY, kind="survey", satisfaction=2
        )
        r = await client.post("/v1/interactions", json=survey, headers=writer)
        assert r.status_code == 202
        contacts = (await client.get("/v1/accounts/A-1/contacts", headers=reader)).json()
        assert contacts["items"][0]["erased"] is True
        assert contacts["items"][0]["name"] is None
        assert contacts["items"][0]["role"] is not None  # not personal data: it stays

    dump = await _database_dump(settings.database_url)
    assert "C-1" in dump  # the dump is of the right database
    for value in ERASED:
        assert value not in dump, value
        assert await _rows_holding(engine, value) == []
    log = log_file.read_text()
    assert "contact_erased" in log  # the log is the server's, at DEBUG
    for value in ERASED:
        assert value not in log, value

    record = await session.scalar(select(ContactErasure))
    assert record is not None
    assert record.contact_external_id == "C-1"
    assert record.api_key_id is not None


async def test_repeating_an_erased_event_is_a_duplicate(
    client: httpx.AsyncClient, make_key: MakeKey, session: AsyncSession
) -> None:
    headers = {"Authorization": f"Bearer {await make_key('events:write', 'pii:erase')}"}
    contact = factories.contact("A-1", external_id="C-1", name=NAME, email=EMAIL)
    assert (await client.post("/v1/contacts", json=contact, headers=headers)).status_code == 202
    assert (await client.delete("/v1/contacts/C-1", headers=headers)).status_code == 200
    again = await client.post("/v1/contacts", json=contact, headers=headers)
    assert again.status_code == 202
    assert again.json()["status"] == "duplicate"
    stored = await session.get(IngestEvent, contact["event_id"])
    assert stored is not None
    assert stored.payload is not None
    assert "name" not in stored.payload
    assert stored.body_hash is not None  # kept from the body as sent, before the erasure
    changed = contact | {"name": "Someone Else"}
    reused = await client.post("/v1/contacts", json=changed, headers=headers)
    assert reused.status_code == 409
    assert stored.payload["external_id"] == "C-1"


async def test_export_holds_everything_and_pii_only_with_pii_read(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    writer = {"Authorization": f"Bearer {await make_key('events:write')}"}
    await _send(client, writer)
    plain = {"Authorization": f"Bearer {await make_key('accounts:read')}"}
    with_pii = {"Authorization": f"Bearer {await make_key('accounts:read', 'pii:read')}"}

    response = await client.get("/v1/accounts/A-1/export", headers=plain)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert document["pii_included"] is False
    assert document["account"]["external_id"] == "A-1"
    assert len(document["contacts"]) == 1
    assert len(document["orders"]) == 1
    assert len(document["interactions"]) == 1
    assert len(document["raw_events"]) == 5
    assert all(len(e["body_sha256"]) == 64 for e in document["raw_events"])
    for value in (NAME, EMAIL, NEW_EMAIL, PHONE, ADDRESS, SUMMARY):
        assert value not in response.text

    full = await client.get("/v1/accounts/A-1/export", headers=with_pii)
    assert full.json()["pii_included"] is True
    assert full.json()["contacts"][0]["email"] == NEW_EMAIL
    for value in (NAME, NEW_EMAIL, SUMMARY):
        assert value in full.text

    missing = await client.get("/v1/accounts/A-404/export", headers=plain)
    assert missing.status_code == 404
    writer_only = await client.get("/v1/accounts/A-1/export", headers=writer)
    assert writer_only.status_code == 403


async def test_interaction_summaries_need_pii_read(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    writer = {"Authorization": f"Bearer {await make_key('events:write')}"}
    await _send(client, writer)
    plain = {"Authorization": f"Bearer {await make_key('accounts:read')}"}
    with_pii = {"Authorization": f"Bearer {await make_key('accounts:read', 'pii:read')}"}
    hidden = (await client.get("/v1/accounts/A-1/interactions", headers=plain)).json()
    assert hidden["pii_included"] is False
    assert hidden["items"][0]["summary"] is None
    shown = (await client.get("/v1/accounts/A-1/interactions", headers=with_pii)).json()
    assert shown["pii_included"] is True
    assert shown["items"][0]["summary"] == SUMMARY


async def test_retention_drops_old_bodies_and_keeps_hash_and_metadata(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    engine: AsyncEngine,
    settings: Settings,
    session: AsyncSession,
) -> None:
    old = factories.order("A-1", event_id="old-1")
    recent = factories.order("A-1", event_id="recent-1")
    for body in (old, recent):
        assert (
            await client.post("/v1/orders", json=body, headers=admin_headers)
        ).status_code == 202
    await session.execute(
        update(IngestEvent)
        .where(IngestEvent.event_id == "old-1")
        .values(
            received_at=datetime.now(UTC) - timedelta(days=settings.raw_payload_retention_days + 1)
        )
    )
    await session.commit()
    ctx: dict[str, Any] = {"settings": settings, "sessionmaker": create_sessionmaker(engine)}
    assert await expire_raw_payloads(ctx) == 1
    assert await expire_raw_payloads(ctx) == 0  # idempotent

    session.expire_all()
    expired = await session.get(IngestEvent, "old-1")
    kept = await session.get(IngestEvent, "recent-1")
    assert expired is not None
    assert kept is not None
    assert expired.payload is None
    assert expired.body_hash is not None
    assert (expired.type, expired.account_external_id) == ("order", "A-1")
    assert kept.payload is not None
    # The hash outlives the body: the same event is still a duplicate, another body a conflict.
    again = await client.post("/v1/orders", json=old, headers=admin_headers)
    assert again.json()["status"] == "duplicate"
    changed = await client.post("/v1/orders", json=old | {"amount": "1.00"}, headers=admin_headers)
    assert changed.status_code == 409


async def test_triggers_name_the_same_personal_fields(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        raw = await conn.scalar(
            text("SELECT pg_get_functiondef('kam_ingest_events_erased'::regproc)")
        )
        contact = await conn.scalar(
            text("SELECT pg_get_functiondef('kam_contacts_erased'::regproc)")
        )
    for field in CONTACT_PII_FIELDS:
        assert f"'{field}'" in raw
        assert f"NEW.{field} := NULL" in contact
    for field in INTERACTION_PII_FIELDS:
        assert f"'{field}'" in raw


def test_export_document_is_json_when_account_has_nothing() -> None:
    # The pieces of the document join into JSON whatever the sections hold (pure check of the
    # encoder's output for values the database returns).
    from decimal import Decimal

    from services.api.privacy.service import _encode

    encoded = _encode({"at": datetime(2026, 1, 1, tzinfo=UTC), "amount": Decimal("1.50")})
    assert json.loads(encoded) == {"at": "2026-01-01T00:00:00+00:00", "amount": "1.50"}
