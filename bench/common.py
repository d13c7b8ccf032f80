"""What every benchmark needs: scratch databases, servers in child processes, an HTTP load
generator and the statistics of its latencies.

A benchmark never writes into a database it did not create: the Postgres database it uses always
has ``bench`` in its name and is dropped and created anew, and its Redis database is never db 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Protocol, Self
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import redis.asyncio as redis_asyncio
from sqlalchemy.engine import URL, make_url

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/kam_bench"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/5"
SCRATCH_DATABASE = "kam_bench"
SCRATCH_REDIS_DB = 5
_DATABASE_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class BenchError(Exception):
    """A real failure of a benchmark run (not a missed target): the run exits non-zero."""


# --- Scratch databases --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScratchUrls:
    """Where a benchmark may write: a SQLAlchemy URL (for the service), the same database as an
    asyncpg DSN, the server's maintenance database, and a Redis URL."""

    database_url: str
    asyncpg_dsn: str
    maintenance_dsn: str
    redis_url: str
    notes: tuple[str, ...] = ()


def named_scratch_urls(database: str, redis_db: int) -> ScratchUrls:
    """The scratch databases of one benchmark: ``database`` and Redis db ``redis_db`` unless
    ``KAM_DATABASE_URL`` / ``KAM_REDIS_URL`` name scratch ones, so that benchmarks never share
    their defaults."""
    env = dict(os.environ)
    url = make_url(env.get("KAM_DATABASE_URL") or "postgresql+asyncpg://postgres@127.0.0.1:5432/")
    if "bench" not in (url.database or ""):
        url = url.set(database=database)
    env["KAM_DATABASE_URL"] = url.render_as_string(hide_password=False)
    redis_url = urlsplit(env.get("KAM_REDIS_URL") or "redis://127.0.0.1:6379/0")
    if redis_url.path.strip("/") in ("", "0"):
        redis_url = redis_url._replace(path=f"/{redis_db}")
    env["KAM_REDIS_URL"] = urlunsplit(redis_url)
    return scratch_urls(env)


def scratch_urls(environ: Mapping[str, str] | None = None) -> ScratchUrls:
    """The scratch databases on the servers of ``KAM_DATABASE_URL`` / ``KAM_REDIS_URL``.

    A database name without ``bench`` in it is replaced by ``kam_bench`` and a Redis db 0 by db 5:
    the benchmark drops its database and flushes its Redis db, so it must never be pointed at
    the ones a developer works with.
    """
    env = os.environ if environ is None else environ
    notes: list[str] = []
    url = make_url(env.get("KAM_DATABASE_URL") or DEFAULT_DATABASE_URL)
    name = url.database or ""
    if "bench" not in name:
        notes.append(
            f"database {name or '(none)'!r} is not a scratch database: using "
            f"{SCRATCH_DATABASE!r} on the same server"
        )
        url = url.set(database=SCRATCH_DATABASE)
    if not _DATABASE_NAME.match(url.database or ""):
        raise BenchError(f"unsupported database name {url.database!r} (letters, digits, _ only)")
    if url.drivername != "postgresql+asyncpg":
        url = url.set(drivername="postgresql+asyncpg")

    redis_url = urlsplit(env.get("KAM_REDIS_URL") or DEFAULT_REDIS_URL)
    db = redis_url.path.strip("/")
    if db in ("", "0"):
        notes.append(f"Redis db {db or '0'} is not a scratch database: using db {SCRATCH_REDIS_DB}")
        redis_url = redis_url._replace(path=f"/{SCRATCH_REDIS_DB}")

    return ScratchUrls(
        database_url=_render(url),
        asyncpg_dsn=_render(url.set(drivername="postgresql")),
        maintenance_dsn=_render(url.set(drivername="postgresql", database="postgres")),
        redis_url=urlunsplit(redis_url),
        notes=tuple(notes),
    )


def _render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


async def recreate_database(urls: ScratchUrls) -> str:
    """Drop and create the scratch database; returns the server's version."""
    name = make_url(urls.database_url).database
    if name is None or not _DATABASE_NAME.match(name) or "bench" not in name:
        raise BenchError(f"refusing to drop {name!r}: not a scratch database")
    conn = await asyncpg.connect(urls.maintenance_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
        version: str = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return version


async def flush_redis(redis_url: str) -> None:
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


def run_cli(args: Sequence[str], env: Mapping[str, str]) -> str:
    """Run ``kam ARGS`` (as ``python -m services.cli.main``) and return its standard output."""
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if done.returncode != 0:
        raise BenchError(f"kam {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


# --- Servers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ChildProcess:
    """A child process of a benchmark, its output in a log file; stopped with SIGINT (as a
    Ctrl-C would) when the ``with`` block ends."""

    def __init__(
        self, name: str, command: Sequence[str], env: Mapping[str, str], log_path: Path
    ) -> None:
        self.name = name
        self._command = list(command)
        self._env = dict(env)
        self._log_path = log_path
        self._log: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def __enter__(self) -> Self:
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self._log_path.open("wb")
        self._process = subprocess.Popen(  # noqa: S603
            self._command, cwd=ROOT, env=self._env, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def check_alive(self) -> None:
        if self._process is None or self._process.poll() is not None:
            raise BenchError(f"{self.name} exited; its log:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self._log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


class UvicornServer(ChildProcess):
    """``uvicorn APP --factory`` in a child process with one worker, no access log and log level
    warning, so that every server of a benchmark runs the same way as ``kam api``."""

    def __init__(self, name: str, app: str, env: Mapping[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "uvicorn", app, "--factory", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--workers", "1", "--log-level", "warning"]
        super().__init__(f"{name} server", [*command, "--no-access-log"], env, log_path)

    async def wait_ready(self, path: str = "/healthz", timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2.0) as client:
            while True:
                self.check_alive()
                try:
                    if (await client.get(path)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{self.name} not ready after {timeout_s:.0f}s:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.2)


# --- CPU accounting -----------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU seconds spent so far by this process (the load generator), by the server process,
    and by the whole machine (busy time of all cores; the rest is mostly Postgres)."""

    client_s: float
    server_s: float
    machine_busy_s: float

    def __sub__(self, earlier: CpuSample) -> CpuSample:
        return CpuSample(
            client_s=self.client_s - earlier.client_s,
            server_s=self.server_s - earlier.server_s,
            machine_busy_s=self.machine_busy_s - earlier.machine_busy_s,
        )


def cpu_sample(server_pid: int) -> CpuSample:
    """Linux only (``/proc``); elsewhere the server and machine figures read 0."""
    client = time.process_time()
    return CpuSample(
        client_s=client, server_s=_process_cpu_s(server_pid), machine_busy_s=_machine_busy_s()
    )


def _process_cpu_s(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    # utime and stime are fields 14 and 15 of the line, 12 and 13 after "pid (comm) state".
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _machine_busy_s() -> float:
    try:
        with open("/proc/stat") as stat:
            first = stat.readline().split()
    except OSError:
        return 0.0
    ticks = [int(v) for v in first[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / _CLOCK_TICKS


# --- Load ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class LoadResult:
    """One measurement: how many events went in how long, and each request's latency."""

    events: int
    requests: int
    seconds: float
    latencies_s: list[float]
    failures: list[str] = field(default_factory=list)
    cpu: CpuSample | None = None  # during the timed part, when the server's pid was given

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50_ms(self) -> float:
        return quantile(self.latencies_s, 0.50) * 1000

    @property
    def p99_ms(self) -> float:
        return quantile(self.latencies_s, 0.99) * 1000


ResponseCheck = Callable[[int, bytes, int], str | None]
"""``check(status_code, body, index)``: None when the answer is the expected one, else why not."""

ClientKind = Literal["httpx", "raw"]
CLIENT_KINDS: tuple[ClientKind, ...] = ("httpx", "raw")


class Poster(Protocol):
    """One simulated client: one keep-alive connection, one request at a time."""

    async def post(self, body: bytes) -> tuple[int, bytes]: ...

    async def aclose(self) -> None: ...


class HttpxPoster:
    """An ``httpx.AsyncClient`` of its own per simulated client: a pool of one connection.

    One client shared by all would be the obvious choice, but httpcore checks every pooled
    connection on every request (``has_expired``, a syscall or two each), so with 16 connections
    it costs about twice the CPU per request, CPU the load generator takes from the server.
    (Where ``sniffio`` is not installed, httpcore also retries ``import sniffio`` for every lock
    it creates, a few per request: a search of ``sys.path`` each time.)
    """

    def __init__(self, base_url: str, path: str, headers: Mapping[str, str]) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self._client = httpx.AsyncClient(base_url=base_url, limits=limits, timeout=120.0)
        self._path = path
        self._headers = dict(headers)

    async def post(self, body: bytes) -> tuple[int, bytes]:
        response = await self._client.post(self._path, content=body, headers=self._headers)
        return response.status_code, response.content

    async def aclose(self) -> None:
        await self._client.aclose()


class RawPoster:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, for answers with a
    Content-Length (every answer of these servers). It spends a small fraction of httpx's CPU
    per request (a twentieth on the 2-core benchmark machine), which shows how much of a
    figure is the load generator's."""

    def __init__(self, base_url: str, path: str, headers: Mapping[str, str]) -> None:
        url = urlsplit(base_url)
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or 80
        lines = [f"POST {path} HTTP/1.1", f"host: {url.netloc}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self._head = "\r\n".join(lines).encode("latin-1")
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self._host, self._port)
        reader, writer = self._streams
        writer.write(b"%s\r\ncontent-length: %d\r\n\r\n%s" % (self._head, len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].split(b"\r\n")
        fields = dict(line.split(b":", 1) for line in header_lines)
        fields = {name.strip().lower(): value.strip() for name, value in fields.items()}
        if b"content-length" not in fields:
            raise BenchError(f"answer without content-length: {head[:200]!r}")
        content = await reader.readexactly(int(fields[b"content-length"]))
        if fields.get(b"connection", b"").lower() == b"close":
            await self.aclose()
        return int(status_line.split(b" ", 2)[1]), content

    async def aclose(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def post_load(
    base_url: str,
    path: str,
    bodies: Sequence[bytes],
    *,
    events_per_body: int,
    concurrency: int,
    headers: Mapping[str, str],
    check: ResponseCheck,
    client: ClientKind = "httpx",
    server_pid: int | None = None,
) -> LoadResult:
    """POST every body once from ``concurrency`` simulated clients, each with one keep-alive
    connection. Bodies are encoded beforehand and answers checked after the clock stops, so the
    load generator spends as little as it can of the cores it shares with the servers. Given the
    server's pid, the CPU of the load generator, the server and the machine is counted over the
    timed part alone."""
    answers: list[tuple[int, bytes]] = [(0, b"")] * len(bodies)
    latencies: list[float] = [0.0] * len(bodies)
    cpu: CpuSample | None = None
    next_index = iter(range(len(bodies)))
    request_headers = {"content-type": "application/json", **headers}
    poster_class = HttpxPoster if client == "httpx" else RawPoster
    posters: list[Poster] = [
        poster_class(base_url, path, request_headers) for _ in range(min(concurrency, len(bodies)))
    ]

    async def worker(poster: Poster) -> None:
        for index in next_index:
            started = time.perf_counter()
            answers[index] = await poster.post(bodies[index])
            latencies[index] = time.perf_counter() - started

    try:
        cpu_before = cpu_sample(server_pid) if server_pid is not None else None
        started = time.perf_counter()
        await asyncio.gather(*(worker(p) for p in posters))
        seconds = time.perf_counter() - started
        if server_pid is not None and cpu_before is not None:
            cpu = cpu_sample(server_pid) - cpu_before
    finally:
        for poster in posters:
            await poster.aclose()

    failures: list[str] = []
    for index, (status_code, content) in enumerate(answers):
        problem = check(status_code, content, index)
        if problem is not None:
            failures.append(f"{path} #{index}: {problem}")
    return LoadResult(
        events=events_per_body * len(bodies),
        requests=len(bodies),
        seconds=seconds,
        latencies_s=latencies,
        failures=failures,
        cpu=cpu,
    )


# --- Statistics ---------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile, interpolated between the closest ranks (``q`` in [0, 1])."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def proc_status_kib(pid: int, key: str) -> float:
    """A ``kB`` figure of ``/proc/PID/status`` (Linux; 0 elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


class ScorerWorker(ChildProcess):
    """``kam scorer`` in a child process."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        command = [sys.executable, "-m", "services.cli.main", "scorer"]
        super().__init__("the scorer worker", command, env, log_path)

    def peak_rss_mib(self) -> float:
        return proc_status_kib(self.pid, "VmHWM") / 1024


async def wait_for_worker(
    redis_url: str, queue_name: str, worker: ScorerWorker, timeout_s: float = 60
) -> None:
    """Until the worker has written its first health check to Redis (it is polling)."""
    client = redis_asyncio.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while not await client.exists(f"{queue_name}:health-check"):
            worker.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"the scorer worker was not polling after {timeout_s:.0f}s")
            await asyncio.sleep(0.2)
    finally:
        await client.aclose()
