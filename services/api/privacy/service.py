"""Erasure of a contact's personal data, and the export of everything held about an account.

Erasure reaches every place KAM keeps a contact's personal data: the contact row, the raw
records of the events that carried it (the contact's own events, and the summaries of
interactions with it), and the summaries of its interactions. What stays: the contact's
external id and role, the interactions' facts (channel, kind, time, satisfaction), and each
raw record's hash and metadata. Triggers installed by the migration ``privacy`` keep later
events from bringing the erased fields back.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.errors import NotFound
from shared.models import (
    Account,
    Contact,
    ContactErasure,
    IngestEvent,
    Interaction,
    Order,
    Payment,
    ScoreSnapshot,
    TierChange,
)
from shared.privacy import CONTACT_PII_FIELDS, INTERACTION_PII_FIELDS, without_pii

_ERASE_CONTACT = f"""
UPDATE contacts SET {", ".join(f"{f} = NULL" for f in CONTACT_PII_FIELDS)},
    erased_at = now(), updated_at = now()
WHERE id = :id
"""  # noqa: S608 - the field names are constants

_ERASE_CONTACT_EVENTS = """
UPDATE ingest_events SET body_hash = coalesce(body_hash, kam_body_hash(payload)),
    payload = payload - CAST(:fields AS text[])
WHERE type = 'contact' AND payload ->> 'external_id' = :external_id
    AND payload ?| CAST(:fields AS text[])
"""

_ERASE_INTERACTION_EVENTS = """
UPDATE ingest_events SET body_hash = coalesce(body_hash, kam_body_hash(payload)),
    payload = payload - CAST(:fields AS text[])
WHERE type = 'interaction' AND payload ->> 'contact_external_id' = :external_id
    AND payload ?| CAST(:fields AS text[])
"""

_ERASE_SUMMARIES = """
UPDATE interactions SET summary = NULL, updated_at = now()
WHERE contact_id = :id AND summary IS NOT NULL
"""


async def erase_contact(
    session: AsyncSession, *, external_id: str, api_key_id: int | None
) -> ContactErasure:
    """Erase the personal data of contact ``external_id``; returns the erasure record.

    Erasing an erased contact again is allowed and finds nothing more to erase.
    """
    row = (
        await session.execute(
            select(Contact.id, Account.external_id)
            .join(Account, Account.id == Contact.account_id)
            .where(Contact.external_id == external_id)
            .with_for_update(of=Contact)
        )
    ).one_or_none()
    if row is None:
        raise NotFound(f"No contact '{external_id}'.")
    contact_id, account_external_id = row
    filled = (
        await session.execute(
            select(*(getattr(Contact, f) for f in CONTACT_PII_FIELDS)).where(
                Contact.id == contact_id
            )
        )
    ).one()
    fields = [name for name, value in zip(CONTACT_PII_FIELDS, filled, strict=True) if value]
    await session.execute(text(_ERASE_CONTACT), {"id": contact_id})
    contact_events = await session.execute(
        text(_ERASE_CONTACT_EVENTS),
        {"fields": list(CONTACT_PII_FIELDS), "external_id": external_id},
    )
    interaction_events = await session.execute(
        text(_ERASE_INTERACTION_EVENTS),
        {"fields": list(INTERACTION_PII_FIELDS), "external_id": external_id},
    )
    summaries = await session.execute(text(_ERASE_SUMMARIES), {"id": contact_id})
    erasure = ContactErasure(
        contact_external_id=external_id,
        account_external_id=account_external_id,
        api_key_id=api_key_id,
        fields=fields,
        raw_events=_count(contact_events) + _count(interaction_events),
        interaction_summaries=_count(summaries),
    )
    session.add(erasure)
    await session.flush()
    return erasure


def _count(result: Any) -> int:
    return int(result.rowcount or 0)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

_CHUNK = 500
# The stored hash once the body was rewritten, else the body's (see ingest/reuse.py).
_BODY_HASH = func.coalesce(IngestEvent.body_hash, func.kam_body_hash(IngestEvent.payload))


def _encode(value: Any) -> str:
    return json.dumps(value, default=_default, ensure_ascii=False, separators=(",", ":"))


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)  # Decimal, and anything else as its text


def _columns(row: Any, *, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        column.key: getattr(row, column.key)
        for column in row.__table__.columns
        if column.key not in leave_out
    }


async def account_exists(session: AsyncSession, external_id: str) -> bool:
    found = await session.scalar(select(Account.id).where(Account.external_id == external_id))
    raw = await session.scalar(
        select(IngestEvent.event_id).where(IngestEvent.account_external_id == external_id).limit(1)
    )
    return found is not None or raw is not None


async def export_account(
    sessionmaker: async_sessionmaker[AsyncSession], external_id: str, *, with_pii: bool
) -> AsyncIterator[str]:
    """Everything held about account ``external_id`` as one JSON document, in pieces: the
    account, its contacts, orders, interactions, payments, score history, tier changes and the
    raw records of its events. Without ``with_pii`` the personal fields are left out (of the
    contacts, the interaction summaries and the raw records)."""
    async with sessionmaker() as session:
        account = await session.scalar(select(Account).where(Account.external_id == external_id))
        head: dict[str, Any] = {
            "account_external_id": external_id,
            "pii_included": with_pii,
            "account": _columns(account) if account is not None else None,
        }
        yield _encode(head)[:-1]
        account_id = account.id if account is not None else -1
        contact_leave_out = () if with_pii else CONTACT_PII_FIELDS
        interaction_leave_out = () if with_pii else INTERACTION_PII_FIELDS
        sections: list[tuple[str, Any, tuple[str, ...]]] = [
            (
                "contacts",
                select(Contact).where(Contact.account_id == account_id),
                contact_leave_out,
            ),
            ("orders", select(Order).where(Order.account_id == account_id), ()),
            (
                "interactions",
                select(Interaction).where(Interaction.account_id == account_id),
                interaction_leave_out,
            ),
            ("payments", select(Payment).where(Payment.account_id == account_id), ()),
            (
                "score_snapshots",
                select(ScoreSnapshot).where(ScoreSnapshot.account_id == account_id),
                (),
            ),
            ("tier_changes", select(TierChange).where(TierChange.account_id == account_id), ()),
        ]
        for name, query, leave_out in sections:
            yield f',"{name}":['
            first = True
            stream = await session.stream_scalars(query.execution_options(yield_per=_CHUNK))
            async for row in stream:
                yield ("" if first else ",") + _encode(_columns(row, leave_out=leave_out))
                first = False
            yield "]"
        yield ',"raw_events":['
        first = True
        raw = await session.stream(
            select(IngestEvent, _BODY_HASH)
            .where(IngestEvent.account_external_id == external_id)
            .order_by(IngestEvent.received_at, IngestEvent.event_id)
            .execution_options(yield_per=_CHUNK)
        )
        async for event, body_hash in raw:
            record = _columns(event, leave_out=("body_hash",))
            record["body_sha256"] = body_hash.hex() if body_hash else None
            if not with_pii:
                record["payload"] = without_pii(event.type, event.payload)
            yield ("" if first else ",") + _encode(record)
            first = False
        yield "]}"
