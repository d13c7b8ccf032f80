"""The alembic history: linear, reversible, and in step with the models (``alembic check``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from services.cli.main import alembic_config, migrate
from shared.models import Base
from tests.conftest import asyncpg_dsn


@pytest.fixture
async def scratch_url(database_url: str) -> AsyncIterator[str]:
    """An empty database of its own, so up and down do not disturb the other tests."""
    url = make_url(database_url)
    name = f"{url.database}_migrations"
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {r["tablename"] for r in rows} - {"alembic_version"}


async def test_upgrade_downgrade_upgrade(scratch_url: str) -> None:
    await asyncio.to_thread(migrate, scratch_url)
    assert await _tables(scratch_url) == set(Base.metadata.tables)
    await asyncio.to_thread(migrate, scratch_url, "base", downgrade=True)
    assert await _tables(scratch_url) == set()
    await asyncio.to_thread(migrate, scratch_url)
    assert await _tables(scratch_url) == set(Base.metadata.tables)


def test_history_is_linear() -> None:
    script = ScriptDirectory.from_config(alembic_config("postgresql+asyncpg://unused/x"))
    assert len(script.get_heads()) == 1
    for revision in script.walk_revisions():
        assert revision.down_revision is None or isinstance(revision.down_revision, str)
        assert revision.path is not None
        name = revision.path.rsplit("/", 1)[-1]
        assert name[:14].replace("_", "").isdigit(), f"{name} is not named YYYYMMDD_HHMM_slug"


async def test_models_match_the_migrations(database_url: str) -> None:
    """What `alembic check` asserts: autogenerate finds nothing left to migrate."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata
                )
            )
    finally:
        await engine.dispose()
    assert diff == []


def test_offline_sql_renders() -> None:
    """The migrations render as plain SQL too, for a DBA who applies them by hand."""
    config = alembic_config("postgresql+asyncpg://kam@localhost/kam")
    config.attributes["configure_logging"] = False
    import io

    buffer = io.StringIO()
    config.output_buffer = buffer
    command.upgrade(config, "head", sql=True)
    assert "CREATE TABLE accounts" in buffer.getvalue()
