"""Delivery of webhook events to endpoints, by the scorer (Standard Webhooks).

The schedule lives in Postgres (``webhook_deliveries.next_attempt_at``); Redis only carries
"try this one now". One attempt:

1. ``claim_delivery`` (a short transaction): the delivery must be pending, due, its endpoint
   enabled, and no earlier delivery of the same account's events to the same endpoint may be
   pending (order). Claiming moves ``next_attempt_at`` past the end of the attempt: a lease, so
   a second job for it finds it not due, and a worker killed mid-send leaves it to the sweeper
   once the lease has run out (the retry carries the same ``webhook-id``: at least once).
2. ``send_delivery`` (no transaction open): sign and POST, at most ``webhook_timeout_s`` in
   all, redirects not followed, the address checked again and connected to as checked.
3. ``record_outcome`` (a short transaction): log the attempt and decide: 2xx succeeded; 410
   disables the endpoint; otherwise the next retry of the schedule (with jitter, and not before
   a 429/503's ``Retry-After``), or failed after the last. An endpoint that has failed every
   attempt for ``webhook_disable_after_s`` is disabled.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import ssl
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import certifi
import httpx
import structlog
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from standardwebhooks import Webhook

from services.scorer.webhook_targets import UnsafeTarget, resolve_target
from shared.enums import DeliveryStatus
from shared.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from shared.settings import Settings

log = structlog.get_logger(__name__)

EXCERPT_BYTES = 1024
RAW_EXCERPT_BYTES = 16 * 1024  # read at most this much of an answer, compressed or not
LEASE_MARGIN = timedelta(seconds=30)
MAX_RETRY_AFTER = timedelta(hours=24)
USER_AGENT = "kam-webhooks/1"
SWEEP_BATCH = 1000

# (Only this constant is interpolated into the queries below: S608 does not apply.)
# No earlier delivery of the same account's events to the same endpoint is still pending.
_FIRST_IN_LINE = """
NOT EXISTS (
    SELECT 1 FROM webhook_deliveries d2 JOIN webhook_events e2 ON e2.id = d2.event_id
    WHERE d2.endpoint_id = d.endpoint_id AND d2.status = 'pending' AND d2.id < d.id
      AND e2.account_id = e.account_id
)
"""

_CLAIM = f"""
SELECT d.id, d.attempts, e.id, e.payload, ep.id, ep.url, ep.secret, ep.previous_secret,
       ep.previous_secret_expires_at, now()
FROM webhook_deliveries d
JOIN webhook_events e ON e.id = d.event_id
JOIN webhook_endpoints ep ON ep.id = d.endpoint_id
WHERE d.id = :delivery_id AND d.status = 'pending' AND d.next_attempt_at <= now() AND ep.enabled
  AND {_FIRST_IN_LINE}
FOR UPDATE OF d SKIP LOCKED
"""  # noqa: S608

_DUE = f"""
SELECT d.id
FROM webhook_deliveries d
JOIN webhook_events e ON e.id = d.event_id
JOIN webhook_endpoints ep ON ep.id = d.endpoint_id AND ep.enabled
WHERE d.status = 'pending' AND d.next_attempt_at <= now() AND {_FIRST_IN_LINE}
ORDER BY d.next_attempt_at
LIMIT :limit
"""  # noqa: S608

_NEXT_IN_LINE = f"""
SELECT d.id
FROM webhook_deliveries d
JOIN webhook_events e ON e.id = d.event_id
WHERE d.endpoint_id = :endpoint_id AND d.status = 'pending' AND d.next_attempt_at <= now()
  AND e.account_id = (SELECT account_id FROM webhook_events WHERE id = :event_id)
  AND {_FIRST_IN_LINE}
"""  # noqa: S608


@dataclass(frozen=True)
class Claim:
    """A delivery claimed for one attempt, with what the attempt needs."""

    delivery_id: int
    attempts: int
    event_id: str
    payload: dict[str, Any]
    endpoint_id: uuid.UUID
    url: str
    secrets: tuple[str, ...]
    lease_until: datetime


@dataclass(frozen=True)
class Outcome:
    """What one attempt got: a status code, or an error (timeout, refused address...)."""

    attempted_at: datetime
    status_code: int | None
    latency_ms: int
    error: str | None = None
    excerpt: str | None = None
    retry_after: timedelta | None = None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


async def claim_delivery(
    session: AsyncSession, *, delivery_id: int, settings: Settings
) -> Claim | None:
    """Lease the delivery for one attempt, or None when it is not to be attempted now (not
    pending, not due, endpoint disabled, an earlier one in line, or another worker on it)."""
    row = (await session.execute(text(_CLAIM), {"delivery_id": delivery_id})).first()
    if row is None:
        return None
    (_, attempts, event_id, payload, endpoint_id, url, secret, previous, previous_until, now) = row
    lease_until = now + timedelta(seconds=settings.webhook_timeout_s) + LEASE_MARGIN
    await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id)
        .values(next_attempt_at=lease_until)
    )
    secrets = (secret,) if previous is None or previous_until <= now else (secret, previous)
    return Claim(
        delivery_id=delivery_id,
        attempts=attempts,
        event_id=event_id,
        payload=payload,
        endpoint_id=endpoint_id,
        url=url,
        secrets=secrets,
        lease_until=lease_until,
    )


def signed_headers(
    *, event_id: str, body: str, secrets: tuple[str, ...], at: datetime
) -> dict[str, str]:
    """The Standard Webhooks headers; one signature per secret in force (two while a rotated
    secret overlaps the new one)."""
    signatures = " ".join(Webhook(secret).sign(event_id, at, body) for secret in secrets)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signatures,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        # The excerpt we keep is the first KiB: plain text is what we can store and read.
        "accept-encoding": "identity",
    }


def encode_payload(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every attempt of this process. Building one loads the CA bundle
    (about 30 ms of CPU), which per attempt capped delivery at a few dozen a second; the
    context holds no connection, so sharing it keeps each attempt's connection its own."""
    return ssl.create_default_context(cafile=certifi.where())


async def send_delivery(claim: Claim, *, settings: Settings) -> Outcome:
    """One signed POST of the event to the endpoint; never raises."""
    attempted_at = datetime.now(UTC)
    started = time.monotonic()

    def elapsed_ms() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        target = await resolve_target(claim.url, allowed_hosts=settings.webhook_allowed_hosts)
    except UnsafeTarget as exc:
        return Outcome(attempted_at, None, elapsed_ms(), error=f"refused: {exc}")
    body = encode_payload(claim.payload)
    headers = signed_headers(
        event_id=claim.event_id, body=body, secrets=claim.secrets, at=attempted_at
    )
    extensions: dict[str, Any] = {}
    if target.address is not None:
        # Connect to the checked address; the name goes in Host and in TLS (SNI, certificate).
        headers["host"] = target.host_header
        extensions["sni_hostname"] = target.host
    timeout = settings.webhook_timeout_s
    try:
        # A client per attempt: connections are pinned to addresses, and a pooled connection
        # must never carry a request for another host name. No proxies from the environment.
        async with (
            asyncio.timeout(timeout),
            httpx.AsyncClient(
                follow_redirects=False, trust_env=False, timeout=timeout, verify=tls_context()
            ) as client,
            client.stream(
                "POST", target.url, content=body.encode(), headers=headers, extensions=extensions
            ) as response,
        ):
            excerpt = await _excerpt(response)
            return Outcome(
                attempted_at,
                response.status_code,
                elapsed_ms(),
                error=None if 200 <= response.status_code < 300 else _status_error(response),
                excerpt=excerpt,
                retry_after=_retry_after(response, now=attempted_at),
            )
    except TimeoutError:
        return Outcome(attempted_at, None, elapsed_ms(), error=f"timed out after {timeout:g} s")
    except httpx.HTTPError as exc:
        return Outcome(attempted_at, None, elapsed_ms(), error=f"{type(exc).__name__}: {exc}"[:500])


async def _excerpt(response: httpx.Response) -> str | None:
    """The start of the receiver's answer, as text Postgres will store. We ask for an
    uncompressed answer, but a receiver (or the proxy before it) may compress anyway: gzip and
    deflate are inflated here, never past ``EXCERPT_BYTES`` of output."""
    taken = bytearray()
    async for chunk in response.aiter_raw():
        taken.extend(chunk)
        if len(taken) >= RAW_EXCERPT_BYTES:
            break
    if not taken:
        return None
    return excerpt_text(bytes(taken), response.headers.get("content-encoding", ""))


def excerpt_text(raw: bytes, content_encoding: str = "") -> str:
    """Whatever bytes a receiver sent, as at most ``EXCERPT_BYTES`` of valid text without NUL
    (Postgres refuses NUL and invalid UTF-8 in text: an excerpt it refused once left the
    attempt unrecorded and the delivery re-sent for ever)."""
    encoding = content_encoding.strip().lower()
    body = raw
    if encoding in ("gzip", "x-gzip", "deflate"):
        # wbits 47: a gzip or zlib header, detected; max_length bounds a decompression bomb.
        try:
            body = zlib.decompressobj(wbits=47).decompress(raw, EXCERPT_BYTES)
        except zlib.error:
            try:  # "deflate" is sometimes sent without its zlib header
                body = zlib.decompressobj(wbits=-15).decompress(raw, EXCERPT_BYTES)
            except zlib.error:
                return f"[{len(raw)}+ bytes, {encoding} that does not decode]"
    elif encoding not in ("", "identity"):
        return f"[{len(raw)}+ bytes, {encoding}-encoded]"
    text = body[:EXCERPT_BYTES].decode("utf-8", errors="replace")
    return text.replace("\x00", "\ufffd")


def _status_error(response: httpx.Response) -> str:
    if response.is_redirect:
        return f"redirect to {response.headers.get('location', '?')!r} not followed"
    return f"HTTP {response.status_code}"


def _retry_after(response: httpx.Response, *, now: datetime) -> timedelta | None:
    if response.status_code not in (429, 503):
        return None
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        wait = timedelta(seconds=max(0, int(value)))
    except ValueError:
        try:
            wait = parsedate_to_datetime(value) - now
        except (TypeError, ValueError):
            return None
    return min(max(wait, timedelta(0)), MAX_RETRY_AFTER)


def retry_delay(
    attempts: int, *, settings: Settings, retry_after: timedelta | None = None
) -> timedelta | None:
    """The wait before the next attempt after ``attempts`` attempts, or None after the last.
    Jittered, so that endpoints failing together do not retry together; never shorter than
    the receiver's ``Retry-After``."""
    schedule = settings.webhook_retry_schedule_s
    if attempts > len(schedule):
        return None
    jitter = settings.webhook_retry_jitter
    wait = timedelta(seconds=schedule[attempts - 1] * random.uniform(1 - jitter, 1 + jitter))  # noqa: S311
    return max(wait, retry_after) if retry_after is not None else wait


async def record_outcome(
    session: AsyncSession, *, claim: Claim, outcome: Outcome, settings: Settings
) -> list[int]:
    """Log the attempt, move the delivery on, and return the deliveries now first in line
    behind it (to push at once rather than wait for the sweeper)."""
    delivery = await session.scalar(
        select(WebhookDelivery).where(WebhookDelivery.id == claim.delivery_id).with_for_update()
    )
    endpoint = await session.get(WebhookEndpoint, claim.endpoint_id)
    if delivery is None or endpoint is None:
        log.info("webhook_outcome_dropped", delivery_id=claim.delivery_id, reason="deleted")
        return []
    session.add(
        WebhookAttempt(
            delivery_id=claim.delivery_id,
            attempted_at=outcome.attempted_at,
            status_code=outcome.status_code,
            latency_ms=outcome.latency_ms,
            error=outcome.error,
            response_excerpt=outcome.excerpt,
        )
    )
    if delivery.status != DeliveryStatus.pending or delivery.next_attempt_at != claim.lease_until:
        # Redelivered, or re-claimed after our lease ran out: the attempt is logged, the
        # delivery belongs to whoever holds it now.
        log.info("webhook_outcome_not_applied", delivery_id=claim.delivery_id)
        return []
    now = datetime.now(UTC)
    delivery.attempts = claim.attempts + 1
    delivery.last_attempt_at = outcome.attempted_at
    if outcome.succeeded:
        delivery.status = DeliveryStatus.succeeded
        delivery.next_attempt_at = None
        if endpoint.failing_since is not None:  # the endpoint row is written only on a change
            endpoint.failing_since = None
    else:
        # Failures update the endpoint's record: lock it, so concurrent ones do not race.
        await session.refresh(endpoint, with_for_update=True)
        endpoint.failing_since = endpoint.failing_since or outcome.attempted_at
        wait = retry_delay(delivery.attempts, settings=settings, retry_after=outcome.retry_after)
        if outcome.status_code == 410:
            _disable(endpoint, "The endpoint answered 410 Gone.", at=now)
            wait = None
        elif endpoint.failing_since <= now - timedelta(seconds=settings.webhook_disable_after_s):
            _disable(
                endpoint,
                f"Every attempt failed since {endpoint.failing_since.isoformat()}.",
                at=now,
            )
        if wait is None:
            delivery.status = DeliveryStatus.failed
            delivery.next_attempt_at = None
        else:
            delivery.next_attempt_at = now + wait
    log.info(
        "webhook_attempted",
        delivery_id=claim.delivery_id,
        endpoint_id=str(claim.endpoint_id),
        status_code=outcome.status_code,
        outcome=delivery.status,
        attempts=delivery.attempts,
    )
    await session.flush()
    if delivery.status == DeliveryStatus.pending:
        return []
    follow = await session.execute(
        text(_NEXT_IN_LINE), {"endpoint_id": claim.endpoint_id, "event_id": claim.event_id}
    )
    return [int(row[0]) for row in follow.all()]


def _disable(endpoint: WebhookEndpoint, reason: str, *, at: datetime) -> None:
    if endpoint.enabled:
        endpoint.enabled = False
        endpoint.disabled_reason = reason
        endpoint.disabled_at = at
        log.warning("webhook_endpoint_disabled", endpoint_id=str(endpoint.id), reason=reason)


async def due_deliveries(session: AsyncSession, *, limit: int = SWEEP_BATCH) -> list[int]:
    """Pending deliveries whose time has come (or whose lease ran out), first in line."""
    rows = await session.execute(text(_DUE), {"limit": limit})
    return [int(row[0]) for row in rows.all()]
