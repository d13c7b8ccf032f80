"""Webhook endpoints and their deliveries. Services flush; the request's session commits and
then pushes the delivery jobs collected in ``session.info``."""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.errors import FieldError, NotFound, Unprocessable
from services.scorer.webhook_targets import UnsafeTarget, resolve_target
from shared.enums import DeliveryStatus, WebhookEventType
from shared.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent
from shared.queue import deliver_after_commit

SECRET_BYTES = 32


def new_secret() -> str:
    """A signing secret as Standard Webhooks writes it: ``whsec_`` + base64 of random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


async def check_url(url: str, *, allowed_hosts: set[str], field: str = "body.url") -> None:
    """Refuse (422 naming the field) a URL webhooks may not be sent to."""
    try:
        await resolve_target(url, allowed_hosts=allowed_hosts)
    except UnsafeTarget as exc:
        raise Unprocessable(
            f"{field}: {exc}",
            errors=[FieldError(field=field, message=str(exc), type="url_refused")],
        ) from None


async def get_endpoint(session: AsyncSession, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    endpoint = await session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None:
        raise NotFound(f"No webhook endpoint {endpoint_id}.")
    return endpoint


async def create_endpoint(
    session: AsyncSession, *, url: str, event_types: Sequence[str], description: str | None
) -> WebhookEndpoint:
    endpoint = WebhookEndpoint(
        id=uuid.uuid4(),
        url=url,
        event_types=list(event_types),
        description=description,
        enabled=True,
        secret=new_secret(),
    )
    session.add(endpoint)
    await session.flush()
    await session.refresh(endpoint)
    return endpoint


async def set_enabled(session: AsyncSession, endpoint: WebhookEndpoint, *, enabled: bool) -> None:
    """Disable (deliveries wait, pending) or enable again (failure record cleared, the pending
    deliveries resumed at once)."""
    if enabled == endpoint.enabled:
        return
    endpoint.enabled = enabled
    if enabled:
        endpoint.disabled_reason = None
        endpoint.disabled_at = None
        endpoint.failing_since = None
        resumed = await session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.endpoint_id == endpoint.id,
                WebhookDelivery.status == DeliveryStatus.pending,
            )
            .values(next_attempt_at=func.now())
            .returning(WebhookDelivery.id)
        )
        if resumed.first() is not None:
            deliver_after_commit(session, [endpoint.id])
    else:
        endpoint.disabled_reason = "Disabled through the API."
        endpoint.disabled_at = func.now()


async def rotate_secret(
    session: AsyncSession, endpoint: WebhookEndpoint, *, overlap: timedelta
) -> WebhookEndpoint:
    """A new secret; the current one keeps signing beside it for ``overlap`` (a secret rotated
    out earlier and still overlapping stops signing now)."""
    now = await session.scalar(select(func.now()))
    assert now is not None
    endpoint.previous_secret = endpoint.secret
    endpoint.previous_secret_expires_at = now + overlap
    endpoint.secret = new_secret()
    await session.flush()
    return endpoint


async def delete_endpoint(session: AsyncSession, endpoint: WebhookEndpoint) -> None:
    await session.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == endpoint.id))


async def send_test_event(session: AsyncSession, endpoint: WebhookEndpoint) -> WebhookDelivery:
    """A ``webhook.test`` event to this endpoint alone (it needs no subscription)."""
    now = await session.scalar(select(func.now()))
    assert isinstance(now, datetime)
    event = WebhookEvent(
        id=f"msg_{uuid.uuid4().hex}",
        type=WebhookEventType.webhook_test.value,
        payload={
            "type": WebhookEventType.webhook_test.value,
            "timestamp": now.isoformat(),
            "data": {"endpoint_id": str(endpoint.id), "message": "A test event from KAM."},
        },
    )
    session.add(event)
    await session.flush()
    delivery = WebhookDelivery(
        event_id=event.id, endpoint_id=endpoint.id, next_attempt_at=now, status="pending"
    )
    session.add(delivery)
    await session.flush()
    await session.refresh(delivery)
    deliver_after_commit(session, [delivery.endpoint_id])
    return delivery


async def redeliver(session: AsyncSession, delivery: WebhookDelivery) -> WebhookDelivery:
    """Send again, with the same ``webhook-id``: the delivery is pending and due now, with the
    retry schedule started afresh (earlier attempts stay in the log)."""
    delivery.status = DeliveryStatus.pending
    delivery.attempts = 0
    delivery.next_attempt_at = await session.scalar(select(func.now()))
    await session.flush()
    deliver_after_commit(session, [delivery.endpoint_id])
    return delivery


async def deliveries_page(
    session: AsyncSession,
    *,
    endpoint_id: uuid.UUID,
    status: DeliveryStatus | None,
    before_id: int | None,
    limit: int,
) -> tuple[list[tuple[WebhookDelivery, WebhookEvent]], dict[int, list[WebhookAttempt]]]:
    """A page of the endpoint's deliveries, newest first, with their attempts."""
    query = (
        select(WebhookDelivery, WebhookEvent)
        .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
        .where(WebhookDelivery.endpoint_id == endpoint_id)
        .order_by(WebhookDelivery.id.desc())
        .limit(limit)
    )
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    if before_id is not None:
        query = query.where(WebhookDelivery.id < before_id)
    rows = [(d, e) for d, e in (await session.execute(query)).all()]
    attempts: dict[int, list[WebhookAttempt]] = {d.id: [] for d, _ in rows}
    if rows:
        found = await session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_(list(attempts)))
            .order_by(WebhookAttempt.delivery_id, WebhookAttempt.id)
        )
        for attempt in found:
            attempts[attempt.delivery_id].append(attempt)
    return rows, attempts
