"""One error hierarchy, answered as ``application/problem+json`` (RFC 9457).

Routes declare the problems they can answer (``responses=problems(...)``) so /docs shows them.
Infrastructure faults (Postgres or Redis away) become 503 with ``Retry-After``; nothing a client
sends reaches the catch-all 500, and no answer ever carries a traceback.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import structlog
from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from services.request_id import REQUEST_ID

log = structlog.get_logger(__name__)

PROBLEM_JSON = "application/problem+json"


class FieldError(BaseModel):
    """One invalid input: where it is and what is wrong with it."""

    field: str = Field(description="Dotted path of the input, e.g. body.lines.0.amount.")
    message: str
    type: str = Field(description="Machine-readable kind of error, e.g. missing, greater_than.")


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str = Field(default="about:blank", examples=["https://kam.dev/problems/validation"])
    title: str = Field(examples=["Request validation failed"])
    status: int = Field(examples=[422])
    detail: str | None = Field(default=None, examples=["body.amount: Input should be >= 0"])
    instance: str | None = None
    errors: list[FieldError] | None = Field(
        default=None, description="For validation problems: every invalid field."
    )
    request_id: str | None = Field(
        default=None, description="The request's id (`X-Request-ID`), to quote to an operator."
    )


class ProblemError(Exception):
    """Raise to answer with a problem document."""

    status_code: int = status.HTTP_400_BAD_REQUEST
    title: str = "Bad request"
    problem_type: str = "about:blank"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        errors: list[FieldError] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail
        self.headers = headers
        self.errors = errors


class NotFound(ProblemError):
    status_code = status.HTTP_404_NOT_FOUND
    title = "Not found"


class Unauthorized(ProblemError):
    status_code = status.HTTP_401_UNAUTHORIZED
    title = "Missing or invalid API key"


class Forbidden(ProblemError):
    status_code = status.HTTP_403_FORBIDDEN
    title = "The API key lacks a required scope"


class Conflict(ProblemError):
    status_code = status.HTTP_409_CONFLICT
    title = "Conflict with the resource's state"


class PayloadTooLarge(ProblemError):
    status_code = status.HTTP_413_CONTENT_TOO_LARGE
    title = "Request body too large"


class ServiceUnavailable(ProblemError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    title = "A backing service is unavailable"


class BadRequest(ProblemError):
    status_code = status.HTTP_400_BAD_REQUEST
    title = "Bad request"


class Unprocessable(ProblemError):
    status_code = status.HTTP_422_UNPROCESSABLE_CONTENT
    title = "Request validation failed"


_STATUS_TITLES = {
    400: "Bad request",
    401: "Missing or invalid API key",
    403: "The API key lacks a required scope",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict with the resource's state",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Request validation failed",
    429: "Too many requests",
    503: "A backing service is unavailable",
}


def problem_response(
    status_code: int,
    title: str,
    *,
    detail: str | None = None,
    instance: str | None = None,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
    problem_type: str = "about:blank",
) -> JSONResponse:
    body = Problem(
        type=problem_type,
        title=title,
        status=status_code,
        detail=detail,
        instance=instance,
        errors=errors,
        request_id=REQUEST_ID.get(),
    ).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status_code, headers=headers, media_type=PROBLEM_JSON)


def field_errors(errors: Any) -> list[FieldError]:
    """Pydantic errors as ``FieldError``s; the input value is never echoed (it may be PII)."""
    return [
        FieldError(
            field=".".join(str(part) for part in err.get("loc", ())) or "body",
            message=str(err.get("msg", "invalid")),
            type=str(err.get("type", "value_error")),
        )
        for err in errors
    ]


def summarize(errors: list[FieldError]) -> str:
    """The first few field errors in one line, for a problem's ``detail``."""
    shown = "; ".join(f"{e.field}: {e.message}" for e in errors[:5])
    more = len(errors) - 5
    return shown + (f"; and {more} more" if more > 0 else "")


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the problems a route can answer."""
    return {
        code: {
            "model": Problem,
            "description": _STATUS_TITLES.get(code, "Problem"),
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for code in codes
    }


def install_error_handlers(app: FastAPI, *, retry_after_s: int) -> None:
    unavailable_headers = {"Retry-After": str(retry_after_s)}

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ProblemError)
        return problem_response(
            exc.status_code,
            exc.title,
            detail=exc.detail,
            errors=exc.errors,
            headers=exc.headers,
            instance=request.url.path,
            problem_type=exc.problem_type,
        )

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = field_errors(exc.errors())
        return problem_response(
            422,
            "Request validation failed",
            detail=summarize(errors),
            errors=errors,
            instance=request.url.path,
        )

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        headers = dict(exc.headers) if exc.headers else {}
        if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
            # Starlette names only the methods of the first route on the path; a resource with
            # GET and PUT on separate routes must list both.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return problem_response(
            exc.status_code,
            _STATUS_TITLES.get(exc.status_code, "Error"),
            detail=str(exc.detail) if exc.detail else None,
            headers=headers or None,
            instance=request.url.path,
        )

    async def on_database_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database_unavailable", error=type(exc).__name__, path=request.url.path)
        return problem_response(
            503,
            "A backing service is unavailable",
            detail="The database is unreachable; retry later.",
            headers=unavailable_headers,
            instance=request.url.path,
        )

    async def on_redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("redis_unavailable", error=type(exc).__name__, path=request.url.path)
        return problem_response(
            503,
            "A backing service is unavailable",
            detail="The queue is unreachable; retry later.",
            headers=unavailable_headers,
            instance=request.url.path,
        )

    async def on_pool_exhausted(request: Request, exc: Exception) -> JSONResponse:
        # Postgres is up: this process has every pooled connection in use and waited its
        # pool timeout for one. The client should slow down, not page the database's owner.
        log.warning("pool_exhausted", path=request.url.path)
        return problem_response(
            503,
            "Too many concurrent requests",
            detail="Too many concurrent requests for this server's database connections; "
            "retry shortly.",
            headers={"Retry-After": "1"},
            instance=request.url.path,
        )

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", path=request.url.path, error=type(exc).__name__)
        return problem_response(500, "Internal error", instance=request.url.path)

    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for db_error in (OperationalError, InterfaceError, ConnectionError, OSError):
        app.add_exception_handler(db_error, on_database_down)
    app.add_exception_handler(PoolTimeoutError, on_pool_exhausted)
    app.add_exception_handler(DBAPIError, _dbapi_handler(on_database_down, on_unexpected))
    driver_errors = _dbapi_handler(on_database_down, on_unexpected, wrapped=False)
    for driver_error in (asyncpg.exceptions.PostgresError, asyncpg.exceptions.InterfaceError):
        app.add_exception_handler(driver_error, driver_errors)
    app.add_exception_handler(RedisError, on_redis_down)
    app.add_exception_handler(Exception, on_unexpected)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "\x00"})
        if match is not Match.NONE and isinstance(route, APIRoute | Route):
            methods |= route.methods or set()
    return sorted(methods)


def _dbapi_handler(on_down: Any, on_other: Any, *, wrapped: bool = True) -> Any:
    """Classifies a database error, wrapped by SQLAlchemy (``DBAPIError``) or straight from
    asyncpg (the ingestion path's statements after the first)."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        if wrapped:
            assert isinstance(exc, DBAPIError)
            invalidated, orig = exc.connection_invalidated, exc.orig
        else:
            invalidated, orig = False, exc
        if invalidated or _caused_by(orig, _CONNECTION_ERRORS):
            return await on_down(request, exc)  # type: ignore[no-any-return]
        if _caused_by(orig, _CONTENTION_ERRORS):
            # The transaction was rolled back whole; the same request will succeed on a retry
            # (and is idempotent by event_id), so say so rather than answer 500.
            log.warning("transaction_conflict", path=request.url.path)
            return problem_response(
                503,
                "Conflicting concurrent write",
                detail="Another request locked the same rows; nothing was written. Retry.",
                headers={"Retry-After": "1"},
                instance=request.url.path,
            )
        return await on_other(request, exc)  # type: ignore[no-any-return]

    return handle


_CONNECTION_ERRORS = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InterfaceError,
    OSError,
    TimeoutError,
)


_CONTENTION_ERRORS = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)


def _caused_by(orig: BaseException | None, kinds: tuple[type[BaseException], ...]) -> bool:
    """Whether ``orig`` or anything in its ``__cause__`` chain is one of ``kinds``."""
    cause = orig
    while cause is not None:
        if isinstance(cause, kinds):
            return True
        cause = cause.__cause__
    return False
