"""Sign-in for people: an API key exchanged for a signed session cookie, and CSRF tokens.

The cookie holds the key's id (never the key), a random nonce and an expiry, signed with
HMAC-SHA256 under ``KAM_SESSION_SECRET``. It is HttpOnly, SameSite=Strict, Secure outside
development, and expires. Each request loads the key again, so revoking the key ends its
sessions at once. The CSRF token of a form is an HMAC of the session's nonce: a page of this
site can render it, another site cannot; before sign-in, a short-lived cookie of its own holds
the nonce the sign-in form's token is made from.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.keys.service import Principal, principal_by_id
from shared.settings import Environment, Settings

SESSION_COOKIE = "kam_session"
LOGIN_COOKIE = "kam_login"
LOGIN_COOKIE_TTL_S = 3600
CSRF_FIELD = "csrf_token"


class SignInRequired(Exception):
    """The page needs a signed-in person; answered with a redirect to the sign-in page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class CsrfRefused(Exception):
    """A data-changing form came without a valid CSRF token."""


@dataclass(frozen=True, slots=True)
class Person:
    """A signed-in person: the key they signed in with, and their session's CSRF token."""

    principal: Principal
    csrf_token: str


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def session_secret(settings: Settings) -> bytes:
    """The signing secret. Outside production, a random one per process when none is set
    (sessions then end when the process restarts)."""
    global _process_secret
    if settings.session_secret:
        return settings.session_secret.get_secret_value().encode()
    if _process_secret is None:
        _process_secret = secrets.token_bytes(32)
    return _process_secret


_process_secret: bytes | None = None


def sign(secret: bytes, payload: dict[str, Any]) -> str:
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    mac = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def unsign(secret: bytes, value: str, *, now: float) -> dict[str, Any] | None:
    """The payload of a value made by ``sign``, or None when forged, malformed or expired."""
    body, _, mac = value.partition(".")
    try:
        expected = hmac.new(secret, body.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(mac)):
            return None
        payload = json.loads(_unb64(body))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("e"), int | float):
        return None
    return payload if payload["e"] > now else None


def csrf_token(secret: bytes, nonce: str) -> str:
    return hmac.new(secret, f"csrf:{nonce}".encode(), hashlib.sha256).hexdigest()


def _cookie(response: Response, settings: Settings, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/app",
        httponly=True,
        samesite="strict",
        secure=settings.env is not Environment.development,
    )


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def start_session(request: Request, response: Response, principal: Principal) -> None:
    """Sign ``principal`` in: set the session cookie and drop the sign-in cookie."""
    settings = _settings(request)
    ttl = settings.session_ttl_s
    payload = {"k": principal.key_id, "n": secrets.token_urlsafe(16), "e": int(time.time()) + ttl}
    _cookie(response, settings, SESSION_COOKIE, sign(session_secret(settings), payload), ttl)
    response.delete_cookie(LOGIN_COOKIE, path="/app")


def end_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/app")


async def signed_in(request: Request, session: AsyncSession) -> Person | None:
    """The person of the request's session cookie, or None (no cookie, forged, expired, or the
    key revoked or no longer allowed to read accounts)."""
    value = request.cookies.get(SESSION_COOKIE)
    if not value:
        return None
    secret = session_secret(_settings(request))
    payload = unsign(secret, value, now=time.time())
    if payload is None or not isinstance(payload.get("k"), int) or not payload.get("n"):
        return None
    principal = await principal_by_id(session, payload["k"])
    if principal is None:
        return None
    return Person(principal=principal, csrf_token=csrf_token(secret, str(payload["n"])))


async def require_person(request: Request, session: AsyncSession) -> Person:
    """The signed-in person, or ``SignInRequired`` (a redirect to the sign-in page)."""
    person = await signed_in(request, session)
    if person is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(target)
    return person


def login_csrf(request: Request) -> tuple[str, str | None]:
    """The sign-in form's CSRF token, and a new sign-in cookie to set when the request has no
    valid one (None: keep the one it has)."""
    secret = session_secret(_settings(request))
    value = request.cookies.get(LOGIN_COOKIE)
    payload = unsign(secret, value, now=time.time()) if value else None
    if payload is not None and payload.get("n"):
        return csrf_token(secret, str(payload["n"])), None
    payload = {"n": secrets.token_urlsafe(16), "e": int(time.time()) + LOGIN_COOKIE_TTL_S}
    return csrf_token(secret, str(payload["n"])), sign(secret, payload)


def set_login_cookie(request: Request, response: Response, value: str) -> None:
    _cookie(response, _settings(request), LOGIN_COOKIE, value, LOGIN_COOKIE_TTL_S)


def check_login_csrf(request: Request, presented: str) -> None:
    """Refuse a sign-in whose form token does not match the sign-in cookie."""
    secret = session_secret(_settings(request))
    value = request.cookies.get(LOGIN_COOKIE)
    payload = unsign(secret, value, now=time.time()) if value else None
    if payload is None or not payload.get("n"):
        raise CsrfRefused
    if not hmac.compare_digest(csrf_token(secret, str(payload["n"])), presented):
        raise CsrfRefused


def check_csrf(person: Person, presented: str) -> None:
    """Refuse a form of a signed-in person whose token is not the session's."""
    if not hmac.compare_digest(person.csrf_token, presented):
        raise CsrfRefused
