"""The id of the request being served, for log lines and problem documents."""

from __future__ import annotations

from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("kam_request_id", default=None)
