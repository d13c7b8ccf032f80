"""Webhook events: written in the transaction of the change that caused them, with one pending
delivery per enabled endpoint subscribed to the event's type.

Which changes are events:

* ``account.tier_changed`` when the published tier changes, except an account's first tier when
  it is ``standard``: the first pass over a new portfolio would otherwise announce every one of
  100k ordinary accounts. A first tier above standard is announced (``previous_tier`` null).
* ``account.risk_band_changed`` when the band moves from one band to another. An account's first
  band is not a change, and an account that is lost has no band (its tier change says it).

Events of a type no enabled endpoint subscribes to are not written: they would reach nobody.
Deliveries are numbered in the order the events happened for each account (the account row
lock of the scorer serialises them), which is the order they are sent in.

The ids of the new deliveries are collected in ``session.info``; the commit point that commits
the transaction pushes their jobs (and the sweeper finds any whose push was lost).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession

from services.scorer.enqueue import DELIVER_AFTER_COMMIT
from shared.enums import Tier, WebhookEventType

if TYPE_CHECKING:
    from services.scorer.evaluation import AccountState, Evaluation

TIER_CHANGED = WebhookEventType.account_tier_changed.value
BAND_CHANGED = WebhookEventType.account_risk_band_changed.value

# One statement per chunk: the events (only of subscribed types) and their deliveries.
_RECORD_ACCOUNT_EVENTS = """
WITH u AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::integer[], $4::text[], $5::text[],
                         $6::float8[], $7::float8[], $8::text[], $9::text[])
        AS u(account_id, type, seq, previous_tier, tier, score, risk, previous_band, band)
    WHERE u.type IN (SELECT unnest(event_types) FROM webhook_endpoints WHERE enabled)
),
events AS (
    INSERT INTO webhook_events (id, type, account_id, account_seq, payload)
    SELECT 'msg_' || replace(gen_random_uuid()::text, '-', ''), u.type, u.account_id, u.seq,
           jsonb_build_object(
               'type', u.type,
               'timestamp', to_jsonb($10::timestamptz),
               'data', jsonb_build_object(
                   'account', jsonb_build_object('external_id', a.external_id, 'name', a.name),
                   'tier', u.tier,
                   'value_score', u.score,
                   'risk_probability', u.risk,
                   'risk_band', u.band,
                   'policy_version', $11::integer,
                   'occurred_at', to_jsonb($10::timestamptz)
               ) || CASE WHEN u.type = 'account.tier_changed' THEN jsonb_build_object(
                   'sequence', u.seq,
                   'previous_tier', u.previous_tier,
                   'reasons', coalesce(tc.reasons, '{}'::jsonb)
               ) ELSE jsonb_build_object(
                   'previous_risk_band', u.previous_band
               ) END
           )
    FROM u
    JOIN accounts a ON a.id = u.account_id
    LEFT JOIN tier_changes tc
           ON u.type = 'account.tier_changed' AND tc.account_id = u.account_id AND tc.seq = u.seq
    RETURNING id, type, account_id
)
INSERT INTO webhook_deliveries (event_id, endpoint_id, next_attempt_at)
SELECT e.id, ep.id, now()
FROM events e
JOIN webhook_endpoints ep ON ep.enabled AND e.type = ANY(ep.event_types)
ORDER BY e.account_id, e.type DESC  -- a tier change before the band change of the same rescore
RETURNING id
"""


def _finite(value: float, digits: int) -> float | None:
    return round(float(value), digits) if math.isfinite(value) else None


def announced_tier_change(previous: str | None, tier: str) -> bool:
    """Whether a change of the published tier is an ``account.tier_changed`` event."""
    return previous != tier and not (previous is None and tier == Tier.standard.value)


def announced_band_change(previous: str | None, band: str | None) -> bool:
    """Whether a move of the risk band is an ``account.risk_band_changed`` event."""
    return previous is not None and band is not None and previous != band


async def record_account_events(
    session: AsyncSession,
    *,
    account_ids: list[int],
    state: AccountState,
    result: Evaluation,
    policy_version: int,
    occurred_at: datetime,
) -> int:
    """Write the events of one scoring transaction (after its ``tier_changes`` rows, whose
    reasons the events carry) and their deliveries; returns how many deliveries."""
    columns: list[list[Any]] = [[] for _ in range(9)]
    for i, account_id in enumerate(account_ids):
        kinds: list[tuple[str, int | None]] = []
        if announced_tier_change(state.tier[i], result.tier[i]):
            kinds.append((TIER_CHANGED, state.tier_change_seq[i] + 1))
        if announced_band_change(state.risk_band[i], result.band[i]):
            kinds.append((BAND_CHANGED, None))
        for kind, seq in kinds:
            row = (
                account_id,
                kind,
                seq,
                state.tier[i],
                result.tier[i],
                _finite(result.score[i], 2),
                _finite(result.risk[i], 4),
                state.risk_band[i],
                result.band[i],
            )
            for column, value in zip(columns, row, strict=True):
                column.append(value)
    if not columns[0]:
        return 0
    connection = await session.connection()
    inserted = await connection.exec_driver_sql(
        _RECORD_ACCOUNT_EVENTS, (*columns, occurred_at, policy_version)
    )
    delivery_ids = [int(row[0]) for row in inserted.all()]
    remember_deliveries(session, delivery_ids)
    return len(delivery_ids)


def remember_deliveries(session: AsyncSession, delivery_ids: list[int]) -> None:
    """Ask the commit point to push these deliveries' jobs once the transaction commits."""
    if delivery_ids:
        pending: set[int] = session.info.setdefault(DELIVER_AFTER_COMMIT, set())
        pending.update(delivery_ids)
