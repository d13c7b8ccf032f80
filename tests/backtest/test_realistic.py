"""The realistic purchase log has the properties its docstring claims, measured on the log itself
(what a backtest sees), and is reproducible from its seed."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from services.cli.backtest import read_transactions
from tests.backtest.realistic import (
    DEFAULT_PROCESS,
    PurchaseLog,
    account_id,
    generate_purchase_log,
    write_purchase_log_csv,
)

ACCOUNTS = 6000
OCCASION_DAYS = 7


@pytest.fixture(scope="module")
def log() -> PurchaseLog:
    return generate_purchase_log(ACCOUNTS, years=4, seed=5)


def _order_days(log: PurchaseLog) -> tuple[np.ndarray, np.ndarray]:
    """(account, day) of each distinct order day, sorted."""
    orders = log.is_order
    pairs = np.unique(np.stack((log.account[orders], log.day[orders]), axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _occasions(log: PurchaseLog) -> dict[int, list[int]]:
    """Each account's buying occasions: an occasion absorbs the orders within a week of its
    first order, so a burst is one occasion."""
    out: dict[int, list[int]] = {}
    account, day = _order_days(log)
    for a, d in zip(account.tolist(), day.tolist(), strict=True):
        starts = out.setdefault(a, [])
        if not starts or d - starts[-1] >= OCCASION_DAYS:
            starts.append(d)
    return out


def _repeat_gaps(log: PurchaseLog) -> np.ndarray:
    account, day = _order_days(log)
    same = account[1:] == account[:-1]
    return np.asarray((day[1:] - day[:-1])[same])


def test_a_fifth_or_so_of_repeat_order_days_come_within_a_week(log: PurchaseLog) -> None:
    gaps = _repeat_gaps(log)
    within_week = float((gaps <= OCCASION_DAYS).mean())
    assert 0.10 <= within_week <= 0.35, within_week
    # Bursts make it so: without follow-up orders far fewer repeat days are that close.
    calm = generate_purchase_log(
        ACCOUNTS, years=4, seed=5, process=replace(DEFAULT_PROCESS, burst_max_extra=0)
    )
    assert float((_repeat_gaps(calm) <= OCCASION_DAYS).mean()) < within_week - 0.04


def test_bursts_are_several_orders_within_six_days(log: PurchaseLog) -> None:
    occasions = _occasions(log)
    account, day = _order_days(log)
    in_burst = 0
    for a, d in zip(account.tolist(), day.tolist(), strict=True):
        first = max(s for s in occasions[a] if s <= d)
        assert d - first < OCCASION_DAYS
        in_burst += d != first
    assert in_burst > 0.05 * len(day)


def test_monthly_order_counts_dip_in_summer_and_peak_at_year_end(log: PurchaseLog) -> None:
    months = np.array([date.fromordinal(int(d)).month for d in log.day[log.is_order]])
    years = np.array([date.fromordinal(int(d)).year for d in log.day[log.is_order]])
    for year in np.unique(years):
        counts = np.bincount(months[years == year], minlength=13)[1:].astype(float)
        relative = counts / counts.mean()
        assert relative[7] < 0.8, (year, relative)  # August
        assert relative[10:].mean() > 1.1, (year, relative)  # November, December
        assert relative[7] == relative.min()


def _returns_after_a_long_gap(log: PurchaseLog) -> tuple[int, int]:
    """(accounts that went silent for more than 120 days and four usual gaps, then bought on
    at least twice more; accounts with a usual gap of at most 60 days and 8+ occasions)."""
    paused = frequent = 0
    for starts in _occasions(log).values():
        gaps = np.diff(starts)
        usual = np.median(gaps) if len(gaps) >= 8 else np.inf
        if usual > 60:
            continue
        frequent += 1
        long_gaps = np.flatnonzero((gaps > 120) & (gaps > 4 * usual))
        paused += bool(long_gaps.size and long_gaps[0] <= len(gaps) - 2)
    return paused, frequent


def test_some_frequent_buyers_pause_for_months_and_come_back(log: PurchaseLog) -> None:
    paused, frequent = _returns_after_a_long_gap(log)
    assert frequent > 1000
    assert 0.05 * frequent <= paused <= 0.6 * frequent, (paused, frequent)
    # Irregular rhythms and slowdowns make some of these gaps; the pauses add the rest.
    steady = generate_purchase_log(
        ACCOUNTS, years=4, seed=5, process=replace(DEFAULT_PROCESS, pauses_per_year=0.0)
    )
    without, frequent_without = _returns_after_a_long_gap(steady)
    assert without / frequent_without < paused / frequent - 0.03


def test_a_good_share_buys_once(log: PurchaseLog) -> None:
    occasions = _occasions(log)
    once = sum(len(starts) == 1 for starts in occasions.values()) / len(occasions)
    assert 0.15 <= once <= 0.45, once
    assert len(occasions) > 0.85 * ACCOUNTS  # some established accounts leave before ordering


def _stretch_before_stopping(log: PurchaseLog) -> tuple[float, float, int]:
    """Mean log ratio of the last two gaps between occasions to the usual (median) gap before
    them, for accounts with 7+ occasions silent in the last year, and for those that bought in
    the last 60 days; and how many silent ones there are."""
    last_day = int(log.day.max())
    stopped, going = [], []
    for starts in _occasions(log).values():
        gaps = np.diff(starts)
        if len(gaps) < 6:
            continue
        stretch = float(np.log(gaps[-2:].mean() / np.median(gaps[:-2])))
        if starts[-1] < last_day - 365:
            stopped.append(stretch)
        elif starts[-1] > last_day - 60:
            going.append(stretch)
    return float(np.mean(stopped)), float(np.mean(going)), len(stopped)


def test_gaps_lengthen_before_an_account_stops(log: PurchaseLog) -> None:
    stopped, going, silent = _stretch_before_stopping(log)
    assert silent > 200
    assert stopped > 0.2
    assert stopped > going + 0.25
    # The fade makes it so: when every leaver stops abruptly the stretch is much smaller.
    abrupt = generate_purchase_log(
        ACCOUNTS, years=4, seed=5, process=replace(DEFAULT_PROCESS, fade_share=0.0)
    )
    assert _stretch_before_stopping(abrupt)[0] < stopped - 0.1


def test_young_accounts_leave_more_often_than_old_ones(log: PurchaseLog) -> None:
    """The churn hazard falls with age (Weibull shape below one), in calendar time."""
    first = {a: starts[0] for a, starts in _occasions(log).items()}
    start = log.start.toordinal()
    newcomers = [a for a, d in first.items() if d > start + 30 and not log.truth_one_time[a]]
    year = 365
    early = [a for a in newcomers if first[a] < start + 2 * year]
    died_first_year = np.mean([log.truth_death[a] < first[a] + year for a in early])
    survived = [a for a in early if log.truth_death[a] >= first[a] + year]
    died_second_year = np.mean([log.truth_death[a] < first[a] + 2 * year for a in survived])
    assert died_first_year > 1.3 * died_second_year, (died_first_year, died_second_year)


def test_sizes_are_heavy_tailed_and_margins_differ(log: PurchaseLog) -> None:
    orders = log.is_order
    revenue = np.bincount(log.account[orders], weights=log.amount[orders])
    cost = np.bincount(log.account[orders], weights=log.cost[orders])
    has = revenue > 0
    ranked = np.sort(revenue[has])[::-1]
    assert ranked[: len(ranked) // 5].sum() / ranked.sum() >= 0.6
    margins = 1 - cost[has] / revenue[has]
    assert np.percentile(margins, 10) < 0.2 < 0.35 < np.percentile(margins, 90)


def test_credit_notes_are_negative_and_rare(log: PurchaseLog) -> None:
    credits = ~log.is_order
    assert 0.002 < credits.mean() < 0.05
    assert (log.cost[credits] <= 0).all()
    assert (log.day >= log.start.toordinal()).all()
    assert (log.day <= log.end.toordinal()).all()


def test_same_seed_same_log_other_seed_another() -> None:
    first = generate_purchase_log(500, years=2, seed=9)
    again = generate_purchase_log(500, years=2, seed=9)
    other = generate_purchase_log(500, years=2, seed=10)
    for name in ("account", "day", "amount", "cost"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.day, other.day[: len(first.day)])


def test_the_csv_is_what_kam_backtest_reads(tmp_path: Path) -> None:
    log = generate_purchase_log(300, years=3, seed=2)
    path = tmp_path / "orders.csv"
    assert write_purchase_log_csv(path, log) == len(log.day)
    read = read_transactions(path)
    assert len(read.day) == len(log.day)
    assert np.array_equal(read.day, log.day)
    assert np.allclose(read.amount, log.amount)
    assert [read.account_ids[i] for i in read.account] == [account_id(a) for a in log.account]


def test_the_command_line_writes_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "cli.csv"
    command = ("-m", "tests.backtest.realistic", str(path), "--accounts", "200", "--years", "2")
    subprocess.run(  # noqa: S603
        [sys.executable, *command, "--seed", "4"], check=True, capture_output=True
    )
    direct = tmp_path / "direct.csv"
    write_purchase_log_csv(direct, generate_purchase_log(200, years=2, seed=4))
    assert path.read_bytes() == direct.read_bytes()
