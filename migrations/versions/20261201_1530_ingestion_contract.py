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


def upgrade() -> None:
    op.add_column("ingest_events", sa.Column("body_hash", sa.LargeBinary(), nullable=True))
    op.execute(_HASH_FUNCTION)


def downgrade() -> None:
    op.execute("DROP FUNCTION kam_body_hash(jsonb)")
    op.drop_column("ingest_events", "body_hash")
