"""scoring state: the computed tier and its demotion count (hysteresis under overrides), and
when the last snapshot was written

Revision ID: 7c1d5e9a0b42
Revises: 4e8a342a2237
Create Date: 2026-11-23 15:45:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7c1d5e9a0b42"
down_revision: str | None = "4e8a342a2237"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("computed_tier", sa.String(length=16), nullable=True))
    op.add_column(
        "accounts",
        sa.Column(
            "tier_demotion_count", sa.SmallInteger(), server_default=sa.text("0"), nullable=False
        ),
    )

    op.add_column("accounts", sa.Column("snapshot_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("accounts", "snapshot_at")
    op.drop_column("accounts", "tier_demotion_count")
    op.drop_column("accounts", "computed_tier")
