"""privacy: a record of every contact erasure (without personal data); raw event bodies may be
dropped (retention) while their hash and metadata stay; triggers that keep an erased contact's
personal data from coming back with a later event; indexes that find a contact's raw events

Revision ID: 8e4a1f6c3b27
Revises: 5d2c8e1b7a93
Create Date: 2026-12-01 16:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "8e4a1f6c3b27"
down_revision: str | None = "5d2c8e1b7a93"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The keys of a contact event that are personal data, and of an interaction event. Kept in
# step with shared/privacy.py (a test compares them).
_CONTACT_KEYS = "ARRAY['name', 'email', 'phone', 'address', 'gender', 'birth_year']"
_INTERACTION_KEYS = "ARRAY['summary']"

# The body's hash is kept before the erased fields leave it, so a repeat of the event is still
# a duplicate. The trigger's WHEN keeps every other event type from calling it at all.
_RAW_EVENT_TRIGGER_FUNCTION = f"""
CREATE FUNCTION kam_ingest_events_erased() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.type = 'contact' AND EXISTS (
        SELECT FROM contacts
        WHERE external_id = NEW.payload ->> 'external_id' AND erased_at IS NOT NULL
    ) THEN
        NEW.body_hash := coalesce(NEW.body_hash, kam_body_hash(NEW.payload));
        NEW.payload := NEW.payload - {_CONTACT_KEYS};
    ELSIF NEW.type = 'interaction' AND NEW.payload ? 'contact_external_id' AND EXISTS (
        SELECT FROM contacts
        WHERE external_id = NEW.payload ->> 'contact_external_id' AND erased_at IS NOT NULL
    ) THEN
        NEW.body_hash := coalesce(NEW.body_hash, kam_body_hash(NEW.payload));
        NEW.payload := NEW.payload - {_INTERACTION_KEYS};
    END IF;
    RETURN NEW;
END
$$
"""  # noqa: S608 - the keys are this module's constants

_CONTACT_TRIGGER_FUNCTION = """
CREATE FUNCTION kam_contacts_erased() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.erased_at IS NOT NULL THEN
        NEW.name := NULL;
        NEW.email := NULL;
        NEW.phone := NULL;
        NEW.address := NULL;
        NEW.gender := NULL;
        NEW.birth_year := NULL;
    END IF;
    RETURN NEW;
END
$$
"""

_INTERACTION_TRIGGER_FUNCTION = """
CREATE FUNCTION kam_interactions_erased() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.summary IS NOT NULL AND NEW.contact_id IS NOT NULL AND EXISTS (
        SELECT FROM contacts WHERE id = NEW.contact_id AND erased_at IS NOT NULL
    ) THEN
        NEW.summary := NULL;
    END IF;
    RETURN NEW;
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "contact_erasures",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("contact_external_id", sa.String(length=128), nullable=False),
        sa.Column("account_external_id", sa.String(length=128), nullable=True),
        sa.Column("api_key_id", sa.BigInteger(), nullable=True),
        sa.Column("fields", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("raw_events", sa.Integer(), nullable=False),
        sa.Column("interaction_summaries", sa.Integer(), nullable=False),
        sa.Column(
            "erased_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contact_erasures")),
    )
    op.create_index(
        op.f("ix_contact_erasures_contact_external_id"),
        "contact_erasures",
        ["contact_external_id"],
    )
    op.alter_column("ingest_events", "payload", existing_type=postgresql.JSONB(), nullable=True)
    op.create_index(
        "ix_ingest_events_contact",
        "ingest_events",
        [sa.text("(payload ->> 'external_id')")],
        postgresql_where=sa.text("type = 'contact'"),
    )
    op.create_index(
        "ix_ingest_events_interaction_contact",
        "ingest_events",
        [sa.text("(payload ->> 'contact_external_id')")],
        postgresql_where=sa.text("type = 'interaction'"),
    )
    op.execute(_RAW_EVENT_TRIGGER_FUNCTION)
    op.execute(
        "CREATE TRIGGER ingest_events_erased BEFORE INSERT ON ingest_events FOR EACH ROW "
        "WHEN (NEW.type IN ('contact', 'interaction')) "
        "EXECUTE FUNCTION kam_ingest_events_erased()"
    )
    op.execute(_CONTACT_TRIGGER_FUNCTION)
    op.execute(
        "CREATE TRIGGER contacts_erased BEFORE INSERT OR UPDATE ON contacts FOR EACH ROW "
        "WHEN (NEW.erased_at IS NOT NULL) EXECUTE FUNCTION kam_contacts_erased()"
    )
    op.execute(_INTERACTION_TRIGGER_FUNCTION)
    op.execute(
        "CREATE TRIGGER interactions_erased BEFORE INSERT OR UPDATE ON interactions FOR EACH ROW "
        "WHEN (NEW.summary IS NOT NULL AND NEW.contact_id IS NOT NULL) "
        "EXECUTE FUNCTION kam_interactions_erased()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER interactions_erased ON interactions")
    op.execute("DROP FUNCTION kam_interactions_erased()")
    op.execute("DROP TRIGGER contacts_erased ON contacts")
    op.execute("DROP FUNCTION kam_contacts_erased()")
    op.execute("DROP TRIGGER ingest_events_erased ON ingest_events")
    op.execute("DROP FUNCTION kam_ingest_events_erased()")
    op.drop_index("ix_ingest_events_interaction_contact", table_name="ingest_events")
    op.drop_index("ix_ingest_events_contact", table_name="ingest_events")
    # Bodies dropped by retention are gone; their rows keep an empty object.
    op.execute("UPDATE ingest_events SET payload = '{}'::jsonb WHERE payload IS NULL")
    op.alter_column("ingest_events", "payload", existing_type=postgresql.JSONB(), nullable=False)
    op.drop_index(op.f("ix_contact_erasures_contact_external_id"), table_name="contact_erasures")
    op.drop_table("contact_erasures")
