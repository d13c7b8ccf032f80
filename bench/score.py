"""Scoring benchmark (`make bench-score`): the portfolio pass beside the bare SQL aggregate, and
the time from an accepted order event to the account's new score snapshot.

In one run, on one scratch database:

* **the portfolio**: 100,000 accounts and 5,000,000 orders (with payments and interactions)
  generated set-based in Postgres with a fixed seed: heavy-tailed account sizes, two years of
  seasonal order dates, margins by account, 1-3 category lines an order, a share of accounts that
  stopped ordering (some of them marked lost), an invoice per order of the last 13 months,
  surveys, complaints and other contacts;
* **the ceiling**: the bare aggregate of the placed orders by account, fetched to the client
  (``CEILING_SQL``): the least any per-account order aggregation must do, which the pass does too
  inside its features statement (with its windows, the distinct order days, the categories,
  payments and interactions on top);
* **the portfolio pass**: ``run_portfolio_pass`` in a child process of its own (its peak RSS is
  the pass's), timed as a whole and broken down by wrapping the scorer's functions (no change to
  the scorer): the features (aggregated, or reused from the previous pass), the population fit
  (with its replay of the features one horizon back), then per chunk the row locks, the
  evaluation and the writes. The first pass starts with no stored aggregates and aggregates
  every account; each following one runs as of one hour later than the one before, as the hourly
  cron would, and aggregates again only the accounts whose windows moved in that hour;
* **event to snapshot**: the API (``uvicorn``, as ``kam api``) and a real worker (``kam
  scorer``) against the scratch database, single orders posted for random accounts at a steady
  rate; for each, the time from its 202 to the moment a reader sees the first snapshot of the
  account that counts the order (polled every ``POLL_S``), with the default rescore debounce.

Targets: the hourly pass within 3x the ceiling (median of the runs after the first; the first
is reported beside it), the event-to-snapshot p95 under
2 s with no event left without a snapshot, the pass's memory bounded by the accounts, not the
orders. A missed target is reported, not an error: the exit status is non-zero only when
something failed (a child process, a request, the pass itself).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.common import (
    RESULTS_DIR,
    ROOT,
    BenchError,
    ScorerWorker,
    ScratchUrls,
    UvicornServer,
    flush_redis,
    median,
    named_scratch_urls,
    proc_status_kib,
    quantile,
    recreate_database,
    run_cli,
    wait_for_worker,
)

RESULTS_FILE = RESULTS_DIR / "score.json"
SERVICE_APP = "services.api.app:create_app"
SCORE_DATABASE = "kam_bench_score"
SCORE_REDIS_DB = 6
QUEUE_NAME = "kam:bench-score"

PASS_TARGET = 3.0  # the pass within this many times the bare aggregate
P95_TARGET_S = 2.0
RSS_GROWTH_TARGET_MIB = 1024.0  # 5M orders as Python rows would take several GiB
POLL_S = 0.05
CHILD_RESULT_PREFIX = "BENCH-PASS-RESULT "

CEILING_SQL = """
SELECT account_id, sum(amount), sum(amount - cost), count(*), min(ordered_at), max(ordered_at)
FROM orders
WHERE status = 'placed'
GROUP BY account_id
"""

GENERATOR_CONNECTIONS = 2
ORDER_SLICES = 20
CATEGORIES = (
    "tools",
    "spare parts",
    "fasteners",
    "safety",
    "hydraulics",
    "electrics",
    "consumables",
    "services",
)

# A standard normal variate from two uniforms (Box-Muller), inlined where a row needs one.
_NORMAL = "(sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random()))"

# Per-account traits that shape its orders, payments and interactions; dropped after generation.
_ACCOUNT_TRAITS = f"""
CREATE UNLOGGED TABLE bench_traits AS
SELECT
    n,
    -- heavy-tailed size: lognormal, most accounts order a little, a few a lot
    exp(1.3 * {_NORMAL}) AS weight,
    0.10 + 0.35 * random() AS margin,
    exp(ln(600) + 0.9 * {_NORMAL}) AS order_size,
    CASE WHEN random() < 0.12 THEN now() - random() * interval '700 days'
         ELSE now() - interval '730 days' END AS start_at,
    CASE WHEN random() < 0.15 THEN now() - (120 + random() * 500) * interval '1 day'
         ELSE now() END AS stop_at,
    floor(random() * 8)::int AS category,
    random() AS payer,
    random() AS mood,
    (ARRAY[30, 30, 45, 60])[1 + floor(random() * 4)::int] AS terms_days,
    0 AS orders
FROM generate_series(1, $1::int) AS n
"""

_ACCOUNT_ORDERS = """
UPDATE bench_traits t SET
    stop_at = greatest(t.stop_at, least(now(), t.start_at + interval '30 days')),
    orders = c.orders
FROM (
    SELECT n, (round($1::float8 * sum(weight) OVER (ORDER BY n) / sum(weight) OVER ())
             - round($1::float8 * (sum(weight) OVER (ORDER BY n) - weight)
                     / sum(weight) OVER ()))::int AS orders
    FROM bench_traits
) c
WHERE c.n = t.n
"""

_MANAGERS = """
INSERT INTO managers (external_id, name, capacity, source_version)
SELECT 'BM-' || m, 'Manager ' || m, 9, 1 FROM generate_series(1, greatest($1::int / 250, 1)) m
"""

_ACCOUNTS = """
INSERT INTO accounts (id, external_id, name, industry, region, segment, parent_id, manager_id,
                      credit_limit, payment_terms_days, strategic_fit, status, source_version,
                      created_at, updated_at)
SELECT
    t.n,
    'BA-' || lpad(t.n::text, 6, '0'),
    'Account ' || t.n,
    (ARRAY['manufacturing', 'construction', 'retail', 'logistics', 'energy'])
        [1 + floor(random() * 5)::int],
    (ARRAY['north', 'south', 'east', 'west'])[1 + floor(random() * 4)::int],
    (ARRAY['small', 'mid', 'large'])[1 + least(2, floor(t.weight / 3)::int)],
    -- a few subsidiaries of the first accounts (groups)
    CASE WHEN t.n > $2::int AND random() < 0.03 THEN 1 + floor(random() * $2::int)::bigint END,
    CASE WHEN random() < 0.3 THEN 1 + floor(random() * greatest($1::int / 250, 1))::bigint END,
    round((t.order_size * 20)::numeric, -2),
    t.terms_days,
    CASE WHEN random() < 0.8 THEN 1 + floor(random() * 5)::int END,
    CASE WHEN t.stop_at < now() - interval '300 days' AND random() < 0.4 THEN 'lost'
         ELSE 'active' END,
    1,
    t.start_at - random() * interval '1000 days',
    now()
FROM bench_traits t
ORDER BY t.n
"""

# Order dates: uniform over the account's active span, then bent by t - A sin(2 pi t / year),
# which is monotone and makes the density swing by about +-30% over the year (peak in spring).
_YEAR_S = 365.25 * 86400
_ORDERS = f"""
INSERT INTO orders (external_id, account_id, ordered_at, amount, cost, currency, status, lines,
                    source_version, created_at, updated_at)
SELECT
    'BO-' || lpad(o.n::text, 6, '0') || '-' || lpad(o.k::text, 5, '0'),
    o.n,
    o.ordered_at,
    o.amount,
    CASE WHEN o.r_cost < 0.02 THEN NULL
         ELSE round(o.amount * (1 - o.margin + 0.1 * (o.r_margin - 0.5))::numeric, 2) END,
    'EUR',
    CASE WHEN o.r_status < 0.035 THEN 'cancelled' WHEN o.r_status < 0.06 THEN 'returned'
         ELSE 'placed' END,
    CASE
        WHEN o.r_lines < 0.5 THEN jsonb_build_array(
            jsonb_build_object('category', o.c1, 'quantity', o.q1::text,
                               'amount', o.amount::text))
        WHEN o.r_lines < 0.8 THEN jsonb_build_array(
            jsonb_build_object('category', o.c1, 'quantity', o.q1::text,
                               'amount', round(o.amount * 0.6, 2)::text),
            jsonb_build_object('category', o.c2, 'quantity', o.q2::text,
                               'amount', (o.amount - round(o.amount * 0.6, 2))::text))
        ELSE jsonb_build_array(
            jsonb_build_object('category', o.c1, 'quantity', o.q1::text,
                               'amount', round(o.amount * 0.5, 2)::text),
            jsonb_build_object('category', o.c2, 'quantity', o.q2::text,
                               'amount', round(o.amount * 0.3, 2)::text),
            jsonb_build_object('category', o.c3, 'quantity', o.q3::text,
                               'amount', (o.amount - round(o.amount * 0.5, 2)
                                          - round(o.amount * 0.3, 2))::text))
    END,
    1,
    o.ordered_at,
    o.ordered_at
FROM (
    SELECT
        d.n,
        d.k,
        d.margin,
        to_timestamp(CASE WHEN d.bent BETWEEN d.start_s AND d.stop_s THEN d.bent
                          ELSE d.t END) AS ordered_at,
        round((d.order_size * exp(0.6 * {_NORMAL}))::numeric, 2) + 1 AS amount,
        random() AS r_cost,
        random() AS r_margin,
        random() AS r_status,
        random() AS r_lines,
        ($2::text[])[1 + (d.category + floor(random() ^ 2 * 8)::int) % 8] AS c1,
        ($2::text[])[1 + (d.category + floor(random() ^ 2 * 8)::int) % 8] AS c2,
        ($2::text[])[1 + (d.category + floor(random() ^ 2 * 8)::int) % 8] AS c3,
        1 + floor(random() * random() * 50)::int AS q1,
        1 + floor(random() * random() * 50)::int AS q2,
        1 + floor(random() * random() * 50)::int AS q3
    FROM (
        SELECT
            b.*,
            b.t - {0.3 * _YEAR_S / (2 * 3.141592653589793):.1f}
                * sin(2 * pi() * (b.t - 6.5e6) / {_YEAR_S:.0f}) AS bent
        FROM (
        SELECT
            t.n, k, t.margin, t.order_size, t.category,
            extract(epoch FROM t.start_at) AS start_s,
            extract(epoch FROM t.stop_at) - 60 AS stop_s,
            extract(epoch FROM t.start_at)
                + random() * extract(epoch FROM t.stop_at - t.start_at - interval '60 seconds')
                AS t
        FROM bench_traits t CROSS JOIN LATERAL generate_series(1, t.orders) AS k
        WHERE t.n BETWEEN $1::int AND $3::int
        ) b
    ) d
) o
ORDER BY o.n, o.k
"""

# One invoice per placed order of the last 13 months, due after the account's payment terms;
# most accounts pay on time, some a little late, a few very late; recent ones may be unpaid.
_PAYMENTS = """
INSERT INTO payments (invoice_external_id, account_id, amount, currency, due_at, paid_at,
                      source_version, created_at, updated_at)
SELECT
    'BI-' || substr(p.external_id, 4),
    p.account_id,
    p.amount,
    'EUR',
    p.due_at,
    CASE WHEN p.r_unpaid < 0.01 OR p.paid_at > now() THEN NULL ELSE p.paid_at END,
    1,
    p.ordered_at,
    p.ordered_at
FROM (
    SELECT
        o.external_id, o.account_id, o.amount, o.ordered_at,
        o.ordered_at + t.terms_days * interval '1 day' AS due_at,
        o.ordered_at + t.terms_days * interval '1 day' + interval '1 day' * CASE
            WHEN t.payer < 0.7 THEN -10 * random()
            WHEN t.payer < 0.9 THEN 20 * random() - 5
            ELSE 60 * random() END AS paid_at,
        random() AS r_unpaid
    FROM orders o JOIN bench_traits t ON t.n = o.account_id
    WHERE o.status = 'placed' AND o.ordered_at > now() - interval '400 days'
) p
ORDER BY p.account_id, p.ordered_at
"""

# Calls, emails and visits, satisfaction surveys and complaints: more for bigger accounts, and
# unhappier accounts complain more and answer surveys lower.
_INTERACTIONS = f"""
INSERT INTO interactions (external_id, account_id, channel, direction, kind, occurred_at,
                          satisfaction, source_version, created_at, updated_at)
SELECT
    'BX-' || lpad(i.n::text, 6, '0') || '-' || i.k,
    i.n,
    CASE WHEN i.kind = 'survey' THEN 'email'
         ELSE (ARRAY['phone', 'email', 'meeting', 'visit', 'web', 'seminar', 'call_center'])
              [1 + floor(random() * 7)::int] END,
    CASE WHEN i.kind = 'complaint' OR random() < 0.4 THEN 'inbound' ELSE 'outbound' END,
    i.kind,
    i.occurred_at,
    CASE WHEN i.kind = 'survey'
         THEN greatest(1, least(5, round(1 + 4 * i.mood + 0.8 * {_NORMAL})))::int END,
    1,
    i.occurred_at,
    i.occurred_at
FROM (
    SELECT
        d.n, d.k, d.mood,
        CASE WHEN d.r < 0.18 THEN 'survey'
             WHEN d.r < 0.18 + 0.08 * (1 - d.mood) THEN 'complaint'
             ELSE 'communication' END AS kind,
        d.occurred_at
    FROM (
        SELECT
            t.n, k, t.mood,
            random() AS r,
            greatest(t.start_at, now() - interval '730 days') + random()
                * (least(now(), t.stop_at + interval '90 days')
                   - greatest(t.start_at, now() - interval '730 days')) AS occurred_at
        FROM bench_traits t
        CROSS JOIN LATERAL generate_series(
            1, 1 + floor(6 * random() ^ 2 * (1 + least(t.weight, 5)))::int) AS k
    ) d
) i
ORDER BY i.n, i.occurred_at
"""


async def generate_portfolio(
    dsn: str,
    *,
    accounts: int,
    orders: int,
    seed: int,
    progress: Callable[[str], None],
) -> dict[str, float]:
    """Fill the empty, migrated database; returns the seconds each step took.

    Orders are inserted in slices of accounts on two connections at once (the machine has two
    cores); each slice seeds ``random()`` of its own, so the data is the same on every run."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal started
        now = time.perf_counter()
        seconds[name] = now - started
        started = now

    conns = [await _generator_connection(dsn) for _ in range(GENERATOR_CONNECTIONS)]
    try:
        first = conns[0]
        await first.execute("SELECT setseed($1::float8)", _seed(seed, 0))
        await first.execute(_ACCOUNT_TRAITS, accounts)
        await first.execute(_ACCOUNT_ORDERS, orders)
        await first.execute(_MANAGERS, accounts)
        await first.execute(_ACCOUNTS, accounts, max(accounts // 50, 1))
        await first.execute("SELECT setval(pg_get_serial_sequence('accounts', 'id'), $1)", accounts)
        lap("accounts")
        progress(f"  accounts {accounts:,} in {seconds['accounts']:.1f}s")

        slice_size = max(accounts // ORDER_SLICES, 1)
        slices = iter(enumerate(range(1, accounts + 1, slice_size), start=1))

        async def insert_orders(conn: asyncpg.Connection) -> None:
            for index, low in slices:
                await conn.execute("SELECT setseed($1::float8)", _seed(seed, index))
                await conn.execute(_ORDERS, low, list(CATEGORIES), low + slice_size - 1)

        await asyncio.gather(*(insert_orders(c) for c in conns))
        lap("orders")
        progress(f"  orders {orders:,} in {seconds['orders']:.1f}s")
        await first.execute("SELECT setseed($1::float8)", _seed(seed, ORDER_SLICES + 1))
        await first.execute(_PAYMENTS)
        lap("payments")
        await first.execute(_INTERACTIONS)
        lap("interactions")
        progress(
            f"  payments in {seconds['payments']:.1f}s, "
            f"interactions in {seconds['interactions']:.1f}s"
        )
        await first.execute("DROP TABLE bench_traits")
        await first.execute("ANALYZE")
        lap("analyze")
    finally:
        for conn in conns:
            await conn.close()
    return seconds


async def _generator_connection(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    # Every row is consistent by construction; the foreign-key triggers would only add a lookup
    # per row to the bulk inserts.
    await conn.execute("SET session_replication_role = replica")
    return conn


def _seed(seed: int, index: int) -> float:
    """A ``setseed`` argument in [-1, 1] for slice ``index`` of the run seeded ``seed``."""
    return ((seed * 7919 + index * 104_729) % 20_000) / 10_000 - 1


async def portfolio_shape(dsn: str) -> dict[str, Any]:
    """What was generated: row counts and how the orders spread over the accounts."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            """
            SELECT
                (SELECT count(*) FROM accounts) AS accounts,
                (SELECT count(*) FROM accounts WHERE status = 'lost') AS lost,
                (SELECT count(*) FROM orders) AS orders,
                (SELECT count(*) FROM orders WHERE status = 'placed') AS placed,
                (SELECT count(*) FROM payments) AS payments,
                (SELECT count(*) FROM interactions) AS interactions,
                (SELECT pg_total_relation_size('orders')) AS orders_bytes
            """
        )
        sizes = await conn.fetchrow(
            """
            SELECT
                percentile_disc(0.5) WITHIN GROUP (ORDER BY n) AS p50,
                percentile_disc(0.99) WITHIN GROUP (ORDER BY n) AS p99,
                max(n) AS most,
                count(*) FILTER (WHERE last < now() - interval '180 days') AS stopped
            FROM (SELECT count(*) AS n, max(ordered_at) AS last FROM orders GROUP BY account_id) c
            """
        )
    finally:
        await conn.close()
    assert row is not None
    assert sizes is not None
    return dict(row) | {
        "orders_per_account_p50": sizes["p50"],
        "orders_per_account_p99": sizes["p99"],
        "orders_per_account_max": sizes["most"],
        "accounts_stopped_180d": sizes["stopped"],
    }


# --- The ceiling --------------------------------------------------------------------------------


async def measure_ceiling(dsn: str, runs: int) -> list[float]:
    """Seconds of ``CEILING_SQL`` fetched to the client, ``runs`` times after a warm-up."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.fetch(CEILING_SQL)
        seconds = []
        for _ in range(runs):
            started = time.perf_counter()
            rows = await conn.fetch(CEILING_SQL)
            seconds.append(time.perf_counter() - started)
            if not rows:
                raise BenchError("the bare aggregate returned no rows")
    finally:
        await conn.close()
    return seconds


# --- The portfolio pass (in a child process) ----------------------------------------------------


@dataclass(slots=True)
class PassRun:
    """One portfolio pass as its child process measured it."""

    seconds: float
    accounts: int
    aggregated: int  # accounts aggregated anew (the others reused their stored aggregates)
    breakdown_s: dict[str, float]
    rss_before_mib: float
    peak_rss_mib: float


def run_pass_child(env: Mapping[str, str], log_path: Path, *, hours_ahead: float) -> PassRun:
    """Run one pass in a fresh interpreter (``--pass-child``), as of ``hours_ahead`` hours from
    now, and read what it measured."""
    with log_path.open("ab") as log:
        done = subprocess.run(  # noqa: S603 - this interpreter, this module, a number
            [
                sys.executable,
                "-m",
                "bench.score",
                "--pass-child",
                "--pass-hours",
                f"{hours_ahead:g}",
            ],
            cwd=ROOT,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=log,
            check=False,
            timeout=1800,
        )
    lines = done.stdout.decode(errors="replace").splitlines()
    results = [line for line in lines if line.startswith(CHILD_RESULT_PREFIX)]
    if done.returncode != 0 or not results:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise BenchError(f"the portfolio pass failed ({done.returncode}); its log:\n{tail}")
    data = json.loads(results[-1].removeprefix(CHILD_RESULT_PREFIX))
    return PassRun(**data)


class _Clock:
    """Wall time of the scorer's functions, by name, as the pass calls them."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)

    def wrap_async(self, module: Any, name: str) -> None:
        original: Callable[..., Awaitable[Any]] = getattr(module, name)
        calls = self.calls[name]

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                calls.append(time.perf_counter() - started)

        setattr(module, name, timed)

    def wrap_sync(self, module: Any, name: str) -> None:
        original: Callable[..., Any] = getattr(module, name)
        calls = self.calls[name]

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                calls.append(time.perf_counter() - started)

        setattr(module, name, timed)

    def total(self, name: str) -> float:
        return sum(self.calls.get(name, []))


def pass_breakdown(clock: _Clock, total_s: float) -> dict[str, float]:
    """The pass's time by step. ``load_aggregates`` reads (or aggregates) every account's
    aggregates now; ``load_features`` runs only inside ``fit_population``, for the calibration
    replay one horizon back."""
    aggregates = clock.total("load_aggregates")
    to_arrays = clock.total("build_feature_table")
    stored = clock.total("store_aggregates")
    replay = clock.total("load_features")
    fit = clock.total("fit_population")
    models = clock.total("fit_retention_models")
    steps = {
        "features: aggregate or reuse (SQL, fetch)": aggregates,
        "features: rows to arrays": to_arrays,
        "features: store the new aggregates": stored,
        "population fit: replay features": replay,
        "population fit: BG/NBD and Pareto/NBD fits (now and replay)": models,
        "population fit: other numpy": fit - replay - models,
        "state: read every account's": clock.total("read_state"),
        "chunks: lock and read state": clock.total("lock_state"),
        "evaluate (score, tier, risk)": clock.total("evaluate") - clock.total("_drivers"),
        "evaluate: drivers (reasons)": clock.total("_drivers"),
        "chunks: store: feature records": clock.total("record"),
        "chunks: store: JSON and SQL": clock.total("store") - clock.total("record"),
    }
    chunks = (
        clock.total("read_state")
        + clock.total("lock_state")
        + clock.total("evaluate")
        + clock.total("store")
    )
    steps["other (transactions, commits)"] = (
        total_s - aggregates - to_arrays - stored - fit - chunks
    )
    return steps


async def _pass_in_this_process(hours_ahead: float) -> PassRun:
    from services.logging import configure_logging
    from services.scorer import evaluation, features, passes, population
    from shared.db import create_engine, create_sessionmaker
    from shared.settings import Settings

    settings = Settings()
    configure_logging(settings)
    clock = _Clock()
    aggregated: list[int] = []
    load_aggregates = features.load_aggregates

    async def counted(*args: Any, **kwargs: Any) -> features.Aggregates:
        result = await load_aggregates(*args, **kwargs)
        aggregated.append(int(result.fresh.sum()))
        return result

    vars(passes)["load_aggregates"] = counted  # the pass's own call, wrapped again below
    clock.wrap_async(passes, "load_aggregates")
    clock.wrap_sync(passes, "build_feature_table")
    clock.wrap_async(passes, "store_aggregates")
    clock.wrap_async(population, "load_features")
    clock.wrap_async(passes, "fit_population")
    clock.wrap_sync(population, "fit_retention_models")
    clock.wrap_async(passes, "read_state")
    clock.wrap_async(passes, "lock_state")
    clock.wrap_sync(passes, "evaluate")
    clock.wrap_async(passes, "store")
    clock.wrap_sync(evaluation, "_drivers")
    clock.wrap_sync(features.FeatureTable, "record")
    engine = create_engine(settings)
    try:
        rss_before = _rss_mib()
        started = time.perf_counter()
        accounts = await passes.run_portfolio_pass(
            create_sessionmaker(engine), now=datetime.now(UTC) + timedelta(hours=hours_ahead)
        )
        seconds = time.perf_counter() - started
    finally:
        await engine.dispose()
    if accounts is None:
        raise BenchError("another portfolio pass held the lock")
    return PassRun(
        seconds=seconds,
        accounts=accounts,
        aggregated=sum(aggregated),
        breakdown_s=pass_breakdown(clock, seconds),
        rss_before_mib=rss_before,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def _rss_mib() -> float:
    return proc_status_kib(os.getpid(), "VmRSS") / 1024


def pass_child_main(hours_ahead: float) -> int:
    run = asyncio.run(_pass_in_this_process(hours_ahead))
    print(CHILD_RESULT_PREFIX + json.dumps(asdict(run)), flush=True)
    return 0


# --- Event to snapshot --------------------------------------------------------------------------


@dataclass(slots=True)
class SentEvent:
    account_id: int
    ordered_at: float  # epoch seconds, as sent
    sent_at: float
    accepted_at: float = 0.0  # when the 202 arrived
    status: int = 0


@dataclass(frozen=True, slots=True)
class SeenSnapshot:
    account_id: int
    computed_at: float
    last_order_at: float  # as the snapshot's features saw it
    seen_at: float


@dataclass(slots=True)
class LatencyResult:
    events: int
    rate_per_s: float
    seconds: float
    latencies_s: list[float]
    started_s: list[float]  # 202 to the start of the rescore that counted the event
    accept_s: list[float]  # request to 202
    missing: int
    failures: list[str] = field(default_factory=list)
    worker_peak_rss_mib: float = 0.0
    # The slowest events and what came before them on the same account (for the report).
    slowest: list[dict[str, Any]] = field(default_factory=list)
    over_target: int = 0


class SnapshotWatcher:
    """Polls ``score_snapshots`` for new rows and notes when each was first seen.

    Concurrent rescores commit out of id order, so every poll looks back ``LOOK_BACK`` ids below
    the highest seen and skips the ids it already has."""

    LOOK_BACK = 500

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self.by_account: dict[int, list[SeenSnapshot]] = defaultdict(list)
        self._seen: set[int] = set()
        self._high = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            self._high = await conn.fetchval("SELECT coalesce(max(id), 0) FROM score_snapshots")
            while not self._stop.is_set():
                rows = await conn.fetch(
                    """
                    SELECT id, account_id, extract(epoch FROM computed_at)::float8 AS computed,
                           (features ->> 'days_since_last_order')::float8 AS since_last
                    FROM score_snapshots WHERE id > $1 ORDER BY id
                    """,
                    self._high - self.LOOK_BACK,
                )
                now = time.time()
                for row in rows:
                    if row["id"] in self._seen:
                        continue
                    self._seen.add(row["id"])
                    self._high = max(self._high, row["id"])
                    since_last = row["since_last"]
                    last_order = (
                        row["computed"] - since_last * 86400 if since_last is not None else 0.0
                    )
                    self.by_account[row["account_id"]].append(
                        SeenSnapshot(row["account_id"], row["computed"], last_order, now)
                    )
                await asyncio.sleep(POLL_S)
        finally:
            await conn.close()

    def stop(self) -> None:
        self._stop.set()

    def first_counting(self, event: SentEvent) -> SeenSnapshot | None:
        """The first snapshot of the account whose features include the event's order (its last
        order is at least as recent; ``days_since_last_order`` is stored to 1e-6 days, 0.09 s)."""
        for snapshot in self.by_account.get(event.account_id, []):
            if snapshot.last_order_at >= event.ordered_at - 0.1:
                return snapshot
        return None


def order_body(
    run_tag: str, index: int, account: int, ordered_at: float, rng: random.Random
) -> bytes:
    cents = rng.randrange(5_000, 500_000)
    category = rng.choice(CATEGORIES)
    stamp = datetime.fromtimestamp(ordered_at, UTC).isoformat(timespec="milliseconds")
    return json.dumps(
        {
            "event_id": f"bench-score-{run_tag}-{index}",
            "version": 1,
            "external_id": f"BE-{run_tag}-{index}",
            "account_external_id": f"BA-{account:06d}",
            "ordered_at": stamp.replace("+00:00", "Z"),
            "amount": f"{cents / 100:.2f}",
            "cost": f"{cents * 0.7 / 100:.2f}",
            "currency": "EUR",
            "status": "placed",
            "lines": [{"category": category, "quantity": "1", "amount": f"{cents / 100:.2f}"}],
        }
    ).encode()


async def stream_events(
    base_url: str,
    api_key: str,
    *,
    accounts: int,
    rate: float,
    seconds: float,
    first_index: int,
    rng: random.Random,
) -> list[SentEvent]:
    """POST single orders at a steady rate, open loop (a slow answer does not delay the next).
    Ids carry the run's start time: a rerun on kept data must not send duplicates."""
    run_tag = f"{int(time.time())}"
    headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json"}
    count = max(1, round(rate * seconds))
    events: list[SentEvent] = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30.0) as client:

        async def send(event: SentEvent, body: bytes) -> None:
            event.sent_at = time.time()
            try:
                response = await client.post("/v1/orders", content=body, headers=headers)
                event.status = response.status_code
                if event.status == 202 and response.json().get("status") != "accepted":
                    event.status = -2  # stored before, or stale: it would rescore nothing
            except httpx.HTTPError:
                event.status = -1
            event.accepted_at = time.time()

        tasks = []
        started = time.perf_counter()
        for i in range(count):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            account = rng.randint(1, accounts)
            ordered_at = round(time.time(), 3)
            event = SentEvent(account_id=account, ordered_at=ordered_at, sent_at=0.0)
            events.append(event)
            body = order_body(run_tag, first_index + i, account, ordered_at, rng)
            tasks.append(asyncio.create_task(send(event, body)))
        await asyncio.gather(*tasks)
    return events


async def measure_latency(
    urls: ScratchUrls,
    api: UvicornServer,
    worker: ScorerWorker,
    api_key: str,
    args: argparse.Namespace,
    accounts: int,
) -> LatencyResult:
    await api.wait_ready()
    await wait_for_worker(urls.redis_url, QUEUE_NAME, worker)
    rng = random.Random(args.seed)
    watcher = SnapshotWatcher(urls.asyncpg_dsn)
    watching = asyncio.create_task(watcher.run())
    try:
        await asyncio.sleep(0.5)
        # Warm up the API and the worker (imports, connections, first queries) unmeasured.
        warm = await stream_events(
            api.base_url,
            api_key,
            accounts=accounts,
            rate=args.rate,
            seconds=2,
            first_index=0,
            rng=rng,
        )
        await _wait_counted(watcher, warm, api, worker, timeout_s=30)
        print(f"  streaming {args.rate:g} orders/s for {args.stream_seconds:g}s", flush=True)
        started = time.perf_counter()
        events = await stream_events(
            api.base_url,
            api_key,
            accounts=accounts,
            rate=args.rate,
            seconds=args.stream_seconds,
            first_index=len(warm),
            rng=rng,
        )
        seconds = time.perf_counter() - started
        await _wait_counted(watcher, events, api, worker, timeout_s=args.settle_seconds)
    finally:
        watcher.stop()
        await watching

    failures = [
        f"event {i}: " + ("not accepted as new" if e.status == -2 else f"HTTP {e.status}")
        for i, e in enumerate(events)
        if e.status != 202
    ]
    latencies, rescore_started, accept = [], [], []
    timed: list[dict[str, Any]] = []
    previous_on_account: dict[int, float] = {}
    missing = 0
    for index, event in enumerate(events):
        accept.append(event.accepted_at - event.sent_at)
        before = previous_on_account.get(event.account_id)
        previous_on_account[event.account_id] = event.accepted_at
        snapshot = watcher.first_counting(event)
        if snapshot is None:
            missing += 1
            continue
        latencies.append(snapshot.seen_at - event.accepted_at)
        rescore_started.append(snapshot.computed_at - event.accepted_at)
        timed.append(
            {
                "event": index,
                "account_id": event.account_id,
                "latency_s": latencies[-1],
                "previous_event_on_account_s_before": (
                    None if before is None else event.accepted_at - before
                ),
            }
        )
    slowest = sorted(timed, key=lambda t: -float(t["latency_s"]))[:5]
    return LatencyResult(
        events=len(events),
        rate_per_s=len(events) / seconds if seconds else 0.0,
        seconds=seconds,
        latencies_s=latencies,
        started_s=rescore_started,
        accept_s=accept,
        missing=missing,
        slowest=slowest,
        over_target=sum(1 for v in latencies if v >= P95_TARGET_S),
        failures=failures,
        worker_peak_rss_mib=worker.peak_rss_mib(),
    )


async def _wait_counted(
    watcher: SnapshotWatcher,
    events: Sequence[SentEvent],
    api: UvicornServer,
    worker: ScorerWorker,
    *,
    timeout_s: float,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        api.check_alive()
        worker.check_alive()
        if all(watcher.first_counting(e) is not None for e in events if e.status == 202):
            return
        await asyncio.sleep(0.2)


# --- Report -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Results:
    shape: dict[str, Any] = field(default_factory=dict)
    generation_s: dict[str, float] = field(default_factory=dict)
    ceiling_s: list[float] = field(default_factory=list)
    passes: list[PassRun] = field(default_factory=list)
    latency: LatencyResult | None = None
    debounce_s: float = 0.0
    # The machine's 1-minute load average as each measurement began: other work on the two
    # cores (another benchmark, a build) shows here and in every figure.
    load: dict[str, float] = field(default_factory=dict)

    def note_load(self, phase: str) -> None:
        self.load[phase] = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0

    @property
    def ceiling(self) -> float:
        return median(self.ceiling_s)

    @property
    def hourly(self) -> list[PassRun]:
        """The passes after the first, which find the previous pass's aggregates."""
        return self.passes[1:]

    @property
    def pass_s(self) -> float:
        return median([p.seconds for p in self.hourly])

    @property
    def first_pass_s(self) -> float:
        return self.passes[0].seconds

    @property
    def peak_rss_mib(self) -> float:
        return max((p.peak_rss_mib for p in self.passes), default=0.0)

    @property
    def rss_growth_mib(self) -> float:
        return max((p.peak_rss_mib - p.rss_before_mib for p in self.passes), default=0.0)


@dataclass(frozen=True, slots=True)
class Row:
    figure: str
    value: str
    ceiling: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None


def table_rows(results: Results, settle_s: float = 30.0) -> list[Row]:
    rows: list[Row] = []
    ceiling = results.ceiling
    if results.ceiling_s:
        rows.append(Row("bare aggregate of the orders (ceiling)", f"{ceiling:.2f} s"))
    if results.passes:
        first = results.first_pass_s / ceiling if ceiling else float("inf")
        rows.append(
            Row(
                "first portfolio pass (aggregates all)",
                f"{results.first_pass_s:.2f} s",
                f"{ceiling:.2f} s",
                f"{first:.1f}x",
            )
        )
    if results.hourly:
        ratio = results.pass_s / ceiling if ceiling else float("inf")
        rows.append(
            Row(
                "hourly portfolio pass (every account)",
                f"{results.pass_s:.2f} s",
                f"{ceiling:.2f} s",
                f"{ratio:.1f}x",
                f"<= {PASS_TARGET:g}x",
                ratio <= PASS_TARGET,
            )
        )
    if results.passes:
        rows.append(
            Row(
                "peak RSS of the pass process",
                f"{results.peak_rss_mib:,.0f} MiB",
                target=f"+{RSS_GROWTH_TARGET_MIB:,.0f} MiB max",
                ratio=f"+{results.rss_growth_mib:,.0f} MiB",
                met=results.rss_growth_mib <= RSS_GROWTH_TARGET_MIB,
            )
        )
    latency = results.latency
    if latency is not None:
        floor = f"{results.debounce_s:.2f} s"

        def vs_floor(value: float) -> str:
            return f"{value / results.debounce_s:.1f}x" if results.debounce_s else ""

        p50 = quantile(latency.latencies_s, 0.5)
        p95 = quantile(latency.latencies_s, 0.95)
        worst = max(latency.latencies_s, default=0.0)
        rows += [
            Row("event to snapshot p50", f"{p50:.3f} s", floor, vs_floor(p50)),
            Row(
                "event to snapshot p95",
                f"{p95:.3f} s",
                floor,
                vs_floor(p95),
                f"< {P95_TARGET_S:g} s",
                p95 < P95_TARGET_S and bool(latency.latencies_s),
            ),
            Row("event to snapshot max", f"{worst:.3f} s", floor, vs_floor(worst)),
            Row(
                f"events without a snapshot ({settle_s:g} s after)",
                f"{latency.missing} of {latency.events:,}",
                target="0",
                met=latency.missing == 0,
            ),
            Row("peak RSS of the worker", f"{latency.worker_peak_rss_mib:,.0f} MiB"),
        ]
    return rows


def render_table(rows: Sequence[Row]) -> str:
    cells = [("figure", "value", "ceiling", "ratio", "target", "met?")]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "NO")
        cells.append((r.figure, r.value, r.ceiling, r.ratio, r.target, met))
    widths = [max(len(c[i]) for c in cells) for i in range(6)]

    def line(row: tuple[str, ...]) -> str:
        parts = [
            c.ljust(w) if i in (0, 4, 5) else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(cells[0]), "-" * len(line(cells[0])), *(line(c) for c in cells[1:])])


def render_details(results: Results) -> str:
    lines: list[str] = []
    shape = results.shape
    if shape:
        lines.append(
            f"portfolio: {shape['accounts']:,} accounts ({shape['lost']:,} lost, "
            f"{shape['accounts_stopped_180d']:,} without an order in 180 days), "
            f"{shape['orders']:,} orders ({shape['placed']:,} placed; per account p50 "
            f"{shape['orders_per_account_p50']}, p99 {shape['orders_per_account_p99']}, max "
            f"{shape['orders_per_account_max']}), {shape['payments']:,} payments, "
            f"{shape['interactions']:,} interactions; orders table "
            f"{shape['orders_bytes'] / 2**20:,.0f} MiB"
        )
    if results.generation_s:
        steps = ", ".join(f"{k} {v:.1f}s" for k, v in results.generation_s.items())
        total = sum(results.generation_s.values())
        lines.append(f"generated in {total:.0f}s (not a target): {steps}")
    if results.ceiling_s:
        runs = " / ".join(f"{s:.2f}" for s in results.ceiling_s)
        lines.append(
            f"ceiling: SELECT account_id, sum(amount), sum(amount - cost), count(*), "
            f"min(ordered_at), max(ordered_at) FROM orders WHERE status = 'placed' GROUP BY "
            f"account_id, every row fetched by asyncpg; runs {runs} s (median quoted, after a "
            "warm-up run)"
        )
    if results.passes:
        runs = " / ".join(
            f"{p.seconds:.2f} s ({p.aggregated:,} aggregated)" for p in results.passes
        )
        lines.append(
            f"portfolio pass runs: {runs}; each in a fresh process, the first with no stored "
            "aggregates, each next one an hour later (median of those quoted)"
        )
        lines.append("pass breakdown (seconds by run; share of the median run):")
        middle = sorted(results.passes, key=lambda p: p.seconds)[len(results.passes) // 2]
        for step in middle.breakdown_s:
            values = " / ".join(f"{p.breakdown_s.get(step, 0.0):6.2f}" for p in results.passes)
            share = middle.breakdown_s[step] / middle.seconds if middle.seconds else 0.0
            lines.append(f"  {step:<38} {values}   {share:5.1%}")
        rss = " / ".join(f"{p.rss_before_mib:.0f} -> {p.peak_rss_mib:.0f}" for p in results.passes)
        lines.append(f"pass process RSS before the pass -> peak (MiB): {rss}")
    latency = results.latency
    if latency is not None:
        lines.append(
            f"events: {latency.events:,} single orders for random accounts at "
            f"{latency.rate_per_s:.1f}/s over {latency.seconds:.0f}s; rescore debounce "
            f"{results.debounce_s:g} s (the default); a snapshot counts when a reader polling "
            f"every {POLL_S * 1000:.0f} ms sees it"
        )
        if latency.started_s:
            lines.append(
                f"  202 to the start of the rescore that counted it: p50 "
                f"{quantile(latency.started_s, 0.5):.3f} s, p95 "
                f"{quantile(latency.started_s, 0.95):.3f} s; request to 202: p50 "
                f"{quantile(latency.accept_s, 0.5) * 1000:.0f} ms, p95 "
                f"{quantile(latency.accept_s, 0.95) * 1000:.0f} ms"
            )
        lines.append(
            f"  events over {P95_TARGET_S:g} s: {latency.over_target}; slowest (latency, account, "
            "previous event on the same account):"
        )
        for t in latency.slowest:
            before = t["previous_event_on_account_s_before"]
            previous = "none in this run" if before is None else f"{before:.2f} s earlier"
            lines.append(
                f"    {t['latency_s']:7.3f} s  account {t['account_id']:>6}  previous: {previous}"
            )
    return "\n".join(lines)


def results_json(
    args: argparse.Namespace,
    results: Results,
    environment: dict[str, Any],
    failures: list[str],
    started_at: datetime,
) -> dict[str, Any]:
    latency = results.latency
    return {
        "benchmark": "score",
        "started_at": started_at.isoformat(),
        "seconds": (datetime.now(UTC) - started_at).total_seconds(),
        "config": {
            k: v for k, v in vars(args).items() if k not in ("output", "pass_child", "pass_hours")
        },
        "environment": environment,
        "portfolio": results.shape,
        "generation_s": results.generation_s,
        "ceiling": {
            "sql": CEILING_SQL.strip(),
            "runs_s": results.ceiling_s,
            "median_s": results.ceiling if results.ceiling_s else None,
        },
        "portfolio_pass": {
            "runs": [asdict(p) for p in results.passes],
            "first_s": results.first_pass_s if results.passes else None,
            "hourly_median_s": results.pass_s if results.hourly else None,
            "ratio_to_ceiling": (
                results.pass_s / results.ceiling if results.hourly and results.ceiling else None
            ),
            "peak_rss_mib": results.peak_rss_mib,
        },
        "event_to_snapshot": None
        if latency is None
        else {
            "events": latency.events,
            "rate_per_s": latency.rate_per_s,
            "debounce_s": results.debounce_s,
            "p50_s": quantile(latency.latencies_s, 0.5),
            "p95_s": quantile(latency.latencies_s, 0.95),
            "max_s": max(latency.latencies_s, default=None),
            "missing": latency.missing,
            "rescore_start_p50_s": quantile(latency.started_s, 0.5),
            "accept_p50_s": quantile(latency.accept_s, 0.5),
            "worker_peak_rss_mib": latency.worker_peak_rss_mib,
            "over_target": latency.over_target,
            "slowest": latency.slowest,
            "failures": latency.failures[:20],
        },
        "table": [asdict(r) for r in table_rows(results, args.settle_seconds)],
        "failures": failures,
        "ok": not failures,
    }


# --- The run ------------------------------------------------------------------------------------


def score_scratch_urls() -> ScratchUrls:
    return named_scratch_urls(SCORE_DATABASE, SCORE_REDIS_DB)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.score",
        description="The portfolio pass beside the bare SQL aggregate of the orders, and the "
        "latency from an order event to the account's new snapshot (KAM_DATABASE_URL / "
        "KAM_REDIS_URL name the servers; the benchmark uses scratch databases on them).",
    )
    parser.add_argument("--accounts", type=int, default=100_000, help="accounts (100,000)")
    parser.add_argument("--orders", type=int, default=5_000_000, help="orders (5,000,000)")
    parser.add_argument(
        "--ceiling-runs", type=int, default=3, help="timed runs of the bare aggregate (3)"
    )
    parser.add_argument(
        "--pass-runs",
        type=int,
        default=4,
        help="portfolio passes (4): the first with nothing stored, then hourly ones",
    )
    parser.add_argument(
        "--rate", type=float, default=25.0, help="order events per second while streaming (25)"
    )
    parser.add_argument(
        "--stream-seconds", type=float, default=60.0, help="seconds of streaming (60)"
    )
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=30.0,
        help="how long to wait after the stream for the last snapshots (30)",
    )
    parser.add_argument(
        "--reuse-data",
        action="store_true",
        help="keep the scratch database of an earlier run instead of generating it anew "
        "(for quick reruns; earlier snapshots stay)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS_FILE,
        help=f"where the JSON results go (default {RESULTS_FILE})",
    )
    parser.add_argument("--pass-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pass-hours", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("accounts", "orders", "ceiling_runs", "pass_runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate <= 0 or args.stream_seconds <= 0:
        parser.error("--rate and --stream-seconds must be positive")
    return args


def _away_from_now_minute() -> str:
    """A minute of the hour for the worker's hourly pass that this run will not reach."""
    return json.dumps([(datetime.now(UTC).minute + 30) % 60])


def run(args: argparse.Namespace) -> int:
    from shared.settings import Settings

    started_at = datetime.now(UTC)
    urls = score_scratch_urls()
    for note in urls.notes:
        print(f"note: {note}", flush=True)
    print(
        f"scratch database {urls.database_url.rsplit('/', 1)[-1]}, Redis {urls.redis_url}",
        flush=True,
    )
    env = {
        **os.environ,
        "KAM_DATABASE_URL": urls.database_url,
        "KAM_REDIS_URL": urls.redis_url,
        "KAM_QUEUE_NAME": QUEUE_NAME,
        "KAM_LOG_LEVEL": "WARNING",
        # The worker's hourly pass must not fall into the event stream.
        "KAM_PORTFOLIO_PASS_MINUTES": _away_from_now_minute(),
    }
    results = Results(debounce_s=Settings().rescore_debounce_s)
    failures: list[str] = []
    log_dir = args.output.parent
    log_dir.mkdir(parents=True, exist_ok=True)
    postgres_version = ""
    try:
        if args.reuse_data:
            postgres_version = asyncio.run(_server_version(urls.asyncpg_dsn))
            run_cli(["migrate"], env)  # the data stays; the schema follows the code
        else:
            postgres_version = asyncio.run(recreate_database(urls))
            run_cli(["migrate"], env)
            print(f"generating {args.accounts:,} accounts and {args.orders:,} orders", flush=True)
            results.generation_s = asyncio.run(
                generate_portfolio(
                    urls.asyncpg_dsn,
                    accounts=args.accounts,
                    orders=args.orders,
                    seed=args.seed,
                    progress=lambda line: print(line, flush=True),
                )
            )
        asyncio.run(flush_redis(urls.redis_url))
        results.shape = asyncio.run(portfolio_shape(urls.asyncpg_dsn))
        accounts = int(results.shape["accounts"])

        results.note_load("ceiling")
        print(f"bare aggregate: warm-up + {args.ceiling_runs} runs", flush=True)
        results.ceiling_s = asyncio.run(measure_ceiling(urls.asyncpg_dsn, args.ceiling_runs))
        print(f"  median {results.ceiling:.2f}s", flush=True)

        results.note_load("pass")
        pass_log = log_dir / "score-pass.log"
        pass_log.write_bytes(b"")
        # The first pass finds nothing stored, whatever an earlier run left.
        asyncio.run(_forget_aggregates(urls.asyncpg_dsn))
        for index in range(args.pass_runs):
            run_ = run_pass_child(env, pass_log, hours_ahead=index)
            results.passes.append(run_)
            print(
                f"  pass {index + 1}/{args.pass_runs}: {run_.seconds:.2f}s, "
                f"{run_.accounts:,} accounts ({run_.aggregated:,} aggregated), "
                f"peak RSS {run_.peak_rss_mib:,.0f} MiB",
                flush=True,
            )

        api_key = (
            run_cli(["keys", "create", "--name", "bench", "--scopes", "events:write"], env)
            .strip()
            .splitlines()[-1]
        )
        results.note_load("events")
        print("event to snapshot: API and scorer worker", flush=True)
        with ExitStack() as stack:
            api = stack.enter_context(
                UvicornServer("service", SERVICE_APP, env, log_dir / "score-api.log")
            )
            worker = stack.enter_context(ScorerWorker(env, log_dir / "score-worker.log"))
            results.latency = asyncio.run(
                measure_latency(urls, api, worker, api_key, args, accounts)
            )
        if results.latency.failures:
            failures.append(
                f"{len(results.latency.failures)} events were not accepted: "
                + "; ".join(results.latency.failures[:5])
            )
    except BenchError as exc:
        failures.append(str(exc))

    results.note_load("end")
    environment = {
        "load_average_1min": results.load,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "postgres": postgres_version,
    }
    report = results_json(args, results, environment, failures, started_at)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")

    print()
    print(f"Postgres {postgres_version}; {os.cpu_count()} CPUs; Python {environment['python']}")
    print(render_table(table_rows(results, args.settle_seconds)))
    print()
    print(render_details(results))
    loads = ", ".join(f"{phase} {value:.1f}" for phase, value in results.load.items())
    print(f"load average (1 min) as each part began, {os.cpu_count()} CPUs: {loads}")
    for failure in failures:
        print(f"\nERROR: {failure}", file=sys.stderr)
    print(f"\nresults: {args.output} ({report['seconds']:.0f}s)")
    return 0 if report["ok"] else 1


async def _forget_aggregates(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE account_aggregates")
    finally:
        await conn.close()


async def _server_version(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        version: str = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return version


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pass_child:
        return pass_child_main(args.pass_hours)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
