"""The stored scoring policy: exactly one active version; a new body is a new version."""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import ScoringPolicy as ScoringPolicyRow
from shared.policy import DEFAULT_POLICY, ScoringPolicy

# Every advisory lock of the service takes this first key, so it cannot collide with another's.
LOCK_NAMESPACE = 0x4B414D  # "KAM"
_POLICY_LOCK = 1


async def _lock_policies(session: AsyncSession) -> None:
    """Serialise policy writers (two first readers must not both create version 1)."""
    await session.execute(select(func.pg_advisory_xact_lock(LOCK_NAMESPACE, _POLICY_LOCK)))


async def active_policy(session: AsyncSession) -> tuple[int, ScoringPolicy]:
    """The active version and its body; the first call on an empty database stores the default
    policy as version 1, so every snapshot can name the version it was scored with."""
    row = await session.scalar(select(ScoringPolicyRow).where(ScoringPolicyRow.active))
    if row is None:
        await _lock_policies(session)
        row = await session.scalar(select(ScoringPolicyRow).where(ScoringPolicyRow.active))
        if row is None:
            await session.execute(
                insert(ScoringPolicyRow)
                .values(
                    version=1,
                    body=DEFAULT_POLICY.model_dump(mode="json"),
                    active=True,
                    comment="default policy",
                    created_by="kam",
                )
                .on_conflict_do_nothing()
            )
            row = await session.scalar(select(ScoringPolicyRow).where(ScoringPolicyRow.active))
            assert row is not None
    return row.version, ScoringPolicy.model_validate(row.body)


async def create_policy_version(
    session: AsyncSession, *, policy: ScoringPolicy, comment: str | None, created_by: str | None
) -> int:
    """Store ``policy`` as the next version and make it the active one; returns the version."""
    await active_policy(session)  # version 1 exists before version 2
    await _lock_policies(session)
    version = (
        int(await session.scalar(select(func.coalesce(func.max(ScoringPolicyRow.version), 0))) or 0)
        + 1
    )
    await session.execute(
        update(ScoringPolicyRow).where(ScoringPolicyRow.active).values(active=False)
    )
    session.add(
        ScoringPolicyRow(
            version=version,
            body=policy.model_dump(mode="json"),
            active=True,
            comment=comment,
            created_by=created_by,
        )
    )
    await session.flush()
    return version
