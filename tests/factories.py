"""Small typed builders: event payloads as a producer would send them, and rows written
straight to the database for state only the scorer produces (tiers, risks, snapshots, tier
changes). Row builders flush; the test commits so that the app's connections see them."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from itertools import count
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from services.scorer.policies import active_policy
from shared.enums import RiskBand, Tier
from shared.models import Account, Interaction, Manager, Order, ScoreSnapshot, TierChange

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


async def manager_row(
    session: AsyncSession, external_id: str, *, capacity: int = 9, name: str | None = None
) -> Manager:
    manager = Manager(external_id=external_id, name=name or external_id, capacity=capacity)
    session.add(manager)
    await session.flush()
    return manager


async def account_row(
    session: AsyncSession,
    external_id: str,
    *,
    tier: Tier | None = None,
    risk_probability: float | None = None,
    risk_band: RiskBand | None = None,
    manager: Manager | None = None,
    status: str = "active",
    name: str | None = None,
) -> Account:
    """An account as the scorer left it: with a tier it counts as scored now."""
    scored_at = datetime.now(UTC) if tier is not None else None
    account = Account(
        external_id=external_id,
        name=name or f"{external_id} GmbH",
        source_version=1,
        status=status,
        tier=tier.value if tier is not None else None,
        tier_since=scored_at,
        value_score=50.0 if tier is not None else None,
        risk_probability=risk_probability,
        risk_band=risk_band.value if risk_band is not None else None,
        scored_at=scored_at,
        manager_id=manager.id if manager is not None else None,
    )
    session.add(account)
    await session.flush()
    return account


async def order_row(
    session: AsyncSession,
    account: Account,
    *,
    amount: str,
    cost: str | None,
    ordered_at: datetime,
    status: str = "placed",
) -> Order:
    order = Order(
        external_id=_next_id("SO"),
        account_id=account.id,
        ordered_at=ordered_at,
        amount=Decimal(amount),
        cost=Decimal(cost) if cost is not None else None,
        currency="EUR",
        status=status,
        source_version=1,
    )
    session.add(order)
    await session.flush()
    return order


async def survey_row(
    session: AsyncSession, account: Account, *, satisfaction: int, occurred_at: datetime
) -> Interaction:
    survey = Interaction(
        external_id=_next_id("I"),
        account_id=account.id,
        channel="email",
        direction="inbound",
        kind="survey",
        occurred_at=occurred_at,
        satisfaction=satisfaction,
        source_version=1,
    )
    session.add(survey)
    await session.flush()
    return survey


def drivers(code: str = "recency") -> dict[str, Any]:
    return {
        "tier": [
            {"code": "score_above_key", "text": "score 64 above 60", "value": 64, "limit": 60}
        ],
        "value": [{"code": "revenue", "text": "revenue 12m in the top 5%", "contribution": 21.3}],
        "risk": [
            {"code": code, "text": "no order for 143 days, usual gap 30", "contribution": 0.9}
        ],
    }


async def snapshot_row(
    session: AsyncSession,
    account: Account,
    *,
    computed_at: datetime,
    tier: Tier = Tier.key,
    value_score: float = 64.0,
    risk_probability: float | None = 0.3,
    risk_band: RiskBand | None = RiskBand.medium,
    driver_code: str = "recency",
    features: dict[str, Any] | None = None,
) -> ScoreSnapshot:
    version, _ = await active_policy(session)
    snapshot = ScoreSnapshot(
        account_id=account.id,
        computed_at=computed_at,
        policy_version=version,
        features=features
        if features is not None
        else {"revenue_12m": 412000.0, "margin_rate": 0.21, "days_since_last_order": None},
        value_score=value_score,
        tier=tier.value,
        risk_probability=risk_probability,
        risk_band=risk_band.value if risk_band is not None else None,
        drivers=drivers(driver_code),
    )
    session.add(snapshot)
    # As the scorer does: the account row carries its newest snapshot's listed figures.
    if account.snapshot_at is None or computed_at >= account.snapshot_at:
        account.snapshot_at = computed_at
        account.revenue_12m = snapshot.features.get("revenue_12m")
        account.gross_profit_12m = snapshot.features.get("gross_profit_12m")
        risk = snapshot.drivers.get("risk") or [{}]
        account.first_risk_driver = risk[0].get("text")
    await session.flush()
    return snapshot


async def tier_change_row(
    session: AsyncSession,
    account: Account,
    *,
    seq: int,
    from_tier: Tier | None,
    to_tier: Tier,
    changed_at: datetime,
) -> TierChange:
    change = TierChange(
        account_id=account.id,
        seq=seq,
        from_tier=from_tier.value if from_tier is not None else None,
        to_tier=to_tier.value,
        changed_at=changed_at,
        reasons={"tier": [{"code": "score_above_key", "text": f"change {seq}"}]},
    )
    session.add(change)
    await session.flush()
    return change
