"""A TCP proxy a test can cut and restore, to take Postgres or Redis away from the app and give
it back without touching the real server that other tests share."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path


class CuttableProxy:
    """Listens on 127.0.0.1:<port> and forwards to a TCP address or a unix socket."""

    def __init__(
        self, *, host: str | None = None, port: int | None = None, unix_path: str | None = None
    ) -> None:
        self._host, self._port, self._unix_path = host, port, unix_path
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.cut_off = False
        self.flowing = asyncio.Event()  # clear: bytes stop, connections stay open (hung)
        self.flowing.set()
        self.listen_port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._unix_path:
            return await asyncio.open_unix_connection(self._unix_path)
        assert self._host
        assert self._port
        return await asyncio.open_connection(self._host, self._port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.close()
            return
        await self.flowing.wait()
        try:
            up_reader, up_writer = await self._connect()
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self.flowing.wait()
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.close()

    def cut(self) -> None:
        """Refuse new connections and drop the open ones, as a dead server would."""
        self.cut_off = True
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    def hang(self) -> None:
        """Accept and hold connections but pass nothing, as a stopped (SIGSTOP) server does."""
        self.flowing.clear()

    def restore(self) -> None:
        self.cut_off = False
        self.flowing.set()

    async def stop(self) -> None:
        self.cut()
        for task in list(self._pipes):
            task.cancel()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


def postgres_target(
    query_host: str | None, host: str | None, port: int | None
) -> dict[str, object]:
    """Where a Postgres URL points: a unix socket directory (``?host=/dir``) or host and port."""
    if query_host and query_host.startswith("/"):
        return {"unix_path": str(Path(query_host) / f".s.PGSQL.{port or 5432}")}
    return {"host": host or "127.0.0.1", "port": port or 5432}
