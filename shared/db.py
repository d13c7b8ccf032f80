"""The async engine and session factory: the one piece of I/O the shared package owns."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from shared.settings import Settings


def create_engine(settings: Settings, *, pre_ping: bool = True) -> AsyncEngine:
    """An engine whose connections fail fast when Postgres is away, so callers can answer 503.

    ``pre_ping`` tests every connection as it leaves the pool (a BEGIN, a query and a ROLLBACK
    on asyncpg): a connection that died in the pool is replaced before anyone uses it. Without
    it, the first statement on such a connection fails, the error invalidates every connection
    opened before it, and later checkouts connect afresh.
    """
    return create_async_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_pre_ping=pre_ping,
        pool_timeout=settings.db_connect_timeout_s,
        connect_args={
            "timeout": settings.db_connect_timeout_s,
            "command_timeout": settings.db_statement_timeout_ms / 1000 or None,
            "server_settings": {"application_name": "kam"},
        },
    )


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
