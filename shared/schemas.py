"""Pydantic schemas of the events producers send.

Every model forbids unknown fields, so a client can never set tier, risk or scores; every string
refuses NUL characters and has a length bound, and every number has a range, so what passes
validation always fits its column.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

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
from shared.models import EXTERNAL_ID_LENGTH

_NO_CONTROL = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f]*$"


def _text(max_length: int, min_length: int = 0) -> object:
    return StringConstraints(min_length=min_length, max_length=max_length, pattern=_NO_CONTROL)


ExternalId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=EXTERNAL_ID_LENGTH, pattern=r"^[^\x00-\x1f\x7f]+$"),
    Field(
        description="The producer's identifier, 1-128 printable characters.", examples=["A-1001"]
    ),
]
EventId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=EXTERNAL_ID_LENGTH, pattern=r"^[^\x00-\x1f\x7f]+$"),
    Field(
        description="Client-chosen id of this event (at most 128 characters). Sending the same "
        "event_id again is acknowledged as a duplicate and changes nothing.",
        examples=["erp-2026-11-23-000123"],
    ),
]
ShortText = Annotated[str, _text(100, 1)]
Name = Annotated[str, _text(300, 1)]
LongText = Annotated[str, _text(4000)]
Currency = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Z]{3}$"),
    Field(description="ISO 4217 code.", examples=["EUR"]),
]


def _plain_decimal(value: Any) -> Any:
    # Python's Decimal reads "1_000" as 1000 and " 1.00 " as 1.00; a decimal string must be
    # ASCII digits with an optional point and fraction, nothing else. (Plain string checks:
    # a regular expression cost four times as much, on every amount of every order.)
    if isinstance(value, str):
        whole, point, fraction = value.partition(".")
        if whole[:1] == "-":
            whole = whole[1:]
        if not (
            whole.isascii()
            and whole.isdigit()
            and (not point or (fraction.isascii() and fraction.isdigit()))
        ):
            raise ValueError(
                "a decimal is digits with an optional point and fraction, e.g. 1250.00"
            )
    return value


def _decimal_schema(whole_digits: int, places: int) -> WithJsonSchema:
    """The documented form of a non-negative decimal, in standard JSON Schema words (pydantic
    writes its own ``ge``/``max_digits`` beside an ``anyOf``, which schema tools ignore)."""
    largest = Decimal(10**whole_digits) - Decimal(1).scaleb(-places)
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": float(largest)},
                {
                    "type": "string",
                    "pattern": f"^[0-9]{{1,{whole_digits}}}(\\.[0-9]{{1,{places}}})?$",
                },
            ]
        }
    )


# The plain-decimal check wraps the constrained decimal (after ``Field`` in the annotation):
# placed before it, pydantic checks the digits and places in Python instead of its core, four
# times slower (100,000 amounts: 0.57 s against 0.15 s), a fifth of a 500-order batch's time.
Amount = Annotated[
    Decimal,
    Field(ge=0, max_digits=14, decimal_places=2, allow_inf_nan=False, examples=["1250.00"]),
    BeforeValidator(_plain_decimal),
    _decimal_schema(12, 2),
]
Quantity = Annotated[
    Decimal,
    Field(ge=0, max_digits=14, decimal_places=3, allow_inf_nan=False),
    BeforeValidator(_plain_decimal),
    _decimal_schema(11, 3),
]
Email = Annotated[
    str,
    StringConstraints(max_length=320, pattern=r"^[^@\s\x00-\x1f]+@[^@\s\x00-\x1f]+$"),
]


def _rfc3339_text(value: Any) -> Any:
    # Lax pydantic would read a bare number as a Unix time; the schema promises a string.
    if not isinstance(value, str | datetime):
        raise ValueError("a date-time string with a UTC offset is required")
    return value


def _plausible_year(value: datetime) -> datetime:
    # Postgres and the scoring windows need a real calendar time: year 1 minus an offset is not.
    if MIN_YEAR < value.year < MAX_YEAR:
        # An offset is under a day, so the UTC year is within one of the local year: no need
        # for the conversion, which costs more than the rest of a timestamp's validation.
        return value
    try:
        year = value.astimezone(UTC).year
    except OverflowError:
        year = 0
    if not MIN_YEAR <= year <= MAX_YEAR:
        raise ValueError(f"the year must be between {MIN_YEAR} and {MAX_YEAR}")
    return value


MIN_YEAR, MAX_YEAR = 1900, 2200

Timestamp = Annotated[
    AwareDatetime,
    BeforeValidator(_rfc3339_text),
    AfterValidator(_plausible_year),
    Field(
        description="RFC 3339 date-time with a UTC offset, in the years 1900-2200.",
        examples=["2026-11-23T09:30:00Z"],
    ),
]


def _whole_number(value: Any) -> Any:
    # JSON has one kind of number: 7.0 is the integer 7 to JSON Schema and to many producers.
    # Strings and booleans stay refused.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer, also when sent as 7.0: ``Annotated[StrictInt, Field(ge=.., le=..), WHOLE]``. The
# bounds come before it, so they apply to the integer and the schema states them as standard
# ``minimum``/``maximum`` (after it, pydantic writes its own ``ge``/``le``).
WHOLE = BeforeValidator(_whole_number)


# The largest integer every JSON parser reads exactly (a double's 53-bit mantissa); larger ones
# turn into neighbouring numbers in many clients. updated_at in microseconds stays far below it.
MAX_VERSION = 2**53 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The stored version of an entity whose events carried none; any real version is newer.
UNVERSIONED = -1


def shown_version(stored: int | None) -> int | None:
    """A stored version as the read API shows it: none for a stub or unversioned entity."""
    return None if stored is None or stored == UNVERSIONED else stored


# At most one of the two: not both.
_AT_MOST_ONE_VERSION = {"not": {"required": ["version", "updated_at"]}}


def _versioned_schema(
    example: dict[str, Any] | None = None, *, rule: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Schema extras of a versioned event: the at-most-one-version rule, the event's own
    ``rule`` (an if/then), and an example."""
    extra: dict[str, Any] = dict(_AT_MOST_ONE_VERSION)
    if rule is not None:
        extra |= rule
    if example is not None:
        extra["examples"] = [example]
    return extra


# satisfaction only on surveys, churn_reason only on lost accounts: the same rules as the
# models' checks, said in JSON Schema so that clients and schema tools know them too.
_SATISFACTION_ONLY_FOR_SURVEYS = {
    "if": {"required": ["kind"], "properties": {"kind": {"not": {"const": "survey"}}}},
    "then": {"properties": {"satisfaction": {"type": "null"}}},
}
_CHURN_REASON_ONLY_WHEN_LOST = {
    "if": {"not": {"required": ["status"], "properties": {"status": {"const": "lost"}}}},
    "then": {"properties": {"churn_reason": {"type": "null"}}},
}


def _not_null(value: Any) -> Any:
    # A field check, not a model one: a model "before" check is handed the whole event as a
    # Python dict, which made validating a batch from its JSON a quarter slower.
    if value is None:
        raise ValueError("must not be null; leave it out instead")
    return value


class StrictModel(BaseModel):
    """Base of every request body: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class Versioned(StrictModel):
    """An event that may carry the producer's version of the entity it describes.

    Give at most one of ``version`` (a number that grows with every change) or ``updated_at``
    (the time of the change at the source). An event whose version is not newer than the one
    already applied is stored for audit but changes nothing (``stale``). An event with neither
    is applied as it arrives (of two such events, the one received later wins) and leaves the
    stored version as it was; so, when a producer mixes the two, a versioned event is still
    compared with the newest version applied before, even if an unversioned one came between.
    """

    model_config = ConfigDict(json_schema_extra=_versioned_schema())

    event_id: EventId
    # Left out, a version is None; sent as null, it is an error. The default is not validated,
    # so the check runs on a sent value alone.
    version: Annotated[
        Annotated[StrictInt, Field(ge=0, le=MAX_VERSION), WHOLE] | SkipJsonSchema[None],
        BeforeValidator(_not_null),
        Field(description="Producer version of the entity.", examples=[7]),
    ] = None
    updated_at: Annotated[
        Timestamp | SkipJsonSchema[None],
        BeforeValidator(_not_null),
        Field(description="Time of the change at the source, instead of version."),
    ] = None

    @model_validator(mode="after")
    def _one_version(self) -> Self:
        if self.version is not None and self.updated_at is not None:
            raise ValueError("give at most one of version or updated_at")
        return self

    @property
    def source_version(self) -> int:
        """The version as one comparable integer: ``updated_at`` counts in microseconds, and
        an event with neither is ``UNVERSIONED``."""
        if self.version is not None:
            return self.version
        if self.updated_at is None:
            return UNVERSIONED
        return max(0, (self.updated_at - _EPOCH) // timedelta(microseconds=1))


class AccountData(Versioned):
    """Master data of an account (the body of ``PUT /v1/accounts/{external_id}``)."""

    model_config = ConfigDict(
        json_schema_extra=_versioned_schema(
            rule=_CHURN_REASON_ONLY_WHEN_LOST,
            example={
                "event_id": "crm-acc-A-1001-v3",
                "version": 3,
                "name": "Nordwerk GmbH",
                "industry": "Machinery",
                "region": "DACH",
                "segment": "Enterprise",
                "parent_external_id": "G-NORDWERK",
                "manager_external_id": "M-7",
                "credit_limit": "250000.00",
                "payment_terms_days": 30,
                "strategic_fit": 4,
                "status": "active",
            },
        )
    )

    name: Name
    industry: ShortText | None = None
    region: ShortText | None = None
    segment: ShortText | None = None
    parent_external_id: ExternalId | None = Field(
        default=None, description="The group this account belongs to; groups roll up subsidiaries."
    )
    manager_external_id: ExternalId | None = Field(
        default=None, description="The key-account manager looking after it."
    )
    credit_limit: Amount | None = None
    payment_terms_days: Annotated[StrictInt, Field(ge=0, le=365), WHOLE] | None = None
    strategic_fit: Annotated[StrictInt, Field(ge=1, le=5), WHOLE] | None = Field(
        default=None, description="Manager judgement of strategic fit, 1 (low) to 5."
    )
    status: AccountStatus = AccountStatus.active
    churn_reason: LongText | None = Field(
        default=None, description="Why the account was lost; only with status lost."
    )

    @model_validator(mode="after")
    def _churn_reason_only_when_lost(self) -> Self:
        if self.churn_reason is not None and self.status is not AccountStatus.lost:
            raise ValueError("churn_reason is only allowed with status lost")
        return self


class ManagerData(Versioned):
    """A key-account manager (the body of ``PUT /v1/managers/{external_id}``)."""

    model_config = ConfigDict(
        json_schema_extra=_versioned_schema(
            {
                "event_id": "hr-mgr-M-7-v1",
                "version": 1,
                "name": "Kim Berger",
                "email": "kim.berger@example.com",
                "capacity": 9,
            }
        )
    )

    name: Name
    email: Email | None = None
    capacity: Annotated[StrictInt, Field(ge=0, le=1000), WHOLE] = Field(
        default=9, description="Key accounts they can handle."
    )


class OrderLine(StrictModel):
    category: ShortText
    quantity: Quantity
    amount: Amount


class OrderData(Versioned):
    """An order. A later event for the same ``external_id`` (higher version) updates it."""

    model_config = ConfigDict(
        json_schema_extra=_versioned_schema(
            {
                "event_id": "erp-ord-SO-55120-v1",
                "version": 1,
                "external_id": "SO-55120",
                "account_external_id": "A-1001",
                "ordered_at": "2026-11-20T10:15:00Z",
                "amount": "18400.00",
                "cost": "12900.00",
                "currency": "EUR",
                "status": "placed",
                "lines": [{"category": "spare parts", "quantity": "40", "amount": "18400.00"}],
            }
        )
    )

    external_id: ExternalId
    account_external_id: ExternalId
    ordered_at: Timestamp
    amount: Amount = Field(description="Net amount.")
    cost: Amount | None = Field(default=None, description="Cost of goods; gives gross profit.")
    currency: Currency
    status: OrderStatus = OrderStatus.placed
    lines: list[OrderLine] = Field(default_factory=list, max_length=1000)


class ContactData(Versioned):
    """A person at an account. Everything but ``role`` is personal data."""

    model_config = ConfigDict(
        json_schema_extra=_versioned_schema(
            {
                "event_id": "crm-contact-C-88-v2",
                "version": 2,
                "external_id": "C-88",
                "account_external_id": "A-1001",
                "name": "Erika Muster",
                "role": "decision_maker",
                "email": "erika.muster@example.com",
                "phone": "+49 30 1234567",
            }
        )
    )

    external_id: ExternalId
    account_external_id: ExternalId
    name: Name | None = None
    role: ContactRole | None = None
    email: Email | None = None
    phone: Annotated[str, StringConstraints(max_length=64, pattern=r"^[0-9+()./ \-x]*$")] | None = (
        None
    )
    address: LongText | None = None
    gender: ShortText | None = None
    birth_year: Annotated[StrictInt, Field(ge=1900, le=2100), WHOLE] | None = None


class InteractionData(Versioned):
    """A contact with the account; ``satisfaction`` (1 very dissatisfied ... 5 very satisfied)
    belongs to surveys only."""

    model_config = ConfigDict(
        json_schema_extra=_versioned_schema(
            rule=_SATISFACTION_ONLY_FOR_SURVEYS,
            example={
                "event_id": "cc-survey-77120",
                "updated_at": "2026-11-21T08:02:11Z",
                "external_id": "SURVEY-77120",
                "account_external_id": "A-1001",
                "contact_external_id": "C-88",
                "channel": "email",
                "direction": "inbound",
                "kind": "survey",
                "occurred_at": "2026-11-21T08:00:00Z",
                "satisfaction": 2,
                "summary": "Delivery times got worse this quarter.",
            },
        )
    )

    external_id: ExternalId
    account_external_id: ExternalId
    contact_external_id: ExternalId | None = None
    channel: Channel
    direction: Direction
    kind: InteractionKind
    occurred_at: Timestamp
    satisfaction: Annotated[StrictInt, Field(ge=1, le=5), WHOLE] | None = None
    summary: LongText | None = None

    @model_validator(mode="after")
    def _satisfaction_only_for_surveys(self) -> Self:
        if self.satisfaction is not None and self.kind is not InteractionKind.survey:
            raise ValueError("satisfaction is only allowed on kind survey")
        return self


class PaymentData(Versioned):
    """An invoice of an account and, once paid, when. A later event updates the invoice."""

    model_config = ConfigDict(
        json_schema_extra=_versioned_schema(
            {
                "event_id": "fin-inv-2026-4411-v2",
                "version": 2,
                "invoice_external_id": "INV-2026-4411",
                "account_external_id": "A-1001",
                "amount": "18400.00",
                "currency": "EUR",
                "due_at": "2026-12-20T00:00:00Z",
                "paid_at": "2026-12-29T00:00:00Z",
            }
        )
    )

    invoice_external_id: ExternalId
    account_external_id: ExternalId
    amount: Amount
    currency: Currency
    due_at: Timestamp
    paid_at: Timestamp | None = None


# Items of the mixed batch: the same fields plus a ``type`` (and the path ids in the body).


class AccountEvent(AccountData):
    model_config = ConfigDict(  # examples: /v1/events
        json_schema_extra=_versioned_schema(rule=_CHURN_REASON_ONLY_WHEN_LOST)
    )

    type: Literal["account"]
    external_id: ExternalId

    @model_validator(mode="after")
    def _not_own_parent(self) -> Self:
        if self.parent_external_id == self.external_id:
            raise ValueError("an account cannot be its own parent")
        return self


class ManagerEvent(ManagerData):
    model_config = ConfigDict(json_schema_extra=_versioned_schema())  # examples: /v1/events

    type: Literal["manager"]
    external_id: ExternalId


class OrderEvent(OrderData):
    model_config = ConfigDict(json_schema_extra=_versioned_schema())  # examples: /v1/events

    type: Literal["order"]


class ContactEvent(ContactData):
    model_config = ConfigDict(json_schema_extra=_versioned_schema())  # examples: /v1/events

    type: Literal["contact"]


class InteractionEvent(InteractionData):
    model_config = ConfigDict(  # examples: /v1/events
        json_schema_extra=_versioned_schema(rule=_SATISFACTION_ONLY_FOR_SURVEYS)
    )

    type: Literal["interaction"]


class PaymentEvent(PaymentData):
    model_config = ConfigDict(json_schema_extra=_versioned_schema())  # examples: /v1/events

    type: Literal["payment"]


Event = Annotated[
    AccountEvent | ManagerEvent | OrderEvent | ContactEvent | InteractionEvent | PaymentEvent,
    Field(discriminator="type"),
]


# --------------------------------------------------------------------------------------------
# Scoring results (read side)
# --------------------------------------------------------------------------------------------


class TierMove(BaseModel):
    """How many accounts would go from one tier to another (``from_tier`` None: never scored)."""

    from_tier: Tier | None
    to_tier: Tier
    accounts: int


class BandMove(BaseModel):
    """How many accounts would go from one risk band to another (None: no band, e.g. no order
    yet or lost)."""

    from_band: RiskBand | None
    to_band: RiskBand | None
    accounts: int


class MovedAccount(BaseModel):
    """One account the draft would move, with the draft's main reason for its tier."""

    external_id: str
    name: str | None
    from_tier: Tier | None
    to_tier: Tier
    from_band: RiskBand | None
    to_band: RiskBand | None
    reason: str | None = Field(description="The first reason the draft gives for its tier.")


class TierFigures(BaseModel):
    """Accounts, 12-month revenue and gross profit of one tier."""

    accounts: int
    revenue_12m: float
    gross_profit_12m: float


class ManagerLoad(BaseModel):
    """A manager's key and strategic accounts against capacity (``manager`` None: accounts with
    no manager)."""

    manager: str | None
    name: str | None
    capacity: int | None
    key_accounts: int
    over_capacity: bool


class PortfolioKpis(BaseModel):
    """The portfolio under one policy: figures per tier, the share of gross profit from key and
    strategic accounts, and each manager's key-account load."""

    tiers: dict[Tier, TierFigures]
    key_profit_share: float | None = Field(
        description="Gross profit of key + strategic accounts over all gross profit (0-1)."
    )
    managers: list[ManagerLoad]


class PolicyPreview(BaseModel):
    """What a draft policy would do to the portfolio as it stands, without writing anything.

    Both sides are evaluated at the same moment, from the same stored state, with the same
    hysteresis step: the *current* side under the active policy, the *draft* side under the
    draft (overrides applied as the scorer would). So previewing the active policy moves
    nothing, and every listed move is the draft's doing. Only moves between different tiers or
    bands are counted; ``unchanged_*`` counts the rest. ``moved_accounts`` is one page of the
    accounts whose tier moves (``moved_total`` in all). ``exact`` is False when a part of the
    draft could not be re-derived (``notes`` says which).
    """

    accounts: int
    evaluated_at: datetime
    tier_moves: list[TierMove]
    band_moves: list[BandMove]
    unchanged_tier: int
    unchanged_band: int
    tiers_now: dict[Tier, int]
    tiers_draft: dict[Tier, int]
    kpis_now: PortfolioKpis
    kpis_draft: PortfolioKpis
    moved_accounts: list[MovedAccount]
    moved_total: int
    offset: int
    limit: int
    exact: bool
    notes: list[str]
