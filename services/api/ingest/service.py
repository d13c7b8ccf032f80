"""Applies validated events to the database, set-based, in the caller's transaction.

A batch of N events costs a fixed number of statements, not N: one insert of the raw events
(which tells new from duplicate by ``event_id``), one upsert of the stub accounts (and managers
and contacts) that events point at, one version-guarded upsert per entity type, and one update
that marks the touched accounts dirty. Each statement takes its rows as arrays and ``unnest``s
them, so its text never changes with the batch size: the driver prepares it once per connection
and SQLAlchemy compiles nothing per request. Rows are always written in key order so that
concurrent batches lock them in the same order.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property
from typing import Any, cast

import asyncpg
import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.deps import RESCORE_AFTER_COMMIT
from shared.enums import EventType, ItemStatus
from shared.schemas import (
    UNVERSIONED,
    AccountEvent,
    ContactData,
    InteractionData,
    ManagerEvent,
    OrderData,
    PaymentData,
)

log = structlog.get_logger(__name__)

_AccountBound = OrderData | ContactData | InteractionData | PaymentData

# The typed endpoints hand in their bodies (``OrderData``...), the batch its items (``OrderEvent``,
# a subclass): both are applied alike.
AnyEvent = AccountEvent | ManagerEvent | OrderData | ContactData | InteractionData | PaymentData

_TYPE_NAMES: tuple[tuple[type[Any], EventType], ...] = (
    (ManagerEvent, EventType.manager),
    (AccountEvent, EventType.account),
    (ContactData, EventType.contact),
    (OrderData, EventType.order),
    (InteractionData, EventType.interaction),
    (PaymentData, EventType.payment),
)


# The type of each event class met so far (the typed bodies and their batch subclasses):
# ``isinstance`` on pydantic models goes through ``ABCMeta`` and showed in batch profiles.
_TYPE_OF_CLASS: dict[type[Any], EventType] = {}


def event_type(event: AnyEvent) -> EventType:
    found = _TYPE_OF_CLASS.get(type(event))
    if found is not None:
        return found
    for kind, name in _TYPE_NAMES:
        if isinstance(event, kind):
            _TYPE_OF_CLASS[type(event)] = name
            return name
    raise TypeError(f"not an event: {type(event).__name__}")


def entity_key(event: AnyEvent) -> str:
    if isinstance(event, PaymentData):
        return event.invoice_external_id
    return event.external_id


def account_ref(event: AnyEvent) -> str | None:
    kind = event_type(event)
    if kind is EventType.manager:
        return None
    if kind is EventType.account:
        return cast(AccountEvent, event).external_id
    return cast(_AccountBound, event).account_external_id


@dataclass(slots=True)
class _Fresh:
    """A new (not duplicate) event on its way to being applied."""

    index: int
    event: AnyEvent


_DRIVER = "kam.ingest.driver"


async def _rows(session: AsyncSession, sql: str, *params: Any) -> list[Any]:
    """Run one statement with positional ``$n`` parameters on the session's transaction.

    The first statement goes through SQLAlchemy, which begins the transaction; the rest of the
    same transaction go straight to its asyncpg connection, which halves the per-statement cost
    on the request path. Errors from that path are answered like SQLAlchemy's (``errors.py``).
    """
    transaction = session.get_transaction()
    held = session.info.get(_DRIVER)
    if held is not None and transaction is not None and held[0] is transaction:
        return list(await held[1].fetch(sql, *params))
    connection = await session.connection()
    result = await connection.exec_driver_sql(sql, params)
    rows = list(result.all()) if result.returns_rows else []
    raw = await connection.get_raw_connection()
    session.info[_DRIVER] = (session.get_transaction(), raw.driver_connection)
    return rows


async def _idle_driver(session: AsyncSession) -> asyncpg.Connection | None:
    """The asyncpg connection of the session when no statement has run in its transaction
    (and none has begun on the connection), so that a statement sent on it is a transaction of
    its own; None otherwise."""
    if session.in_transaction():
        return None
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    driver: asyncpg.Connection = raw.driver_connection
    return None if driver.is_in_transaction() else driver


async def ingest_events(
    session: AsyncSession,
    events: Sequence[AnyEvent],
    *,
    api_key_id: int | None,
    received: str | None = None,
    commit_alone: bool = False,
) -> list[ItemStatus]:
    """Store and apply ``events``; returns one status per event, in order.

    ``received`` is the JSON text of an object whose ``events`` array holds the events as
    received, in the order of ``events``: each item is kept as its event's raw audit record
    (the typed models are dumped when it is None). A repeated ``event_id`` (earlier, or earlier
    in this batch) is a duplicate and changes nothing. Of several events for one entity, only a
    higher version than the stored one is applied; the others are kept for audit as ``stale``.

    ``commit_alone`` says the caller writes nothing else in the session's transaction: a single
    event on a session where nothing has run yet may then be committed by its own statement,
    before this returns (see ``_commit_alone``).

    A deadlock or serialization failure rolls the session's transaction back and applies the
    events again, up to ``CONFLICT_TRIES`` times, before the error reaches the caller (a 503):
    call it before anything else the transaction must keep.
    """
    for attempt in range(1, CONFLICT_TRIES + 1):
        try:
            return await _ingest_events(
                session, events, api_key_id=api_key_id, received=received, commit_alone=commit_alone
            )
        except Exception as exc:
            if attempt == CONFLICT_TRIES or not _is_conflict(exc):
                raise
            log.warning("ingest_conflict_retried", attempt=attempt, sqlstate=_sqlstate(exc))
            await session.rollback()
            session.info.pop(RESCORE_AFTER_COMMIT, None)
            await asyncio.sleep(random.uniform(0.005, 0.02 * attempt))  # noqa: S311
    raise AssertionError("unreachable")


CONFLICT_TRIES = 3
_CONFLICT_STATES = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure


def _sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None) or getattr(getattr(exc, "orig", None), "sqlstate", None)
    if state is None:  # SQLAlchemy's asyncpg adapter keeps the driver's error one level down
        state = getattr(getattr(exc, "__cause__", None), "sqlstate", None)
    return state if isinstance(state, str) else None


def _is_conflict(exc: BaseException) -> bool:
    return _sqlstate(exc) in _CONFLICT_STATES


async def _ingest_events(
    session: AsyncSession,
    events: Sequence[AnyEvent],
    *,
    api_key_id: int | None,
    received: str | None,
    commit_alone: bool,
) -> list[ItemStatus]:
    statuses: list[ItemStatus] = [ItemStatus.duplicate] * len(events)
    first_index: dict[str, int] = {}
    for index, event in enumerate(events):
        first_index.setdefault(event.event_id, index)
    if not first_index:
        return statuses

    if len(events) == 1 and (upsert := _one_statement(events[0])) is not None:
        event = events[0]
        assert not isinstance(event, AccountEvent | ManagerEvent)
        return [await _ingest_one(session, upsert, event, received, api_key_id, commit_alone)]

    new_ids = await _insert_raw_events(session, events, received, first_index, api_key_id)
    fresh = sorted(
        (_Fresh(first_index[eid], events[first_index[eid]]) for eid in new_ids),
        key=lambda f: f.index,
    )
    if not fresh:
        return statuses
    await _apply_fresh(session, fresh, statuses)
    return statuses


async def _apply_fresh(
    session: AsyncSession, fresh: list[_Fresh], statuses: list[ItemStatus]
) -> None:
    """Apply the events whose raw record was just stored, setting their statuses."""
    account_ids = await _ensure_accounts(session, fresh)
    manager_ids = await _ensure_managers(session, fresh)
    applied: set[int] = set()
    groups: dict[EventType, list[_Fresh]] = {}
    for f in fresh:
        groups.setdefault(event_type(f.event), []).append(f)
    for _, name in _TYPE_NAMES:  # managers and accounts first: later types refer to them
        if name in groups:
            applied |= await _apply(session, _UPSERTS[name], groups[name], account_ids, manager_ids)

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
        await _rows(session, _MARK_STALE, stale_ids)
    if touched:
        await mark_dirty(session, touched)


_MARK_STALE = "UPDATE ingest_events SET status = 'stale' WHERE event_id = ANY($1::text[])"


# ``xmax = 0`` tells a freshly inserted row from one the ON CONFLICT branch updated.
_MARK_DIRTY = """
INSERT INTO dirty_accounts (account_id)
SELECT id FROM (
    SELECT unnest($1::bigint[]) AS id
    UNION
    SELECT parent_id FROM accounts WHERE id = ANY($1::bigint[]) AND parent_id IS NOT NULL
) AS target
ORDER BY id
ON CONFLICT (account_id) DO UPDATE SET seq = nextval('account_changes_seq')
RETURNING account_id, xmax = 0 AS inserted
"""


async def mark_dirty(session: AsyncSession, account_ids: Iterable[int]) -> None:
    """Mark accounts, and the groups they belong to, for a rescore after commit.

    Only accounts that were clean need a job: a dirty account already has one queued, or one
    running that will retry when it sees the newer mark, or (if a job was lost) the sweeper.
    """
    rows = await _rows(session, _MARK_DIRTY, sorted(set(account_ids)))
    newly_dirty = {account_id for account_id, inserted in rows if inserted}
    if newly_dirty:
        rescore: set[int] = session.info.setdefault(RESCORE_AFTER_COMMIT, set())
        rescore.update(newly_dirty)


# The raw records travel as one jsonb document, parsed once when the statement is bound, and
# each row takes its item from the ``events`` array by position: ``#>`` reaches it in place,
# where ``-> 'events'`` would copy the whole array for every row.
_INSERT_RAW = """
INSERT INTO ingest_events (event_id, type, account_external_id, status, payload, api_key_id)
SELECT
    event_id, type, account_external_id, 'accepted',
    $4::jsonb #> ARRAY['events', position::text], $5::bigint
FROM unnest($1::text[], $2::text[], $3::text[], $6::int[])
    AS u(event_id, type, account_external_id, position)
ORDER BY event_id
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""


# One encoder for every event: ``json.dumps`` with options builds a new one per call, which is
# a measurable share of a 1,000-event batch.
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def received_document(items: Sequence[Any]) -> str:
    """What ``ingest_events`` takes as ``received`` for batch items already parsed from JSON."""
    return _JSON.encode({"events": items})


def _dumped(events: Sequence[AnyEvent]) -> str:
    """What ``ingest_events`` takes as ``received`` when the events came as typed bodies.

    Each event is encoded by pydantic straight to JSON (a quarter of the time of dumping it to
    Python objects and encoding those) and its ``type`` put first: the object is never empty,
    ``event_id`` is required. A batch item carries its ``type`` already; the repeat is harmless,
    jsonb keeps one.
    """
    items = (
        f'{{"type":"{event_type(e).value}",{e.model_dump_json(exclude_unset=True)[1:]}'
        for e in events
    )
    return f'{{"events":[{",".join(items)}]}}'


async def _insert_raw_events(
    session: AsyncSession,
    events: Sequence[AnyEvent],
    received: str | None,
    first_index: dict[str, int],
    api_key_id: int | None,
) -> list[str]:
    event_ids: list[str] = []
    types: list[str] = []
    accounts: list[str | None] = []
    positions: list[int] = []
    for event_id, index in first_index.items():
        event = events[index]
        event_ids.append(event_id)
        types.append(event_type(event).value)
        accounts.append(account_ref(event))
        positions.append(index)
    document = received if received is not None else _dumped(events)
    rows = await _rows(
        session, _INSERT_RAW, event_ids, types, accounts, document, api_key_id, positions
    )
    return [row[0] for row in rows]


def _ensure_sql(table: str) -> str:
    # The SELECT sees the statement's snapshot, not the CTE's inserts: both halves are needed.
    return f"""
WITH wanted AS (SELECT DISTINCT unnest($1::text[]) AS external_id),
inserted AS (
    INSERT INTO {table} (external_id)
    SELECT external_id FROM wanted ORDER BY external_id
    ON CONFLICT (external_id) DO NOTHING
    RETURNING id, external_id
)
SELECT id, external_id FROM inserted
UNION ALL
SELECT t.id, t.external_id FROM {table} t JOIN wanted USING (external_id)
"""  # noqa: S608 - the table names are this module's constants


_ENSURE_ACCOUNTS = _ensure_sql("accounts")
_ENSURE_MANAGERS = _ensure_sql("managers")
_ENSURE_CONTACTS = """
WITH wanted AS (
    SELECT DISTINCT ON (external_id) external_id, account_id
    FROM unnest($1::text[], $2::bigint[]) AS u(external_id, account_id)
),
inserted AS (
    INSERT INTO contacts (external_id, account_id)
    SELECT external_id, account_id FROM wanted ORDER BY external_id
    ON CONFLICT (external_id) DO NOTHING
    RETURNING id, external_id
)
SELECT id, external_id FROM inserted
UNION ALL
SELECT c.id, c.external_id FROM contacts c JOIN wanted USING (external_id)
"""
_RESELECT = "SELECT id, external_id FROM {table} WHERE external_id = ANY($1::text[])"


async def _ensure(session: AsyncSession, table: str, sql: str, *params: Any) -> dict[str, int]:
    """Ids of the rows named by external id in ``params[0]``, creating stubs for new ones."""
    wanted: list[str] = params[0]
    found = {external_id: id_ for id_, external_id in await _rows(session, sql, *params)}
    missing = set(wanted) - set(found)
    if missing:
        # Another transaction committed the same stub after this statement's snapshot was taken:
        # ON CONFLICT saw it, the SELECT half could not. A fresh statement sees it.
        rows = await _rows(session, _RESELECT.format(table=table), sorted(missing))
        found |= {external_id: id_ for id_, external_id in rows}
    return found


async def _ensure_accounts(session: AsyncSession, fresh: list[_Fresh]) -> dict[str, int]:
    """Ids of every account the events name, creating stubs for the ones not seen yet."""
    refs: set[str] = set()
    for f in fresh:
        ref = account_ref(f.event)
        if ref is not None:
            refs.add(ref)
        if isinstance(f.event, AccountEvent) and f.event.parent_external_id:
            refs.add(f.event.parent_external_id)
    if not refs:
        return {}
    return await _ensure(session, "accounts", _ENSURE_ACCOUNTS, sorted(refs))


async def _ensure_managers(session: AsyncSession, fresh: list[_Fresh]) -> dict[str, int]:
    refs = {
        f.event.manager_external_id
        for f in fresh
        if isinstance(f.event, AccountEvent) and f.event.manager_external_id
    }
    refs |= {f.event.external_id for f in fresh if isinstance(f.event, ManagerEvent)}
    if not refs:
        return {}
    return await _ensure(session, "managers", _ENSURE_MANAGERS, sorted(r for r in refs if r))


# Types whose values travel as text, cast by the statement: asyncpg's binary numeric encoding
# of a Decimal costs three times ``str()``, and JSON is text already.
_AS_TEXT = frozenset({"jsonb", "numeric"})


def _numeric(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class _Upsert:
    """A version-guarded upsert of one entity type from column arrays."""

    table: str
    key: str
    columns: tuple[tuple[str, str], ...]  # (column, Postgres type; see _AS_TEXT)
    rows: Callable[[Any, dict[str, int], dict[str, int], dict[str, int]], tuple[Any, ...]]
    stubs: bool = False  # rows may exist as stubs with no version yet

    @cached_property
    def sql(self) -> str:
        names = [name for name, _ in self.columns]
        arrays = ", ".join(
            f"${i}::{'text' if pg_type in _AS_TEXT else pg_type}[]"
            for i, (_, pg_type) in enumerate(self.columns, 1)
        )
        select = ", ".join(
            f"{name}::{pg_type}" if pg_type in _AS_TEXT else name for name, pg_type in self.columns
        )
        return f"""
INSERT INTO {self.table} ({", ".join(names)})
SELECT {select} FROM unnest({arrays}) AS u({", ".join(names)})
ORDER BY {self.key}
{self._on_conflict}
RETURNING {self.key}
"""  # noqa: S608 - names are this module's constants; values travel as $n parameters

    @property
    def _on_conflict(self) -> str:
        stored = f"{self.table}.source_version"
        updates = ", ".join(
            # An unversioned event (-1) leaves the stored version as it was.
            f"{name} = GREATEST({stored}, EXCLUDED.{name})"
            if name == "source_version"
            else f"{name} = EXCLUDED.{name}"
            for name, _ in self.columns
            if name != self.key
        )
        guard = f"EXCLUDED.source_version = {UNVERSIONED} OR {stored} < EXCLUDED.source_version"
        if self.stubs:
            guard = f"{self.table}.source_version IS NULL OR {guard}"
        return (
            f"ON CONFLICT ({self.key}) DO UPDATE SET {updates}, updated_at = now()\nWHERE {guard}"
        )

    @cached_property
    def one_event_sql(self) -> str:
        return self._one_event_sql(all_or_nothing=False)

    @cached_property
    def one_event_alone_sql(self) -> str:
        """``one_event_sql`` for a statement that is its own transaction: it fails, and so
        writes nothing, when the event is fresh but was not applied (stale, or its account
        came from a concurrent transaction), the cases that need statements after it."""
        return self._one_event_sql(all_or_nothing=True)

    def _one_event_sql(self, *, all_or_nothing: bool) -> str:
        """All of one event that names an account and nothing else, in one statement: the raw
        record ($1-$5), the account (a stub if unseen), the version-guarded upsert of the
        entity (its columns but ``account_id`` from $6 on) and the dirty marks. The raw record
        is the first item of the ``events`` array of $4, as ``ingest_events`` takes it.

        Every part runs on the statement's one snapshot, which decides two things. The raw
        insert gates the rest, so a duplicate changes nothing. And an account committed by
        another transaction after that snapshot was taken is seen by neither half of
        ``account`` (ON CONFLICT skips it, the SELECT cannot see it): ``account_id`` then
        comes back NULL, nothing but the raw record was written, and the caller finishes the
        event with statements of their own.

        Lock order: the account row (and its parent's) with ``FOR KEY SHARE`` before the dirty
        marks, as a rescore takes them (the account ``FOR UPDATE``, then its dirty mark). The
        foreign-key checks would take the same account locks anyway, but only at the end of the
        statement, after the dirty mark: the opposite order, which deadlocked with rescores.
        """
        check = _FAIL_UNLESS_APPLIED if all_or_nothing else ""
        numbers = iter(range(6, len(self.columns) + 6))
        values = ", ".join(
            "account.id"
            if name == "account_id"
            else f"${next(numbers)}::{'text::' if pg_type in _AS_TEXT else ''}{pg_type}"
            for name, pg_type in self.columns
        )
        names = ", ".join(name for name, _ in self.columns)
        return f"""
WITH raw AS (
    INSERT INTO ingest_events (event_id, type, account_external_id, status, payload, api_key_id)
    VALUES ($1::text, $2::text, $3::text, 'accepted', $4::jsonb #> '{{events,0}}', $5::bigint)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
),
stub AS (
    INSERT INTO accounts (external_id)
    SELECT $3::text FROM raw
    ON CONFLICT (external_id) DO NOTHING
    RETURNING id, parent_id
),
existing AS (
    SELECT id, parent_id FROM accounts
    WHERE external_id = $3::text AND EXISTS (SELECT FROM raw)
    FOR KEY SHARE
),
account AS (
    SELECT id, parent_id FROM stub
    UNION ALL
    SELECT id, parent_id FROM existing
),
parent AS (
    SELECT p.id FROM accounts p JOIN account ON p.id = account.parent_id FOR KEY SHARE OF p
),
applied AS (
    INSERT INTO {self.table} ({names})
    SELECT {values} FROM account
    {self._on_conflict}
    RETURNING account_id
),
dirty AS (
    INSERT INTO dirty_accounts (account_id)
    SELECT id FROM (
        SELECT account_id AS id FROM applied
        UNION
        SELECT parent.id FROM parent, applied
    ) AS target
    ORDER BY id
    ON CONFLICT (account_id) DO UPDATE SET seq = nextval('account_changes_seq')
    RETURNING account_id, xmax = 0 AS inserted
)
SELECT
    EXISTS (SELECT FROM raw) AS fresh,
    (SELECT id FROM account) AS account_id,
    EXISTS (SELECT FROM applied) AS applied,
    ARRAY(SELECT account_id FROM dirty WHERE inserted) AS newly_dirty{check}
"""  # noqa: S608 - names are this module's constants; values travel as $n parameters


# When the event is fresh and was not applied, the statement fails and its transaction writes
# nothing: a text that is no number, cast to one at run time (it takes a count from the query,
# so the planner cannot fold it into an error for every call). Its words are what the Postgres
# server log shows ('invalid input syntax for type integer: "kam: ..."'), so an operator
# reading the log knows it for an expected detour, not a fault.
_NOT_APPLIED_ALONE = "kam: event not applied alone, applied again in a transaction"
_FAIL_UNLESS_APPLIED = f""",
    CASE WHEN EXISTS (SELECT FROM raw) AND NOT EXISTS (SELECT FROM applied)
        THEN ('{_NOT_APPLIED_ALONE} (' || (SELECT count(*) FROM applied) || ')')::int
    END AS not_applied"""  # noqa: S608 - the text is a module constant


def _lines(event: OrderData) -> str:
    return _JSON.encode(
        [
            {"category": line.category, "quantity": str(line.quantity), "amount": str(line.amount)}
            for line in event.lines
        ]
    )


_UPSERTS: dict[EventType, _Upsert] = {
    EventType.manager: _Upsert(
        "managers",
        "external_id",
        (
            ("external_id", "text"),
            ("name", "text"),
            ("email", "text"),
            ("capacity", "int"),
            ("source_version", "bigint"),
        ),
        lambda e, a, m, c: (e.external_id, e.name, e.email, e.capacity, e.source_version),
        stubs=True,
    ),
    EventType.account: _Upsert(
        "accounts",
        "external_id",
        (
            ("external_id", "text"),
            ("name", "text"),
            ("industry", "text"),
            ("region", "text"),
            ("segment", "text"),
            ("parent_id", "bigint"),
            ("manager_id", "bigint"),
            ("credit_limit", "numeric"),
            ("payment_terms_days", "int"),
            ("strategic_fit", "int"),
            ("status", "text"),
            ("churn_reason", "text"),
            ("source_version", "bigint"),
        ),
        lambda e, a, m, c: (
            e.external_id,
            e.name,
            e.industry,
            e.region,
            e.segment,
            a[e.parent_external_id] if e.parent_external_id else None,
            m[e.manager_external_id] if e.manager_external_id else None,
            _numeric(e.credit_limit),
            e.payment_terms_days,
            e.strategic_fit,
            e.status.value,
            e.churn_reason,
            e.source_version,
        ),
        stubs=True,
    ),
    EventType.contact: _Upsert(
        "contacts",
        "external_id",
        (
            ("external_id", "text"),
            ("account_id", "bigint"),
            ("name", "text"),
            ("role", "text"),
            ("email", "text"),
            ("phone", "text"),
            ("address", "text"),
            ("gender", "text"),
            ("birth_year", "int"),
            ("source_version", "bigint"),
        ),
        lambda e, a, m, c: (
            e.external_id,
            a[e.account_external_id],
            e.name,
            e.role.value if e.role else None,
            e.email,
            e.phone,
            e.address,
            e.gender,
            e.birth_year,
            e.source_version,
        ),
        stubs=True,
    ),
    EventType.order: _Upsert(
        "orders",
        "external_id",
        (
            ("external_id", "text"),
            ("account_id", "bigint"),
            ("ordered_at", "timestamptz"),
            ("amount", "numeric"),
            ("cost", "numeric"),
            ("currency", "text"),
            ("status", "text"),
            ("lines", "jsonb"),
            ("source_version", "bigint"),
        ),
        lambda e, a, m, c: (
            e.external_id,
            a[e.account_external_id],
            e.ordered_at,
            _numeric(e.amount),
            _numeric(e.cost),
            e.currency,
            e.status.value,
            _lines(e),
            e.source_version,
        ),
    ),
    EventType.interaction: _Upsert(
        "interactions",
        "external_id",
        (
            ("external_id", "text"),
            ("account_id", "bigint"),
            ("contact_id", "bigint"),
            ("channel", "text"),
            ("direction", "text"),
            ("kind", "text"),
            ("occurred_at", "timestamptz"),
            ("satisfaction", "int"),
            ("summary", "text"),
            ("source_version", "bigint"),
        ),
        lambda e, a, m, c: (
            e.external_id,
            a[e.account_external_id],
            c[e.contact_external_id] if e.contact_external_id else None,
            e.channel.value,
            e.direction.value,
            e.kind.value,
            e.occurred_at,
            e.satisfaction,
            e.summary,
            e.source_version,
        ),
    ),
    EventType.payment: _Upsert(
        "payments",
        "invoice_external_id",
        (
            ("invoice_external_id", "text"),
            ("account_id", "bigint"),
            ("amount", "numeric"),
            ("currency", "text"),
            ("due_at", "timestamptz"),
            ("paid_at", "timestamptz"),
            ("source_version", "bigint"),
        ),
        lambda e, a, m, c: (
            e.invoice_external_id,
            a[e.account_external_id],
            _numeric(e.amount),
            e.currency,
            e.due_at,
            e.paid_at,
            e.source_version,
        ),
    ),
}


async def _apply(
    session: AsyncSession,
    upsert: _Upsert,
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
        if held is None or _newer(f.event.source_version, held.event.source_version):
            newest[key] = f
    winners = [newest[key] for key in sorted(newest)]

    contact_ids: dict[str, int] = {}
    if upsert.table == "interactions":
        named = {
            f.event.contact_external_id: account_ids[f.event.account_external_id]
            for f in winners
            if isinstance(f.event, InteractionData) and f.event.contact_external_id
        }
        if named:
            refs = sorted(named)
            contact_ids = await _ensure(
                session, "contacts", _ENSURE_CONTACTS, refs, [named[r] for r in refs]
            )

    rows = [upsert.rows(f.event, account_ids, manager_ids, contact_ids) for f in winners]
    columns = [list(column) for column in zip(*rows, strict=True)]
    applied_keys = {row[0] for row in await _rows(session, upsert.sql, *columns)}
    return {f.index for f in winners if entity_key(f.event) in applied_keys}


def _newer(later: int, earlier: int) -> bool:
    """Whether the later-received of two events for one entity wins: by version when both
    carry one, by arrival when either does not (as if applied one after the other)."""
    return UNVERSIONED in (later, earlier) or later > earlier


def _one_statement(event: AnyEvent) -> _Upsert | None:
    """The upsert of an event that names its account and nothing else (no parent, manager or
    contact to resolve): such an event is applied by one statement."""
    if isinstance(event, AccountEvent | ManagerEvent):
        return None
    if isinstance(event, InteractionData) and event.contact_external_id:
        return None
    return _UPSERTS[event_type(event)]


async def _ingest_one(
    session: AsyncSession,
    upsert: _Upsert,
    event: OrderData | ContactData | InteractionData | PaymentData,
    received: str | None,
    api_key_id: int | None,
    commit_alone: bool,
) -> ItemStatus:
    """``ingest_events`` for one event that ``_one_statement`` takes: one statement, where the
    general path needs four (and, with ``commit_alone``, no BEGIN or COMMIT either)."""
    account = event.account_external_id
    # The account's id is the statement's to find: a placeholder fills its place in the row.
    row = upsert.rows(event, {account: 0}, {}, {})
    values = [v for (name, _), v in zip(upsert.columns, row, strict=True) if name != "account_id"]
    params = (
        event.event_id,
        event_type(event).value,
        account,
        received if received is not None else _dumped([event]),
        api_key_id,
        *values,
    )
    if commit_alone:
        alone = await _commit_alone(session, upsert, params)
        if alone is not None:
            return alone
    [(fresh, account_id, applied, newly_dirty)] = await _rows(
        session, upsert.one_event_sql, *params
    )
    if not fresh:
        return ItemStatus.duplicate
    if account_id is None:
        # Another transaction created the account just now (see ``one_event_sql``).
        statuses = [ItemStatus.accepted]
        await _apply_fresh(session, [_Fresh(0, event)], statuses)
        return statuses[0]
    if newly_dirty:
        session.info.setdefault(RESCORE_AFTER_COMMIT, set()).update(newly_dirty)
    if applied:
        return ItemStatus.accepted
    await _rows(session, _MARK_STALE, [event.event_id])
    return ItemStatus.stale


async def _commit_alone(
    session: AsyncSession, upsert: _Upsert, params: tuple[Any, ...]
) -> ItemStatus | None:
    """Apply a single event with one statement that is its own transaction, when nothing has
    run in the session's transaction yet; None when that did not apply it.

    Why a trick: it saves the round trips of BEGIN and COMMIT, and the ORM's path for the
    first statement. Measured by ``make bench-ingest --client raw`` on a quiet machine, single
    events went from 449/s (0.36x the bare single-insert endpoint) as a plain transaction to
    586/s (0.55x) this way. How: an event that needs more than the statement (a stale one, or
    one whose account a concurrent transaction just created) makes it fail on purpose
    (``_FAIL_UNLESS_APPLIED``) and write nothing; it is then applied in a transaction like any
    other. The statement takes its locks in the same order as a rescore (``one_event_sql``).
    """
    driver = await _idle_driver(session)
    if driver is None:
        return None
    try:
        [(fresh, _, _, newly_dirty, _)] = await driver.fetch(upsert.one_event_alone_sql, *params)
    except asyncpg.exceptions.InvalidTextRepresentationError as exc:
        if _NOT_APPLIED_ALONE not in str(exc):
            raise
        return None  # not applied as it stands: nothing was written, the general path follows
    if newly_dirty:
        rescore: set[int] = session.info.setdefault(RESCORE_AFTER_COMMIT, set())
        rescore.update(newly_dirty)
    return ItemStatus.accepted if fresh else ItemStatus.duplicate
