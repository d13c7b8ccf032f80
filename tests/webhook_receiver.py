"""A webhook receiver on loopback: a small HTTP/1.1 server that records every request and
answers as a test scripts it (a status code, headers, or hanging)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Reply:
    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hang_s: float = 0.0  # wait this long before answering (a receiver that hangs)


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """``by_id`` answers the next requests of one webhook-id in turn (whatever order concurrent
    deliveries arrive in); else ``script`` answers the next requests in turn; after it,
    ``default`` answers."""

    script: list[Reply] = field(default_factory=list)
    by_id: dict[str, list[Reply]] = field(default_factory=dict)
    default: Reply = field(default_factory=Reply)
    requests: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    in_flight: int = 0
    most_in_flight: int = 0  # the most requests it was answering at once
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/kam"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for handler in list(self._handlers):
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _next_reply(self, webhook_id: str) -> Reply:
        for_id = self.by_id.get(webhook_id)
        if for_id:
            return for_id.pop(0)
        return self.script.pop(0) if self.script else self.default

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            request_line = await reader.readline()
            if not request_line:
                return
            _method, path, _version = request_line.decode().split(" ", 2)
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append(Received(path=path, headers=headers, body=body))
            self.arrived.set()
            reply = self._next_reply(headers.get("webhook-id", ""))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                if reply.hang_s:
                    await asyncio.sleep(reply.hang_s)
            finally:
                self.in_flight -= 1
            head = [f"HTTP/1.1 {reply.status} Scripted"]
            head += [f"{k}: {v}" for k, v in reply.headers.items()]
            head += [f"content-length: {len(reply.body)}", "connection: close", "", ""]
            writer.write("\r\n".join(head).encode() + reply.body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)
