"""Storage of evaluations: the accounts' tier state read (and locked), and the results written
(account figures, snapshots, tier changes and their webhook events) in the caller's
transaction.

Every write of an account's figures comes with its snapshot, and names the population facts it
was computed with (``accounts.population_fit_id``), so that an account's figures are always its
newest snapshot's and a portfolio pass can tell which accounts a concurrent rescore scored with
superseded facts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy.ext.asyncio import AsyncSession

from services.scorer.engine.arrays import FloatArray
from services.scorer.evaluation import AccountState, Evaluation
from services.scorer.features import FeatureTable
from services.scorer.webhook_events import record_account_events

_STATE_COLUMNS = """
SELECT id, tier, computed_tier, tier_demotion_count, tier_override, tier_override_reason,
       tier_override_expires_at, risk_band, tier_change_seq, value_score, risk_probability,
       snapshot_at, tier_basis, population_fit_id, scored_at
FROM accounts"""
_LOCK_STATE = f"{_STATE_COLUMNS} WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE"
_READ_STATE = f"{_STATE_COLUMNS} ORDER BY id"

_INSERT_SNAPSHOTS = """
INSERT INTO score_snapshots (account_id, computed_at, policy_version, features, value_score,
                             tier, risk_probability, risk_band, drivers)
SELECT u.account_id, $2::timestamptz, $3::integer, u.features::jsonb, u.score, u.tier, u.risk,
       u.band, u.drivers::jsonb
FROM unnest($1::bigint[], $4::text[], $5::float8[], $6::text[], $7::float8[], $8::text[],
            $9::text[]) AS u(account_id, features, score, tier, risk, band, drivers)
RETURNING id, account_id
"""

_UPDATE_ACCOUNTS = """
UPDATE accounts a SET
    tier = u.tier,
    tier_since = CASE WHEN a.tier IS DISTINCT FROM u.tier THEN $2::timestamptz
                      ELSE a.tier_since END,
    tier_change_seq = a.tier_change_seq + (a.tier IS DISTINCT FROM u.tier)::int,
    computed_tier = u.computed_tier,
    tier_demotion_count = u.demotion_count,
    value_score = u.score,
    risk_probability = u.risk,
    risk_band = u.band,
    scored_at = $2::timestamptz,
    tier_override = CASE WHEN u.override_expired THEN NULL ELSE a.tier_override END,
    tier_override_reason = CASE WHEN u.override_expired THEN NULL
                                ELSE a.tier_override_reason END,
    tier_override_expires_at = CASE WHEN u.override_expired THEN NULL
                                    ELSE a.tier_override_expires_at END,
    snapshot_at = CASE WHEN u.snapshot THEN $2::timestamptz ELSE a.snapshot_at END,
    tier_basis = u.basis,
    population_fit_id = $12::bigint,
    revenue_12m = CASE WHEN u.snapshot THEN u.revenue ELSE a.revenue_12m END,
    gross_profit_12m = CASE WHEN u.snapshot THEN u.gross_profit ELSE a.gross_profit_12m END,
    first_risk_driver = CASE WHEN u.snapshot THEN u.first_risk_driver
                             ELSE a.first_risk_driver END
FROM unnest($1::bigint[], $3::text[], $4::text[], $5::smallint[], $6::float8[], $7::float8[],
            $8::text[], $9::boolean[], $10::boolean[], $11::integer[], $13::float8[],
            $14::float8[], $15::text[])
     AS u(id, tier, computed_tier, demotion_count, score, risk, band, override_expired, snapshot,
          basis, revenue, gross_profit, first_risk_driver)
WHERE a.id = u.id
"""

_INSERT_TIER_CHANGES = """
INSERT INTO tier_changes (account_id, seq, from_tier, to_tier, changed_at, reasons, snapshot_id)
SELECT u.account_id, u.seq, u.from_tier, u.to_tier, $2::timestamptz, u.reasons::jsonb,
       u.snapshot_id
FROM unnest($1::bigint[], $3::integer[], $4::text[], $5::text[], $6::text[], $7::bigint[])
     AS u(account_id, seq, from_tier, to_tier, reasons, snapshot_id)
"""


_UPDATE_BASIS = """
UPDATE accounts a SET tier_basis = u.basis
FROM unnest($1::bigint[], $2::integer[]) AS u(id, basis)
WHERE a.id = u.id
"""


async def store_basis(
    session: AsyncSession, *, account_ids: Sequence[int], basis: Sequence[int | None]
) -> None:
    """Store only the tier basis of accounts whose figures do not change (see ``evaluation``)."""
    connection = await session.connection()
    await connection.exec_driver_sql(_UPDATE_BASIS, (list(account_ids), list(basis)))


async def lock_state(session: AsyncSession, account_ids: list[int]) -> dict[int, Any]:
    connection = await session.connection()
    result = await connection.exec_driver_sql(_LOCK_STATE, (account_ids,))
    return {row[0]: row for row in result.all()}


async def read_state(session: AsyncSession) -> dict[int, Any]:
    """Every account's stored state, without locks (the pass locks what it writes)."""
    connection = await session.connection()
    result = await connection.exec_driver_sql(_READ_STATE)
    return {row[0]: row for row in result.all()}


def state_for(table: FeatureTable, rows: dict[int, Any]) -> AccountState:
    ordered = [rows.get(int(i)) for i in table.account_id]
    return AccountState(
        tier=[r[1] if r else None for r in ordered],
        computed_tier=[r[2] if r else None for r in ordered],
        demotion_count=np.array([r[3] if r else 0 for r in ordered], dtype=np.int64),
        override_tier=[r[4] if r else None for r in ordered],
        override_reason=[r[5] if r else None for r in ordered],
        override_expires_at=[r[6] if r else None for r in ordered],
        risk_band=[r[7] if r else None for r in ordered],
        tier_change_seq=[r[8] if r else 0 for r in ordered],
        value_score=np.array(
            [r[9] if r and r[9] is not None else math.nan for r in ordered], dtype=np.float64
        ),
        risk_probability=np.array(
            [r[10] if r and r[10] is not None else math.nan for r in ordered], dtype=np.float64
        ),
        snapshot_at=[r[11] if r else None for r in ordered],
        tier_basis=[r[12] if r else None for r in ordered],
        population_fit_id=[r[13] if r else None for r in ordered],
        scored_at=[r[14] if r else None for r in ordered],
    )


def _nullable(values: FloatArray) -> list[float | None]:
    return [None if not math.isfinite(v) else float(v) for v in values]


def _first_risk_driver(drivers: dict[str, Any] | None) -> str | None:
    """The first risk reason in words, as the worklist shows it beside the account."""
    reasons = (drivers or {}).get("risk") or [None]
    text = reasons[0].get("text") if isinstance(reasons[0], dict) else None
    return text if isinstance(text, str) else None


async def store(
    session: AsyncSession,
    *,
    table: FeatureTable,
    state: AccountState,
    result: Evaluation,
    drivers: Sequence[dict[str, Any] | None],
    policy_version: int,
    population_fit_id: int,
    now: datetime,
) -> int:
    """Write account state for every evaluated account, a snapshot for each that has drivers
    (``None`` = no snapshot this time), and the tier changes."""
    ids = [int(i) for i in table.account_id]
    snap = [i for i, d in enumerate(drivers) if d is not None]
    connection = await session.connection()
    snapshot_of: dict[int, int] = {}
    if snap:
        snapshots = await connection.exec_driver_sql(
            _INSERT_SNAPSHOTS,
            (
                [ids[i] for i in snap],
                now,
                policy_version,
                [
                    json.dumps(
                        table.record(i)
                        | {"profit_share_cum": round(float(result.profit_share[i]), 6)}
                    )
                    for i in snap
                ],
                [float(result.score[i]) for i in snap],
                [result.tier[i] for i in snap],
                _nullable(result.risk[snap]),
                [result.band[i] for i in snap],
                [json.dumps(drivers[i]) for i in snap],
            ),
        )
        rows: list[Any] = list(snapshots.all())
        snapshot_of = {int(row[1]): int(row[0]) for row in rows}
    await connection.exec_driver_sql(
        _UPDATE_ACCOUNTS,
        (
            ids,
            now,
            result.tier,
            result.computed_tier,
            [int(c) for c in result.demotion_count],
            [float(s) for s in result.score],
            _nullable(result.risk),
            result.band,
            [bool(e) for e in result.override_expired],
            [d is not None for d in drivers],
            result.tier_basis,
            population_fit_id,
            # The snapshot's figures that the worklist lists and sorts by (see ``Account``).
            _nullable(np.round(table.columns["revenue_12m"], 6)),
            _nullable(np.round(table.columns["gross_profit_12m"], 6)),
            [_first_risk_driver(d) for d in drivers],
        ),
    )
    changed = [i for i in range(len(ids)) if state.tier[i] != result.tier[i]]
    assert all(drivers[i] is not None for i in changed), "a tier change always has a snapshot"
    if changed:
        await connection.exec_driver_sql(
            _INSERT_TIER_CHANGES,
            (
                [ids[i] for i in changed],
                now,
                [state.tier_change_seq[i] + 1 for i in changed],
                [state.tier[i] for i in changed],
                [result.tier[i] for i in changed],
                [
                    json.dumps(
                        {
                            "tier": driver["tier"],
                            **{
                                key: driver[key]
                                for key in ("hysteresis", "override", "status")
                                if key in driver
                            },
                        }
                    )
                    for driver in (drivers[i] for i in changed)
                    if driver is not None
                ],
                [snapshot_of[ids[i]] for i in changed],
            ),
        )
    await record_account_events(
        session,
        account_ids=ids,
        state=state,
        result=result,
        policy_version=policy_version,
        occurred_at=now,
    )
    return len(changed)
