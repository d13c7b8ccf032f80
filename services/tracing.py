"""OpenTelemetry tracing for both processes, off unless the standard ``OTEL_*`` variables ask
for it.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``, or both,
comma-separated) or an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), and ``OTEL_SDK_DISABLED`` is not ``true``. Everything
else is the SDK's own reading of the environment: ``OTEL_SERVICE_NAME`` (default ``kam-api`` /
``kam-scorer``), ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and its argument,
``OTEL_EXPORTER_OTLP_*`` (OTLP over HTTP/protobuf), ``OTEL_BSP_*``.

Instrumented: FastAPI requests (not the probes nor /metrics), SQLAlchemy statements, Redis
commands, httpx requests (webhook deliveries), and each scorer job as a span of its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from sqlalchemy.ext.asyncio import AsyncEngine


def tracing_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name not in ("", "none"):
            raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console)")
    return exporters


def tracer_provider(
    default_service: str,
    *,
    exporter: SpanExporter | None = None,
    environ: Mapping[str, str] = os.environ,
) -> TracerProvider | None:
    """A provider exporting as the environment says, or to ``exporter`` alone (tests); None
    when tracing is off."""
    if exporter is None and not tracing_requested(environ):
        return None
    name = environ.get("OTEL_SERVICE_NAME") or default_service
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        for each in _exporters(environ):
            provider.add_span_processor(BatchSpanProcessor(each))
    return provider


def instrument_clients(provider: TracerProvider, engine: AsyncEngine) -> None:
    """Trace the statements of ``engine`` and every Redis command and httpx request of the
    process (the last two are process-wide)."""
    # The instrumentor declares SQLAlchemy < 2.1; the engine events it listens to are the same
    # in 2.1 (tests/test_tracing.py shows its spans), so its version check is skipped.
    SQLAlchemyInstrumentor().instrument(
        engine=engine.sync_engine, tracer_provider=provider, skip_dep_check=True
    )
    redis = RedisInstrumentor()
    if not redis.is_instrumented_by_opentelemetry:
        redis.instrument(tracer_provider=provider)
    httpx = HTTPXClientInstrumentor()
    if not httpx.is_instrumented_by_opentelemetry:
        httpx.instrument(tracer_provider=provider)


def uninstrument_clients() -> None:
    """Undo ``instrument_clients``' process-wide patches (for tests)."""
    for instrumentor in (RedisInstrumentor(), HTTPXClientInstrumentor(), SQLAlchemyInstrumentor()):
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
