"""Request dependencies: the database session (the API's one commit point) and the caller."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.errors import Forbidden, Unauthorized
from services.api.keys.service import Principal
from services.api.ratelimit import RateLimiter, client_address
from shared.enums import Scope
from shared.queue import (
    DELIVER_AFTER_COMMIT,
    enqueue_deliveries,
    enqueue_portfolio_pass,
    enqueue_rescores,
)
from shared.settings import Settings

RESCORE_AFTER_COMMIT = "rescore_account_ids"
PORTFOLIO_AFTER_COMMIT = "portfolio_pass"


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One transaction per request, committed after the endpoint returns and before the answer
    is built (``scope="function"``), so a 2xx always means the data is in Postgres. Jobs asked for
    during the request (rescores, a portfolio pass, webhook deliveries) are pushed only after
    that commit."""
    async with request.app.state.sessionmaker() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        await session.commit()
        account_ids: set[int] = session.info.pop(RESCORE_AFTER_COMMIT, set())
        if account_ids:
            settings: Settings = request.app.state.settings
            await enqueue_rescores(
                request.app.state.redis, account_ids, defer_s=settings.rescore_debounce_s
            )
        if session.info.pop(PORTFOLIO_AFTER_COMMIT, False):
            await enqueue_portfolio_pass(request.app.state.redis)
        deliveries: set[str] = session.info.pop(DELIVER_AFTER_COMMIT, set())
        if deliveries:
            await enqueue_deliveries(request.app.state.redis, deliveries)


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key: `Authorization: Bearer kam_...`. Create one with `kam keys create`.",
)


async def current_principal(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    challenge = {"WWW-Authenticate": "Bearer"}
    limiter: RateLimiter = request.app.state.rate_limiter
    address = client_address(request.client)
    limiter.check_address(address)
    if credentials is None or credentials.scheme.lower() != "bearer":
        await limiter.authentication_failed(address)
        raise Unauthorized("Send an API key as 'Authorization: Bearer <key>'.", headers=challenge)
    principal: Principal | None = await request.app.state.key_verifier.verify(
        session, credentials.credentials
    )
    if principal is None:
        await limiter.authentication_failed(address)
        raise Unauthorized("The API key is unknown or revoked.", headers=challenge)
    await limiter.check_key(principal.key_id, request.method)
    return principal


CurrentKey = Annotated[Principal, Depends(current_principal)]


def require(scope: Scope) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency that lets the call through only with ``scope`` (or ``admin``)."""

    async def check(principal: CurrentKey) -> Principal:
        if not principal.has(scope):
            raise Forbidden(f"This call needs the '{scope.value}' scope.")
        return principal

    check.__name__ = f"require_{scope.name}"
    return check
