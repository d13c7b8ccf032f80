"""Read API for accounts: master data, current score and its history, what the account bought
and said; and the one thing a person sets on an account here, a manager's tier override.

A key restricted to one manager (``kam keys create ... --manager M``) sees, lists and exports
only that manager's accounts; any other answers 404."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status

from services.api.accounts import service
from services.api.accounts.schemas import (
    AccountOut,
    AccountPage,
    AccountSort,
    ContactPage,
    InteractionPage,
    OrderPage,
    SnapshotPage,
    TierChangePage,
    TierOverride,
    TierOverrideIn,
    TierOverrideState,
)
from services.api.accounts.service import AccountFilters, accounts_csv, visible_account_id
from services.api.body import JsonBodyRoute
from services.api.deps import SessionDep, require
from services.api.errors import problems
from services.api.keys.service import Principal
from services.api.pagination import Cursor, Limit
from shared.enums import AccountStatus, RiskBand, Scope, Tier
from shared.schemas import ExternalId, ShortText, Timestamp

router = APIRouter(prefix="/v1/accounts", tags=["accounts"], route_class=JsonBodyRoute)

Reader = Annotated[Principal, Depends(require(Scope.accounts_read))]
Overrider = Annotated[Principal, Depends(require(Scope.tiers_override))]
AccountId = Annotated[ExternalId, Path(description="The producer's id of the account.")]
_ERRORS = problems(400, 401, 403, 404, 422, 503)  # 400: a cursor that is not one
_CSV: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "text/csv": {
                "schema": {"type": "string"},
                "example": "Account,Name,Tier,Risk %,Band,Manager,Gross profit 12m,"
                "Gross profit at risk,Main risk driver\r\n",
            }
        },
        "description": "With `Accept: text/csv`: the page as CSV, the workspace's worklist "
        "columns.",
    }
}


def wants_csv(request: Request) -> bool:
    """Whether the caller asked for CSV (``Accept: text/csv``) rather than JSON."""
    accept = request.headers.get("accept", "")
    return any(part.split(";")[0].strip() == "text/csv" for part in accept.split(","))


@router.get(
    "",
    summary="List accounts",
    response_model=AccountPage,
    responses={**problems(400, 401, 403, 422, 503), **_CSV},
)
async def list_accounts(
    request: Request,
    session: SessionDep,
    principal: Reader,
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
            "risk first, accounts without a risk (not scored yet) last. `gross_profit_at_risk`: "
            "the worklist order, risk times the 12 months' gross profit, largest first."
        ),
    ] = AccountSort.id,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> AccountPage | Response:
    """Lists accounts in a stable order, filtered, one page at a time: follow `next_cursor`
    until it is null, keeping the same filters and `sort` (a cursor of another sort is a 400).
    Filters combine: `?tier=key&risk_band=high&sort=gross_profit_at_risk` is a manager's work
    list of key accounts at risk, the most gross profit at stake first. With `Accept: text/csv`
    the same page comes as CSV (the workspace's worklist export); the next page's cursor is then
    in the `Link` header. A key restricted to a manager lists only that manager's accounts.
    Needs scope `accounts:read`."""
    filters = AccountFilters(
        tier=tier,
        risk_band=risk_band,
        manager=manager,
        status=status,
        region=region,
        segment=segment,
        industry=industry,
        parent=parent,
        stub=stub,
    )
    page = await service.list_accounts(
        session, viewer=principal, filters=filters, sort=sort, limit=limit, cursor=cursor
    )
    if not wants_csv(request):
        return page
    headers = {"Content-Disposition": 'attachment; filename="accounts.csv"'}
    if page.next_cursor is not None:
        following = request.url.include_query_params(cursor=page.next_cursor)
        headers["Link"] = f'<{following}>; rel="next"'
    return Response(accounts_csv(page.items), media_type="text/csv", headers=headers)


@router.get("/{external_id}", summary="Get one account", responses=_ERRORS)
async def get_account(external_id: AccountId, session: SessionDep, principal: Reader) -> AccountOut:
    """The account's master data, how many orders, contacts, interactions and payments are held,
    and its current tier, score, risk and band with the reasons behind them (`score.drivers`,
    from the latest evaluation), and any tier override. The score block is empty until the
    account is first scored. Needs scope `accounts:read`."""
    return await service.account_detail(session, viewer=principal, external_id=external_id)


@router.get("/{external_id}/orders", summary="List an account's orders", responses=_ERRORS)
async def list_orders(
    external_id: AccountId,
    session: SessionDep,
    principal: Reader,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> OrderPage:
    """The account's orders, newest first, with their category lines. Needs `accounts:read`."""
    account_id = await visible_account_id(session, viewer=principal, external_id=external_id)
    return await service.list_orders(session, account_id=account_id, limit=limit, cursor=cursor)


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
    account_id = await visible_account_id(session, viewer=principal, external_id=external_id)
    return await service.list_interactions(
        session,
        account_id=account_id,
        limit=limit,
        cursor=cursor,
        with_pii=principal.has(Scope.pii_read),
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
    account_id = await visible_account_id(session, viewer=principal, external_id=external_id)
    return await service.list_contacts(
        session, viewer=principal, account_id=account_id, limit=limit, cursor=cursor
    )


@router.get(
    "/{external_id}/history",
    summary="List an account's score history",
    responses=problems(400, 401, 403, 404, 422, 503),
)
async def list_history(
    external_id: AccountId,
    session: SessionDep,
    principal: Reader,
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
    account_id = await visible_account_id(session, viewer=principal, external_id=external_id)
    return await service.list_history(
        session, account_id=account_id, since=since, until=until, limit=limit, cursor=cursor
    )


@router.get(
    "/{external_id}/tier-changes",
    summary="List an account's tier changes",
    responses=problems(400, 401, 403, 404, 422, 503),
)
async def list_tier_changes(
    external_id: AccountId,
    session: SessionDep,
    principal: Reader,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> TierChangePage:
    """Every change of the account's published tier, newest first, with its per-account
    sequence number (the `seq` of the `account.tier_changed` webhook) and its reasons. Needs
    scope `accounts:read`."""
    account_id = await visible_account_id(session, viewer=principal, external_id=external_id)
    return await service.list_tier_changes(
        session, account_id=account_id, limit=limit, cursor=cursor
    )


@router.put(
    "/{external_id}/tier-override",
    summary="Pin an account's tier",
    responses=problems(400, 401, 403, 404, 413, 422, 503),
)
async def put_tier_override(
    external_id: AccountId, body: TierOverrideIn, session: SessionDep, principal: Overrider
) -> TierOverrideState:
    """Sets a manager's override: the account is published with `tier` whatever its score,
    until `expires_at` (when given) or until the override is lifted. The `reason` is kept with
    it and shown on the account. A second call replaces the override. Needs scope
    `tiers:override`.

    The account is rescored right after the call; the answer's `tier` is the tier published
    before that rescore, and the override is in effect once `GET /v1/accounts/{external_id}`
    shows it as the tier (a tier change, with its webhook, is recorded if the tier moves).
    """
    published = await service.set_tier_override(
        session,
        viewer=principal,
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
    external_id: AccountId, session: SessionDep, principal: Overrider
) -> Response:
    """Lifts the override: the account's tier is its scored tier again after the rescore that
    follows this call. Lifting when there is none is not an error (204 all the same). Needs
    scope `tiers:override`."""
    await service.set_tier_override(
        session, viewer=principal, external_id=external_id, tier=None, reason=None, expires_at=None
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
