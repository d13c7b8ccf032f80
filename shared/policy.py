"""The scoring policy: every weight, gate and threshold the engine uses, with sensible defaults.

The policy is stored as versioned JSON (``scoring_policies.body``); the version lives beside the
body, not in it, so that two bodies can be compared and a draft previewed without inventing one.
Unknown fields are rejected so that a typo in a ``PUT`` is an error, not a silently ignored knob.
Money is in the accounts' reporting currency; times are in days; rates and shares are fractions
(0.12 means 12%).
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _PolicyModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ValueWeights(_PolicyModel):
    """Weights of the normalised features in the value score. Only their ratios matter: the
    score divides by their sum, so ``revenue=2, margin_rate=1`` is the same as ``0.5, 0.25``.

    Purchase amount is the pillar (revenue, gross profit), combined with margin, frequency,
    recency, breadth, growth, payment behaviour and the manager's strategic-fit judgement.
    """

    revenue: float = Field(default=0.22, ge=0)
    gross_profit: float = Field(default=0.20, ge=0)
    margin_rate: float = Field(default=0.14, ge=0)
    frequency: float = Field(default=0.10, ge=0)
    recency: float = Field(default=0.08, ge=0)
    categories: float = Field(default=0.06, ge=0)
    growth: float = Field(default=0.08, ge=0)
    payment: float = Field(default=0.06, ge=0)
    strategic_fit: float = Field(default=0.06, ge=0)

    @model_validator(mode="after")
    def _some_weight(self) -> Self:
        if sum(self.model_dump().values()) <= 0:
            raise ValueError("at least one value weight must be positive")
        return self


class TierRules(_PolicyModel):
    """Score thresholds and the gates that encode the key-account rules.

    Revenue alone never makes a key account: ``key`` needs a gross margin at or above
    ``margin_floor`` and either a place inside the profit core (the 80/20 line below) or revenue
    at or above ``min_revenue_key`` (a large account just outside the core); ``strategic`` needs
    the margin, the profit core and that revenue. An
    account paying late on more than ``late_share_limit`` of its invoices, or more than
    ``avg_days_late_limit`` days late on average, is a late payer: it keeps the tier its value
    earns with a credit flag and a driver (``late_payment_cap: none``), or is capped at ``key``
    (``late_payment_cap: key``). Either way a late payer never ends below the tier an account of
    the same value that is not a key-account candidate would get: paying late is a credit
    question, not a reason to call a large customer "developing".
    ``strategic`` also needs the account inside the group that brings ``profit_core_share`` of
    the gross profit (the 80/20 line). ``developing`` is for accounts *outside* that core with
    potential: growing at least ``developing_min_growth`` on the previous 12 months, or with a
    strategic fit of at least ``developing_min_fit``, at a margin at or above the floor.
    """

    strategic_threshold: float = Field(default=75.0, ge=0, le=100)
    key_threshold: float = Field(default=60.0, ge=0, le=100)
    developing_threshold: float = Field(default=25.0, ge=0, le=100)
    margin_floor: float = Field(default=0.12, ge=0, lt=1)
    min_revenue_key: float = Field(default=100_000.0, ge=0)
    profit_core_share: float = Field(default=0.8, gt=0, le=1)
    late_share_limit: float = Field(default=0.3, ge=0, le=1)
    avg_days_late_limit: float = Field(default=15.0, ge=0)
    late_payment_cap: Literal["none", "key"] = "none"
    developing_min_growth: float = Field(default=0.25, ge=0)
    developing_min_fit: int = Field(default=5, ge=1, le=5)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if not self.strategic_threshold > self.key_threshold > self.developing_threshold:
            raise ValueError(
                "thresholds must be ordered: strategic_threshold > key_threshold > "
                "developing_threshold"
            )
        return self


class Hysteresis(_PolicyModel):
    """How a tier resists noise: a demotion needs the score below the tier's threshold minus
    ``band``, or ``demote_after`` consecutive evaluations that would demote. Promotion is
    immediate once the score passes the threshold."""

    band: float = Field(default=5.0, ge=0, le=50)
    demote_after: int = Field(default=3, ge=1, le=100)


class SignalWeights(_PolicyModel):
    """Log-odds added to the base no-purchase risk per unit of each behavioural signal (each
    signal runs from 0, no warning, to 1, the strongest warning). A weight of 0.7 multiplies
    the odds of no purchase by e^0.7 ~ 2 at full signal. Non-negative because every signal is
    oriented so that more means more risk.

    The defaults are priors, not fitted values; once history covers more than two horizons the
    portfolio pass can fit them (``retention.fit_signal_weights``) and calibrate.
    """

    satisfaction_drop: float = Field(default=0.8, ge=0, le=10)
    complaints_180d: float = Field(default=0.5, ge=0, le=10)
    contact_gap_ratio: float = Field(default=0.4, ge=0, le=10)
    late_payment_share: float = Field(default=0.4, ge=0, le=10)
    revenue_decline: float = Field(default=0.7, ge=0, le=10)


class RiskPolicy(_PolicyModel):
    """Retention risk: the horizon of the no-purchase probability, the band thresholds and the
    behavioural adjustment.

    ``occasion_window_days``: orders placed less than this many days after the first order of a
    buying occasion belong to that occasion; the purchase-process models count occasions, not
    orders (real purchase logs come in bursts: counted per day, a burst reads as fast buying and
    the silence after it as defection). 1 counts calendar days. Revenue, margin and order counts
    are not affected.

    ``model``: how the two population models (BG/NBD and Pareto/NBD, both fitted in the portfolio
    pass) are combined into the base probability: ``auto`` averages them unless the replay of
    the service's own history shows one of them (or the average) predicting held-out accounts
    best; ``average``, ``bgnbd`` and ``pareto_nbd`` fix the choice.

    ``band_thresholds`` are the lower edges of medium, high and critical: a risk of 0.5 with
    the defaults is ``high``. ``usual_contact_gap_days`` is the gap between interactions that
    counts as normal; the contact-gap signal grows from there and saturates at
    ``contact_gap_saturation`` times it. ``complaints_saturation`` complaints in 180 days give
    the full complaint signal.
    """

    horizon_days: int = Field(default=90, ge=7, le=730)
    occasion_window_days: int = Field(default=7, ge=1, le=90)
    model: Literal["auto", "average", "bgnbd", "pareto_nbd"] = "auto"
    band_thresholds: tuple[float, float, float] = (0.25, 0.5, 0.75)
    signal_weights: SignalWeights = SignalWeights()
    usual_contact_gap_days: float = Field(default=60.0, gt=0)
    contact_gap_saturation: float = Field(default=3.0, gt=1)
    complaints_saturation: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _bands_ordered(self) -> Self:
        medium, high, critical = self.band_thresholds
        if not 0 < medium < high < critical < 1:
            raise ValueError("band_thresholds must satisfy 0 < medium < high < critical < 1")
        return self


class PopulationRules(_PolicyModel):
    """When the population facts (percentiles, the 80/20 curve, the retention models) are fitted.

    Below ``min_fit_accounts`` active accounts with orders the retention models are not fitted:
    the documented prior is used and every risk says so. When the accounts with orders grew by
    more than ``refit_growth_share`` since the last fit, or more than ``bulk_load_share`` of the
    accounts changed since it (a bulk load), a full portfolio pass runs as soon as no new data
    arrived for ``quiet_seconds``, instead of waiting for the hourly pass.
    """

    min_fit_accounts: int = Field(default=100, ge=20, le=1_000_000)
    refit_growth_share: float = Field(default=0.2, gt=0, le=10)
    bulk_load_share: float = Field(default=0.2, gt=0, le=1)
    quiet_seconds: int = Field(default=60, ge=5, le=3600)


class ScoringPolicy(_PolicyModel):
    """The whole policy body. ``ScoringPolicy()`` is the default policy."""

    value_weights: ValueWeights = ValueWeights()
    tiers: TierRules = TierRules()
    hysteresis: Hysteresis = Hysteresis()
    risk: RiskPolicy = RiskPolicy()
    population: PopulationRules = PopulationRules()


DEFAULT_POLICY = ScoringPolicy()
