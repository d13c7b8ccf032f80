"""The workspace's pages under ``/app/``, and the API docs served from packaged assets.

Every page calls the same service functions as its JSON twin in ``/v1``; the templates only
format. People sign in with an API key (``accounts:read``); a key restricted to a manager sees
that manager's accounts only, here as in the JSON API.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from starlette.datastructures import FormData

from services.api.accounts import service as accounts
from services.api.accounts.schemas import AccountSort
from services.api.accounts.service import AccountFilters, accounts_csv
from services.api.deps import PORTFOLIO_AFTER_COMMIT, SessionDep
from services.api.errors import BadRequest, NotFound
from services.api.policy.schemas import PolicyDraft
from services.api.portfolio.defection import defection_analysis
from services.api.portfolio.service import (
    kpi_trend,
    manager_loads,
    months_before,
    pareto_curve,
    portfolio,
    unassigned_key_accounts,
    viewer_manager_id,
)
from services.api.web import format as fmt
from services.api.web.assets import STATIC_DIR, STATIC_URL, TEMPLATES_DIR, VENDOR_VERSIONS
from services.api.web.session import (
    CSRF_FIELD,
    CsrfRefused,
    Person,
    SignInRequired,
    check_csrf,
    check_login_csrf,
    end_session,
    login_csrf,
    require_person,
    set_login_cookie,
    signed_in,
    start_session,
)
from services.scorer.policies import active_policy, create_policy_version
from services.scorer.preview import preview_policy
from shared.enums import RiskBand, Scope, Tier
from shared.settings import Settings

router = APIRouter(prefix="/app", include_in_schema=False)
docs_router = APIRouter(include_in_schema=False)

templates = Jinja2Templates(directory=TEMPLATES_DIR)
templates.env.filters.update(
    number=fmt.number,
    money=fmt.money,
    percent=fmt.percent,
    moment=fmt.moment,
    label=fmt.label,
)
templates.env.globals.update(static=STATIC_URL, vendor=VENDOR_VERSIONS)

WORKLIST_PAGE = 50
RISK_BANDS = [band.value for band in RiskBand]
TIERS = [tier.value for tier in Tier]


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def render(
    request: Request,
    name: str,
    person: Person | None,
    context: dict[str, Any],
    *,
    status_code: int = 200,
) -> HTMLResponse:
    return templates.TemplateResponse(
        request,
        name,
        {
            "person": person,
            "principal": person.principal if person else None,
            "csrf_field": CSRF_FIELD,
            "currency": _settings(request).reporting_currency,
            **context,
        },
        status_code=status_code,
    )


def _forbidden(request: Request, person: Person, what: str) -> HTMLResponse:
    return render(request, "forbidden.html", person, {"what": what}, status_code=403)


def install_workspace(app: FastAPI) -> None:
    """Mount the workspace, its static files and the docs, and answer its two signals."""
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(router)
    app.include_router(docs_router)

    async def on_sign_in(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SignInRequired)
        # Back to the page after signing in; a form sent while signed out is not sent again.
        target = exc.next_path if request.method == "GET" else "/app/"
        login = request.url_for("login_page").include_query_params(next=target)
        return RedirectResponse(login.path + "?" + login.query, status_code=303)

    async def on_csrf(request: Request, exc: Exception) -> Response:
        return render(
            request,
            "forbidden.html",
            None,
            {
                "what": "This form was refused: it has expired or did not come from this site. "
                "Go back, reload the page and send it again."
            },
            status_code=403,
        )

    app.add_exception_handler(SignInRequired, on_sign_in)
    app.add_exception_handler(CsrfRefused, on_csrf)


async def _form(request: Request) -> FormData:
    return await request.form(max_files=0, max_fields=50)


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


# -- sign-in -----------------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    # Only a path of the workspace: never another host (an open redirect) or a scheme.
    if target and target.startswith("/app") and not target.startswith("//"):
        return target
    return "/app/"


@router.get("/login", name="login_page", response_class=HTMLResponse)
async def login_page(
    request: Request,
    session: SessionDep,
    next_path: Annotated[str | None, Query(alias="next", max_length=2000)] = None,
) -> Response:
    """The sign-in form: an API key with scope ``accounts:read``."""
    if await signed_in(request, session) is not None:
        return RedirectResponse(_safe_next(next_path), status_code=303)
    return _login_form(request, next_path, None)


def _login_form(
    request: Request, next_path: str | None, error: str | None, status_code: int = 200
) -> Response:
    token, new_cookie = login_csrf(request)
    response = render(
        request,
        "login.html",
        None,
        {"next": _safe_next(next_path), "error": error, "csrf_token": token},
        status_code=status_code,
    )
    if new_cookie is not None:
        set_login_cookie(request, response, new_cookie)
    return response


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, session: SessionDep) -> Response:
    """Exchange an API key for a session cookie."""
    form = await _form(request)
    check_login_csrf(request, _field(form, CSRF_FIELD))
    next_path = _field(form, "next") or None
    api_key = _field(form, "api_key")
    principal = await request.app.state.key_verifier.verify(session, api_key) if api_key else None
    if principal is None:
        return _login_form(
            request,
            next_path,
            "That key is unknown or revoked. Paste the whole key, kam_ and all.",
            status_code=401,
        )
    if not principal.has(Scope.accounts_read):
        return _login_form(
            request,
            next_path,
            "That key cannot read accounts: sign in with a key that has the accounts:read scope.",
            status_code=403,
        )
    response = RedirectResponse(_safe_next(next_path), status_code=303)
    start_session(request, response, principal)
    return response


@router.post("/logout")
async def logout(request: Request, session: SessionDep) -> Response:
    """Sign out: the session cookie is cleared."""
    person = await require_person(request, session)
    check_csrf(person, _field(await _form(request), CSRF_FIELD))
    response = RedirectResponse("/app/login", status_code=303)
    end_session(response)
    return response


# -- portfolio ---------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
async def portfolio_page(request: Request, session: SessionDep) -> Response:
    """KPIs, tier distribution, the 80/20 curve, the tier x band matrix and the trend."""
    person = await require_person(request, session)
    now = datetime.now(UTC)
    kpis = await portfolio(session, viewer=person.principal, now=now)
    manager_id = await viewer_manager_id(session, person.principal)
    pareto = await pareto_curve(session, manager_id=manager_id)
    _, trend = await kpi_trend(session, now=now, manager_id=manager_id)
    key_tiers = [t for t in kpis.tiers if t.tier.value in ("strategic", "key")]
    matrix: dict[str, dict[str, int]] = {}
    for cell in kpis.tier_band_matrix:
        matrix.setdefault(cell.tier.value, {})[cell.risk_band] = cell.accounts
    scored = sum(t.accounts for t in kpis.tiers if t.tier.value != "unscored")
    charts = {
        "tiers": {
            "labels": [fmt.label(t.tier) for t in kpis.tiers],
            "accounts": [t.accounts for t in kpis.tiers],
            "gross_profit": [float(t.gross_profit_12m) for t in kpis.tiers],
        },
        "pareto": {
            "points": [[p.share_of_accounts, p.share_of_gross_profit] for p in pareto.points],
            "core_share": pareto.core_accounts / pareto.accounts if pareto.accounts else None,
        },
        "trend": {
            "months": [m.month.isoformat() for m in trend],
            "to_date": [m.to_date for m in trend],
            "revenue": [float(m.revenue) for m in trend],
            "gross_profit": [float(m.gross_profit) for m in trend],
            "at_risk_key_accounts": [m.at_risk_key_accounts for m in trend],
        },
        "currency": _settings(request).reporting_currency,
    }
    return render(
        request,
        "portfolio.html",
        person,
        {
            "nav": "portfolio",
            "kpis": kpis,
            "key_accounts": sum(t.accounts for t in key_tiers),
            "pareto": pareto,
            "trend": trend,
            "matrix": matrix,
            "bands": [*RISK_BANDS, "none"],
            "scored": scored,
            "charts": charts,
        },
    )


# -- worklist ----------------------------------------------------------------------------------


def _tier(value: str | None) -> Tier | None:
    return Tier(value) if value in TIERS else None


def _band(value: str | None) -> RiskBand | None:
    return RiskBand(value) if value in RISK_BANDS else None


async def _worklist(
    session: SessionDep,
    person: Person,
    manager: str | None,
    tier: str | None,
    band: str | None,
    cursor: str | None,
) -> tuple[AccountFilters, Any]:
    filters = AccountFilters(
        tier=_tier(tier),
        risk_band=_band(band),
        manager=manager or None,
    )
    page = await accounts.list_accounts(
        session,
        viewer=person.principal,
        filters=filters,
        sort=AccountSort.gross_profit_at_risk,
        limit=WORKLIST_PAGE,
        cursor=cursor or None,
    )
    return filters, page


Filter = Annotated[str | None, Query(max_length=128)]
PageCursor = Annotated[str | None, Query(max_length=200)]


@router.get("/worklist", response_class=HTMLResponse)
async def worklist_page(
    request: Request,
    session: SessionDep,
    manager: Filter = None,
    tier: Filter = None,
    band: Filter = None,
    cursor: PageCursor = None,
) -> Response:
    """The accounts to act on, the most expected gross profit at risk first."""
    person = await require_person(request, session)
    try:
        filters, page = await _worklist(session, person, manager, tier, band, cursor)
    except BadRequest:
        return RedirectResponse("/app/worklist", status_code=303)  # a stale or mangled cursor
    manager_id = await viewer_manager_id(session, person.principal)
    managers = await manager_loads(session, manager_id=manager_id) if manager_id != -1 else []
    query = {
        k: v
        for k, v in (
            ("manager", filters.manager),
            ("tier", filters.tier.value if filters.tier else None),
            ("band", filters.risk_band.value if filters.risk_band else None),
        )
        if v
    }
    return render(
        request,
        "worklist.html",
        person,
        {
            "nav": "worklist",
            "filters": filters,
            "page": page,
            "managers": managers,
            "tiers": TIERS,
            "bands": RISK_BANDS,
            "query": query,
            "cursor": cursor,
        },
    )


@router.get("/worklist.csv")
async def worklist_csv(
    request: Request,
    session: SessionDep,
    manager: Filter = None,
    tier: Filter = None,
    band: Filter = None,
    cursor: PageCursor = None,
) -> Response:
    """The worklist page as shown, as CSV (the same rows as ``GET /v1/accounts`` with
    ``Accept: text/csv`` and ``sort=gross_profit_at_risk``)."""
    person = await require_person(request, session)
    _, page = await _worklist(session, person, manager, tier, band, cursor)
    return Response(
        accounts_csv(page.items),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="worklist.csv"'},
    )


# -- one account -------------------------------------------------------------------------------


@router.get("/accounts/{external_id}", response_class=HTMLResponse)
async def account_page(
    request: Request,
    session: SessionDep,
    external_id: str,
    saved: Annotated[str | None, Query(max_length=20)] = None,
) -> Response:
    """One account: tier and why, score, risk and drivers, trends, activity, contacts."""
    person = await require_person(request, session)
    viewer = person.principal
    try:
        detail = await accounts.account_detail(session, viewer=viewer, external_id=external_id)
    except NotFound:
        return render(
            request,
            "not_found.html",
            person,
            {"what": f"No account {external_id!r} that you may see."},
            status_code=404,
        )
    account_id = await accounts.visible_account_id(session, viewer=viewer, external_id=external_id)
    now = datetime.now(UTC)
    history = await accounts.list_history(
        session, account_id=account_id, since=None, until=None, limit=500, cursor=None
    )
    snapshots = list(reversed(history.items))
    monthly = await accounts.orders_by_month(
        session, account_id=account_id, since=months_before(now, 24)
    )
    interactions = await accounts.list_interactions(
        session,
        account_id=account_id,
        limit=200,
        cursor=None,
        with_pii=viewer.has(Scope.pii_read),
    )
    changes = await accounts.list_tier_changes(
        session, account_id=account_id, limit=50, cursor=None
    )
    contacts = await accounts.list_contacts(
        session, viewer=viewer, account_id=account_id, limit=100, cursor=None
    )
    surveys = [i for i in interactions.items if i.kind.value == "survey" and i.satisfaction]
    complaints = [i for i in interactions.items if i.kind.value == "complaint"]
    charts = {
        "history": {
            "at": [s.computed_at.isoformat() for s in snapshots],
            "value_score": [s.value_score for s in snapshots],
            "risk": [
                None if s.risk_probability is None else 100 * s.risk_probability for s in snapshots
            ],
            "revenue_12m": [s.features.get("revenue_12m") for s in snapshots],
        },
        "orders": {
            "months": [m.date().isoformat() for m, _, _, _ in monthly],
            "orders": [n for _, n, _, _ in monthly],
            "revenue": [revenue for _, _, revenue, _ in monthly],
        },
        "timeline": {
            "surveys": [[i.occurred_at.isoformat(), i.satisfaction] for i in surveys],
            "complaints": [[i.occurred_at.isoformat(), i.summary or ""] for i in complaints],
        },
        "currency": monthly[0][3] if monthly else _settings(request).reporting_currency,
    }
    drivers = detail.score.drivers or {}
    return render(
        request,
        "account.html",
        person,
        {
            "nav": "worklist",
            "account": detail,
            "drivers": drivers,
            "snapshots": snapshots,
            "charts": charts,
            "interactions": interactions.items[:12],
            "surveys": surveys,
            "complaints": complaints,
            "changes": changes.items,
            "contacts": contacts,
            "tiers": TIERS,
            "can_override": viewer.has(Scope.tiers_override),
            "saved": saved,
            "today": now.date(),
        },
    )


@router.post("/accounts/{external_id}/override")
async def set_override(request: Request, session: SessionDep, external_id: str) -> Response:
    """Set (action ``set``) or lift (action ``lift``) the account's tier override."""
    person = await require_person(request, session)
    form = await _form(request)
    check_csrf(person, _field(form, CSRF_FIELD))
    if not person.principal.has(Scope.tiers_override):
        return _forbidden(
            request, person, "Setting a tier override needs the tiers:override scope."
        )
    action = _field(form, "action")
    if action == "lift":
        await accounts.set_tier_override(
            session,
            viewer=person.principal,
            external_id=external_id,
            tier=None,
            reason=None,
            expires_at=None,
        )
        return RedirectResponse(f"/app/accounts/{external_id}?saved=lifted", status_code=303)
    tier = _field(form, "tier")
    reason = _field(form, "reason")
    expires = _field(form, "expires_on")
    problems = []
    if tier not in TIERS:
        problems.append("Choose the tier to pin.")
    if not 1 <= len(reason) <= 500:
        problems.append("Give a reason (1 to 500 characters).")
    expires_at = None
    if expires:
        try:
            day = date.fromisoformat(expires)
            expires_at = datetime.combine(day + timedelta(days=1), time(), tzinfo=UTC)
        except ValueError:
            problems.append("The expiry is not a date (YYYY-MM-DD).")
        else:
            if expires_at <= datetime.now(UTC):
                problems.append("The expiry must be in the future.")
    if problems:
        return render(
            request,
            "invalid.html",
            person,
            {"problems": problems, "back": external_id},
            status_code=400,
        )
    await accounts.set_tier_override(
        session,
        viewer=person.principal,
        external_id=external_id,
        tier=Tier(tier),
        reason=reason,
        expires_at=expires_at,
    )
    return RedirectResponse(f"/app/accounts/{external_id}?saved=set", status_code=303)


# -- managers and lost accounts ----------------------------------------------------------------


@router.get("/managers", response_class=HTMLResponse)
async def managers_page(request: Request, session: SessionDep) -> Response:
    """Each manager's key and strategic accounts against capacity; key accounts unassigned
    (the ``managers`` part of ``GET /v1/portfolio``, without the portfolio's KPIs)."""
    person = await require_person(request, session)
    manager_id = await viewer_manager_id(session, person.principal)
    managers = await manager_loads(session, manager_id=manager_id) if manager_id != -1 else []
    unassigned = await unassigned_key_accounts(session) if manager_id is None else 0
    return render(
        request,
        "managers.html",
        person,
        {
            "nav": "managers",
            "managers": managers,
            "over": sum(m.over_capacity for m in managers),
            "unassigned": unassigned,
        },
    )


@router.get("/lost", response_class=HTMLResponse)
async def lost_page(request: Request, session: SessionDep) -> Response:
    """Accounts lost in the last 12 months, why, and whether KAM saw it coming."""
    person = await require_person(request, session)
    manager_id = await viewer_manager_id(session, person.principal)
    analysis = await defection_analysis(session, now=datetime.now(UTC), manager_id=manager_id)
    return render(request, "lost.html", person, {"nav": "lost", "analysis": analysis})


# -- scoring policy ----------------------------------------------------------------------------


async def _policy_context(session: SessionDep) -> dict[str, Any]:
    version, policy = await active_policy(session)
    return {
        "nav": "policy",
        "version": version,
        "policy_json": json.dumps(policy.model_dump(mode="json"), indent=2),
    }


@router.get("/policy", response_class=HTMLResponse)
async def policy_page(
    request: Request,
    session: SessionDep,
    published: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    """The active policy, a draft to preview, and publishing (``admin``, with confirmation)."""
    person = await require_person(request, session)
    context = await _policy_context(session)
    return render(
        request,
        "policy.html",
        person,
        {**context, "draft": context["policy_json"], "published": published},
    )


def _draft(text: str) -> tuple[PolicyDraft | None, list[str]]:
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [f"The draft is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})."]
    try:
        return PolicyDraft.model_validate({"policy": body}), []
    except ValidationError as exc:
        return None, [
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'policy'}: {e['msg']}"
            for e in exc.errors()
        ]


@router.post("/policy", response_class=HTMLResponse)
async def policy_action(request: Request, session: SessionDep) -> Response:
    """``action=preview`` (``policy:write``) shows what the draft would change;
    ``action=publish`` (``admin`` and the confirmation box) makes it the active policy."""
    person = await require_person(request, session)
    form = await _form(request)
    check_csrf(person, _field(form, CSRF_FIELD))
    action = _field(form, "action")
    text = _field(form, "policy")
    context = {**await _policy_context(session), "draft": text, "published": None}
    needed = Scope.admin if action == "publish" else Scope.policy_write
    if not person.principal.has(needed):
        return _forbidden(
            request,
            person,
            "Publishing a policy needs the admin scope."
            if needed is Scope.admin
            else "Previewing a policy needs the policy:write scope.",
        )
    draft, problems = _draft(text)
    if draft is None:
        return render(
            request, "policy.html", person, {**context, "problems": problems}, status_code=400
        )
    if action == "publish":
        if _field(form, "confirm") != "yes":
            return render(
                request,
                "policy.html",
                person,
                {**context, "problems": ["Tick the box to confirm publishing."]},
                status_code=400,
            )
        active_version, active = await active_policy(session)
        if draft.policy == active:
            return RedirectResponse(f"/app/policy?published={active_version}", status_code=303)
        version = await create_policy_version(
            session,
            policy=draft.policy,
            comment=_field(form, "comment")[:500] or None,
            created_by=person.principal.name,
        )
        session.info[PORTFOLIO_AFTER_COMMIT] = True
        return RedirectResponse(f"/app/policy?published={version}", status_code=303)
    # The same evaluation as POST /v1/scoring-policy/preview, undone whatever it touched.
    savepoint = await session.begin_nested()
    try:
        preview = await preview_policy(session, draft=draft.policy)
    finally:
        await savepoint.rollback()
    return render(
        request,
        "policy.html",
        person,
        {**context, "preview": preview.model_dump(mode="json")},
    )


# -- API docs from packaged assets -------------------------------------------------------------


@docs_router.get("/docs", response_class=HTMLResponse)
async def swagger_ui(request: Request) -> Response:
    """Swagger UI, loaded from this server (no CDN)."""
    return templates.TemplateResponse(
        request, "swagger.html", {"openapi_url": request.app.openapi_url}
    )


@docs_router.get("/redoc", response_class=HTMLResponse)
async def redoc(request: Request) -> Response:
    """Redoc, loaded from this server (no CDN)."""
    return templates.TemplateResponse(
        request, "redoc.html", {"openapi_url": request.app.openapi_url}
    )
