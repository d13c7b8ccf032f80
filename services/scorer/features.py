"""Per-account features, aggregated in SQL over trailing windows as of an evaluation time.

The same aggregates serve a single rescore (a few ids, one statement), the portfolio pass
(every account) and the calibration replay (the same accounts at an earlier cut-off): only
``as_of`` and the id filter change, so the three can never disagree on what a feature means.
For every account the aggregates run as separate statements at the same time, on connections
sharing one snapshot, so that both cores work on them.

Definitions (all windows end at ``as_of`` and ignore anything after it):

- orders count when their status is ``placed``; cancelled and returned orders are not purchases.
- ``revenue_12m``: net amount over 365 days; ``gross_profit_12m``: revenue times the margin rate,
  where ``margin_rate`` is (amount - cost) / amount over the orders whose cost is known.
- purchase history for the retention model: ``x`` distinct order days after the first,
  ``t_x`` days from the first to the last order day, ``T`` days from the first order to
  ``as_of``; ``usual_gap_days`` = t_x / x.
- payments: invoices due in the last 365 days; late = paid after the due date, or unpaid and
  past due at ``as_of``; days late counted to the payment or to ``as_of``.
- satisfaction: the last two survey answers; complaints over 180 days; the contact gap is the
  time since the last interaction of any kind.
- group roll-up: for an account with subsidiaries, their number and their revenue and gross
  profit over 12 months (direct subsidiaries), shown beside the account's own figures.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from services.scorer.engine import AccountFeatures, BehaviourFacts
from services.scorer.engine.arrays import FloatArray

_DAY = 86400.0

# The aggregates, one per source, each grouped by account. Their text is shared by the one
# statement of a rescore and by the parts of a full aggregation, so a feature means the same in
# both. ``{order_filter}`` and its kin narrow a rescore to its accounts.
_AGGREGATES: dict[str, str] = {
    "o": """
SELECT
    o.account_id,
    sum(o.amount) FILTER (
        WHERE o.ordered_at > $2::timestamptz
    ) AS revenue_12m,
    sum(o.amount) FILTER (
        WHERE o.ordered_at > $2::timestamptz AND o.cost IS NOT NULL
    ) AS costed_revenue_12m,
    sum(o.amount - o.cost) FILTER (
        WHERE o.ordered_at > $2::timestamptz AND o.cost IS NOT NULL
    ) AS costed_profit_12m,
    sum(o.amount) FILTER (
        WHERE o.ordered_at <= $2::timestamptz
          AND o.ordered_at > $3::timestamptz
    ) AS revenue_prev_12m,
    count(*) FILTER (WHERE o.ordered_at > $2::timestamptz) AS orders_12m,
    count(*) FILTER (WHERE o.ordered_at > $4::timestamptz) AS orders_90d,
    min(o.ordered_at) AS first_order_at,
    max(o.ordered_at) AS last_order_at,
    count(DISTINCT (o.ordered_at AT TIME ZONE 'UTC')::date) AS order_days
FROM orders o
WHERE o.status = 'placed' AND o.ordered_at <= $1::timestamptz {order_filter}
GROUP BY o.account_id
""",
    "cat": """
-- Distinct (account, category) pairs first: a hash of a few pairs per account, which
-- Postgres can build in parallel, where count(DISTINCT) sorts every order line.
SELECT pairs.account_id, count(*) AS categories_12m
FROM (
    SELECT DISTINCT o.account_id, line ->> 'category' AS category
    FROM orders o CROSS JOIN LATERAL jsonb_array_elements(o.lines) AS line
    WHERE o.status = 'placed' AND o.ordered_at <= $1
      AND o.ordered_at > $2::timestamptz {order_filter}
) pairs
GROUP BY pairs.account_id
""",
    "p": """
SELECT
    p.account_id,
    count(*) AS invoices_due,
    count(*) FILTER (
        WHERE least(coalesce(p.paid_at, $1::timestamptz), $1::timestamptz) > p.due_at
    ) AS invoices_late,
    avg(greatest(extract(epoch FROM
        least(coalesce(p.paid_at, $1::timestamptz), $1::timestamptz) - p.due_at), 0)
    ) / 86400.0 AS avg_days_late
FROM payments p
WHERE p.due_at <= $1::timestamptz
  AND p.due_at > $2::timestamptz {payment_filter}
GROUP BY p.account_id
""",
    "i": """
SELECT
    i.account_id,
    max(i.occurred_at) AS last_interaction_at,
    count(*) FILTER (
        WHERE i.kind = 'complaint' AND i.occurred_at > $5::timestamptz
    ) AS complaints_180d
FROM interactions i
WHERE i.occurred_at <= $1::timestamptz {interaction_filter}
GROUP BY i.account_id
""",
    "s": """
SELECT
    ranked.account_id,
    max(ranked.satisfaction) FILTER (WHERE ranked.rn = 1) AS satisfaction_last,
    max(ranked.satisfaction) FILTER (WHERE ranked.rn = 2) AS satisfaction_previous
FROM (
    SELECT
        i.account_id,
        i.satisfaction,
        row_number() OVER (
            PARTITION BY i.account_id ORDER BY i.occurred_at DESC, i.id DESC
        ) AS rn
    FROM interactions i
    WHERE i.kind = 'survey' AND i.satisfaction IS NOT NULL AND i.occurred_at <= $1
      {interaction_filter}
) ranked
WHERE ranked.rn <= 2
GROUP BY ranked.account_id
""",
}

# The columns of a feature row, in order: the account's own, then each aggregate's.
_ACCOUNT_COLUMNS = ("a.id", "a.parent_id", "a.status", "a.strategic_fit", "a.created_at")
_AGGREGATE_COLUMNS: dict[str, tuple[str, ...]] = {
    "o": (
        "revenue_12m",
        "costed_revenue_12m",
        "costed_profit_12m",
        "revenue_prev_12m",
        "orders_12m",
        "orders_90d",
        "first_order_at",
        "last_order_at",
        "order_days",
    ),
    "cat": ("categories_12m",),
    "p": ("invoices_due", "invoices_late", "avg_days_late"),
    "i": ("last_interaction_at", "complaints_180d"),
    "s": ("satisfaction_last", "satisfaction_previous"),
}


_NO_FILTER = {"order_filter": "", "payment_filter": "", "interaction_filter": ""}


def _one_statement_sql(*, filtered: bool) -> str:
    """One statement for the features of every account or (``filtered``) of the accounts in
    ``$6`` and, for a group's roll-up, their direct subsidiaries."""
    in_target = "IN (SELECT id FROM target)"
    filters = (
        {
            "order_filter": f"AND o.account_id {in_target}",
            "payment_filter": f"AND p.account_id {in_target}",
            "interaction_filter": f"AND i.account_id {in_target}",
        }
        if filtered
        else _NO_FILTER
    )
    ctes = ",\n".join(
        f"{name} AS (\n{sql.format(**filters).strip()}\n)" for name, sql in _AGGREGATES.items()
    )
    columns = [*_ACCOUNT_COLUMNS]
    for name, names in _AGGREGATE_COLUMNS.items():
        columns += [f"{name}.{column}" for column in names]
    joins = "\n".join(f"LEFT JOIN {name} ON {name}.account_id = a.id" for name in _AGGREGATES)
    account_filter, child_filter = (
        ("WHERE a.id = ANY($6::bigint[])", "WHERE c.parent_id = ANY($6::bigint[])")
        if filtered
        else ("", "WHERE false")
    )
    return f"""
WITH target AS (
    SELECT a.id FROM accounts a {account_filter}
    UNION
    SELECT c.id FROM accounts c {child_filter}
),
{ctes}
SELECT {", ".join(columns)}
FROM accounts a
JOIN target t ON t.id = a.id
{joins}
ORDER BY a.id
"""  # noqa: S608 - the text is this module's constants; values travel as $n parameters


SOME_ACCOUNTS_SQL = _one_statement_sql(filtered=True)
ALL_ACCOUNTS_SQL = _one_statement_sql(filtered=False)

# Every account: the aggregates run as separate statements on connections of their own, so that
# Postgres works on them at the same time (the order aggregates alone keep one core busy for
# seconds), all on one snapshot. Grouped so the parts take about as long as each other.
ALL_ACCOUNTS_PARTS: tuple[tuple[str, ...], ...] = (("o",), ("cat",), ("p", "i", "s", "accounts"))
ACCOUNTS_SQL = f"SELECT {', '.join(_ACCOUNT_COLUMNS)} FROM accounts a ORDER BY a.id"  # noqa: S608


def _part_sql(name: str) -> tuple[str, tuple[int, ...]]:
    """The statement of one aggregate over every account, with its parameters renumbered from
    $1 (Postgres cannot type a parameter a statement does not use), and which of the shared
    parameters (0-based) it takes, in order."""
    sql = _AGGREGATES[name].format(**_NO_FILTER)
    used = sorted({int(n) for n in re.findall(r"\$(\d+)", sql)})
    renumber = {n: i for i, n in enumerate(used, 1)}
    sql = re.sub(r"\$(\d+)", lambda m: f"${renumber[int(m.group(1))]}", sql)
    columns = ", ".join(("account_id", *_AGGREGATE_COLUMNS[name]))
    statement = f"SELECT {columns} FROM ({sql}) AS {name}"  # noqa: S608 - module constants
    return statement, tuple(n - 1 for n in used)


_PART_SQL = {name: _part_sql(name) for name in _AGGREGATES} | {"accounts": (ACCOUNTS_SQL, ())}
_SNAPSHOT_ID = re.compile(r"[0-9A-F]+-[0-9A-F]+(-[0-9]+)?")


# What the full aggregation may use on the server: enough memory for its hash tables not to
# spill to disk (~100,000 accounts need ~10 MB each), and no JIT, whose compilation costs more
# than it saves on these statements (measured on 5M orders).
_FULL_AGGREGATION_SETTINGS = ("SET LOCAL jit = off", "SET LOCAL work_mem = '64MB'")


@dataclass(frozen=True)
class FeatureTable:
    """The features of many accounts as columns, in ascending account id order."""

    as_of: datetime
    account_id: np.ndarray[Any, np.dtype[np.int64]]
    parent_id: np.ndarray[Any, np.dtype[np.int64]]  # 0 = no parent
    lost: np.ndarray[Any, np.dtype[np.bool_]]
    columns: dict[str, FloatArray]

    def __len__(self) -> int:
        return len(self.account_id)

    def take(self, mask: np.ndarray[Any, np.dtype[np.bool_]]) -> FeatureTable:
        return FeatureTable(
            as_of=self.as_of,
            account_id=self.account_id[mask],
            parent_id=self.parent_id[mask],
            lost=self.lost[mask],
            columns={name: column[mask] for name, column in self.columns.items()},
        )

    @property
    def has_orders(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        return np.isfinite(self.columns["T"])

    def value_features(self, profit_share_cum: FloatArray) -> AccountFeatures:
        c = self.columns
        return AccountFeatures(
            revenue_12m=c["revenue_12m"],
            gross_profit_12m=c["gross_profit_12m"],
            margin_rate=c["margin_rate"],
            orders_12m=c["orders_12m"],
            days_since_last_order=c["days_since_last_order"],
            usual_gap_days=c["usual_gap_days"],
            categories_12m=c["categories_12m"],
            revenue_growth=c["revenue_growth"],
            late_share=c["late_share"],
            avg_days_late=c["avg_days_late"],
            strategic_fit=c["strategic_fit"],
            account_age_days=c["account_age_days"],
            profit_share_cum=profit_share_cum,
        )

    def behaviour(self) -> BehaviourFacts:
        c = self.columns
        return BehaviourFacts(
            days_since_last_order=c["days_since_last_order"],
            usual_gap_days=c["usual_gap_days"],
            satisfaction_last=c["satisfaction_last"],
            satisfaction_previous=c["satisfaction_previous"],
            complaints_180d=c["complaints_180d"],
            days_since_last_contact=c["days_since_last_contact"],
            late_share=c["late_share"],
            avg_days_late=c["avg_days_late"],
            revenue_growth=c["revenue_growth"],
        )

    def record(self, index: int) -> dict[str, float | None]:
        """One account's features as JSON-safe values (nan becomes None), for its snapshot."""
        out: dict[str, float | None] = {}
        for name, column in self.columns.items():
            value = float(column[index])
            out[name] = None if math.isnan(value) else round(value, 6)
        return out


def _column(rows: list[Any], index: int) -> FloatArray:
    return np.array(
        [math.nan if row[index] is None else float(row[index]) for row in rows], dtype=np.float64
    )


def _days_between(
    later: FloatArray | float, earlier: FloatArray
) -> FloatArray:  # epoch seconds -> days
    return np.asarray((later - earlier) / _DAY, dtype=np.float64)


def _epoch(rows: list[Any], index: int) -> FloatArray:
    return np.array(
        [math.nan if row[index] is None else row[index].timestamp() for row in rows],
        dtype=np.float64,
    )


async def load_features(
    session: AsyncSession, *, as_of: datetime, account_ids: list[int] | None = None
) -> FeatureTable:
    """Aggregate the features of ``account_ids`` (every account when None) as of ``as_of``.

    Set-based: Postgres does the aggregation over orders, payments and interactions; Python
    receives one row per account, never the orders themselves. A few accounts take one
    statement; every account takes one statement per aggregate, run at the same time on
    connections of their own that share this transaction's snapshot.
    """
    connection = await session.connection()
    # The window bounds go in as values: an expression like ``$1 - interval '365 days'`` would
    # be evaluated again for every order row of every filter.
    params = (as_of, *(as_of - timedelta(days=days) for days in (365, 730, 90, 180)))
    if account_ids is not None:
        result = await connection.exec_driver_sql(SOME_ACCOUNTS_SQL, (*params, account_ids))
        return build_feature_table(list(result.all()), as_of=as_of)
    if session.in_nested_transaction():
        # A snapshot cannot be exported from a savepoint (the policy preview runs in one).
        for setting in _FULL_AGGREGATION_SETTINGS:
            await connection.exec_driver_sql(setting)
        result = await connection.exec_driver_sql(ALL_ACCOUNTS_SQL, params)
        return build_feature_table(list(result.all()), as_of=as_of)
    snapshot = await connection.exec_driver_sql("SELECT pg_export_snapshot()")
    snapshot_id = str(snapshot.scalar_one())
    if not _SNAPSHOT_ID.fullmatch(snapshot_id):
        raise RuntimeError(f"unexpected snapshot id {snapshot_id!r}")
    engine = session.bind
    assert isinstance(engine, AsyncEngine), "sessions are bound to the one async engine"
    parts = await asyncio.gather(
        *(_load_parts(engine, snapshot_id, names, params) for names in ALL_ACCOUNTS_PARTS)
    )
    fetched = {name: rows for part in parts for name, rows in part.items()}
    accounts = fetched.pop("accounts")
    by_account = {name: {row[0]: row for row in rows} for name, rows in fetched.items()}
    rows = []
    for account in accounts:
        row = list(account)
        for name, columns in _AGGREGATE_COLUMNS.items():
            found = by_account[name].get(account[0])
            row += found[1:] if found is not None else [None] * len(columns)
        rows.append(row)
    return build_feature_table(rows, as_of=as_of)


async def _load_parts(
    engine: AsyncEngine, snapshot_id: str, names: tuple[str, ...], params: tuple[datetime, ...]
) -> dict[str, list[Any]]:
    """Run the statements ``names`` on a connection of their own, on the snapshot
    ``snapshot_id``."""
    async with engine.connect() as helper:
        repeatable = await helper.execution_options(isolation_level="REPEATABLE READ")
        await repeatable.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{snapshot_id}'")
        for setting in _FULL_AGGREGATION_SETTINGS:
            await repeatable.exec_driver_sql(setting)
        out = {name: await _fetch_part(repeatable, name, params) for name in names}
        await repeatable.rollback()
        return out


async def _fetch_part(
    connection: AsyncConnection, name: str, params: tuple[datetime, ...]
) -> list[Any]:
    sql, used = _PART_SQL[name]
    result = await connection.exec_driver_sql(sql, tuple(params[i] for i in used))
    return list(result.all())


def build_feature_table(rows: list[Any], *, as_of: datetime) -> FeatureTable:
    """Turn the statement's rows into feature columns (vectorised)."""
    now = as_of.timestamp()
    account_id = np.array([row[0] for row in rows], dtype=np.int64)
    parent_id = np.array([row[1] or 0 for row in rows], dtype=np.int64)
    lost = np.array([row[2] == "lost" for row in rows], dtype=np.bool_)
    strategic_fit = _column(rows, 3)
    created = _epoch(rows, 4)
    revenue_12m = np.nan_to_num(_column(rows, 5), nan=0.0)
    costed_revenue = _column(rows, 6)
    costed_profit = _column(rows, 7)
    revenue_prev = _column(rows, 8)
    orders_12m = np.nan_to_num(_column(rows, 9), nan=0.0)
    orders_90d = np.nan_to_num(_column(rows, 10), nan=0.0)
    first_order = _epoch(rows, 11)
    last_order = _epoch(rows, 12)
    order_days = _column(rows, 13)
    categories = np.nan_to_num(_column(rows, 14), nan=0.0)
    invoices_due = _column(rows, 15)
    invoices_late = _column(rows, 16)
    avg_days_late = _column(rows, 17)
    last_interaction = _epoch(rows, 18)
    complaints = np.nan_to_num(_column(rows, 19), nan=0.0)
    satisfaction_last = _column(rows, 20)
    satisfaction_previous = _column(rows, 21)

    with np.errstate(invalid="ignore", divide="ignore"):
        margin_rate = np.where(costed_revenue > 0, costed_profit / costed_revenue, np.nan)
        gross_profit = np.where(np.isfinite(margin_rate), revenue_12m * margin_rate, np.nan)
        gross_profit = np.where(revenue_12m == 0, 0.0, gross_profit)
        x = order_days - 1.0
        t_x = np.floor(_days_between(last_order, first_order))
        T = _days_between(now, first_order)
        usual_gap = np.where(x > 0, t_x / x, np.nan)
        # Growth needs a previous year to compare with: an account whose first order is less
        # than a year old has none, and "up from nothing" is not a growth rate.
        had_previous_year = np.isfinite(first_order) & (first_order <= now - 365 * _DAY)
        previous = np.nan_to_num(revenue_prev, nan=0.0)
        revenue_growth = np.where(
            had_previous_year & (previous > 0), revenue_12m / previous - 1.0, np.nan
        )
        revenue_growth = np.where(
            had_previous_year & (previous <= 0) & (revenue_12m <= 0), 0.0, revenue_growth
        )
        late_share = np.where(invoices_due > 0, invoices_late / invoices_due, np.nan)
    first_seen = np.fmin(created, first_order)
    columns: dict[str, FloatArray] = {
        "revenue_12m": revenue_12m,
        "gross_profit_12m": gross_profit,
        "margin_rate": margin_rate,
        "orders_12m": orders_12m,
        "orders_90d": orders_90d,
        "days_since_last_order": _days_between(now, last_order),
        "usual_gap_days": usual_gap,
        "categories_12m": categories,
        "revenue_growth": revenue_growth,
        "revenue_prev_12m": np.where(had_previous_year, previous, np.nan),
        "late_share": late_share,
        "avg_days_late": np.where(invoices_due > 0, avg_days_late, np.nan),
        "invoices_12m": np.nan_to_num(invoices_due, nan=0.0),
        "satisfaction_last": satisfaction_last,
        "satisfaction_previous": satisfaction_previous,
        "complaints_180d": complaints,
        "days_since_last_contact": _days_between(now, last_interaction),
        "strategic_fit": strategic_fit,
        "account_age_days": np.maximum(_days_between(now, first_seen), 0.0),
        "x": x,
        "t_x": t_x,
        "T": T,
    }
    columns.update(_group_rollup(account_id, parent_id, revenue_12m, gross_profit))
    return FeatureTable(
        as_of=as_of, account_id=account_id, parent_id=parent_id, lost=lost, columns=columns
    )


def _group_rollup(
    account_id: np.ndarray[Any, np.dtype[np.int64]],
    parent_id: np.ndarray[Any, np.dtype[np.int64]],
    revenue: FloatArray,
    profit: FloatArray,
) -> dict[str, FloatArray]:
    """Subsidiary count and their 12-month revenue and gross profit per parent (direct ones)."""
    n = len(account_id)
    subsidiaries = np.zeros(n)
    sub_revenue = np.zeros(n)
    sub_profit = np.zeros(n)
    has_parent = parent_id > 0
    if has_parent.any():
        position = np.searchsorted(account_id, parent_id[has_parent])
        position = np.clip(position, 0, max(n - 1, 0))
        present = account_id[position] == parent_id[has_parent]
        rows = position[present]
        np.add.at(subsidiaries, rows, 1.0)
        np.add.at(sub_revenue, rows, revenue[has_parent][present])
        np.add.at(sub_profit, rows, np.nan_to_num(profit[has_parent][present], nan=0.0))
    none = subsidiaries == 0
    return {
        "subsidiaries": subsidiaries,
        "subsidiaries_revenue_12m": np.where(none, np.nan, sub_revenue),
        "subsidiaries_gross_profit_12m": np.where(none, np.nan, sub_profit),
    }
