"""OpenTelemetry tracing: off by default, switched on by the standard variables, and what it
records (FastAPI, SQLAlchemy, Redis, httpx, scorer jobs), seen through an in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.api.app import create_app
from services.scorer.observability import ProbeServer
from services.scorer.worker import create_worker
from services.tracing import tracer_provider, tracing_requested, uninstrument_clients
from shared.settings import Settings
from tests import factories


def test_tracing_is_off_unless_the_environment_asks() -> None:
    assert not tracing_requested({})
    assert tracer_provider("kam-api", environ={}) is None
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "console"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert not tracing_requested({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing_requested({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"})
    named = tracer_provider(
        "kam-api", environ={"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "x"}
    )
    assert named is not None
    assert named.resource.attributes["service.name"] == "x"
    with pytest.raises(ValueError, match="unknown exporter"):
        tracer_provider("kam-api", environ={"OTEL_TRACES_EXPORTER": "zipkin-by-carrier-pigeon"})


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    yield memory
    uninstrument_clients()


def _by_kind(spans: tuple[ReadableSpan, ...], scope: str) -> list[ReadableSpan]:
    return [s for s in spans if s.instrumentation_scope and scope in s.instrumentation_scope.name]


async def test_api_requests_are_traced_with_their_statements_and_redis_calls(
    settings: Settings, admin_headers: dict[str, str], exporter: InMemorySpanExporter
) -> None:
    provider = tracer_provider("kam-api", exporter=exporter)
    app = create_app(settings, tracing=provider)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                r = await client.post("/v1/orders", json=factories.order(), headers=admin_headers)
                assert r.status_code == 202
                r = await client.get("/v1/accounts/A-1", headers=admin_headers)
                assert r.status_code == 200
                await client.get("/healthz")
    finally:
        FastAPIInstrumentor.uninstrument_app(app)
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    routes = sorted(str(s.attributes.get("http.route")) for s in servers if s.attributes)
    assert routes == ["/v1/accounts/{external_id}", "/v1/orders"]  # the probe is left out
    sql = _by_kind(spans, "sqlalchemy")
    assert sql, "no SQLAlchemy span"
    redis = _by_kind(spans, "redis")
    assert redis, "no Redis span"
    get_account = next(
        s for s in servers if s.attributes and "{" in str(s.attributes["http.route"])
    )
    assert any(s.context.trace_id == get_account.context.trace_id for s in sql)


async def test_httpx_requests_are_traced(
    settings: Settings, exporter: InMemorySpanExporter
) -> None:
    provider = tracer_provider("kam-scorer", exporter=exporter)
    app = create_app(settings, tracing=provider)  # instruments the process's clients
    async with app.router.lifespan_context(app):
        server = ProbeServer({})  # any real HTTP server on loopback
        await server.start("127.0.0.1", 0)
        try:
            async with httpx.AsyncClient() as client:  # as the webhook sender's
                await client.get(f"http://127.0.0.1:{server.port}/healthz")
        finally:
            await server.stop()
    FastAPIInstrumentor.uninstrument_app(app)
    [span] = _by_kind(exporter.get_finished_spans(), "httpx")
    assert span.kind is SpanKind.CLIENT
    assert (span.attributes or {}).get("http.status_code") == 200


async def test_scorer_jobs_are_traced(
    settings: Settings,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    exporter: InMemorySpanExporter,
) -> None:
    await client.post("/v1/orders", json=factories.order(), headers=admin_headers)
    worker = create_worker(settings, burst=True)
    worker.ctx["tracer_provider"] = tracer_provider("kam-scorer", exporter=exporter)
    try:
        await worker.main()
    finally:
        await worker.close()
    spans = exporter.get_finished_spans()
    jobs = [s for s in spans if s.name == "job rescore_account"]
    assert len(jobs) == 1
    inside = [s for s in _by_kind(spans, "sqlalchemy") if s.parent is not None]
    assert any(s.context.trace_id == jobs[0].context.trace_id for s in inside)
    assert spans[0].resource.attributes["service.name"] == "kam-scorer"
