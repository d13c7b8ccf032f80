"""Purchase summaries from dated transactions: the model's x, t_x, T and the order facts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.scorer.engine.history import ordered_within, summarise_purchases

# account, day, amount. Account 0: two orders on day 10 (one buying day), then 20 and 50, a
# credit note on 30 and an order after the evaluation day. Account 1: only a credit note.
# Account 2: one order, on the evaluation day itself. Account 3: nothing at all.
ROWS = [
    (0, 10, 100.0),
    (0, 10, 40.0),
    (0, 20, 80.0),
    (0, 30, -25.0),
    (0, 50, 60.0),
    (0, 120, 70.0),
    (1, 15, -10.0),
    (2, 100, 5.0),
]


def _columns(rows: list[tuple[int, int, float]]) -> tuple[list[int], list[int], list[float]]:
    account, day, amount = zip(*rows, strict=True)
    return list(account), list(day), list(amount)


def test_frequency_recency_age_count_order_days_once() -> None:
    summary = summarise_purchases(*_columns(ROWS), accounts=4, as_of=100)
    assert summary.frequency[0] == 2  # days 20 and 50 after the first, day 10 counted once
    assert summary.recency[0] == 40
    assert summary.age[0] == 90
    assert summary.days_since_last_order[0] == 50
    assert summary.order_days[0] == 3
    assert (summary.frequency[2], summary.recency[2], summary.age[2]) == (0, 0, 0)
    assert list(summary.has_orders) == [True, False, True, False]
    assert math.isnan(summary.frequency[1])  # a credit note is not an order
    assert math.isnan(summary.age[3])


def test_transactions_after_the_evaluation_day_change_nothing() -> None:
    before = summarise_purchases(*_columns(ROWS), accounts=4, as_of=100)
    later = [*ROWS, (3, 101, 9.0), (1, 150, 30.0), (2, 100_000, 1.0)]
    after = summarise_purchases(*_columns(later), accounts=4, as_of=100)
    for name in ("frequency", "recency", "age", "days_since_last_order", "revenue_12m"):
        np.testing.assert_array_equal(getattr(before, name), getattr(after, name))


def test_revenue_windows_and_growth() -> None:
    rows = [
        (0, 1, 100.0),  # previous 12 months of as_of=730: days 1 .. 365
        (0, 400, 60.0),  # last 12 months: 366 .. 730
        (0, 700, -20.0),
        (1, 500, 50.0),  # no revenue in the previous 12 months: growth unknown
        (2, 365, 10.0),
        (2, 366, 30.0),
    ]
    summary = summarise_purchases(*_columns(rows), accounts=3, as_of=730)
    assert list(summary.revenue_12m) == [40.0, 50.0, 30.0]
    assert list(summary.revenue_previous_12m) == [100.0, 0.0, 10.0]
    growth = summary.revenue_growth()
    assert growth[0] == pytest.approx(-0.6)
    assert math.isnan(growth[1])
    assert growth[2] == pytest.approx(2.0)


def test_behaviour_facts_know_orders_only() -> None:
    facts = summarise_purchases(*_columns(ROWS), accounts=4, as_of=100).behaviour_facts()
    assert len(facts) == 4
    assert facts.usual_gap_days[0] == 20  # 40 days over 2 repeat order days
    assert math.isnan(facts.usual_gap_days[2])  # one order: no gap yet
    assert facts.days_since_last_order[2] == 0
    for unknown in (facts.satisfaction_last, facts.complaints_180d, facts.late_share):
        assert np.isnan(unknown).all()


def test_distinct_rows_carry_their_counts() -> None:
    rows = [(a, d, 1.0) for a in range(6) for d in ((0, 10) if a < 4 else (5,))]
    summary = summarise_purchases(*_columns(rows), accounts=7, as_of=20)
    x, t_x, age, count = summary.distinct_rfm()
    assert sorted(zip(x, t_x, age, count, strict=True)) == [(0, 0, 15, 2), (1, 10, 20, 4)]


def test_matches_a_direct_count_on_random_transactions() -> None:
    rng = np.random.default_rng(4)
    n, accounts, as_of = 5000, 300, 700
    account = rng.integers(0, accounts, n)
    day = rng.integers(0, 1000, n)
    amount = rng.choice([-5.0, 0.0, 10.0, 20.0], n, p=[0.05, 0.05, 0.45, 0.45])
    summary = summarise_purchases(account, day, amount, accounts=accounts, as_of=as_of)
    for a in range(accounts):
        mine = (account == a) & (day <= as_of) & (amount > 0)
        order_days = np.unique(day[mine])
        if not len(order_days):
            assert math.isnan(summary.frequency[a])
            continue
        assert summary.frequency[a] == len(order_days) - 1
        assert summary.recency[a] == order_days[-1] - order_days[0]
        assert summary.age[a] == as_of - order_days[0]


def test_ordered_within_is_a_half_open_window() -> None:
    ordered = ordered_within(*_columns(ROWS), accounts=4, after=50, until=120)
    assert list(ordered) == [True, False, True, False]
    assert list(ordered_within(*_columns(ROWS), accounts=4, after=100, until=119)) == [
        False,
        False,
        False,
        False,
    ]


def test_no_orders_at_all_gives_an_empty_summary() -> None:
    summary = summarise_purchases([0], [5], [-1.0], accounts=2, as_of=10)
    assert not summary.has_orders.any()


def _occasions_by_hand(days: list[int], window: int) -> tuple[int, int]:
    """(occasions, first day of the last occasion) of one account's sorted order days."""
    occasions, anchor = 0, -(10**9)
    for day in days:
        if occasions == 0 or day - anchor >= window:
            occasions, anchor = occasions + 1, day
    return occasions, anchor


def test_orders_within_the_window_of_an_occasions_first_order_are_one_occasion() -> None:
    # Days 0, 3, 6 form one occasion (all under 7 days after day 0); 7 opens the next, which
    # 12 joins; 14 opens a third although it is 2 days after 12: the window runs from the
    # occasion's first order, not from the previous order.
    rows = [(0, d, 10.0) for d in (0, 3, 6, 7, 12, 14)]
    summary = summarise_purchases(*_columns(rows), accounts=1, as_of=30, occasion_window_days=7)
    assert summary.frequency[0] == 2
    assert summary.recency[0] == 14
    assert summary.age[0] == 30
    assert summary.order_days[0] == 6
    assert summary.days_since_last_order[0] == 16
    per_day = summarise_purchases(*_columns(rows), accounts=1, as_of=30, occasion_window_days=1)
    assert per_day.frequency[0] == 5


def test_occasions_match_the_sequential_rule_on_random_transactions() -> None:
    rng = np.random.default_rng(11)
    n, accounts, as_of = 6000, 250, 900
    account = rng.integers(0, accounts, n)
    # Bursts: many orders a few days apart, and long gaps.
    day = np.cumsum(rng.choice([1, 2, 3, 5, 40], n)) % 1000
    amount = rng.choice([-5.0, 10.0], n, p=[0.05, 0.95])
    for window in (1, 3, 7, 30):
        summary = summarise_purchases(
            account, day, amount, accounts=accounts, as_of=as_of, occasion_window_days=window
        )
        for a in range(accounts):
            mine = (account == a) & (day <= as_of) & (amount > 0)
            days = sorted(set(day[mine].tolist()))
            if not days:
                continue
            occasions, last_anchor = _occasions_by_hand(days, window)
            assert summary.frequency[a] == occasions - 1
            assert summary.recency[a] == last_anchor - days[0]
            assert summary.age[a] == as_of - days[0]


def test_an_occasion_window_below_one_day_is_refused() -> None:
    with pytest.raises(ValueError, match="window_days"):
        summarise_purchases([0], [1], [1.0], accounts=1, as_of=5, occasion_window_days=0)
