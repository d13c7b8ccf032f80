"""Retention of raw event bodies: after ``raw_payload_retention_days`` a raw record keeps only
its hash and metadata (event id, type, account, status, key, time received), so personal data
sent in events does not stay for ever. A daily cron; idempotent, in bounded batches."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import text

from services.scorer.jobs import job_session
from shared.settings import Settings

log = structlog.get_logger(__name__)

EXPIRE_BATCH = 5000

# The oldest first, a batch at a time: each batch is a short transaction that locks few rows.
# The body's hash is kept (see services/api/ingest/reuse.py): a repeat stays a duplicate.
_EXPIRE = """
UPDATE ingest_events
SET body_hash = coalesce(body_hash, kam_body_hash(payload)), payload = NULL
WHERE event_id IN (
    SELECT event_id FROM ingest_events
    WHERE received_at < :cutoff AND payload IS NOT NULL
    ORDER BY event_id
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
)
"""


async def expire_raw_payloads(ctx: dict[str, Any], *, now: datetime | None = None) -> int:
    """Drop the bodies of raw records older than the retention period; returns how many."""
    settings: Settings = ctx["settings"]
    cutoff = (now or datetime.now(UTC)) - timedelta(days=settings.raw_payload_retention_days)
    total = 0
    while True:
        async with job_session(ctx) as session:
            result = await session.execute(text(_EXPIRE), {"cutoff": cutoff, "batch": EXPIRE_BATCH})
        done = int(result.rowcount or 0)  # type: ignore[attr-defined]
        total += done
        if done < EXPIRE_BATCH:
            break
    if total:
        log.info("raw_payloads_expired", count=total, cutoff=cutoff.isoformat())
    return total
