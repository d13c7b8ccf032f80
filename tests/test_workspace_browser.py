"""The workspace in a real browser: Playwright driving Debian's Chromium against the API
served by uvicorn on loopback, over a demo portfolio of 200 accounts sent through the API and
scored by a real arq worker. One browser and one demo load serve the whole module.

Screenshots of every page go to ``screenshots/`` (not committed)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from arq.connections import ArqRedis
from fastapi import FastAPI
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.api.keys.service import create_api_key, parse_scopes
from services.cli.demo import generate_portfolio, send_events
from services.scorer.passes import run_portfolio_pass
from services.scorer.worker import create_worker
from shared.db import create_sessionmaker
from shared.models import Base
from shared.settings import Settings

CHROMIUM = os.environ.get("KAM_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "screenshots"
DEMO_ACCOUNTS = 200
# Earlier portfolio passes, as the hourly cron would have run them, so that the trends and
# "did KAM see it coming" have a history to show.
HISTORY_DAYS_AGO = (270, 180, 90, 30)


@pytest.fixture(autouse=True)
def _clean_state() -> None:
    """The module shares one demo portfolio: the per-test truncation is done once, below."""


@dataclass
class Demo:
    base_url: str
    admin_key: str
    reader_key: str
    manager: str
    manager_key: str
    other_account: str
    own_account: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _make_key(
    engine: AsyncEngine, name: str, scopes: list[str], manager: str | None = None
) -> str:
    async with create_sessionmaker(engine)() as session, session.begin():
        _, key = await create_api_key(
            session, name=name, scopes=parse_scopes(scopes), manager=manager
        )
    return key


@pytest.fixture(scope="module")
async def demo(
    app: FastAPI, engine: AsyncEngine, redis: ArqRedis, settings: Settings
) -> AsyncIterator[Demo]:
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    await redis.flushdb()

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.05)
    assert server.started
    base_url = f"http://127.0.0.1:{port}"

    admin_key = await _make_key(engine, "head of sales", ["admin"])
    now = datetime.now(UTC)
    events = generate_portfolio(DEMO_ACCOUNTS, seed=7, years=2.0, now=now)
    headers = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as client:
        summary = await send_events(client, events)
        assert summary.rejected == 0, summary.errors
        sessionmaker = create_sessionmaker(engine)
        for days in HISTORY_DAYS_AGO:
            await run_portfolio_pass(sessionmaker, now=now - timedelta(days=days))
        assert (await client.post("/v1/portfolio/rescore")).status_code == 202
        worker = create_worker(settings, burst=True)
        try:
            await worker.main()
        finally:
            await worker.close()
        accounts = (await client.get("/v1/accounts?sort=gross_profit_at_risk&limit=500")).json()
    managed = [a for a in accounts["items"] if a["manager_external_id"]]
    manager = managed[0]["manager_external_id"]
    other = next(a for a in managed if a["manager_external_id"] != manager)
    yield Demo(
        base_url=base_url,
        admin_key=admin_key,
        reader_key=await _make_key(engine, "reader", ["accounts:read"]),
        manager=manager,
        manager_key=await _make_key(engine, "manager", ["accounts:read"], manager=manager),
        other_account=other["external_id"],
        own_account=managed[0]["external_id"],
    )
    server.should_exit = True
    await serving


def _chromium_installed() -> bool:
    return Path(CHROMIUM).exists()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not _chromium_installed():
        pytest.fail(
            f"Chromium is missing ({CHROMIUM}): install it with `apt-get install -y chromium` "
            "to run the workspace's browser tests.",
            pytrace=False,
        )
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        yield browser
        await browser.close()


@dataclass
class Session:
    context: BrowserContext
    page: Page
    requests: list[str]
    csp_violations: list[str]


async def _open(browser: Browser, demo: Demo, key: str, **options: Any) -> Session:
    context = await browser.new_context(
        base_url=demo.base_url, accept_downloads=True, timezone_id="Europe/Berlin", **options
    )
    page = await context.new_page()
    requests: list[str] = []
    violations: list[str] = []
    context.on("request", lambda r: requests.append(r.url))
    page.on(
        "console",
        lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
    )
    await page.goto("/app/")
    await expect(page).to_have_url(re.compile(r"/app/login\?next="))
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", level=1)).to_contain_text("Portfolio")
    return Session(context, page, requests, violations)


@pytest.fixture(scope="module")
async def head(browser: Browser, demo: Demo) -> AsyncIterator[Session]:
    """The head of sales, signed in with an admin key, at 1280 px."""
    signed_in = await _open(browser, demo, demo.admin_key, viewport={"width": 1280, "height": 900})
    yield signed_in
    await signed_in.context.close()


async def _shot(page: Page, name: str, *, full_page: bool = True) -> None:
    SHOTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


async def _on_a_phone(page: Page, name: str) -> None:
    """Load the page again at a phone's width: it must fit (no sideways scrolling)."""
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.reload()
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"{name} scrolls sideways on a phone: {width} px"
    await _shot(page, f"{name}-phone")
    await page.set_viewport_size({"width": 1280, "height": 900})


async def _chart_drew(page: Page, canvas_id: str) -> tuple[int, int]:
    """(data points in the chart, pixels of its datasets' colours on the canvas)."""
    result = await page.evaluate(
        """(id) => {
            const chart = window.kamCharts && window.kamCharts[id];
            if (!chart) return [0, 0];
            const points = chart.data.datasets.reduce((n, ds) =>
                n + ds.data.filter(v => v !== null && v !== undefined).length, 0);
            const colours = chart.data.datasets.map(ds => {
                const c = ds.borderColor || ds.backgroundColor;
                return [1, 3, 5].map(i => parseInt(c.slice(i, i + 2), 16));
            });
            const canvas = document.getElementById(id);
            const context = canvas.getContext("2d");
            const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
            let coloured = 0;
            for (let i = 0; i < pixels.length; i += 4) {
                if (pixels[i + 3] < 200) continue;
                for (const [r, g, b] of colours) {
                    const distance = Math.abs(pixels[i] - r) + Math.abs(pixels[i + 1] - g)
                        + Math.abs(pixels[i + 2] - b);
                    if (distance < 40) {
                        coloured++; break;
                    }
                }
            }
            return [points, coloured];
        }""",
        canvas_id,
    )
    return int(result[0]), int(result[1])


async def test_portfolio_shows_the_kpis_and_draws_its_charts(head: Session, demo: Demo) -> None:
    page = head.page
    await page.goto("/app/")
    async with httpx.AsyncClient(base_url=demo.base_url) as client:
        kpis = (
            await client.get("/v1/portfolio", headers={"Authorization": f"Bearer {demo.admin_key}"})
        ).json()
    at_risk = f"€{float(kpis['revenue_at_risk_12m']):,.0f}"
    await expect(page.locator('[data-kpi="revenue-at-risk"] .kpi-value')).to_have_text(at_risk)
    assert float(kpis["revenue_at_risk_12m"]) > 0
    keys = sum(t["accounts"] for t in kpis["tiers"] if t["tier"] in ("strategic", "key"))
    await expect(page.locator('[data-kpi="key-accounts"] .kpi-value')).to_have_text(str(keys))
    assert keys > 0
    for chart in ("chart-tiers", "chart-pareto", "chart-trend"):
        points, pixels = await _chart_drew(page, chart)
        assert points > 0, chart
        assert pixels > 50, chart
    # Dates in the browser's time zone (the context runs in Europe/Berlin).
    evaluated = await page.locator("p.muted time").first.text_content()
    assert evaluated is not None
    assert "UTC" not in evaluated
    await _shot(page, "portfolio")
    await _on_a_phone(page, "portfolio")


async def test_matrix_cell_opens_the_filtered_worklist(head: Session) -> None:
    page = head.page
    await page.goto("/app/")
    cell = page.locator("table.matrix a.cell").first
    label = await cell.get_attribute("aria-label")
    count = int((await cell.text_content() or "0").replace(",", ""))
    await cell.click()
    await expect(page).to_have_url(re.compile(r"/app/worklist\?tier=\w+&band=\w+"))
    rows = page.locator("#worklist tbody tr")
    assert await rows.count() == min(count, 50), label


async def test_worklist_filters_and_exports_what_it_shows(head: Session) -> None:
    page = head.page
    await page.goto("/app/worklist")
    rows = page.locator("#worklist tbody tr")
    assert await rows.count() == 50
    assert await page.get_by_role("link", name="Next page").count() == 1
    await _shot(page, "worklist")
    await _on_a_phone(page, "worklist")

    await page.get_by_label("Tier").select_option("key")
    await page.get_by_role("button", name="Apply filters").click()
    await expect(page).to_have_url(re.compile(r"tier=key"))
    shown = await page.locator("#worklist tbody tr").evaluate_all(
        "rows => rows.map(r => [r.dataset.externalId, r.cells[1].textContent.trim()])"
    )
    assert shown
    assert {tier for _, tier in shown} == {"key"}
    at_risk = await page.locator("#worklist tbody tr td:nth-child(7)").all_text_contents()
    values = [float(v.replace("€", "").replace(",", "")) for v in at_risk if "€" in v]
    assert values == sorted(values, reverse=True)  # the most gross profit at risk first

    async with page.expect_download() as info:
        await page.get_by_role("link", name="Export this page as CSV").click()
    download = await info.value
    saved = await download.path()
    exported = list(csv.reader(io.StringIO(await asyncio.to_thread(saved.read_text))))
    assert exported[0][0] == "Account"
    assert [(row[0], row[2]) for row in exported[1:]] == [tuple(s) for s in shown]


async def test_account_page_draws_every_chart_with_data(head: Session) -> None:
    page = head.page
    await page.goto("/app/worklist")
    await page.locator("#worklist tbody tr a").first.click()
    await expect(page.locator('[data-kpi="risk"] .kpi-value')).to_have_text(re.compile(r"\d+\.\d%"))
    await expect(page.get_by_role("heading", name="Why this tier and this risk")).to_be_visible()
    for chart in ("chart-score", "chart-revenue", "chart-orders", "chart-timeline"):
        points, pixels = await _chart_drew(page, chart)
        assert points > 0, chart
        assert pixels > 20, chart
    # Contacts' names are shown to the admin key (pii:read through admin).
    assert await page.locator("text=Names and contact details are shown only").count() == 0
    await _shot(page, "account")
    await _on_a_phone(page, "account")


async def test_set_and_lift_a_tier_override(head: Session, demo: Demo) -> None:
    page = head.page
    await page.goto(f"/app/accounts/{demo.own_account}")
    await page.get_by_label("Pin the tier to").select_option("strategic")
    await page.get_by_label("Reason").fill("board-level partnership signed")
    until = (datetime.now(UTC) + timedelta(days=60)).date().isoformat()
    await page.get_by_label("Until").fill(until)
    await page.get_by_role("button", name="Set override").click()
    await expect(page.get_by_text("Override saved")).to_be_visible()
    pinned = page.get_by_text("Tier pinned by a manager")
    await expect(pinned).to_be_visible()
    await expect(
        page.locator("p.notice", has_text="board-level partnership signed")
    ).to_be_visible()
    await page.get_by_role("button", name="Lift the override").click()
    await expect(page.get_by_text("Override lifted")).to_be_visible()
    await expect(pinned).to_have_count(0)


async def test_managers_lost_and_policy_pages(head: Session) -> None:
    page = head.page
    await page.goto("/app/managers")
    assert await page.locator("#managers tbody tr").count() == DEMO_ACCOUNTS // 25
    await _shot(page, "managers")
    await page.goto("/app/lost")
    await expect(page.get_by_role("heading", name="Did KAM see it coming?")).to_be_visible()
    assert await page.locator("#lost tbody tr").count() > 0
    await _shot(page, "lost")
    await page.goto("/app/policy")
    draft = page.get_by_label("Draft policy")
    policy = json.loads(await draft.input_value())
    policy["tiers"]["key_threshold"] += 10  # a stricter bar for key accounts
    await draft.fill(json.dumps(policy, indent=2))
    await page.get_by_role("button", name="Preview the draft").click()
    await expect(page.get_by_role("heading", name="What this draft would change")).to_be_visible()
    moved = page.locator("#preview tr", has=page.locator("th", has_text="moved total"))
    assert int((await moved.locator("td").first.text_content() or "0").replace(",", "")) > 0
    await expect(page.locator("#preview").get_by_text("tier moves")).to_be_visible()
    await _shot(page, "policy-preview")


async def test_no_request_leaves_the_server_and_the_csp_holds(head: Session, demo: Demo) -> None:
    page = head.page
    for path in ("/app/", "/app/worklist", "/app/managers", "/app/lost", "/app/policy"):
        await page.goto(path)
    await page.goto("/docs")
    await expect(page.locator(".swagger-ui .info .title")).to_contain_text("KAM")
    await _shot(page, "docs", full_page=False)  # the whole API reference is metres long
    await page.goto("/redoc")
    await expect(page.locator("h1").first).to_contain_text("KAM")
    await _shot(page, "redoc", full_page=False)
    foreign = [u for u in head.requests if not u.startswith((demo.base_url, "data:", "blob:"))]
    assert foreign == []
    assert len(head.requests) > 20
    assert head.csp_violations == []


async def test_a_manager_key_sees_only_its_managers_accounts(browser: Browser, demo: Demo) -> None:
    restricted = await _open(
        browser, demo, demo.manager_key, viewport={"width": 1280, "height": 900}
    )
    page = restricted.page
    try:
        await expect(page.get_by_text(f"manager {demo.manager}").first).to_be_visible()
        answer = await page.goto(f"/app/accounts/{demo.other_account}")
        assert answer is not None
        assert answer.status == 404
        await expect(page.get_by_role("heading", name="Not found")).to_be_visible()
        assert (await page.goto(f"/app/accounts/{demo.own_account}")).status == 200  # type: ignore[union-attr]
        await page.goto("/app/worklist")
        managers = await page.locator("#worklist tbody tr td:nth-child(5)").all_text_contents()
        assert managers
        assert set(managers) == {demo.manager}
        auth = {"Authorization": f"Bearer {demo.manager_key}"}
        other = await page.request.get(f"/v1/accounts/{demo.other_account}", headers=auth)
        assert other.status == 404
        own = await page.request.get(f"/v1/accounts/{demo.own_account}", headers=auth)
        assert own.status == 200
    finally:
        await restricted.context.close()


async def test_sign_out_ends_the_session(browser: Browser, demo: Demo) -> None:
    reader = await _open(browser, demo, demo.reader_key)
    page = reader.page
    try:
        cookies = await reader.context.cookies()
        [session_cookie] = [c for c in cookies if c["name"] == "kam_session"]
        assert session_cookie["httpOnly"]
        assert session_cookie["sameSite"] == "Strict"
        await page.get_by_role("button", name="Sign out").click()
        await expect(page).to_have_url(re.compile(r"/app/login$"))
        await _shot(page, "login")
        await page.goto("/app/worklist")
        await expect(page).to_have_url(re.compile(r"/app/login\?next="))
        assert [c for c in await reader.context.cookies() if c["name"] == "kam_session"] == []
    finally:
        await reader.context.close()
