"""the portfolio summary of each pass, and the worklist's figures on the account row

Revision ID: 7a3f9c2d1e60
Revises: 5d1c8e4b7a02
Create Date: 2026-12-01 18:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "7a3f9c2d1e60"
down_revision: str | None = "5d1c8e4b7a02"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The figures of each account's newest snapshot, as the scorer writes them from now on.
_BACKFILL = """
UPDATE accounts a SET
    revenue_12m = (s.features ->> 'revenue_12m')::float8,
    gross_profit_12m = (s.features ->> 'gross_profit_12m')::float8,
    first_risk_driver = s.drivers #>> '{risk,0,text}'
FROM (
    SELECT DISTINCT ON (account_id) account_id, features, drivers
    FROM score_snapshots
    ORDER BY account_id, computed_at DESC, id DESC
) s
WHERE s.account_id = a.id
"""


def upgrade() -> None:
    op.create_table(
        "portfolio_summaries",
        sa.Column("scope", sa.String(length=64), primary_key=True),
        sa.Column("manager_id", sa.BigInteger(), nullable=True),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("figures", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("lost", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    )
    op.add_column("accounts", sa.Column("revenue_12m", sa.Double(), nullable=True))
    op.add_column("accounts", sa.Column("gross_profit_12m", sa.Double(), nullable=True))
    op.add_column("accounts", sa.Column("first_risk_driver", sa.Text(), nullable=True))
    op.execute(_BACKFILL)
    op.add_column(
        "accounts",
        sa.Column(
            "gross_profit_at_risk",
            sa.Double(),
            sa.Computed("risk_probability * gross_profit_12m", persisted=True),
            nullable=True,
        ),
    )
    op.create_index(
        "ix_accounts_worklist",
        "accounts",
        [sa.text("coalesce(gross_profit_at_risk, -1) DESC"), "id"],
    )


def downgrade() -> None:
    op.drop_index("ix_accounts_worklist", table_name="accounts")
    for column in ("gross_profit_at_risk", "first_risk_driver", "gross_profit_12m", "revenue_12m"):
        op.drop_column("accounts", column)
    op.drop_table("portfolio_summaries")
