"""Portfolio KPIs for the whole book of accounts and for one key-account manager."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, status
from sqlalchemy import select

from services.api.body import JsonBodyRoute
from services.api.deps import SessionDep, require
from services.api.errors import NotFound, ServiceUnavailable, problems
from services.api.keys.service import Principal
from services.api.portfolio.defection import defection_analysis
from services.api.portfolio.schemas import (
    Defections,
    KpiTrend,
    ManagerPortfolio,
    ParetoCurve,
    Portfolio,
    PortfolioRescore,
)
from services.api.portfolio.service import (
    kpi_trend,
    manager_loads,
    pareto_curve,
    portfolio,
    portfolio_kpis,
    viewer_manager_id,
)
from shared.enums import Scope
from shared.models import Manager
from shared.queue import enqueue_portfolio_pass
from shared.schemas import ExternalId
from shared.settings import Settings

router = APIRouter(prefix="/v1", tags=["portfolio"], route_class=JsonBodyRoute)

Reader = Annotated[Principal, Depends(require(Scope.accounts_read))]
PolicyWriter = Annotated[Principal, Depends(require(Scope.policy_write))]

_DEFINITIONS = """
Definitions (the window is the 12 months up to `evaluated_at`, the last portfolio pass, which
computes the window's figures once for every page instead of on every request; the pass runs
hourly and after bulk loads):

* **revenue_12m**: net amount of placed orders (not cancelled or returned) in the window;
  **gross_profit_12m**: amount minus cost of those orders whose cost is known (an order without
  a cost counts in revenue, not in gross profit). Money is summed as sent, without conversion.
* **tiers**: by the tier published now (overrides included); `unscored` for accounts not yet
  evaluated. Counts include lost accounts; `active_accounts` leaves them out.
* **key_share_of_gross_profit / key_share_of_revenue**: key + strategic over all accounts.
* **retention.rate**: of the accounts with a placed order in the 12 months before the window,
  the share with a placed order in the window too that are not lost now. New accounts of the
  window do not count either way.
* **satisfaction**: the mean of survey answers (1-5) given in the window.
* **at_risk_key_accounts**: active key and strategic accounts in risk band high or critical.
* **manager load**: active key and strategic accounts assigned, against the manager's
  capacity; `over_capacity` when above it.
"""


_PORTFOLIO = """KPIs of the whole book of accounts, as of the last portfolio pass: accounts,
revenue and gross profit per tier, the key accounts' share of them, retention, satisfaction, the
key accounts at risk, and every manager's load. Needs scope `accounts:read`.
"""
_MANAGER_PORTFOLIO = """The portfolio KPIs over the accounts assigned to this manager, with the
manager's load (key and strategic accounts against capacity). An unknown manager is a 404.
Needs scope `accounts:read`.
"""


@router.get(
    "/portfolio",
    summary="Portfolio KPIs",
    description=_PORTFOLIO + _DEFINITIONS,
    responses=problems(401, 403, 503),
)
async def get_portfolio(session: SessionDep, principal: Reader) -> Portfolio:
    """KPIs of the whole book of accounts (the route's description has the definitions)."""
    return await portfolio(session, viewer=principal, now=datetime.now(UTC))


@router.get(
    "/portfolio/pareto",
    summary="The 80/20 curve",
    responses=problems(401, 403, 503),
)
async def get_pareto(session: SessionDep, principal: Reader) -> ParetoCurve:
    """Accounts ranked by gross profit of the 12 months, largest first: the cumulative share
    of gross profit against the share of accounts, and how many accounts make the profit core
    (80% of the gross profit). A key restricted to a manager sees that manager's accounts.
    Needs scope `accounts:read`."""
    manager_id = await viewer_manager_id(session, principal)
    return await pareto_curve(session, manager_id=manager_id)


@router.get(
    "/portfolio/trend",
    summary="The KPIs month by month",
    responses=problems(401, 403, 503),
)
async def get_trend(session: SessionDep, principal: Reader) -> KpiTrend:
    """The last 12 calendar months: revenue and gross profit of each, and from the stored
    evaluations the key accounts, those at risk and their mean risk at the month's end. A key
    restricted to a manager sees that manager's accounts. Needs scope `accounts:read`."""
    manager_id = await viewer_manager_id(session, principal)
    as_of, months = await kpi_trend(session, now=datetime.now(UTC), manager_id=manager_id)
    return KpiTrend(evaluated_at=as_of, months=months)


@router.get(
    "/portfolio/lost",
    summary="Defection analysis",
    responses=problems(401, 403, 503),
)
async def get_lost(session: SessionDep, principal: Reader) -> Defections:
    """The accounts lost in the last 12 months: their churn reasons aggregated (accounts and
    the revenue of the 12 months before each was lost), and for every lost account the risk KAM
    showed 30, 90 and 180 days before it was marked lost (did KAM see it coming?). A key
    restricted to a manager sees that manager's accounts. Needs scope `accounts:read`."""
    manager_id = await viewer_manager_id(session, principal)
    return await defection_analysis(session, now=datetime.now(UTC), manager_id=manager_id)


@router.get(
    "/managers/{external_id}/portfolio",
    summary="A manager's portfolio KPIs",
    description=_MANAGER_PORTFOLIO + _DEFINITIONS,
    responses=problems(401, 403, 404, 422, 503),
)
async def get_manager_portfolio(
    external_id: Annotated[ExternalId, Path(description="The producer's id of the manager.")],
    session: SessionDep,
    principal: Reader,
) -> ManagerPortfolio:
    """The KPIs over one manager's accounts (the route's description has the definitions)."""
    manager_id = await session.scalar(select(Manager.id).where(Manager.external_id == external_id))
    if manager_id is None or principal.manager not in (None, external_id):
        raise NotFound(f"No manager with external_id {external_id!r}.")
    now = datetime.now(UTC)
    kpis = await portfolio_kpis(session, now=now, manager_id=manager_id)
    [load] = await manager_loads(session, manager_id=manager_id)
    return ManagerPortfolio(**dict(kpis), manager=load)


@router.post(
    "/portfolio/rescore",
    summary="Run a portfolio pass now",
    status_code=status.HTTP_202_ACCEPTED,
    responses=problems(401, 403, 503),
)
async def rescore_portfolio(request: Request, _: PolicyWriter) -> PortfolioRescore:
    """Ask the scorer for a portfolio pass now, besides the hourly one: it refits the population
    facts (percentiles, the 80/20 curve, the retention model and its calibration) and rescores
    every account. One pass runs at a time; asking while one is queued or running adds
    nothing. The answer comes at once; the pass runs in the scorer. Needs scope `policy:write`.
    Redis unreachable is a 503 with `Retry-After`: nothing was asked."""
    if not await enqueue_portfolio_pass(request.app.state.redis):
        settings: Settings = request.app.state.settings
        raise ServiceUnavailable(
            "The queue is unreachable; retry later.",
            headers={"Retry-After": str(settings.retry_after_s)},
        )
    return PortfolioRescore(queued=True)
