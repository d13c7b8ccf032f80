"""Accounts as the API and the workspace read them, and the one thing a person sets on an
account here, a manager's tier override.

Every reader passes the caller (``viewer``): a key restricted to one manager sees only that
manager's accounts, and any other account is "not found" to it, never "forbidden" (which would
confirm that it exists).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVarTuple

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    func,
    literal_column,
    or_,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from services.api.accounts.schemas import (
    AccountOut,
    AccountPage,
    AccountSort,
    AccountSummary,
    ContactOut,
    ContactPage,
    Counts,
    InteractionOut,
    InteractionPage,
    OrderOut,
    OrderPage,
    Score,
    SnapshotOut,
    SnapshotPage,
    TierChangeOut,
    TierChangePage,
)
from services.api.errors import NotFound
from services.api.ingest.service import mark_dirty
from services.api.keys.service import Principal
from services.api.pagination import decode_cursor, encode_cursor
from shared.enums import AccountStatus, OrderStatus, RiskBand, Scope, Tier
from shared.models import (
    Account,
    Contact,
    Interaction,
    Manager,
    Order,
    Payment,
    ScoreSnapshot,
    TierChange,
)
from shared.schemas import shown_version

Row = TypeVarTuple("Row")
_parent = aliased(Account)


@dataclass(frozen=True, slots=True)
class AccountFilters:
    """The filters of an account list; None means any."""

    tier: Tier | None = None
    risk_band: RiskBand | None = None
    manager: str | None = None
    status: AccountStatus | None = None
    region: str | None = None
    segment: str | None = None
    industry: str | None = None
    parent: str | None = None
    stub: bool | None = None


def _latest_evaluation() -> Any:
    """The figures of an account's latest score snapshot that a list shows beside it: one index
    lookup per listed account (score_snapshots by account and time)."""
    return (
        select(
            ScoreSnapshot.features["revenue_12m"].as_float().label("revenue_12m"),
            ScoreSnapshot.features["gross_profit_12m"].as_float().label("gross_profit_12m"),
            ScoreSnapshot.drivers[("risk", 0, "text")].as_string().label("first_risk_driver"),
        )
        .where(ScoreSnapshot.account_id == Account.id)
        .order_by(ScoreSnapshot.computed_at.desc(), ScoreSnapshot.id.desc())
        .limit(1)
        .lateral("latest")
    )


def visible_to(viewer: Principal) -> ColumnElement[bool]:
    """The accounts ``viewer`` may see: all, or those of the manager its key is restricted to."""
    if viewer.manager is None:
        return true()
    return Account.manager_id.in_(
        select(Manager.id).where(Manager.external_id == viewer.manager).scalar_subquery()
    )


def _summary(
    account: Account,
    manager: str | None,
    parent: str | None,
    revenue: float | None = None,
    gross_profit: float | None = None,
    first_risk_driver: str | None = None,
) -> dict[str, Any]:
    at_risk = (
        account.risk_probability * gross_profit
        if account.risk_probability is not None and gross_profit is not None
        else None
    )
    return {
        "external_id": account.external_id,
        "name": account.name,
        "industry": account.industry,
        "region": account.region,
        "segment": account.segment,
        "status": account.status,
        "stub": account.source_version is None,
        "manager_external_id": manager,
        "parent_external_id": parent,
        "tier": account.tier,
        "risk_band": account.risk_band,
        "risk_probability": account.risk_probability,
        "value_score": account.value_score,
        "revenue_12m": revenue,
        "gross_profit_12m": gross_profit,
        "gross_profit_at_risk": at_risk,
        "first_risk_driver": first_risk_driver,
    }


async def list_accounts(
    session: AsyncSession,
    *,
    viewer: Principal,
    filters: AccountFilters,
    sort: AccountSort,
    limit: int,
    cursor: str | None,
) -> AccountPage:
    """One page of the accounts ``viewer`` may see, filtered, in a stable order; the page's
    ``next_cursor`` continues it (a cursor of another sort is a 400). ``gross_profit_at_risk``
    is the workspace's worklist order: risk times the 12 months' gross profit, largest first."""
    # Unscored accounts have no risk; -1 is below every probability, so they sort last. The
    # worklist's key is written as in the index that serves it (``ix_accounts_worklist``).
    risk = func.coalesce(Account.risk_probability, -1.0)
    at_risk = func.coalesce(Account.gross_profit_at_risk, literal_column("-1"))
    query = (
        select(
            Account,
            Manager.external_id,
            _parent.external_id,
            Account.revenue_12m,
            Account.gross_profit_12m,
            Account.first_risk_driver,
        )
        .outerjoin(Manager, Manager.id == Account.manager_id)
        .outerjoin(_parent, _parent.id == Account.parent_id)
        .where(visible_to(viewer))
        .limit(limit + 1)
    )
    if sort is AccountSort.risk:
        query = query.order_by(risk.desc(), Account.id)
    elif sort is AccountSort.gross_profit_at_risk:
        query = query.order_by(at_risk.desc(), Account.id)
    else:
        query = query.order_by(Account.id)
    query = _filtered(query, filters)
    if cursor is not None and sort is not AccountSort.id:
        key = risk if sort is AccountSort.risk else at_risk
        after, after_id = decode_cursor(cursor, float, int)
        query = query.where(or_(key < after, and_(key == after, Account.id > after_id)))
    elif cursor is not None:
        (after_id,) = decode_cursor(cursor, int)
        query = query.where(Account.id > after_id)
    rows = (await session.execute(query)).all()
    items = [AccountSummary.model_validate(_summary(*row)) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last, last_id = items[-1], rows[limit - 1][0].id
        if sort is AccountSort.risk:
            value = last.risk_probability
            next_cursor = encode_cursor(value if value is not None else -1.0, last_id)
        elif sort is AccountSort.gross_profit_at_risk:
            value = last.gross_profit_at_risk
            next_cursor = encode_cursor(value if value is not None else -1.0, last_id)
        else:
            next_cursor = encode_cursor(last_id)
    return AccountPage(items=items, next_cursor=next_cursor)


def _filtered(query: Select[*Row], filters: AccountFilters) -> Select[*Row]:
    if filters.tier is not None:
        query = query.where(Account.tier == filters.tier.value)
    if filters.risk_band is not None:
        query = query.where(Account.risk_band == filters.risk_band.value)
    if filters.manager is not None:
        query = query.where(Manager.external_id == filters.manager)
    if filters.status is not None:
        query = query.where(Account.status == filters.status.value)
    if filters.region is not None:
        query = query.where(Account.region == filters.region)
    if filters.segment is not None:
        query = query.where(Account.segment == filters.segment)
    if filters.industry is not None:
        query = query.where(Account.industry == filters.industry)
    if filters.parent is not None:
        query = query.where(_parent.external_id == filters.parent)
    if filters.stub is not None:
        query = query.where(
            Account.source_version.is_(None)
            if filters.stub
            else Account.source_version.is_not(None)
        )
    return query


CSV_COLUMNS = (
    ("external_id", "Account"),
    ("name", "Name"),
    ("tier", "Tier"),
    ("risk_percent", "Risk %"),
    ("risk_band", "Band"),
    ("manager_external_id", "Manager"),
    ("gross_profit_12m", "Gross profit 12m"),
    ("gross_profit_at_risk", "Gross profit at risk"),
    ("first_risk_driver", "Main risk driver"),
)


def csv_row(item: AccountSummary) -> list[str]:
    """The row of the worklist and of its CSV export: the same values, in the same order."""

    def money(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    return [
        item.external_id,
        item.name or "",
        item.tier.value if item.tier else "",
        "" if item.risk_probability is None else f"{100 * item.risk_probability:.1f}",
        item.risk_band.value if item.risk_band else "",
        item.manager_external_id or "",
        money(item.gross_profit_12m),
        money(item.gross_profit_at_risk),
        item.first_risk_driver or "",
    ]


def accounts_csv(items: Sequence[AccountSummary]) -> str:
    """A page of accounts as CSV (RFC 4180, header first), the columns of the worklist."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([title for _, title in CSV_COLUMNS])
    for item in items:
        writer.writerow(csv_row(item))
    return out.getvalue()


async def visible_account_id(session: AsyncSession, *, viewer: Principal, external_id: str) -> int:
    """The account's id, or ``NotFound`` when there is none that ``viewer`` may see."""
    account_id = await session.scalar(
        select(Account.id).where(Account.external_id == external_id, visible_to(viewer))
    )
    if account_id is None:
        raise NotFound(f"No account with external_id {external_id!r}.")
    return account_id


async def account_detail(
    session: AsyncSession, *, viewer: Principal, external_id: str
) -> AccountOut:
    """The account's master data, what is held about it, and its current score with reasons."""
    latest = _latest_evaluation()
    row = (
        await session.execute(
            select(
                Account,
                Manager.external_id,
                _parent.external_id,
                latest.c.revenue_12m,
                latest.c.gross_profit_12m,
                latest.c.first_risk_driver,
            )
            .outerjoin(Manager, Manager.id == Account.manager_id)
            .outerjoin(_parent, _parent.id == Account.parent_id)
            .outerjoin(latest, true())
            .where(Account.external_id == external_id, visible_to(viewer))
        )
    ).first()
    if row is None:
        raise NotFound(f"No account with external_id {external_id!r}.")
    account = row[0]

    def count(model: Any) -> Any:
        return select(func.count()).where(model.account_id == account.id).scalar_subquery()

    latest_drivers = (
        select(ScoreSnapshot.drivers)
        .where(ScoreSnapshot.account_id == account.id)
        .order_by(ScoreSnapshot.computed_at.desc(), ScoreSnapshot.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    counts = (
        await session.execute(
            select(count(Order), count(Contact), count(Interaction), count(Payment), latest_drivers)
        )
    ).one()
    return AccountOut.model_validate(
        {
            **_summary(*row),
            "credit_limit": account.credit_limit,
            "payment_terms_days": account.payment_terms_days,
            "strategic_fit": account.strategic_fit,
            "churn_reason": account.churn_reason,
            "version": shown_version(account.source_version),
            "counts": Counts(
                orders=counts[0], contacts=counts[1], interactions=counts[2], payments=counts[3]
            ),
            "score": Score(
                tier=account.tier,
                tier_since=account.tier_since,
                value_score=account.value_score,
                risk_probability=account.risk_probability,
                risk_band=account.risk_band,
                scored_at=account.scored_at,
                tier_override=account.tier_override,
                tier_override_reason=account.tier_override_reason,
                tier_override_expires_at=account.tier_override_expires_at,
                drivers=counts[4],
            ),
            "created_at": account.created_at,
            "updated_at": account.updated_at,
        }
    )


def _newest_first(query: Select[*Row], at: Any, id_: Any, cursor: str | None) -> Select[*Row]:
    if cursor is not None:
        after_at, after_id = decode_cursor(cursor, datetime, int)
        query = query.where(tuple_(at, id_) < tuple_(after_at, after_id))
    return query.order_by(at.desc(), id_.desc())


async def list_orders(
    session: AsyncSession, *, account_id: int, limit: int, cursor: str | None
) -> OrderPage:
    """The account's orders, newest first, with their category lines."""
    query = _newest_first(
        select(Order).where(Order.account_id == account_id), Order.ordered_at, Order.id, cursor
    )
    orders = list(await session.scalars(query.limit(limit + 1)))
    page = orders[:limit]
    return OrderPage(
        items=[
            OrderOut.model_validate(
                {
                    "external_id": o.external_id,
                    "ordered_at": o.ordered_at,
                    "amount": o.amount,
                    "cost": o.cost,
                    "currency": o.currency,
                    "status": o.status,
                    "lines": o.lines,
                    "version": shown_version(o.source_version),
                }
            )
            for o in page
        ],
        next_cursor=encode_cursor(page[-1].ordered_at, page[-1].id)
        if len(orders) > limit
        else None,
    )


async def orders_by_month(
    session: AsyncSession, *, account_id: int, since: datetime
) -> list[tuple[datetime, int, float, str | None]]:
    """Placed orders per calendar month (UTC) since ``since``: (month, orders, revenue,
    currency), oldest first; months without an order are left out."""
    month = func.date_trunc("month", Order.ordered_at, "UTC")
    rows = await session.execute(
        select(month, func.count(), func.sum(Order.amount), func.min(Order.currency))
        .where(
            Order.account_id == account_id,
            Order.status == OrderStatus.placed.value,
            Order.ordered_at >= since,
        )
        .group_by(month)
        .order_by(month)
    )
    return [(m, n, float(revenue), currency) for m, n, revenue, currency in rows]


async def list_interactions(
    session: AsyncSession, *, account_id: int, limit: int, cursor: str | None, with_pii: bool
) -> InteractionPage:
    """Calls, visits, complaints and surveys of the account, newest first; the free-text
    summaries only ``with_pii``."""
    query = _newest_first(
        select(Interaction, Contact.external_id)
        .outerjoin(Contact, Contact.id == Interaction.contact_id)
        .where(Interaction.account_id == account_id),
        Interaction.occurred_at,
        Interaction.id,
        cursor,
    )
    rows = (await session.execute(query.limit(limit + 1))).all()
    page = rows[:limit]
    return InteractionPage(
        items=[
            InteractionOut.model_validate(
                {
                    "external_id": i.external_id,
                    "contact_external_id": contact,
                    "channel": i.channel,
                    "direction": i.direction,
                    "kind": i.kind,
                    "occurred_at": i.occurred_at,
                    "satisfaction": i.satisfaction,
                    "summary": i.summary if with_pii else None,
                    "version": shown_version(i.source_version),
                }
            )
            for i, contact in page
        ],
        next_cursor=(
            encode_cursor(page[-1][0].occurred_at, page[-1][0].id) if len(rows) > limit else None
        ),
        pii_included=with_pii,
    )


async def list_contacts(
    session: AsyncSession, *, viewer: Principal, account_id: int, limit: int, cursor: str | None
) -> ContactPage:
    """The people at the account; their personal data only for a ``viewer`` with
    ``pii:read``."""
    query = select(Contact).where(Contact.account_id == account_id).order_by(Contact.id)
    if cursor is not None:
        (after,) = decode_cursor(cursor, int)
        query = query.where(Contact.id > after)
    contacts = list(await session.scalars(query.limit(limit + 1)))
    page = contacts[:limit]
    with_pii = viewer.has(Scope.pii_read)
    items = []
    for c in page:
        item: dict[str, Any] = {
            "external_id": c.external_id,
            "role": c.role,
            "erased": c.erased_at is not None,
            "version": shown_version(c.source_version),
        }
        if with_pii:
            item |= {
                "name": c.name,
                "email": c.email,
                "phone": c.phone,
                "address": c.address,
                "gender": c.gender,
                "birth_year": c.birth_year,
            }
        items.append(ContactOut.model_validate(item))
    return ContactPage(
        items=items,
        next_cursor=encode_cursor(page[-1].id) if len(contacts) > limit else None,
        pii_included=with_pii,
    )


async def list_history(
    session: AsyncSession,
    *,
    account_id: int,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    cursor: str | None,
) -> SnapshotPage:
    """The account's evaluations, newest first, ``since`` inclusive and ``until`` exclusive."""
    query = select(ScoreSnapshot).where(ScoreSnapshot.account_id == account_id)
    if since is not None:
        query = query.where(ScoreSnapshot.computed_at >= since)
    if until is not None:
        query = query.where(ScoreSnapshot.computed_at < until)
    query = _newest_first(query, ScoreSnapshot.computed_at, ScoreSnapshot.id, cursor)
    snapshots = list(await session.scalars(query.limit(limit + 1)))
    page = snapshots[:limit]
    return SnapshotPage(
        items=[
            SnapshotOut.model_validate(
                {
                    "computed_at": s.computed_at,
                    "policy_version": s.policy_version,
                    "value_score": s.value_score,
                    "tier": s.tier,
                    "risk_probability": s.risk_probability,
                    "risk_band": s.risk_band,
                    "drivers": s.drivers,
                    "features": s.features,
                }
            )
            for s in page
        ],
        next_cursor=encode_cursor(page[-1].computed_at, page[-1].id)
        if len(snapshots) > limit
        else None,
    )


async def list_tier_changes(
    session: AsyncSession, *, account_id: int, limit: int, cursor: str | None
) -> TierChangePage:
    """The account's tier changes, newest first, with their sequence numbers and reasons."""
    query = select(TierChange).where(TierChange.account_id == account_id)
    if cursor is not None:
        (after,) = decode_cursor(cursor, int)
        query = query.where(TierChange.seq < after)
    changes = list(await session.scalars(query.order_by(TierChange.seq.desc()).limit(limit + 1)))
    page = changes[:limit]
    return TierChangePage(
        items=[
            TierChangeOut.model_validate(
                {
                    "seq": c.seq,
                    "from_tier": c.from_tier,
                    "to_tier": c.to_tier,
                    "changed_at": c.changed_at,
                    "reasons": c.reasons,
                }
            )
            for c in page
        ],
        next_cursor=encode_cursor(page[-1].seq) if len(changes) > limit else None,
    )


async def set_tier_override(
    session: AsyncSession,
    *,
    external_id: str,
    tier: Tier | None,
    reason: str | None,
    expires_at: datetime | None,
    viewer: Principal | None = None,
) -> Tier | None:
    """Set (or, with ``tier`` None, lift) the account's tier override and mark the account for
    a rescore, which publishes the tier the override implies. Returns the published tier;
    raises ``NotFound`` for an unknown account (or one ``viewer`` may not see).

    The scorer applies overrides when it rescores, so the account is marked dirty in this
    transaction: if the rescore job is lost after commit, the sweeper still runs it.
    """
    condition = visible_to(viewer) if viewer is not None else true()
    row = (
        await session.execute(
            update(Account)
            .where(Account.external_id == external_id, condition)
            .values(
                tier_override=tier.value if tier is not None else None,
                tier_override_reason=reason,
                tier_override_expires_at=expires_at,
            )
            .returning(Account.id, Account.tier)
        )
    ).first()
    if row is None:
        raise NotFound(f"No account with external_id {external_id!r}.")
    account_id, published = row
    await mark_dirty(session, [account_id])
    return Tier(published) if published is not None else None
