"""Liveness and readiness probes; they need no API key."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    postgres: Literal["ok", "unavailable"] | None = None
    redis: Literal["ok", "unavailable"] | None = None


@router.get("/healthz", summary="Is the process up?")
async def healthz() -> Health:
    """Answers 200 while the process runs; checks nothing else (a liveness probe)."""
    return Health(status="ok")


@router.get(
    "/readyz",
    summary="Can it serve? Postgres and Redis reachable",
    responses={503: {"model": Health, "description": "Postgres or Redis is unreachable."}},
)
async def readyz(request: Request) -> JSONResponse:
    """200 when Postgres and Redis both answer within their timeouts, else 503 with
    `Retry-After` and which of the two is down (a readiness probe)."""
    state = request.app.state

    async def postgres() -> bool:
        try:
            async with state.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    async def redis() -> bool:
        try:
            await state.redis.ping()
        except Exception:
            return False
        return True

    pg_ok, redis_ok = await asyncio.gather(postgres(), redis())
    health = Health(
        status="ok" if pg_ok and redis_ok else "unavailable",
        postgres="ok" if pg_ok else "unavailable",
        redis="ok" if redis_ok else "unavailable",
    )
    ready = health.status == "ok"
    return JSONResponse(
        health.model_dump(),
        status_code=200 if ready else 503,
        headers=None if ready else {"Retry-After": str(state.settings.retry_after_s)},
    )
