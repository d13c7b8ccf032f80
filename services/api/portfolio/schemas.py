"""Answers of the portfolio API."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum

from pydantic import BaseModel, Field

from shared.enums import RiskBand, Tier


class TierBucket(StrEnum):
    """A tier, or ``unscored`` for accounts the scorer has not evaluated yet."""

    strategic = "strategic"
    key = "key"
    developing = "developing"
    standard = "standard"
    unscored = "unscored"


class TierBandCell(BaseModel):
    tier: TierBucket
    risk_band: str = Field(description="A risk band, or `none` for accounts without a risk.")
    accounts: int


class ParetoPoint(BaseModel):
    share_of_accounts: float = Field(description="The largest accounts so far over all of them.")
    share_of_gross_profit: float = Field(description="Their gross profit over the total.")


class ParetoCurve(BaseModel):
    """The 80/20 curve of the 12 months: accounts ranked by gross profit, largest first."""

    evaluated_at: datetime | None = Field(
        default=None,
        description="As of: the portfolio pass that computed the curve, over the 12 months up "
        "to it; null before the first pass.",
    )
    accounts: int = Field(description="Accounts with gross profit in the window.")
    core_accounts: int = Field(
        description="How many of the largest bring 80% of the gross profit (the profit core)."
    )
    points: list[ParetoPoint] = Field(
        description="The cumulative curve at about 50 ranks, from (0, 0); empty when the total "
        "gross profit is not positive."
    )


class TrendMonth(BaseModel):
    """One calendar month (UTC) of the KPI trend."""

    month: date
    to_date: bool = Field(description="The month is not over yet: its figures are so far.")
    revenue: Decimal = Field(description="Placed orders of the month.")
    gross_profit: Decimal = Field(description="Of those with a known cost.")
    evaluated_accounts: int = Field(description="Accounts with an evaluation in the month.")
    key_accounts: int | None = Field(
        description="Key and strategic by their last evaluation of the month; null without one."
    )
    at_risk_key_accounts: int | None = Field(description="Of those, at high or critical risk.")
    mean_risk_key_accounts: float | None = Field(description="Their mean risk probability.")


class KpiTrend(BaseModel):
    evaluated_at: datetime | None = Field(
        default=None,
        description="As of: the portfolio pass that computed the months; null before the first "
        "pass.",
    )
    months: list[TrendMonth] = Field(description="The last 12 months, oldest first.")


class TierKpi(BaseModel):
    tier: TierBucket
    accounts: int = Field(description="Accounts published with this tier, lost ones included.")
    active_accounts: int = Field(description="Of those, the ones not lost.")
    revenue_12m: Decimal = Field(description="Net amount of their placed orders in the window.")
    gross_profit_12m: Decimal = Field(
        description="Amount minus cost of their placed orders in the window, over the orders "
        "whose cost is known."
    )
    revenue_at_risk_12m: Decimal = Field(
        default=Decimal(0),
        description="Sum over the active accounts of the tier of risk x revenue of the window.",
    )


class Retention(BaseModel):
    """Repeat-purchase retention over the window: of the accounts that placed an order in the
    12 months before the window (`base_accounts`), the share that placed one in the window too
    and are not lost (`retained_accounts`). Null when the base is empty."""

    rate: float | None = Field(examples=[0.875])
    base_accounts: int = Field(description="Accounts with a placed order in the prior 12 months.")
    retained_accounts: int = Field(
        description="Of those, accounts with a placed order in the window and not lost."
    )


class Satisfaction(BaseModel):
    """Satisfaction survey answers in the window (1 very dissatisfied ... 5 very satisfied)."""

    average: float | None = Field(description="Mean answer; null without answers.", examples=[4.2])
    answers: int


class AtRiskAccount(BaseModel):
    external_id: str
    name: str | None
    tier: Tier
    risk_band: RiskBand
    risk_probability: float | None
    manager_external_id: str | None


class AtRiskKeyAccounts(BaseModel):
    """Active key and strategic accounts with risk band high or critical."""

    count: int = Field(description="All of them.")
    accounts: list[AtRiskAccount] = Field(
        description="The riskiest of them, highest risk first (at most 20)."
    )


class ManagerLoad(BaseModel):
    """How many key and strategic accounts a manager looks after, against their capacity."""

    external_id: str
    name: str | None
    capacity: int = Field(description="Key accounts the manager can handle.")
    key_accounts: int = Field(description="Active key and strategic accounts assigned.")
    accounts: int = Field(description="All accounts assigned, of any tier or status.")
    over_capacity: bool = Field(description="`key_accounts` is greater than `capacity`.")


class PortfolioKpis(BaseModel):
    """KPIs over a set of accounts. The window is the 12 months up to `evaluated_at`. Money is
    summed as sent, in the accounts' reporting currency (no conversion)."""

    evaluated_at: datetime = Field(
        description="As of: the last portfolio pass, which computed the window's figures "
        "(revenue, gross profit, retention, satisfaction); the tiers, risks and loads are "
        "those of now. Before the first pass, now."
    )
    window_start: datetime = Field(description="`evaluated_at` minus 12 months.")
    tiers: list[TierKpi] = Field(
        description="One row per tier, strategic first, then `unscored`; every row is present."
    )
    accounts: int
    revenue_12m: Decimal
    gross_profit_12m: Decimal
    key_share_of_gross_profit: float | None = Field(
        description="Gross profit of key and strategic accounts over all gross profit (the "
        "80/20 check); null when total gross profit is not positive.",
        examples=[0.78],
    )
    key_share_of_revenue: float | None = Field(
        description="Revenue of key and strategic accounts over all revenue; null without revenue.",
        examples=[0.61],
    )
    revenue_at_risk_12m: Decimal = Field(
        description="Revenue at risk: the sum over active key and strategic accounts of their "
        "risk probability x their revenue of the window."
    )
    retention: Retention
    satisfaction: Satisfaction
    at_risk_key_accounts: AtRiskKeyAccounts
    tier_band_matrix: list[TierBandCell] = Field(
        description="Active accounts by tier and risk band, every cell present (`none`: no "
        "risk yet)."
    )


class Portfolio(PortfolioKpis):
    managers: list[ManagerLoad] = Field(
        description="Every manager, the most overloaded first (key accounts minus capacity)."
    )
    managers_over_capacity: int
    unassigned_key_accounts: int = Field(
        description="Active key and strategic accounts without a manager."
    )


class ManagerPortfolio(PortfolioKpis):
    """The KPIs over the accounts assigned to one manager, and the manager's load."""

    manager: ManagerLoad


class PortfolioRescore(BaseModel):
    """The pass was handed to the scorer."""

    queued: bool


class LostAccount(BaseModel):
    external_id: str
    name: str | None
    churn_reason: str | None
    tier: Tier | None = Field(description="The tier published when it was lost.")
    manager_external_id: str | None
    lost_at: datetime = Field(description="When the account was first sent as lost.")
    revenue_12m_lost: Decimal = Field(description="Its placed orders of the 12 months before.")
    risk_30d_before: float | None = Field(
        description="The risk KAM showed 30 days before it was lost; null: no evaluation with a "
        "risk by then."
    )
    risk_90d_before: float | None
    risk_180d_before: float | None


class ChurnReason(BaseModel):
    reason: str = Field(description="The churn reason as recorded, or `not recorded`.")
    accounts: int
    revenue_12m_lost: Decimal


class Defections(BaseModel):
    """Accounts lost in the 12 months up to `evaluated_at`, their reasons, and whether KAM saw
    it coming (the risk it showed 30, 90 and 180 days before)."""

    evaluated_at: datetime
    window_start: datetime
    lost_accounts: int
    revenue_12m_lost: Decimal
    reasons: list[ChurnReason] = Field(description="By revenue lost, largest first.")
    accounts: list[LostAccount] = Field(description="The most recently lost first.")
