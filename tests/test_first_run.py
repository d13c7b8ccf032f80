"""First run: the port is checked before anything says it runs, `kam demo` takes the same
address setting as `kam dev`, and every option's --help says what it does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from services.cli.main import build_parser, port_in_use
from shared.settings import Settings
from tests.live import free_port


def _kam(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "services.cli.main", *args],
        env={
            **os.environ,
            "KAM_DATABASE_URL": settings.database_url,
            "KAM_REDIS_URL": settings.redis_url,
            "KAM_LOG_LEVEL": "WARNING",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dev_refuses_a_port_in_use_before_saying_it_runs(settings: Settings) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        result = _kam(settings, "dev", "--port", str(port))
    assert result.returncode != 0
    assert f"port {port} on 127.0.0.1 (for the API) is in use" in result.stderr
    assert f"make run PORT={port + 10}" in result.stderr
    assert "KAM is running" not in result.stdout


def test_dev_takes_the_port_from_kam_port(settings: Settings) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = _kam(settings, "dev", KAM_PORT=str(port))  # as `make run PORT=...` sets it
    assert f"port {port} on 127.0.0.1" in result.stderr


def test_port_in_use_is_false_for_a_free_port() -> None:
    assert not port_in_use("127.0.0.1", free_port())


def test_demo_targets_the_same_address_as_dev(settings: Settings) -> None:
    port = free_port()  # nothing listens there
    result = _kam(settings, "demo", "--api-key", "kam_x", "--accounts", "1", KAM_PORT=str(port))
    assert result.returncode != 0
    assert f"cannot reach http://127.0.0.1:{port}" in result.stderr
    result = _kam(settings, "demo", "--api-key", "kam_x", "--accounts", "1", "--port", str(port))
    assert f"cannot reach http://127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize("command", ["dev", "api", "demo", "backtest"])
def test_every_option_says_what_it_does(command: str) -> None:
    parser = build_parser()
    [sub] = [a for a in parser._subparsers._group_actions if a.choices]  # type: ignore[union-attr]
    assert sub.choices is not None
    commands = dict(sub.choices)
    for action in commands[command]._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"kam {command} {action.option_strings[0]} has no help"
