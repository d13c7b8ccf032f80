"""Key-account value: a 0-100 score from normalised features, the tier gates, hysteresis and the
manager's override.

The score says how valuable an account is *relative to the portfolio*: each feature becomes its
percentile rank against the population (stored by the portfolio pass as a grid of cut-points),
so a weight means the same thing whatever the currency or the size of the business. The tier is
not the score alone: explicit gates encode the key-account rules (revenue alone never makes a
key account; thin margins, tiny revenue and poor payment each block or cap a tier), and
hysteresis keeps a tier from flapping when the score hovers around a threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from itertools import pairwise
from typing import NamedTuple, Self

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, model_validator

from services.scorer.engine.arrays import (
    BoolArray,
    FloatArray,
    IntArray,
    ObjectArray,
    as_float_array,
    same_length,
)
from shared.enums import Tier
from shared.policy import ScoringPolicy

# Tiers as integers, lowest first, so that "cap at", "promote" and "demote" are comparisons.
TIER_ORDER: tuple[Tier, ...] = (Tier.standard, Tier.developing, Tier.key, Tier.strategic)
_TIER_CODE: dict[str, int] = {tier.value: code for code, tier in enumerate(TIER_ORDER)}
_TIER_OBJECTS: ObjectArray = np.array(TIER_ORDER, dtype=object)
_NO_TIER = -1


@dataclass(frozen=True)
class AccountFeatures:
    """The value features of many accounts, one float column each (nan = unknown).

    Money is in the reporting currency; windows trail the evaluation time.

    - ``margin_rate``: gross profit / revenue over 12 months (0.12 = 12%).
    - ``usual_gap_days``: the account's typical gap between orders (for the drivers' words).
    - ``revenue_growth``: relative change of 12-month revenue on the previous 12 months
      (0.3 = up 30%); nan when there is no previous year to compare with.
    - ``late_share``: share of invoices paid after their due date; ``avg_days_late`` the
      average lateness in days; nan when there are no invoices.
    - ``strategic_fit``: the manager's judgement 1..5, nan when not given.
    - ``profit_share_cum``: the account's position on the 80/20 curve: the share of the
      portfolio's gross profit brought by all accounts ranked at or above it by gross profit
      (see ``cumulative_profit_share``). Accounts at or below ``profit_core_share`` are inside
      the profit core.
    - ``credit_used``: open invoices over the account's credit limit (1.2 = 20% over); nan
      without a credit limit.
    """

    revenue_12m: FloatArray
    gross_profit_12m: FloatArray
    margin_rate: FloatArray
    orders_12m: FloatArray
    days_since_last_order: FloatArray
    usual_gap_days: FloatArray
    categories_12m: FloatArray
    revenue_growth: FloatArray
    late_share: FloatArray
    avg_days_late: FloatArray
    strategic_fit: FloatArray
    account_age_days: FloatArray
    profit_share_cum: FloatArray
    credit_used: FloatArray

    def __post_init__(self) -> None:
        columns = {f.name: as_float_array(getattr(self, f.name), f.name) for f in fields(self)}
        same_length(columns)
        for name, column in columns.items():
            object.__setattr__(self, name, column)

    def __len__(self) -> int:
        return len(self.revenue_12m)

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, float | int | None]]) -> Self:
        """Columns from one mapping per account (e.g. rows of a SQL aggregate); a missing key
        or None is nan. Unknown keys are rejected so that a renamed column is caught."""
        names = [f.name for f in fields(cls)]
        for record in records:
            unknown = set(record) - set(names)
            if unknown:
                raise ValueError(f"unknown feature(s): {sorted(unknown)}")
        columns = {
            name: np.array([_nan_if_none(r.get(name)) for r in records], dtype=np.float64)
            for name in names
        }
        return cls(**columns)

    def row(self, index: int) -> dict[str, float | None]:
        """One account's features as JSON-safe values (nan becomes None), for the snapshot."""
        out: dict[str, float | None] = {}
        for f in fields(self):
            value = float(getattr(self, f.name)[index])
            out[f.name] = None if math.isnan(value) else value
        return out


def _nan_if_none(value: float | int | None) -> float:
    return math.nan if value is None else float(value)


def cumulative_profit_share(gross_profit: ArrayLike) -> FloatArray:
    """Each account's position on the 80/20 curve: the share of total positive gross profit
    brought by the accounts ranked at or above it (by gross profit, descending; ties broken by
    input order). Accounts with no positive profit get 1.0: they are never inside the core.

    This is what the portfolio pass computes in SQL with a window function; kept here so the
    backtest and the tests use the same definition.
    """
    profit = np.nan_to_num(as_float_array(gross_profit, "gross_profit"), nan=0.0)
    positive = np.clip(profit, 0.0, None)
    total = float(positive.sum())
    out = np.ones_like(profit)
    if total <= 0:
        return out
    order = np.argsort(-profit, kind="stable")
    out[order] = np.cumsum(positive[order]) / total
    out[profit <= 0] = 1.0
    return out


# --------------------------------------------------------------------------------------------
# Population percentiles
# --------------------------------------------------------------------------------------------

PERCENTILE_FEATURES: tuple[str, ...] = (
    "revenue_12m",
    "gross_profit_12m",
    "margin_rate",
    "orders_12m",
    "days_since_last_order",
    "categories_12m",
    "revenue_growth",
    "late_share",
)
"""Features whose percentile rank enters the value score."""


class PopulationPercentiles(BaseModel):
    """Cut-points of each feature at evenly spaced quantiles (0, 1/(k-1), ..., 1) of the
    population; k = 101 by default. Small enough to store as JSON in the population row, fine
    enough that an account's rank is within half a percentile of its exact rank.
    An empty list means the feature was unknown for every account (its rank is neutral)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cutpoints: dict[str, list[float]]

    @model_validator(mode="after")
    def _sorted(self) -> Self:
        lengths = {len(points) for points in self.cutpoints.values() if points}
        if len(lengths) > 1:
            raise ValueError("every feature needs the same number of cut-points")
        for name, points in self.cutpoints.items():
            if len(points) == 1:
                raise ValueError(f"{name}: need at least two cut-points")
            if any(not math.isfinite(v) for v in points):
                raise ValueError(f"{name}: cut-points must be finite")
            if any(b < a for a, b in pairwise(points)):
                raise ValueError(f"{name}: cut-points must be non-decreasing")
        return self


def population_percentiles(
    features: AccountFeatures, *, points: int = 101
) -> PopulationPercentiles:
    """The population's quantile cut-points per score feature, ignoring unknown values."""
    if points < 2:
        raise ValueError("points must be >= 2")
    levels = np.linspace(0.0, 1.0, points)
    cutpoints: dict[str, list[float]] = {}
    for name in PERCENTILE_FEATURES:
        column = getattr(features, name)
        finite = column[np.isfinite(column)]
        cutpoints[name] = [float(v) for v in np.quantile(finite, levels)] if finite.size else []
    return PopulationPercentiles(cutpoints=cutpoints)


def percentile_rank(values: ArrayLike, cutpoints: Sequence[float]) -> FloatArray:
    """Mid-rank of each value in the population described by ``cutpoints``, in 0..1.

    Between two distinct cut-points the rank is interpolated linearly; a value equal to a run of
    cut-points (a point mass, such as the many accounts with zero late invoices) gets the middle
    of that run, so ties are neither rewarded nor punished. Nan stays nan; no cut-points gives a
    neutral 0.5.
    """
    v = as_float_array(values, "values")
    if len(cutpoints) == 0:
        return np.where(np.isnan(v), np.nan, 0.5)
    q = np.asarray(cutpoints, dtype=np.float64)
    levels = np.linspace(0.0, 1.0, len(q))
    last = len(q) - 1
    filled = np.nan_to_num(v, nan=0.0)
    left = np.searchsorted(q, filled, side="left")  # cut-points strictly below
    right = np.searchsorted(q, filled, side="right")  # cut-points at or below
    tied = right > left
    tie_rank = (levels[np.clip(left, 0, last)] + levels[np.clip(right - 1, 0, last)]) / 2.0
    lower = np.clip(left - 1, 0, last)
    upper = np.clip(left, 0, last)
    span = q[upper] - q[lower]
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(span > 0, (filled - q[lower]) / span, 0.0)
    between = levels[lower] + fraction * (levels[upper] - levels[lower])
    rank = np.where(tied, tie_rank, between)
    rank = np.where(left == 0, np.where(tied, rank, 0.0), rank)
    rank = np.where(right > last, np.where(tied, rank, 1.0), rank)
    return np.asarray(np.where(np.isnan(v), np.nan, rank), dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Value score
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValueScore:
    """The score and how it is made.

    ``components`` are the normalised features in 0..1 (1 = best in the portfolio);
    ``contributions`` are their weighted shares in score points, summing to ``score``.
    """

    score: FloatArray
    components: dict[str, FloatArray]
    contributions: dict[str, FloatArray]


def score_breakdown(
    features: AccountFeatures, population: PopulationPercentiles, policy: ScoringPolicy
) -> ValueScore:
    """The value score 0-100 with its components and per-component points.

    Each component is the account's percentile rank in the portfolio; recency (days since the
    last order) and payment (share of late invoices) count reversed, so being late or lapsed
    lowers the score. Strategic fit is the manager's 1..5 mapped to 0..1. What is unknown:
    no orders means no credit for revenue, margin, frequency, recency or breadth (0); unknown
    growth, payment history or strategic fit are neutral (0.5), because a new account without
    a previous year or an invoice is not thereby bad or good.
    """

    def rank(name: str) -> FloatArray:
        return percentile_rank(getattr(features, name), population.cutpoints.get(name, []))

    def known_or(values: FloatArray, default: float) -> FloatArray:
        return np.where(np.isnan(values), default, values)

    components = {
        "revenue": known_or(rank("revenue_12m"), 0.0),
        "gross_profit": known_or(rank("gross_profit_12m"), 0.0),
        "margin_rate": known_or(rank("margin_rate"), 0.0),
        "frequency": known_or(rank("orders_12m"), 0.0),
        "recency": known_or(1.0 - rank("days_since_last_order"), 0.0),
        "categories": known_or(rank("categories_12m"), 0.0),
        "growth": known_or(rank("revenue_growth"), 0.5),
        "payment": known_or(1.0 - rank("late_share"), 0.5),
        "strategic_fit": known_or(np.clip((features.strategic_fit - 1.0) / 4.0, 0.0, 1.0), 0.5),
    }
    weights = policy.value_weights.model_dump()
    total = float(sum(weights.values()))
    contributions = {
        name: np.asarray(100.0 * weights[name] / total * component, dtype=np.float64)
        for name, component in components.items()
    }
    score = np.sum(np.vstack(list(contributions.values())), axis=0)
    return ValueScore(
        score=np.asarray(np.clip(score, 0.0, 100.0), dtype=np.float64),
        components={k: np.asarray(v, dtype=np.float64) for k, v in components.items()},
        contributions=contributions,
    )


def value_score(
    features: AccountFeatures, population: PopulationPercentiles, policy: ScoringPolicy
) -> FloatArray:
    """The value score 0-100 of each account (see ``score_breakdown``)."""
    return score_breakdown(features, population, policy).score


# --------------------------------------------------------------------------------------------
# Tier gates
# --------------------------------------------------------------------------------------------


class TierDecision(NamedTuple):
    """The candidate tier of each account and the gates behind it.

    ``gates`` maps a gate name to a boolean column:

    - ``margin_below_floor``: gross margin below the floor (or unknown): never key or strategic.
    - ``revenue_below_key_minimum``: revenue below the minimum for key accounts: never
      strategic, and key only from inside the profit core.
    - ``late_payer``: late share or average lateness above the limit: a credit flag (and, with
      ``late_payment_cap: key``, strategic capped at key).
    - ``credit_limit_exceeded``: open invoices above the account's credit limit: a credit flag.
    - ``outside_profit_core``: not among the accounts bringing the core share of gross profit:
      never strategic, and the only accounts that can be developing.
    - ``fast_growth`` / ``high_strategic_fit``: the potential that can make an account developing.
    - ``payment_cap_applied``: the cap actually lowered the tier.
    """

    tiers: ObjectArray
    gates: dict[str, BoolArray]


def decide_tier(features: AccountFeatures, score: ArrayLike, policy: ScoringPolicy) -> TierDecision:
    """The tier each account qualifies for now, before hysteresis and overrides.

    - strategic: score >= strategic threshold, inside the profit core, margin at or above the
      floor, revenue at or above the key minimum;
    - key: score >= key threshold, margin at or above the floor, and inside the profit core or
      revenue at or above the key minimum (the 80/20 rule names the key accounts of a portfolio
      whatever its scale; the minimum admits large accounts just outside the core);
    - developing: outside the profit core, margin at or above the floor and potential (growth
      >= the policy's minimum or strategic fit >= the policy's minimum), score >= the
      developing threshold: a smaller account worth growing into a key account;
    - standard: everything else.
    A late payer keeps that tier with a credit flag; with ``late_payment_cap: key`` a strategic
    late payer is capped at key. Never lower: a large account that pays late is a credit
    question, not a small account to develop.
    """
    rules = policy.tiers
    scores = as_float_array(score, "score")
    if len(scores) != len(features):
        raise ValueError("score and features differ in length")
    with np.errstate(invalid="ignore"):
        margin_ok = features.margin_rate >= rules.margin_floor
        revenue_ok = features.revenue_12m >= rules.min_revenue_key
        late_payer = (features.late_share > rules.late_share_limit) | (
            features.avg_days_late > rules.avg_days_late_limit
        )
        in_core = (features.profit_share_cum <= rules.profit_core_share) & (
            features.gross_profit_12m > 0
        )
        fast_growth = features.revenue_growth >= rules.developing_min_growth
        high_fit = features.strategic_fit >= rules.developing_min_fit
        above_strategic = scores >= rules.strategic_threshold
        above_key = scores >= rules.key_threshold
        above_developing = scores >= rules.developing_threshold

    key_eligible = margin_ok & (revenue_ok | in_core)
    code = np.where(
        margin_ok & revenue_ok & in_core & above_strategic,
        _TIER_CODE[Tier.strategic],
        np.where(
            key_eligible & above_key,
            _TIER_CODE[Tier.key],
            np.where(
                margin_ok & ~in_core & (fast_growth | high_fit) & above_developing,
                _TIER_CODE[Tier.developing],
                _TIER_CODE[Tier.standard],
            ),
        ),
    ).astype(np.int64)
    with np.errstate(invalid="ignore"):
        over_credit = features.credit_used > 1.0
    capped = np.zeros(len(code), dtype=np.bool_)
    if rules.late_payment_cap == "key":
        capped = late_payer & (code > _TIER_CODE[Tier.key])
        code = np.where(capped, _TIER_CODE[Tier.key], code)
    gates: dict[str, BoolArray] = {
        "margin_below_floor": ~margin_ok,
        "revenue_below_key_minimum": ~revenue_ok,
        "late_payer": late_payer,
        "credit_limit_exceeded": over_credit,
        "outside_profit_core": ~in_core,
        "fast_growth": fast_growth,
        "high_strategic_fit": high_fit,
        "payment_cap_applied": capped,
    }
    return TierDecision(tiers=_tier_objects(code), gates=gates)


# --------------------------------------------------------------------------------------------
# Hysteresis and overrides
# --------------------------------------------------------------------------------------------


def tier_codes(tiers: Sequence[Tier | str | None] | ObjectArray) -> IntArray:
    """Tiers (enum members or their stored strings) as ranks 0 (standard) .. 3 (strategic);
    None, for an account never tiered, is -1."""
    try:
        # Tier is a StrEnum, so the stored strings hash and compare equal to its members.
        codes = [_NO_TIER if t is None else _TIER_CODE[t] for t in tiers]
    except KeyError as exc:
        raise ValueError(f"unknown tier {exc.args[0]!r}") from None
    return np.array(codes, dtype=np.int64)


def _tier_objects(codes: IntArray) -> ObjectArray:
    out: ObjectArray = _TIER_OBJECTS[np.clip(codes, 0, len(TIER_ORDER) - 1)]
    out[codes == _NO_TIER] = None
    return out


def tier_threshold(tier: Tier, policy: ScoringPolicy) -> float:
    """The score an account must reach to hold ``tier`` (standard: none)."""
    rules = policy.tiers
    return {
        Tier.strategic: rules.strategic_threshold,
        Tier.key: rules.key_threshold,
        Tier.developing: rules.developing_threshold,
        Tier.standard: -math.inf,
    }[tier]


def apply_hysteresis(
    previous_tier: Sequence[Tier | str | None] | ObjectArray,
    candidate_tier: Sequence[Tier | str | None] | ObjectArray,
    score: ArrayLike,
    below_count: ArrayLike,
    policy: ScoringPolicy,
) -> tuple[ObjectArray, IntArray]:
    """The tier to keep, and the new count of consecutive evaluations that would demote.

    - First evaluation (previous None), same tier or promotion: take the candidate, count 0.
      Promotion is immediate once the score passes the threshold, because the gates already
      demand more than the score alone.
    - Demotion candidate: demote at once if the score is below the held tier's threshold minus
      ``hysteresis.band`` (a real fall, not noise); otherwise keep the held tier and count; demote
      after ``hysteresis.demote_after`` consecutive such evaluations (a sustained slide, or a gate
      that stays failed). Any evaluation that supports the held tier resets the count.

    So a score hovering at 59.5, 60.5, 59.8, 60.2 around a threshold of 60 changes the tier at
    most once. The count is per evaluation: the caller should count evaluations of new
    information (a rescore or the periodic pass), not retries of the same one.
    """
    previous = tier_codes(previous_tier)
    candidate = tier_codes(candidate_tier)
    scores = as_float_array(score, "score")
    counts = np.asarray(np.broadcast_to(np.asarray(below_count, dtype=np.int64), previous.shape))
    if not (len(previous) == len(candidate) == len(scores)):
        raise ValueError("previous_tier, candidate_tier and score differ in length")
    if (candidate == _NO_TIER).any():
        raise ValueError("every account needs a candidate tier")

    thresholds = np.array([tier_threshold(t, policy) for t in TIER_ORDER], dtype=np.float64)
    held_threshold = np.where(
        previous == _NO_TIER, -math.inf, thresholds[np.clip(previous, 0, len(TIER_ORDER) - 1)]
    )
    demoting = (previous != _NO_TIER) & (candidate < previous)
    with np.errstate(invalid="ignore"):
        # A nan score is no evidence of a fall: only the count can demote then.
        fell_through_band = scores < held_threshold - policy.hysteresis.band
    next_count = counts + 1
    demote = demoting & (fell_through_band | (next_count >= policy.hysteresis.demote_after))
    keep_held = demoting & ~demote
    final = np.where(keep_held, previous, candidate).astype(np.int64)
    new_count = np.where(keep_held, next_count, 0).astype(np.int64)
    return _tier_objects(final), new_count


def override_active(
    override_tier: Sequence[Tier | str | None],
    override_expires_at: Sequence[datetime | None],
    now: datetime,
) -> BoolArray:
    """Which accounts have a manager's override in force at ``now``: a tier is set and its
    expiry (if any; None means until lifted) is still in the future."""
    if len(override_tier) != len(override_expires_at):
        raise ValueError("override_tier and override_expires_at differ in length")
    return np.array(
        [
            tier is not None and (expires is None or now < expires)
            for tier, expires in zip(override_tier, override_expires_at, strict=True)
        ],
        dtype=np.bool_,
    )


def apply_override(
    tier: Sequence[Tier | str | None] | ObjectArray,
    override_tier: Sequence[Tier | str | None],
    override_expires_at: Sequence[datetime | None],
    now: datetime,
) -> ObjectArray:
    """The tier to publish: the manager's override while it is in force, else ``tier``.

    Apply it after hysteresis and keep the hysteresis state of the computed tier, so that when
    the override expires the account falls back to what the data says, not to a stale count.
    """
    computed = tier_codes(tier)
    if len(computed) != len(override_tier):
        raise ValueError("tier and override_tier differ in length")
    active = override_active(override_tier, override_expires_at, now)
    pinned = np.array(
        [
            _TIER_CODE[Tier(t)] if on and t is not None else _NO_TIER
            for t, on in zip(override_tier, active, strict=True)
        ],
        dtype=np.int64,
    )
    return _tier_objects(np.where(active, pinned, computed).astype(np.int64))
