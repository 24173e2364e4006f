"""Calls from the client library's threads onto the asyncio loop, one wake-up per batch.

The Pub/Sub client calls back on its own threads: the stream thread for each message,
the commit thread for each published result. `loop.call_soon_threadsafe` per call
wakes the loop (a write to its self-pipe) once per job, twice with the result; at
thousands of jobs a second that was a measurable share of the worker's CPU. An
`Inbox` queues calls and wakes the loop once for everything queued since its last
turn.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("worker.gcp.inbox")

Call = tuple[Callable[..., Any], tuple[Any, ...]]


class Inbox:
    """Run `put` calls on `loop`, in the order put, from any thread (the loop's too)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[Call] = []
        self._closed = False

    def put(self, callback: Callable[..., Any], *args: Any) -> bool:
        """Queue `callback(*args)` for the loop; False (and not queued) once closed."""
        with self._lock:
            if self._closed:
                return False
            self._pending.append((callback, args))
            if len(self._pending) > 1:
                return True  # the loop is already called for this batch
        self._loop.call_soon_threadsafe(self._run_pending)
        return True

    def _run_pending(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        for callback, args in batch:
            try:
                callback(*args)
            except Exception:  # one bad callback must not drop the rest of its batch
                log.exception(
                    "inbox_callback_failed", callback=getattr(callback, "__qualname__", repr(callback))
                )

    def close(self) -> list[Call]:
        """Stop taking calls; return those queued and never run."""
        with self._lock:
            self._closed = True
            dropped, self._pending = self._pending, []
        return dropped
