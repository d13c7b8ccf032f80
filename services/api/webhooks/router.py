"""Webhook endpoints (scope `webhooks:manage`): register, change, rotate the secret, test, and
read the delivery log. Deliveries are made by the scorer, never inside these requests."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from sqlalchemy import select

from services.api.body import JsonBodyRoute
from services.api.deps import SessionDep, require
from services.api.errors import Conflict, NotFound, problems
from services.api.keys.service import Principal
from services.api.pagination import Cursor, Limit, decode_cursor, encode_cursor
from services.api.webhooks.schemas import (
    AttemptOut,
    DeliveryOut,
    DeliveryPage,
    WebhookEndpointCreated,
    WebhookEndpointIn,
    WebhookEndpointList,
    WebhookEndpointOut,
    WebhookEndpointPatch,
    WebhookSecret,
    WebhookTestSent,
)
from services.api.webhooks.service import (
    check_url,
    create_endpoint,
    delete_endpoint,
    deliveries_page,
    get_endpoint,
    redeliver,
    rotate_secret,
    send_test_event,
    set_enabled,
)
from shared.enums import DeliveryStatus, Scope, WebhookEventType
from shared.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent
from shared.settings import Settings

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], route_class=JsonBodyRoute)

Manager = Annotated[Principal, Depends(require(Scope.webhooks_manage))]
EndpointId = Annotated[uuid.UUID, Path(description="The endpoint's id.")]
_ERRORS = problems(401, 403, 404, 422, 503)
_BODY_ERRORS = problems(400, 401, 403, 404, 413, 422, 503)

_SIGNING = """

**Verifying a delivery** ([Standard Webhooks](https://www.standardwebhooks.com)): every POST
carries `webhook-id` (the event's id, the same on every retry: deduplicate on it),
`webhook-timestamp` (Unix seconds) and `webhook-signature` (`v1,` + base64 of HMAC-SHA256 over
`{webhook-id}.{webhook-timestamp}.{body}` keyed with the base64-decoded part of the secret after
`whsec_`; during a rotation two signatures, space-separated). Answer 2xx within 10 s; anything
else (a redirect too: it is not followed) is retried after 5 s, 5 min, 30 min, 2 h, 5 h, 10 h
and 10 h (with jitter; a 429 or 503 `Retry-After` is honoured), then the delivery is failed. A
410 disables the endpoint, and so do 5 days of nothing but failures. One account's events reach
an endpoint in order: a later one waits while an earlier one is pending. Tier changes also
carry the account's `sequence` number.
"""


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _out(endpoint: WebhookEndpoint) -> WebhookEndpointOut:
    return WebhookEndpointOut(
        id=endpoint.id,
        url=endpoint.url,
        description=endpoint.description,
        event_types=[WebhookEventType(t) for t in endpoint.event_types],
        enabled=endpoint.enabled,
        disabled_reason=endpoint.disabled_reason,
        disabled_at=endpoint.disabled_at,
        failing_since=endpoint.failing_since,
        previous_secret_expires_at=endpoint.previous_secret_expires_at,
        created_at=endpoint.created_at,
        updated_at=endpoint.updated_at,
    )


def _delivery(
    delivery: WebhookDelivery, event: WebhookEvent, attempts: list[WebhookAttempt]
) -> DeliveryOut:
    return DeliveryOut(
        id=delivery.id,
        event_id=event.id,
        event_type=WebhookEventType(event.type),
        status=DeliveryStatus(delivery.status),
        attempts=delivery.attempts,
        next_attempt_at=delivery.next_attempt_at,
        last_attempt_at=delivery.last_attempt_at,
        created_at=delivery.created_at,
        attempt_log=[
            AttemptOut(
                attempted_at=a.attempted_at,
                status_code=a.status_code,
                latency_ms=a.latency_ms,
                error=a.error,
                response_excerpt=a.response_excerpt,
            )
            for a in attempts
        ],
        payload=event.payload,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Register a webhook endpoint",
    description="Subscribe a URL to event types. The answer carries the signing secret, the "
    "only time it is shown. Needs scope `webhooks:manage`." + _SIGNING,
    responses=problems(400, 401, 403, 413, 422, 503),
)
async def create_webhook(
    body: WebhookEndpointIn, request: Request, session: SessionDep, _: Manager
) -> WebhookEndpointCreated:
    await check_url(body.url, allowed_hosts=_settings(request).webhook_allowed_hosts)
    endpoint = await create_endpoint(
        session, url=body.url, event_types=body.event_types, description=body.description
    )
    return WebhookEndpointCreated(**_out(endpoint).model_dump(), secret=endpoint.secret)


@router.get("", summary="List webhook endpoints", responses=problems(401, 403, 503))
async def list_webhooks(session: SessionDep, _: Manager) -> WebhookEndpointList:
    """Every endpoint, oldest first, without secrets. Needs scope `webhooks:manage`."""
    endpoints = await session.scalars(
        select(WebhookEndpoint).order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    )
    return WebhookEndpointList(items=[_out(e) for e in endpoints])


@router.get("/{endpoint_id}", summary="One webhook endpoint", responses=_ERRORS)
async def get_webhook(
    endpoint_id: EndpointId, session: SessionDep, _: Manager
) -> WebhookEndpointOut:
    """The endpoint, without its secret: whether it is enabled, and if not, why (`disabled_reason`:
    by the API, a 410 answer, or days of failures). Needs scope `webhooks:manage`."""
    return _out(await get_endpoint(session, endpoint_id))


@router.patch("/{endpoint_id}", summary="Change a webhook endpoint", responses=_BODY_ERRORS)
async def update_webhook(
    endpoint_id: EndpointId,
    body: WebhookEndpointPatch,
    request: Request,
    session: SessionDep,
    _: Manager,
) -> WebhookEndpointOut:
    """Change the URL (checked as on registration), the event types, the description, or
    enable/disable it. Enabling clears the failure record and resumes pending deliveries.
    Needs scope `webhooks:manage`."""
    endpoint = await get_endpoint(session, endpoint_id)
    if body.url is not None:
        await check_url(body.url, allowed_hosts=_settings(request).webhook_allowed_hosts)
        endpoint.url = body.url
    if body.event_types is not None:
        endpoint.event_types = list(body.event_types)
    if "description" in body.model_fields_set:
        endpoint.description = body.description
    if body.enabled is not None:
        await set_enabled(session, endpoint, enabled=body.enabled)
    await session.flush()
    await session.refresh(endpoint)
    return _out(endpoint)


@router.delete(
    "/{endpoint_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a webhook endpoint",
    responses=_ERRORS,
)
async def delete_webhook(endpoint_id: EndpointId, session: SessionDep, _: Manager) -> Response:
    """Delete the endpoint with its deliveries and their log. Needs scope `webhooks:manage`."""
    await delete_endpoint(session, await get_endpoint(session, endpoint_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{endpoint_id}/rotate-secret", summary="Rotate the signing secret", responses=_ERRORS)
async def rotate_webhook_secret(
    endpoint_id: EndpointId, request: Request, session: SessionDep, _: Manager
) -> WebhookSecret:
    """A new signing secret, shown once. For 24 hours every delivery carries two signatures, by
    the new and by the old secret, so the receiver can switch without losing a delivery.
    Needs scope `webhooks:manage`."""
    endpoint = await get_endpoint(session, endpoint_id)
    overlap = timedelta(seconds=_settings(request).webhook_secret_overlap_s)
    endpoint = await rotate_secret(session, endpoint, overlap=overlap)
    assert endpoint.previous_secret_expires_at is not None
    return WebhookSecret(
        secret=endpoint.secret, previous_secret_expires_at=endpoint.previous_secret_expires_at
    )


@router.post(
    "/{endpoint_id}/test",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Send a test event",
    responses=problems(401, 403, 404, 409, 422, 503),
)
async def send_test_webhook(
    endpoint_id: EndpointId, session: SessionDep, _: Manager
) -> WebhookTestSent:
    """Queue a `webhook.test` event to this endpoint; the scorer sends it, and the delivery log
    shows the outcome. A disabled endpoint is a 409. Needs scope `webhooks:manage`."""
    endpoint = await get_endpoint(session, endpoint_id)
    if not endpoint.enabled:
        raise Conflict("The endpoint is disabled; enable it first.")
    delivery = await send_test_event(session, endpoint)
    return WebhookTestSent(event_id=delivery.event_id, delivery_id=delivery.id)


@router.get(
    "/{endpoint_id}/deliveries",
    summary="The delivery log of an endpoint",
    responses=problems(400, 401, 403, 404, 422, 503),
)
async def list_deliveries(
    endpoint_id: EndpointId,
    session: SessionDep,
    _: Manager,
    limit: Limit = 50,
    cursor: Cursor = None,
    status_filter: Annotated[
        DeliveryStatus | None, Query(alias="status", description="Only deliveries in this state.")
    ] = None,
) -> DeliveryPage:
    """The endpoint's deliveries, newest first, each with the event and every attempt (time,
    status code, latency, error, the first 1 KiB of the answer). Needs scope
    `webhooks:manage`."""
    await get_endpoint(session, endpoint_id)
    before_id = decode_cursor(cursor, int)[0] if cursor else None
    rows, attempts = await deliveries_page(
        session, endpoint_id=endpoint_id, status=status_filter, before_id=before_id, limit=limit
    )
    items = [_delivery(d, e, attempts[d.id]) for d, e in rows]
    next_cursor = encode_cursor(rows[-1][0].id) if len(rows) == limit else None
    return DeliveryPage(items=items, next_cursor=next_cursor)


@router.post(
    "/{endpoint_id}/deliveries/{delivery_id}/redeliver",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Send a delivery again",
    responses=_ERRORS,
)
async def redeliver_delivery(
    endpoint_id: EndpointId,
    delivery_id: Annotated[int, Path(ge=1, le=2**63 - 1, description="The delivery's id.")],
    session: SessionDep,
    _: Manager,
) -> DeliveryOut:
    """Send the event again with the same `webhook-id` (whatever its state), with a fresh
    retry schedule; the earlier attempts stay in the log. It goes out once the endpoint is
    enabled and no earlier delivery of the same account is pending. Needs scope
    `webhooks:manage`."""
    row = (
        await session.execute(
            select(WebhookDelivery, WebhookEvent)
            .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.endpoint_id == endpoint_id)
            .with_for_update(of=WebhookDelivery)
        )
    ).first()
    if row is None:
        raise NotFound(f"No delivery {delivery_id} of webhook endpoint {endpoint_id}.")
    delivery, event = row
    await redeliver(session, delivery)
    attempts = await session.scalars(
        select(WebhookAttempt)
        .where(WebhookAttempt.delivery_id == delivery.id)
        .order_by(WebhookAttempt.id)
    )
    return _delivery(delivery, event, list(attempts))
