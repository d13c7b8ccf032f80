"""The portfolio summary: what the portfolio pages would otherwise aggregate from every order
on every view, computed once at the end of a portfolio pass and stored in
``portfolio_summaries``, one row for the whole book and one per manager.

Per scope it holds, for the 12 months up to the pass: per tier the accounts, revenue, gross
profit and revenue at risk, and the repeat-purchase retention counts; survey satisfaction; the
80/20 curve of gross profit; the monthly KPI trend of the last 12 calendar months; and the
accounts lost in the window with their revenue lost and the risk shown before (a column of its
own, ``lost``, read by the defection page only). An
account counts for the manager it has at the pass. The orders are read once, set-based; the
per-scope figures are then summed in Python (a row per account, each into two scopes).

The API reads these rows and says the pass time as the figures' ``evaluated_at``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from shared.periods import months_before

ALL = "all"
KEY_TIERS = ("strategic", "key")
AT_RISK_BANDS = ("high", "critical")
TIER_BUCKETS = ("strategic", "key", "developing", "standard", "unscored")
PARETO_POINTS = 50
TREND_MONTHS = 12
_CORE_SHARE = Decimal("0.8")


def scope_of(manager_id: int | None) -> str:
    """The summary row of a manager's accounts, or of every account (None)."""
    return ALL if manager_id is None else f"manager:{manager_id}"


_PER_ACCOUNT = """
WITH per_account AS (
    SELECT account_id,
           sum(amount) FILTER (WHERE ordered_at >= $1) AS revenue,
           sum(amount - cost) FILTER (WHERE ordered_at >= $1 AND cost IS NOT NULL)
               AS gross_profit,
           bool_or(ordered_at >= $1) AS bought_now,
           bool_or(ordered_at < $1) AS bought_before
    FROM orders
    WHERE status = 'placed' AND ordered_at >= $2 AND ordered_at <= $3
    GROUP BY account_id
)
SELECT a.id, a.manager_id, coalesce(a.tier, 'unscored'), a.status = 'active', a.risk_probability,
       p.revenue, p.gross_profit, coalesce(p.bought_now, false), coalesce(p.bought_before, false)
FROM accounts a LEFT JOIN per_account p ON p.account_id = a.id
"""

_SATISFACTION = """
SELECT a.manager_id, GROUPING(a.manager_id), sum(i.satisfaction), count(i.satisfaction)
FROM interactions i JOIN accounts a ON a.id = i.account_id
WHERE i.kind = 'survey' AND i.occurred_at >= $1 AND i.occurred_at <= $2
GROUP BY GROUPING SETS ((), (a.manager_id))
"""

_MONTHLY_MONEY = """
SELECT month, manager_id, GROUPING(manager_id), sum(amount), sum(profit)
FROM (
    SELECT (date_trunc('month', o.ordered_at, 'UTC') AT TIME ZONE 'UTC')::date AS month,
           a.manager_id, o.amount, o.amount - o.cost AS profit
    FROM orders o JOIN accounts a ON a.id = o.account_id
    WHERE o.status = 'placed' AND o.ordered_at >= $1 AND o.ordered_at <= $2
) placed
GROUP BY GROUPING SETS ((month), (month, manager_id))
"""

_MONTHLY_TIERS = """
WITH last_of_month AS (
    SELECT DISTINCT ON (date_trunc('month', s.computed_at, 'UTC'), s.account_id)
           (date_trunc('month', s.computed_at, 'UTC') AT TIME ZONE 'UTC')::date AS month,
           a.manager_id, s.tier,
           s.risk_band, s.risk_probability
    FROM score_snapshots s JOIN accounts a ON a.id = s.account_id
    WHERE s.computed_at >= $1 AND s.computed_at <= $2
    ORDER BY date_trunc('month', s.computed_at, 'UTC'), s.account_id, s.computed_at DESC,
             s.id DESC
)
SELECT month, manager_id, GROUPING(manager_id), count(*),
       count(*) FILTER (WHERE tier IN ('strategic', 'key')),
       count(*) FILTER (WHERE tier IN ('strategic', 'key') AND risk_band IN ('high', 'critical')),
       sum(risk_probability) FILTER (WHERE tier IN ('strategic', 'key')),
       count(risk_probability) FILTER (WHERE tier IN ('strategic', 'key'))
FROM last_of_month
GROUP BY GROUPING SETS ((month), (month, manager_id))
"""

# An account is marked lost when the first account event saying so arrived (or, without one
# on record, at its last update); the risk shown N days before is that of its last evaluation
# at or before that moment.
_LOST = """
WITH lost AS MATERIALIZED (
    SELECT a.id, a.external_id, a.name, a.churn_reason, a.tier, a.manager_id,
           m.external_id AS manager,
           coalesce((SELECT min(e.received_at) FROM ingest_events e
                     WHERE e.account_external_id = a.external_id AND e.type = 'account'
                       AND e.status <> 'stale' AND e.payload ->> 'status' = 'lost'),
                    a.updated_at) AS lost_at
    FROM accounts a LEFT JOIN managers m ON m.id = a.manager_id
    WHERE a.status = 'lost'
)
SELECT l.manager_id, l.external_id, l.name, l.churn_reason, l.tier, l.manager, l.lost_at,
       (SELECT coalesce(sum(o.amount), 0) FROM orders o
        WHERE o.account_id = l.id AND o.status = 'placed'
          AND o.ordered_at >= l.lost_at - interval '12 months' AND o.ordered_at < l.lost_at),
       (SELECT s.risk_probability FROM score_snapshots s
        WHERE s.account_id = l.id AND s.computed_at <= l.lost_at - interval '30 days'
        ORDER BY s.computed_at DESC, s.id DESC LIMIT 1),
       (SELECT s.risk_probability FROM score_snapshots s
        WHERE s.account_id = l.id AND s.computed_at <= l.lost_at - interval '90 days'
        ORDER BY s.computed_at DESC, s.id DESC LIMIT 1),
       (SELECT s.risk_probability FROM score_snapshots s
        WHERE s.account_id = l.id AND s.computed_at <= l.lost_at - interval '180 days'
        ORDER BY s.computed_at DESC, s.id DESC LIMIT 1)
FROM lost l
WHERE l.lost_at >= $1 AND l.lost_at <= $2
ORDER BY l.lost_at DESC, l.external_id
"""

_REPLACE = """
INSERT INTO portfolio_summaries (scope, manager_id, computed_at, figures, lost)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::jsonb[], $5::jsonb[])
"""


@dataclass(slots=True)
class _Tier:
    accounts: int = 0
    active_accounts: int = 0
    revenue: Decimal = Decimal(0)
    gross_profit: Decimal = Decimal(0)
    bought_before: int = 0
    retained: int = 0
    revenue_at_risk: float = 0.0


@dataclass(slots=True)
class _Scope:
    tiers: dict[str, _Tier] = field(default_factory=lambda: defaultdict(_Tier))
    profits: list[tuple[Decimal, int]] = field(default_factory=list)


def pareto(profits: list[tuple[Decimal, int]], points: int = PARETO_POINTS) -> dict[str, Any]:
    """The 80/20 curve of (gross profit, account id) pairs: ranked largest first (ties by id),
    the cumulative share of gross profit at about ``points`` evenly spaced ranks, and
    ``core_accounts``, how many of the largest bring 80% of it."""
    ranked = sorted(profits, key=lambda p: (-p[0], p[1]))
    accounts = len(ranked)
    total = sum((gp for gp, _ in ranked), Decimal(0))
    if not ranked or total <= 0:
        return {"accounts": accounts, "core_accounts": 0, "points": []}
    cumulative = []
    running = Decimal(0)
    core = 0
    for gp, _ in ranked:
        if running < total * _CORE_SHARE:
            core += 1
        running += gp
        cumulative.append(running)
    step = max(1, accounts // points)
    curve = [{"share_of_accounts": 0.0, "share_of_gross_profit": 0.0}] + [
        {
            "share_of_accounts": rank / accounts,
            "share_of_gross_profit": float(cumulative[rank - 1] / total),
        }
        for rank in range(1, accounts + 1)
        if rank % step == 0 or rank in (accounts, core)
    ]
    return {"accounts": accounts, "core_accounts": core, "points": curve}


def _month_starts(now: datetime, months: int) -> list[datetime]:
    return [
        months_before(now, months - 1 - k).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        for k in range(months)
    ]


def _money(value: Decimal | None) -> str:
    return str(Decimal(value or 0).quantize(Decimal("0.01")))


async def _rows(session: AsyncSession, statement: str, *parameters: Any) -> list[Any]:
    connection = await session.connection()
    return list((await connection.exec_driver_sql(statement, parameters)).all())


async def portfolio_summaries(session: AsyncSession, *, now: datetime) -> dict[str, dict[str, Any]]:
    """The summary of every scope as of ``now``: ``{scope: figures}`` (JSON-ready)."""
    start, previous_start = months_before(now, 12), months_before(now, 24)
    scopes: dict[str, _Scope] = defaultdict(_Scope)
    scopes[ALL] = _Scope()
    rows = await _rows(session, _PER_ACCOUNT, start, previous_start, now)
    for account_id, manager_id, tier, active, risk, revenue, profit, bought, before in rows:
        targets = [scopes[ALL]]
        if manager_id is not None:
            targets.append(scopes[scope_of(manager_id)])
        for target in targets:
            bucket = target.tiers[tier]
            bucket.accounts += 1
            bucket.active_accounts += active
            bucket.revenue += revenue or 0
            bucket.gross_profit += profit or 0
            bucket.bought_before += before
            bucket.retained += before and bought and active
            if active and revenue is not None and risk is not None:
                bucket.revenue_at_risk += float(revenue) * risk
            if profit is not None:
                target.profits.append((profit, account_id))

    satisfaction: dict[str, dict[str, Any]] = {}
    for manager_id, grouped, total, answers in await _rows(session, _SATISFACTION, start, now):
        if not grouped and manager_id is None:
            continue
        satisfaction[ALL if grouped else scope_of(manager_id)] = {
            "average": float(total) / answers if answers else None,
            "answers": answers,
        }

    months = _month_starts(now, TREND_MONTHS)
    money: dict[tuple[str, Any], tuple[Decimal, Decimal | None]] = {}
    for month, manager_id, grouped, revenue, profit in await _rows(
        session, _MONTHLY_MONEY, months[0], now
    ):
        if grouped or manager_id is not None:
            money[(ALL if grouped else scope_of(manager_id), month)] = (revenue, profit)
    tiers: dict[tuple[str, Any], tuple[int, int, int, float | None]] = {}
    for month, manager_id, grouped, evaluated, key, at_risk, risk_sum, risk_n in await _rows(
        session, _MONTHLY_TIERS, months[0], now
    ):
        if grouped or manager_id is not None:
            mean = float(risk_sum) / risk_n if risk_n else None
            tiers[(ALL if grouped else scope_of(manager_id), month)] = (
                evaluated,
                key,
                at_risk,
                mean,
            )
    lost: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for manager_id, *row in await _rows(session, _LOST, start, now):
        external_id, name, reason, tier_, manager, lost_at, revenue, r30, r90, r180 = row
        account = {
            "external_id": external_id,
            "name": name,
            "churn_reason": reason,
            "tier": tier_,
            "manager_external_id": manager,
            "lost_at": lost_at.isoformat(),
            "revenue_12m_lost": _money(revenue),
            "risk_30d_before": r30,
            "risk_90d_before": r90,
            "risk_180d_before": r180,
        }
        lost[ALL].append(account)
        if manager_id is not None:
            lost[scope_of(manager_id)].append(account)

    for scope, _ in [*money, *tiers]:
        _ = scopes[scope]  # a manager whose accounts have only old orders still gets a row

    out = {}
    for scope, figures in scopes.items():
        trend = []
        for k, first in enumerate(months):
            revenue, profit = money.get((scope, first.date()), (None, None))
            evaluated, key, at_risk, mean = tiers.get((scope, first.date()), (0, None, None, None))
            trend.append(
                {
                    "month": first.date().isoformat(),
                    "to_date": k == len(months) - 1,
                    "revenue": _money(revenue),
                    "gross_profit": _money(profit),
                    "evaluated_accounts": evaluated,
                    "key_accounts": key,
                    "at_risk_key_accounts": at_risk,
                    "mean_risk_key_accounts": mean,
                }
            )
        out[scope] = {
            "tiers": {
                tier: {
                    "accounts": t.accounts,
                    "active_accounts": t.active_accounts,
                    "revenue_12m": _money(t.revenue),
                    "gross_profit_12m": _money(t.gross_profit),
                    "revenue_at_risk_12m": _money(Decimal(str(t.revenue_at_risk))),
                    "bought_before": t.bought_before,
                    "retained": t.retained,
                }
                for tier, t in figures.tiers.items()
            },
            "satisfaction": satisfaction.get(scope, {"average": None, "answers": 0}),
            "pareto": pareto(figures.profits),
            "trend": trend,
            "lost": lost.get(scope, []),
        }
    return out


async def store_portfolio_summaries(session: AsyncSession, *, now: datetime) -> int:
    """Replace the stored summaries with those as of ``now``, in the caller's transaction;
    returns how many scopes were written."""
    summaries = await portfolio_summaries(session, now=now)
    connection = await session.connection()
    await connection.exec_driver_sql("DELETE FROM portfolio_summaries")
    scopes = list(summaries)
    await connection.exec_driver_sql(
        _REPLACE,
        (
            scopes,
            [None if s == ALL else int(s.split(":", 1)[1]) for s in scopes],
            [now] * len(scopes),
            [json.dumps({k: v for k, v in summaries[s].items() if k != "lost"}) for s in scopes],
            [json.dumps(summaries[s]["lost"]) for s in scopes],
        ),
    )
    return len(scopes)
