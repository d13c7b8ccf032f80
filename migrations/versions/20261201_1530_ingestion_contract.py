"""the ingestion contract: a hash of each raw event's canonical body, kept when the body itself
is erased or expires, so a reused event_id with a different body can be told from a repeat;
versions optional on orders, interactions and payments (arrival order decides without one)

Revision ID: 5d2c8e1b7a93
Revises: 3a7e5c1f9d24
Create Date: 2026-12-01 15:30:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5d2c8e1b7a93"
down_revision: str | None = "3a7e5c1f9d24"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# jsonb's text form is canonical (keys sorted, no duplicates, fixed spacing): two bodies that
# differ only in key order or whitespace hash alike.
_HASH_FUNCTION = """
CREATE FUNCTION kam_body_hash(body jsonb) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN sha256(convert_to(body::text, 'UTF8'))
"""

# A trigger, not a column the insert sets: the hash is taken once, from the body as stored,
# whichever path inserted the row, and stays when erasure or retention rewrites the body.
_HASH_TRIGGER_FUNCTION = """
CREATE FUNCTION kam_ingest_events_hash() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.body_hash := kam_body_hash(NEW.payload);
    RETURN NEW;
END
$$
"""

_HASH_TRIGGER = """
CREATE TRIGGER ingest_events_body_hash BEFORE INSERT ON ingest_events
FOR EACH ROW EXECUTE FUNCTION kam_ingest_events_hash()
"""


def upgrade() -> None:
    op.add_column("ingest_events", sa.Column("body_hash", sa.LargeBinary(), nullable=True))
    op.execute(_HASH_FUNCTION)
    op.execute("UPDATE ingest_events SET body_hash = kam_body_hash(payload)")
    op.execute(_HASH_TRIGGER_FUNCTION)
    op.execute(_HASH_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER ingest_events_body_hash ON ingest_events")
    op.execute("DROP FUNCTION kam_ingest_events_hash()")
    op.execute("DROP FUNCTION kam_body_hash(jsonb)")
    op.drop_column("ingest_events", "body_hash")
