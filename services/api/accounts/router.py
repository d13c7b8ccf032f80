"""Read API for accounts: master data, current score, and what the account bought and said."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, TypeVarTuple

from fastapi import APIRouter, Depends, Path, Query
from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.orm import aliased

from services.api.accounts.schemas import (
    AccountOut,
    AccountPage,
    AccountSummary,
    ContactOut,
    ContactPage,
    Counts,
    InteractionOut,
    InteractionPage,
    OrderOut,
    OrderPage,
    Score,
)
from services.api.deps import SessionDep, require
from services.api.errors import NotFound, problems
from services.api.keys.service import Principal
from services.api.pagination import Cursor, Limit, decode_cursor, encode_cursor
from shared.enums import AccountStatus, RiskBand, Scope, Tier
from shared.models import Account, Contact, Interaction, Manager, Order, Payment
from shared.schemas import ExternalId

Row = TypeVarTuple("Row")
router = APIRouter(prefix="/v1/accounts", tags=["accounts"])

Reader = Annotated[Principal, Depends(require(Scope.accounts_read))]
AccountId = Annotated[ExternalId, Path(description="The producer's id of the account.")]
_ERRORS = problems(401, 403, 404, 422, 503)

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
    region: Annotated[str | None, Query(max_length=100)] = None,
    segment: Annotated[str | None, Query(max_length=100)] = None,
    industry: Annotated[str | None, Query(max_length=100)] = None,
    parent: Annotated[ExternalId | None, Query(description="Subsidiaries of this group.")] = None,
    stub: Annotated[bool | None, Query(description="Only stubs (true) or filled (false).")] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> AccountPage:
    """Lists accounts in a stable order, filtered, one page at a time: follow `next_cursor`
    until it is null. Needs scope `accounts:read`."""
    query = _summary_query().order_by(Account.id).limit(limit + 1)
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
    if cursor is not None:
        (after,) = decode_cursor(cursor, int)
        query = query.where(Account.id > after)
    rows = (await session.execute(query)).all()
    page = rows[:limit]
    return AccountPage(
        items=[AccountSummary.model_validate(_summary(*row)) for row in page],
        next_cursor=encode_cursor(page[-1][0].id) if len(rows) > limit else None,
    )


@router.get("/{external_id}", summary="Get one account", responses=_ERRORS)
async def get_account(external_id: AccountId, session: SessionDep, _: Reader) -> AccountOut:
    """The account's master data, how many orders, contacts, interactions and payments are held,
    and its current tier, score, risk and band (empty until it is first scored). Needs scope
    `accounts:read`."""
    row = (
        await session.execute(_summary_query().where(Account.external_id == external_id))
    ).first()
    if row is None:
        raise NotFound(f"No account with external_id {external_id!r}.")
    account = row[0]

    def count(model: Any) -> Any:
        return select(func.count()).where(model.account_id == account.id).scalar_subquery()

    counts = (
        await session.execute(
            select(count(Order), count(Contact), count(Interaction), count(Payment))
        )
    ).one()
    return AccountOut.model_validate(
        {
            **_summary(*row),
            "credit_limit": account.credit_limit,
            "payment_terms_days": account.payment_terms_days,
            "strategic_fit": account.strategic_fit,
            "churn_reason": account.churn_reason,
            "version": account.source_version,
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
                    "version": o.source_version,
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
    external_id: AccountId, session: SessionDep, _: Reader, limit: Limit = 50, cursor: Cursor = None
) -> InteractionPage:
    """Calls, visits, complaints and surveys of the account, newest first. Needs
    `accounts:read`."""
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
                    "summary": i.summary,
                    "version": i.source_version,
                }
            )
            for i, contact in page
        ],
        next_cursor=(
            encode_cursor(page[-1][0].occurred_at, page[-1][0].id) if len(rows) > limit else None
        ),
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
            "version": c.source_version,
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
