"""The JSON body contract of every endpoint that takes one.

* The body must be sent as ``application/json`` (or a ``+json`` type) in UTF-8: anything else
  is answered 415, where FastAPI would try to validate the bytes as an object.
* Invalid JSON is named by line and column, not by a character offset.
* A caller without a valid key learns only that (401), whatever the body holds: the key is
  checked before the body is judged. The checks run on the error path alone, so a valid
  request pays for one header look-up.

Routers opt in with ``APIRouter(route_class=JsonBodyRoute)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.api.errors import FieldError, ProblemError, Unauthorized, Unprocessable
from services.api.ratelimit import RateLimiter, client_address

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class UnsupportedMediaType(ProblemError):
    status_code = 415
    title = "Unsupported media type"


def json_media_type_problem(content_type: str | None) -> UnsupportedMediaType | None:
    """Why a body sent with ``content_type`` is not taken as JSON, or None when it is."""
    if content_type is None:
        return UnsupportedMediaType(
            "Send the body with 'Content-Type: application/json'.",
            headers={"Accept": "application/json"},
        )
    media_type, _, params = content_type.partition(";")
    media_type = media_type.strip().lower()
    main, _, sub = media_type.partition("/")
    if main != "application" or not (sub == "json" or sub.endswith("+json")):
        return UnsupportedMediaType(
            f"The body is sent as '{media_type}'; send it as 'application/json'.",
            headers={"Accept": "application/json"},
        )
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            return UnsupportedMediaType(
                f"The body is declared as '{value.strip()}'; JSON bodies must be UTF-8.",
                headers={"Accept": "application/json; charset=utf-8"},
            )
    return None


def json_syntax_problem(raw: bytes) -> Unprocessable | None:
    """What is wrong with ``raw`` as a UTF-8 JSON text, by line and column; None when nothing."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Unprocessable(
            f"The body is not UTF-8 (invalid byte at offset {exc.start}).",
            errors=[FieldError(field="body", message="not UTF-8", type="utf8_invalid")],
        )
    if text.startswith("\ufeff"):
        return Unprocessable(
            "The body starts with a byte order mark; JSON bodies must not.",
            errors=[FieldError(field="body", message="byte order mark", type="utf8_invalid")],
        )
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        return Unprocessable(
            f"The body is not valid JSON: {exc.msg} at {where}.",
            errors=[FieldError(field="body", message=f"{exc.msg} at {where}", type="json_invalid")],
        )
    except RecursionError:
        return Unprocessable(
            "The body is not valid JSON: nested too deeply.",
            errors=[FieldError(field="body", message="nested too deeply", type="json_invalid")],
        )
    return None


async def require_known_key(request: Request) -> None:
    """Raise 401 unless the request carries a valid API key (checked like ``current_principal``,
    through the same cache)."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    limiter: RateLimiter = request.app.state.rate_limiter
    address = client_address(request.client)
    limiter.check_address(address)
    if scheme.lower() != "bearer" or not key.strip():
        await limiter.authentication_failed(address)
        raise Unauthorized("Send an API key as 'Authorization: Bearer <key>'.", headers=challenge)
    async with request.app.state.sessionmaker() as session:
        principal = await request.app.state.key_verifier.verify(session, key.strip())
    if principal is None:
        await limiter.authentication_failed(address)
        raise Unauthorized("The API key is unknown or revoked.", headers=challenge)


def _not_utf8_at_start(raw: bytes) -> bool:
    """Whether the body opens as UTF-16 or UTF-32 (which ``json.loads`` would take for bytes) or
    with a byte order mark. A JSON text starts with an ASCII character, so in those encodings
    its first four bytes hold a NUL. Other invalid UTF-8 fails the JSON decoding itself."""
    head = raw[:4]
    return b"\x00" in head or head[:2] in (b"\xff\xfe", b"\xfe\xff") or head[:3] == b"\xef\xbb\xbf"


def _is_body_error(exc: Exception) -> bool:
    """Whether FastAPI failed on the body's bytes (not on its fields)."""
    if isinstance(exc, RequestValidationError):
        return any(e.get("type") == "json_invalid" for e in exc.errors())
    # JSON that is not UTF-8: FastAPI answers "There was an error parsing the body".
    return isinstance(exc, StarletteHTTPException) and exc.status_code == 400


class JsonBodyRoute(APIRoute):
    """A route that holds its JSON body to the contract above."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def checked(request: Request) -> Response:
            if request.method in _BODY_METHODS:
                content_type = request.headers.get("content-type")
                if content_type != "application/json":
                    problem = json_media_type_problem(content_type)
                    if problem is not None and await request.body():
                        await require_known_key(request)
                        raise problem
                if _not_utf8_at_start(await request.body()):
                    await require_known_key(request)
                    raise Unprocessable(
                        "The body is not UTF-8 (UTF-16 or UTF-32, or a byte order mark).",
                        errors=[FieldError(field="body", message="not UTF-8", type="utf8_invalid")],
                    )
            try:
                return await handle(request)
            except (RequestValidationError, StarletteHTTPException) as exc:
                if not _is_body_error(exc):
                    raise
                await require_known_key(request)
                syntax = json_syntax_problem(await request.body())
                if syntax is None:
                    raise
                raise syntax from None

        return checked
