"""The ``kam`` command as an operator runs it: real processes, real servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import redis
from arq.constants import health_check_key_suffix as HEALTH_CHECK_SUFFIX

from shared.settings import Settings
from tests import factories


def _kam(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KAM_DATABASE_URL": settings.database_url,
        "KAM_REDIS_URL": settings.redis_url,
        "KAM_LOG_LEVEL": "WARNING",
    }
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "services.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_keys_create_list_revoke(settings: Settings, client: httpx.AsyncClient) -> None:
    created = _kam(settings, "keys", "create", "--name", "erp", "--scopes", "events:write")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]  # the key is the last line, shown once
    assert key.startswith("kam_")
    prefix = key.split("_")[1]

    ok = await client.post(
        "/v1/orders", json=factories.order(), headers={"Authorization": f"Bearer {key}"}
    )
    assert ok.status_code == 202

    listed = _kam(settings, "keys", "list")
    assert listed.returncode == 0
    assert prefix in listed.stdout
    assert key not in listed.stdout  # only the prefix, never the key

    assert _kam(settings, "keys", "revoke", prefix).returncode == 0
    [row] = [
        line
        for line in _kam(settings, "keys", "list").stdout.splitlines()
        if line.startswith(prefix)
    ]
    assert not row.rstrip().endswith(" -")  # the revoked column now holds a time
    assert _kam(settings, "keys", "revoke", "ffffffff").returncode != 0


def test_keys_create_refuses_unknown_scope(settings: Settings) -> None:
    result = _kam(settings, "keys", "create", "--name", "x", "--scopes", "root")
    assert result.returncode != 0
    assert "unknown scope 'root'" in result.stderr


def test_dev_runs_api_and_scorer_and_stops_on_ctrl_c(settings: Settings) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "KAM_DATABASE_URL": settings.database_url,
        "KAM_REDIS_URL": settings.redis_url,
        "KAM_QUEUE_NAME": settings.queue_name,
    }
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "services.cli.main", "dev", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert ready is not None
        assert ready.status_code == 200
        docs = httpx.get(f"http://127.0.0.1:{port}/docs", timeout=5)
        assert docs.status_code == 200
        assert "swagger" in docs.text.lower()
        # the worker records its health in Redis once it is consuming the queue
        client = redis.Redis.from_url(settings.redis_url)
        try:
            health_key = f"{settings.queue_name}{HEALTH_CHECK_SUFFIX}"
            while time.monotonic() < deadline and not client.exists(health_key):
                time.sleep(0.3)
            assert client.exists(health_key)
        finally:
            client.close()
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "KAM is running" in output
    assert "KAM stopped." in output
    assert "scorer_started" in output  # the worker came up beside the API
