"""Reasons in words a key-account manager understands, with the numbers behind them.

Every snapshot stores its drivers: what decided the tier (the gates and the score against the
threshold), what makes up the value score, and the top contributions to the risk. The text is
for people ("no order for 143 days; usually orders every 30"); ``code``, ``contribution``,
``value`` and ``limit`` are for machines and dashboards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from services.scorer.engine.arrays import BoolArray, FloatArray, ObjectArray
from services.scorer.engine.retention import BehaviourFacts
from services.scorer.engine.value import AccountFeatures, ValueScore, tier_threshold
from shared.enums import Tier
from shared.policy import ScoringPolicy

SATISFACTION_LABELS = {
    1: "very dissatisfied",
    2: "dissatisfied",
    3: "neutral",
    4: "satisfied",
    5: "very satisfied",
}


@dataclass(frozen=True)
class Driver:
    """One reason. ``contribution`` is in log-odds for risk drivers and in score points for value
    drivers; gates carry the account's ``value`` and the policy's ``limit`` instead."""

    code: str
    text: str
    contribution: float | None = None
    value: float | None = None
    limit: float | None = None

    def as_dict(self) -> dict[str, str | float]:
        """JSON-safe form for the snapshot; absent numbers are left out."""
        out: dict[str, str | float] = {"code": self.code, "text": self.text}
        for name in ("contribution", "value", "limit"):
            number = getattr(self, name)
            if number is not None and math.isfinite(number):
                out[name] = round(float(number), 4)
        return out


def _known(value: float) -> bool:
    return not math.isnan(value)


def _days(value: float) -> str:
    days = round(value)
    return f"{days} day" if days == 1 else f"{days} days"


def _percent(share: float) -> str:
    return f"{share * 100:.0f}%"


def _money(amount: float) -> str:
    return f"{amount:,.0f}"


# --------------------------------------------------------------------------------------------
# Risk
# --------------------------------------------------------------------------------------------


def top_risk_drivers(
    contributions: Mapping[str, FloatArray], k: int = 3
) -> list[list[tuple[str, float]]]:
    """Per account, the ``k`` largest contributions that raise the risk, largest first.

    Contributions at or below zero are left out: "the account orders like everyone else" is
    not a reason for concern. Ties keep the order of ``contributions``.
    """
    if k < 1 or not contributions:
        n = len(next(iter(contributions.values()))) if contributions else 0
        return [[] for _ in range(n)]
    names = list(contributions)
    matrix = np.nan_to_num(np.vstack([contributions[name] for name in names]).T, nan=0.0)
    order = np.argsort(-matrix, axis=1, kind="stable")[:, :k]
    out: list[list[tuple[str, float]]] = []
    for row, picks in zip(matrix, order, strict=True):
        out.append([(names[j], float(row[j])) for j in picks if row[j] > 0])
    return out


def _risk_text(code: str, i: int, facts: BehaviourFacts) -> str:
    if code == "purchase_pattern":
        since = float(facts.days_since_last_order[i])
        gap = float(facts.usual_gap_days[i])
        if not _known(since):
            return "no order on record"
        if _known(gap):
            return f"no order for {_days(since)}; usually orders every {_days(gap)}"
        return f"no order for {_days(since)}; too few orders to know the usual rhythm"
    if code == "satisfaction_drop":
        last = float(facts.satisfaction_last[i])
        previous = float(facts.satisfaction_previous[i])
        if _known(last) and _known(previous) and previous > last:
            return (
                f"satisfaction fell from {SATISFACTION_LABELS.get(round(previous), previous)} "
                f"to {SATISFACTION_LABELS.get(round(last), last)}"
            )
        return f"last survey answer: {SATISFACTION_LABELS.get(round(last), last)}"
    if code == "complaints_180d":
        count = round(float(facts.complaints_180d[i]))
        return f"{count} complaint{'s' if count != 1 else ''} in the last 180 days"
    if code == "contact_gap_ratio":
        return f"no contact for {_days(float(facts.days_since_last_contact[i]))}"
    if code == "late_payment_share":
        text = f"pays late on {_percent(float(facts.late_share[i]))} of invoices"
        late_days = float(facts.avg_days_late[i])
        if _known(late_days) and late_days > 0:
            text += f", {late_days:.0f} days late on average"
        return text
    if code == "revenue_decline":
        return f"revenue down {_percent(-float(facts.revenue_growth[i]))} on the previous 12 months"
    return code.replace("_", " ")


def explain_risk(
    contributions: Mapping[str, FloatArray], facts: BehaviourFacts, k: int = 3
) -> list[list[Driver]]:
    """The top ``k`` risk drivers of each account in words, with their log-odds contribution."""
    return [
        [Driver(code=code, text=_risk_text(code, i, facts), contribution=c) for code, c in top]
        for i, top in enumerate(top_risk_drivers(contributions, k))
    ]


# --------------------------------------------------------------------------------------------
# Value and tier
# --------------------------------------------------------------------------------------------


def _value_text(code: str, i: int, features: AccountFeatures, component: float) -> str:
    standing = f"better than {component * 100:.0f}% of accounts"
    if code == "revenue":
        return f"revenue {_money(float(features.revenue_12m[i]))} in 12 months ({standing})"
    if code == "gross_profit":
        return (
            f"gross profit {_money(float(features.gross_profit_12m[i]))} in 12 months ({standing})"
        )
    if code == "margin_rate":
        return f"gross margin {_percent(float(features.margin_rate[i]))} ({standing})"
    if code == "frequency":
        return f"{round(float(features.orders_12m[i]))} orders in 12 months ({standing})"
    if code == "recency":
        return f"last order {_days(float(features.days_since_last_order[i]))} ago"
    if code == "categories":
        return f"buys in {round(float(features.categories_12m[i]))} categories"
    if code == "growth":
        growth = float(features.revenue_growth[i])
        if not _known(growth):
            return "no previous year to measure growth against"
        sign = "up" if growth >= 0 else "down"
        return f"revenue {sign} {_percent(abs(growth))} on the previous 12 months"
    if code == "payment":
        share = float(features.late_share[i])
        if not _known(share):
            return "no invoices yet"
        return f"pays late on {_percent(share)} of invoices"
    if code == "strategic_fit":
        fit = float(features.strategic_fit[i])
        return (
            "no strategic-fit judgement yet" if not _known(fit) else f"strategic fit {fit:.0f} of 5"
        )
    return code.replace("_", " ")


def explain_value(
    breakdown: ValueScore, features: AccountFeatures, k: int = 3
) -> list[list[Driver]]:
    """The ``k`` features that add most to each account's value score, in score points."""
    names = list(breakdown.contributions)
    matrix = np.vstack([breakdown.contributions[name] for name in names]).T
    order = np.argsort(-matrix, axis=1, kind="stable")[:, :k]
    out: list[list[Driver]] = []
    for i, picks in enumerate(order):
        out.append(
            [
                Driver(
                    code=names[j],
                    text=_value_text(
                        names[j], i, features, float(breakdown.components[names[j]][i])
                    ),
                    contribution=float(matrix[i, j]),
                )
                for j in picks
            ]
        )
    return out


def explain_tier(
    tiers: ObjectArray,
    gates: Mapping[str, BoolArray],
    score: FloatArray,
    features: AccountFeatures,
    policy: ScoringPolicy,
) -> list[list[Driver]]:
    """Why each account has its candidate tier (from ``decide_tier``): the score against the
    tier's threshold, then every gate that blocked a higher tier, capped it or made it
    developing. Hysteresis and overrides are reported by the caller, which knows the history."""
    rules = policy.tiers
    out: list[list[Driver]] = []
    for i, tier_value in enumerate(tiers):
        tier = Tier(tier_value)
        s = float(score[i])
        reasons: list[Driver] = []
        capped = bool(gates["payment_cap_applied"][i])
        # A capped tier was not earned by its threshold; the cap reason below says why it is there.
        if tier is Tier.standard or capped:
            reasons.append(Driver("score", f"value score {s:.0f}", value=s))
        else:
            threshold = tier_threshold(tier, policy)
            reasons.append(
                Driver(
                    "score",
                    f"value score {s:.0f} (the {tier.value} threshold is {threshold:.0f})",
                    value=s,
                    limit=threshold,
                )
            )
        margin = float(features.margin_rate[i])
        if gates["margin_below_floor"][i]:
            text = (
                f"gross margin {_percent(margin)} is below the {_percent(rules.margin_floor)} floor"
                if _known(margin)
                else "no gross margin on record"
            )
            reasons.append(
                Driver("margin_below_floor", text, value=margin, limit=rules.margin_floor)
            )
        revenue = float(features.revenue_12m[i])
        # Small revenue is only worth saying where it is what kept the account from key.
        below_minimum = gates["revenue_below_key_minimum"][i]
        if below_minimum and gates["outside_profit_core"][i] and s >= rules.key_threshold:
            reasons.append(
                Driver(
                    "revenue_below_key_minimum",
                    f"revenue {_money(revenue if _known(revenue) else 0.0)} is below the "
                    f"{_money(rules.min_revenue_key)} minimum for key accounts",
                    value=revenue,
                    limit=rules.min_revenue_key,
                )
            )
        if gates["late_payer"][i]:
            share = float(features.late_share[i])
            late_days = float(features.avg_days_late[i])
            parts = []
            if _known(share):
                parts.append(f"{_percent(share)} of invoices")
            if _known(late_days) and late_days > 0:
                parts.append(f"{_days(late_days)} late on average")
            limits = (
                f"limits {_percent(rules.late_share_limit)} of invoices, "
                f"{_days(rules.avg_days_late_limit)} late"
            )
            flag = "" if capped else "; credit flag, the tier stays"
            reasons.append(
                Driver(
                    "late_payer",
                    f"pays late: {', '.join(parts)} ({limits}){flag}",
                    value=share,
                    limit=rules.late_share_limit,
                )
            )
        if gates["credit_limit_exceeded"][i]:
            used = float(features.credit_used[i])
            reasons.append(
                Driver(
                    "credit_limit_exceeded",
                    f"open invoices at {_percent(used)} of the credit limit",
                    value=used,
                    limit=1.0,
                )
            )
        if capped:
            reasons.append(
                Driver("payment_cap_applied", f"tier capped at {tier.value} until payments improve")
            )
        if gates["outside_profit_core"][i] and s >= rules.strategic_threshold:
            reasons.append(
                Driver(
                    "outside_profit_core",
                    f"not among the accounts bringing {_percent(rules.profit_core_share)} of "
                    "gross profit",
                    value=float(features.profit_share_cum[i]),
                    limit=rules.profit_core_share,
                )
            )
        if tier is Tier.developing and not capped:
            growth = float(features.revenue_growth[i])
            if gates["fast_growth"][i]:
                reasons.append(
                    Driver(
                        "fast_growth",
                        f"revenue up {_percent(growth)} on the previous 12 months",
                        value=growth,
                        limit=rules.developing_min_growth,
                    )
                )
            if gates["high_strategic_fit"][i]:
                fit = float(features.strategic_fit[i])
                reasons.append(
                    Driver(
                        "high_strategic_fit",
                        f"strategic fit {fit:.0f} of 5",
                        value=fit,
                        limit=float(rules.developing_min_fit),
                    )
                )
        out.append(reasons)
    return out
