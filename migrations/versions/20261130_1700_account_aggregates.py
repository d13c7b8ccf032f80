"""account aggregates kept between portfolio passes, and change numbers on the dirty marks that
outlive the marks (one sequence for all accounts), so a pass can tell which stored aggregates
still hold

Revision ID: 3a7e5c1f9d24
Revises: 9b3f6c2d8e51
Create Date: 2026-11-30 17:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "3a7e5c1f9d24"
down_revision: str | None = "9b3f6c2d8e51"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(sa.schema.CreateSequence(sa.Sequence("account_changes_seq")))
    # Past every number a mark holds now, so a new change is always numbered above an old one.
    op.execute(
        "SELECT setval('account_changes_seq', "
        "greatest((SELECT max(seq) FROM dirty_accounts), 0) + 1, false)"
    )
    op.alter_column(
        "dirty_accounts", "seq", server_default=sa.text("nextval('account_changes_seq')")
    )
    # Owned by the column: dropped with it, and restarted by TRUNCATE ... RESTART IDENTITY.
    op.execute("ALTER SEQUENCE account_changes_seq OWNED BY dirty_accounts.seq")
    op.create_table(
        "account_aggregates",
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("layout", sa.SmallInteger(), nullable=False),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stale_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("aggregate_values", postgresql.ARRAY(sa.Double()), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_account_aggregates_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_account_aggregates")),
    )


def downgrade() -> None:
    op.drop_table("account_aggregates")
    op.alter_column("dirty_accounts", "seq", server_default=sa.text("1"))
    op.execute(sa.schema.DropSequence(sa.Sequence("account_changes_seq")))
