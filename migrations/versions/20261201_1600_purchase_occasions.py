"""purchase occasions for the retention models, the occasion window of stored aggregates, the
population facts each account's figures were computed with and the basis of its tier, and the
late-payment rule of stored policies

Revision ID: 5d2b8e4a7c13
Revises: 3a7e5c1f9d24
Create Date: 2026-12-01 16:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5d2b8e4a7c13"
down_revision: str | None = "3a7e5c1f9d24"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Buying occasions from an account's order days (UTC day numbers, ascending): an order placed
# less than ``window_days`` days after the first order of the current occasion belongs to it;
# the next one opens a new occasion. Returns {occasions, day of the last occasion's first order}.
# The rule is sequential (each occasion starts where the previous one's window ends), which no
# window function expresses; a loop over the sorted days costs about what count(DISTINCT day)
# did (3.7 s against 3.4 s over 5M orders, measured).
OCCASIONS_FUNCTION = """
CREATE FUNCTION kam_purchase_occasions(days integer[], window_days integer)
RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    occasions integer := 0;
    anchor integer;
    d integer;
BEGIN
    IF days IS NULL THEN
        RETURN NULL;
    END IF;
    FOREACH d IN ARRAY days LOOP
        IF occasions = 0 OR d - anchor >= window_days THEN
            occasions := occasions + 1;
            anchor := d;
        END IF;
    END LOOP;
    IF occasions = 0 THEN
        RETURN NULL;
    END IF;
    RETURN ARRAY[occasions, anchor];
END
$$
"""


def upgrade() -> None:
    op.execute(OCCASIONS_FUNCTION)
    op.add_column(
        "account_aggregates",
        sa.Column(
            "occasion_window_days", sa.SmallInteger(), server_default=sa.text("1"), nullable=False
        ),
    )
    op.add_column("accounts", sa.Column("population_fit_id", sa.BigInteger(), nullable=True))
    op.add_column("accounts", sa.Column("tier_basis", sa.Integer(), nullable=True))
    # A late payer keeps its value tier with a credit flag (or is capped at key); the old caps
    # at developing or standard are gone. Stored bodies follow.
    op.execute(
        """
        UPDATE scoring_policies
        SET body = jsonb_set(
            body #- '{tiers,poor_payment_cap}', '{tiers,late_payment_cap}', '"key"'::jsonb
        )
        WHERE body -> 'tiers' ? 'poor_payment_cap'
        """
    )


def downgrade() -> None:
    op.execute(
        """
        UPDATE scoring_policies
        SET body = jsonb_set(
            body #- '{tiers,late_payment_cap}', '{tiers,poor_payment_cap}', '"developing"'::jsonb
        )
        WHERE body -> 'tiers' ? 'late_payment_cap'
        """
    )
    op.execute(
        "UPDATE scoring_policies SET body = body #- '{risk,occasion_window_days}' "
        "#- '{risk,model}' #- '{population}'"
    )
    op.drop_column("accounts", "tier_basis")
    op.drop_column("accounts", "population_fit_id")
    op.drop_column("account_aggregates", "occasion_window_days")
    op.execute("DROP FUNCTION kam_purchase_occasions(integer[], integer)")
