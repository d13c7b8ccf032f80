"""Request body limits, enforced on the stream: a body over the size limit is refused with 413
before it is read into memory, whether or not it announced its length; a body that stalls
(a client that sends its headers and then trickles or stops) is answered 408 and its
connection closed, so it does not hold a connection and a worker's attention indefinitely.
uvicorn has no timeout for this, nor for headers: the reverse proxy must add both."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.errors import PayloadTooLarge, ProblemError, problem_response


class _TooLarge(PayloadTooLarge):
    """Raised from ``receive``; the app's problem handler answers it as a 413."""


class _BodyTimeout(ProblemError):
    """Raised from ``receive``; the app's problem handler answers it as a 408."""

    status_code = 408
    title = "Request body timeout"


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int, read_timeout_s: float = 15.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return

        seen = 0
        body_done = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal seen, body_done
            if body_done:  # past the body, receive() waits for a disconnect: no timeout
                return await receive()
            try:
                async with asyncio.timeout(self.read_timeout_s):
                    message = await receive()
            except TimeoutError:
                raise _BodyTimeout(
                    f"The request body stalled for {self.read_timeout_s:g} s.",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(f"The body exceeds {self.max_bytes} bytes.")
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not response_started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            413,
            "Request body too large",
            detail=f"The body exceeds {self.max_bytes} bytes.",
            instance=scope.get("path"),
        )
        await response(scope, receive, send)
