"""Per-account purchase summaries from dated transactions: the retention model's inputs.

The service computes these numbers in SQL from the stored orders; the backtest computes them here
from a transactions file, with the same definitions (see ``retention``): days are whole calendar
days given as day numbers (e.g. ``date.toordinal()``), an *order* is a transaction with a positive
amount, and the purchase process counts buying *occasions*: an order placed less than
``occasion_window_days`` days after the first order of the current occasion belongs to it, the
next one opens a new occasion (with a window of 1, each order day is an occasion). The service's
SQL function ``kam_purchase_occasions`` applies the same rule. Transactions with zero or negative
amounts (credit notes, returns) are not orders but do count in revenue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from services.scorer.engine.arrays import BoolArray, FloatArray, IntArray, as_float_array
from services.scorer.engine.retention import BehaviourFacts

YEAR_DAYS = 365


@dataclass(frozen=True)
class PurchaseSummary:
    """One row per account code ``0 .. accounts - 1`` as of an evaluation day.

    ``frequency``, ``recency`` and ``age`` are the BG/NBD ``x``, ``t_x`` and ``T`` in days,
    counted in buying occasions; ``order_days`` is the number of distinct order days (what the
    "order count" baseline ranks by). Accounts without an order on or before the evaluation day have
    nan there (no purchase process to model) and zero revenue. Revenue is the net sum of the
    amounts in the 12 months up to the evaluation day and in the 12 months before those.
    """

    frequency: FloatArray
    recency: FloatArray
    age: FloatArray
    order_days: FloatArray
    days_since_last_order: FloatArray
    revenue_12m: FloatArray
    revenue_previous_12m: FloatArray

    def __len__(self) -> int:
        return len(self.frequency)

    @property
    def has_orders(self) -> BoolArray:
        """Accounts with at least one order on or before the evaluation day."""
        return np.asarray(~np.isnan(self.frequency), dtype=np.bool_)

    def revenue_growth(self) -> FloatArray:
        """Relative change of the last 12 months' revenue on the previous 12; nan without
        positive revenue in the previous 12 months (nothing to compare with)."""
        previous = self.revenue_previous_12m
        known = previous > 0
        growth = np.full(len(self), np.nan)
        growth[known] = (self.revenue_12m[known] - previous[known]) / previous[known]
        return growth

    def behaviour_facts(self) -> BehaviourFacts:
        """The behavioural facts that orders alone give: the order rhythm and revenue growth.
        Satisfaction, complaints, contacts and payments are unknown (nan), which the risk
        treats as no evidence either way."""
        unknown = np.full(len(self), np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            usual_gap = np.where(self.frequency > 0, self.recency / self.frequency, np.nan)
        return BehaviourFacts(
            days_since_last_order=self.days_since_last_order,
            usual_gap_days=usual_gap,
            satisfaction_last=unknown,
            satisfaction_previous=unknown,
            complaints_180d=unknown,
            days_since_last_contact=unknown,
            late_share=unknown,
            avg_days_late=unknown,
            revenue_growth=self.revenue_growth(),
        )

    def distinct_rfm(self) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """``(x, t_x, T, count)`` once per distinct history among accounts with orders: what
        ``fit_bgnbd(x, t_x, T, weights=count)`` takes, far fewer rows than accounts."""
        keep = self.has_orders
        rows = np.column_stack([self.frequency[keep], self.recency[keep], self.age[keep]])
        distinct, counts = np.unique(rows, axis=0, return_counts=True)
        return (
            np.ascontiguousarray(distinct[:, 0]),
            np.ascontiguousarray(distinct[:, 1]),
            np.ascontiguousarray(distinct[:, 2]),
            counts.astype(np.float64),
        )


def _int_column(values: ArrayLike, name: str) -> IntArray:
    array = np.asarray(values)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be a one-dimensional array of integers")
    return array.astype(np.int64, copy=False)


def occasion_starts(key_codes: IntArray, key_days: IntArray, window_days: int) -> BoolArray:
    """Which entries open a buying occasion, for distinct (account, day) entries sorted by
    account then day: each account's first entry, then the first entry at least
    ``window_days`` after the current occasion's first day, and so on.

    The rule is sequential, so it runs in rounds, one occasion of every account at a time (a
    binary search each), not in a Python loop over orders."""
    if window_days < 1:
        raise ValueError("window_days must be at least 1")
    n = len(key_codes)
    starts = np.zeros(n, dtype=np.bool_)
    if not n:
        return starts
    # One ascending key per entry (the caller's sort order): the account, then the day.
    origin = int(key_days.min())
    span = int(key_days.max()) - origin + window_days + 1
    keys = key_codes * span + (key_days - origin)
    current = np.flatnonzero(np.r_[True, key_codes[1:] != key_codes[:-1]])
    while current.size:
        starts[current] = True
        # The account's first entry at or past the end of this occasion's window (the span
        # leaves room for the window, so the target never reaches the next account's keys).
        targets = key_codes[current] * span + (key_days[current] + window_days - origin)
        following = np.searchsorted(keys, targets, side="left")
        inside = following < n
        following, current = following[inside], current[inside]
        current = following[key_codes[following] == key_codes[current]]
    return starts


def summarise_purchases(
    account: ArrayLike,
    day: ArrayLike,
    amount: ArrayLike,
    *,
    accounts: int,
    as_of: int,
    occasion_window_days: int = 1,
) -> PurchaseSummary:
    """Summarise transactions (``account`` codes ``0 .. accounts - 1``, integer ``day``
    numbers, ``amount``) as of the end of day ``as_of``. Transactions after ``as_of`` are
    ignored, so the summary is what the service would have known on that day. The purchase
    process counts occasions of ``occasion_window_days`` (the policy's setting)."""
    codes = _int_column(account, "account")
    days = _int_column(day, "day")
    amounts = as_float_array(amount, "amount")
    if not len(codes) == len(days) == len(amounts):
        raise ValueError("account, day and amount differ in length")
    if len(codes) and (codes.min() < 0 or codes.max() >= accounts):
        raise ValueError(f"account codes must lie in 0 .. {accounts - 1}")

    known = days <= as_of
    ordered = known & (amounts > 0)
    # One key per (account, order day), sorted by account then day: the first and last entry
    # of each account's run are its first and last order day, the run length its order days.
    order_codes, order_days = codes[ordered], days[ordered]
    origin = int(order_days.min()) if len(order_days) else 0
    span = int(order_days.max()) - origin + 1 if len(order_days) else 1
    # A sort and a neighbour comparison: several times faster than np.unique's hashing here.
    keys = np.sort(order_codes * span + (order_days - origin))
    keys = keys[np.r_[True, keys[1:] != keys[:-1]]] if len(keys) else keys
    key_codes, key_days = keys // span, keys % span + origin
    if len(keys):
        starts = np.flatnonzero(np.r_[True, key_codes[1:] != key_codes[:-1]])
        ends = np.r_[starts[1:], len(keys)] - 1
    else:
        starts = ends = np.zeros(0, dtype=np.int64)
    owners = key_codes[starts]

    frequency = np.full(accounts, np.nan)
    recency = np.full(accounts, np.nan)
    age = np.full(accounts, np.nan)
    since_last = np.full(accounts, np.nan)
    distinct_days = np.full(accounts, np.nan)
    first, last = key_days[starts], key_days[ends]
    opens = occasion_starts(key_codes, key_days, occasion_window_days)
    opening = np.flatnonzero(opens)
    if len(keys):
        occasions = np.add.reduceat(opens.astype(np.int64), starts)
        # The last occasion's first day: the latest opening entry at or before each account's
        # last entry.
        last_opening = opening[np.searchsorted(opening, ends, side="right") - 1]
    else:
        occasions = last_opening = starts
    frequency[owners] = occasions - 1
    recency[owners] = key_days[last_opening] - first
    age[owners] = as_of - first
    since_last[owners] = as_of - last
    distinct_days[owners] = ends - starts + 1

    def revenue(after: int, until: int) -> FloatArray:
        window = known & (days > after) & (days <= until)
        sums = np.bincount(codes[window], weights=amounts[window], minlength=accounts)
        return np.asarray(sums, dtype=np.float64)

    return PurchaseSummary(
        frequency=frequency,
        recency=recency,
        age=age,
        order_days=distinct_days,
        days_since_last_order=since_last,
        revenue_12m=revenue(as_of - YEAR_DAYS, as_of),
        revenue_previous_12m=revenue(as_of - 2 * YEAR_DAYS, as_of - YEAR_DAYS),
    )


def ordered_within(
    account: ArrayLike, day: ArrayLike, amount: ArrayLike, *, accounts: int, after: int, until: int
) -> BoolArray:
    """Per account: whether it placed an order (a positive amount) on a day in
    ``(after, until]``. The outcome a no-purchase risk at ``after`` predicts is its negation."""
    codes = _int_column(account, "account")
    days = _int_column(day, "day")
    amounts = as_float_array(amount, "amount")
    window = (days > after) & (days <= until) & (amounts > 0)
    return np.asarray(np.bincount(codes[window], minlength=accounts) > 0, dtype=np.bool_)
