"""Soak (`make soak`): minutes of steady mixed load on the API and a scorer, watched minute by
minute, then a check that everything drains.

In one run, on a scratch database, with the API (``uvicorn``, as ``kam api``) and a scorer
(``kam scorer``, every role) in child processes and a webhook receiver in this process:
single orders (``POST /v1/orders``), batches (``POST /v1/events``) and reads
(``GET /v1/accounts``) at fixed rates, and every tier or risk change delivered to the receiver.
Each minute it prints the latency p50/p99 of writes and reads, the answers by status, the API's
and the worker's RSS, the length of each queue, the dirty accounts and the oldest dirty mark's
age. At the end the load stops and it waits for the queues and the dirty set to empty.

The scorer kept up when the oldest dirty mark stayed young (a few debounces) all along: then the
events/s sent is a rate it sustains. A drain that does not finish, a 5xx, or RSS that grows
minute after minute are what the soak is for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio as redis_asyncio

from bench.common import (
    BenchError,
    ScorerWorker,
    UvicornServer,
    flush_redis,
    proc_status_kib,
    quantile,
    recreate_database,
    run_cli,
    scratch_urls,
)
from bench.webhooks import Receiver

QUEUE = "kam:soak"
QUEUES = (QUEUE, f"{QUEUE}:webhooks", f"{QUEUE}:portfolio")
SERVICE_APP = "services.api.app:create_app"
# The scorer keeps up while no dirty mark gets older than this (a sweep interval).
KEPT_UP_S = 30.0


def _order(rng: random.Random, account: str, n: int) -> dict[str, Any]:
    amount = round(rng.uniform(200, 20000), 2)
    at = datetime.now(UTC) - timedelta(minutes=rng.randint(0, 600))
    return {
        "event_id": f"soak-{n}",
        "version": 1,
        "external_id": f"SO-{n}",
        "account_external_id": account,
        "ordered_at": at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "amount": f"{amount:.2f}",
        "cost": f"{amount * rng.uniform(0.4, 0.9):.2f}",
        "currency": "EUR",
        "status": "placed",
        "lines": [{"category": rng.choice("ABCDEF"), "quantity": "1", "amount": f"{amount:.2f}"}],
    }


@dataclass
class Minute:
    """What one minute of the soak saw."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter[str] = field(default_factory=Counter)
    events: int = 0


@dataclass
class Soak:
    minutes: list[Minute] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    counter: int = 0
    oldest_dirty_max_s: float = 0.0

    @property
    def now(self) -> Minute:
        return self.minutes[-1]


async def _requester(
    soak: Soak,
    client: httpx.AsyncClient,
    kind: str,
    rate_per_s: float,
    stop_at: float,
    make: Any,
) -> None:
    """Send ``make()``'s requests at a steady rate (missed ticks are not made up)."""
    interval = 1 / rate_per_s
    next_at = time.monotonic()
    while next_at < stop_at:
        method, path, body, events = make()
        started = time.monotonic()
        try:
            response = await client.request(method, path, json=body)
            status = str(response.status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        minute = soak.now
        minute.latencies["read" if method == "GET" else "write"].append(time.monotonic() - started)
        minute.statuses[f"{kind} {status}"] += 1
        if status == "202":
            minute.events += events
        next_at = max(next_at + interval, time.monotonic())
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def _watch(
    conn: asyncpg.Connection, redis: redis_asyncio.Redis
) -> tuple[dict[str, int], int, float, int]:
    queues = {queue: int(await redis.zcard(queue)) for queue in QUEUES}
    dirty, oldest = await conn.fetchrow(
        "SELECT count(*), coalesce(extract(epoch FROM now() - min(since)), 0) FROM dirty_accounts"
    )
    pending = await conn.fetchval(
        "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"
    )
    return queues, int(dirty), float(oldest), int(pending)


def _row(
    n: int, minute: Minute, api: UvicornServer, worker: ScorerWorker, watched: Any
) -> dict[str, Any]:
    queues, dirty, oldest, pending = watched
    writes, reads = minute.latencies["write"], minute.latencies["read"]
    return {
        "minute": n,
        "events_per_s": round(minute.events / 60, 1),
        "write_p50_ms": round(quantile(writes, 0.5) * 1000, 1),
        "write_p99_ms": round(quantile(writes, 0.99) * 1000, 1),
        "read_p50_ms": round(quantile(reads, 0.5) * 1000, 1),
        "read_p99_ms": round(quantile(reads, 0.99) * 1000, 1),
        "statuses": dict(sorted(minute.statuses.items())),
        "api_rss_mib": round(proc_status_kib(api.pid, "VmRSS") / 1024, 1),
        "worker_rss_mib": round(proc_status_kib(worker.pid, "VmRSS") / 1024, 1),
        "queues": queues,
        "dirty": dirty,
        "oldest_dirty_s": round(oldest, 1),
        "pending_deliveries": pending,
    }


def _print_row(row: dict[str, Any]) -> None:
    queues = "/".join(str(v) for v in row["queues"].values())
    statuses = ", ".join(f"{k}: {v}" for k, v in row["statuses"].items())
    print(
        f"min {row['minute']:>2}  {row['events_per_s']:>6} ev/s  "
        f"write p50/p99 {row['write_p50_ms']:>6}/{row['write_p99_ms']:>7} ms  "
        f"read {row['read_p50_ms']:>6}/{row['read_p99_ms']:>7} ms  "
        f"RSS api {row['api_rss_mib']} worker {row['worker_rss_mib']} MiB  "
        f"queues {queues}  dirty {row['dirty']} (oldest {row['oldest_dirty_s']} s)  "
        f"deliveries pending {row['pending_deliveries']}\n        {statuses}",
        flush=True,
    )


async def _run(
    args: argparse.Namespace, env: dict[str, str], api: UvicornServer, worker: ScorerWorker
) -> dict[str, Any]:
    await api.wait_ready()
    key = run_cli(["keys", "create", "--name", "soak", "--scopes", "admin"], env).splitlines()[-1]
    rng = random.Random(args.seed)
    accounts = [f"SOAK-{n:05d}" for n in range(args.accounts)]
    soak = Soak(minutes=[Minute()])
    receiver = Receiver()
    await receiver.start()
    conn = await asyncpg.connect(env["KAM_DATABASE_URL"].replace("+asyncpg", ""))
    redis = redis_asyncio.Redis.from_url(env["KAM_REDIS_URL"])
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with httpx.AsyncClient(base_url=api.base_url, headers=headers, timeout=30) as client:
            created = await client.post(
                "/v1/webhooks",
                json={
                    "url": receiver.url("/soak"),
                    "event_types": ["account.tier_changed", "account.risk_band_changed"],
                },
            )
            if created.status_code != 201:
                raise BenchError(f"registering the receiver: {created.text}")
            receiver.expect("/soak", created.json()["secret"])

            def single() -> tuple[str, str, Any, int]:
                soak.counter += 1
                return "POST", "/v1/orders", _order(rng, rng.choice(accounts), soak.counter), 1

            def batch() -> tuple[str, str, Any, int]:
                items = []
                for _ in range(args.batch_size):
                    soak.counter += 1
                    body = _order(rng, rng.choice(accounts), soak.counter)
                    items.append({"type": "order", **body})
                return "POST", "/v1/events", {"events": items}, len(items)

            def read() -> tuple[str, str, Any, int]:
                return (
                    "GET",
                    f"/v1/accounts?limit=20&tier={rng.choice(['key', 'standard'])}",
                    None,
                    0,
                )

            started = time.monotonic()
            stop_at = started + args.minutes * 60
            load = [
                *(
                    _requester(soak, client, "single", args.single_rate / 4, stop_at, single)
                    for _ in range(4)
                ),
                _requester(soak, client, "batch", 1 / args.batch_interval, stop_at, batch),
                _requester(soak, client, "read", args.read_rate, stop_at, read),
            ]
            tasks = [asyncio.create_task(job) for job in load]
            for n in range(1, args.minutes + 1):
                await asyncio.sleep(max(0.0, started + n * 60 - time.monotonic()))
                api.check_alive()
                worker.check_alive()
                watched = await _watch(conn, redis)
                soak.oldest_dirty_max_s = max(soak.oldest_dirty_max_s, watched[2])
                soak.rows.append(_row(n, soak.now, api, worker, watched))
                _print_row(soak.rows[-1])
                soak.minutes.append(Minute())
            await asyncio.gather(*tasks)

        drain_started = time.monotonic()
        drained_s: float | None = None
        while time.monotonic() - drain_started < args.drain_timeout:
            queues, dirty, _, pending = await _watch(conn, redis)
            if not dirty and not pending and not queues[QUEUE] and not queues[QUEUES[1]]:
                drained_s = time.monotonic() - drain_started
                break
            await asyncio.sleep(0.5)
    finally:
        await conn.close()
        await redis.aclose()
        await receiver.stop()

    sent = sum(m.events for m in soak.minutes)
    statuses: Counter[str] = Counter()
    for m in soak.minutes:
        statuses.update(m.statuses)
    rss = [r["api_rss_mib"] for r in soak.rows], [r["worker_rss_mib"] for r in soak.rows]
    return {
        "minutes": soak.rows,
        "events_accepted": sent,
        "events_per_s": round(sent / (args.minutes * 60), 1),
        "statuses": dict(sorted(statuses.items())),
        "errors": {k: v for k, v in statuses.items() if not k.split()[-1].startswith("2")},
        "oldest_dirty_max_s": round(soak.oldest_dirty_max_s, 1),
        "drained_s": None if drained_s is None else round(drained_s, 1),
        "webhooks_verified": len(receiver.arrivals),
        "webhooks_rejected": len(receiver.rejected),
        "api_rss_mib_first_last": (rss[0][0], rss[0][-1]) if rss[0] else None,
        "worker_rss_mib_first_last": (rss[1][0], rss[1][-1]) if rss[1] else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--accounts", type=int, default=2000)
    parser.add_argument("--single-rate", type=float, default=20.0, help="single orders/s (20)")
    parser.add_argument("--batch-size", type=int, default=100, help="events per batch (100)")
    parser.add_argument("--batch-interval", type=float, default=5.0, help="s between batches")
    parser.add_argument("--read-rate", type=float, default=5.0, help="reads/s (5)")
    parser.add_argument("--drain-timeout", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path("bench/results/soak.json"))
    args = parser.parse_args(argv)

    env = dict(os.environ)
    env.setdefault(
        "KAM_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/kam_bench_soak"
    )
    env.setdefault("KAM_REDIS_URL", "redis://127.0.0.1:6379/8")
    urls = scratch_urls(env)
    env |= {
        "KAM_DATABASE_URL": urls.database_url,
        "KAM_REDIS_URL": urls.redis_url,
        "KAM_QUEUE_NAME": QUEUE,
        "KAM_LOG_LEVEL": "WARNING",
        "KAM_ENV": "development",
        "KAM_WEBHOOK_ALLOWED_HOSTS": '["127.0.0.1"]',
    }
    print(f"scratch database {urls.database_url.rsplit('/', 1)[-1]}, Redis {urls.redis_url}")
    print(
        f"load: {args.single_rate:g} single orders/s, a batch of {args.batch_size} every "
        f"{args.batch_interval:g} s, {args.read_rate:g} reads/s, over {args.accounts} accounts, "
        f"for {args.minutes} min; load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(recreate_database(urls))
        asyncio.run(flush_redis(urls.redis_url))
        run_cli(["migrate"], env)
        with ExitStack() as stack:
            api = stack.enter_context(
                UvicornServer("service", SERVICE_APP, env, args.output.parent / "soak-api.log")
            )
            worker = stack.enter_context(ScorerWorker(env, args.output.parent / "soak-worker.log"))
            summary = asyncio.run(_run(args, env, api, worker))
    except BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    summary["load_average_end"] = os.getloadavg()[0]
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print()
    kept_up = summary["oldest_dirty_max_s"] <= KEPT_UP_S
    print(
        f"accepted {summary['events_accepted']:,} events, {summary['events_per_s']} events/s "
        f"sustained; oldest dirty mark at most {summary['oldest_dirty_max_s']} s: "
        + (
            f"the scorer kept up with {summary['events_per_s']} events/s"
            if kept_up
            else f"the scorer fell behind (more than {KEPT_UP_S:g} s): try a lower rate"
        )
    )
    print(f"answers: {summary['statuses']}")
    print(f"errors: {summary['errors'] or 'none'}")
    print(
        f"drained in {summary['drained_s']} s after the load stopped"
        if summary["drained_s"] is not None
        else "NOT drained"
    )
    print(
        f"RSS first/last minute: api {summary['api_rss_mib_first_last']} MiB, "
        f"worker {summary['worker_rss_mib_first_last']} MiB; webhooks verified "
        f"{summary['webhooks_verified']}, rejected {summary['webhooks_rejected']}; "
        f"load average at end {summary['load_average_end']:.1f}"
    )
    failed = summary["drained_s"] is None or any(
        k.split()[-1].startswith("5") or not k.split()[-1].isdigit() for k in summary["errors"]
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
