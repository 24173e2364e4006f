"""Which kinds an operator paused, and until when: one entry per kind, last writer wins.

Entries arrive over the control channel (worker/gcp/control.py) from `worker pause`
and `worker resume`, and from other replicas passing on what they know. Each entry
carries the time the operator gave the order (`at`, epoch seconds); an older order
never overrides a newer one, so entries may arrive in any order and more than once.
Times are wall-clock epoch seconds: they are compared across machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import structlog

log = structlog.get_logger("worker.core.pauses")

# Entries older than this are forgotten, unless they still pause their kind (a resumed
# kind's entry only matters for ordering); an order no newer than the newest entry
# forgotten is not taken for a kind the book no longer knows.
FORGET_AFTER_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class PauseEntry:
    kind: str
    paused: bool
    at: float
    until: float | None = None  # with paused: resume by itself then
    by: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> PauseEntry:
        if not isinstance(raw, dict):
            raise ValueError("a pause entry is a JSON object")
        kind, paused, at, until = raw.get("kind"), raw.get("paused"), raw.get("at"), raw.get("until")
        if not isinstance(kind, str) or not isinstance(paused, bool) or not isinstance(at, int | float):
            raise ValueError("a pause entry needs kind (string), paused (bool) and at (number)")
        if until is not None and not isinstance(until, int | float):
            raise ValueError("until must be a number (epoch seconds) or null")
        return cls(
            kind, paused, float(at), None if until is None else float(until), str(raw.get("by", ""))[:200]
        )


class PauseBook:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._entries: dict[str, PauseEntry] = {}
        self._forgotten_at = float("-inf")  # the newest `at` among the entries forgotten
        self._changed = asyncio.Event()

    def apply(self, entry: PauseEntry) -> bool:
        """Take an order unless a newer one for the kind is known; True if it changed anything."""
        self._prune()
        known = self._entries.get(entry.kind)
        if known is not None and known.at >= entry.at:
            return False
        if known is None and entry.at <= self._forgotten_at:
            return False  # as old as an order forgotten: a newer one for its kind may have been
        was_paused = self.is_paused(entry.kind)
        self._entries[entry.kind] = entry
        now_paused = self.is_paused(entry.kind)
        if now_paused and not was_paused:
            log.warning(
                "kind_paused", paused_kind=entry.kind, until=entry.until, by=entry.by, ordered_at=entry.at
            )
        elif was_paused and not now_paused:
            log.info("kind_resumed", paused_kind=entry.kind, by=entry.by, ordered_at=entry.at)
        self._changed.set()
        self._changed = asyncio.Event()
        return True

    def _stale(self, entry: PauseEntry) -> bool:
        """Older than FORGET_AFTER_S and no longer pausing anything."""
        now = self._clock()
        pausing = entry.paused and (entry.until is None or now < entry.until)
        return entry.at < now - FORGET_AFTER_S and not pausing

    def _prune(self) -> None:
        """Forget stale entries, so the book does not grow with every kind ever ordered."""
        for kind in [k for k, e in self._entries.items() if self._stale(e)]:
            self._forgotten_at = max(self._forgotten_at, self._entries.pop(kind).at)

    def is_paused(self, kind: str) -> bool:
        entry = self._entries.get(kind)
        if entry is None or not entry.paused:
            return False
        return entry.until is None or self._clock() < entry.until

    def paused(self) -> dict[str, float | None]:
        """Paused kinds and when each resumes by itself (None: until `worker resume`)."""
        return {k: e.until for k, e in sorted(self._entries.items()) if self.is_paused(k)}

    def entries(self) -> list[PauseEntry]:
        """What to pass on to another replica (recent orders only)."""
        horizon = self._clock() - FORGET_AFTER_S
        return [e for e in self._entries.values() if e.at >= horizon or self.is_paused(e.kind)]

    async def wait(self, kind: str) -> None:
        """Return once `kind` is no longer paused (resumed, or its time ran out)."""
        while self.is_paused(kind):
            until = self._entries[kind].until
            timeout = None if until is None else max(0.0, until - self._clock()) + 0.01
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
