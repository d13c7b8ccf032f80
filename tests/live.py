"""The API in a process of its own (uvicorn), for tests of what only a real server shows: its
log output, its real socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from shared.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_api(settings: Settings, log_file: Path, **env: str) -> Iterator[str]:
    """Run the API on a free port, its output (logs included) in ``log_file``; yields its URL."""
    port = free_port()
    environment = {
        **os.environ,
        "KAM_DATABASE_URL": settings.database_url,
        "KAM_REDIS_URL": settings.redis_url,
        "KAM_QUEUE_NAME": settings.queue_name,
        "KAM_ENV": "test",
        "KAM_RATE_LIMIT_FAILED_AUTH": settings.rate_limit_failed_auth,
        "KAM_RATE_LIMIT_WRITES": settings.rate_limit_writes,
        "KAM_RATE_LIMIT_READS": settings.rate_limit_reads,
        **env,
    }
    with log_file.open("wb") as out:
        server = subprocess.Popen(  # noqa: S603
            [
                sys.executable,
                "-m",
                "uvicorn",
                "services.api.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
            ],
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    httpx.get(f"{url}/healthz", timeout=1)
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=20)
