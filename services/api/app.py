"""The FastAPI application: routers, error handlers, limits and the lifespan of its clients."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import TypeAdapter

from services.api.accounts.router import router as accounts_router
from services.api.errors import install_error_handlers
from services.api.health import router as health_router
from services.api.ingest.router import router as ingest_router
from services.api.ingest.schemas import batch_request_schema
from services.api.keys.router import router as keys_router
from services.api.keys.service import KeyVerifier
from services.api.limits import BodySizeLimit
from services.api.policy.router import router as policy_router
from services.api.portfolio.router import router as portfolio_router
from services.api.query import reject_unknown_query_params
from services.api.web.assets import SecurityHeaders
from services.api.web.router import install_workspace
from services.api.webhooks.router import router as webhooks_router
from services.logging import configure_logging
from services.scorer.enqueue import create_redis
from shared.db import create_engine, create_sessionmaker
from shared.schemas import Event
from shared.settings import Environment, Settings, get_settings

DESCRIPTION = """
KAM keeps, for every customer account, its **key-account tier** and its **retention risk**,
computed from the order, contact, interaction and payment events that other systems send here.

* **Authentication**: every call but `/healthz` and `/readyz` needs an API key,
  `Authorization: Bearer kam_...`. Each endpoint names the scope it needs
  (`events:write`, `accounts:read`, `pii:read`, `policy:write`, `tiers:override`,
  `webhooks:manage`, `admin`;
  `admin` grants every other scope). A missing or wrong key answers 401,
  a missing scope 403.
* **Idempotency**: every event carries a client-chosen `event_id`; sending it again is
  acknowledged as a `duplicate` and changes nothing. Entity events also carry a `version`
  (or `updated_at`): an older version arriving late is stored as `stale` and changes nothing.
* **Errors** are `application/problem+json` (RFC 9457) naming each invalid field. Unknown fields
  are rejected. When Postgres is unreachable the API answers 503 with `Retry-After`.
* **Durability**: a 202 means the event is committed in Postgres; scoring follows
  asynchronously.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    if settings.env is Environment.production:
        secret = settings.session_secret.get_secret_value() if settings.session_secret else ""
        if len(secret) < 32:
            raise ValueError(
                "KAM_SESSION_SECRET must be set in production (32+ random characters, e.g. "
                "`openssl rand -hex 32`): it signs the workspace's session cookies"
            )
    configure_logging(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # No pre-ping: it would cost three round trips per request. A connection that died in
        # the pool fails its request with a 503 and takes the pool's older connections with it.
        app.state.engine = create_engine(settings, pre_ping=False)
        app.state.sessionmaker = create_sessionmaker(app.state.engine)
        app.state.redis = create_redis(settings)
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
    app.state.key_verifier = KeyVerifier()
    install_error_handlers(app, retry_after_s=settings.retry_after_s)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(SecurityHeaders)
    for router in (
        health_router,
        ingest_router,
        accounts_router,
        policy_router,
        portfolio_router,
        keys_router,
        webhooks_router,
    ):
        app.include_router(router)
    install_workspace(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
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
    app.openapi_schema = schema
    return schema
