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
- purchase history for the retention models, in whole UTC days and in buying *occasions*
  (orders placed less than the policy's ``occasion_window_days`` after an occasion's first order
  belong to it; ``kam_purchase_occasions`` in SQL, ``history.occasion_starts`` in the backtest):
  ``x`` occasions after the first, ``t_x`` days from the first order's day to the last
  occasion's first day, ``T`` days from the first order's day to ``as_of``'s day;
  ``usual_gap_days`` = t_x / x, the usual gap between occasions.
- credit: ``open_invoice_amount`` (invoices of the last 12 months or later not paid by
  ``as_of``) and ``credit_used`` = that over the account's credit limit.
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
# both. ``{order_filter}`` and its kin narrow a statement to its accounts.
#
# Each source also gives the first moment one of its rows enters or leaves a window
# (``*_change_at``): until then, and until the account's data changes, its aggregates as of a
# later time are these ones, and the portfolio pass reuses them instead of aggregating again.
# Only time-only quantities (days since, days late of open invoices) move meanwhile, and those
# are computed from the stored values. Intervals are in hours: a day is not 24 hours across a
# daylight-saving change in the session's time zone.
_AGGREGATES: dict[str, str] = {
    "o": """
SELECT agg.*, agg.occasion[1] AS occasions, agg.occasion[2] AS last_occasion_day
FROM (
SELECT
    o.account_id,
    sum(o.amount) FILTER (
        WHERE o.ordered_at > $2::timestamptz AND o.ordered_at <= $1::timestamptz
    ) AS revenue_12m,
    sum(o.amount) FILTER (
        WHERE o.ordered_at > $2::timestamptz AND o.ordered_at <= $1::timestamptz
          AND o.cost IS NOT NULL
    ) AS costed_revenue_12m,
    sum(o.amount - o.cost) FILTER (
        WHERE o.ordered_at > $2::timestamptz AND o.ordered_at <= $1::timestamptz
          AND o.cost IS NOT NULL
    ) AS costed_profit_12m,
    sum(o.amount) FILTER (
        WHERE o.ordered_at <= $2::timestamptz AND o.ordered_at > $3::timestamptz
    ) AS revenue_prev_12m,
    count(*) FILTER (
        WHERE o.ordered_at > $2::timestamptz AND o.ordered_at <= $1::timestamptz
    ) AS orders_12m,
    count(*) FILTER (
        WHERE o.ordered_at > $4::timestamptz AND o.ordered_at <= $1::timestamptz
    ) AS orders_90d,
    min(o.ordered_at) FILTER (WHERE o.ordered_at <= $1::timestamptz) AS first_order_at,
    max(o.ordered_at) FILTER (WHERE o.ordered_at <= $1::timestamptz) AS last_order_at,
    kam_purchase_occasions(
        array_agg(floor(extract(epoch FROM o.ordered_at) / 86400)::integer ORDER BY o.ordered_at)
            FILTER (WHERE o.ordered_at <= $1::timestamptz),
        $6::integer
    ) AS occasion,
    least(
        min(o.ordered_at) FILTER (WHERE o.ordered_at > $1::timestamptz),
        min(o.ordered_at) FILTER (WHERE o.ordered_at > $4::timestamptz)
            + interval '2160 hours',
        min(o.ordered_at) FILTER (WHERE o.ordered_at > $2::timestamptz)
            + interval '8760 hours',
        min(o.ordered_at) FILTER (WHERE o.ordered_at > $3::timestamptz)
            + interval '17520 hours'
    ) AS orders_change_at
FROM orders o
WHERE o.status = 'placed' {order_filter}
GROUP BY o.account_id
) agg
""",
    # Its rows enter and leave its window with the orders' 12-month window: no change time.
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
    # Days late grow with time for an invoice still open past its due date, so those are
    # counted with the sum of their due dates, and their days late computed for any later time.
    "p": """
SELECT
    p.account_id,
    count(*) FILTER (WHERE p.due_at <= $1::timestamptz) AS invoices_due,
    count(*) FILTER (
        WHERE p.due_at <= $1::timestamptz AND p.paid_at <= $1::timestamptz
          AND p.paid_at > p.due_at
    ) AS invoices_paid_late,
    sum(extract(epoch FROM p.paid_at - p.due_at)) FILTER (
        WHERE p.due_at <= $1::timestamptz AND p.paid_at <= $1::timestamptz
          AND p.paid_at > p.due_at
    ) AS paid_late_seconds,
    count(*) FILTER (
        WHERE p.due_at < $1::timestamptz AND (p.paid_at IS NULL OR p.paid_at > $1::timestamptz)
    ) AS invoices_overdue,
    sum(extract(epoch FROM p.due_at)) FILTER (
        WHERE p.due_at < $1::timestamptz AND (p.paid_at IS NULL OR p.paid_at > $1::timestamptz)
    ) AS overdue_due_epoch,
    sum(p.amount) FILTER (
        WHERE p.paid_at IS NULL OR p.paid_at > $1::timestamptz
    ) AS open_invoice_amount,
    least(
        min(p.due_at) FILTER (WHERE p.due_at >= $1::timestamptz),
        min(p.due_at) + interval '8760 hours',
        min(p.paid_at) FILTER (WHERE p.paid_at > $1::timestamptz)
    ) AS payments_change_at
FROM payments p
WHERE p.due_at > $2::timestamptz {payment_filter}
GROUP BY p.account_id
""",
    "i": """
SELECT
    i.account_id,
    max(i.occurred_at) FILTER (WHERE i.occurred_at <= $1::timestamptz) AS last_interaction_at,
    count(*) FILTER (
        WHERE i.kind = 'complaint' AND i.occurred_at > $5::timestamptz
          AND i.occurred_at <= $1::timestamptz
    ) AS complaints_180d,
    least(
        min(i.occurred_at) FILTER (WHERE i.occurred_at > $1::timestamptz),
        min(i.occurred_at) FILTER (
            WHERE i.kind = 'complaint' AND i.occurred_at > $5::timestamptz
        ) + interval '4320 hours'
    ) AS interactions_change_at
FROM interactions i
WHERE true {interaction_filter}
GROUP BY i.account_id
""",
    # Changes only when a survey arrives or its time comes: the interactions' change time.
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

# The values of each aggregate, in order; those named ``*_at`` are times (epoch seconds).
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
        "occasions",
        "last_occasion_day",
        "orders_change_at",
    ),
    "cat": ("categories_12m",),
    "p": (
        "invoices_due",
        "invoices_paid_late",
        "paid_late_seconds",
        "invoices_overdue",
        "overdue_due_epoch",
        "open_invoice_amount",
        "payments_change_at",
    ),
    "i": ("last_interaction_at", "complaints_180d", "interactions_change_at"),
    "s": ("satisfaction_last", "satisfaction_previous"),
}
VALUE_COLUMNS: tuple[str, ...] = tuple(c for names in _AGGREGATE_COLUMNS.values() for c in names)
_VALUE_INDEX = {name: i for i, name in enumerate(VALUE_COLUMNS)}
_CHANGE_COLUMNS = ("orders_change_at", "payments_change_at", "interactions_change_at")
# The layout of ``account_aggregates.aggregate_values``: bump it whenever the aggregates above
# change, and stored rows of the older layout are aggregated anew.
AGGREGATES_LAYOUT = 2


def _value_sql(source: str, column: str) -> str:
    if column.endswith("_at"):
        return f"extract(epoch FROM {source}.{column})::float8"
    return f"{source}.{column}::float8"


# An account's own columns, its change number (that of its dirty mark, else that its stored
# aggregates include), and, where the statement joins them, its aggregate values.
_ACCOUNT_COLUMNS = (
    "a.id",
    "a.parent_id",
    "a.status = 'lost'",
    "a.strategic_fit::float8",
    "extract(epoch FROM a.created_at)::float8",
    "coalesce(d.seq, c.seq, 0)",
    "a.credit_limit::float8",
)
_ACCOUNT_WIDTH = len(_ACCOUNT_COLUMNS)
_MARKS_JOIN = """
LEFT JOIN dirty_accounts d ON d.account_id = a.id
LEFT JOIN account_aggregates c ON c.account_id = a.id"""

_NO_FILTER = {"order_filter": "", "payment_filter": "", "interaction_filter": ""}


def _one_statement_sql(*, filtered: bool, subsidiaries: bool = True) -> str:
    """One statement for the aggregates of every account or (``filtered``) of the accounts in
    ``$7`` and, for a group's roll-up (``subsidiaries``), their direct subsidiaries."""
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
        columns += [_value_sql(name, column) for column in names]
    joins = "\n".join(f"LEFT JOIN {name} ON {name}.account_id = a.id" for name in _AGGREGATES)
    account_filter = "WHERE a.id = ANY($7::bigint[])" if filtered else ""
    child_filter = (
        "WHERE c.parent_id = ANY($7::bigint[])" if filtered and subsidiaries else "WHERE false"
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
{joins}{_MARKS_JOIN}
ORDER BY a.id
"""  # noqa: S608 - the text is this module's constants; values travel as $n parameters


SOME_ACCOUNTS_SQL = _one_statement_sql(filtered=True)
ONLY_ACCOUNTS_SQL = _one_statement_sql(filtered=True, subsidiaries=False)
ALL_ACCOUNTS_SQL = _one_statement_sql(filtered=False)

# Every account: the aggregates run as separate statements on connections of their own, so that
# Postgres works on them at the same time (the order aggregates alone keep one core busy for
# seconds), all on one snapshot. Grouped so the parts take about as long as each other.
ALL_ACCOUNTS_PARTS: tuple[tuple[str, ...], ...] = (("o",), ("cat",), ("p", "i", "s", "accounts"))
ACCOUNTS_SQL = f"""
SELECT {", ".join(_ACCOUNT_COLUMNS)}
FROM accounts a{_MARKS_JOIN}
ORDER BY a.id
"""  # noqa: S608 - module constants

# What the portfolio pass reads first: every account, and its stored aggregates where they still
# hold as of $1 (clean since they were taken, taken no later than $1, no row entered or left a
# window since, this layout and occasion window), else NULL.
REUSABLE_SQL = f"""
SELECT {", ".join(_ACCOUNT_COLUMNS)},
       CASE WHEN d.account_id IS NULL AND c.layout = $2::smallint
                 AND c.occasion_window_days = $3::smallint
                 AND c.as_of <= $1::timestamptz
                 AND (c.stale_at IS NULL OR c.stale_at > $1::timestamptz)
            THEN c.aggregate_values END
FROM accounts a{_MARKS_JOIN}
ORDER BY a.id
"""  # noqa: S608 - module constants
# Past this share of accounts to aggregate anew, the full aggregation on both cores is faster
# than one statement for the listed accounts.
REAGGREGATE_ALL_ABOVE = 0.25


def _part_sql(name: str) -> tuple[str, tuple[int, ...]]:
    """The statement of one aggregate over every account, with its parameters renumbered from
    $1 (Postgres cannot type a parameter a statement does not use), and which of the shared
    parameters (0-based) it takes, in order."""
    sql = _AGGREGATES[name].format(**_NO_FILTER)
    used = sorted({int(n) for n in re.findall(r"\$(\d+)", sql)})
    renumber = {n: i for i, n in enumerate(used, 1)}
    sql = re.sub(r"\$(\d+)", lambda m: f"${renumber[int(m.group(1))]}", sql)
    columns = ", ".join(
        ("account_id", *(_value_sql(name, column) for column in _AGGREGATE_COLUMNS[name]))
    )
    statement = f"SELECT {columns} FROM ({sql}) AS {name}"  # noqa: S608 - module constants
    return statement, tuple(n - 1 for n in used)


_PART_SQL = {name: _part_sql(name) for name in _AGGREGATES} | {"accounts": (ACCOUNTS_SQL, ())}
_SNAPSHOT_ID = re.compile(r"[0-9A-F]+-[0-9A-F]+(-[0-9]+)?")


# What an aggregation may use on the server: enough memory for its hash tables not to spill
# to disk (~100,000 accounts need ~10 MB each), and no JIT, whose compilation costs more than it
# saves on these statements (measured on 5M orders: the statement for the ~1,500 accounts an
# hourly pass aggregates took 2.7 s of JIT compilation for 1.8 s of work). ``SET LOCAL``: they
# end with the transaction.
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
            credit_used=c["credit_used"],
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


@dataclass(frozen=True)
class Aggregates:
    """Accounts' aggregate rows as of ``as_of``, in ascending account id order: their own
    columns, the change number each row includes, and the values in the order of
    ``VALUE_COLUMNS`` (times as epoch seconds, missing as nan). ``fresh`` marks the rows
    aggregated now, as opposed to stored ones reused."""

    as_of: datetime
    account_id: np.ndarray[Any, np.dtype[np.int64]]
    parent_id: np.ndarray[Any, np.dtype[np.int64]]  # 0 = no parent
    lost: np.ndarray[Any, np.dtype[np.bool_]]
    strategic_fit: FloatArray
    created: FloatArray
    seq: np.ndarray[Any, np.dtype[np.int64]]
    credit_limit: FloatArray
    values: np.ndarray[Any, np.dtype[np.float64]]  # accounts x VALUE_COLUMNS
    fresh: np.ndarray[Any, np.dtype[np.bool_]]
    occasion_window_days: int

    def __len__(self) -> int:
        return len(self.account_id)

    def value(self, name: str) -> FloatArray:
        return np.asarray(self.values[:, _VALUE_INDEX[name]], dtype=np.float64)

    def stale_at(self) -> FloatArray:
        """When each row stops holding by time alone (epoch seconds; inf: not by time)."""
        changes = self.values[:, [_VALUE_INDEX[name] for name in _CHANGE_COLUMNS]]
        return np.asarray(np.min(np.nan_to_num(changes, nan=np.inf), axis=1), dtype=np.float64)

    def take(self, mask: np.ndarray[Any, np.dtype[np.bool_]]) -> Aggregates:
        return Aggregates(
            as_of=self.as_of,
            account_id=self.account_id[mask],
            parent_id=self.parent_id[mask],
            lost=self.lost[mask],
            strategic_fit=self.strategic_fit[mask],
            created=self.created[mask],
            seq=self.seq[mask],
            credit_limit=self.credit_limit[mask],
            values=self.values[mask],
            fresh=self.fresh[mask],
            occasion_window_days=self.occasion_window_days,
        )


def _aggregates(
    rows: list[Any],
    values: list[Any] | None,
    *,
    as_of: datetime,
    fresh: bool | list[bool],
    occasion_window_days: int,
) -> Aggregates:
    """Rows of ``_ACCOUNT_COLUMNS`` (followed by the values, when ``values`` is None) to
    columns."""
    n = len(rows)
    if values is None:
        values = [row[_ACCOUNT_WIDTH:] for row in rows]
    matrix = np.array(values, dtype=np.float64).reshape(n, len(VALUE_COLUMNS))
    return Aggregates(
        as_of=as_of,
        account_id=np.fromiter((row[0] for row in rows), dtype=np.int64, count=n),
        parent_id=np.fromiter((row[1] or 0 for row in rows), dtype=np.int64, count=n),
        lost=np.fromiter((bool(row[2]) for row in rows), dtype=np.bool_, count=n),
        strategic_fit=np.array([row[3] for row in rows], dtype=np.float64).reshape(n),
        created=np.array([row[4] for row in rows], dtype=np.float64).reshape(n),
        seq=np.fromiter((row[5] for row in rows), dtype=np.int64, count=n),
        credit_limit=np.array([row[6] for row in rows], dtype=np.float64).reshape(n),
        values=matrix,
        fresh=np.asarray(fresh, dtype=np.bool_) if isinstance(fresh, list) else np.full(n, fresh),
        occasion_window_days=occasion_window_days,
    )


def _days_between(
    later: FloatArray | float, earlier: FloatArray
) -> FloatArray:  # epoch seconds -> days
    return np.asarray((later - earlier) / _DAY, dtype=np.float64)


def _window_params(as_of: datetime, occasion_window_days: int) -> tuple[datetime | int, ...]:
    # The window bounds go in as values: an expression like ``$1 - interval '365 days'`` would
    # be evaluated again for every order row of every filter.
    bounds = (as_of - timedelta(days=days) for days in (365, 730, 90, 180))
    return (as_of, *bounds, occasion_window_days)


async def load_features(
    session: AsyncSession,
    *,
    as_of: datetime,
    occasion_window_days: int,
    account_ids: list[int] | None = None,
    reuse: bool = False,
) -> FeatureTable:
    """The features of ``account_ids`` (every account when None) as of ``as_of``."""
    aggregates = await load_aggregates(
        session,
        as_of=as_of,
        occasion_window_days=occasion_window_days,
        account_ids=account_ids,
        reuse=reuse,
    )
    return build_feature_table(aggregates)


async def load_aggregates(
    session: AsyncSession,
    *,
    as_of: datetime,
    occasion_window_days: int,
    account_ids: list[int] | None = None,
    reuse: bool = False,
) -> Aggregates:
    """Aggregate ``account_ids`` (and their direct subsidiaries, for the group roll-up), or every
    account when None, as of ``as_of``.

    Set-based: Postgres does the aggregation over orders, payments and interactions; Python
    receives one row per account, never the orders themselves. A few accounts take one
    statement; every account takes one statement per aggregate, run at the same time on
    connections of their own that share this transaction's snapshot. With ``reuse``, every
    account's stored aggregates that still hold as of ``as_of`` are taken as they are and only
    the others are aggregated (all of them anew when they are many). ``occasion_window_days``
    groups the orders into buying occasions (see the policy's ``RiskPolicy``).
    """
    connection = await session.connection()
    window = occasion_window_days
    params = _window_params(as_of, window)
    # For the statements on this connection; the parts on helper connections set their own.
    for setting in _FULL_AGGREGATION_SETTINGS:
        await connection.exec_driver_sql(setting)
    if account_ids is not None:
        result = await connection.exec_driver_sql(SOME_ACCOUNTS_SQL, (*params, account_ids))
        return _aggregates(
            list(result.all()), None, as_of=as_of, fresh=True, occasion_window_days=window
        )
    if reuse:
        plan = await connection.exec_driver_sql(REUSABLE_SQL, (as_of, AGGREGATES_LAYOUT, window))
        rows = list(plan.all())
        stale = [int(row[0]) for row in rows if row[_ACCOUNT_WIDTH] is None]
        if len(stale) <= REAGGREGATE_ALL_ABOVE * len(rows):
            return await _reuse_and_aggregate(connection, rows, stale, params)
    if session.in_nested_transaction():
        # A snapshot cannot be exported from a savepoint (the policy preview runs in one).
        result = await connection.exec_driver_sql(ALL_ACCOUNTS_SQL, params)
        return _aggregates(
            list(result.all()), None, as_of=as_of, fresh=True, occasion_window_days=window
        )
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
    values = []
    for account in accounts:
        row: list[Any] = []
        for name, columns in _AGGREGATE_COLUMNS.items():
            found = by_account[name].get(account[0])
            row += found[1:] if found is not None else [None] * len(columns)
        values.append(row)
    return _aggregates(accounts, values, as_of=as_of, fresh=True, occasion_window_days=window)


async def _reuse_and_aggregate(
    connection: AsyncConnection,
    rows: list[Any],
    stale: list[int],
    params: tuple[datetime | int, ...],
) -> Aggregates:
    """Every account of ``rows`` (``REUSABLE_SQL``): the stored values where they hold, and the
    accounts in ``stale`` aggregated now, in one statement (``params``: the window bounds)."""
    fresh_rows: dict[int, Any] = {}
    if stale:
        result = await connection.exec_driver_sql(ONLY_ACCOUNTS_SQL, (*params, stale))
        fresh_rows = {int(row[0]): row for row in result.all()}
    accounts = []
    values = []
    fresh = []
    for row in rows:
        found = fresh_rows.get(row[0])
        if found is not None:
            accounts.append(found)
            values.append(found[_ACCOUNT_WIDTH:])
            fresh.append(True)
        elif row[_ACCOUNT_WIDTH] is not None:
            accounts.append(row)
            values.append(row[_ACCOUNT_WIDTH])
            fresh.append(False)
        # else: an account created after the plan was read; its own rescore scores it
    as_of, window = params[0], params[-1]
    assert isinstance(as_of, datetime)
    assert isinstance(window, int)
    return _aggregates(accounts, values, as_of=as_of, fresh=fresh, occasion_window_days=window)


async def _load_parts(
    engine: AsyncEngine,
    snapshot_id: str,
    names: tuple[str, ...],
    params: tuple[datetime | int, ...],
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
    connection: AsyncConnection, name: str, params: tuple[datetime | int, ...]
) -> list[Any]:
    sql, used = _PART_SQL[name]
    result = await connection.exec_driver_sql(sql, tuple(params[i] for i in used))
    return list(result.all())


_STORE_AGGREGATES = f"""
INSERT INTO account_aggregates AS c (account_id, seq, layout, occasion_window_days, as_of,
                                    stale_at, aggregate_values)
SELECT u.account_id, u.seq, $2::smallint, $6::smallint, $3::timestamptz,
       CASE WHEN u.stale_at = 'Infinity' THEN NULL ELSE to_timestamp(u.stale_at) END,
       ARRAY[{", ".join(f"u.v{i}" for i in range(len(VALUE_COLUMNS)))}]
FROM unnest($1::bigint[], $4::bigint[], $5::float8[],
            {", ".join(f"${i + 7}::float8[]" for i in range(len(VALUE_COLUMNS)))})
     AS u(account_id, seq, stale_at, {", ".join(f"v{i}" for i in range(len(VALUE_COLUMNS)))})
ORDER BY u.account_id
ON CONFLICT (account_id) DO UPDATE SET
    seq = excluded.seq,
    layout = excluded.layout,
    occasion_window_days = excluded.occasion_window_days,
    as_of = excluded.as_of,
    stale_at = excluded.stale_at,
    aggregate_values = excluded.aggregate_values
WHERE c.seq <= excluded.seq
"""  # noqa: S608 - module constants


async def store_aggregates(session: AsyncSession, aggregates: Aggregates) -> int:
    """Keep the ``fresh`` rows for the passes to come; returns how many.

    A row replaces a stored one unless that one includes a later change (a rescore that ran
    meanwhile), so what is stored never goes back in time."""
    rows = aggregates.take(aggregates.fresh)
    if not len(rows):
        return 0
    columns = [
        [None if math.isnan(v) else v for v in rows.values[:, i].tolist()]
        for i in range(len(VALUE_COLUMNS))
    ]
    connection = await session.connection()
    await connection.exec_driver_sql(
        _STORE_AGGREGATES,
        (
            rows.account_id.tolist(),
            AGGREGATES_LAYOUT,
            aggregates.as_of,
            rows.seq.tolist(),
            rows.stale_at().tolist(),
            aggregates.occasion_window_days,
            *columns,
        ),
    )
    return len(rows)


def build_feature_table(aggregates: Aggregates) -> FeatureTable:
    """Turn aggregate rows into feature columns as of their ``as_of`` (vectorised)."""
    now = aggregates.as_of.timestamp()
    v = aggregates.value
    revenue_12m = np.nan_to_num(v("revenue_12m"), nan=0.0)
    costed_revenue = v("costed_revenue_12m")
    costed_profit = v("costed_profit_12m")
    revenue_prev = v("revenue_prev_12m")
    orders_12m = np.nan_to_num(v("orders_12m"), nan=0.0)
    orders_90d = np.nan_to_num(v("orders_90d"), nan=0.0)
    first_order = v("first_order_at")
    last_order = v("last_order_at")
    occasions = v("occasions")
    last_occasion_day = v("last_occasion_day")
    categories = np.nan_to_num(v("categories_12m"), nan=0.0)
    invoices_due = np.nan_to_num(v("invoices_due"), nan=0.0)
    overdue = np.nan_to_num(v("invoices_overdue"), nan=0.0)
    invoices_late = np.nan_to_num(v("invoices_paid_late"), nan=0.0) + overdue
    # Days late: fixed for the invoices paid, still growing for those open past their due date.
    seconds_late = (
        np.nan_to_num(v("paid_late_seconds"), nan=0.0)
        + overdue * now
        - np.nan_to_num(v("overdue_due_epoch"), nan=0.0)
    )
    last_interaction = v("last_interaction_at")
    complaints = np.nan_to_num(v("complaints_180d"), nan=0.0)

    with np.errstate(invalid="ignore", divide="ignore"):
        margin_rate = np.where(costed_revenue > 0, costed_profit / costed_revenue, np.nan)
        gross_profit = np.where(np.isfinite(margin_rate), revenue_12m * margin_rate, np.nan)
        gross_profit = np.where(revenue_12m == 0, 0.0, gross_profit)
        # The purchase process in whole UTC days, as the backtest counts it: occasions after
        # the first, from the first order's day to the last occasion's first day, and to today.
        first_day = np.floor(first_order / _DAY)
        x = occasions - 1.0
        t_x = last_occasion_day - first_day
        T = math.floor(now / _DAY) - first_day
        usual_gap = np.where(x > 0, t_x / x, np.nan)
        open_invoices = v("open_invoice_amount")
        credit_limit = aggregates.credit_limit
        credit_used = np.where(
            credit_limit > 0, np.nan_to_num(open_invoices, nan=0.0) / credit_limit, np.nan
        )
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
        avg_days_late = np.where(
            invoices_due > 0, np.maximum(seconds_late, 0.0) / invoices_due / _DAY, np.nan
        )
    first_seen = np.fmin(aggregates.created, first_order)
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
        "avg_days_late": avg_days_late,
        "invoices_12m": invoices_due,
        "open_invoice_amount": np.nan_to_num(open_invoices, nan=0.0),
        "credit_limit": credit_limit,
        "credit_used": credit_used,
        "satisfaction_last": v("satisfaction_last"),
        "satisfaction_previous": v("satisfaction_previous"),
        "complaints_180d": complaints,
        "days_since_last_contact": _days_between(now, last_interaction),
        "strategic_fit": aggregates.strategic_fit,
        "account_age_days": np.maximum(_days_between(now, first_seen), 0.0),
        "x": x,
        "t_x": t_x,
        "T": T,
    }
    columns.update(
        _group_rollup(aggregates.account_id, aggregates.parent_id, revenue_12m, gross_profit)
    )
    return FeatureTable(
        as_of=aggregates.as_of,
        account_id=aggregates.account_id,
        parent_id=aggregates.parent_id,
        lost=aggregates.lost,
        columns=columns,
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
