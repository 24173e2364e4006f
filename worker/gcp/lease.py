"""Leases of held jobs, kept by the worker instead of the client library.

A held job (a paused kind, an open circuit breaker: worker/core/guard.py) must stay
leased without being nacked, since every nack uses up a delivery attempt and the
last one dead-letters it. Left in the client's lease management it would also count
against the subscriber's flow control (2 x WORKER_MAX_IN_FLIGHT messages), so a few
hundred held jobs of one kind would stop the worker pulling every other kind.

So a held message is `drop()`ped from the client's lease management (it then no
longer counts against flow control) and this keeper extends its ack deadline itself,
every third of WORKER_LEASE_EXTENSION_SECONDS, until the consumer acks or nacks it.
At most `max_held` messages (WORKER_MAX_HELD) and `max_bytes` of their data
(WORKER_MAX_HELD_BYTES) are kept this way; beyond either a held job stays in the
client's care and counts against flow control, which slows pulling down rather than
letting memory grow without bound (5,000 held 1 MB jobs would be 5 GB, twice over
with the copy each `Delivery` keeps).

At shutdown the pull stream closes, and with it the client's lease management and
the stream's own modacks. So, before it closes, the consumer hands every job still
running to `keep()` (no bound: they are already in memory), and from then on the
keeper extends every lease it holds by unary `ModifyAckDeadline` RPCs, until each
job is acked or nacked or the grace period ends. A job that outlives the grace
period is given back and its lease lapses within one step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("worker.gcp.lease")


class HeldLeases:
    def __init__(
        self,
        extension_s: int,
        max_held: int,
        *,
        interval_s: float | None = None,
        unary: Callable[[list[str], int], None] | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self._extension_s = extension_s
        self._max_held = max_held
        self._max_bytes = max_bytes
        self.bytes = 0  # data of the messages held
        # (ack ids, seconds): ModifyAckDeadline by unary RPC, once the stream is closed.
        self.unary = unary
        self.streaming = True
        # Every third of the step, so two extensions may fail before the lease lapses.
        self.interval_s = interval_s if interval_s is not None else max(1.0, extension_s / 3)
        self._held: dict[str, Any] = {}  # ack_id -> message

    def __len__(self) -> int:
        return len(self._held)

    def take(self, message: Any) -> bool:
        """Keep `message`'s lease from now on; False when full (it stays with the client)."""
        if message.ack_id in self._held:
            return True
        if len(self._held) >= self._max_held:
            return False
        if self._max_bytes is not None and self.bytes + len(message.data) > self._max_bytes:
            return False
        self._hold(message)
        return True

    def _hold(self, message: Any) -> None:
        message.drop()
        if self.streaming:  # else the next unary extension, within `interval_s`
            message.modify_ack_deadline(self._extension_s)
        self._held[message.ack_id] = message
        self.bytes += len(message.data)

    def keep(self, message: Any) -> None:
        """Keep a running job's lease through shutdown (past `max_held` too)."""
        if message.ack_id not in self._held:
            self._hold(message)

    def give_back(self, message: Any) -> None:
        """The message was acked, nacked or released: stop extending it."""
        if self._held.pop(message.ack_id, None) is not None:
            self.bytes -= len(message.data)

    async def run(self) -> None:
        """Extend every held lease until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            if not self.streaming:
                await self._extend_unary()
                continue
            for message in list(self._held.values()):
                try:
                    message.modify_ack_deadline(self._extension_s)
                except Exception as exc:  # the stream is closing: the lease will lapse
                    log.warning("held_lease_not_extended", error=f"{type(exc).__name__}: {exc}"[:300])
                    break

    async def _extend_unary(self) -> None:
        ack_ids = list(self._held)
        if not ack_ids or self.unary is None:
            return
        for start in range(0, len(ack_ids), _UNARY_BATCH):
            try:
                await asyncio.to_thread(self.unary, ack_ids[start : start + _UNARY_BATCH], self._extension_s)
            except Exception as exc:  # Pub/Sub away: the leases lapse and the jobs come back
                log.warning(
                    "held_lease_not_extended", via="unary", error=f"{type(exc).__name__}: {exc}"[:300]
                )
                return


# Ack ids per ModifyAckDeadline request (Pub/Sub caps a request at 512 KB).
_UNARY_BATCH = 1000
