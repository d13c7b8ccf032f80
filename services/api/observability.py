"""Request ids, access log lines and Prometheus metrics of the API.

Every request gets an id: the caller's ``X-Request-ID`` when it is a sane one (1-128 printable
characters), else a new one. It is answered in ``X-Request-ID``, bound to every log line written
while the request is served (structlog context variables) and set in every problem document.

Metrics (``GET /metrics``, Prometheus text format, no key needed: expose it to the scraper only):
``kam_http_requests_total`` and ``kam_http_request_duration_seconds`` by route template, method
and status; ``kam_events_ingested_total`` by event type and outcome; the rate-limit counters.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable

import structlog
from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.request_id import REQUEST_ID

log = structlog.get_logger("kam.access")

REQUESTS = Counter(
    "kam_http_requests_total",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "kam_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template and method.",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
EVENTS_INGESTED = Counter(
    "kam_events_ingested_total",
    "Ingested events by type and outcome (accepted, stale, duplicate, rejected).",
    ["type", "status"],
)

_SANE_ID = re.compile(r"[\x21-\x7e]{1,128}")
_HEADER = b"x-request-id"


def count_ingested(outcomes: Iterable[tuple[str, str]]) -> None:
    """Count ingested events, each as (type, status)."""
    counts: dict[tuple[str, str], int] = {}
    for key in outcomes:
        counts[key] = counts.get(key, 0) + 1
    for (kind, status), n in counts.items():
        EVENTS_INGESTED.labels(kind, status).inc(n)


class RequestContext:
    """Outermost middleware: the request id, the access log line and the request metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        REQUEST_ID.set(request_id)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500
        header = (_HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            REQUESTS.labels(template, method, str(status)).inc()
            LATENCY.labels(template, method).observe(elapsed)
            log.info(
                "request",
                method=method,
                route=template,
                status=status,
                ms=round(elapsed * 1000, 1),
            )


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == _HEADER:
            text: str = value.decode("latin-1")
            if _SANE_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    """Prometheus metrics of this process."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
