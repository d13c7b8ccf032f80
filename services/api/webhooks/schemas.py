"""Resources of the webhooks API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.enums import DeliveryStatus, WebhookEventType

URL_DESCRIPTION = (
    "Where to POST events: https, on a public address (the host must not resolve to a private, "
    "loopback, link-local, reserved, multicast or unspecified address). Checked now and again "
    "before every delivery."
)

PAYLOAD_EXAMPLE: dict[str, Any] = {
    "type": "account.tier_changed",
    "timestamp": "2026-11-23T16:30:00+00:00",
    "data": {
        "account": {"external_id": "ACME-001", "name": "Acme Tools GmbH"},
        "sequence": 3,
        "previous_tier": "developing",
        "tier": "key",
        "value_score": 74.12,
        "risk_probability": 0.0831,
        "risk_band": "low",
        "reasons": {"tier": [{"code": "score_above_key", "text": "score 74.1 >= 70 for key"}]},
        "policy_version": 2,
        "occurred_at": "2026-11-23T16:30:00+00:00",
    },
}


def _unique_types(types: list[WebhookEventType]) -> list[WebhookEventType]:
    return sorted(set(types))


class WebhookEndpointIn(BaseModel):
    """A new subscriber."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "url": "https://crm.example.com/hooks/kam",
                    "event_types": ["account.tier_changed"],
                    "description": "CRM sync",
                }
            ]
        },
    )

    url: str = Field(min_length=1, max_length=2048, description=URL_DESCRIPTION)
    event_types: list[WebhookEventType] = Field(
        min_length=1,
        description="The event types to receive (`webhook.test` needs no subscription).",
    )
    description: str | None = Field(default=None, max_length=500)

    _types = field_validator("event_types")(_unique_types)


class WebhookEndpointPatch(BaseModel):
    """Changes to an endpoint; omitted fields stay as they are. Enabling a disabled endpoint
    clears its failure record and resumes its pending deliveries."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"enabled": True}]})

    url: str | None = Field(
        default=None, min_length=1, max_length=2048, description=URL_DESCRIPTION
    )
    event_types: list[WebhookEventType] | None = Field(default=None, min_length=1)
    description: str | None = Field(default=None, max_length=500)
    enabled: bool | None = None

    @field_validator("event_types")
    @classmethod
    def _unique(cls, types: list[WebhookEventType] | None) -> list[WebhookEventType] | None:
        return None if types is None else _unique_types(types)


class WebhookEndpointOut(BaseModel):
    """A subscriber, without its secret."""

    id: uuid.UUID
    url: str
    description: str | None
    event_types: list[WebhookEventType]
    enabled: bool
    disabled_reason: str | None = Field(
        description="Why the endpoint is disabled: by the API, a 410 answer, or days of failures."
    )
    disabled_at: datetime | None
    failing_since: datetime | None = Field(
        description="Since when every attempt has failed; null after a success."
    )
    previous_secret_expires_at: datetime | None = Field(
        description="While a rotated-out secret still signs (beside the new one), until when."
    )
    created_at: datetime
    updated_at: datetime


class WebhookEndpointCreated(WebhookEndpointOut):
    secret: str = Field(
        description="The signing secret (`whsec_` + base64). Shown only now: store it.",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw1lOpBcQkxHg="],
    )


class WebhookEndpointList(BaseModel):
    items: list[WebhookEndpointOut]


class WebhookSecret(BaseModel):
    """A new signing secret. The previous one keeps signing beside it until
    ``previous_secret_expires_at``: switch the receiver over before then."""

    secret: str
    previous_secret_expires_at: datetime


class WebhookTestSent(BaseModel):
    event_id: str = Field(description="The `webhook-id` the receiver will see.")
    delivery_id: int


class AttemptOut(BaseModel):
    """One try of a delivery."""

    attempted_at: datetime
    status_code: int | None = Field(description="Null when no answer came (timeout, refused...).")
    latency_ms: int | None
    error: str | None
    response_excerpt: str | None = Field(description="The first 1 KiB of the answer's body.")


class DeliveryOut(BaseModel):
    """One event to this endpoint, with every attempt so far (oldest first)."""

    id: int
    event_id: str = Field(description="The `webhook-id`, the same on every attempt.")
    event_type: WebhookEventType
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    created_at: datetime
    attempt_log: list[AttemptOut]
    payload: dict[str, Any] = Field(examples=[PAYLOAD_EXAMPLE])


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at end.")
