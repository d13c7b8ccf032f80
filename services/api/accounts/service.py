"""Writes on accounts that the API itself makes: a manager's tier override."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.errors import NotFound
from services.api.ingest.service import mark_dirty
from shared.enums import Tier
from shared.models import Account


async def set_tier_override(
    session: AsyncSession,
    *,
    external_id: str,
    tier: Tier | None,
    reason: str | None,
    expires_at: datetime | None,
) -> Tier | None:
    """Set (or, with ``tier`` None, lift) the account's tier override and mark the account for
    a rescore, which publishes the tier the override implies. Returns the published tier;
    raises ``NotFound`` for an unknown account.

    The scorer applies overrides when it rescores, so the account is marked dirty in this
    transaction: if the rescore job is lost after commit, the sweeper still runs it.
    """
    row = (
        await session.execute(
            update(Account)
            .where(Account.external_id == external_id)
            .values(
                tier_override=tier.value if tier is not None else None,
                tier_override_reason=reason,
                tier_override_expires_at=expires_at,
            )
            .returning(Account.id, Account.tier)
        )
    ).first()
    if row is None:
        raise NotFound(f"No account with external_id {external_id!r}.")
    account_id, published = row
    await mark_dirty(session, [account_id])
    return Tier(published) if published is not None else None
