"""Fault injection for end-to-end tests that the local cloud's own knobs do not cover.

`CuttableProxy` sits between worker processes and the Pub/Sub emulator: while it is
cut, open connections are dropped and new ones refused, the way a network partition
looks to a gRPC client (UNAVAILABLE, then reconnect attempts until it heals).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

_CONTROL_TIMEOUT_S = 10.0
_CHUNK = 64 * 1024


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 in front of `target` ("host:port"), run on its own thread."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.connections = 0
        self.cuts = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> CuttableProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        self.cuts += 1
        self._call(self._cut())

    def heal(self) -> None:
        self._call(self._listen())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_CONTROL_TIMEOUT_S)

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CONTROL_TIMEOUT_S)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        # The same port every time: the workers' channels must reconnect to where they were.
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self._target), _CONTROL_TIMEOUT_S
            )
        except (TimeoutError, OSError):
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the other side went away, or the proxy was cut: close this side too
        finally:
            writer.transport.abort()
