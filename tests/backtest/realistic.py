"""A realistic B2B purchase log that is NOT drawn from the retention model's own process.

The risk model is a buy-till-you-die model (BG/NBD, Pareto/NBD): Poisson ordering at a constant
rate while alive, a drop-out chance after each order (or an exponential lifetime), gamma and beta
heterogeneity. A model checked only on data it generated proves little. This generator draws
from a process shaped like real business-to-business order logs instead, so that
``kam backtest`` on its output measures how the model copes with what real data does:

- **Accounts arrive over time.** A share is already a customer when the log starts (their age
  then is spread over up to ``prior_years``, they are alive on day one, and their rhythm has
  run for two years before it, so the log opens mid-rhythm); the others make their first order
  on a day spread over the window, more of them later (the portfolio grows).
- **Heterogeneous rhythms.** A fifth of the accounts replenish on a quasi-regular rhythm (gamma
  gaps of shape 4-12 around a usual gap near a month: "monthly, give or take a week"); the rest
  order irregularly, with heavy-tailed log-normal gaps (sigma 1.2-1.8) around a usual (median)
  gap near four months that varies widely by account: sometimes twice in a fortnight, then
  nothing for a year. Larger accounts order more often.
- **Bursts.** A buying occasion is often several orders within days: each follow-up comes 0-6
  days after the occasion's first order (a forgotten item, a split delivery, a second plant).
  The propensity differs by account (beta distributed); about a fifth of repeat order days
  come within a week of the previous one, as in real logs.
- **Seasonality.** Monthly factors (``season``) stretch and squeeze time: a summer dip (August
  at about 60%), a year-end peak (November and December above 120%). Orders falling on a
  weekend move to the Monday, most of them.
- **Temporary slowdowns.** Now and then an account's rate drops to 20-50% for 1.5-5 months (a
  lost project, a budget freeze) and recovers.
- **Pause and return.** Some accounts stop ordering for 4-10 months (a plant shut for
  refurbishment, stock built up, a framework contract tendered) and then resume their rhythm.
- **Churn that does not follow BG/NBD.** The lifetime has a Weibull hazard in the account's age
  with shape below one (young accounts leave more often than old ones), a per-account frailty,
  and longer scales for larger accounts; it is independent of when the account orders, except
  that during a slowdown and for three months after it the hazard is raised
  (``slowdown_hazard_ratio``). Death is not "after an order": it happens in calendar time.
- **Slow down before stopping.** Most accounts that leave fade first: over 2-10 months before
  the end their rate falls to 15-35% of normal (gaps lengthen, then silence). The others stop
  abruptly.
- **One-time buyers.** A share of the new accounts buy once (one occasion, possibly a burst)
  and never again.
- **Money.** Account sizes are heavy-tailed (Pareto); order values are log-normal around a
  typical order that grows with size, follow-up orders of a burst are smaller; margins vary by
  account (large accounts thinner) and a little by order; a few orders get a credit note
  (negative amount, same margin) days to weeks later.

``generate_purchase_log`` returns the log as arrays (for tests and benchmarks, in process);
``write_purchase_log_csv`` writes the CSV ``kam backtest`` reads (``account_id,date,amount,cost``,
ISO dates, credit notes as negative rows). From the command line::

    python -m tests.backtest.realistic OUT.csv --accounts 20000 --years 4 --seed 1

Everything is pure numpy and seeded: the same arguments give the same log, byte for byte;
20,000 accounts over four years take about a second. With the defaults the log is harder for
the model than its own process (``tests/backtest/synthetic.py``, where it reaches an AUC near
0.94) and still easier than the real purchase logs it is checked against (about 0.75 on a
273-day horizon): ``kam backtest`` on it is a check of robustness, not a substitute for them.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

END = date(2025, 12, 31)
DAYS_PER_YEAR = 365.25


@dataclass(frozen=True, slots=True)
class RealisticProcess:
    """The generating process's parameters; the defaults give a plausible industrial supplier.

    Days are calendar days; rates "per year" are Poisson rates of events per account-year."""

    # arrivals
    established_share: float = 0.45  # customers before the log starts
    prior_years: float = 8.0  # their age on day one is spread up to this
    arrival_growth: float = 0.6  # newcomers' arrival density grows like t**arrival_growth
    one_time_share: float = 0.35  # of the newcomers: buy once and never again
    # rhythm
    regular_share: float = 0.2
    regular_gap_days: float = 30.0  # median usual gap of the quasi-regular buyers
    regular_gap_spread: float = 0.45  # log-normal sigma of that gap across accounts
    regular_shape: tuple[float, float] = (4.0, 12.0)  # gamma shape of their gaps (jitter)
    irregular_gap_days: float = 120.0  # median usual gap of the irregular buyers
    irregular_gap_spread: float = 1.0  # log-normal sigma of that gap across accounts
    irregular_sigma: tuple[float, float] = (1.2, 1.8)  # log-normal sigma of their gaps
    gap_size_elasticity: float = 0.2  # usual gap ~ size ** -elasticity
    gap_bounds: tuple[float, float] = (10.0, 720.0)
    growth_spread: float = 0.15  # sd of the per-account log growth of the rate per year
    # bursts: follow-up orders of an occasion, each 0..burst_days days after its first order
    burst_beta: tuple[float, float] = (0.5, 5.0)  # per-account chance of one more order
    burst_max_extra: int = 4
    burst_days: int = 6
    follow_up_value: float = 0.35  # a follow-up order's typical value against a main one
    # calendar: order activity by month, January first (normalised to a mean of one)
    season: tuple[float, ...] = (0.9, 0.95, 1.05, 1.0, 1.0, 0.97, 0.85, 0.6, 1.05, 1.1, 1.2, 1.3)
    weekend_to_monday: float = 0.9  # share of weekend orders booked on the Monday
    # temporary slowdowns and pauses
    slowdowns_per_year: float = 0.12
    slowdown_days: tuple[float, float] = (45.0, 150.0)
    slowdown_level: tuple[float, float] = (0.2, 0.5)
    pauses_per_year: float = 0.08
    pause_days: tuple[float, float] = (120.0, 300.0)
    # churn: Weibull hazard in the account's age
    weibull_shape: float = 0.7  # below one: young accounts leave more often
    life_scale_years: float = 12.0  # median scale of an account of size one
    life_scale_spread: float = 0.7  # log-normal frailty across accounts
    life_size_elasticity: float = 0.25  # larger accounts live longer
    slowdown_hazard_ratio: float = 4.0  # during a slowdown and for ``after_slowdown_days``
    after_slowdown_days: float = 90.0
    fade_share: float = 0.5  # of the accounts that leave: fade first (the others stop abruptly)
    fade_days: tuple[float, float] = (60.0, 300.0)
    fade_level: tuple[float, float] = (0.15, 0.35)  # the rate at the very end of a fade
    # money
    size_pareto: float = 1.3  # tail index of account sizes (smaller is heavier)
    size_cap: float = 1000.0
    order_value: float = 800.0  # typical order of a size-one account, in currency
    value_size_elasticity: float = 0.6
    order_value_spread: float = 0.6  # log-normal sigma of one order around the typical one
    margin_mean: float = 0.28
    margin_spread: float = 0.08  # across accounts
    margin_order_spread: float = 0.04  # within an account
    credit_note_share: float = 0.015  # of orders; a credit note 1-45 days later


DEFAULT_PROCESS = RealisticProcess()

_SLOTS = 2  # slowdowns and pauses per account kept (more than two in a window is rare)


@dataclass(frozen=True)
class PurchaseLog:
    """The log as columns sorted by account, then day. ``day`` is ``date.toordinal()`` (as in
    ``kam backtest``); ``account`` indexes the simulated accounts (some never appear: alive on
    paper, no order in the window). A credit note is a row with a negative amount and cost.

    The ``truth_*`` arrays, one entry per simulated account, say what the log does not: the
    day (ordinal, may be fractional) the account left (``inf`` if it outlived the log), whether
    it faded before, and whether it was a one-time buyer."""

    account: IntArray
    day: IntArray
    amount: FloatArray
    cost: FloatArray
    start: date
    end: date
    truth_death: FloatArray
    truth_faded: BoolArray
    truth_one_time: BoolArray

    @property
    def accounts(self) -> int:
        return len(self.truth_death)

    @property
    def is_order(self) -> BoolArray:
        return self.amount > 0


def _season_clock(
    process: RealisticProcess, start: date, before: int, days: int
) -> tuple[FloatArray, FloatArray]:
    """(calendar day grid from ``-before``, cumulative seasonal activity on it): time runs faster
    in busy months, so gaps drawn in "activity days" map to calendar days through this clock."""
    factors = np.asarray(process.season, dtype=np.float64)
    if factors.shape != (12,) or (factors <= 0).any():
        raise ValueError("season needs twelve positive monthly factors")
    factors = factors / factors.mean()
    months = np.array(
        [(start + timedelta(days=d)).month - 1 for d in range(-before, days)], dtype=np.int64
    )
    grid = np.arange(-before, days + 1, dtype=np.float64)
    clock = np.concatenate(([0.0], np.cumsum(factors[months])))
    return grid, clock


def _lifetimes(
    rng: np.random.Generator,
    process: RealisticProcess,
    birth: FloatArray,
    scale: FloatArray,
    slow_start: FloatArray,
    slow_end: FloatArray,
    span: float,
) -> FloatArray:
    """The day each account leaves (``inf`` after ``span``), from its Weibull cumulative hazard
    on a weekly grid from day 0, raised during slowdowns and after them. Starting at day 0
    conditions the established accounts on being alive when the log starts."""
    grid = np.arange(0.0, span + 7.0, 7.0)
    age = np.maximum(grid[None, :] - birth[:, None], 0.0)
    cumulative = (age / scale[:, None]) ** process.weibull_shape
    step = np.diff(cumulative, axis=1)
    middle = (grid[:-1] + grid[1:]) / 2
    raised = np.zeros(step.shape, dtype=np.bool_)
    for k in range(slow_start.shape[1]):
        raised |= (middle[None, :] >= slow_start[:, k, None]) & (
            middle[None, :] < slow_end[:, k, None] + process.after_slowdown_days
        )
    step = np.where(raised, step * process.slowdown_hazard_ratio, step)
    hazard = np.concatenate((np.zeros((len(birth), 1)), np.cumsum(step, axis=1)), axis=1)
    threshold = rng.exponential(size=len(birth))
    crossed = hazard >= threshold[:, None]
    dies = crossed.any(axis=1)
    cell = np.where(dies, crossed.argmax(axis=1), 1)
    rows = np.arange(len(birth))
    low, high = hazard[rows, cell - 1], hazard[rows, cell]
    share = (threshold - low) / np.maximum(high - low, 1e-12)
    death = grid[cell - 1] + np.clip(share, 0.0, 1.0) * 7.0
    return np.where(dies & (death < span), np.maximum(death, birth), np.inf)


def _intervals(
    rng: np.random.Generator,
    rate_per_year: float,
    length: tuple[float, float],
    first: FloatArray,
    span: float,
) -> tuple[FloatArray, FloatArray]:
    """Up to two intervals per account inside [first, span): (starts, ends), ``inf`` if none."""
    n = len(first)
    years = np.maximum(span - first, 0.0) / DAYS_PER_YEAR
    count = np.minimum(rng.poisson(rate_per_year * years), _SLOTS)
    starts = first[:, None] + rng.random((n, _SLOTS)) * (span - first)[:, None]
    starts = np.sort(starts, axis=1)
    ends = starts + rng.uniform(*length, size=(n, _SLOTS))
    unused = np.arange(_SLOTS)[None, :] >= count[:, None]
    starts[unused] = np.inf
    ends[unused] = np.inf
    # a second interval starts after the first has ended
    starts[:, 1] = np.maximum(starts[:, 1], ends[:, 0])
    ends[:, 1] = np.where(np.isinf(starts[:, 1]), np.inf, np.maximum(ends[:, 1], starts[:, 1]))
    return starts, ends


def generate_purchase_log(
    accounts: int,
    *,
    years: float = 4.0,
    seed: int = 1,
    end: date = END,
    process: RealisticProcess = DEFAULT_PROCESS,
) -> PurchaseLog:
    """Simulate ``accounts`` accounts over the ``years`` ending on ``end`` (inclusive)."""
    if accounts < 1:
        raise ValueError("accounts must be at least 1")
    if not 0 < years <= 30:
        raise ValueError("years must be more than 0 and at most 30")
    p = process
    rng = np.random.default_rng(seed)
    days = round(years * DAYS_PER_YEAR)
    span = float(days)
    start = end - timedelta(days=days - 1)
    n = accounts

    # --- who the accounts are
    established = rng.random(n) < p.established_share
    newcomer_day = span * rng.random(n) ** (1.0 / (1.0 + p.arrival_growth))
    birth = np.where(established, -rng.random(n) * p.prior_years * DAYS_PER_YEAR, newcomer_day)
    one_time = ~established & (rng.random(n) < p.one_time_share)
    size = np.minimum(rng.pareto(p.size_pareto, n) + 1.0, p.size_cap)
    regular = rng.random(n) < p.regular_share
    usual_gap = np.where(
        regular,
        p.regular_gap_days * np.exp(p.regular_gap_spread * rng.standard_normal(n)),
        p.irregular_gap_days * np.exp(p.irregular_gap_spread * rng.standard_normal(n)),
    )
    usual_gap = np.clip(usual_gap * size**-p.gap_size_elasticity, *p.gap_bounds)
    shape = rng.uniform(*p.regular_shape, n)
    sigma = np.where(regular, 0.0, rng.uniform(*p.irregular_sigma, n))
    growth = p.growth_spread * rng.standard_normal(n) / DAYS_PER_YEAR
    burst = rng.beta(*p.burst_beta, n)

    # --- what happens to them
    first = np.maximum(birth, 0.0)
    slow_start, slow_end = _intervals(rng, p.slowdowns_per_year, p.slowdown_days, first, span)
    slow_level = rng.uniform(*p.slowdown_level, (n, _SLOTS))
    pause_start, pause_end = _intervals(rng, p.pauses_per_year, p.pause_days, first, span)
    pause_length = np.subtract(
        pause_end, pause_start, out=np.zeros_like(pause_end), where=np.isfinite(pause_start)
    )
    scale = (
        p.life_scale_years
        * DAYS_PER_YEAR
        * np.exp(p.life_scale_spread * rng.standard_normal(n))
        * size**p.life_size_elasticity
    )
    death = _lifetimes(rng, p, birth, scale, slow_start, slow_end, span)
    death = np.where(one_time, birth + 0.5, death)
    faded = np.isfinite(death) & ~one_time & (rng.random(n) < p.fade_share)
    fade_days = rng.uniform(*p.fade_days, n)
    fade_log_floor = np.log(rng.uniform(*p.fade_level, n))

    def level(who: IntArray, t: FloatArray) -> FloatArray:
        """The account's order rate at ``t`` against its usual one."""
        rate = np.exp(np.clip(growth[who] * (t - first[who]), -1.4, 1.4))
        for k in range(_SLOTS):
            slowed = (t >= slow_start[who, k]) & (t < slow_end[who, k])
            rate = np.where(slowed, rate * slow_level[who, k], rate)
        fading = faded[who]
        into_fade = (t - (death[who] - fade_days[who])) / fade_days[who]
        fade = np.exp(fade_log_floor[who] * np.clip(into_fade, 0.0, 1.0))
        return np.where(fading, rate * fade, rate)

    # --- when they order: occasions, one renewal step for all live accounts at a time
    # The established accounts' rhythm runs for two years before the log starts (only orders
    # from day 0 are kept), so the log opens mid-rhythm rather than with everyone ordering.
    burn_in = 2 * round(DAYS_PER_YEAR)
    grid, clock = _season_clock(p, start, burn_in, days + 4 * round(DAYS_PER_YEAR))
    t = np.where(birth > -burn_in, birth, -burn_in + rng.random(n) * usual_gap)
    owners: list[IntArray] = []
    times: list[FloatArray] = []
    who = np.flatnonzero(t < np.minimum(death, span))
    while who.size:
        owners.append(who)
        times.append(t[who].copy())
        now = t[who]
        pace = np.maximum(level(who, now), 0.05)
        gap = np.where(
            regular[who],
            rng.gamma(shape[who], usual_gap[who] / shape[who]),
            usual_gap[who] * np.exp(sigma[who] * rng.standard_normal(who.size)),
        )
        gap = gap / pace
        later = np.interp(np.interp(now, grid, clock) + gap, clock, grid)
        for k in range(_SLOTS):
            # a pause freezes the account's clock: what was due inside it comes after it
            frozen = (pause_start[who, k] > now) & (pause_start[who, k] <= later)
            later = np.where(frozen, later + pause_length[who, k], later)
        t[who] = later
        who = who[(later < death[who]) & (later < span)]
    occasion_owner = np.concatenate(owners)
    occasion_time = np.concatenate(times)
    in_log = occasion_time >= 0.0
    occasion_owner, occasion_time = occasion_owner[in_log], occasion_time[in_log]

    # --- bursts: follow-up orders of an occasion
    extra = np.minimum(rng.geometric(1.0 - burst[occasion_owner]) - 1, p.burst_max_extra)
    follow_owner = np.repeat(occasion_owner, extra)
    follow_time = np.repeat(occasion_time, extra) + rng.integers(
        0, p.burst_days + 1, follow_owner.size
    )
    owner = np.concatenate((occasion_owner, follow_owner))
    moment = np.concatenate((occasion_time, follow_time))
    follow_up = np.concatenate(
        (np.zeros(occasion_owner.size, np.bool_), np.ones(follow_owner.size, np.bool_))
    )
    order_day = np.floor(moment).astype(np.int64)
    weekday = (start.weekday() + order_day) % 7
    to_monday = (weekday >= 5) & (rng.random(order_day.size) < p.weekend_to_monday)
    order_day = np.where(to_monday, order_day + 7 - weekday, order_day)
    keep = order_day < days
    owner, order_day, follow_up = owner[keep], order_day[keep], follow_up[keep]

    # --- money
    typical = p.order_value * size**p.value_size_elasticity * np.exp(0.3 * rng.standard_normal(n))
    value = typical[owner] * np.exp(p.order_value_spread * rng.standard_normal(owner.size))
    value = np.where(
        follow_up,
        value * p.follow_up_value * np.exp(0.4 * rng.standard_normal(owner.size)),
        value,
    )
    amount = np.round(np.maximum(value, 5.0), 2)
    account_margin = np.clip(
        p.margin_mean - 0.03 * np.log10(size) + p.margin_spread * rng.standard_normal(n),
        0.02,
        0.65,
    )
    margin = np.clip(
        account_margin[owner] + p.margin_order_spread * rng.standard_normal(owner.size),
        -0.05,
        0.8,
    )
    cost = np.round(amount * (1.0 - margin), 2)
    credited = rng.random(owner.size) < p.credit_note_share
    share = rng.uniform(0.05, 1.0, int(credited.sum()))
    credit_day = order_day[credited] + rng.integers(1, 46, share.size)
    inside = credit_day < days
    owner = np.concatenate((owner, owner[credited][inside]))
    order_day = np.concatenate((order_day, credit_day[inside]))
    amount = np.concatenate((amount, -np.round(amount[credited] * share, 2)[inside]))
    cost = np.concatenate((cost, -np.round(cost[credited] * share, 2)[inside]))

    order = np.lexsort((order_day, owner))
    first_ordinal = start.toordinal()
    return PurchaseLog(
        account=owner[order].astype(np.int64),
        day=order_day[order] + first_ordinal,
        amount=amount[order].astype(np.float64),
        cost=cost[order].astype(np.float64),
        start=start,
        end=end,
        truth_death=death + first_ordinal,
        truth_faded=faded,
        truth_one_time=one_time,
    )


def account_id(index: int) -> str:
    """The account key written to the CSV for simulated account ``index``."""
    return f"A{index:06d}"


def write_purchase_log_csv(path: Path, log: PurchaseLog) -> int:
    """Write ``log`` as the CSV ``kam backtest`` reads; returns the rows written."""
    first = int(log.day.min())
    dates = [date.fromordinal(d).isoformat() for d in range(first, int(log.day.max()) + 1)]
    ids = {int(a): account_id(int(a)) for a in np.unique(log.account)}
    with path.open("w", newline="") as handle:
        handle.write("account_id,date,amount,cost\n")
        rows = zip(
            log.account.tolist(),
            (log.day - first).tolist(),
            log.amount.tolist(),
            log.cost.tolist(),
            strict=True,
        )
        handle.writelines(
            f"{ids[a]},{dates[d]},{amount:.2f},{cost:.2f}\n" for a, d, amount, cost in rows
        )
    return len(log.day)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Write a realistic B2B purchase log (not drawn from BG/NBD) as a backtest CSV."
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--accounts", type=int, default=20_000)
    parser.add_argument("--years", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--end", type=date.fromisoformat, default=END, help="last day (ISO)")
    args = parser.parse_args()
    started = time.perf_counter()
    log = generate_purchase_log(args.accounts, years=args.years, seed=args.seed, end=args.end)
    generated = time.perf_counter() - started
    rows = write_purchase_log_csv(args.out, log)
    print(
        f"wrote {rows:,} rows ({int(log.is_order.sum()):,} orders) for "
        f"{len(np.unique(log.account)):,} accounts, {log.start} .. {log.end}, to {args.out} "
        f"(generated in {generated:.1f} s, written in "
        f"{time.perf_counter() - started - generated:.1f} s)"
    )


if __name__ == "__main__":
    main()
