"""A reused ``event_id``: the same id sent again with a different body.

A repeat of an event (same id, same body) is a ``duplicate`` and changes nothing. The same id
with another body is a producer bug that would otherwise lose the new data without a word, so
it is refused: 409 on the typed endpoints, a ``rejected`` item in a batch.

Bodies are compared by the SHA-256 of their canonical JSON (``kam_body_hash``: jsonb's text, so
key order and whitespace do not matter; values do, as sent). The stored record's hash is taken
from its body, or, once the body was rewritten (erasure, retention), from ``body_hash``, which
is set just before. Hashing every body on insert cost a sixth of Postgres's time per batch
event; only events already found to be duplicates are hashed here, so new events cost nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from services.api.errors import Conflict, FieldError
from services.api.ingest.service import AnyEvent, event_type, received_document

# $3 is a document as ``ingest_events`` takes it (``{"events": [...]}``), each candidate's body
# at its position there, as the raw insert takes it.
_REUSED = """
SELECT u.position
FROM ingest_events e
JOIN unnest($1::text[], $2::int[]) AS u(event_id, position) USING (event_id)
WHERE coalesce(e.body_hash, kam_body_hash(e.payload))
    IS DISTINCT FROM kam_body_hash($3::jsonb #> ARRAY['events', u.position::text])
"""


async def reused_positions(
    session: AsyncSession, candidates: Sequence[tuple[str, int]], document: str
) -> set[int]:
    """The positions among ``candidates`` (event id, position of its body in ``document``)
    whose body differs from the one stored under their event id."""
    if not candidates:
        return set()
    connection = await session.connection()
    result = await connection.exec_driver_sql(
        _REUSED,
        ([event_id for event_id, _ in candidates], [p for _, p in candidates], document),
    )
    return {row[0] for row in result.all()}


def typed_document(event: AnyEvent) -> str:
    """The document a typed endpoint's event is stored from (its fields as sent, and its type)."""
    fields = json.loads(event.model_dump_json(exclude_unset=True))
    return received_document([{"type": event_type(event).value, **fields}])


async def refuse_reused(session: AsyncSession, event: AnyEvent) -> None:
    """Raise 409 when ``event``, found a duplicate, came with a different body."""
    if await reused_positions(session, [(event.event_id, 0)], typed_document(event)):
        raise Conflict(
            f"event_id '{event.event_id}' was sent before with a different body; an event_id "
            "names one event: send a change with a new event_id.",
            errors=[reuse_error("body.event_id")],
        )


def reuse_error(field: str) -> FieldError:
    return FieldError(
        field=field,
        message="this event_id was sent before with a different body",
        type="event_id_reused",
    )
