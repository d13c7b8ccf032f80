"""Small typed builders of event payloads, as a producer would send them."""

from __future__ import annotations

from itertools import count
from typing import Any

_seq = count(1)


def _next_id(prefix: str) -> str:
    return f"{prefix}-{next(_seq)}"


def order(
    account: str = "A-1",
    *,
    external_id: str | None = None,
    event_id: str | None = None,
    version: int = 1,
    amount: str = "1000.00",
    cost: str | None = "700.00",
    ordered_at: str = "2026-10-01T10:00:00Z",
    status: str = "placed",
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": event_id or _next_id("ev-order"),
        "version": version,
        "external_id": external_id or _next_id("SO"),
        "account_external_id": account,
        "ordered_at": ordered_at,
        "amount": amount,
        "currency": "EUR",
        "status": status,
        "lines": [{"category": "tools", "quantity": "2", "amount": amount}],
    }
    if cost is not None:
        body["cost"] = cost
    return body | extra


def account(
    name: str = "Nordwerk GmbH",
    *,
    event_id: str | None = None,
    version: int = 1,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "event_id": event_id or _next_id("ev-account"),
        "version": version,
        "name": name,
    } | extra


def contact(
    account: str = "A-1", *, external_id: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "event_id": _next_id("ev-contact"),
        "version": 1,
        "external_id": external_id or _next_id("C"),
        "account_external_id": account,
        "name": "Erika Muster",
        "role": "decision_maker",
        "email": "erika@example.com",
        "phone": "+49 30 1234567",
    } | extra


def interaction(account: str = "A-1", **extra: Any) -> dict[str, Any]:
    return {
        "event_id": _next_id("ev-interaction"),
        "version": 1,
        "external_id": _next_id("I"),
        "account_external_id": account,
        "channel": "phone",
        "direction": "outbound",
        "kind": "survey",
        "occurred_at": "2026-10-02T09:00:00Z",
        "satisfaction": 4,
    } | extra


def payment(account: str = "A-1", **extra: Any) -> dict[str, Any]:
    return {
        "event_id": _next_id("ev-payment"),
        "version": 1,
        "invoice_external_id": _next_id("INV"),
        "account_external_id": account,
        "amount": "1000.00",
        "currency": "EUR",
        "due_at": "2026-10-31T00:00:00Z",
        "paid_at": "2026-11-03T00:00:00Z",
    } | extra


def batch_item(kind: str, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": kind, **body, **extra}
