"""``kam``: run, migrate and administer the service.

kam dev                      everything on one machine (what `make run` runs)
kam api | kam scorer         one process each, for production
kam migrate                  upgrade the database to the newest schema
kam keys create|list|revoke  API keys
kam demo --accounts N        send a synthetic portfolio through the HTTP API
kam backtest --orders F.csv --cutoff DATE   check the retention risk on your own history
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
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
    )


def run_scorer() -> None:
    from services.logging import configure_logging
    from services.scorer.worker import create_worker

    settings = get_settings()
    _require_urls(settings)
    configure_logging(settings)
    create_worker(settings).run()


def run_dev(host: str, port: int) -> int:
    """Embedded Postgres and Redis when no URLs are set, migrations, a first admin key, and the
    API and scorer as child processes. Ctrl-C stops all of it."""
    settings = get_settings()
    if settings.database_url and settings.redis_url:
        return _supervise(settings.database_url, settings.redis_url, host, port)
    from services.cli.embedded import embedded_services

    data_dir = Path(settings.data_dir)
    print(f"starting embedded Postgres and Redis under {data_dir.resolve()}", flush=True)
    with embedded_services(data_dir) as urls:
        return _supervise(
            settings.database_url or urls.database_url,
            settings.redis_url or urls.redis_url,
            host,
            port,
        )


def _supervise(database_url: str, redis_url: str, host: str, port: int) -> int:
    env = {**os.environ, "KAM_DATABASE_URL": database_url, "KAM_REDIS_URL": redis_url}
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
    print(
        f"KAM is running: http://{host}:{port} (docs at http://{host}:{port}/docs). "
        f"Open the workspace at http://{host}:{port}/app/ and sign in with the key printed "
        "above. Ctrl-C stops it.",
        flush=True,
    )
    stopping = False

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kam", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run everything locally (embedded services if no URLs)")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)

    api = sub.add_parser("api", help="run the HTTP API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1)

    sub.add_parser("scorer", help="run the scorer worker")

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

    demo = sub.add_parser("demo", help="send a synthetic portfolio through the HTTP API")
    demo.add_argument("--accounts", type=int, default=200)
    demo.add_argument("--url", default=os.environ.get("KAM_URL", "http://127.0.0.1:8000"))
    demo.add_argument(
        "--api-key",
        default=os.environ.get("KAM_API_KEY"),
        help="a key with events:write (default: $KAM_API_KEY)",
    )
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--years", type=float, default=2.0)

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
    backtest.add_argument("--horizon-days", type=int, default=90)
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
            run_scorer()
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
            return run_demo(
                url=args.url,
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
