"""API keys. A key is ``kam_<prefix>_<secret>``; only the SHA-256 of the whole key is stored.

The secret has 256 bits of entropy, so a plain SHA-256 is enough: no password-style stretching is
needed, and verification stays cheap on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from shared.enums import Scope
from shared.models import ApiKey

KEY_PREFIX = "kam_"
_LAST_USED_EVERY = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the verified key's id, name and scopes, and the manager whose accounts
    alone it may see (None: every account)."""

    key_id: int
    name: str
    scopes: frozenset[Scope]
    manager: str | None = None

    def has(self, scope: Scope) -> bool:
        return Scope.admin in self.scopes or scope in self.scopes


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_scopes(raw: str | list[str]) -> list[Scope]:
    """``"a,b"`` or ``["a", "b"]`` as scopes; raises ``ValueError`` naming an unknown one."""
    names = raw.split(",") if isinstance(raw, str) else raw
    scopes: list[Scope] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        try:
            scopes.append(Scope(name))
        except ValueError:
            known = ", ".join(s.value for s in Scope)
            raise ValueError(f"unknown scope {name!r}; known scopes: {known}") from None
    if not scopes:
        raise ValueError("at least one scope is required")
    return sorted(set(scopes))


async def create_api_key(
    session: AsyncSession, *, name: str, scopes: list[Scope], manager: str | None = None
) -> tuple[ApiKey, str]:
    """Store a new key and return it with its plaintext, which is never retrievable again.
    With ``manager`` (a manager's external id) the key sees only that manager's accounts."""
    prefix = secrets.token_hex(4)
    plaintext = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey(
        name=name,
        prefix=prefix,
        key_hash=_hash(plaintext),
        scopes=[s.value for s in scopes],
        manager_external_id=manager,
    )
    session.add(key)
    await session.flush()
    return key, plaintext


async def list_api_keys(session: AsyncSession) -> list[ApiKey]:
    return list(await session.scalars(select(ApiKey).order_by(ApiKey.id)))


async def revoke_api_key(session: AsyncSession, *, key: str) -> ApiKey | None:
    """Revoke by prefix (or, failing that, by id); returns the key, or None when there is none."""
    row = await session.scalar(select(ApiKey).where(ApiKey.prefix == key))
    if row is None and key.isdigit():
        row = await session.scalar(select(ApiKey).where(ApiKey.id == int(key)))
    if row is not None and row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
        await session.flush()
    return row


def principal_of(row: ApiKey) -> Principal:
    return Principal(
        key_id=row.id,
        name=row.name,
        scopes=frozenset(Scope(s) for s in row.scopes),
        manager=row.manager_external_id,
    )


async def principal_by_id(session: AsyncSession, key_id: int) -> Principal | None:
    """The key of a signed-in person's session, or None once it is revoked."""
    row = await session.scalar(
        select(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
    )
    return principal_of(row) if row is not None else None


class KeyVerifier:
    """Verifies presented keys, remembering good ones for ``ttl_s`` so that a request does not
    pay a database round trip for its key. A revocation takes effect on every process within
    ``ttl_s`` (a second by default: one lookup per key per second per process is cheap, and
    needs nothing beyond the database that is already the record of revocations)."""

    def __init__(self, ttl_s: float = 1.0) -> None:
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[Principal, float]] = {}

    async def verify(self, session: AsyncSession, presented: str) -> Principal | None:
        digest = _hash(presented)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        if not presented.startswith(KEY_PREFIX) or presented.count("_") < 2:
            return None
        prefix = presented[len(KEY_PREFIX) :].split("_", 1)[0]
        row = await session.scalar(
            select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
        )
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            self._cache.pop(digest, None)
            return None
        used_at = datetime.now(UTC)
        if row.last_used_at is None or used_at - row.last_used_at > _LAST_USED_EVERY:
            await session.execute(
                update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=used_at)
            )
        principal = principal_of(row)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (principal, now + self._ttl_s)
        return principal

    def forget(self, key_id: int) -> None:
        """Drop a key from the cache at once (after a revocation through this process)."""
        self._cache = {d: entry for d, entry in self._cache.items() if entry[0].key_id != key_id}
