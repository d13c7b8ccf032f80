"""The API's metrics, request ids in answers, problems and log lines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client import REGISTRY

from shared.settings import Settings
from tests import factories
from tests.live import live_api


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_metrics_count_requests_by_route_template_and_events_by_type(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    route = {"route": "/v1/accounts/{external_id}", "method": "GET"}
    before_get = _sample("kam_http_requests_total", **route, status="200")
    before_404 = _sample("kam_http_requests_total", **route, status="404")
    before_events = _sample("kam_events_ingested_total", type="order", status="accepted")
    before_dupes = _sample("kam_events_ingested_total", type="order", status="duplicate")
    before_hist = _sample("kam_http_request_duration_seconds_count", **route)

    order = factories.order("A-1")
    await client.post("/v1/orders", json=order, headers=admin_headers)
    await client.post("/v1/orders", json=order, headers=admin_headers)
    batch = {"events": [factories.batch_item("order", factories.order("A-2"))]}
    await client.post("/v1/events", json=batch, headers=admin_headers)
    assert (await client.get("/v1/accounts/A-1", headers=admin_headers)).status_code == 200
    assert (await client.get("/v1/accounts/A-404", headers=admin_headers)).status_code == 404

    assert _sample("kam_http_requests_total", **route, status="200") == before_get + 1
    assert _sample("kam_http_requests_total", **route, status="404") == before_404 + 1
    assert _sample("kam_http_request_duration_seconds_count", **route) == before_hist + 2
    assert _sample("kam_events_ingested_total", type="order", status="accepted") == (
        before_events + 2
    )
    assert _sample("kam_events_ingested_total", type="order", status="duplicate") == (
        before_dupes + 1
    )

    scraped = await client.get("/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    text = scraped.text
    assert 'route="/v1/accounts/{external_id}"' in text
    assert "A-404" not in text  # templates, not paths: the label set stays bounded
    assert "kam_http_request_duration_seconds_bucket" in text
    assert "kam_rate_limit_errors_total" in text


async def test_request_id_is_taken_or_made_and_named_in_problems(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    given = await client.get(
        "/v1/accounts/A-404", headers=admin_headers | {"X-Request-ID": "trace-42"}
    )
    assert given.headers["x-request-id"] == "trace-42"
    assert given.headers["content-type"] == "application/problem+json"
    assert given.json()["request_id"] == "trace-42"

    made = await client.post("/v1/orders", json={}, headers=admin_headers)
    assert made.status_code == 422
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    assert made.json()["request_id"] == made.headers["x-request-id"]

    # An id that is not one (spaces, too long) is replaced, never echoed.
    for bad in ("two words", "x" * 200):
        replaced = await client.get("/healthz", headers={"X-Request-ID": bad})
        assert replaced.headers["x-request-id"] != bad
        assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])

    # Problems raised outside the routes (a body over the limit) carry it too.
    big = await client.post(
        "/v1/events",
        content=b"x" * 2_000_000,
        headers=admin_headers | {"X-Request-ID": "big-1", "content-type": "application/json"},
    )
    assert big.status_code == 413
    assert big.json()["request_id"] == "big-1"


def test_every_log_line_of_a_request_names_its_id(settings: Settings, tmp_path: Path) -> None:
    log_file = tmp_path / "api.log"
    with live_api(settings, log_file, KAM_LOG_LEVEL="INFO", KAM_LOG_JSON="true") as url:
        for request_id in ("req-a", "req-b"):
            response = httpx.get(
                f"{url}/v1/accounts", headers={"X-Request-ID": request_id}, timeout=10
            )
            assert response.status_code == 401
    lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]
    during = [line for line in lines if line.get("route") == "/v1/accounts"]
    assert [line["request_id"] for line in during] == ["req-a", "req-b"]
    assert all(line["status"] == 401 for line in during)
    assert all(line["event"] == "request" for line in during)
    # Every line written while a request was served names one (startup lines precede them).
    first = lines.index(next(line for line in lines if "request_id" in line))
    assert all("request_id" in line for line in lines[first:])
