"""SQLAlchemy models: the tables of the service (DESIGN section 3).

Money is ``numeric(14,2)``, timestamps ``timestamptz``, ids ``bigint`` identity, and every row a
producer sends is addressed by its ``external_id``. ``source_version`` is the producer version last
applied to the row; a stub created by a reference (an order for an unseen account) has none.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    CheckConstraint,
    Computed,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    Sequence,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

EXTERNAL_ID_LENGTH = 128
Money = Numeric(14, 2)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSONB,
        list[Any]: JSONB,
        Decimal: Money,
    }


def _pk() -> Mapped[int]:
    return mapped_column(BigInteger, Identity(always=False), primary_key=True)


def _created() -> Mapped[datetime]:
    return mapped_column(server_default=func.now())


def _updated() -> Mapped[datetime]:
    return mapped_column(server_default=func.now(), onupdate=func.now())


class Manager(Base):
    """A key-account manager. ``capacity`` is how many key accounts they can look after."""

    __tablename__ = "managers"

    id: Mapped[int] = _pk()
    external_id: Mapped[str] = mapped_column(String(EXTERNAL_ID_LENGTH), unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(320))
    capacity: Mapped[int] = mapped_column(SmallInteger, server_default=text("9"))
    source_version: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    __table_args__ = (CheckConstraint("capacity >= 0", name="capacity_non_negative"),)


class Account(Base):
    """A customer account, its master data, and its current tier and risk."""

    __tablename__ = "accounts"

    id: Mapped[int] = _pk()
    external_id: Mapped[str] = mapped_column(String(EXTERNAL_ID_LENGTH), unique=True)
    name: Mapped[str | None] = mapped_column(String(300))
    industry: Mapped[str | None] = mapped_column(String(100))
    region: Mapped[str | None] = mapped_column(String(100))
    segment: Mapped[str | None] = mapped_column(String(100))
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="SET NULL"), index=True
    )
    manager_id: Mapped[int | None] = mapped_column(
        ForeignKey("managers.id", ondelete="SET NULL"), index=True
    )
    credit_limit: Mapped[Decimal | None]
    payment_terms_days: Mapped[int | None] = mapped_column(SmallInteger)
    strategic_fit: Mapped[int | None] = mapped_column(SmallInteger)
    status: Mapped[str] = mapped_column(String(16), server_default=text("'active'"))
    churn_reason: Mapped[str | None] = mapped_column(Text)

    # Written by the scorer only; no client field maps onto these.
    tier: Mapped[str | None] = mapped_column(String(16), index=True)
    tier_since: Mapped[datetime | None]
    value_score: Mapped[float | None] = mapped_column(Double)
    risk_probability: Mapped[float | None] = mapped_column(Double)
    risk_band: Mapped[str | None] = mapped_column(String(16), index=True)
    scored_at: Mapped[datetime | None]
    tier_override: Mapped[str | None] = mapped_column(String(16))
    tier_override_reason: Mapped[str | None] = mapped_column(Text)
    tier_override_expires_at: Mapped[datetime | None]
    tier_change_seq: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # Hysteresis state of the tier the data gives (before any override): the tier held and how
    # many consecutive evaluations have pointed below it.
    computed_tier: Mapped[str | None] = mapped_column(String(16))
    tier_demotion_count: Mapped[int] = mapped_column(SmallInteger, server_default=text("0"))
    # When the last score snapshot was written (the portfolio pass skips unchanged accounts).
    snapshot_at: Mapped[datetime | None]
    # The population facts (``population_fits.id``) the stored figures were computed with: a
    # portfolio pass that fitted newer ones rescores an account a concurrent rescore wrote with
    # older ones.
    population_fit_id: Mapped[int | None] = mapped_column(BigInteger)
    # The population generation the computed tier was decided in; None for a tier given for the
    # first time. Hysteresis holds only tiers of the current generation (see scoring).
    tier_basis: Mapped[int | None] = mapped_column(Integer)
    # Figures of the newest snapshot that the worklist shows and sorts by, kept on the row so
    # that a list never joins every account's latest snapshot: the 12 months' revenue and gross
    # profit, the first risk reason in words, and risk times gross profit (the worklist order).
    revenue_12m: Mapped[float | None] = mapped_column(Double)
    gross_profit_12m: Mapped[float | None] = mapped_column(Double)
    first_risk_driver: Mapped[str | None] = mapped_column(Text)
    gross_profit_at_risk: Mapped[float | None] = mapped_column(
        Double, Computed("risk_probability * gross_profit_12m", persisted=True)
    )

    source_version: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    __table_args__ = (
        CheckConstraint("strategic_fit BETWEEN 1 AND 5", name="strategic_fit_range"),
        CheckConstraint("status IN ('active', 'lost')", name="status_valid"),
        # The worklist's order, largest expected gross profit at risk first, unscored last.
        Index(
            "ix_accounts_worklist",
            text("coalesce(gross_profit_at_risk, -1) DESC"),
            "id",
        ),
    )


class PortfolioSummary(Base):
    """What the portfolio pages show that would otherwise be aggregated from every order on
    every view, written by each portfolio pass (``services.scorer.summary``): one row for every
    account (scope ``all``) and one per manager (``manager:<id>``), as of ``computed_at``."""

    __tablename__ = "portfolio_summaries"

    scope: Mapped[str] = mapped_column(String(64), primary_key=True)
    manager_id: Mapped[int | None] = mapped_column(BigInteger)
    computed_at: Mapped[datetime]
    figures: Mapped[dict[str, Any]]
    # The accounts lost in the window, apart: only the defection page reads them.
    lost: Mapped[list[Any]]


# Numbers every change to an account's data, across all accounts: a later change always has a
# larger number, even after the account's dirty mark was removed and written anew.
ACCOUNT_CHANGES = Sequence("account_changes_seq", metadata=Base.metadata)


class DirtyAccount(Base):
    """The scorer's to-do list: an account is dirty while it has a row here.

    Written in the transaction that accepts an event for the account. ``seq`` takes a new number
    from ``account_changes_seq`` with every such event, so a rescore removes the row only if
    nothing arrived while it ran, and stored aggregates can tell whether they include the
    account's latest change. A narrow table of its own keeps this hot-path write off the wide,
    many-indexed ``accounts`` rows.
    """

    __tablename__ = "dirty_accounts"

    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(BigInteger, server_default=ACCOUNT_CHANGES.next_value())
    since: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)


class Contact(Base):
    """A person at an account. Name, email, phone, address, gender and birth year are PII."""

    __tablename__ = "contacts"

    id: Mapped[int] = _pk()
    external_id: Mapped[str] = mapped_column(String(EXTERNAL_ID_LENGTH), unique=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str | None] = mapped_column(String(200))
    role: Mapped[str | None] = mapped_column(String(32))
    email: Mapped[str | None] = mapped_column(String(320))
    phone: Mapped[str | None] = mapped_column(String(64))
    address: Mapped[str | None] = mapped_column(Text)
    gender: Mapped[str | None] = mapped_column(String(32))
    birth_year: Mapped[int | None] = mapped_column(SmallInteger)
    erased_at: Mapped[datetime | None]
    source_version: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class Order(Base):
    """An order: net ``amount`` and ``cost`` give gross profit; ``lines`` carry the categories."""

    __tablename__ = "orders"

    id: Mapped[int] = _pk()
    external_id: Mapped[str] = mapped_column(String(EXTERNAL_ID_LENGTH), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    ordered_at: Mapped[datetime]
    amount: Mapped[Decimal]
    cost: Mapped[Decimal | None]
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16))
    # [{category, quantity, amount}]; kept with the order so an update replaces them atomically.
    lines: Mapped[list[Any]] = mapped_column(server_default=text("'[]'::jsonb"))
    source_version: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    __table_args__ = (
        Index("ix_orders_account_id_ordered_at", "account_id", "ordered_at"),
        CheckConstraint("status IN ('placed', 'cancelled', 'returned')", name="status_valid"),
    )


class Interaction(Base):
    """A touch point: a call, email, visit, seminar, complaint or satisfaction survey."""

    __tablename__ = "interactions"

    id: Mapped[int] = _pk()
    external_id: Mapped[str] = mapped_column(String(EXTERNAL_ID_LENGTH), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    contact_id: Mapped[int | None] = mapped_column(
        ForeignKey("contacts.id", ondelete="SET NULL"), index=True
    )
    channel: Mapped[str] = mapped_column(String(16))
    direction: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16))
    occurred_at: Mapped[datetime]
    satisfaction: Mapped[int | None] = mapped_column(SmallInteger)
    summary: Mapped[str | None] = mapped_column(Text)
    source_version: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    __table_args__ = (
        Index("ix_interactions_account_id_occurred_at", "account_id", "occurred_at"),
        CheckConstraint("satisfaction BETWEEN 1 AND 5", name="satisfaction_range"),
    )


class Payment(Base):
    """An invoice and its payment; days late derive from ``due_at`` and ``paid_at``."""

    __tablename__ = "payments"

    id: Mapped[int] = _pk()
    invoice_external_id: Mapped[str] = mapped_column(String(EXTERNAL_ID_LENGTH), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    amount: Mapped[Decimal]
    currency: Mapped[str] = mapped_column(String(3))
    due_at: Mapped[datetime]
    paid_at: Mapped[datetime | None]
    source_version: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    __table_args__ = (Index("ix_payments_account_id_due_at", "account_id", "due_at"),)


class IngestEvent(Base):
    """Every accepted event as received, for audit and replay. ``event_id`` makes ingestion
    idempotent: a repeat finds its row and changes nothing."""

    __tablename__ = "ingest_events"

    event_id: Mapped[str] = mapped_column(String(EXTERNAL_ID_LENGTH), primary_key=True)
    type: Mapped[str] = mapped_column(String(16))
    # The account the event is about, by the producer's id: found for export and erasure even
    # when the account row was never created or was deleted.
    account_external_id: Mapped[str | None] = mapped_column(String(EXTERNAL_ID_LENGTH), index=True)
    status: Mapped[str] = mapped_column(String(16))
    # None once the retention period has passed: the hash and the metadata stay.
    payload: Mapped[dict[str, Any] | None]
    # SHA-256 of the body's canonical (jsonb) text, stored when the body is rewritten (erased or
    # expired); until then it is taken from the body. A reused event_id is told from a repeat
    # by it (services/api/ingest/reuse.py).
    body_hash: Mapped[bytes | None] = mapped_column(LargeBinary)
    # The key that sent it. Not a foreign key: that took a share lock on the key's one row for
    # every event, and producers sharing a key queued on it. Keys are revoked, never deleted.
    api_key_id: Mapped[int | None] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = _created()

    __table_args__ = (
        # A contact's raw events, found for erasure without reading every event.
        Index(
            "ix_ingest_events_contact",
            text("(payload ->> 'external_id')"),
            postgresql_where=text("type = 'contact'"),
        ),
        Index(
            "ix_ingest_events_interaction_contact",
            text("(payload ->> 'contact_external_id')"),
            postgresql_where=text("type = 'interaction'"),
        ),
    )


class ContactErasure(Base):
    """That a contact's personal data was erased: which contact, when, by which key, and how
    much was erased. It holds no personal data itself."""

    __tablename__ = "contact_erasures"

    id: Mapped[int] = _pk()
    contact_external_id: Mapped[str] = mapped_column(String(EXTERNAL_ID_LENGTH), index=True)
    account_external_id: Mapped[str | None] = mapped_column(String(EXTERNAL_ID_LENGTH))
    api_key_id: Mapped[int | None] = mapped_column(BigInteger)
    fields: Mapped[list[str]] = mapped_column(ARRAY(Text))
    raw_events: Mapped[int]
    interaction_summaries: Mapped[int]
    erased_at: Mapped[datetime] = _created()


class ApiKey(Base):
    """An API key. Only a SHA-256 of the key is kept; ``prefix`` finds the row. A key with a
    ``manager_external_id`` is restricted to that manager's accounts."""

    __tablename__ = "api_keys"

    id: Mapped[int] = _pk()
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(ARRAY(String(32)))
    # When set, the key sees only the accounts of this manager (by the manager's external id).
    manager_external_id: Mapped[str | None] = mapped_column(String(EXTERNAL_ID_LENGTH))
    created_at: Mapped[datetime] = _created()
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class ScoringPolicy(Base):
    """A version of the scoring policy (weights, gates, thresholds). Exactly one is active."""

    __tablename__ = "scoring_policies"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    body: Mapped[dict[str, Any]]
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    comment: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = _created()

    __table_args__ = (
        Index(
            "uq_scoring_policies_one_active", "active", unique=True, postgresql_where=text("active")
        ),
    )


class PopulationFit(Base):
    """Facts about the whole portfolio from the last portfolio pass: profit ranking cut-offs,
    feature percentiles and the retention model's fitted parameters."""

    __tablename__ = "population_fits"

    id: Mapped[int] = _pk()
    policy_version: Mapped[int] = mapped_column(ForeignKey("scoring_policies.version"))
    evaluated_at: Mapped[datetime]
    accounts: Mapped[int] = mapped_column(Integer)
    facts: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = _created()


class AccountAggregate(Base):
    """An account's feature aggregates as of ``as_of``, kept so that the portfolio pass
    aggregates again only the accounts whose data changed or whose windows moved past one of
    their rows.

    ``seq`` is the account's change number the aggregates include (its dirty mark's, or 0);
    ``stale_at`` the first moment a row enters or leaves one of the windows (None: never, until
    new data). ``aggregate_values`` are in the order of ``layout`` (features.AGGREGATES_LAYOUT),
    so rows of an older layout are simply aggregated again.
    """

    __tablename__ = "account_aggregates"

    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(BigInteger)
    layout: Mapped[int] = mapped_column(SmallInteger)
    occasion_window_days: Mapped[int] = mapped_column(SmallInteger, server_default=text("1"))
    as_of: Mapped[datetime]
    stale_at: Mapped[datetime | None]
    aggregate_values: Mapped[list[float | None]] = mapped_column(ARRAY(Double))


class ScoreSnapshot(Base):
    """One evaluation of an account: its features, score, tier, risk and the reasons."""

    __tablename__ = "score_snapshots"

    id: Mapped[int] = _pk()
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    computed_at: Mapped[datetime]
    policy_version: Mapped[int] = mapped_column(ForeignKey("scoring_policies.version"))
    features: Mapped[dict[str, Any]]
    value_score: Mapped[float] = mapped_column(Double)
    tier: Mapped[str] = mapped_column(String(16))
    risk_probability: Mapped[float | None] = mapped_column(Double)
    risk_band: Mapped[str | None] = mapped_column(String(16))
    drivers: Mapped[dict[str, Any]]

    __table_args__ = (
        Index("ix_score_snapshots_account_id_computed_at", "account_id", "computed_at"),
    )


class TierChange(Base):
    """A change of an account's tier; ``seq`` counts the changes of one account from 1."""

    __tablename__ = "tier_changes"

    id: Mapped[int] = _pk()
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    from_tier: Mapped[str | None] = mapped_column(String(16))
    to_tier: Mapped[str] = mapped_column(String(16))
    changed_at: Mapped[datetime]
    reasons: Mapped[dict[str, Any]]
    snapshot_id: Mapped[int | None] = mapped_column(
        ForeignKey("score_snapshots.id", ondelete="SET NULL")
    )

    __table_args__ = (UniqueConstraint("account_id", "seq", name="uq_tier_changes_account_seq"),)


class WebhookEndpoint(Base):
    """A subscriber. ``secret`` signs deliveries; during a rotation ``previous_secret`` signs
    too until ``previous_secret_expires_at``."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    url: Mapped[str] = mapped_column(String(2048))
    description: Mapped[str | None] = mapped_column(Text)
    event_types: Mapped[list[str]] = mapped_column(ARRAY(String(64)))
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    disabled_at: Mapped[datetime | None]
    secret: Mapped[str] = mapped_column(String(128))
    previous_secret: Mapped[str | None] = mapped_column(String(128))
    previous_secret_expires_at: Mapped[datetime | None]
    failing_since: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class WebhookEvent(Base):
    """An event to tell subscribers about; its id is the ``webhook-id`` of every delivery."""

    __tablename__ = "webhook_events"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    account_id: Mapped[int | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="SET NULL"), index=True
    )
    account_seq: Mapped[int | None] = mapped_column(Integer)
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = _created()


class WebhookDelivery(Base):
    """One event to one endpoint; the schedule of its retries lives here, not in Redis."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = _pk()
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id", ondelete="CASCADE"))
    endpoint_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    status: Mapped[str] = mapped_column(String(16), server_default=text("'pending'"))
    attempts: Mapped[int] = mapped_column(SmallInteger, server_default=text("0"))
    next_attempt_at: Mapped[datetime | None]
    last_attempt_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created()

    __table_args__ = (
        UniqueConstraint("event_id", "endpoint_id", name="uq_webhook_deliveries_event_endpoint"),
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
        Index("ix_webhook_deliveries_endpoint_id_created_at", "endpoint_id", "created_at"),
    )


class WebhookAttempt(Base):
    """One try of a delivery: when, the answer's status code, latency and an excerpt."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = _pk()
    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    attempted_at: Mapped[datetime]
    status_code: Mapped[int | None] = mapped_column(SmallInteger)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    response_excerpt: Mapped[str | None] = mapped_column(Text)
