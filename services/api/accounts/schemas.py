"""Resources of the account read API."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel, Field

from shared.enums import (
    AccountStatus,
    Channel,
    ContactRole,
    Direction,
    InteractionKind,
    OrderStatus,
    RiskBand,
    Tier,
)


class Score(BaseModel):
    """The scorer's current view of the account; empty until it was first scored."""

    tier: Tier | None = None
    tier_since: datetime | None = None
    value_score: float | None = Field(default=None, description="Key-account value, 0-100.")
    risk_probability: float | None = Field(
        default=None, description="Probability of no order within the policy horizon."
    )
    risk_band: RiskBand | None = None
    scored_at: datetime | None = None
    tier_override: Tier | None = None
    tier_override_reason: str | None = None
    tier_override_expires_at: datetime | None = None


class Counts(BaseModel):
    orders: int
    contacts: int
    interactions: int
    payments: int


class AccountSummary(BaseModel):
    external_id: str
    name: str | None
    industry: str | None
    region: str | None
    segment: str | None
    status: AccountStatus
    stub: bool = Field(description="True while only other events have named the account.")
    manager_external_id: str | None
    parent_external_id: str | None
    tier: Tier | None
    risk_band: RiskBand | None
    risk_probability: float | None
    value_score: float | None


class AccountOut(AccountSummary):
    credit_limit: Decimal | None
    payment_terms_days: int | None
    strategic_fit: int | None
    churn_reason: str | None
    version: int | None = Field(description="The producer version last applied.")
    counts: Counts
    score: Score
    created_at: datetime
    updated_at: datetime


class AccountPage(BaseModel):
    items: list[AccountSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at end.")


class OrderLineOut(BaseModel):
    category: str
    quantity: Decimal
    amount: Decimal


class OrderOut(BaseModel):
    external_id: str
    ordered_at: datetime
    amount: Decimal
    cost: Decimal | None
    currency: str
    status: OrderStatus
    lines: list[OrderLineOut]
    version: int


class OrderPage(BaseModel):
    items: list[OrderOut]
    next_cursor: str | None


class InteractionOut(BaseModel):
    external_id: str
    contact_external_id: str | None
    channel: Channel
    direction: Direction
    kind: InteractionKind
    occurred_at: datetime
    satisfaction: int | None
    summary: str | None
    version: int


class InteractionPage(BaseModel):
    items: list[InteractionOut]
    next_cursor: str | None


class ContactOut(BaseModel):
    """A contact. The personal fields are present only for keys with `pii:read`."""

    external_id: str
    role: ContactRole | None
    erased: bool
    name: str | None = None
    email: str | None = None
    phone: str | None = None
    address: str | None = None
    gender: str | None = None
    birth_year: int | None = None
    version: int | None


class ContactPage(BaseModel):
    items: list[ContactOut]
    next_cursor: str | None
    pii_included: bool = Field(description="Whether personal fields were included.")
