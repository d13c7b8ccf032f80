"""The demo portfolio: valid, deterministic, and shaped like a real one (no database needed)."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache
from itertools import pairwise
from statistics import mean, median
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.cli.demo import DemoSendError, generate_portfolio, send_events
from shared.models import Account, Order
from shared.schemas import Event

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
ACCOUNTS = 300


@cache
def _portfolio(seed: int = 11) -> tuple[dict[str, Any], ...]:
    return tuple(generate_portfolio(ACCOUNTS, seed=seed, years=2, now=NOW))


def _of(kind: str, events: tuple[dict[str, Any], ...] | None = None) -> list[dict[str, Any]]:
    return [e for e in (events or _portfolio()) if e["type"] == kind]


def _at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def test_same_seed_gives_the_same_portfolio() -> None:
    first = generate_portfolio(40, seed=3, years=1, now=NOW)
    assert generate_portfolio(40, seed=3, years=1, now=NOW) == first
    assert generate_portfolio(40, seed=4, years=1, now=NOW) != first


def test_every_event_validates_against_the_schema() -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(Event)
    for event in _portfolio():
        adapter.validate_python(event)
        json.dumps(event)  # sent as JSON as it is


def test_event_ids_are_unique() -> None:
    ids = [e["event_id"] for e in _portfolio()]
    assert len(ids) == len(set(ids))


def test_nothing_happens_after_now() -> None:
    for order in _of("order"):
        assert _at(order["ordered_at"]) < NOW
    for interaction in _of("interaction"):
        assert _at(interaction["occurred_at"]) < NOW
    for payment in _of("payment"):
        if "paid_at" in payment:
            assert _at(payment["paid_at"]) < NOW


def test_portfolio_has_every_kind_of_event() -> None:
    accounts = {e["external_id"] for e in _of("account")}
    assert len(accounts) == ACCOUNTS
    assert len(_of("manager")) == ACCOUNTS // 25
    assert len(_of("order")) > 10 * ACCOUNTS
    contacts: dict[str, int] = defaultdict(int)
    for contact in _of("contact"):
        contacts[contact["account_external_id"]] += 1
    assert set(contacts) == accounts
    assert all(1 <= n <= 4 for n in contacts.values())
    kinds = {e["kind"] for e in _of("interaction")}
    assert kinds == {"communication", "complaint", "survey"}


def test_a_fifth_of_the_accounts_bring_most_of_the_profit() -> None:
    profit: dict[str, Decimal] = defaultdict(Decimal)
    for order in _of("order"):
        if order["status"] == "placed":
            profit[order["account_external_id"]] += Decimal(order["amount"]) - Decimal(
                order["cost"]
            )
    ranked = sorted(profit.values(), reverse=True)
    top = sum(ranked[: ACCOUNTS // 5])
    assert top / sum(ranked) >= Decimal("0.6")


def test_margins_differ_by_account() -> None:
    amount: dict[str, Decimal] = defaultdict(Decimal)
    cost: dict[str, Decimal] = defaultdict(Decimal)
    for order in _of("order"):
        amount[order["account_external_id"]] += Decimal(order["amount"])
        cost[order["account_external_id"]] += Decimal(order["cost"])
    margins = [1 - cost[a] / amount[a] for a in amount]
    assert any(m < Decimal("0.1") for m in margins)
    assert any(m > Decimal("0.35") for m in margins)


def test_some_accounts_stop_ordering() -> None:
    last_order: dict[str, datetime] = {}
    for order in _of("order"):
        at = _at(order["ordered_at"])
        account = order["account_external_id"]
        last_order[account] = max(at, last_order.get(account, at))
    silent = [a for a, at in last_order.items() if at < NOW - timedelta(days=120)]
    assert 0.05 * ACCOUNTS <= len(silent) <= 0.3 * ACCOUNTS


def _orders_by_account() -> dict[str, list[tuple[int, Decimal]]]:
    """Each account's (day, amount) of its orders, in time order."""
    orders: dict[str, list[tuple[int, Decimal]]] = defaultdict(list)
    for order in _of("order"):
        day = _at(order["ordered_at"]).date().toordinal()
        orders[order["account_external_id"]].append((day, Decimal(order["amount"])))
    return {account: sorted(days) for account, days in orders.items()}


def _occasions(days: list[int]) -> list[int]:
    """First days of buying occasions: an occasion absorbs the orders within a week."""
    starts: list[int] = []
    for day in days:
        if not starts or day - starts[-1] >= 7:
            starts.append(day)
    return starts


def test_orders_come_in_bursts() -> None:
    """As in real order logs, about a fifth of repeat order days come within a week of the
    previous one, and those close follow-ups are smaller orders (top-ups, split deliveries)."""
    close, within_week, repeat_days = [], 0, 0
    for orders in _orders_by_account().values():
        days = sorted({day for day, _ in orders})
        within_week += sum(b - a <= 7 for a, b in pairwise(days))
        repeat_days += len(days) - 1
        typical = median(amount for _, amount in orders)
        close += [(b[1] / typical, b[0] - a[0] <= 6) for a, b in pairwise(orders)]
    assert 0.1 <= within_week / repeat_days <= 0.35
    after_days = median(share for share, near in close if near)
    after_weeks = median(share for share, near in close if not near)
    assert after_days < Decimal("0.92") * after_weeks


def test_some_accounts_pause_for_months_and_come_back() -> None:
    returned = 0
    for orders in _orders_by_account().values():
        starts = _occasions([day for day, _ in orders])
        gaps = [b - a for a, b in pairwise(starts)]
        if len(gaps) < 4:
            continue
        usual = median(gaps)
        long_gaps = [i for i, gap in enumerate(gaps) if gap > max(120, 4 * usual)]
        # silent for four months and more, then at least two more buying occasions
        returned += bool(long_gaps) and long_gaps[0] <= len(gaps) - 2
    assert 0.05 * ACCOUNTS <= returned <= 0.3 * ACCOUNTS


def test_gaps_lengthen_before_an_account_stops() -> None:
    """Accounts silent for the last five months mostly faded first: their last two gaps between
    buying occasions are longer than their usual gap (on average, in log ratio)."""
    silent_since = NOW.date().toordinal() - 150
    stretches = []
    for orders in _orders_by_account().values():
        starts = _occasions([day for day, _ in orders])
        gaps = [b - a for a, b in pairwise(starts)]
        if len(gaps) >= 6 and starts[-1] < silent_since:
            stretches.append(math.log((gaps[-1] + gaps[-2]) / 2 / median(gaps[:-2])))
    assert len(stretches) >= 10
    assert mean(stretches) > 0.1


def test_orders_dip_in_august_and_peak_at_year_end() -> None:
    months = Counter(_at(order["ordered_at"]).month for order in _of("order"))
    average = sum(months.values()) / 12
    assert months[8] < 0.85 * average
    assert months[11] + months[12] > 2.2 * average


def test_lost_accounts_carry_a_reason_in_a_later_version() -> None:
    first = {e["external_id"]: e for e in _of("account") if e["version"] == 1}
    lost = [e for e in _of("account") if e["status"] == "lost"]
    assert lost
    last_order: dict[str, datetime] = {}
    for order in _of("order"):
        last_order[order["account_external_id"]] = _at(order["ordered_at"])
    for event in lost:
        assert event["version"] == 2
        assert event["churn_reason"]
        assert first[event["external_id"]]["status"] == "active"
        assert last_order[event["external_id"]] < NOW - timedelta(days=60)
    # the update comes after everything else of the account
    events = _portfolio()
    assert events.index(lost[0]) > max(
        i for i, e in enumerate(events) if e.get("account_external_id") == lost[0]["external_id"]
    )


def test_churners_are_less_satisfied_and_complain_more() -> None:
    lost = {e["external_id"] for e in _of("account") if e["status"] == "lost"}
    surveys = [e for e in _of("interaction") if e["kind"] == "survey"]
    assert all(1 <= s["satisfaction"] <= 5 for s in surveys)
    assert all("satisfaction" not in e for e in _of("interaction") if e["kind"] != "survey")
    of_lost = [s["satisfaction"] for s in surveys if s["account_external_id"] in lost]
    of_others = [s["satisfaction"] for s in surveys if s["account_external_id"] not in lost]
    assert mean(of_lost) < mean(of_others) - 0.5
    complaints = [e for e in _of("interaction") if e["kind"] == "complaint"]
    by_lost = sum(c["account_external_id"] in lost for c in complaints) / len(lost)
    by_others = sum(c["account_external_id"] not in lost for c in complaints) / (
        ACCOUNTS - len(lost)
    )
    assert by_lost > 2 * by_others


def test_one_invoice_per_placed_order() -> None:
    placed = {o["external_id"].removeprefix("SO-"): o for o in _of("order")}
    invoices = {p["invoice_external_id"].removeprefix("INV-"): p for p in _of("payment")}
    assert set(invoices) == {k for k, o in placed.items() if o["status"] == "placed"}
    for key, invoice in invoices.items():
        order = placed[key]
        assert invoice["amount"] == order["amount"]
        assert _at(invoice["due_at"]) > _at(order["ordered_at"])
    open_invoices = [p for p in invoices.values() if "paid_at" not in p]
    assert 0 < len(open_invoices) < 0.1 * len(invoices)


def test_subsidiaries_reference_earlier_parent_accounts() -> None:
    accounts = [e for e in _of("account") if e["version"] == 1]
    position = {e["external_id"]: i for i, e in enumerate(accounts)}
    subsidiaries = [e for e in accounts if "parent_external_id" in e]
    assert 0.05 * ACCOUNTS <= len(subsidiaries) <= 0.15 * ACCOUNTS
    for child in subsidiaries:
        parent = child["parent_external_id"]
        assert parent in position
        assert position[parent] < position[child["external_id"]]
        assert "parent_external_id" not in accounts[position[parent]]


def test_managers_are_assigned_to_most_accounts() -> None:
    managers = {e["external_id"] for e in _of("manager")}
    accounts = [e for e in _of("account") if e["version"] == 1]
    managed = [e for e in accounts if "manager_external_id" in e]
    assert len(managed) >= 0.7 * len(accounts)
    assert {e["manager_external_id"] for e in managed} <= managers


async def test_send_events_batches_by_phase() -> None:
    events = generate_portfolio(30, seed=5, years=1, now=NOW)
    batches: list[list[dict[str, Any]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == "Bearer k"
        items = json.loads(request.content)["events"]
        batches.append(items)
        results = [
            {"index": i, "event_id": e["event_id"], "status": "accepted"}
            for i, e in enumerate(items)
        ]
        return httpx.Response(
            202,
            json={
                "accepted": len(items),
                "stale": 0,
                "duplicates": 0,
                "rejected": 0,
                "results": results,
            },
        )

    transport = httpx.MockTransport(handler)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://kam", headers={"Authorization": "Bearer k"}
    ) as client:
        summary = await send_events(client, events, batch_size=100, concurrency=3)

    assert summary.accepted == len(events)
    assert summary.batches == len(batches)
    assert all(len(batch) <= 100 for batch in batches)
    assert sorted(e["event_id"] for b in batches for e in b) == sorted(
        e["event_id"] for e in events
    )
    assert {e["type"] for e in batches[0]} == {"manager"}


async def test_send_events_raises_with_the_problem_detail() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        problem = {"title": "Missing or invalid API key", "status": 401, "detail": "no key"}
        return httpx.Response(401, json=problem)

    async with httpx.AsyncClient(
        transport=httpx.MockTransport(handler), base_url="http://kam"
    ) as client:
        with pytest.raises(DemoSendError, match="401: Missing or invalid API key: no key"):
            await send_events(client, generate_portfolio(5, seed=1, years=1, now=NOW))


async def test_demo_portfolio_goes_through_the_real_api(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    """End to end over HTTP into Postgres: nothing rejected, and a second run only duplicates."""
    events = generate_portfolio(30, seed=3, years=1.0, now=datetime(2026, 11, 1, tzinfo=UTC))
    client.headers.update(admin_headers)
    first = await send_events(client, events, batch_size=400)
    assert first.rejected == 0, first.errors
    assert first.accepted == len(events)
    orders = sum(1 for e in events if e["type"] == "order")
    assert await session.scalar(select(func.count()).select_from(Order)) == orders
    lost = await session.scalar(
        select(func.count()).select_from(Account).where(Account.status == "lost")
    )
    assert lost == sum(1 for e in events if e["type"] == "account" and e.get("status") == "lost")
    again = await send_events(client, events, batch_size=400)
    assert (again.accepted, again.duplicates) == (0, len(events))
