"""Ingestion benchmark (`make bench-ingest`): the service's order endpoints beside their ceilings.

In one run, on one Postgres, with the same orders:

* **COPY**: ``copy_records_to_table`` of the rows into an orders-like table, the ceiling of raw
  storage;
* **bare endpoints**: a minimal FastAPI app (asyncpg pool, no ORM) doing one insert per request
  and one multi-row insert per batch, the HTTP ceilings; and a no-op endpoint, the ceiling of the
  load generator and HTTP stack alone;
* **the service**: ``POST /v1/orders`` (one order per request) and ``POST /v1/events`` (batches
  of order events).

Every server is ``uvicorn --factory`` with one worker in its own process; the load generator
(httpx, or with ``--client raw`` a minimal HTTP/1.1 client) runs in this process, the same for
the bare endpoints and the service, so the ratios compare like with like. It shares the cores
with the servers: the no-op endpoint and the CPU accounting (load generator / server / rest of
the machine, per event) show how much of a figure is the client's.

Each measurement runs ``--rounds`` times, bare and service alternating which goes first, and
the table quotes medians. Targets: batches at least 0.5x the bare batch endpoint, single orders
at least 0.6x the bare single-insert endpoint. A missed target is reported, not an error: the
exit status is non-zero only when something failed (a server, a request, or the check that no
order was lost or stored twice).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import asyncpg
from fastapi import FastAPI, Request, Response, status
from pydantic import BaseModel

from bench.common import (
    CLIENT_KINDS,
    RESULTS_DIR,
    BenchError,
    CpuSample,
    LoadResult,
    ResponseCheck,
    ScratchUrls,
    UvicornServer,
    flush_redis,
    median,
    post_load,
    recreate_database,
    run_cli,
    scratch_urls,
)

RESULTS_FILE = RESULTS_DIR / "ingest.json"
SERVICE_APP = "services.api.app:create_app"
BARE_APP = "bench.ingest:create_bare_app"
BARE_DSN_ENV = "BENCH_BARE_DSN"

SINGLE_TARGET = 0.6
BATCH_TARGET = 0.5

# The orders-like tables: the columns of ``orders`` that an order event fills.
ORDER_COLUMNS = (
    "external_id",
    "account_id",
    "ordered_at",
    "amount",
    "cost",
    "currency",
    "status",
    "lines",
    "source_version",
)
COPY_TABLE = "bench_copy_orders"
BARE_SINGLE_TABLE = "bench_bare_single_orders"
BARE_BATCH_TABLE = "bench_bare_batch_orders"
SCRATCH_TABLES = (COPY_TABLE, BARE_SINGLE_TABLE, BARE_BATCH_TABLE)

_CATEGORIES = ("tools", "spare parts", "fasteners", "safety", "hydraulics", "electrics")
_EPOCH = datetime(2024, 11, 23, tzinfo=UTC)


# --- The orders ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchOrder:
    """One order, as the producer sends it and as the orders-like tables store it."""

    event_id: str
    external_id: str
    account_external_id: str
    ordered_at: datetime
    amount: Decimal
    cost: Decimal
    lines: tuple[tuple[str, Decimal, Decimal], ...]
    version: int = 1
    currency: str = "EUR"
    status: str = "placed"

    def payload(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "version": self.version,
            "external_id": self.external_id,
            "account_external_id": self.account_external_id,
            "ordered_at": self.ordered_at.isoformat().replace("+00:00", "Z"),
            "amount": str(self.amount),
            "cost": str(self.cost),
            "currency": self.currency,
            "status": self.status,
            "lines": self.lines_json(),
        }

    def lines_json(self) -> list[dict[str, str]]:
        return [
            {"category": category, "quantity": str(quantity), "amount": str(amount)}
            for category, quantity, amount in self.lines
        ]

    def record(self) -> tuple[Any, ...]:
        """A row of an orders-like table, in ``ORDER_COLUMNS`` order."""
        return (
            self.external_id,
            account_id(self.account_external_id),
            self.ordered_at,
            self.amount,
            self.cost,
            self.currency,
            self.status,
            json.dumps(self.lines_json()),
            self.version,
        )


def account_id(account_external_id: str) -> int:
    """The bare tables have no accounts table: a stable number stands in for the account."""
    return zlib.crc32(account_external_id.encode())


def make_orders(rng: random.Random, prefix: str, count: int, accounts: int) -> list[BenchOrder]:
    orders: list[BenchOrder] = []
    for i in range(count):
        cents = rng.randrange(5_000, 5_000_000)
        amount = Decimal(cents).scaleb(-2)
        lines = []
        left = cents
        for n in range(rng.randint(1, 3), 0, -1):
            part = left if n == 1 else rng.randrange(1, max(2, left))
            left -= part
            quantity = Decimal(rng.randint(1, 50))
            lines.append((rng.choice(_CATEGORIES), quantity, Decimal(part).scaleb(-2)))
        orders.append(
            BenchOrder(
                event_id=f"ev-{prefix}-{i}",
                external_id=f"SO-{prefix}-{i}",
                account_external_id=f"BA-{rng.randrange(accounts)}",
                ordered_at=_EPOCH + timedelta(seconds=rng.randrange(2 * 365 * 86_400)),
                amount=amount,
                cost=(amount * Decimal(rng.randint(50, 90)) / 100).quantize(Decimal("0.01")),
                lines=tuple(lines),
            )
        )
    return orders


def single_body(order: BenchOrder) -> bytes:
    return json.dumps(order.payload()).encode()


def batch_body(orders: Sequence[BenchOrder]) -> bytes:
    return json.dumps({"events": [{"type": "order", **o.payload()} for o in orders]}).encode()


@dataclass(frozen=True, slots=True)
class RoundData:
    """The orders of one round: ``singles`` one per request, ``batches`` many per request."""

    singles: list[BenchOrder]
    batches: list[list[BenchOrder]]
    single_bodies: list[bytes]
    batch_bodies: list[bytes]

    @classmethod
    def build(
        cls,
        rng: random.Random,
        prefix: str,
        *,
        singles: int,
        batches: int,
        batch_size: int,
        accounts: int,
    ) -> RoundData:
        single_orders = make_orders(rng, f"{prefix}s", singles, accounts)
        batched = make_orders(rng, f"{prefix}b", batches * batch_size, accounts)
        groups = [batched[i : i + batch_size] for i in range(0, len(batched), batch_size)]
        return cls(
            singles=single_orders,
            batches=groups,
            single_bodies=[single_body(o) for o in single_orders],
            batch_bodies=[batch_body(g) for g in groups],
        )

    def all_orders(self) -> list[BenchOrder]:
        return [*self.singles, *(o for group in self.batches for o in group)]


# --- The bare endpoints -------------------------------------------------------------------------


class BareLine(BaseModel):
    category: str
    quantity: Decimal
    amount: Decimal


class BareOrder(BaseModel):
    """The order fields with their types, and none of the service's checks."""

    event_id: str
    version: int
    external_id: str
    account_external_id: str
    ordered_at: datetime
    amount: Decimal
    cost: Decimal | None = None
    currency: str
    status: str = "placed"
    lines: list[BareLine] = []

    def record(self) -> tuple[Any, ...]:
        return (
            self.external_id,
            account_id(self.account_external_id),
            self.ordered_at,
            self.amount,
            self.cost,
            self.currency,
            self.status,
            json.dumps([line.model_dump(mode="json") for line in self.lines]),
            self.version,
        )


class BareOrderEvent(BareOrder):
    type: Literal["order"]


class BareBatch(BaseModel):
    events: list[BareOrderEvent]


class BareAck(BaseModel):
    event_id: str
    status: str


class BareBatchAck(BaseModel):
    accepted: int


_INSERT_ONE = (
    f"INSERT INTO {BARE_SINGLE_TABLE} ({', '.join(ORDER_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(ORDER_COLUMNS) + 1))})"
)
_INSERT_MANY = (
    f"INSERT INTO {BARE_BATCH_TABLE} ({', '.join(ORDER_COLUMNS)}) "
    "SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::numeric[], "
    "$5::numeric[], $6::text[], $7::text[], $8::jsonb[], $9::bigint[])"
)
_NOOP_ANSWER = b'{"status":"accepted"}'


def create_bare_app() -> FastAPI:
    """The HTTP ceilings: FastAPI, pydantic-typed bodies and an asyncpg pool as large as the
    service's (10 + 10 overflow), writing into scratch tables shaped like ``orders``. Served by
    ``uvicorn bench.ingest:create_bare_app --factory`` with ``BENCH_BARE_DSN`` set."""
    dsn = os.environ[BARE_DSN_ENV]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await asyncpg.create_pool(dsn, min_size=1, max_size=20)
        try:
            yield
        finally:
            await app.state.pool.close()

    app = FastAPI(title="bare ingestion endpoints", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/noop", status_code=status.HTTP_202_ACCEPTED)
    async def noop(request: Request) -> Response:
        await request.body()
        return Response(_NOOP_ANSWER, status_code=202, media_type="application/json")

    @app.post("/orders", status_code=status.HTTP_202_ACCEPTED)
    async def post_order(body: BareOrder, request: Request) -> BareAck:
        await request.app.state.pool.execute(_INSERT_ONE, *body.record())
        return BareAck(event_id=body.event_id, status="accepted")

    @app.post("/events", status_code=status.HTTP_202_ACCEPTED)
    async def post_events(body: BareBatch, request: Request) -> BareBatchAck:
        columns = [list(column) for column in zip(*(e.record() for e in body.events), strict=True)]
        await request.app.state.pool.execute(_INSERT_MANY, *columns)
        return BareBatchAck(accepted=len(body.events))

    return app


# --- Checks of the answers ----------------------------------------------------------------------


def expect_status(expected: int = 202) -> ResponseCheck:
    def check(status_code: int, body: bytes, index: int) -> str | None:
        return None if status_code == expected else f"HTTP {status_code}: {body[:300]!r}"

    return check


def expect_single_accepted(orders: Sequence[BenchOrder]) -> ResponseCheck:
    def check(status_code: int, body: bytes, index: int) -> str | None:
        if status_code != 202:
            return f"HTTP {status_code}: {body[:300]!r}"
        answer = json.loads(body)
        if answer != {"event_id": orders[index].event_id, "status": "accepted"}:
            return f"unexpected answer {answer!r}"
        return None

    return check


def expect_batch(batches: Sequence[Sequence[BenchOrder]], outcome: str) -> ResponseCheck:
    """Every item of every batch came back ``outcome`` (accepted, or duplicate on a resend)."""

    def check(status_code: int, body: bytes, index: int) -> str | None:
        if status_code != 202:
            return f"HTTP {status_code}: {body[:300]!r}"
        answer = json.loads(body)
        results = answer.get("results", [])
        sent = [o.event_id for o in batches[index]]
        if [r.get("event_id") for r in results] != sent:
            return "the results do not name the events sent, in order"
        wrong = [r for r in results if r.get("status") != outcome]
        if wrong:
            return f"{len(wrong)} of {len(sent)} not {outcome}, e.g. {wrong[0]!r}"
        return None

    return check


def expect_bare_batch(size: int) -> ResponseCheck:
    def check(status_code: int, body: bytes, index: int) -> str | None:
        if status_code != 202:
            return f"HTTP {status_code}: {body[:300]!r}"
        accepted = json.loads(body).get("accepted")
        return None if accepted == size else f"accepted {accepted}, sent {size}"

    return check


# --- Measurements -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Measurement:
    key: str
    label: str
    ceiling: str | None  # the key of the measurement it is held against
    per_request: int  # events per request (0 for COPY)


MEASUREMENTS = {
    m.key: m
    for m in (
        Measurement("copy", "COPY (copy_records_to_table)", None, 0),
        Measurement("noop", "bare no-op endpoint (no DB)", None, 1),
        Measurement("bare_single", "bare endpoint, 1 insert/request", "noop", 1),
        Measurement("service_single", "service POST /v1/orders", "bare_single", 1),
        Measurement("bare_batch", "bare endpoint, 1 insert/batch", "copy", 0),
        Measurement("service_batch", "service POST /v1/events", "bare_batch", 0),
    )
}


@dataclass(slots=True)
class RoundFigures:
    """One run of one measurement."""

    events: int
    requests: int
    seconds: float
    events_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    cpu_client_s: float | None = None
    cpu_server_s: float | None = None
    cpu_machine_s: float | None = None

    @classmethod
    def of(cls, result: LoadResult, cpu: CpuSample | None) -> RoundFigures:
        return cls(
            events=result.events,
            requests=result.requests,
            seconds=result.seconds,
            events_per_s=result.events_per_s,
            p50_ms=result.p50_ms if result.requests else None,
            p99_ms=result.p99_ms if result.requests else None,
            cpu_client_s=cpu.client_s if cpu else None,
            cpu_server_s=cpu.server_s if cpu else None,
            cpu_machine_s=cpu.machine_busy_s if cpu else None,
        )


@dataclass(slots=True)
class Figures:
    rounds: dict[str, list[RoundFigures]] = field(default_factory=dict)

    def add(self, key: str, figures: RoundFigures) -> None:
        self.rounds.setdefault(key, []).append(figures)

    def median_of(self, key: str, attribute: str) -> float | None:
        values = [getattr(r, attribute) for r in self.rounds.get(key, [])]
        present = [v for v in values if v is not None]
        return median(present) if present else None

    def eps(self, key: str) -> float:
        return self.median_of(key, "events_per_s") or 0.0


@dataclass(frozen=True, slots=True)
class Servers:
    bare: UvicornServer
    service: UvicornServer
    api_key: str


async def measure_copy(dsn: str, orders: Sequence[BenchOrder]) -> LoadResult:
    records = [o.record() for o in orders]
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        await conn.copy_records_to_table(COPY_TABLE, records=records, columns=list(ORDER_COLUMNS))
        seconds = time.perf_counter() - started
    finally:
        await conn.close()
    return LoadResult(events=len(records), requests=0, seconds=seconds, latencies_s=[])


async def run_measurement(
    key: str, data: RoundData, servers: Servers, urls: ScratchUrls, args: argparse.Namespace
) -> tuple[LoadResult, CpuSample | None]:
    if key == "copy":
        return await measure_copy(urls.asyncpg_dsn, data.all_orders()), None
    service = key.startswith("service")
    server = servers.service if service else servers.bare
    headers = {"authorization": f"Bearer {servers.api_key}"} if service else {}
    batch_size = len(data.batches[0]) if data.batches else 0
    path: str
    bodies: list[bytes]
    per_body: int
    concurrency: int
    check: ResponseCheck
    match key:
        case "noop":
            path, bodies, per_body = "/noop", data.single_bodies, 1
            concurrency, check = args.single_concurrency, expect_status()
        case "bare_single":
            path, bodies, per_body = "/orders", data.single_bodies, 1
            concurrency, check = args.single_concurrency, expect_status()
        case "service_single":
            path, bodies, per_body = "/v1/orders", data.single_bodies, 1
            concurrency, check = args.single_concurrency, expect_single_accepted(data.singles)
        case "bare_batch":
            path, bodies, per_body = "/events", data.batch_bodies, batch_size
            concurrency, check = args.batch_concurrency, expect_bare_batch(batch_size)
        case "service_batch":
            path, bodies, per_body = "/v1/events", data.batch_bodies, batch_size
            concurrency, check = args.batch_concurrency, expect_batch(data.batches, "accepted")
        case _:
            raise ValueError(key)
    server.check_alive()
    result = await post_load(
        server.base_url,
        path,
        bodies,
        events_per_body=per_body,
        concurrency=concurrency,
        headers=headers,
        check=check,
        client=args.client,
        server_pid=server.pid,
    )
    return result, result.cpu


def round_order(round_index: int) -> list[str]:
    """Bare and service alternate which goes first, and COPY and the no-op endpoint which end
    of the round they take, so that drift on a noisy machine spreads over both sides."""
    if round_index % 2 == 0:
        return ["noop", "bare_single", "service_single", "bare_batch", "service_batch", "copy"]
    return ["copy", "service_single", "bare_single", "service_batch", "bare_batch", "noop"]


async def warm_up(servers: Servers, data: RoundData, args: argparse.Namespace) -> None:
    """Open the pools' connections and fill the caches (prepared statements, SQLAlchemy's
    compiled statements, pydantic's validators) before anything is timed."""
    service_headers = {"authorization": f"Bearer {servers.api_key}"}
    bare, service = servers.bare.base_url, servers.service.base_url
    size = len(data.batches[0])
    runs: list[tuple[str, str, list[bytes], dict[str, str], ResponseCheck, int]] = [
        (bare, "/noop", data.single_bodies, {}, expect_status(), args.single_concurrency),
        (bare, "/orders", data.single_bodies, {}, expect_status(), args.single_concurrency),
        (
            service,
            "/v1/orders",
            data.single_bodies,
            service_headers,
            expect_single_accepted(data.singles),
            args.single_concurrency,
        ),
        (bare, "/events", data.batch_bodies, {}, expect_bare_batch(size), args.batch_concurrency),
        (
            service,
            "/v1/events",
            data.batch_bodies,
            service_headers,
            expect_batch(data.batches, "accepted"),
            args.batch_concurrency,
        ),
    ]
    for base_url, path, bodies, headers, check, concurrency in runs:
        result = await post_load(
            base_url,
            path,
            bodies,
            events_per_body=1,
            concurrency=concurrency,
            headers=headers,
            check=check,
            client=args.client,
        )
        if result.failures:
            raise BenchError("warm-up failed:\n" + "\n".join(result.failures[:10]))


# --- Integrity ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Integrity:
    orders_sent: int = 0
    orders_stored: int = 0
    missing: int = 0
    unexpected: int = 0
    stored_twice: int = 0
    order_events_sent: int = 0
    order_events_stored: int = 0
    resent_batch: int = 0
    resent_duplicates: int = 0
    orders_after_resend: int = 0
    bare_rows: dict[str, int] = field(default_factory=dict)
    bare_rows_expected: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def check_integrity(
    urls: ScratchUrls,
    servers: Servers,
    sent: Sequence[BenchOrder],
    resend: Sequence[BenchOrder],
    bare_expected: dict[str, int],
) -> Integrity:
    """Every order sent to the service is stored exactly once, and a batch sent again comes back
    all ``duplicate`` and stores nothing."""
    report = Integrity(
        orders_sent=len({o.external_id for o in sent}),
        order_events_sent=len({o.event_id for o in sent}),
        bare_rows_expected=bare_expected,
    )
    conn = await asyncpg.connect(urls.asyncpg_dsn)
    try:
        stored: list[str] = [r[0] for r in await conn.fetch("SELECT external_id FROM orders")]
        report.orders_stored = len(stored)
        present = set(stored)
        expected = {o.external_id for o in sent}
        report.stored_twice = len(stored) - len(present)
        report.missing = len(expected - present)
        report.unexpected = len(present - expected)
        report.order_events_stored = await conn.fetchval(
            "SELECT count(*) FROM ingest_events WHERE type = 'order'"
        )
        for table in bare_expected:
            report.bare_rows[table] = await conn.fetchval(f"SELECT count(*) FROM {table}")

        result = await post_load(
            servers.service.base_url,
            "/v1/events",
            [batch_body(resend)],
            events_per_body=len(resend),
            concurrency=1,
            headers={"authorization": f"Bearer {servers.api_key}"},
            check=expect_batch([resend], "duplicate"),
        )
        report.resent_batch = len(resend)
        report.resent_duplicates = 0 if result.failures else len(resend)
        report.problems.extend(result.failures)
        report.orders_after_resend = await conn.fetchval("SELECT count(*) FROM orders")
    finally:
        await conn.close()

    if report.orders_stored != report.orders_sent:
        report.problems.append(f"{report.orders_stored} orders stored, {report.orders_sent} sent")
    if report.missing or report.unexpected or report.stored_twice:
        report.problems.append(
            f"{report.missing} sent orders missing, {report.unexpected} "
            f"unexpected, {report.stored_twice} stored twice"
        )
    if report.order_events_stored != report.order_events_sent:
        report.problems.append(
            f"{report.order_events_stored} order events stored, {report.order_events_sent} sent"
        )
    if report.orders_after_resend != report.orders_stored:
        report.problems.append(
            f"the resent batch changed the order count: "
            f"{report.orders_stored} -> {report.orders_after_resend}"
        )
    for table, rows in report.bare_rows.items():
        if rows != bare_expected[table]:
            report.problems.append(f"{table}: {rows} rows, {bare_expected[table]} sent")
    return report


# --- Report -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    measurement: str
    ceiling: str
    minimum: float
    ratio: float

    @property
    def met(self) -> bool:
        return self.ratio >= self.minimum


def targets(figures: Figures) -> list[Target]:
    def ratio(key: str, ceiling: str) -> float:
        return figures.eps(key) / figures.eps(ceiling) if figures.eps(ceiling) else 0.0

    return [
        Target(
            "batch ingestion",
            "service_batch",
            "bare_batch",
            BATCH_TARGET,
            ratio("service_batch", "bare_batch"),
        ),
        Target(
            "single events",
            "service_single",
            "bare_single",
            SINGLE_TARGET,
            ratio("service_single", "bare_single"),
        ),
    ]


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float, ceiling: float) -> str:
    if not ceiling:
        return "-"
    ratio = value / ceiling
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.3f}x"


def render_table(figures: Figures, args: argparse.Namespace) -> str:
    copy_eps = figures.eps("copy")
    rows: list[tuple[str, ...]] = [
        ("measurement", "load", "events/s", "p50 ms", "p99 ms", "x ceiling", "ceiling", "x COPY")
    ]
    for key, m in MEASUREMENTS.items():
        if key not in figures.rounds:
            continue
        eps = figures.eps(key)
        if key == "copy":
            load = f"{figures.rounds[key][0].events:,} rows"
        elif m.per_request:
            load = f"{args.single_concurrency} clients x 1"
        else:
            load = f"{args.batch_concurrency} clients x {args.batch_size}"
        rows.append(
            (
                m.label,
                load,
                f"{eps:,.0f}",
                _num(figures.median_of(key, "p50_ms")),
                _num(figures.median_of(key, "p99_ms")),
                _ratio(eps, figures.eps(m.ceiling)) if m.ceiling else "",
                m.ceiling or "",
                _ratio(eps, copy_eps) if key != "copy" else "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    left = {0, 1, 6}  # text columns; the figures are right-aligned

    def line(row: tuple[str, ...]) -> str:
        cells = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rendered = [line(rows[0]), "-" * len(line(rows[0])), *(line(r) for r in rows[1:])]
    return "\n".join(rendered)


def render_rounds(figures: Figures) -> str:
    lines = ["events/s by round (the table quotes the median):"]
    for key in MEASUREMENTS:
        if key in figures.rounds:
            values = " / ".join(f"{r.events_per_s:,.0f}" for r in figures.rounds[key])
            lines.append(f"  {key:<15} {values}")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class CpuPerEvent:
    """Median CPU milliseconds per event: the load generator (this process), the server
    process, and the rest of the machine (Postgres, Redis, and whatever else runs on it)."""

    client_ms: float
    server_ms: float
    rest_ms: float


def cpu_per_event(figures: Figures, key: str) -> CpuPerEvent | None:
    rounds = figures.rounds.get(key, [])
    if not rounds or rounds[0].cpu_client_s is None:
        return None

    def per_event(attribute: str) -> float:
        return median([1e3 * (getattr(r, attribute) or 0.0) / r.events for r in rounds])

    client, server = per_event("cpu_client_s"), per_event("cpu_server_s")
    rest = max(0.0, per_event("cpu_machine_s") - client - server)
    return CpuPerEvent(client_ms=client, server_ms=server, rest_ms=rest)


def render_cpu(figures: Figures) -> str:
    lines = [
        "CPU ms per event (medians): load generator / server process / rest of machine "
        "(Postgres, Redis, anything else running):"
    ]
    for key in MEASUREMENTS:
        cpu = cpu_per_event(figures, key)
        if cpu is not None:
            lines.append(
                f"  {key:<15} {cpu.client_ms:7.3f} / {cpu.server_ms:7.3f} / {cpu.rest_ms:7.3f}"
            )
    return "\n".join(lines)


def client_bound_note(figures: Figures, args: argparse.Namespace) -> str | None:
    """A warning when the load generator, which shares the cores, spent more CPU per request
    than the bare single-insert server: that ceiling is then partly the client's."""
    cpu = cpu_per_event(figures, "bare_single")
    if cpu is None or cpu.client_ms <= cpu.server_ms:
        return None
    return (
        f"note: the load generator ({args.client}) spent {cpu.client_ms:.2f} ms CPU per request, "
        f"the bare single-insert server {cpu.server_ms:.2f} ms: on these cores the bare single "
        "ceiling is partly the client's, which flatters the single-event ratio"
        + ("; --client raw costs a small fraction of that." if args.client == "httpx" else ".")
    )


def render_targets(results: list[Target]) -> str:
    lines = ["targets (events/s, medians):"]
    for t in results:
        verdict = "PASS" if t.met else "MISS"
        lines.append(
            f"  {t.name:<16} {t.measurement} >= {t.minimum:.2f}x {t.ceiling}: "
            f"{t.ratio:.2f}x  {verdict}"
        )
    return "\n".join(lines)


def render_integrity(report: Integrity) -> str:
    verdict = "OK" if report.ok else "FAILED"
    lines = [
        f"integrity: {verdict}",
        f"  orders sent {report.orders_sent:,}, stored {report.orders_stored:,} "
        f"(missing {report.missing}, unexpected {report.unexpected}, "
        f"twice {report.stored_twice}); order events sent {report.order_events_sent:,}, "
        f"stored {report.order_events_stored:,}",
        f"  resent batch of {report.resent_batch}: {report.resent_duplicates} duplicate, orders "
        f"after resend {report.orders_after_resend:,}",
        "  bare tables: "
        + ", ".join(
            f"{t} {report.bare_rows.get(t, 0):,}/{n:,}"
            for t, n in report.bare_rows_expected.items()
        ),
    ]
    lines.extend(f"  PROBLEM: {p}" for p in report.problems)
    return "\n".join(lines)


def results_json(
    args: argparse.Namespace,
    figures: Figures,
    integrity: Integrity | None,
    environment: dict[str, Any],
    failures: list[str],
    started_at: datetime,
) -> dict[str, Any]:
    copy_eps = figures.eps("copy")
    measurements: dict[str, Any] = {}
    for key, m in MEASUREMENTS.items():
        if key not in figures.rounds:
            continue
        eps = figures.eps(key)
        ceiling = figures.eps(m.ceiling) if m.ceiling else 0.0
        measurements[key] = {
            "label": m.label,
            "ceiling": m.ceiling,
            "median": {
                "events_per_s": eps,
                "p50_ms": figures.median_of(key, "p50_ms"),
                "p99_ms": figures.median_of(key, "p99_ms"),
            },
            "ratio_to_ceiling": eps / ceiling if ceiling else None,
            "ratio_to_copy": eps / copy_eps if copy_eps else None,
            "cpu_ms_per_event": asdict(cpu) if (cpu := cpu_per_event(figures, key)) else None,
            "rounds": [asdict(r) for r in figures.rounds[key]],
        }
    return {
        "benchmark": "ingest",
        "started_at": started_at.isoformat(),
        "seconds": (datetime.now(UTC) - started_at).total_seconds(),
        "config": {k: v for k, v in vars(args).items() if k != "output"},
        "environment": environment,
        "measurements": measurements,
        "targets": [
            {
                "name": t.name,
                "measurement": t.measurement,
                "ceiling": t.ceiling,
                "minimum": t.minimum,
                "ratio": t.ratio,
                "met": t.met,
            }
            for t in targets(figures)
        ],
        "integrity": None if integrity is None else asdict(integrity) | {"ok": integrity.ok},
        "failures": failures,
        "ok": not failures and (integrity is not None and integrity.ok),
    }


# --- The run ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description="Ingestion throughput and latency of the service beside COPY and bare "
        "FastAPI endpoints (KAM_DATABASE_URL / KAM_REDIS_URL name the servers; the benchmark "
        "uses scratch databases on them).",
    )
    parser.add_argument(
        "--orders-single",
        type=int,
        default=3000,
        help="orders sent one per request, per round (default 3000)",
    )
    parser.add_argument(
        "--batches",
        type=int,
        default=60,
        # 24 batches made rounds of under a second, whose ratio swung from 0.36 to 0.56.
        help="batches sent per round (default 60)",
    )
    parser.add_argument("--batch-size", type=int, default=500, help="orders per batch (500)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every measurement (3)")
    parser.add_argument(
        "--single-concurrency",
        type=int,
        default=16,
        help="concurrent clients sending single orders (16)",
    )
    parser.add_argument(
        "--batch-concurrency", type=int, default=4, help="concurrent clients sending batches (4)"
    )
    parser.add_argument(
        "--accounts", type=int, default=1000, help="distinct accounts the orders belong to (1000)"
    )
    parser.add_argument(
        "--pause", type=float, default=0.5, help="seconds of quiet between measurements (0.5)"
    )
    parser.add_argument(
        "--client",
        choices=CLIENT_KINDS,
        default="httpx",
        help="load generator: httpx (default) or raw, a minimal HTTP/1.1 client on asyncio "
        "streams that leaves more of the shared cores to the servers",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS_FILE,
        help=f"where the JSON results go (default {RESULTS_FILE})",
    )
    args = parser.parse_args(argv)
    for name in (
        "orders_single",
        "batches",
        "batch_size",
        "rounds",
        "single_concurrency",
        "batch_concurrency",
        "accounts",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch_size > 1000:
        parser.error("--batch-size: the service takes at most 1000 events a batch")
    return args


async def prepare_databases(urls: ScratchUrls) -> str:
    version = await recreate_database(urls)
    await flush_redis(urls.redis_url)
    return version


async def create_scratch_tables(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for table in SCRATCH_TABLES:
            # Columns, defaults, identity, checks and indexes of orders; no foreign key.
            await conn.execute(f"CREATE TABLE {table} (LIKE orders INCLUDING ALL)")
    finally:
        await conn.close()


async def measure_all(
    servers: Servers,
    urls: ScratchUrls,
    args: argparse.Namespace,
    figures: Figures,
) -> Integrity:
    """Warm up, run every measurement ``--rounds`` times into ``figures``, then check that
    nothing was lost or stored twice."""
    await asyncio.gather(servers.bare.wait_ready(), servers.service.wait_ready())
    rng = random.Random(args.seed)
    build = RoundData.build
    sizes = {"batch_size": args.batch_size, "accounts": args.accounts}
    warm = build(
        rng, "w", singles=min(200, args.orders_single), batches=args.batch_concurrency, **sizes
    )
    rounds = [
        build(rng, f"r{r}", singles=args.orders_single, batches=args.batches, **sizes)
        for r in range(args.rounds)
    ]
    print(f"warming up ({len(warm.all_orders()):,} orders per server)", flush=True)
    await warm_up(servers, warm, args)

    for index, data in enumerate(rounds):
        for key in round_order(index):
            await asyncio.sleep(args.pause)
            result, cpu = await run_measurement(key, data, servers, urls, args)
            figures.add(key, RoundFigures.of(result, cpu))
            print(
                f"  round {index + 1}/{args.rounds} {key:<15} {result.events_per_s:>10,.0f} "
                f"events/s  ({result.events:,} events in {result.seconds:.2f}s)"
                + (f"  {len(result.failures)} FAILED" if result.failures else ""),
                flush=True,
            )
            if result.failures:
                raise BenchError(
                    f"{key}: {len(result.failures)} requests failed:\n"
                    + "\n".join(result.failures[:10])
                )

    sent = [*warm.all_orders(), *(o for data in rounds for o in data.all_orders())]
    singles = len(warm.singles) + sum(len(d.singles) for d in rounds)
    batched = sum(len(g) for d in [warm, *rounds] for g in d.batches)
    bare_expected = {
        COPY_TABLE: sum(len(d.all_orders()) for d in rounds),
        BARE_SINGLE_TABLE: singles,
        BARE_BATCH_TABLE: batched,
    }
    return await check_integrity(urls, servers, sent, rounds[0].batches[0], bare_expected)


def run(args: argparse.Namespace) -> int:
    started_at = datetime.now(UTC)
    urls = scratch_urls()
    for note in urls.notes:
        print(f"note: {note}", flush=True)
    print(
        f"scratch database {urls.database_url.rsplit('/', 1)[-1]}, Redis {urls.redis_url}",
        flush=True,
    )
    postgres_version = asyncio.run(prepare_databases(urls))
    env = {
        **os.environ,
        "KAM_DATABASE_URL": urls.database_url,
        "KAM_REDIS_URL": urls.redis_url,
        "KAM_LOG_LEVEL": "WARNING",
        # Rate limiting stays on (its Redis round trip is part of the cost measured) with a
        # limit the load never reaches: the benchmark's one key sends far above a producer's.
        "KAM_RATE_LIMIT_WRITES": "1000000/minute",
        BARE_DSN_ENV: urls.asyncpg_dsn,
    }
    run_cli(["migrate"], env)
    api_key = (
        run_cli(["keys", "create", "--name", "bench", "--scopes", "events:write"], env)
        .strip()
        .splitlines()[-1]
    )
    asyncio.run(create_scratch_tables(urls.asyncpg_dsn))

    environment = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "postgres": postgres_version,
    }
    figures = Figures()
    failures: list[str] = []
    integrity: Integrity | None = None
    log_dir = args.output.parent
    try:
        with ExitStack() as stack:
            bare = stack.enter_context(UvicornServer("bare", BARE_APP, env, log_dir / "bare.log"))
            service = stack.enter_context(
                UvicornServer("service", SERVICE_APP, env, log_dir / "service.log")
            )
            print(f"servers: bare {bare.base_url}, service {service.base_url}", flush=True)
            servers = Servers(bare=bare, service=service, api_key=api_key)
            integrity = asyncio.run(measure_all(servers, urls, args, figures))
    except BenchError as exc:
        failures.append(str(exc))

    report = results_json(args, figures, integrity, environment, failures, started_at)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")

    print()
    print(
        f"load generator: {args.client}, in this process; servers: uvicorn, 1 worker each; "
        f"Postgres {postgres_version}; {os.cpu_count()} CPUs"
    )
    print(render_table(figures, args))
    print()
    print(render_targets(targets(figures)))
    client_note = client_bound_note(figures, args)
    if client_note is not None:
        print(client_note)
    print()
    print(render_rounds(figures))
    print()
    print(render_cpu(figures))
    if integrity is not None:
        print()
        print(render_integrity(integrity))
    for failure in failures:
        print(f"\nERROR: {failure}", file=sys.stderr)
    print(f"\nresults: {args.output} ({report['seconds']:.0f}s)")
    return 0 if report["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
