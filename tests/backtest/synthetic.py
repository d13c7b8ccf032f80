"""Dated transactions drawn from a known BG/NBD process, written as a backtest CSV.

Each account makes its first order on a day spread over ``years`` before ``end``; while alive it
orders as a Poisson process with rate ``lambda ~ Gamma(r, alpha)`` per day, and after each repeat
order it drops out with probability ``p ~ Beta(a, b)`` (the process ``simulate_bgnbd`` draws,
with the dates kept). Amounts are log-normal around a per-account typical order.

``python -m tests.backtest.synthetic OUT.csv --accounts 20000`` writes a large file for timing.
"""

from __future__ import annotations

import argparse
import csv
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from services.scorer.engine import BgNbdParams

# About one order every 4 weeks while alive and a drop-out chance of ~1.6% after each order: a
# B2B-like portfolio where about a third of the accounts order nothing in a quarter.
PROCESS = BgNbdParams(r=1.5, alpha=40.0, a=0.5, b=30.0)
END = date(2025, 12, 31)


def simulate_orders(
    params: BgNbdParams, accounts: int, *, years: float, end: date, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(account index, order time in days since ``end - years``), sorted by account."""
    rng = np.random.default_rng(seed)
    span = years * 365.0
    born = rng.uniform(0.0, span, accounts)
    lam = np.maximum(rng.gamma(params.r, 1.0 / params.alpha, accounts), 1e-300)
    dropout = rng.beta(params.a, params.b, accounts)
    owners, times = [np.arange(accounts)], [born]
    now = born.copy()
    active = np.arange(accounts)
    while active.size:
        now[active] += rng.exponential(size=active.size) / lam[active]
        active = active[now[active] <= span]
        owners.append(active)
        times.append(now[active].copy())
        active = active[rng.random(active.size) >= dropout[active]]
    account = np.concatenate(owners)
    order = np.argsort(account, kind="stable")
    return account[order], np.concatenate(times)[order]


def write_orders_csv(
    path: Path,
    accounts: int,
    *,
    seed: int = 1,
    years: float = 4.0,
    end: date = END,
    params: BgNbdParams = PROCESS,
) -> int:
    """Write the CSV (ISO dates, some as datetimes; a few credit notes); returns the rows."""
    account, times = simulate_orders(params, accounts, years=years, end=end, seed=seed)
    rng = np.random.default_rng(seed + 1)
    typical = rng.lognormal(7.0, 1.0, accounts)
    amounts = np.round(typical[account] * rng.lognormal(0.0, 0.4, len(account)), 2)
    margins = rng.uniform(0.1, 0.4, len(account))
    start = end - timedelta(days=int(years * 365))
    days = np.floor(times).astype(int)
    hours = rng.integers(7, 19, len(account))
    as_datetime = rng.random(len(account)) < 0.3
    credit = rng.random(len(account)) < 0.01
    rows = 0
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["account_id", "date", "amount", "cost"])
        for i in range(len(account)):
            day = start + timedelta(days=int(days[i]))
            stamp = f"{day}T{hours[i]:02d}:15:00" if as_datetime[i] else day.isoformat()
            amount = float(amounts[i])
            writer.writerow(
                [f"A{account[i]:06d}", stamp, f"{amount:.2f}", f"{amount * (1 - margins[i]):.2f}"]
            )
            rows += 1
            if credit[i]:  # a partial return some days later: revenue, not an order
                later = min(day + timedelta(days=3), end)
                writer.writerow([f"A{account[i]:06d}", later.isoformat(), f"{-amount / 4:.2f}", ""])
                rows += 1
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--accounts", type=int, default=20_000)
    parser.add_argument("--years", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rows = write_orders_csv(args.out, args.accounts, seed=args.seed, years=args.years)
    print(f"wrote {rows:,} rows for {args.accounts:,} accounts to {args.out}")


if __name__ == "__main__":
    main()
