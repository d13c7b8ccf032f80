"""ingest_events.api_key_id without a foreign key: every event took a share lock on its key's
one row, so concurrent producers with the same key contended on it (multixacts); keys are
revoked, never deleted, so the constraint guarded nothing that happens

Revision ID: 9b3f6c2d8e51
Revises: 7c1d5e9a0b42
Create Date: 2026-11-30 16:30:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "9b3f6c2d8e51"
down_revision: str | None = "7c1d5e9a0b42"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("fk_ingest_events_api_key_id_api_keys", "ingest_events", type_="foreignkey")


def downgrade() -> None:
    # Keys are never deleted, so every stored api_key_id still names a key.
    op.create_foreign_key(
        "fk_ingest_events_api_key_id_api_keys",
        "ingest_events",
        "api_keys",
        ["api_key_id"],
        ["id"],
        ondelete="SET NULL",
    )
