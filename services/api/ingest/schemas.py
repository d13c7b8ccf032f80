"""Answers of the ingestion endpoints."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.api.errors import FieldError
from shared.enums import ItemStatus


class EventAck(BaseModel):
    """What happened to one event sent to a typed endpoint."""

    event_id: str
    status: ItemStatus = Field(
        description="accepted: stored and applied; stale: stored, but a newer version of the "
        "entity was already applied; duplicate: this event_id was seen before, nothing changed."
    )

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"event_id": "erp-000123", "status": "accepted"}]}
    )


BATCH_EXAMPLE: dict[str, Any] = {
    "events": [
        {
            "type": "account",
            "event_id": "crm-acc-1001-v3",
            "external_id": "A-1001",
            "version": 3,
            "name": "Nordwerk GmbH",
            "industry": "Machinery",
            "region": "DACH",
            "manager_external_id": "M-7",
            "strategic_fit": 4,
        },
        {
            "type": "order",
            "event_id": "erp-ord-55120",
            "external_id": "SO-55120",
            "account_external_id": "A-1001",
            "version": 1,
            "ordered_at": "2026-11-20T10:15:00Z",
            "amount": "18400.00",
            "cost": "12900.00",
            "currency": "EUR",
            "lines": [{"category": "spare parts", "quantity": "40", "amount": "18400.00"}],
        },
    ]
}


def batch_request_schema(max_events: int) -> dict[str, Any]:
    """The documented body of ``POST /v1/events``.

    Items are described by ``BatchEvent``, not constrained to it:
    the endpoint takes a batch with bad items and rejects those items one by one, so a schema
    that called the whole batch invalid would misdescribe it.
    """
    return {
        "title": "BatchRequest",
        "type": "object",
        "additionalProperties": False,
        "required": ["events"],
        "properties": {
            "events": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_events,
                "items": {},
                "description": "Each item is one event shaped as `BatchEvent`, its `type` naming "
                "which. An item that does not fit is rejected on its own; the others are stored.",
            }
        },
        "examples": [BATCH_EXAMPLE],
    }


class ItemResult(BaseModel):
    index: int = Field(description="Position of the event in the batch, from 0.")
    event_id: str | None = Field(description="The event's id, when it had a readable one.")
    status: ItemStatus
    errors: list[FieldError] | None = Field(
        default=None, description="For a rejected event: what is wrong with it."
    )


class BatchResult(BaseModel):
    """Counts and one result per event. ``accepted`` includes the ``stale`` ones: both are
    stored; only ``rejected`` events were not."""

    accepted: int
    stale: int
    duplicates: int
    rejected: int
    results: list[ItemResult]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "accepted": 1,
                    "stale": 0,
                    "duplicates": 1,
                    "rejected": 1,
                    "results": [
                        {"index": 0, "event_id": "e-1", "status": "accepted"},
                        {"index": 1, "event_id": "e-0", "status": "duplicate"},
                        {
                            "index": 2,
                            "event_id": "e-2",
                            "status": "rejected",
                            "errors": [
                                {
                                    "field": "events.2.order.amount",
                                    "message": "Input should be greater than or equal to 0",
                                    "type": "greater_than_equal",
                                }
                            ],
                        },
                    ],
                }
            ]
        }
    )


def batch_item_event_id(item: Any) -> str | None:
    if isinstance(item, dict):
        event_id = item.get("event_id")
        if isinstance(event_id, str) and 0 < len(event_id) <= 128:
            return event_id
    return None
