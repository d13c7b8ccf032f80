"""Delivery of webhook events to endpoints, by the scorer (Standard Webhooks).

The schedule lives in Postgres (``webhook_deliveries.next_attempt_at``); Redis only carries
"deliver what is due for this endpoint now", one job per endpoint (so one sender per endpoint
across all workers). The job works in batches:

1. ``claim_due`` (a short transaction): up to ``CLAIM_BATCH`` deliveries of the endpoint that
   are pending and due, the endpoint enabled, each first in line for its account (no earlier
   delivery of the same account's events to the endpoint still pending: so a batch holds at
   most one per account, and the order per account and endpoint is kept). Claiming moves
   ``next_attempt_at`` past the end of the attempt: a lease, so a worker killed mid-send leaves
   them to the sweeper once the lease has run out (the retry carries the same ``webhook-id``:
   at least once).
2. ``EndpointSender.send_all`` (no transaction open), at most ``webhook_endpoint_concurrency``
   at once over one keep-alive client per endpoint: sign and POST, at most
   ``webhook_timeout_s`` each, redirects not followed, the address checked again per batch and
   connected to as checked. Attempts not started within half the lease margin are not made:
   those deliveries are released (due again at once), so a batch never outlives its leases.
3. ``record_outcomes`` (one short transaction per batch): log every attempt and decide each:
   2xx succeeded; 410 disables the endpoint; otherwise the next retry of the schedule (with
   jitter, and not before a 429/503's ``Retry-After``), or failed after the last. An endpoint
   that has failed every attempt for ``webhook_disable_after_s`` is disabled.
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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import certifi
import httpx
import structlog
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncSession
from standardwebhooks import Webhook

from services.scorer.webhook_targets import Target, UnsafeTarget, resolve_target
from shared.enums import DeliveryStatus
from shared.models import WebhookAttempt, WebhookEndpoint
from shared.settings import Settings

log = structlog.get_logger(__name__)

EXCERPT_BYTES = 1024
RAW_EXCERPT_BYTES = 16 * 1024  # read at most this much of an answer, compressed or not
MAX_RETRY_AFTER = timedelta(hours=24)
USER_AGENT = "kam-webhooks/1"
SWEEP_BATCH = 1000
CLAIM_BATCH = 200

# (Only this constant is interpolated into the queries below: S608 does not apply.)
# No earlier delivery of the same account's events to the same endpoint is still pending.
_FIRST_IN_LINE = """
NOT EXISTS (
    SELECT 1 FROM webhook_deliveries d2 JOIN webhook_events e2 ON e2.id = d2.event_id
    WHERE d2.endpoint_id = d.endpoint_id AND d2.status = 'pending' AND d2.id < d.id
      AND e2.account_id = e.account_id
)
"""

_CLAIM_DUE = f"""
WITH due AS (
    SELECT d.id
    FROM webhook_deliveries d
    JOIN webhook_events e ON e.id = d.event_id
    WHERE d.endpoint_id = :endpoint_id AND d.status = 'pending' AND d.next_attempt_at <= now()
      AND {_FIRST_IN_LINE}
    ORDER BY d.id
    LIMIT :limit
    FOR UPDATE OF d SKIP LOCKED
)
UPDATE webhook_deliveries d
SET next_attempt_at = now() + make_interval(secs => :lease_s)
FROM due, webhook_events e, webhook_endpoints ep
WHERE d.id = due.id AND e.id = d.event_id AND ep.id = d.endpoint_id AND ep.enabled
RETURNING d.id, d.attempts, e.id, e.payload, ep.url, ep.secret, ep.previous_secret,
          ep.previous_secret_expires_at, now(), d.next_attempt_at
"""  # noqa: S608

# Endpoints with deliveries whose time has come (or whose lease ran out), first in line.
_DUE = f"""
SELECT DISTINCT d.endpoint_id
FROM webhook_deliveries d
JOIN webhook_events e ON e.id = d.event_id
JOIN webhook_endpoints ep ON ep.id = d.endpoint_id AND ep.enabled
WHERE d.status = 'pending' AND d.next_attempt_at <= now() AND {_FIRST_IN_LINE}
LIMIT :limit
"""  # noqa: S608

_RELEASE = """
UPDATE webhook_deliveries d SET next_attempt_at = now()
FROM unnest(CAST(:ids AS bigint[]), CAST(:leases AS timestamptz[])) AS u(id, lease_until)
WHERE d.id = u.id AND d.status = 'pending' AND d.next_attempt_at = u.lease_until
"""

_RECORD = """
UPDATE webhook_deliveries d
SET status = u.status, attempts = u.attempts, last_attempt_at = u.last_attempt_at,
    next_attempt_at = u.next_attempt_at
FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS text[]), CAST(:attempts AS int[]),
            CAST(:last AS timestamptz[]), CAST(:next AS timestamptz[]),
            CAST(:leases AS timestamptz[]))
     AS u(id, status, attempts, last_attempt_at, next_attempt_at, lease_until)
WHERE d.id = u.id AND d.status = 'pending' AND d.next_attempt_at = u.lease_until
RETURNING d.id
"""


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


async def claim_due(
    session: AsyncSession, *, endpoint_id: uuid.UUID, settings: Settings, limit: int = CLAIM_BATCH
) -> list[Claim]:
    """Lease the endpoint's deliveries to attempt now (pending, due, first in line for their
    account, endpoint enabled; none another worker holds), oldest first."""
    lease_s = settings.webhook_timeout_s + settings.webhook_lease_margin_s
    rows = await session.execute(
        text(_CLAIM_DUE), {"endpoint_id": endpoint_id, "limit": limit, "lease_s": lease_s}
    )
    claims = []
    for row in rows.all():
        (delivery_id, attempts, event_id, payload, url, secret, previous, previous_until) = row[:8]
        now, lease_until = row[8], row[9]
        secrets = (secret,) if previous is None or previous_until <= now else (secret, previous)
        claims.append(
            Claim(
                delivery_id=delivery_id,
                attempts=attempts,
                event_id=event_id,
                payload=payload,
                endpoint_id=endpoint_id,
                url=url,
                secrets=secrets,
                lease_until=lease_until,
            )
        )
    return sorted(claims, key=lambda c: c.delivery_id)


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


class EndpointSender:
    """Sends one endpoint's deliveries: its address checked (again before every batch) and one
    keep-alive client pinned to it. The client's connections go to that checked address only
    and carry requests for this endpoint's host only, so sharing them between attempts is
    safe; a client per attempt cost a TCP (and TLS) handshake each."""

    def __init__(self, url: str, *, settings: Settings, concurrency: int = 1) -> None:
        self.url = url
        self.settings = settings
        self.concurrency = max(1, concurrency)
        self.target: Target | None = None
        self.refusal: str | None = None
        self._client: httpx.AsyncClient | None = None

    async def check(self) -> None:
        """Resolve and check the address; a new address gets a new client."""
        try:
            target = await resolve_target(
                self.url, allowed_hosts=self.settings.webhook_allowed_hosts
            )
        except UnsafeTarget as exc:
            self.target, self.refusal = None, f"refused: {exc}"
            await self.aclose()
            return
        self.refusal = None
        if self.target is None or target.url != self.target.url or self._client is None:
            await self.aclose()
            timeout = self.settings.webhook_timeout_s
            # No proxies from the environment; redirects are reported, never followed.
            self._client = httpx.AsyncClient(
                follow_redirects=False,
                trust_env=False,
                timeout=timeout,
                verify=tls_context(),
                limits=httpx.Limits(
                    max_connections=self.concurrency, max_keepalive_connections=self.concurrency
                ),
            )
        self.target = target

    async def send(self, claim: Claim) -> Outcome:
        """One signed POST of the event to the endpoint; never raises."""
        attempted_at = datetime.now(UTC)
        started = time.monotonic()

        def elapsed_ms() -> int:
            return int((time.monotonic() - started) * 1000)

        if self.target is None or self._client is None:
            return Outcome(attempted_at, None, elapsed_ms(), error=self.refusal or "not checked")
        target = self.target
        body = encode_payload(claim.payload)
        headers = signed_headers(
            event_id=claim.event_id, body=body, secrets=claim.secrets, at=attempted_at
        )
        extensions: dict[str, Any] = {}
        if target.address is not None:
            # Connect to the checked address; the name goes in Host and in TLS (SNI, certificate).
            headers["host"] = target.host_header
            extensions["sni_hostname"] = target.host
        timeout = self.settings.webhook_timeout_s
        try:
            async with (
                asyncio.timeout(timeout),
                self._client.stream(
                    "POST",
                    target.url,
                    content=body.encode(),
                    headers=headers,
                    extensions=extensions,
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
            error = f"{type(exc).__name__}: {exc}"[:500]
            return Outcome(attempted_at, None, elapsed_ms(), error=error)

    async def send_all(self, claims: list[Claim], *, start_by: float) -> list[Outcome | None]:
        """Each claim's attempt, at most ``concurrency`` at once, in the claims' order; None
        for the claims not started by ``start_by`` (monotonic time), so that a receiver that
        turns slow mid-batch cannot keep the rest of the batch past its lease."""
        slots = asyncio.Semaphore(self.concurrency)

        async def one(claim: Claim) -> Outcome | None:
            async with slots:
                if time.monotonic() > start_by:
                    return None
                return await self.send(claim)

        return list(await asyncio.gather(*(one(c) for c in claims)))

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


async def send_delivery(claim: Claim, *, settings: Settings) -> Outcome:
    """One attempt on a client of its own (a redelivery by hand, tests)."""
    sender = EndpointSender(claim.url, settings=settings)
    try:
        await sender.check()
        return await sender.send(claim)
    finally:
        await sender.aclose()


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


async def record_outcomes(
    session: AsyncSession,
    *,
    endpoint_id: uuid.UUID,
    results: list[tuple[Claim, Outcome]],
    settings: Settings,
    released: Sequence[Claim] = (),
) -> bool:
    """Log a batch's attempts and move each delivery on, in one transaction; the ``released``
    claims (not attempted) are due again at once. Returns whether the endpoint is still
    enabled (False also when it was deleted meanwhile)."""
    endpoint = await session.get(WebhookEndpoint, endpoint_id, with_for_update=True)
    if endpoint is None:
        log.info("webhook_outcomes_dropped", endpoint_id=str(endpoint_id), reason="deleted")
        return False
    if released:
        await session.execute(
            text(_RELEASE),
            {
                "ids": [claim.delivery_id for claim in released],
                "leases": [claim.lease_until for claim in released],
            },
        )
    if not results:
        return endpoint.enabled
    await session.execute(
        insert(WebhookAttempt),
        [
            {
                "delivery_id": claim.delivery_id,
                "attempted_at": outcome.attempted_at,
                "status_code": outcome.status_code,
                "latency_ms": outcome.latency_ms,
                "error": outcome.error,
                "response_excerpt": outcome.excerpt,
            }
            for claim, outcome in results
        ],
    )
    now = datetime.now(UTC)
    ids: list[int] = []
    statuses: list[str] = []
    attempts: list[int] = []
    last: list[datetime] = []
    nexts: list[datetime | None] = []
    leases: list[datetime] = []
    # In the order the attempts were made, as one attempt at a time would have seen them.
    for claim, outcome in sorted(results, key=lambda r: r[1].attempted_at):
        status, next_at = _next_state(endpoint, claim, outcome, settings=settings, now=now)
        ids.append(claim.delivery_id)
        statuses.append(status.value)
        attempts.append(claim.attempts + 1)
        last.append(outcome.attempted_at)
        nexts.append(next_at)
        leases.append(claim.lease_until)
    applied = await session.execute(
        text(_RECORD),
        {
            "ids": ids,
            "statuses": statuses,
            "attempts": attempts,
            "last": last,
            "next": nexts,
            "leases": leases,
        },
    )
    applied_ids = {int(row[0]) for row in applied.all()}
    for delivery_id, outcome_name, tries in zip(ids, statuses, attempts, strict=True):
        if delivery_id not in applied_ids:
            # Redelivered, or re-claimed after our lease ran out: the attempt is logged, the
            # delivery belongs to whoever holds it now.
            log.info("webhook_outcome_not_applied", delivery_id=delivery_id)
            continue
        log.info(
            "webhook_attempted",
            delivery_id=delivery_id,
            endpoint_id=str(endpoint_id),
            outcome=outcome_name,
            attempts=tries,
        )
    await session.flush()
    return endpoint.enabled


def _next_state(
    endpoint: WebhookEndpoint,
    claim: Claim,
    outcome: Outcome,
    *,
    settings: Settings,
    now: datetime,
) -> tuple[DeliveryStatus, datetime | None]:
    """The delivery's status and next attempt after this outcome; updates the endpoint's
    failure record (and disables it when the outcome says so)."""
    if outcome.succeeded:
        if endpoint.failing_since is not None:  # the endpoint row is written only on a change
            endpoint.failing_since = None
        return DeliveryStatus.succeeded, None
    endpoint.failing_since = endpoint.failing_since or outcome.attempted_at
    wait = retry_delay(claim.attempts + 1, settings=settings, retry_after=outcome.retry_after)
    if outcome.status_code == 410:
        _disable(endpoint, "The endpoint answered 410 Gone.", at=now)
        wait = None
    elif endpoint.failing_since <= now - timedelta(seconds=settings.webhook_disable_after_s):
        _disable(
            endpoint, f"Every attempt failed since {endpoint.failing_since.isoformat()}.", at=now
        )
    if wait is None:
        return DeliveryStatus.failed, None
    return DeliveryStatus.pending, now + wait


def _disable(endpoint: WebhookEndpoint, reason: str, *, at: datetime) -> None:
    if endpoint.enabled:
        endpoint.enabled = False
        endpoint.disabled_reason = reason
        endpoint.disabled_at = at
        log.warning("webhook_endpoint_disabled", endpoint_id=str(endpoint.id), reason=reason)


async def due_endpoints(session: AsyncSession, *, limit: int = SWEEP_BATCH) -> list[uuid.UUID]:
    """Endpoints with pending deliveries whose time has come (or whose lease ran out)."""
    rows = await session.execute(text(_DUE), {"limit": limit})
    return [row[0] for row in rows.all()]
