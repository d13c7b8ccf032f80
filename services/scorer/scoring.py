"""Scoring with the database: load features in SQL, call the engine, store the results.

- ``rescore_accounts``: a few dirty accounts against the stored population facts.
- ``run_portfolio_pass``: every account, refitting the population facts first.
- ``preview_policy``: what a draft policy would change, writing nothing.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.scorer.engine.policy import ScoringPolicy
from shared.schemas import PolicyPreview


async def preview_policy(
    session: AsyncSession, *, draft: ScoringPolicy, now: datetime | None = None
) -> PolicyPreview:
    """What ``draft`` would publish for every account now, against what is published."""
    raise NotImplementedError


async def run_portfolio_pass(
    sessionmaker: async_sessionmaker[AsyncSession], *, now: datetime | None = None
) -> int:
    """Refit the population facts and rescore every account; returns the accounts scored."""
    raise NotImplementedError


async def rescore_accounts(
    session: AsyncSession, *, account_ids: list[int], now: datetime | None = None
) -> int:
    """Rescore these accounts against the stored population facts; returns how many."""
    raise NotImplementedError
