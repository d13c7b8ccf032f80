"""Rate limits, counted in Redis so that every API replica shares them (the ``limits`` library,
fixed windows: one Redis round trip per request).

* Per API key: writes (POST, PUT, PATCH, DELETE) and reads (GET, HEAD) have limits of their own
  (``KAM_RATE_LIMIT_WRITES``, ``KAM_RATE_LIMIT_READS``).
* Per client address: failed authentications (``KAM_RATE_LIMIT_FAILED_AUTH``). Past the limit
  the address is locked out: every call from it answers 429 until the window ends, a right key
  included, so keys cannot be guessed at speed. Each replica remembers the lock-outs it has
  seen, so a locked-out address costs no Redis round trip.
* Over a limit: 429 ``application/problem+json`` with ``Retry-After`` and the ``RateLimit-*``
  headers.
* Redis unreachable: requests pass unlimited (fail open), the fault is logged and counted
  (``kam_rate_limit_errors_total``), and Redis is not asked again for a few seconds, so an
  outage never slows requests down.

The client address is the connection's peer, or what the server was told to trust: behind a
load balancer run uvicorn with ``--proxy-headers --forwarded-allow-ips=<the balancer>``.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import structlog
from limits import RateLimitItem, parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter
from prometheus_client import Counter

from services.api.errors import ProblemError
from shared.settings import Settings

log = structlog.get_logger(__name__)

RATE_LIMITED = Counter("kam_rate_limited_total", "Requests refused with 429, by limit.", ["limit"])
RATE_LIMIT_ERRORS = Counter(
    "kam_rate_limit_errors_total",
    "Rate-limit checks skipped because Redis failed (the request passed: fail open).",
)

# After a Redis failure, requests pass unchecked this long before Redis is tried again.
_BREAK_S = 5.0
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class TooManyRequests(ProblemError):
    status_code = 429
    title = "Too many requests"


@dataclass(frozen=True, slots=True)
class _Limit:
    name: str
    item: RateLimitItem

    @property
    def policy(self) -> str:
        return f"{self.item.amount};w={self.item.get_expiry()}"


class RateLimiter:
    """The service's limits on one Redis; ``KAM_RATE_LIMIT_ENABLED=false`` turns them off."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.rate_limit_enabled
        self._writes = _Limit("writes", parse(settings.rate_limit_writes))
        self._reads = _Limit("reads", parse(settings.rate_limit_reads))
        self._failed_auth = _Limit("failed_auth", parse(settings.rate_limit_failed_auth))
        # limits tells Redis from Valkey by the scheme: a socket path must say it is Redis's.
        uri = settings.redis_url
        if uri.startswith("unix://"):
            uri = f"redis+{uri}"
        self._storage = RedisStorage(
            uri,
            implementation="redispy",
            key_prefix="kam:ratelimit",
            wrap_exceptions=True,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
        )
        self._limiter = FixedWindowRateLimiter(self._storage)
        # A hung Redis must cost a request no more than the enqueue does: the same budget.
        self._budget_s = settings.enqueue_budget_s
        self._broken_until = 0.0
        self._locked_out: dict[str, float] = {}

    async def check_key(self, key_id: int, method: str) -> None:
        """Count one call of key ``key_id``; raise 429 past its limit."""
        if not self.enabled:
            return
        limit = self._reads if method in _SAFE_METHODS else self._writes
        allowed = await self._hit(limit, f"key:{key_id}")
        if not allowed:
            await self._refuse(limit, f"key:{key_id}")

    def check_address(self, address: str) -> None:
        """Raise 429 when ``address`` is locked out after too many failed authentications."""
        if not self.enabled or not self._locked_out:
            return
        until = self._locked_out.get(address)
        if until is None:
            return
        wait = until - time.time()
        if wait <= 0:
            del self._locked_out[address]
            return
        RATE_LIMITED.labels(self._failed_auth.name).inc()
        raise self._problem(self._failed_auth, reset_in=wait)

    async def authentication_failed(self, address: str) -> None:
        """Count a failed authentication from ``address``; raise 429 (instead of the 401) once
        it is past its limit, and lock the address out until the window ends."""
        if not self.enabled:
            return
        if await self._hit(self._failed_auth, f"ip:{address}"):
            return
        reset_in = await self._reset_in(self._failed_auth, f"ip:{address}")
        if len(self._locked_out) > 100_000:
            self._locked_out.clear()
        self._locked_out[address] = time.time() + reset_in
        log.warning("authentication_locked_out", address=address, seconds=round(reset_in))
        RATE_LIMITED.labels(self._failed_auth.name).inc()
        raise self._problem(self._failed_auth, reset_in=reset_in)

    async def _hit(self, limit: _Limit, identity: str) -> bool:
        if self._broken_until and time.monotonic() < self._broken_until:
            return True
        try:
            async with asyncio.timeout(self._budget_s):
                allowed = await self._limiter.hit(limit.item, identity)
        except Exception as exc:
            # Fail open: a rate limit must never take the API down with Redis.
            self._broken_until = time.monotonic() + _BREAK_S
            RATE_LIMIT_ERRORS.inc()
            log.warning("rate_limit_unavailable", error=type(exc).__name__, limit=limit.name)
            return True
        self._broken_until = 0.0
        return allowed

    async def _reset_in(self, limit: _Limit, identity: str) -> float:
        try:
            stats = await self._limiter.get_window_stats(limit.item, identity)
        except Exception:  # the answer is a 429 either way
            return float(limit.item.get_expiry())
        return max(0.0, stats.reset_time - time.time())

    async def _refuse(self, limit: _Limit, identity: str) -> None:
        RATE_LIMITED.labels(limit.name).inc()
        raise self._problem(limit, reset_in=await self._reset_in(limit, identity))

    def _problem(self, limit: _Limit, *, reset_in: float) -> TooManyRequests:
        seconds = max(1, math.ceil(reset_in))
        return TooManyRequests(
            f"Over the {limit.name} limit of {limit.item.amount} per "
            f"{limit.item.get_expiry()} s; retry in {seconds} s.",
            headers={
                "Retry-After": str(seconds),
                "RateLimit-Limit": str(limit.item.amount),
                "RateLimit-Remaining": "0",
                "RateLimit-Reset": str(seconds),
                "RateLimit-Policy": limit.policy,
            },
        )


def client_address(scope_client: tuple[str, int] | None) -> str:
    return scope_client[0] if scope_client else "unknown"
