"""The FastAPI application: routers, error handlers, limits and the lifespan of its clients."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from pydantic import TypeAdapter

from services.api.accounts.router import router as accounts_router
from services.api.errors import install_error_handlers, problems
from services.api.health import router as health_router
from services.api.ingest.router import router as ingest_router
from services.api.ingest.schemas import batch_request_schema
from services.api.keys.router import router as keys_router
from services.api.keys.service import KeyVerifier
from services.api.limits import BodySizeLimit
from services.api.observability import RequestContext
from services.api.observability import router as metrics_router
from services.api.policy.router import router as policy_router
from services.api.portfolio.router import router as portfolio_router
from services.api.privacy.router import router as privacy_router
from services.api.query import reject_unknown_query_params
from services.api.ratelimit import RateLimiter
from services.api.web.assets import SecurityHeaders
from services.api.web.router import install_workspace
from services.api.webhooks.router import router as webhooks_router
from services.logging import configure_logging
from services.tracing import instrument_clients, tracer_provider
from shared.db import create_engine, create_sessionmaker
from shared.queue import create_redis
from shared.schemas import Event
from shared.settings import Environment, Settings, get_settings

DESCRIPTION = """
KAM keeps, for every customer account, its **key-account tier** and its **retention risk**,
computed from the order, contact, interaction and payment events that other systems send here.

* **Authentication**: every call but `/healthz`, `/readyz` and `/metrics` needs an API key,
  `Authorization: Bearer kam_...`. Each endpoint names the scope it needs
  (`events:write`, `accounts:read`, `pii:read`, `pii:erase`, `policy:write`, `tiers:override`,
  `webhooks:manage`, `admin`;
  `admin` grants every other scope). A missing or wrong key answers 401,
  a missing scope 403.
* **Idempotency**: every event carries a client-chosen `event_id`; sending the same event again
  is acknowledged as a `duplicate` and changes nothing; the same `event_id` with a different
  body is refused (409, or a `rejected` batch item). An event may carry a `version` (or
  `updated_at`): an older version arriving late is stored as `stale` and changes nothing;
  without either, arrival order decides.
* **Bodies** are JSON in UTF-8 sent as `application/json` (else 415); invalid JSON is named by
  line and column. The key is checked before the body.
* **Errors** are `application/problem+json` (RFC 9457) naming each invalid field, with the
  request's `request_id` (also in `X-Request-ID`). Unknown fields are rejected. When Postgres is
  unreachable the API answers 503 with `Retry-After`; over a rate limit, 429 with
  `Retry-After` and `RateLimit-*` headers.
* **Personal data** (contacts' personal fields, interaction summaries) is returned only with
  `pii:read`; `DELETE /v1/contacts/{external_id}` (`pii:erase`) erases it everywhere.
* **Durability**: a 202 means the event is committed in Postgres; scoring follows
  asynchronously.
"""


def create_app(
    settings: Settings | None = None, *, tracing: TracerProvider | None = None
) -> FastAPI:
    """The API. ``tracing`` overrides the provider the ``OTEL_*`` variables would give (tests
    pass one with an in-memory exporter)."""
    settings = settings or get_settings()
    if settings.env is Environment.production:
        secret = settings.session_secret.get_secret_value() if settings.session_secret else ""
        if len(secret) < 32:
            raise ValueError(
                "KAM_SESSION_SECRET must be set in production (32+ random characters, e.g. "
                "`openssl rand -hex 32`): it signs the workspace's session cookies"
            )
    configure_logging(settings)
    provider = tracing or tracer_provider("kam-api")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # No pre-ping: it would cost three round trips per request. A connection that died in
        # the pool fails its request with a 503 and takes the pool's older connections with it.
        app.state.engine = create_engine(settings, pre_ping=False)
        app.state.sessionmaker = create_sessionmaker(app.state.engine)
        app.state.redis = create_redis(settings)
        if provider is not None:
            instrument_clients(provider, app.state.engine)
        # What exists by now (modules, schemas, the app) lives as long as the process: frozen,
        # it is left out of the collector's full passes, which otherwise walk all of it again
        # every few batches (a fifth of the server's time on 500-event batches).
        gc.freeze()
        try:
            yield
        finally:
            await app.state.redis.aclose()
            await app.state.engine.dispose()

    app = FastAPI(
        title="KAM: key-account management",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(reject_unknown_query_params)],
        # Served by the workspace from packaged assets: the default pages load from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.key_verifier = KeyVerifier(ttl_s=settings.key_cache_ttl_s)
    app.state.rate_limiter = RateLimiter(settings)
    install_error_handlers(app, retry_after_s=settings.retry_after_s)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        read_timeout_s=settings.body_read_timeout_s,
    )
    app.add_middleware(SecurityHeaders)
    app.add_middleware(RequestContext)  # added last: the outermost, it sees every answer
    for router in (
        health_router,
        metrics_router,
        ingest_router,
        accounts_router,
        policy_router,
        portfolio_router,
        privacy_router,
        keys_router,
        webhooks_router,
    ):
        app.include_router(router)
    install_workspace(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    if provider is not None:
        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=provider, excluded_urls="/healthz,/readyz,/metrics"
        )
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema plus the schemas that are documented but validated by hand (the
    batch body is validated item by item, so it cannot be a declared body parameter)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    event = TypeAdapter(Event).json_schema(ref_template="#/components/schemas/{model}")
    components.update(event.pop("$defs", {}))
    components["BatchEvent"] = {**event, "title": "BatchEvent"}
    components["BatchRequest"] = batch_request_schema(app.state.settings.max_batch_events)
    _document_common_problems(schema)
    app.openapi_schema = schema
    return schema


def _document_common_problems(schema: dict[str, Any]) -> None:
    """The answers every operation of a kind can give, documented once here rather than on
    each route: 415 where a body is taken (``JsonBodyRoute``), 401 and 429 where a key is
    needed (authentication and rate limits)."""
    common = problems(401, 415, 429)
    for operations in schema["paths"].values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            wanted = ["415"] if "requestBody" in operation else []
            if operation.get("security"):
                wanted += ["401", "429"]
            for code in wanted:
                if code not in responses:
                    entry = dict(common[int(code)])
                    entry.pop("model")
                    responses[code] = entry
