"""Webhook benchmark (`make bench-webhooks`): from an order that changes a tier to the verified
webhook at a receiver, and delivery throughput beside a bare httpx POST loop.

In one run, on one scratch database, with the API (``uvicorn``, as ``kam api``) and a scorer
worker (``kam scorer``) in child processes and a receiver in this process:

* **the portfolio**: a few hundred accounts with two years of orders and invoices, sent through
  ``POST /v1/events``, rescored as they arrive, then a portfolio pass (``POST
  /v1/portfolio/rescore``) fits the population facts and sets every tier;
* **the receiver**: a small HTTP/1.1 keep-alive server on a free loopback port that verifies
  every request with ``standardwebhooks.Webhook(secret).verify(body, headers)`` and notes when
  each ``webhook-id`` arrived, answering 204 at once;
* **order to webhook**: accounts in ``standard`` or ``developing`` each get one large, high-margin
  order (``POST /v1/orders``) at a steady rate; for each order that changed the account's tier,
  the time from its 202 to the verified ``account.tier_changed`` at the receiver. The default
  rescore debounce (0.5 s) is part of it;
* **delivery throughput**: ``--deliveries`` pending deliveries of a real tier-change payload are
  written to a disabled endpoint (as ``webhook_events.py`` writes them, but without an account,
  so no account's order holds one back), then the endpoint is enabled through the API, which
  pushes their job; the rate is the deliveries over the time from that request to the last
  verified arrival. The ceiling: a bare httpx loop in a child process POSTing the same body to
  the same receiver, signed per request as the worker signs, with as many requests in flight
  as the worker sends to one endpoint (``KAM_WEBHOOK_ENDPOINT_CONCURRENCY``), on one keep-alive
  client, as the worker sends (one client per endpoint, pinned to the address it checked). A
  second bare loop opens a client per request, as the worker once did, to show what that
  costs, and a third shares one TLS context among those clients (httpx otherwise builds one,
  the CA bundle loaded, for every client). Rounds alternate which goes first; the table quotes
  medians.

Target: delivery throughput at least 0.5x the bare keep-alive loop (a missed target is
reported, not an error). The exit status is non-zero only when something failed (a child
process, a request, a signature that did not verify, a tier change whose webhook never came).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import ssl
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import redis.asyncio as redis_asyncio
from sqlalchemy.engine import make_url
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from bench.common import (
    RESULTS_DIR,
    ROOT,
    BenchError,
    ScorerWorker,
    ScratchUrls,
    UvicornServer,
    flush_redis,
    median,
    quantile,
    recreate_database,
    run_cli,
    scratch_urls,
    wait_for_worker,
)
from bench.score import Row, render_table

RESULTS_FILE = RESULTS_DIR / "webhooks.json"
SERVICE_APP = "services.api.app:create_app"
WEBHOOKS_DATABASE = "kam_bench_webhooks"
WEBHOOKS_REDIS_DB = 7
QUEUE_NAME = "kam:bench-webhooks"
TIER_CHANGED = "account.tier_changed"
LATENCY_PATH = "/hooks/latency"
THROUGHPUT_PATH = "/hooks/throughput"
BARE_PATH = "/hooks/bare"
CHILD_RESULT_PREFIX = "BENCH-BARE-RESULT "
WARM_UP_ORDERS = 5


class _Settings:
    """The service's settings this run uses, read once in this process as the children will."""

    def __init__(self) -> None:
        from shared.settings import Settings

        settings = Settings()
        self.debounce_s = settings.rescore_debounce_s
        # The worker sends to one endpoint at most this many at once: the ceiling's concurrency.
        self.max_jobs = settings.webhook_endpoint_concurrency


# --- The receiver -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    webhook_id: str
    path: str
    at: float  # epoch seconds, when the whole request was read and verified
    account: str | None  # the payload's account external id, when it has one
    body_bytes: int


class Receiver:
    """A webhook receiver on loopback: HTTP/1.1 with keep-alive, every request verified against
    the secret of its path (Standard Webhooks) before it is noted; 204 when it verifies, 401
    when not (and the failure is kept)."""

    def __init__(self) -> None:
        self.secrets: dict[str, Webhook] = {}
        self.arrivals: list[Arrival] = []
        self.by_path: dict[str, list[Arrival]] = defaultdict(list)
        self.rejected: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def expect(self, path: str, secret: str) -> None:
        self.secrets[path] = Webhook(secret)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=512)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for handler in list(self._handlers):
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
                path = request_line.split(" ", 2)[1]
                headers: dict[str, str] = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status = self._receive(path, headers, body)
                close = headers.get("connection", "").lower() == "close"
                writer.write(
                    b"HTTP/1.1 %d %s\r\ncontent-length: 0\r\n%s\r\n"
                    % (
                        status,
                        b"No Content" if status == 204 else b"Unauthorized",
                        b"connection: close\r\n" if close else b"",
                    )
                )
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)

    def _receive(self, path: str, headers: dict[str, str], body: bytes) -> int:
        webhook = self.secrets.get(path)
        webhook_id = headers.get("webhook-id", "?")
        if webhook is None:
            self.rejected.append(f"{path}: no endpoint expected here ({webhook_id})")
            return 401
        try:
            payload = webhook.verify(body, headers)
        except WebhookVerificationError as exc:
            self.rejected.append(f"{path}: {webhook_id}: {exc}")
            return 401
        account = None
        if isinstance(payload, dict):
            data = payload.get("data")
            if isinstance(data, dict) and isinstance(data.get("account"), dict):
                account = data["account"].get("external_id")
        arrival = Arrival(webhook_id, path, time.time(), account, len(body))
        self.arrivals.append(arrival)
        self.by_path[path].append(arrival)
        return 204


# --- The portfolio ------------------------------------------------------------------------------


def _ts(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def portfolio_events(accounts: int, seed: int, now: datetime) -> list[dict[str, Any]]:
    """Accounts of every size (lognormal order sizes), margins of 12-40%, an order every 10-60
    days for up to two years, a fifth of them stopped some months ago, and the invoices of the
    last year (a tenth of the accounts pay late)."""
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    for i in range(1, accounts + 1):
        external_id = f"BW-{i:05d}"
        events.append(
            {
                "type": "account",
                "event_id": f"bw-a-{i}",
                "version": 1,
                "external_id": external_id,
                "name": f"Account {i}",
                "status": "active",
            }
        )
        size = math.exp(math.log(1_500) + 0.9 * rng.gauss(0, 1))
        margin = rng.uniform(0.12, 0.40)
        every = rng.randint(10, 60)
        first = rng.randint(200, 700)
        last = rng.randint(120, 400) if rng.random() < 0.2 else rng.randint(3, 25)
        late = rng.random() < 0.1
        day, n = first, 0
        while day >= last:
            at = now - timedelta(days=day, hours=rng.randint(1, 20))
            amount = round(size * math.exp(0.3 * rng.gauss(0, 1)), 2)
            events.append(
                {
                    "type": "order",
                    "event_id": f"bw-o-{i}-{n}",
                    "version": 1,
                    "external_id": f"BWO-{i}-{n}",
                    "account_external_id": external_id,
                    "ordered_at": _ts(at),
                    "amount": f"{amount:.2f}",
                    "cost": f"{amount * (1 - margin):.2f}",
                    "currency": "EUR",
                    "status": "placed",
                    "lines": [
                        {"category": f"cat-{n % 4}", "quantity": "1", "amount": f"{amount:.2f}"}
                    ],
                }
            )
            due = at + timedelta(days=30)
            paid = due + timedelta(days=rng.randint(10, 40) if late else -2)
            if day <= 365 and paid < now:
                events.append(
                    {
                        "type": "payment",
                        "event_id": f"bw-p-{i}-{n}",
                        "version": 1,
                        "invoice_external_id": f"BWI-{i}-{n}",
                        "account_external_id": external_id,
                        "amount": f"{amount:.2f}",
                        "currency": "EUR",
                        "due_at": _ts(due),
                        "paid_at": _ts(paid),
                    }
                )
            day -= every
            n += 1
    return events


async def send_portfolio(
    client: httpx.AsyncClient, headers: dict[str, str], events: list[dict[str, Any]]
) -> None:
    batches = [events[i : i + 1000] for i in range(0, len(events), 1000)]

    async def post(batch: list[dict[str, Any]]) -> None:
        response = await client.post("/v1/events", json={"events": batch}, headers=headers)
        if response.status_code != 202 or response.json().get("rejected"):
            raise BenchError(f"POST /v1/events: {response.status_code} {response.text[:500]}")

    for start in range(0, len(batches), 2):
        await asyncio.gather(*(post(b) for b in batches[start : start + 2]))


async def wait_until_clean(
    dsn: str, api: UvicornServer, worker: ScorerWorker, *, timeout_s: float
) -> None:
    """Until no account is left dirty (every rescore the events asked for has run)."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout_s
        while await conn.fetchval("SELECT count(*) FROM dirty_accounts"):
            api.check_alive()
            worker.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"accounts still dirty after {timeout_s:.0f}s")
            await asyncio.sleep(0.3)
    finally:
        await conn.close()


async def run_portfolio_pass(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    redis_url: str,
    worker: ScorerWorker,
    *,
    timeout_s: float = 300,
) -> float:
    """Ask for a pass through the API and wait until its job has left the queue; seconds."""
    started = time.perf_counter()
    response = await client.post("/v1/portfolio/rescore", headers=headers)
    if response.status_code != 202:
        raise BenchError(f"POST /v1/portfolio/rescore: {response.status_code} {response.text}")
    redis = redis_asyncio.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout_s
        # keep_result=0: the job's key goes when the pass is done.
        while await redis.exists("arq:job:portfolio", "arq:in-progress:portfolio"):
            worker.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"the portfolio pass did not end within {timeout_s:.0f}s")
            await asyncio.sleep(0.3)
    finally:
        await redis.aclose()
    return time.perf_counter() - started


# --- Order to webhook ---------------------------------------------------------------------------


@dataclass(slots=True)
class Candidate:
    account_id: int
    external_id: str
    tier: str
    revenue_12m: float


async def tier_candidates(dsn: str) -> tuple[list[Candidate], dict[str, int]]:
    """Active accounts in ``standard`` or ``developing`` (whom one big order may lift), with
    their revenue over 12 months; and the number of accounts by tier."""
    conn = await asyncpg.connect(dsn)
    try:
        tiers = await conn.fetch("SELECT tier, count(*) AS n FROM accounts GROUP BY tier")
        rows = await conn.fetch(
            """
            SELECT a.id, a.external_id, a.tier,
                   coalesce(sum(o.amount) FILTER (
                       WHERE o.status = 'placed' AND o.ordered_at > now() - interval '365 days'
                   ), 0)::float8 AS revenue
            FROM accounts a LEFT JOIN orders o ON o.account_id = a.id
            WHERE a.status = 'active' AND a.tier IN ('standard', 'developing')
            GROUP BY a.id
            ORDER BY a.id
            """
        )
    finally:
        await conn.close()
    by_tier = {str(r["tier"]): int(r["n"]) for r in tiers}
    candidates = [
        Candidate(int(r["id"]), str(r["external_id"]), str(r["tier"]), float(r["revenue"]))
        for r in rows
    ]
    return candidates, by_tier


def big_order(candidate: Candidate, run_tag: str, index: int, ordered_at: float) -> bytes:
    """One order at 45% margin worth four years of the account's revenue, at least 150,000:
    past the key tier's revenue minimum, and a share of the portfolio's gross profit that
    lifts the account's value score."""
    amount = max(150_000.0, 4 * candidate.revenue_12m)
    stamp = datetime.fromtimestamp(ordered_at, UTC).isoformat(timespec="milliseconds")
    return json.dumps(
        {
            "event_id": f"bench-webhooks-{run_tag}-{index}",
            "version": 1,
            "external_id": f"BWX-{run_tag}-{index}",
            "account_external_id": candidate.external_id,
            "ordered_at": stamp.replace("+00:00", "Z"),
            "amount": f"{amount:.2f}",
            "cost": f"{amount * 0.55:.2f}",
            "currency": "EUR",
            "status": "placed",
            "lines": [{"category": "projects", "quantity": "1", "amount": f"{amount:.2f}"}],
        }
    ).encode()


@dataclass(slots=True)
class SentOrder:
    account_id: int
    external_id: str
    tier_before: str
    sent_at: float
    accepted_at: float = 0.0
    status: int = 0


async def send_orders(
    base_url: str,
    headers: dict[str, str],
    candidates: Sequence[Candidate],
    *,
    rate: float,
    first_index: int,
) -> list[SentOrder]:
    """One order per candidate at a steady rate, open loop (a slow answer does not delay the
    next)."""
    run_tag = f"{int(time.time())}"
    sent: list[SentOrder] = []
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30.0) as client:

        async def send(order: SentOrder, body: bytes) -> None:
            try:
                response = await client.post("/v1/orders", content=body, headers=headers)
                order.status = response.status_code
                if order.status == 202 and response.json().get("status") != "accepted":
                    order.status = -2  # stored before: it would change nothing
            except httpx.HTTPError:
                order.status = -1
            order.accepted_at = time.time()

        tasks = []
        started = time.perf_counter()
        for i, candidate in enumerate(candidates):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.time()
            order = SentOrder(candidate.account_id, candidate.external_id, candidate.tier, now)
            sent.append(order)
            body = big_order(candidate, run_tag, first_index + i, round(now, 3))
            tasks.append(asyncio.create_task(send(order, body)))
        await asyncio.gather(*tasks)
    return sent


@dataclass(slots=True)
class LatencyResult:
    orders: int
    rate_per_s: float
    changed: int  # orders after which the account's tier changed
    changes: dict[str, int]  # "developing -> key": count
    latencies_s: list[float]  # 202 to the verified webhook, for each changed tier
    to_tier_change_s: list[float]  # 202 to the scorer's tier change (its transaction's time)
    to_attempt_s: list[float]  # 202 to the start of the delivery attempt
    accept_s: list[float]  # request to 202
    missing: int  # tier changed, no webhook
    failures: list[str] = field(default_factory=list)
    slowest: list[dict[str, Any]] = field(default_factory=list)


async def measure_latency(
    urls: ScratchUrls,
    api: UvicornServer,
    worker: ScorerWorker,
    receiver: Receiver,
    headers: dict[str, str],
    candidates: Sequence[Candidate],
    *,
    rate: float,
    settle_s: float,
) -> LatencyResult:
    warm = await send_orders(
        api.base_url, headers, candidates[:WARM_UP_ORDERS], rate=rate, first_index=0
    )
    await _settle(urls.asyncpg_dsn, api, worker, receiver, warm, timeout_s=settle_s)
    measured = candidates[WARM_UP_ORDERS:]
    print(f"  {len(measured)} orders at {rate:g}/s", flush=True)
    started = time.perf_counter()
    orders = await send_orders(
        api.base_url, headers, measured, rate=rate, first_index=WARM_UP_ORDERS
    )
    seconds = time.perf_counter() - started
    await _settle(urls.asyncpg_dsn, api, worker, receiver, orders, timeout_s=settle_s)

    changes = await _tier_changes_after(urls.asyncpg_dsn, orders)
    arrivals = {a.account: a for a in receiver.by_path[LATENCY_PATH]}
    failures = [
        f"order for {o.external_id}: "
        + ("not accepted as new" if o.status == -2 else f"HTTP {o.status}")
        for o in orders
        if o.status != 202
    ]
    result = LatencyResult(
        orders=len(orders),
        rate_per_s=len(orders) / seconds if seconds else 0.0,
        changed=0,
        changes={},
        latencies_s=[],
        to_tier_change_s=[],
        to_attempt_s=[],
        accept_s=[o.accepted_at - o.sent_at for o in orders],
        missing=0,
        failures=failures,
    )
    timed: list[dict[str, Any]] = []
    for order in orders:
        change = changes.get(order.account_id)
        arrival = arrivals.get(order.external_id)
        if change is None:
            if arrival is not None:
                result.failures.append(f"{order.external_id}: a webhook without a tier change")
            continue
        result.changed += 1
        key = f"{change['from_tier']} -> {change['to_tier']}"
        result.changes[key] = result.changes.get(key, 0) + 1
        if arrival is None:
            result.missing += 1
            continue
        latency = arrival.at - order.accepted_at
        result.latencies_s.append(latency)
        result.to_tier_change_s.append(change["changed_at"] - order.accepted_at)
        if change["attempted_at"] is not None:
            result.to_attempt_s.append(change["attempted_at"] - order.accepted_at)
        timed.append(
            {
                "account": order.external_id,
                "latency_s": latency,
                "to_tier_change_s": change["changed_at"] - order.accepted_at,
                "change": key,
            }
        )
    result.slowest = sorted(timed, key=lambda t: -float(t["latency_s"]))[:5]
    return result


async def _tier_changes_after(dsn: str, orders: Sequence[SentOrder]) -> dict[int, dict[str, Any]]:
    """Each account's first tier change after its order was sent, with the start of the
    first attempt to deliver its event to the latency endpoint."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """
            SELECT DISTINCT ON (tc.account_id)
                   tc.account_id, tc.from_tier, tc.to_tier,
                   extract(epoch FROM tc.changed_at)::float8 AS changed_at,
                   (SELECT extract(epoch FROM min(wa.attempted_at))::float8
                    FROM webhook_events e
                    JOIN webhook_deliveries d ON d.event_id = e.id
                    JOIN webhook_attempts wa ON wa.delivery_id = d.id
                    WHERE e.account_id = tc.account_id AND e.account_seq = tc.seq) AS attempted_at
            FROM tier_changes tc
            JOIN unnest($1::bigint[], $2::float8[]) AS s(account_id, sent_at)
              ON s.account_id = tc.account_id
            WHERE tc.changed_at >= to_timestamp(s.sent_at) - interval '1 second'
            ORDER BY tc.account_id, tc.seq
            """,
            [o.account_id for o in orders],
            [o.sent_at for o in orders],
        )
    finally:
        await conn.close()
    return {int(r["account_id"]): dict(r) for r in rows}


async def _settle(
    dsn: str,
    api: UvicornServer,
    worker: ScorerWorker,
    receiver: Receiver,
    orders: Sequence[SentOrder],
    *,
    timeout_s: float,
) -> None:
    """Until every account is rescored and every change delivered (no pending delivery), or
    the time is up (what is missing then is reported)."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            api.check_alive()
            worker.check_alive()
            busy = await conn.fetchval(
                """
                SELECT (SELECT count(*) FROM dirty_accounts)
                     + (SELECT count(*) FROM webhook_deliveries WHERE status = 'pending')
                """
            )
            if not busy and all(o.accepted_at for o in orders):
                return
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


# --- Delivery throughput ------------------------------------------------------------------------


async def register_endpoint(
    client: httpx.AsyncClient, headers: dict[str, str], url: str, description: str
) -> tuple[str, str]:
    response = await client.post(
        "/v1/webhooks",
        json={"url": url, "event_types": [TIER_CHANGED], "description": description},
        headers=headers,
    )
    if response.status_code != 201:
        raise BenchError(f"POST /v1/webhooks: {response.status_code} {response.text[:500]}")
    body = response.json()
    return str(body["id"]), str(body["secret"])


async def set_endpoint_enabled(
    client: httpx.AsyncClient, headers: dict[str, str], endpoint_id: str, *, enabled: bool
) -> None:
    response = await client.patch(
        f"/v1/webhooks/{endpoint_id}", json={"enabled": enabled}, headers=headers
    )
    if response.status_code != 200:
        raise BenchError(f"PATCH /v1/webhooks: {response.status_code} {response.text[:500]}")


async def sample_payload(dsn: str) -> dict[str, Any]:
    """A tier-change payload the scorer wrote in this run (the largest: reasons vary)."""
    conn = await asyncpg.connect(dsn)
    try:
        payload = await conn.fetchval(
            "SELECT payload::text FROM webhook_events WHERE type = $1 "
            "ORDER BY length(payload::text) DESC LIMIT 1",
            TIER_CHANGED,
        )
    finally:
        await conn.close()
    if payload is None:
        raise BenchError("no tier-change event was written: nothing to deliver")
    loaded: dict[str, Any] = json.loads(payload)
    return loaded


async def write_pending_deliveries(
    dsn: str, endpoint_id: str, payload: dict[str, Any], *, count: int, tag: str
) -> None:
    """``count`` events with this payload and a pending delivery each to the endpoint, due now,
    as ``webhook_events.py`` writes them (without an account: none waits behind another)."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(
                """
                WITH events AS (
                    INSERT INTO webhook_events (id, type, account_id, account_seq, payload)
                    SELECT 'msg_bench' || $1 || 'x' || g, $2, NULL, NULL, $3::jsonb
                    FROM generate_series(1, $4::int) AS g
                    RETURNING id
                )
                INSERT INTO webhook_deliveries (event_id, endpoint_id, next_attempt_at)
                SELECT id, $5::uuid, now() FROM events ORDER BY id
                """,
                tag,
                TIER_CHANGED,
                json.dumps(payload),
                count,
                endpoint_id,
            )
    finally:
        await conn.close()


@dataclass(slots=True)
class ThroughputRun:
    kind: str  # "service", "bare keep-alive", "bare client per request"
    deliveries: int
    seconds: float
    cpu_s: float  # the sender's process: the worker, or the bare loop's child
    failures: int = 0

    @property
    def per_s(self) -> float:
        return self.deliveries / self.seconds if self.seconds else 0.0


async def measure_service_throughput(
    urls: ScratchUrls,
    api_client: httpx.AsyncClient,
    headers: dict[str, str],
    receiver: Receiver,
    worker: ScorerWorker,
    endpoint_id: str,
    payload: dict[str, Any],
    *,
    count: int,
    tag: str,
    timeout_s: float,
) -> ThroughputRun:
    await set_endpoint_enabled(api_client, headers, endpoint_id, enabled=False)
    await write_pending_deliveries(urls.asyncpg_dsn, endpoint_id, payload, count=count, tag=tag)
    prefix = f"msg_bench{tag}x"
    cpu_before = _process_cpu_s(worker.pid)
    started = time.time()
    await set_endpoint_enabled(api_client, headers, endpoint_id, enabled=True)
    deadline = time.monotonic() + timeout_s
    arrived: set[str] = set()
    seen = 0
    last = started
    while len(arrived) < count:
        worker.check_alive()
        if time.monotonic() > deadline:
            break
        arrivals = receiver.by_path[THROUGHPUT_PATH]
        for arrival in arrivals[seen:]:
            if arrival.webhook_id.startswith(prefix):
                arrived.add(arrival.webhook_id)
                last = max(last, arrival.at)
        seen = len(arrivals)
        await asyncio.sleep(0.05)
    cpu = _process_cpu_s(worker.pid) - cpu_before
    return ThroughputRun(
        "service", len(arrived), last - started, cpu, failures=count - len(arrived)
    )


BARE_KINDS = (
    "bare keep-alive",
    "bare client per request",
    "bare client per request, one TLS context",
)


def run_bare_child(
    url: str, secret: str, body: str, *, count: int, concurrency: int, kind: str, tag: str
) -> ThroughputRun:
    """The bare loop in a fresh interpreter (``--bare-child``), as the worker is a process of
    its own; it reads its orders on stdin and prints what it measured."""
    spec = {
        "url": url,
        "secret": secret,
        "body": body,
        "count": count,
        "concurrency": concurrency,
        "kind": kind,
        "tag": tag,
    }
    done = subprocess.run(
        [sys.executable, "-m", "bench.webhooks", "--bare-child"],
        cwd=ROOT,
        input=json.dumps(spec).encode(),
        capture_output=True,
        check=False,
        timeout=600,
    )
    lines = done.stdout.decode(errors="replace").splitlines()
    results = [line for line in lines if line.startswith(CHILD_RESULT_PREFIX)]
    if done.returncode != 0 or not results:
        tail = done.stderr.decode(errors="replace")[-3000:]
        raise BenchError(f"the bare loop failed ({done.returncode}):\n{tail}")
    data = json.loads(results[-1].removeprefix(CHILD_RESULT_PREFIX))
    return ThroughputRun(**data)


async def _bare_loop(spec: dict[str, Any]) -> ThroughputRun:
    """POST ``count`` signed copies of the body, ``concurrency`` at a time: on one keep-alive
    client, or on a client per request (as the worker, which also checks the address), each
    with a TLS context of its own (httpx's default, as the worker) or sharing one."""
    url, body, count = str(spec["url"]), str(spec["body"]), int(spec["count"])
    webhook = Webhook(str(spec["secret"]))
    kind = str(spec["kind"])
    per_request = kind != "bare keep-alive"
    # httpx builds a TLS context (the CA bundle loaded) for every client unless given one.
    verify: ssl.SSLContext | bool = (
        ssl.create_default_context() if kind.endswith("one TLS context") else True
    )
    content = body.encode()
    next_index = iter(range(count))
    failures = 0
    limits = httpx.Limits(
        max_connections=int(spec["concurrency"]),
        max_keepalive_connections=int(spec["concurrency"]),
    )

    async def post(client: httpx.AsyncClient, index: int) -> None:
        nonlocal failures
        webhook_id = f"msg_bare{spec['tag']}x{index}"
        at = datetime.now(UTC)
        headers = {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": webhook.sign(webhook_id, at, body),
            "content-type": "application/json",
        }
        response = await client.post(url, content=content, headers=headers)
        if not 200 <= response.status_code < 300:
            failures += 1

    async def loop(shared: httpx.AsyncClient) -> None:
        for index in next_index:
            if per_request:
                async with httpx.AsyncClient(
                    follow_redirects=False, trust_env=False, timeout=10.0, verify=verify
                ) as client:
                    await post(client, index)
            else:
                await post(shared, index)

    async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=10.0) as shared:
        # One unmeasured request: imports and the first connection.
        await post(shared, -1)
        cpu_before = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(loop(shared) for _ in range(int(spec["concurrency"]))))
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu_before
    return ThroughputRun(kind, count, seconds, cpu, failures=failures)


def bare_child_main() -> int:
    spec = json.loads(sys.stdin.read())
    result = asyncio.run(_bare_loop(spec))
    print(CHILD_RESULT_PREFIX + json.dumps(asdict(result)), flush=True)
    return 0


def _process_cpu_s(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (int(fields[11]) + int(fields[12])) / ticks


# --- Report -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Results:
    debounce_s: float = 0.0
    max_jobs: int = 0
    portfolio: dict[str, Any] = field(default_factory=dict)
    latency: LatencyResult | None = None
    throughput: list[ThroughputRun] = field(default_factory=list)
    body_bytes: int = 0
    load: dict[str, float] = field(default_factory=dict)

    def note_load(self, phase: str) -> None:
        self.load[phase] = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0

    def runs(self, kind: str) -> list[ThroughputRun]:
        return [r for r in self.throughput if r.kind == kind]

    def median_rate(self, kind: str) -> float:
        return median([r.per_s for r in self.runs(kind)])


def table_rows(results: Results) -> list[Row]:
    rows: list[Row] = []
    latency = results.latency
    if latency is not None:
        floor = f"{results.debounce_s:.2f} s"

        def vs_floor(value: float) -> str:
            return f"{value / results.debounce_s:.1f}x" if results.debounce_s else ""

        p50 = quantile(latency.latencies_s, 0.5)
        p95 = quantile(latency.latencies_s, 0.95)
        worst = max(latency.latencies_s, default=0.0)
        rows += [
            Row(
                "orders that changed a tier",
                f"{latency.changed} of {latency.orders}",
                target="report",
            ),
            Row(
                "order 202 to verified webhook p50", f"{p50:.3f} s", floor, vs_floor(p50), "report"
            ),
            Row(
                "order 202 to verified webhook p95", f"{p95:.3f} s", floor, vs_floor(p95), "report"
            ),
            Row("order 202 to verified webhook max", f"{worst:.3f} s", floor, vs_floor(worst)),
            Row(
                "tier changes without a webhook",
                f"{latency.missing} of {latency.changed}",
                target="0",
                met=latency.missing == 0,
            ),
        ]
    bare = results.median_rate("bare keep-alive")
    service = results.median_rate("service")
    per_request = results.median_rate("bare client per request")
    one_context = results.median_rate("bare client per request, one TLS context")
    if results.runs("bare keep-alive"):
        rows.append(Row("bare httpx loop, keep-alive (ceiling)", f"{bare:,.0f} /s"))
    if results.runs("bare client per request"):
        rows.append(
            Row(
                "bare httpx loop, a client per POST",
                f"{per_request:,.0f} /s",
                f"{bare:,.0f} /s",
                f"{per_request / bare:.2f}x" if bare else "",
            )
        )
    if results.runs("bare client per request, one TLS context"):
        rows.append(
            Row(
                "  the same, one TLS context for all",
                f"{one_context:,.0f} /s",
                f"{bare:,.0f} /s",
                f"{one_context / bare:.2f}x" if bare else "",
            )
        )
    if results.runs("service"):
        rows.append(
            Row(
                "delivery throughput (scorer worker)",
                f"{service:,.0f} /s",
                f"{bare:,.0f} /s",
                f"{service / bare:.2f}x" if bare else "",
                target=">= 0.5x",
                met=bool(bare) and service / bare >= 0.5,
            )
        )
        if per_request:
            rows.append(
                Row(
                    "  the same beside a client per POST",
                    f"{service:,.0f} /s",
                    f"{per_request:,.0f} /s",
                    f"{service / per_request:.2f}x",
                )
            )
    return rows


def render_details(results: Results, args: argparse.Namespace) -> str:
    lines: list[str] = []
    p = results.portfolio
    if p:
        tiers = ", ".join(f"{k} {v}" for k, v in sorted(p["tiers"].items()))
        lines.append(
            f"portfolio: {p['accounts']} accounts, {p['events']:,} events through /v1/events "
            f"(sent and rescored in {p['ingest_s']:.1f}s), portfolio pass {p['pass_s']:.1f}s; "
            f"tiers after it: {tiers}"
        )
    latency = results.latency
    if latency is not None:
        lines.append(
            f"orders: one each for {latency.orders} accounts in standard/developing at "
            f"{latency.rate_per_s:.1f}/s (after {WARM_UP_ORDERS} unmeasured), "
            f"worth max(150,000, 4x the account's 12-month revenue) at 45% margin; rescore "
            f"debounce {results.debounce_s:g} s"
        )
        changes = ", ".join(f"{k} {v}" for k, v in sorted(latency.changes.items()))
        lines.append(f"  tier changes: {changes or 'none'}")
        if latency.latencies_s:
            lines.append(
                "  202 to the tier change (debounce, queue, rescore start): p50 "
                f"{quantile(latency.to_tier_change_s, 0.5):.3f} s, p95 "
                f"{quantile(latency.to_tier_change_s, 0.95):.3f} s; 202 to the delivery "
                f"attempt's start: p50 {quantile(latency.to_attempt_s, 0.5):.3f} s, p95 "
                f"{quantile(latency.to_attempt_s, 0.95):.3f} s; request to 202: p50 "
                f"{quantile(latency.accept_s, 0.5) * 1000:.0f} ms"
            )
        for t in latency.slowest:
            lines.append(
                f"    slow: {t['latency_s']:.3f} s  {t['account']}  ({t['change']}; tier "
                f"change after {t['to_tier_change_s']:.3f} s)"
            )
    if results.throughput:
        lines.append(
            f"throughput: {args.deliveries:,} deliveries a round, {results.body_bytes} byte "
            f"body (a real tier-change payload), {results.max_jobs} in flight (the worker's "
            "concurrency per endpoint), every request signed and verified; service timed from "
            "the request that enables the endpoint to the last verified arrival"
        )
        for kind in ("service", *BARE_KINDS):
            runs = results.runs(kind)
            if not runs:
                continue
            rates = " / ".join(f"{r.per_s:,.0f}" for r in runs)
            cpu = median([r.cpu_s / r.deliveries * 1000 for r in runs if r.deliveries])
            sender = "worker" if kind == "service" else "loop"
            lines.append(
                f"  {kind}: {rates} /s (median quoted); {sender} CPU {cpu:.2f} ms a delivery"
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
        "benchmark": "webhooks",
        "started_at": started_at.isoformat(),
        "seconds": (datetime.now(UTC) - started_at).total_seconds(),
        "config": {k: v for k, v in vars(args).items() if k not in ("output", "bare_child")},
        "environment": environment,
        "portfolio": results.portfolio,
        "order_to_webhook": None
        if latency is None
        else {
            "orders": latency.orders,
            "rate_per_s": latency.rate_per_s,
            "debounce_s": results.debounce_s,
            "changed": latency.changed,
            "changes": latency.changes,
            "p50_s": quantile(latency.latencies_s, 0.5),
            "p95_s": quantile(latency.latencies_s, 0.95),
            "max_s": max(latency.latencies_s, default=None),
            "missing": latency.missing,
            "to_tier_change_p50_s": quantile(latency.to_tier_change_s, 0.5),
            "to_attempt_p50_s": quantile(latency.to_attempt_s, 0.5),
            "accept_p50_s": quantile(latency.accept_s, 0.5),
            "slowest": latency.slowest,
            "failures": latency.failures[:20],
        },
        "throughput": {
            "deliveries_per_round": args.deliveries,
            "concurrency": results.max_jobs,
            "body_bytes": results.body_bytes,
            "runs": [asdict(r) | {"per_s": r.per_s} for r in results.throughput],
            "service_per_s": results.median_rate("service"),
            "bare_keep_alive_per_s": results.median_rate("bare keep-alive"),
            "bare_client_per_request_per_s": results.median_rate("bare client per request"),
            "bare_client_per_request_one_tls_context_per_s": results.median_rate(
                "bare client per request, one TLS context"
            ),
        },
        "table": [asdict(r) for r in table_rows(results)],
        "failures": failures,
        "ok": not failures,
    }


# --- The run ------------------------------------------------------------------------------------


def webhooks_scratch_urls() -> ScratchUrls:
    """``kam_bench_webhooks`` and Redis db 7 unless ``KAM_DATABASE_URL`` / ``KAM_REDIS_URL``
    name scratch ones, so that it never shares them with the other benchmarks' defaults."""
    env = dict(os.environ)
    url = make_url(env.get("KAM_DATABASE_URL") or "postgresql+asyncpg://postgres@127.0.0.1:5432/")
    if "bench" not in (url.database or ""):
        url = url.set(database=WEBHOOKS_DATABASE)
    env["KAM_DATABASE_URL"] = url.render_as_string(hide_password=False)
    redis_url = urlsplit(env.get("KAM_REDIS_URL") or "redis://127.0.0.1:6379/0")
    if redis_url.path.strip("/") in ("", "0"):
        redis_url = redis_url._replace(path=f"/{WEBHOOKS_REDIS_DB}")
    env["KAM_REDIS_URL"] = urlunsplit(redis_url)
    return scratch_urls(env)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.webhooks",
        description="The time from an order that changes a tier to the verified webhook, and "
        "delivery throughput beside a bare httpx loop (KAM_DATABASE_URL / KAM_REDIS_URL name "
        "the servers; the benchmark uses scratch databases on them).",
    )
    parser.add_argument("--accounts", type=int, default=400, help="accounts in the portfolio")
    parser.add_argument(
        "--orders", type=int, default=150, help="tier-changing orders to time (150)"
    )
    parser.add_argument("--rate", type=float, default=5.0, help="orders per second (5)")
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=30.0,
        help="how long to wait after the orders for the last webhooks (30)",
    )
    parser.add_argument(
        "--deliveries", type=int, default=600, help="deliveries per throughput round (600)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (3)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS_FILE,
        help=f"where the JSON results go (default {RESULTS_FILE})",
    )
    parser.add_argument("--bare-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("accounts", "orders", "deliveries", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.rate <= 0:
        parser.error("--rate must be positive")
    return args


async def _measure(
    urls: ScratchUrls,
    env: dict[str, str],
    args: argparse.Namespace,
    results: Results,
    api: UvicornServer,
    worker: ScorerWorker,
    api_key: str,
) -> list[str]:
    """Everything that needs the servers and the receiver; returns failures."""
    failures: list[str] = []
    headers = {"authorization": f"Bearer {api_key}"}
    receiver = Receiver()
    await receiver.start()
    await api.wait_ready()
    await wait_for_worker(urls.redis_url, QUEUE_NAME, worker)
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60.0) as client:
        try:
            results.note_load("portfolio")
            events = portfolio_events(args.accounts, args.seed, datetime.now(UTC))
            print(f"portfolio: {args.accounts} accounts, {len(events):,} events", flush=True)
            started = time.perf_counter()
            await send_portfolio(client, headers, events)
            await wait_until_clean(urls.asyncpg_dsn, api, worker, timeout_s=300)
            ingest_s = time.perf_counter() - started
            pass_s = await run_portfolio_pass(client, headers, urls.redis_url, worker)
            candidates, tiers = await tier_candidates(urls.asyncpg_dsn)
            results.portfolio = {
                "accounts": args.accounts,
                "events": len(events),
                "ingest_s": ingest_s,
                "pass_s": pass_s,
                "tiers": tiers,
                "candidates": len(candidates),
            }
            print(
                f"  sent and rescored in {ingest_s:.1f}s, pass {pass_s:.1f}s; tiers {tiers}",
                flush=True,
            )
            wanted = WARM_UP_ORDERS + args.orders
            if len(candidates) < wanted:
                failures.append(
                    f"only {len(candidates)} accounts in standard/developing for {wanted} "
                    "orders: raise --accounts"
                )
            random.Random(args.seed).shuffle(candidates)

            # Endpoints are registered only now: the portfolio's first tiers are not timed.
            endpoint_id, secret = await register_endpoint(
                client, headers, receiver.url(LATENCY_PATH), "bench: latency"
            )
            receiver.expect(LATENCY_PATH, secret)
            results.note_load("latency")
            print("order to webhook", flush=True)
            results.latency = await measure_latency(
                urls,
                api,
                worker,
                receiver,
                headers | {"content-type": "application/json"},
                candidates[:wanted],
                rate=args.rate,
                settle_s=args.settle_seconds,
            )
            latency = results.latency
            if latency.failures:
                failures.append(
                    f"{len(latency.failures)} orders failed: " + "; ".join(latency.failures[:5])
                )
            if latency.missing:
                failures.append(
                    f"{latency.missing} tier changes without a webhook {args.settle_seconds:g} s "
                    "after the last order"
                )
            print(
                f"  {latency.changed} of {latency.orders} changed a tier; p50 "
                f"{quantile(latency.latencies_s, 0.5):.3f} s",
                flush=True,
            )
            # No more deliveries to this endpoint: the throughput rounds have the worker alone.
            await set_endpoint_enabled(client, headers, endpoint_id, enabled=False)

            payload = await sample_payload(urls.asyncpg_dsn)
            body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
            results.body_bytes = len(body.encode())
            endpoint_id, secret = await register_endpoint(
                client, headers, receiver.url(THROUGHPUT_PATH), "bench: throughput"
            )
            receiver.expect(THROUGHPUT_PATH, secret)
            receiver.expect(BARE_PATH, secret)
            results.note_load("throughput")
            print(f"throughput: {args.rounds} rounds of {args.deliveries:,}", flush=True)
            for index in range(args.rounds):
                kinds = ["service", *BARE_KINDS]
                if index % 2:
                    kinds.reverse()
                for kind in kinds:
                    tag = f"{index}{kind[:6].replace(' ', '')}"
                    if kind == "service":
                        run_ = await measure_service_throughput(
                            urls,
                            client,
                            headers,
                            receiver,
                            worker,
                            endpoint_id,
                            payload,
                            count=args.deliveries,
                            tag=f"{int(time.time())}{index}",
                            timeout_s=max(120.0, args.deliveries / 10),
                        )
                    else:
                        run_ = await asyncio.to_thread(
                            run_bare_child,
                            receiver.url(BARE_PATH),
                            secret,
                            body,
                            count=args.deliveries,
                            concurrency=results.max_jobs,
                            kind=kind,
                            tag=tag,
                        )
                    results.throughput.append(run_)
                    print(f"  {kind}: {run_.per_s:,.0f}/s", flush=True)
                    if run_.failures:
                        failures.append(f"{kind}: {run_.failures} deliveries did not arrive")
        finally:
            await receiver.stop()
    if receiver.rejected:
        failures.append(
            f"{len(receiver.rejected)} requests did not verify: " + "; ".join(receiver.rejected[:5])
        )
    return failures


def run(args: argparse.Namespace) -> int:
    started_at = datetime.now(UTC)
    urls = webhooks_scratch_urls()
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
        "KAM_ENV": "development",
        # The receiver is on loopback over http: a development allow-list lets it through.
        "KAM_WEBHOOK_ALLOWED_HOSTS": '["127.0.0.1"]',
        # The worker's hourly pass must not fall into the measurements.
        "KAM_PORTFOLIO_PASS_MINUTES": json.dumps([(datetime.now(UTC).minute + 30) % 60]),
    }
    os.environ.update({k: env[k] for k in ("KAM_ENV", "KAM_WEBHOOK_ALLOWED_HOSTS")})
    service_settings = _Settings()
    results = Results(debounce_s=service_settings.debounce_s, max_jobs=service_settings.max_jobs)
    failures: list[str] = []
    log_dir = args.output.parent
    log_dir.mkdir(parents=True, exist_ok=True)
    postgres_version = ""
    try:
        postgres_version = asyncio.run(recreate_database(urls))
        asyncio.run(flush_redis(urls.redis_url))
        run_cli(["migrate"], env)
        api_key = (
            run_cli(["keys", "create", "--name", "bench", "--scopes", "admin"], env)
            .strip()
            .splitlines()[-1]
        )
        with ExitStack() as stack:
            api = stack.enter_context(
                UvicornServer("service", SERVICE_APP, env, log_dir / "webhooks-api.log")
            )
            worker = stack.enter_context(ScorerWorker(env, log_dir / "webhooks-worker.log"))
            failures += asyncio.run(_measure(urls, env, args, results, api, worker, api_key))
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
    print(render_table(table_rows(results)))
    print()
    print(render_details(results, args))
    loads = ", ".join(f"{phase} {value:.1f}" for phase, value in results.load.items())
    print(f"load average (1 min) as each part began, {os.cpu_count()} CPUs: {loads}")
    for failure in failures:
        print(f"\nERROR: {failure}", file=sys.stderr)
    print(f"\nresults: {args.output} ({report['seconds']:.0f}s)")
    return 0 if report["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bare_child:
        return bare_child_main()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
