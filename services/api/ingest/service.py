"""Applies validated events to the database, set-based, in the caller's transaction.

For a batch of N events this issues a fixed number of statements, not N: one insert of the raw
events (which tells new from duplicate by ``event_id``), one upsert of stub accounts (and managers
and contacts) that events point at, one version-guarded upsert per entity type, and one update
that marks the touched accounts dirty. Rows are always written in key order so that concurrent
batches lock them in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Table, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.deps import RESCORE_AFTER_COMMIT
from shared.enums import EventType, ItemStatus
from shared.models import (
    Account,
    Contact,
    IngestEvent,
    Interaction,
    Manager,
    Order,
    Payment,
)
from shared.schemas import (
    AccountEvent,
    ContactData,
    InteractionData,
    ManagerEvent,
    OrderData,
    PaymentData,
)

# The typed endpoints hand in their bodies (``OrderData``...), the batch its items (``OrderEvent``,
# a subclass): both are applied alike.
AnyEvent = AccountEvent | ManagerEvent | OrderData | ContactData | InteractionData | PaymentData
E = TypeVar("E")

_TYPE_NAMES: tuple[tuple[type[Any], EventType], ...] = (
    (AccountEvent, EventType.account),
    (ManagerEvent, EventType.manager),
    (OrderData, EventType.order),
    (ContactData, EventType.contact),
    (InteractionData, EventType.interaction),
    (PaymentData, EventType.payment),
)


def event_type(event: AnyEvent) -> EventType:
    for kind, name in _TYPE_NAMES:
        if isinstance(event, kind):
            return name
    raise TypeError(f"not an event: {type(event).__name__}")


# asyncpg allows 32,767 bind parameters a statement; rows are written in chunks below that.
_MAX_PARAMS = 30_000


@dataclass(slots=True)
class _Fresh:
    """A new (not duplicate) event on its way to being applied."""

    index: int
    event: AnyEvent


def entity_key(event: AnyEvent) -> str:
    if isinstance(event, PaymentData):
        return event.invoice_external_id
    return event.external_id


def account_ref(event: AnyEvent) -> str | None:
    if isinstance(event, AccountEvent):
        return event.external_id
    if isinstance(event, ManagerEvent):
        return None
    return event.account_external_id


async def ingest_events(
    session: AsyncSession, events: Sequence[AnyEvent], *, api_key_id: int | None
) -> list[ItemStatus]:
    """Store and apply ``events``; returns one status per event, in order.

    A repeated ``event_id`` (earlier, or earlier in this batch) is a duplicate and changes nothing.
    Of several events for one entity, only a higher ``source_version`` than the stored one is
    applied; the others are kept for audit as ``stale``.
    """
    statuses: list[ItemStatus] = [ItemStatus.duplicate] * len(events)
    first_index: dict[str, int] = {}
    for index, event in enumerate(events):
        first_index.setdefault(event.event_id, index)
    if not first_index:
        return statuses

    new_ids = await _insert_raw_events(
        session, [(i, events[i]) for i in sorted(first_index.values())], api_key_id=api_key_id
    )
    fresh = [_Fresh(first_index[eid], events[first_index[eid]]) for eid in new_ids]
    fresh.sort(key=lambda f: f.index)
    if not fresh:
        return statuses

    account_ids = await _ensure_accounts(session, fresh)
    manager_ids = await _ensure_managers(session, fresh)
    applied: set[int] = set()  # indexes of applied events
    for kind, _ in _TYPE_NAMES:
        group = [f for f in fresh if isinstance(f.event, kind)]
        if group:
            applied |= await _apply(session, group, account_ids, manager_ids)

    stale_ids: list[str] = []
    touched: set[int] = set()
    for f in fresh:
        if f.index in applied:
            statuses[f.index] = ItemStatus.accepted
            ref = account_ref(f.event)
            if ref is not None:
                touched.add(account_ids[ref])
        else:
            statuses[f.index] = ItemStatus.stale
            stale_ids.append(f.event.event_id)
    if stale_ids:
        await session.execute(
            update(IngestEvent)
            .where(IngestEvent.event_id.in_(stale_ids))
            .values(status=ItemStatus.stale.value)
        )
    if touched:
        await mark_dirty(session, touched)
    return statuses


async def mark_dirty(session: AsyncSession, account_ids: Iterable[int]) -> None:
    """Mark accounts, and the groups they belong to, for a rescore after commit."""
    ids = sorted(set(account_ids))
    parents = select(Account.parent_id).where(Account.id.in_(ids), Account.parent_id.is_not(None))
    result = await session.execute(
        update(Account)
        .where(or_(Account.id.in_(ids), Account.id.in_(parents)))
        .values(
            dirty=True,
            dirty_seq=Account.dirty_seq + 1,
            dirty_since=func.coalesce(Account.dirty_since, func.now()),
        )
        .returning(Account.id)
    )
    rescore: set[int] = session.info.setdefault(RESCORE_AFTER_COMMIT, set())
    rescore.update(result.scalars())


async def _insert_raw_events(
    session: AsyncSession, items: list[tuple[int, AnyEvent]], *, api_key_id: int | None
) -> list[str]:
    rows = [
        {
            "event_id": event.event_id,
            "type": event_type(event).value,
            "account_external_id": account_ref(event),
            "status": ItemStatus.accepted.value,
            "payload": event.model_dump(mode="json", exclude_none=True),
            "api_key_id": api_key_id,
        }
        for _, event in sorted(items, key=lambda item: item[1].event_id)
    ]
    inserted: list[str] = []
    for chunk in _chunks(rows):
        stmt = (
            insert(IngestEvent)
            .values(chunk)
            .on_conflict_do_nothing(index_elements=[IngestEvent.event_id])
            .returning(IngestEvent.event_id)
        )
        inserted.extend((await session.execute(stmt)).scalars())
    return inserted


async def _ensure_accounts(session: AsyncSession, fresh: list[_Fresh]) -> dict[str, int]:
    """Ids of every account the events name, creating stubs for the ones not seen yet."""
    refs: set[str] = set()
    for f in fresh:
        ref = account_ref(f.event)
        if ref is not None:
            refs.add(ref)
        if isinstance(f.event, AccountEvent) and f.event.parent_external_id:
            refs.add(f.event.parent_external_id)
    return await _ensure(session, Account.__table__, refs)


async def _ensure_managers(session: AsyncSession, fresh: list[_Fresh]) -> dict[str, int]:
    refs = {f.event.manager_external_id for f in fresh if isinstance(f.event, AccountEvent)}
    refs |= {f.event.external_id for f in fresh if isinstance(f.event, ManagerEvent)}
    refs.discard(None)
    return await _ensure(session, Manager.__table__, {r for r in refs if r is not None})


async def _ensure(session: AsyncSession, table: Any, refs: set[str]) -> dict[str, int]:
    if not refs:
        return {}
    ordered = sorted(refs)
    await session.execute(
        insert(table)
        .values([{"external_id": ref} for ref in ordered])
        .on_conflict_do_nothing(index_elements=["external_id"])
    )
    result = await session.execute(
        select(table.c.external_id, table.c.id).where(table.c.external_id.in_(ordered))
    )
    return {external_id: id_ for external_id, id_ in result}


async def _ensure_contacts(session: AsyncSession, refs: dict[str, int]) -> dict[str, int]:
    """Ids of contacts that interactions name, creating stubs (at the interaction's account)."""
    if not refs:
        return {}
    ordered = sorted(refs)
    await session.execute(
        insert(Contact)
        .values([{"external_id": ref, "account_id": refs[ref]} for ref in ordered])
        .on_conflict_do_nothing(index_elements=[Contact.external_id])
    )
    result = await session.execute(
        select(Contact.external_id, Contact.id).where(Contact.external_id.in_(ordered))
    )
    return dict(result.all())


async def _apply(
    session: AsyncSession,
    group: list[_Fresh],
    account_ids: dict[str, int],
    manager_ids: dict[str, int],
) -> set[int]:
    """Upsert one entity type; returns the indexes of the events that were applied."""
    # Of several events for one entity in this batch only the newest can win; the rest are stale.
    newest: dict[str, _Fresh] = {}
    for f in group:
        key = entity_key(f.event)
        held = newest.get(key)
        if held is None or f.event.source_version > held.event.source_version:
            newest[key] = f
    winners = [newest[key] for key in sorted(newest)]

    contact_ids: dict[str, int] = {}
    if isinstance(winners[0].event, InteractionData):
        contact_refs = {
            f.event.contact_external_id: account_ids[f.event.account_external_id]
            for f in winners
            if isinstance(f.event, InteractionData) and f.event.contact_external_id
        }
        contact_ids = await _ensure_contacts(session, contact_refs)

    model, key_column, rows = _rows(winners, account_ids, manager_ids, contact_ids)
    table: Table = model.__table__
    applied_keys: set[str] = set()
    for chunk in _chunks(rows):
        values = insert(table).values(chunk)
        excluded = values.excluded
        guard: ColumnElement[bool] = table.c.source_version < excluded.source_version
        if model in (Account, Manager, Contact):  # stubs carry no version yet
            guard = or_(table.c.source_version.is_(None), guard)
        columns = [c for c in chunk[0] if c != key_column]
        upsert = values.on_conflict_do_update(
            index_elements=[key_column],
            set_={**{c: excluded[c] for c in columns}, "updated_at": func.now()},
            where=guard,
        ).returning(table.c[key_column])
        applied_keys.update((await session.execute(upsert)).scalars())
    return {f.index for f in winners if entity_key(f.event) in applied_keys}


def _rows(
    winners: list[_Fresh],
    account_ids: dict[str, int],
    manager_ids: dict[str, int],
    contact_ids: dict[str, int],
) -> tuple[type[Any], str, list[dict[str, Any]]]:
    first = winners[0].event
    if isinstance(first, AccountEvent):
        return (
            Account,
            "external_id",
            [
                {
                    "external_id": e.external_id,
                    "name": e.name,
                    "industry": e.industry,
                    "region": e.region,
                    "segment": e.segment,
                    "parent_id": account_ids[e.parent_external_id]
                    if e.parent_external_id
                    else None,
                    "manager_id": manager_ids[e.manager_external_id]
                    if e.manager_external_id
                    else None,
                    "credit_limit": e.credit_limit,
                    "payment_terms_days": e.payment_terms_days,
                    "strategic_fit": e.strategic_fit,
                    "status": e.status.value,
                    "churn_reason": e.churn_reason,
                    "source_version": e.source_version,
                }
                for e in _events(winners, AccountEvent)
            ],
        )
    if isinstance(first, ManagerEvent):
        return (
            Manager,
            "external_id",
            [
                {
                    "external_id": e.external_id,
                    "name": e.name,
                    "email": e.email,
                    "capacity": e.capacity,
                    "source_version": e.source_version,
                }
                for e in _events(winners, ManagerEvent)
            ],
        )
    if isinstance(first, OrderData):
        return (
            Order,
            "external_id",
            [
                {
                    "external_id": e.external_id,
                    "account_id": account_ids[e.account_external_id],
                    "ordered_at": e.ordered_at,
                    "amount": e.amount,
                    "cost": e.cost,
                    "currency": e.currency,
                    "status": e.status.value,
                    "lines": [line.model_dump(mode="json") for line in e.lines],
                    "source_version": e.source_version,
                }
                for e in _events(winners, OrderData)
            ],
        )
    if isinstance(first, ContactData):
        return (
            Contact,
            "external_id",
            [
                {
                    "external_id": e.external_id,
                    "account_id": account_ids[e.account_external_id],
                    "name": e.name,
                    "role": e.role.value if e.role else None,
                    "email": e.email,
                    "phone": e.phone,
                    "address": e.address,
                    "gender": e.gender,
                    "birth_year": e.birth_year,
                    "source_version": e.source_version,
                }
                for e in _events(winners, ContactData)
            ],
        )
    if isinstance(first, InteractionData):
        return (
            Interaction,
            "external_id",
            [
                {
                    "external_id": e.external_id,
                    "account_id": account_ids[e.account_external_id],
                    "contact_id": contact_ids[e.contact_external_id]
                    if e.contact_external_id
                    else None,
                    "channel": e.channel.value,
                    "direction": e.direction.value,
                    "kind": e.kind.value,
                    "occurred_at": e.occurred_at,
                    "satisfaction": e.satisfaction,
                    "summary": e.summary,
                    "source_version": e.source_version,
                }
                for e in _events(winners, InteractionData)
            ],
        )
    return (
        Payment,
        "invoice_external_id",
        [
            {
                "invoice_external_id": e.invoice_external_id,
                "account_id": account_ids[e.account_external_id],
                "amount": e.amount,
                "currency": e.currency,
                "due_at": e.due_at,
                "paid_at": e.paid_at,
                "source_version": e.source_version,
            }
            for e in _events(winners, PaymentData)
        ],
    )


def _events(winners: list[_Fresh], kind: type[E]) -> list[E]:
    return [f.event for f in winners if isinstance(f.event, kind)]


def _chunks(rows: list[dict[str, Any]]) -> Iterable[list[dict[str, Any]]]:
    if not rows:
        return
    size = max(1, _MAX_PARAMS // max(1, len(rows[0])))
    for start in range(0, len(rows), size):
        yield rows[start : start + size]
