"""The workspace over HTTP: sign-in and its cookie, CSRF, the security headers, keys restricted
to one manager (pages and JSON), the CSV export, and the JSON twins the pages are built on."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.web import format as fmt
from services.api.web.assets import STATIC_DIR, TEMPLATES_DIR
from services.api.web.session import sign, unsign
from services.scorer.summary import store_portfolio_summaries
from shared.enums import RiskBand, Tier
from shared.models import Account
from shared.settings import Settings
from tests import factories
from tests.conftest import MakeKey
from tests.test_cli import _kam

NOW = datetime.now(UTC)


@pytest.fixture
async def web(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A browser-like client: https (the session cookie is Secure outside development) and no
    automatic redirects, so that each answer can be checked."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as client:
        yield client


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


async def _sign_in(web: httpx.AsyncClient, key: str) -> httpx.Response:
    page = await web.get("/app/login")
    assert page.status_code == 200
    return await web.post(
        "/app/login", data={"api_key": key, "csrf_token": _csrf(page.text), "next": "/app/"}
    )


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name in ("src", "href", "action", "spec-url", "data-openapi-url"):
            if values.get(name):
                self.urls.append(values[name] or "")
        if tag == "script" and "src" not in values and values.get("type") != "application/json":
            self.inline_scripts += 1


def _other_hosts(html: str) -> tuple[list[str], int]:
    parser = _Links()
    parser.feed(html)
    foreign = [u for u in parser.urls if re.match(r"^(?:[a-z][a-z0-9+.-]*:)?//", u, re.I)]
    return foreign, parser.inline_scripts


# -- pure parts --------------------------------------------------------------------------------


def test_signed_values_refuse_forgery_and_expiry() -> None:
    secret = b"s" * 32
    value = sign(secret, {"k": 7, "n": "abc", "e": 2_000})
    assert unsign(secret, value, now=1_000) == {"k": 7, "n": "abc", "e": 2_000}
    assert unsign(secret, value, now=2_001) is None  # expired
    assert unsign(b"t" * 32, value, now=1_000) is None  # another secret
    _body, mac = value.split(".")
    forged = sign(secret, {"k": 8, "n": "abc", "e": 2_000}).split(".")[0] + "." + mac
    assert unsign(secret, forged, now=1_000) is None
    assert unsign(secret, "garbage", now=1_000) is None


def test_people_friendly_formats() -> None:
    assert fmt.money(1234567.8, "EUR") == "€1,234,568"
    assert fmt.money(-2500, "USD") == "-$2,500"
    assert fmt.money(99, "SEK") == "SEK 99"
    assert fmt.percent(0.4213) == "42%"
    assert fmt.percent(0.4213, 1) == "42.1%"
    assert fmt.number(1234567) == "1,234,567"
    assert fmt.money(None) == fmt.percent(None) == fmt.number(None) == "\u2013"
    stamp = fmt.moment(datetime(2026, 3, 4, 5, 6, tzinfo=UTC))
    assert 'datetime="2026-03-04T05:06:00+00:00"' in stamp
    assert "2026-03-04 05:06 UTC" in stamp


def test_own_templates_and_scripts_name_no_other_host() -> None:
    own = [*TEMPLATES_DIR.glob("*.html"), *STATIC_DIR.glob("*.js"), *STATIC_DIR.glob("*.css")]
    assert len(own) >= 10
    for path in own:
        text = path.read_text()
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path.name
        assert "<script>" not in text, f"inline script in {path.name}"


def test_vendored_libraries_carry_their_licences() -> None:
    vendor = STATIC_DIR / "vendor"
    for library, licence in (
        ("chart.js", "LICENSE.md"),
        ("swagger-ui", "LICENSE"),
        ("redoc", "LICENSE"),
    ):
        assert (vendor / library / licence).stat().st_size > 500, library
    assert "4.6.1" in (vendor / "README.md").read_text()
    assert Path(vendor / "chart.js" / "chart.umd.min.js").read_text().startswith("/*!")


# -- headers, sign-in, CSRF --------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/app/login", "/healthz", "/docs", "/redoc", "/app/static/app.js"]
)
async def test_every_answer_carries_a_content_security_policy(
    web: httpx.AsyncClient, path: str
) -> None:
    response = await web.get(path)
    assert response.status_code == 200
    csp = response.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"  # no inline script, no eval, no other host
    assert "http" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_docs_pages_load_only_packaged_assets(web: httpx.AsyncClient) -> None:
    for path in ("/docs", "/redoc"):
        html = (await web.get(path)).text
        foreign, inline = _other_hosts(html)
        assert foreign == [], path
        assert inline == 0, path
        for asset in re.findall(r'(?:src|href)="(/app/static/[^"]+)"', html):
            served = await web.get(asset)
            assert served.status_code == 200, asset
            assert len(served.content) > 100


async def test_pages_send_a_signed_out_person_to_sign_in(web: httpx.AsyncClient) -> None:
    for path in ("/app/", "/app/worklist?tier=key", "/app/accounts/A-1", "/app/policy"):
        response = await web.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/app/login?next=%2Fapp%2F")


async def test_sign_in_sets_a_signed_strict_expiring_cookie_and_sign_out_clears_it(
    web: httpx.AsyncClient, make_key: MakeKey, settings: Settings
) -> None:
    key = await make_key("accounts:read", name="head of sales")
    response = await _sign_in(web, key)
    assert response.status_code == 303
    assert response.headers["location"] == "/app/"
    cookie = next(
        c for c in response.headers.get_list("set-cookie") if c.startswith("kam_session=")
    )
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "secure", "max-age", "path"} <= attributes
    assert "samesite=strict" in cookie.lower()
    assert f"Max-Age={settings.session_ttl_s}" in cookie
    assert key not in cookie  # the key itself never goes into the cookie

    home = await web.get("/app/")
    assert home.status_code == 200
    assert "Signed in as" in home.text
    assert "head of sales" in home.text

    out = await web.post("/app/logout", data={"csrf_token": _csrf(home.text)})
    assert out.status_code == 303
    assert (await web.get("/app/")).status_code == 303


async def test_sign_in_refuses_an_unknown_key_and_a_key_that_cannot_read(
    web: httpx.AsyncClient, make_key: MakeKey
) -> None:
    wrong = await _sign_in(web, "kam_00000000_nothing")
    assert wrong.status_code == 401
    assert "unknown or revoked" in wrong.text
    writer = await make_key("events:write")
    refused = await _sign_in(web, writer)
    assert refused.status_code == 403
    assert "accounts:read" in refused.text
    assert "kam_session" not in refused.headers.get("set-cookie", "")


async def test_forms_without_a_csrf_token_are_refused(
    web: httpx.AsyncClient, make_key: MakeKey, session: AsyncSession
) -> None:
    key = await make_key("accounts:read", "tiers:override", "admin")
    page = await web.get("/app/login")
    no_token = await web.post("/app/login", data={"api_key": key})
    assert no_token.status_code == 403
    wrong = await web.post("/app/login", data={"api_key": key, "csrf_token": "0" * 64})
    assert wrong.status_code == 403
    assert (await web.get("/app/")).status_code == 303  # not signed in

    assert (await _sign_in(web, key)).status_code == 303
    await factories.account_row(session, "A-1", tier=Tier.standard)
    await session.commit()
    override = await web.post(
        "/app/accounts/A-1/override",
        data={"action": "set", "tier": "key", "reason": "strategic partner"},
    )
    assert override.status_code == 403
    assert "did not come from this site" in override.text
    policy = await web.post("/app/policy", data={"action": "publish", "policy": "{}"})
    assert policy.status_code == 403
    logout = await web.post("/app/logout", data={"csrf_token": _csrf(page.text)})
    assert logout.status_code == 403  # the sign-in form's token is not the session's
    assert (await web.get("/app/")).status_code == 200  # still signed in
    session.expire_all()
    account = await session.scalar(select(Account).where(Account.external_id == "A-1"))
    assert account is not None
    assert account.tier_override is None


async def test_override_form_sets_and_lifts(
    web: httpx.AsyncClient, make_key: MakeKey, session: AsyncSession
) -> None:
    await factories.account_row(session, "A-1", tier=Tier.standard)
    await session.commit()
    await _sign_in(web, await make_key("accounts:read", "tiers:override"))
    page = await web.get("/app/accounts/A-1")
    token = _csrf(page.text)
    until = (NOW + timedelta(days=30)).date().isoformat()
    response = await web.post(
        "/app/accounts/A-1/override",
        data={
            "csrf_token": token,
            "action": "set",
            "tier": "key",
            "reason": "signed a frame contract",
            "expires_on": until,
        },
    )
    assert response.status_code == 303
    shown = await web.get(response.headers["location"])
    assert "Tier pinned by a manager" in shown.text
    assert "signed a frame contract" in shown.text
    account = await session.scalar(select(Account).where(Account.external_id == "A-1"))
    assert account is not None
    assert account.tier_override == "key"
    assert account.tier_override_expires_at is not None
    assert account.tier_override_expires_at.date().isoformat() > until

    bad = await web.post(
        "/app/accounts/A-1/override",
        data={"csrf_token": token, "action": "set", "tier": "emperor", "reason": ""},
    )
    assert bad.status_code == 400
    assert "Choose the tier" in bad.text
    assert "Give a reason" in bad.text

    lifted = await web.post(
        "/app/accounts/A-1/override", data={"csrf_token": token, "action": "lift"}
    )
    assert lifted.status_code == 303
    session.expire_all()
    account = await session.scalar(select(Account).where(Account.external_id == "A-1"))
    assert account is not None
    assert account.tier_override is None


async def test_policy_publishing_needs_admin_and_confirmation(
    web: httpx.AsyncClient, make_key: MakeKey
) -> None:
    await _sign_in(web, await make_key("accounts:read", "policy:write"))
    page = await web.get("/app/policy")
    assert page.status_code == 200
    assert "Version <strong>1</strong> is active" in page.text
    token = _csrf(page.text)
    draft = '{"tiers": {"key_threshold": 61.0}}'
    refused = await web.post(
        "/app/policy",
        data={"csrf_token": token, "action": "publish", "policy": draft, "confirm": "yes"},
    )
    assert refused.status_code == 403
    assert "admin scope" in refused.text
    broken = await web.post(
        "/app/policy", data={"csrf_token": token, "action": "preview", "policy": "{tiers"}
    )
    assert broken.status_code == 400
    assert "not JSON" in broken.text

    web.cookies.clear()
    await _sign_in(web, await make_key("admin"))
    token = _csrf((await web.get("/app/policy")).text)
    unconfirmed = await web.post(
        "/app/policy", data={"csrf_token": token, "action": "publish", "policy": draft}
    )
    assert unconfirmed.status_code == 400
    assert "confirm" in unconfirmed.text
    published = await web.post(
        "/app/policy",
        data={"csrf_token": token, "action": "publish", "policy": draft, "confirm": "yes"},
    )
    assert published.status_code == 303
    assert published.headers["location"] == "/app/policy?published=2"
    assert "Version <strong>2</strong> is active" in (await web.get("/app/policy")).text


# -- keys restricted to a manager --------------------------------------------------------------


async def _two_managers(session: AsyncSession) -> None:
    m1 = await factories.manager_row(session, "M-1")
    m2 = await factories.manager_row(session, "M-2")
    for external_id, manager in (("A-1", m1), ("A-2", m1), ("B-1", m2)):
        account = await factories.account_row(
            session,
            external_id,
            tier=Tier.key,
            risk_probability=0.7,
            risk_band=RiskBand.high,
            manager=manager,
        )
        await factories.snapshot_row(session, account, computed_at=NOW - timedelta(hours=1))
        await factories.order_row(
            session, account, amount="1000.00", cost="600.00", ordered_at=NOW - timedelta(days=9)
        )
    await session.commit()
    await store_portfolio_summaries(session, now=NOW)
    await session.commit()


async def test_a_manager_key_sees_lists_and_exports_only_its_accounts(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    await _two_managers(session)
    created = _kam(
        settings,
        "keys",
        "create",
        "--name",
        "m1",
        "--scopes",
        "accounts:read,tiers:override",
        "--manager",
        "M-1",
    )
    assert created.returncode == 0, created.stderr
    assert "restricted to manager M-1" in created.stdout
    headers = {"Authorization": f"Bearer {created.stdout.strip().splitlines()[-1]}"}

    listed = await client.get("/v1/accounts", headers=headers)
    assert [a["external_id"] for a in listed.json()["items"]] == ["A-1", "A-2"]
    exported = await client.get("/v1/accounts", headers={**headers, "Accept": "text/csv"})
    assert exported.headers["content-type"].startswith("text/csv")
    assert [r[0] for r in csv.reader(io.StringIO(exported.text))][1:] == ["A-1", "A-2"]
    for path in ("", "/history", "/orders", "/contacts", "/interactions", "/tier-changes"):
        assert (await client.get(f"/v1/accounts/B-1{path}", headers=headers)).status_code == 404
    assert (await client.get("/v1/accounts/A-1", headers=headers)).status_code == 200
    pinned = await client.put(
        "/v1/accounts/B-1/tier-override", json={"tier": "standard", "reason": "x"}, headers=headers
    )
    assert pinned.status_code == 404
    portfolio = (await client.get("/v1/portfolio", headers=headers)).json()
    assert portfolio["accounts"] == 2
    assert [m["external_id"] for m in portfolio["managers"]] == ["M-1"]
    # The pass's summary of M-1's accounts: two of 400 gross profit each, this month.
    assert Decimal(portfolio["gross_profit_12m"]) == Decimal("800.00")
    curve = (await client.get("/v1/portfolio/pareto", headers=headers)).json()
    assert (curve["accounts"], curve["core_accounts"]) == (2, 2)
    trend = (await client.get("/v1/portfolio/trend", headers=headers)).json()
    assert sum(Decimal(m["gross_profit"]) for m in trend["months"]) == Decimal("800.00")
    assert sum(m["evaluated_accounts"] for m in trend["months"]) == 2
    other = await client.get("/v1/managers/M-2/portfolio", headers=headers)
    assert other.status_code == 404


async def test_a_manager_key_cannot_open_another_managers_account_page(
    web: httpx.AsyncClient, session: AsyncSession, engine: object
) -> None:
    await _two_managers(session)
    from services.api.keys.service import create_api_key, parse_scopes

    _, key = await create_api_key(
        session, name="m2", scopes=parse_scopes(["accounts:read"]), manager="M-2"
    )
    await session.commit()
    await _sign_in(web, key)
    assert (await web.get("/app/accounts/B-1")).status_code == 200
    hidden = await web.get("/app/accounts/A-1")
    assert hidden.status_code == 404
    assert "A-1 GmbH" not in hidden.text
    worklist = await web.get("/app/worklist")
    assert "B-1" in worklist.text
    assert "A-1" not in worklist.text
    exported = await web.get("/app/worklist.csv")
    assert [r[0] for r in csv.reader(io.StringIO(exported.text))][1:] == ["B-1"]


# -- the worklist and its export ---------------------------------------------------------------


async def test_worklist_ranks_by_gross_profit_at_risk_and_exports_what_it_shows(
    web: httpx.AsyncClient, client: httpx.AsyncClient, session: AsyncSession, make_key: MakeKey
) -> None:
    # gross profit 12m x risk: big at low risk, small at high risk, medium at medium risk.
    for external_id, risk, gross_profit in (
        ("BIG", 0.05, 900_000.0),
        ("SMALL", 0.9, 10_000.0),
        ("MID", 0.4, 100_000.0),
    ):
        account = await factories.account_row(
            session, external_id, tier=Tier.key, risk_probability=risk, risk_band=RiskBand.high
        )
        await factories.snapshot_row(
            session,
            account,
            computed_at=NOW,
            features={"revenue_12m": 2 * gross_profit, "gross_profit_12m": gross_profit},
        )
    await factories.account_row(session, "UNSCORED")
    await session.commit()
    key = await make_key("accounts:read")
    headers = {"Authorization": f"Bearer {key}"}
    order = ["BIG", "MID", "SMALL", "UNSCORED"]  # 45,000 / 40,000 / 9,000 / none

    first = await client.get("/v1/accounts?sort=gross_profit_at_risk&limit=2", headers=headers)
    body = first.json()
    assert [a["external_id"] for a in body["items"]] == order[:2]
    assert body["items"][0]["gross_profit_at_risk"] == pytest.approx(45_000.0)
    second = await client.get(
        f"/v1/accounts?sort=gross_profit_at_risk&limit=2&cursor={body['next_cursor']}",
        headers=headers,
    )
    assert [a["external_id"] for a in second.json()["items"]] == order[2:]

    await _sign_in(web, key)
    page = await web.get("/app/worklist")
    shown = re.findall(r'<tr data-external-id="([^"]+)"', page.text)
    assert shown == order
    assert "€45,000" in page.text
    assert "90.0%" in page.text
    exported = await web.get("/app/worklist.csv")
    rows = list(csv.reader(io.StringIO(exported.text)))
    assert rows[0][:4] == ["Account", "Name", "Tier", "Risk %"]
    assert [r[0] for r in rows[1:]] == shown
    assert rows[1][7] == "45000.00"
    api_csv = await client.get(
        "/v1/accounts?sort=gross_profit_at_risk", headers={**headers, "Accept": "text/csv"}
    )
    assert api_csv.text == exported.text

    filtered = await web.get("/app/worklist?tier=key&band=high&manager=")
    assert re.findall(r'<tr data-external-id="([^"]+)"', filtered.text) == order[:3]
    empty = await web.get("/app/worklist?tier=strategic")
    assert "No account matches these filters" in empty.text


# -- the pages, signed in ----------------------------------------------------------------------


async def test_every_page_renders_with_no_other_host_and_no_inline_script(
    web: httpx.AsyncClient, session: AsyncSession, make_key: MakeKey
) -> None:
    await _two_managers(session)
    await _sign_in(web, await make_key("accounts:read", "pii:read", "tiers:override", "admin"))
    for path in (
        "/app/",
        "/app/worklist",
        "/app/accounts/A-1",
        "/app/managers",
        "/app/lost",
        "/app/policy",
        "/app/login",
    ):
        response = await web.get(path, follow_redirects=True)
        assert response.status_code == 200, path
        foreign, inline = _other_hosts(response.text)
        assert foreign == [], (path, foreign)
        assert inline == 0, path


async def test_empty_portfolio_says_what_to_do(web: httpx.AsyncClient, make_key: MakeKey) -> None:
    await _sign_in(web, await make_key("accounts:read"))
    home = await web.get("/app/")
    assert "No accounts yet" in home.text
    assert "POST /v1/events" in home.text
    assert "No account lost in the last 12 months" in (await web.get("/app/lost")).text
    assert "No managers yet" in (await web.get("/app/managers")).text


async def test_lost_accounts_show_the_risk_kam_showed_before(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    body = factories.account(status="lost", churn_reason="price")
    sent = await client.put("/v1/accounts/L-1", json=body, headers=admin_headers)
    assert sent.status_code == 202
    account = await session.scalar(select(Account).where(Account.external_id == "L-1"))
    assert account is not None
    await factories.snapshot_row(
        session, account, computed_at=NOW - timedelta(days=100), risk_probability=0.62
    )
    await factories.snapshot_row(
        session, account, computed_at=NOW - timedelta(days=10), risk_probability=0.95
    )
    await factories.order_row(
        session, account, amount="1500.00", cost="900.00", ordered_at=NOW - timedelta(days=60)
    )
    await session.commit()
    await store_portfolio_summaries(session, now=datetime.now(UTC))
    await session.commit()
    lost = (await client.get("/v1/portfolio/lost", headers=admin_headers)).json()
    assert lost["lost_accounts"] == 1
    assert lost["reasons"] == [{"reason": "price", "accounts": 1, "revenue_12m_lost": "1500.00"}]
    [row] = lost["accounts"]
    assert row["risk_180d_before"] is None  # not evaluated that early
    assert row["risk_90d_before"] == pytest.approx(0.62)
    assert row["risk_30d_before"] == pytest.approx(0.62)


async def test_pareto_curve_marks_the_profit_core(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    # Two accounts bring 8,000 + 1,000 of 10,000 gross profit; eight bring 125 each.
    profits = [8_000, 1_000] + [125] * 8
    for n, profit in enumerate(profits):
        account = await factories.account_row(session, f"P-{n}")
        await factories.order_row(
            session,
            account,
            amount=f"{profit * 2}.00",
            cost=f"{profit}.00",
            ordered_at=NOW - timedelta(days=5),
        )
    await session.commit()
    await store_portfolio_summaries(session, now=NOW)
    await session.commit()
    curve = (await client.get("/v1/portfolio/pareto", headers=admin_headers)).json()
    assert curve["accounts"] == 10
    assert curve["core_accounts"] == 1  # the first account alone brings 80%
    assert curve["points"][0] == {"share_of_accounts": 0.0, "share_of_gross_profit": 0.0}
    assert curve["points"][-1]["share_of_gross_profit"] == pytest.approx(1.0)
    assert curve["points"][1]["share_of_gross_profit"] == pytest.approx(0.8)
    trend = (await client.get("/v1/portfolio/trend", headers=admin_headers)).json()
    assert len(trend["months"]) == 12
    assert sum(float(m["gross_profit"]) for m in trend["months"]) == pytest.approx(10_000)


def test_production_refuses_to_start_without_a_session_secret(settings: Settings) -> None:
    from services.api.app import create_app
    from shared.settings import Environment

    production = settings.model_copy(update={"env": Environment.production})
    with pytest.raises(ValueError, match="KAM_SESSION_SECRET"):
        create_app(production)


def test_make_test_fails_in_one_line_without_chromium() -> None:
    import subprocess

    result = subprocess.run(
        ["make", "-s", "test", "CHROMIUM=/nonexistent/chromium"],  # noqa: S607
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    [line] = [text for text in result.stderr.splitlines() if "Chromium" in text]
    assert "Chromium is missing (/nonexistent/chromium)" in line
    assert "apt-get install -y chromium" in line
    assert "passed" not in result.stdout  # no test ran


async def test_an_api_key_made_over_http_can_be_restricted_to_a_manager(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    await _two_managers(session)
    made = await client.post(
        "/v1/api-keys",
        json={"name": "ana", "scopes": ["accounts:read"], "manager": "M-2"},
        headers=admin_headers,
    )
    assert made.status_code == 201
    assert made.json()["manager"] == "M-2"
    headers = {"Authorization": f"Bearer {made.json()['key']}"}
    listed = await client.get("/v1/accounts", headers=headers)
    assert [a["external_id"] for a in listed.json()["items"]] == ["B-1"]
    keys = (await client.get("/v1/api-keys", headers=admin_headers)).json()
    assert {k["name"]: k["manager"] for k in keys} == {"admin": None, "ana": "M-2"}


async def test_revoking_the_key_ends_its_sessions(
    web: httpx.AsyncClient,
    client: httpx.AsyncClient,
    make_key: MakeKey,
    admin_headers: dict[str, str],
) -> None:
    key = await make_key("accounts:read", name="leaver")
    await _sign_in(web, key)
    assert (await web.get("/app/worklist")).status_code == 200
    assert (await web.get("/app/worklist?cursor=not-a-cursor")).status_code == 303
    prefix = key.split("_")[1]
    revoked = await client.delete(f"/v1/api-keys/{prefix}", headers=admin_headers)
    assert revoked.status_code == 200
    assert (await web.get("/app/worklist")).status_code == 303  # back to sign-in
