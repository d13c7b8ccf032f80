"""A whole KAM deployment in real processes for the fault tests: a private Postgres (initdb in
a temporary directory) and a private redis-server, each on a free port so a test may stop,
freeze (SIGSTOP) or kill them, and ``kam api`` / ``kam scorer`` as child processes that a test
may SIGKILL and start again."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parents[1]
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def postgres_available() -> bool:
    return (PG_BIN / "initdb").exists() and shutil.which("redis-server") is not None


class Postgres:
    """initdb + pg_ctl in a directory of its own. As root, the server runs as ``postgres``."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "pg"
        self.port = free_port()
        self.log = base / "postgres.log"
        self._as_postgres = os.geteuid() == 0

    def _run(self, *command: str) -> None:
        argv = [str(PG_BIN / command[0]), *command[1:]]
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, capture_output=True, timeout=120)  # noqa: S603

    def init(self) -> None:
        self.dir.mkdir(parents=True)
        self.log.touch()
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
            shutil.chown(self.dir.parent, "postgres", "postgres")
            shutil.chown(self.log, "postgres", "postgres")
        self._run("initdb", "-D", str(self.dir), "-U", "postgres", "-A", "trust", "--no-sync")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.dir), "-o", options, "-l", str(self.log), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir), "-m", "fast", "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/kam"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


class Redis:
    def __init__(self, base: Path) -> None:
        self.port = free_port()
        self.dir = base
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(  # noqa: S603
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class Stack:
    """Postgres, Redis, migrations and an admin key; API and scorer processes on demand."""

    def __init__(self, base: Path, **settings: str) -> None:
        self.base = base
        self.postgres = Postgres(base)
        self.redis = Redis(base)
        self.api_port = free_port()
        self.settings = settings
        self.admin_key = ""
        self.api: subprocess.Popen[bytes] | None = None
        self.scorer: subprocess.Popen[bytes] | None = None
        self._scorer_logs = 0
        self._files: list[IO[bytes]] = []

    def _log_file(self, name: str) -> IO[bytes]:
        handle = (self.base / name).open("ab")
        self._files.append(handle)
        return handle

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KAM_ENV": "test",
            "KAM_DATABASE_URL": self.postgres.url,
            "KAM_REDIS_URL": self.redis.url,
            "KAM_LOG_LEVEL": "INFO",
            "KAM_WEBHOOK_ALLOWED_HOSTS": '["127.0.0.1"]',
            # The faults are the subject here, not the rate limits (tested on their own).
            "KAM_RATE_LIMIT_ENABLED": "false",
            **self.settings,
        }

    def _kam(self, *args: str) -> str:
        result = subprocess.run(  # noqa: S603
            [sys.executable, "-m", "services.cli.main", *args],
            env=self.env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return result.stdout

    def start(self) -> None:
        self.postgres.init()
        self.postgres.start()
        self.redis.start()
        subprocess.run(  # noqa: S603
            [
                str(PG_BIN / "createdb"),
                *("-h", "127.0.0.1", "-p", str(self.postgres.port), "-U", "postgres", "kam"),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self._kam("migrate")
        self.admin_key = self._kam("keys", "create", "--name", "admin", "--scopes", "admin")
        self.admin_key = self.admin_key.strip().splitlines()[-1]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def start_api(self) -> None:
        self.api = subprocess.Popen(  # noqa: S603
            [
                sys.executable,
                *("-m", "services.cli.main", "api", "--port", str(self.api_port)),
                *("--host", "127.0.0.1"),
            ],
            env=self.env,
            cwd=ROOT,
            stdout=self._log_file("api.log"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.api.poll() is None, "the API exited"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api_url}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError("the API did not start")

    def start_scorer(self) -> None:
        self._scorer_logs += 1
        self.scorer = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "scorer"],
            env=self.env,
            cwd=ROOT,
            stdout=self._log_file(self.scorer_log(self._scorer_logs).name),
            stderr=subprocess.STDOUT,
        )

    def scorer_log(self, n: int | None = None) -> Path:
        return self.base / f"scorer-{n or self._scorer_logs}.log"

    def kill_scorer(self) -> None:
        assert self.scorer is not None
        self.scorer.kill()  # SIGKILL: no shutdown, no hand-back
        self.scorer.wait(10)

    def stop(self) -> None:
        for process in (self.scorer, self.api):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
        self.redis.stop()
        with contextlib.suppress(subprocess.SubprocessError):
            self.postgres.stop()
        for handle in self._files:
            handle.close()


@contextlib.contextmanager
def running_stack(**settings: str) -> Iterator[Stack]:
    base = Path(tempfile.mkdtemp(prefix="kam-faults-"))
    stack = Stack(base, **settings)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(base, ignore_errors=True)
