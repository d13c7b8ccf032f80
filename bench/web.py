"""Workspace benchmark (`make bench-web`): the server time of every workspace page beside the
bare ``/healthz`` of the same server, the ceiling of the HTTP stack.

It generates a portfolio set-based in Postgres (the generator of ``make bench-score``: 100,000
accounts and 5,000,000 orders by default), runs one portfolio pass so that every account has a
tier, a risk and a snapshot and the portfolio summary is stored (again with ``--reuse-data``
when a portfolio has none yet), starts the API as ``kam api`` would (uvicorn, one worker), signs
in through ``/app/login`` like a person, and requests each page ``--requests`` times one after
the other (after a warm-up), timing each answer on loopback. The table gives p50 and p95 per
page, and p95 beside the ``/healthz`` p95. Target: every page's p95 under 300 ms.

It uses ``kam_bench_web`` and Redis db 8 unless ``KAM_DATABASE_URL`` / ``KAM_REDIS_URL`` name
scratch ones (a database with ``bench`` in its name, a Redis db other than 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.common import (
    RESULTS_DIR,
    BenchError,
    ScratchUrls,
    UvicornServer,
    flush_redis,
    named_scratch_urls,
    quantile,
    recreate_database,
    run_cli,
)
from bench.score import generate_portfolio

WEB_DATABASE = "kam_bench_web"
WEB_REDIS_DB = 8
TARGET_P95_S = 0.300
RESULTS_FILE = RESULTS_DIR / "web.json"


def web_scratch_urls() -> ScratchUrls:
    return named_scratch_urls(WEB_DATABASE, WEB_REDIS_DB)


async def _scored(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM accounts WHERE tier IS NOT NULL"))
    finally:
        await conn.close()


async def _summarised(dsn: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval("SELECT EXISTS (SELECT FROM portfolio_summaries)"))
    finally:
        await conn.close()


async def _portfolio_pass(database_url: str) -> float:
    from services.scorer.passes import run_portfolio_pass, summarise_portfolio
    from shared.db import create_engine, create_sessionmaker
    from shared.settings import Settings

    engine = create_engine(Settings(database_url=database_url, log_level="WARNING"))
    try:
        started = time.perf_counter()
        sessionmaker = create_sessionmaker(engine)
        await run_portfolio_pass(sessionmaker, now=datetime.now(UTC))
        await summarise_portfolio(sessionmaker)
        return time.perf_counter() - started
    finally:
        await engine.dispose()


async def _sign_in(client: httpx.AsyncClient, key: str) -> None:
    page = await client.get("/app/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    if token is None:
        raise BenchError("the sign-in page has no CSRF token")
    answer = await client.post(
        "/app/login", data={"api_key": key, "csrf_token": token.group(1), "next": "/app/"}
    )
    if answer.status_code != 303:
        raise BenchError(f"sign-in answered {answer.status_code}")


async def _pages(client: httpx.AsyncClient) -> list[str]:
    """The pages to time: every workspace page, the account page of the worklist's first."""
    worklist = await client.get("/app/worklist")
    first = re.search(r'<tr data-external-id="([^"]+)"', worklist.text)
    if first is None:
        raise BenchError("the worklist is empty: was the portfolio scored?")
    return [
        "/healthz",
        "/app/",
        "/app/worklist",
        "/app/worklist?tier=key&band=high",
        "/app/worklist.csv",
        f"/app/accounts/{first.group(1)}",
        "/app/managers",
        "/app/lost",
        "/app/policy",
    ]


async def measure(base_url: str, key: str, requests: int, warmup: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        await _sign_in(client, key)
        for path in await _pages(client):
            for _ in range(warmup):
                await client.get(path)
            times = []
            for _ in range(requests):
                started = time.perf_counter()
                answer = await client.get(path)
                times.append(time.perf_counter() - started)
                if answer.status_code != 200:
                    raise BenchError(f"{path} answered {answer.status_code}")
            timings[path] = times
            print(f"  {path}: p95 {quantile(times, 0.95) * 1000:.0f} ms", flush=True)
    return timings


def report(timings: dict[str, list[float]], accounts: int) -> list[str]:
    ceiling = quantile(timings["/healthz"], 0.95)
    lines = [
        f"workspace pages at {accounts:,} accounts, {len(timings['/healthz'])} sequential "
        "requests each, time to the whole answer on loopback",
        f"{'page':40} {'p50 ms':>8} {'p95 ms':>8} {'p95 / healthz':>14}  target p95 < 300 ms",
    ]
    for path, times in timings.items():
        p95 = quantile(times, 0.95)
        verdict = "" if path == "/healthz" else ("ok" if p95 < TARGET_P95_S else "MISSED")
        lines.append(
            f"{path[:40]:40} {quantile(times, 0.5) * 1000:8.1f} {p95 * 1000:8.1f} "
            f"{p95 / ceiling:13.1f}x  {verdict}"
        )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.web",
        description="Server time of the workspace pages beside the bare /healthz "
        "(KAM_DATABASE_URL / KAM_REDIS_URL name the servers; scratch databases are used).",
    )
    parser.add_argument("--accounts", type=int, default=100_000, help="accounts (100,000)")
    parser.add_argument("--orders", type=int, default=5_000_000, help="orders (5,000,000)")
    parser.add_argument("--requests", type=int, default=30, help="timed requests per page (30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests per page (3)")
    parser.add_argument(
        "--reuse-data",
        action="store_true",
        help="keep the scored portfolio of an earlier run instead of generating it anew",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--output", type=Path, default=RESULTS_FILE)
    args = parser.parse_args(argv)
    if min(args.accounts, args.orders, args.requests) < 1 or args.warmup < 0:
        parser.error("--accounts, --orders and --requests must be at least 1")
    return args


def run(args: argparse.Namespace) -> int:
    urls = web_scratch_urls()
    for note in urls.notes:
        print(f"note: {note}", flush=True)
    env = {
        **os.environ,
        "KAM_DATABASE_URL": urls.database_url,
        "KAM_REDIS_URL": urls.redis_url,
        "KAM_LOG_LEVEL": "WARNING",
        "KAM_ENV": "development",
    }
    if not args.reuse_data:
        asyncio.run(recreate_database(urls))
        run_cli(["migrate"], env)
        print(f"generating {args.accounts:,} accounts and {args.orders:,} orders", flush=True)
        asyncio.run(
            generate_portfolio(
                urls.asyncpg_dsn,
                accounts=args.accounts,
                orders=args.orders,
                seed=args.seed,
                progress=lambda line: print(line, flush=True),
            )
        )
    else:
        run_cli(["migrate"], env)
    if asyncio.run(_scored(urls.asyncpg_dsn)) == 0 or not asyncio.run(
        _summarised(urls.asyncpg_dsn)
    ):
        print("portfolio pass (so that every account has a tier, a risk, a snapshot and the")
        print("portfolio summary the pages read)")
        print(f"  {asyncio.run(_portfolio_pass(urls.database_url)):.1f}s", flush=True)
    asyncio.run(flush_redis(urls.redis_url))
    accounts = asyncio.run(_scored(urls.asyncpg_dsn))
    key = run_cli(["keys", "create", "--name", "bench", "--scopes", "admin"], env)
    key = key.strip().splitlines()[-1]
    log = args.output.parent / "web-api.log"
    with UvicornServer("api", "services.api.app:create_app", env, log) as server:
        asyncio.run(server.wait_ready())
        timings = asyncio.run(measure(server.base_url, key, args.requests, args.warmup))
    lines = report(timings, accounts)
    print("\n".join(lines))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "accounts": accounts,
        "measured_at": datetime.now(UTC).isoformat(),
        "timings_s": timings,
    }
    args.output.write_text(json.dumps(results, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench.web: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
