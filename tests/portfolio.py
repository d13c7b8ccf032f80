"""A small portfolio described account by account, sent through the batch ingestion API.

Tests describe what an account did (orders every so many days at some amount and margin,
invoices paid late or on time, survey answers) and this module turns it into events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import count
from typing import Any

import httpx

_ids = count(1)


@dataclass
class AccountSpec:
    """``orders``: one order every ``every_days`` from ``first_days_ago`` to ``last_days_ago``
    (days before ``now``), each of ``amount`` at ``margin`` (0.3 = 30%), spread over
    ``categories`` categories. ``late_share`` of the monthly invoices are paid ``days_late``
    days late. ``surveys`` are satisfaction answers, oldest first, a month apart, ending
    ``surveys_end_days_ago`` days ago."""

    external_id: str
    amount: float = 5_000.0
    margin: float = 0.3
    every_days: int = 30
    first_days_ago: int = 700
    last_days_ago: int = 10
    categories: int = 2
    late_share: float = 0.0
    days_late: int = 0
    strategic_fit: int | None = None
    surveys: list[int] = field(default_factory=list)
    surveys_end_days_ago: int = 20
    complaints_days_ago: list[int] = field(default_factory=list)
    status: str = "active"
    manager: str | None = None


def _ts(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def events_for(spec: AccountSpec, now: datetime) -> list[dict[str, Any]]:
    account: dict[str, Any] = {
        "type": "account",
        "event_id": f"ev-{next(_ids)}",
        "version": 1,
        "external_id": spec.external_id,
        "name": f"Account {spec.external_id}",
        "status": spec.status,
    }
    if spec.status == "lost":
        account["churn_reason"] = "moved to a competitor"
    if spec.strategic_fit is not None:
        account["strategic_fit"] = spec.strategic_fit
    if spec.manager is not None:
        account["manager_external_id"] = spec.manager
    events: list[dict[str, Any]] = [account]
    day = spec.first_days_ago
    n = 0
    while day >= spec.last_days_ago:
        at = now - timedelta(days=day, hours=1)
        amount = round(spec.amount, 2)
        category = f"cat-{n % spec.categories}"
        events.append(
            {
                "type": "order",
                "event_id": f"ev-{next(_ids)}",
                "version": 1,
                "external_id": f"SO-{spec.external_id}-{n}",
                "account_external_id": spec.external_id,
                "ordered_at": _ts(at),
                "amount": f"{amount:.2f}",
                "cost": f"{amount * (1 - spec.margin):.2f}",
                "currency": "EUR",
                "status": "placed",
                "lines": [{"category": category, "quantity": "1", "amount": f"{amount:.2f}"}],
            }
        )
        if day <= 365:
            late = (n % 10) < round(spec.late_share * 10)
            due = at + timedelta(days=30)
            paid = due + timedelta(days=spec.days_late if late else -2)
            if paid < now:
                events.append(
                    {
                        "type": "payment",
                        "event_id": f"ev-{next(_ids)}",
                        "version": 1,
                        "invoice_external_id": f"INV-{spec.external_id}-{n}",
                        "account_external_id": spec.external_id,
                        "amount": f"{amount:.2f}",
                        "currency": "EUR",
                        "due_at": _ts(due),
                        "paid_at": _ts(paid),
                    }
                )
        day -= spec.every_days
        n += 1
    for k, answer in enumerate(spec.surveys):
        ago = spec.surveys_end_days_ago + 30 * (len(spec.surveys) - 1 - k)
        events.append(_interaction(spec, now - timedelta(days=ago), "survey", answer))
    for ago in spec.complaints_days_ago:
        events.append(_interaction(spec, now - timedelta(days=ago), "complaint", None))
    return events


def _interaction(
    spec: AccountSpec, at: datetime, kind: str, satisfaction: int | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "interaction",
        "event_id": f"ev-{next(_ids)}",
        "version": 1,
        "external_id": f"I-{next(_ids)}",
        "account_external_id": spec.external_id,
        "channel": "phone",
        "direction": "inbound",
        "kind": kind,
        "occurred_at": _ts(at),
    }
    if satisfaction is not None:
        body["satisfaction"] = satisfaction
    return body


async def send(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    specs: list[AccountSpec],
    now: datetime,
) -> None:
    events = [event for spec in specs for event in events_for(spec, now)]
    for start in range(0, len(events), 1000):
        response = await client.post(
            "/v1/events", json={"events": events[start : start + 1000]}, headers=headers
        )
        assert response.status_code == 202, response.text
        assert response.json()["rejected"] == 0, response.text


def ordinary_accounts(n: int, *, prefix: str = "N") -> list[AccountSpec]:
    """A background population: mid-sized, profitable, regular, paying on time; one in four
    stopped buying some months ago (a population without drop-outs teaches the retention model
    that nobody ever leaves)."""
    return [
        AccountSpec(
            external_id=f"{prefix}-{i}",
            amount=1_000.0 + 400.0 * i,
            margin=0.2 + 0.01 * (i % 10),
            every_days=20 + (i % 5) * 7,
            categories=1 + i % 3,
            last_days_ago=10 if i % 4 else 120 + 40 * (i % 7),
        )
        for i in range(n)
    ]
