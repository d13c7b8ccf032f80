"""``kam``: run, migrate and administer the service.

kam dev                      everything on one machine (what `make run` runs)
kam api | kam scorer         one process each, for production
kam migrate                  upgrade the database to the newest schema
kam keys create|list|revoke  API keys
kam demo --accounts N        send a synthetic portfolio through the HTTP API
                             (to --host/--port, $KAM_HOST/$KAM_PORT, like kam dev)
kam backtest --orders F.csv --cutoff DATE   check the retention risk on your own history
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.keys.service import create_api_key, list_api_keys, parse_scopes, revoke_api_key
from shared.db import create_engine, create_sessionmaker
from shared.settings import Settings, get_settings


def alembic_config(database_url: str) -> Config:
    """The alembic config of this checkout (or of the image's working directory)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        ini = base / "alembic.ini"
        if ini.is_file() and (base / "migrations").is_dir():
            config = Config(str(ini))
            config.attributes["database_url"] = database_url
            return config
    raise SystemExit("alembic.ini not found: run kam migrate from the project directory")


def migrate(database_url: str, revision: str = "head", *, downgrade: bool = False) -> None:
    config = alembic_config(database_url)
    if downgrade:
        command.downgrade(config, revision)
    else:
        command.upgrade(config, revision)


def _require_urls(settings: Settings) -> None:
    missing = [
        name
        for name, value in (
            ("KAM_DATABASE_URL", settings.database_url),
            ("KAM_REDIS_URL", settings.redis_url),
        )
        if not value
    ]
    if missing:
        raise SystemExit(f"{' and '.join(missing)} must be set (or use `kam dev`)")


@contextmanager
def _database(settings: Settings) -> Iterator[Settings]:
    """The configured database, or else the embedded one that `kam dev` keeps under
    KAM_DATA_DIR, so `kam keys ...` works beside `make run` without any URL."""
    if settings.database_url:
        yield settings
        return
    from services.cli.embedded import embedded_postgres

    pgdata = Path(settings.data_dir) / "postgres"
    if not pgdata.is_dir():
        raise SystemExit(
            "KAM_DATABASE_URL is not set and there is no embedded database yet "
            "(run `make run` once, or set KAM_DATABASE_URL)"
        )
    with embedded_postgres(pgdata.resolve()) as database_url:
        yield settings.model_copy(update={"database_url": database_url})


@asynccontextmanager
async def _session(settings: Settings) -> AsyncIterator[AsyncSession]:
    """One transaction on a short-lived engine, committed on leaving: a command's unit of work."""
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            yield session
    finally:
        await engine.dispose()


async def _create_key(
    settings: Settings, name: str, scopes: str, manager: str | None = None
) -> str:
    try:
        parsed = parse_scopes(scopes)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    async with _session(settings) as session:
        key, plaintext = await create_api_key(session, name=name, scopes=parsed, manager=manager)
    only = f", restricted to manager {manager}'s accounts" if manager else ""
    print(
        f"created key {key.prefix} ({name}) with scopes {','.join(s.value for s in parsed)}{only}"
    )
    print("store it now, it is not shown again:")
    return plaintext


async def _list_keys(settings: Settings) -> None:
    async with _session(settings) as session:
        keys = await list_api_keys(session)
    print(f"{'prefix':10} {'name':24} {'scopes':40} {'last used':26} revoked")
    for k in keys:
        print(
            f"{k.prefix:10} {k.name[:24]:24} {','.join(k.scopes)[:40]:40} "
            f"{k.last_used_at.isoformat() if k.last_used_at else '-':26} "
            f"{k.revoked_at.isoformat() if k.revoked_at else '-'}"
        )


async def _revoke_key(settings: Settings, key: str) -> None:
    async with _session(settings) as session:
        row = await revoke_api_key(session, key=key)
    if row is None:
        raise SystemExit(f"no key {key!r}")
    print(f"revoked {row.prefix} ({row.name})")


async def _has_keys(settings: Settings) -> bool:
    async with _session(settings) as session:
        return bool(await list_api_keys(session))


def run_api(host: str, port: int, workers: int) -> None:
    import uvicorn

    uvicorn.run(
        "services.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        proxy_headers=True,
        access_log=False,
        timeout_graceful_shutdown=20,
        # An idle keep-alive connection is closed after this; a stalled body is cut by the
        # app (services/api/limits.py); header timeouts are the reverse proxy's (deploy/).
        timeout_keep_alive=get_settings().keep_alive_timeout_s,
    )


def run_scorer(roles: Sequence[str]) -> None:
    from services.logging import configure_logging
    from services.scorer.worker import Role, run_scorer_process

    settings = get_settings()
    _require_urls(settings)
    configure_logging(settings)
    try:
        chosen = [Role(role) for role in roles]
    except ValueError:
        raise SystemExit(
            f"unknown role in {','.join(roles)!r}; roles: {', '.join(r.value for r in Role)}"
        ) from None
    run_scorer_process(settings, roles=chosen or list(Role))


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on (or holds) ``host:port`` already."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def run_dev(host: str, port: int) -> int:
    """Embedded Postgres and Redis when no URLs are set, migrations, a first admin key, and the
    API and scorer as child processes. Ctrl-C stops all of it."""
    settings = get_settings()
    scorer_port = _dev_scorer_port(settings, port)
    for wanted, what in ((port, "the API"), (scorer_port, "the scorer's metrics")):
        if wanted and port_in_use(host, wanted):
            raise SystemExit(
                f"port {wanted} on {host} (for {what}) is in use: stop what holds it, or pick "
                f"another port: make run PORT={port + 10} (kam dev --port {port + 10})"
            )
    if settings.database_url and settings.redis_url:
        return _supervise(settings.database_url, settings.redis_url, host, port, scorer_port)
    from services.cli.embedded import embedded_services

    data_dir = Path(settings.data_dir)
    print(f"starting embedded Postgres and Redis under {data_dir.resolve()}", flush=True)
    if not settings.database_url and hasattr(os, "geteuid") and os.geteuid() == 0:
        print(
            "running as root: Postgres refuses root, so the embedded one runs as the system "
            "user 'pgserver' (created with useradd if missing); the folders above its data and "
            "binaries are made readable and traversable for it (see README, First run)",
            flush=True,
        )
    with embedded_services(data_dir) as urls:
        return _supervise(
            settings.database_url or urls.database_url,
            settings.redis_url or urls.redis_url,
            host,
            port,
            scorer_port,
        )


def _dev_scorer_port(settings: Settings, port: int) -> int:
    """The scorer's metrics port under ``kam dev``: the one set, else the API's port + 1, so two
    checkouts running side by side on different ports do not collide."""
    if "KAM_SCORER_HTTP_PORT" in os.environ:
        return settings.scorer_http_port or 0
    return port + 1


def _supervise(database_url: str, redis_url: str, host: str, port: int, scorer_port: int) -> int:
    env = {
        **os.environ,
        "KAM_DATABASE_URL": database_url,
        "KAM_REDIS_URL": redis_url,
        "KAM_SCORER_HTTP_HOST": host,
    }
    if scorer_port:
        env["KAM_SCORER_HTTP_PORT"] = str(scorer_port)
    os.environ.update(env)
    get_settings.cache_clear()
    settings = get_settings()
    migrate(database_url)
    if not asyncio.run(_has_keys(settings)):
        key = asyncio.run(_create_key(settings, "admin", "admin"))
        print(key, flush=True)
    else:
        print(
            "API keys exist already; create another with: kam keys create --name NAME "
            "--scopes admin",
            flush=True,
        )
    kam = [sys.executable, "-m", "services.cli.main"]
    # Own sessions: a Ctrl-C at the terminal reaches only this supervisor, which then stops
    # each child once, in order, instead of every process receiving it at the same moment.
    children = [
        subprocess.Popen(  # noqa: S603
            [*kam, "api", "--host", host, "--port", str(port)], env=env, start_new_session=True
        ),
        subprocess.Popen([*kam, "scorer"], env=env, start_new_session=True),  # noqa: S603
    ]
    stopping = False
    if _wait_until_serving(host, port, children[0]):
        print(
            f"KAM is running: http://{host}:{port} (docs at http://{host}:{port}/docs"
            + (f", scorer metrics at http://{host}:{scorer_port}/metrics" if scorer_port else "")
            + f"). Open the workspace at http://{host}:{port}/app/ and sign in with the key "
            "printed above. Ctrl-C stops it.",
            flush=True,
        )
    else:
        print(f"the API did not start on {host}:{port}; see the lines above", flush=True)
        stopping = True

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        for child in children:
            try:
                child.wait(timeout=25)
            except subprocess.TimeoutExpired:
                child.kill()
    failed = [c.returncode for c in children if c.returncode not in (0, -signal.SIGINT, None)]
    print("KAM stopped.", flush=True)
    return 1 if failed and not stopping else 0


def _wait_until_serving(host: str, port: int, api: subprocess.Popen[bytes]) -> bool:
    """Whether the API answers /healthz before it exits or a minute passes."""
    import httpx

    shown = f"[{host}]" if ":" in host else host
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and api.poll() is None:
        try:
            if httpx.get(f"http://{shown}:{port}/healthz", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


def _default_port() -> int:
    return int(os.environ.get("KAM_PORT") or 8000)


def _default_host() -> str:
    return os.environ.get("KAM_HOST") or "127.0.0.1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kam", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    address = "(default: $KAM_HOST, else 127.0.0.1)", "(default: $KAM_PORT, else 8000)"
    dev = sub.add_parser(
        "dev",
        help="run everything locally (embedded services if no URLs)",
        description="Embedded Postgres and Redis unless KAM_DATABASE_URL / KAM_REDIS_URL are "
        "set, migrations, a first admin key (printed once), then the API and the scorer "
        "(its metrics on the API's port + 1, or KAM_SCORER_HTTP_PORT). Ctrl-C stops it all.",
    )
    dev.add_argument("--host", default=_default_host(), help=f"address to serve on {address[0]}")
    dev.add_argument("--port", type=int, default=_default_port(), help=f"port {address[1]}")

    api = sub.add_parser("api", help="run the HTTP API")
    api.add_argument("--host", default=_default_host(), help=f"address to serve on {address[0]}")
    api.add_argument("--port", type=int, default=_default_port(), help=f"port {address[1]}")
    api.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")

    scorer = sub.add_parser(
        "scorer",
        help="run the scorer worker",
        description="Run the scorer. Roles: rescore (rescores and the sweepers), webhooks "
        "(deliveries), portfolio (the portfolio pass); all three by default. Run a role in "
        "processes of its own to scale it apart, e.g. --roles webhooks.",
    )
    scorer.add_argument(
        "--roles",
        default="rescore,webhooks,portfolio",
        help="comma-separated roles this process runs (default: all three)",
    )

    mig = sub.add_parser("migrate", help="upgrade (or downgrade) the database schema")
    mig.add_argument("--revision", default=None, help="target revision (default: head)")
    mig.add_argument("--downgrade", action="store_true", help="downgrade to --revision")

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key; prints it once, as the last line")
    create.add_argument("--name", required=True)
    create.add_argument("--scopes", required=True, help="comma-separated, e.g. events:write")
    create.add_argument(
        "--manager",
        default=None,
        metavar="M",
        help="restrict the key to the accounts of the manager with external id M",
    )
    keys_sub.add_parser("list", help="list keys (never the keys themselves)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by prefix or id")
    revoke.add_argument("key")

    demo = sub.add_parser(
        "demo",
        help="send a synthetic portfolio through the HTTP API",
        description="Generate a realistic synthetic portfolio (accounts, managers, contacts, "
        "orders, interactions, payments over the last years) and send it to a running KAM "
        "through its HTTP API, as a producer would.",
    )
    demo.add_argument("--accounts", type=int, default=200, help="accounts to create (200)")
    demo.add_argument("--host", default=_default_host(), help=f"the API's address {address[0]}")
    demo.add_argument("--port", type=int, default=_default_port(), help=f"its port {address[1]}")
    demo.add_argument(
        "--url",
        default=os.environ.get("KAM_URL"),
        help="the API's base URL, instead of --host/--port (default: $KAM_URL)",
    )
    demo.add_argument(
        "--api-key",
        default=os.environ.get("KAM_API_KEY"),
        help="a key with events:write (default: $KAM_API_KEY)",
    )
    demo.add_argument("--seed", type=int, default=7, help="random seed: same seed, same data")
    demo.add_argument("--years", type=float, default=2.0, help="years of history (2)")

    backtest = sub.add_parser(
        "backtest",
        help="check the retention risk on your own order history (no server needed)",
        description="Score the accounts as of --cutoff from the file's data up to it and "
        "compare with who ordered in the horizon after it: AUC, Brier score and calibration "
        "deciles for the model and two naive baselines.",
    )
    backtest.add_argument(
        "--orders",
        "--transactions",
        required=True,
        metavar="FILE.csv",
        help="CSV with a header: account_id,date,amount[,cost]; one row per order",
    )
    backtest.add_argument("--cutoff", required=True, metavar="DATE", help="e.g. 2024-06-30")
    backtest.add_argument(
        "--horizon-days", type=int, default=90, help="days after the cutoff that count (90)"
    )
    backtest.add_argument("--json", action="store_true", help="the report as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = get_settings()
    match args.command:
        case "dev":
            return run_dev(args.host, args.port)
        case "api":
            _require_urls(settings)
            run_api(args.host, args.port, args.workers)
        case "scorer":
            run_scorer([role.strip() for role in args.roles.split(",") if role.strip()])
        case "migrate":
            _require_urls(settings)
            migrate(
                settings.database_url,
                args.revision or ("base" if args.downgrade else "head"),
                downgrade=args.downgrade,
            )
        case "keys":
            with _database(settings) as settings:
                if args.keys_command == "create":
                    print(asyncio.run(_create_key(settings, args.name, args.scopes, args.manager)))
                elif args.keys_command == "list":
                    asyncio.run(_list_keys(settings))
                else:
                    asyncio.run(_revoke_key(settings, args.key))
        case "demo":
            from services.cli.demo import run_demo

            if not args.api_key:
                raise SystemExit("--api-key (or KAM_API_KEY) is required")
            host = f"[{args.host}]" if ":" in args.host else args.host
            return run_demo(
                url=args.url or f"http://{host}:{args.port}",
                api_key=args.api_key,
                accounts=args.accounts,
                seed=args.seed,
                years=args.years,
            )
        case "backtest":
            from services.cli.backtest import run_backtest

            return run_backtest(
                orders=args.orders,
                cutoff=args.cutoff,
                horizon_days=args.horizon_days,
                as_json=args.json,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
