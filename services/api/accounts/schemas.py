"""Resources of the account read API."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
from shared.schemas import Timestamp

DRIVERS_DESCRIPTION = (
    "Why the scorer decided as it did, as written by the scorer: `tier`, `value` and `risk` "
    "are lists of reasons, each with a `code` and a `text` a manager can read (tier reasons may "
    "carry the `value` and the `limit` it was held against; value and risk reasons their "
    "`contribution`); `summary` states the risk in words; `hysteresis` (also first among the "
    "tier reasons) and `override` appear when they decided the tier. Read it as "
    "an open JSON object: new keys may appear."
)
DRIVERS_EXAMPLE: dict[str, Any] = {
    "tier": [
        {
            "code": "margin_below_floor",
            "text": "gross margin 9% below 12%",
            "value": 0.09,
            "limit": 0.12,
        }
    ],
    "value": [{"code": "revenue", "text": "revenue 12m in the top 5%", "contribution": 21.3}],
    "risk": [
        {"code": "recency", "text": "no order for 143 days, usual gap 30", "contribution": 0.9}
    ],
}
FEATURES_DESCRIPTION = (
    "The inputs the account was scored on, by name (revenue_12m, margin_rate, "
    "days_since_last_order...): numbers, or null when unknown. An open JSON object."
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
    drivers: dict[str, Any] | None = Field(
        default=None,
        description=DRIVERS_DESCRIPTION + " From the latest score snapshot.",
        examples=[DRIVERS_EXAMPLE],
    )


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
    revenue_12m: float | None = Field(
        default=None, description="Net revenue of the 12 months, as of the latest evaluation."
    )
    gross_profit_12m: float | None = Field(
        default=None, description="Gross profit of the 12 months, as of the latest evaluation."
    )
    gross_profit_at_risk: float | None = Field(
        default=None,
        description="Expected gross profit at risk: `risk_probability` x `gross_profit_12m` "
        "(null until the account is scored).",
    )
    first_risk_driver: str | None = Field(
        default=None, description="The strongest reason behind the risk, in words."
    )


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


class AccountSort(StrEnum):
    """The order of `GET /v1/accounts`."""

    id = "id"
    risk = "risk"
    gross_profit_at_risk = "gross_profit_at_risk"


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
    version: int | None = Field(description="The producer version; none if it sent none.")


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
    summary: str | None = Field(description="Free text; only for keys with `pii:read`.")
    version: int | None = Field(description="The producer version; none if it sent none.")


class InteractionPage(BaseModel):
    items: list[InteractionOut]
    next_cursor: str | None
    pii_included: bool = Field(description="Whether the free-text summaries were included.")


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


class SnapshotOut(BaseModel):
    """One evaluation of the account by the scorer."""

    computed_at: datetime
    policy_version: int = Field(description="The scoring-policy version it was scored with.")
    value_score: float = Field(description="Key-account value, 0-100.")
    tier: Tier = Field(description="The tier published by this evaluation.")
    risk_probability: float | None = Field(
        description="Probability of no order within the policy horizon."
    )
    risk_band: RiskBand | None
    drivers: dict[str, Any] = Field(description=DRIVERS_DESCRIPTION, examples=[DRIVERS_EXAMPLE])
    features: dict[str, Any] = Field(
        description=FEATURES_DESCRIPTION,
        examples=[{"revenue_12m": 412000.0, "margin_rate": 0.21, "days_since_last_order": 12}],
    )


class SnapshotPage(BaseModel):
    items: list[SnapshotOut]
    next_cursor: str | None


class TierChangeOut(BaseModel):
    """A change of the account's published tier."""

    seq: int = Field(description="Counts the account's tier changes from 1; never reused.")
    from_tier: Tier | None = Field(description="Null for the account's first tier.")
    to_tier: Tier
    changed_at: datetime
    reasons: dict[str, Any] = Field(
        description="Why it changed, in the same shape as a snapshot's drivers.",
        examples=[DRIVERS_EXAMPLE],
    )


class TierChangePage(BaseModel):
    items: list[TierChangeOut]
    next_cursor: str | None


class TierOverrideIn(BaseModel):
    """A manager's decision to pin the account's tier."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "tier": "key",
                    "reason": "Framework contract signed for 2027; volumes start in Q2.",
                    "expires_at": "2027-06-30T00:00:00Z",
                }
            ]
        },
    )

    tier: Tier
    reason: str = Field(
        min_length=1,
        max_length=500,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Why, in words the next reader understands (1-500 characters).",
    )
    expires_at: Timestamp | None = Field(
        default=None,
        description="When the override lapses and the scored tier applies again; must be in "
        "the future. Omit for an override that holds until it is lifted.",
        examples=["2030-06-30T00:00:00Z"],
    )

    @field_validator("reason")
    @classmethod
    def _not_blank(cls, reason: str) -> str:
        if not reason.strip():
            raise ValueError("the reason must not be blank")
        return reason

    @field_validator("expires_at")
    @classmethod
    def _in_future(cls, expires_at: datetime | None) -> datetime | None:
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise ValueError("expires_at must be in the future")
        return expires_at


class TierOverride(BaseModel):
    tier: Tier
    reason: str
    expires_at: datetime | None


class TierOverrideState(BaseModel):
    """The account's override and its published tier (which follows the override once the
    account has been rescored, usually within seconds)."""

    external_id: str
    tier: Tier | None = Field(description="The tier published now.")
    override: TierOverride | None = Field(description="Null when no override is set.")
