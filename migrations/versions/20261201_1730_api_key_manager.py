"""an API key may be restricted to one key-account manager's accounts

Revision ID: 5d1c8e4b7a02
Revises: 5d2b8e4a7c13
Create Date: 2026-12-01 17:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5d1c8e4b7a02"
down_revision: str | None = "5d2b8e4a7c13"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The manager's external id, not a foreign key: a key may be made for a manager whose
    # record the CRM has not sent yet, and it must stay restricted if the record is replaced.
    op.add_column(
        "api_keys", sa.Column("manager_external_id", sa.String(length=128), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("api_keys", "manager_external_id")
