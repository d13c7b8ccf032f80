"""Read API for accounts: master data, current score and its history, what the account bought
and said; and the one thing a person sets on an account here, a manager's tier override."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, TypeVarTuple

from fastapi import APIRouter, Depends, Path, Query, Response, status
from sqlalchemy import Select, and_, func, or_, select, tuple_
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
    TierOverride,
    TierOverrideIn,
    TierOverrideState,
)
from services.api.accounts.service import set_tier_override
from services.api.body import JsonBodyRoute
from services.api.deps import SessionDep, require
from services.api.errors import NotFound, problems
from services.api.keys.service import Principal
from services.api.pagination import Cursor, Limit, decode_cursor, encode_cursor
from shared.enums import AccountStatus, RiskBand, Scope, Tier
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
from shared.schemas import ExternalId, ShortText, Timestamp, shown_version

Row = TypeVarTuple("Row")
router = APIRouter(prefix="/v1/accounts", tags=["accounts"], route_class=JsonBodyRoute)

Reader = Annotated[Principal, Depends(require(Scope.accounts_read))]
Overrider = Annotated[Principal, Depends(require(Scope.tiers_override))]
AccountId = Annotated[ExternalId, Path(description="The producer's id of the account.")]
_ERRORS = problems(400, 401, 403, 404, 422, 503)  # 400: a cursor that is not one

_parent = aliased(Account)


def _summary_query() -> Select[Account, str, str]:
    return (
        select(Account, Manager.external_id, _parent.external_id)
        .outerjoin(Manager, Manager.id == Account.manager_id)
        .outerjoin(_parent, _parent.id == Account.parent_id)
    )


def _summary(account: Account, manager: str | None, parent: str | None) -> dict[str, Any]:
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
    }


async def _account_id(session: SessionDep, external_id: str) -> int:
    account_id = await session.scalar(select(Account.id).where(Account.external_id == external_id))
    if account_id is None:
        raise NotFound(f"No account with external_id {external_id!r}.")
    return account_id


@router.get("", summary="List accounts", responses=problems(400, 401, 403, 422, 503))
async def list_accounts(
    session: SessionDep,
    _: Reader,
    tier: Annotated[Tier | None, Query(description="Only accounts of this tier.")] = None,
    risk_band: Annotated[RiskBand | None, Query(description="Only this risk band.")] = None,
    manager: Annotated[ExternalId | None, Query(description="Manager external id.")] = None,
    status: Annotated[AccountStatus | None, Query()] = None,
    region: Annotated[ShortText | None, Query()] = None,
    segment: Annotated[ShortText | None, Query()] = None,
    industry: Annotated[ShortText | None, Query()] = None,
    parent: Annotated[ExternalId | None, Query(description="Subsidiaries of this group.")] = None,
    stub: Annotated[bool | None, Query(description="Only stubs (true) or filled (false).")] = None,
    sort: Annotated[
        AccountSort,
        Query(
            description="`id`: the order accounts were first seen in. `risk`: highest retention "
            "risk first, accounts without a risk (not scored yet) last."
        ),
    ] = AccountSort.id,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> AccountPage:
    """Lists accounts in a stable order, filtered, one page at a time: follow `next_cursor`
    until it is null, keeping the same filters and `sort` (a cursor of another sort is a 400).
    Filters combine: `?tier=key&risk_band=high&sort=risk` is a manager's work list of key
    accounts at risk, worst first. Needs scope `accounts:read`."""
    # Unscored accounts have no risk; -1 is below every probability, so they sort last.
    risk = func.coalesce(Account.risk_probability, -1.0)
    query = _summary_query().limit(limit + 1)
    if sort is AccountSort.risk:
        query = query.order_by(risk.desc(), Account.id)
    else:
        query = query.order_by(Account.id)
    if tier is not None:
        query = query.where(Account.tier == tier.value)
    if risk_band is not None:
        query = query.where(Account.risk_band == risk_band.value)
    if manager is not None:
        query = query.where(Manager.external_id == manager)
    if status is not None:
        query = query.where(Account.status == status.value)
    if region is not None:
        query = query.where(Account.region == region)
    if segment is not None:
        query = query.where(Account.segment == segment)
    if industry is not None:
        query = query.where(Account.industry == industry)
    if parent is not None:
        query = query.where(_parent.external_id == parent)
    if stub is not None:
        query = query.where(
            Account.source_version.is_(None) if stub else Account.source_version.is_not(None)
        )
    if cursor is not None and sort is AccountSort.risk:
        after_risk, after_id = decode_cursor(cursor, float, int)
        query = query.where(or_(risk < after_risk, and_(risk == after_risk, Account.id > after_id)))
    elif cursor is not None:
        (after,) = decode_cursor(cursor, int)
        query = query.where(Account.id > after)
    rows = (await session.execute(query)).all()
    page = rows[:limit]
    next_cursor = None
    if len(rows) > limit:
        last = page[-1][0]
        next_cursor = (
            encode_cursor(
                last.risk_probability if last.risk_probability is not None else -1.0, last.id
            )
            if sort is AccountSort.risk
            else encode_cursor(last.id)
        )
    return AccountPage(
        items=[AccountSummary.model_validate(_summary(*row)) for row in page],
        next_cursor=next_cursor,
    )


@router.get("/{external_id}", summary="Get one account", responses=_ERRORS)
async def get_account(external_id: AccountId, session: SessionDep, _: Reader) -> AccountOut:
    """The account's master data, how many orders, contacts, interactions and payments are held,
    and its current tier, score, risk and band with the reasons behind them (`score.drivers`,
    from the latest evaluation), and any tier override. The score block is empty until the
    account is first scored. Needs scope `accounts:read`."""
    row = (
        await session.execute(_summary_query().where(Account.external_id == external_id))
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


@router.get("/{external_id}/orders", summary="List an account's orders", responses=_ERRORS)
async def list_orders(
    external_id: AccountId, session: SessionDep, _: Reader, limit: Limit = 50, cursor: Cursor = None
) -> OrderPage:
    """The account's orders, newest first, with their category lines. Needs `accounts:read`."""
    account_id = await _account_id(session, external_id)
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


@router.get(
    "/{external_id}/interactions", summary="List an account's interactions", responses=_ERRORS
)
async def list_interactions(
    external_id: AccountId,
    session: SessionDep,
    principal: Reader,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> InteractionPage:
    """Calls, visits, complaints and surveys of the account, newest first. The free-text
    `summary` may hold personal data: it is included only for keys with scope `pii:read`.
    Needs `accounts:read`."""
    with_pii = principal.has(Scope.pii_read)
    account_id = await _account_id(session, external_id)
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


@router.get("/{external_id}/contacts", summary="List an account's contacts", responses=_ERRORS)
async def list_contacts(
    external_id: AccountId,
    session: SessionDep,
    principal: Reader,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> ContactPage:
    """The people at the account. Their personal data (name, email, phone, address, gender,
    birth year) is included only for keys with scope `pii:read`; others see the role alone.
    Needs `accounts:read`."""
    account_id = await _account_id(session, external_id)
    query = select(Contact).where(Contact.account_id == account_id).order_by(Contact.id)
    if cursor is not None:
        (after,) = decode_cursor(cursor, int)
        query = query.where(Contact.id > after)
    contacts = list(await session.scalars(query.limit(limit + 1)))
    page = contacts[:limit]
    with_pii = principal.has(Scope.pii_read)
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


@router.get(
    "/{external_id}/history",
    summary="List an account's score history",
    responses=problems(400, 401, 403, 404, 422, 503),
)
async def list_history(
    external_id: AccountId,
    session: SessionDep,
    _: Reader,
    since: Annotated[
        Timestamp | None, Query(description="Only evaluations at or after this time.")
    ] = None,
    until: Annotated[
        Timestamp | None, Query(description="Only evaluations before this time.")
    ] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> SnapshotPage:
    """Every evaluation of the account by the scorer, newest first: when, with which policy
    version, the value score, tier, risk and band it gave, why (`drivers`) and on what inputs
    (`features`). This is the account's trend. `since` and `until` bound `computed_at`
    (`since` inclusive, `until` exclusive); keep them the same while following `next_cursor`.
    The tier changes alone, with their reasons, are at `/v1/accounts/{external_id}/tier-changes`.
    Needs scope `accounts:read`."""
    account_id = await _account_id(session, external_id)
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


@router.get(
    "/{external_id}/tier-changes",
    summary="List an account's tier changes",
    responses=problems(400, 401, 403, 404, 422, 503),
)
async def list_tier_changes(
    external_id: AccountId, session: SessionDep, _: Reader, limit: Limit = 50, cursor: Cursor = None
) -> TierChangePage:
    """Every change of the account's published tier, newest first, with its per-account
    sequence number (the `seq` of the `account.tier_changed` webhook) and its reasons. Needs
    scope `accounts:read`."""
    account_id = await _account_id(session, external_id)
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


@router.put(
    "/{external_id}/tier-override",
    summary="Pin an account's tier",
    responses=problems(400, 401, 403, 404, 413, 422, 503),
)
async def put_tier_override(
    external_id: AccountId, body: TierOverrideIn, session: SessionDep, _: Overrider
) -> TierOverrideState:
    """Sets a manager's override: the account is published with `tier` whatever its score,
    until `expires_at` (when given) or until the override is lifted. The `reason` is kept with
    it and shown on the account. A second call replaces the override. Needs scope
    `tiers:override`.

    The account is rescored right after the call; the answer's `tier` is the tier published
    before that rescore, and the override is in effect once `GET /v1/accounts/{external_id}`
    shows it as the tier (a tier change, with its webhook, is recorded if the tier moves).
    """
    published = await set_tier_override(
        session,
        external_id=external_id,
        tier=body.tier,
        reason=body.reason,
        expires_at=body.expires_at,
    )
    return TierOverrideState(
        external_id=external_id,
        tier=published,
        override=TierOverride(tier=body.tier, reason=body.reason, expires_at=body.expires_at),
    )


@router.delete(
    "/{external_id}/tier-override",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Lift an account's tier override",
    responses=problems(401, 403, 404, 422, 503),
)
async def delete_tier_override(
    external_id: AccountId, session: SessionDep, _: Overrider
) -> Response:
    """Lifts the override: the account's tier is its scored tier again after the rescore that
    follows this call. Lifting when there is none is not an error (204 all the same). Needs
    scope `tiers:override`."""
    await set_tier_override(
        session, external_id=external_id, tier=None, reason=None, expires_at=None
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
