"""The scoring policy: read the active version, publish a new one, preview a draft."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from services.api.deps import PORTFOLIO_AFTER_COMMIT, SessionDep, require
from services.api.errors import problems
from services.api.keys.service import Principal
from services.api.policy.schemas import PolicyDraft, PolicyUpdate, PolicyVersion
from services.scorer.policies import active_policy, create_policy_version
from services.scorer.preview import preview_policy
from shared.enums import Scope
from shared.models import ScoringPolicy as ScoringPolicyRow
from shared.policy import ScoringPolicy
from shared.schemas import PolicyPreview

router = APIRouter(prefix="/v1/scoring-policy", tags=["scoring policy"])

Reader = Annotated[Principal, Depends(require(Scope.accounts_read))]
PolicyWriter = Annotated[Principal, Depends(require(Scope.policy_write))]


async def _version(session: SessionDep, version: int) -> PolicyVersion:
    row = await session.get_one(ScoringPolicyRow, version)
    return PolicyVersion(
        version=row.version,
        active=row.active,
        policy=ScoringPolicy.model_validate(row.body),
        comment=row.comment,
        created_by=row.created_by,
        created_at=row.created_at,
    )


@router.get("", summary="Get the active scoring policy", responses=problems(401, 403, 503))
async def get_policy(session: SessionDep, _: Reader) -> PolicyVersion:
    """The policy the scorer uses now: every weight, gate and threshold, its version, who
    published it, when, and why. On a new installation this is the built-in default, stored as
    version 1. Needs scope `accounts:read`."""
    version, _policy = await active_policy(session)
    return await _version(session, version)


@router.put(
    "", summary="Publish a new scoring policy", responses=problems(400, 401, 403, 413, 422, 503)
)
async def put_policy(
    body: PolicyUpdate, session: SessionDep, principal: PolicyWriter
) -> PolicyVersion:
    """Publishes `policy` as the next version and makes it the active one; the answer is that
    version. Needs scope `policy:write`.

    The body is the whole policy: every field left out takes its documented default, not the
    value of the active version (read it with `GET /v1/scoring-policy` and change what you
    need). It is validated as a whole: unknown fields, values out of range and rules such as
    `strategic_threshold > key_threshold > developing_threshold` answer 422 naming the field.

    After the change is committed a portfolio pass is requested, which rescores every account
    with the new version; tiers and risks follow within minutes (the hourly pass catches up if
    the queue is unreachable). Sending the body of the active version again changes nothing and
    answers the active version as it is (its comment included), so a retried call does not
    publish twice. Try a draft first with `POST /v1/scoring-policy/preview`.
    """
    active_version, active = await active_policy(session)
    if body.policy == active:
        return await _version(session, active_version)
    version = await create_policy_version(
        session, policy=body.policy, comment=body.comment, created_by=principal.name
    )
    session.info[PORTFOLIO_AFTER_COMMIT] = True
    return await _version(session, version)


@router.post(
    "/preview",
    summary="Preview a draft scoring policy",
    responses=problems(400, 401, 403, 413, 422, 503),
)
async def preview(
    body: PolicyDraft,
    session: SessionDep,
    _: PolicyWriter,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="First moved account.")] = 0,
    limit: Annotated[int, Query(ge=1, le=500, description="Moved accounts per page.")] = 50,
) -> PolicyPreview:
    """What `policy` would publish for every account now, beside what the active policy would
    publish at the same moment from the same state (the same hysteresis step and overrides):
    previewing the active policy moves nothing. The answer has how many accounts move between
    which tiers and risk bands, one page of the accounts that move (external id, name, from,
    to, the draft's main reason), and the KPIs under both (accounts, revenue and gross profit
    per tier, the profit share of key + strategic accounts, key accounts per manager against
    capacity). A draft with other risk settings (horizon, occasion window, model, signal
    weights) is evaluated with population facts fitted for it. Writes nothing: no version is
    stored and no account changes.

    Needs scope `policy:write`: a preview evaluates the whole portfolio, which is work worth
    keeping for those who author the policy. The body is the same as for
    `PUT /v1/scoring-policy`, without the comment.
    """
    # Whatever the evaluation touches is undone, so a preview can never publish anything.
    savepoint = await session.begin_nested()
    try:
        return await preview_policy(session, draft=body.policy, offset=offset, limit=limit)
    finally:
        await savepoint.rollback()
