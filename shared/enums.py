"""Enumerations of the domain, shared by schemas, models and the scorer."""

from enum import StrEnum


class Tier(StrEnum):
    """Key-account status, from most to least important."""

    strategic = "strategic"
    key = "key"
    developing = "developing"
    standard = "standard"


class RiskBand(StrEnum):
    low = "low"
    medium = "medium"
    high = "high"
    critical = "critical"


class AccountStatus(StrEnum):
    active = "active"
    lost = "lost"


class OrderStatus(StrEnum):
    placed = "placed"
    cancelled = "cancelled"
    returned = "returned"


class Channel(StrEnum):
    phone = "phone"
    email = "email"
    call_center = "call_center"
    web = "web"
    meeting = "meeting"
    visit = "visit"
    seminar = "seminar"
    sales_center = "sales_center"


class Direction(StrEnum):
    inbound = "inbound"
    outbound = "outbound"


class InteractionKind(StrEnum):
    communication = "communication"
    complaint = "complaint"
    survey = "survey"


class ContactRole(StrEnum):
    decision_maker = "decision_maker"
    influencer = "influencer"
    buyer = "buyer"
    user = "user"
    gatekeeper = "gatekeeper"
    other = "other"


class EventType(StrEnum):
    """The ``type`` of an item in a mixed batch (``POST /v1/events``)."""

    account = "account"
    order = "order"
    contact = "contact"
    interaction = "interaction"
    payment = "payment"
    manager = "manager"


class ItemStatus(StrEnum):
    """What happened to one ingested event."""

    accepted = "accepted"  # stored and applied
    stale = "stale"  # stored, but an equal or newer version of the entity was already applied
    duplicate = "duplicate"  # this event_id was seen before; nothing changed
    rejected = "rejected"  # invalid; nothing stored


class Scope(StrEnum):
    """API key scopes. ``admin`` grants every other scope."""

    events_write = "events:write"
    accounts_read = "accounts:read"
    pii_read = "pii:read"
    pii_erase = "pii:erase"
    webhooks_manage = "webhooks:manage"
    policy_write = "policy:write"
    tiers_override = "tiers:override"
    admin = "admin"


class DeliveryStatus(StrEnum):
    pending = "pending"
    succeeded = "succeeded"
    failed = "failed"


class WebhookEventType(StrEnum):
    account_tier_changed = "account.tier_changed"
    account_risk_band_changed = "account.risk_band_changed"
    webhook_test = "webhook.test"
