"""A circuit breaker per target service: closed -> open -> half-open -> closed.

Closed: every call goes. It opens after `failures` failed calls in a row, or when
more than `error_rate` of the calls of the last `window_s` seconds failed (with at
least `min_calls` of them). Open: no call goes for `open_s` seconds. Half-open:
`probes` calls go; when they all succeed it closes, when one fails it opens again.
Callers that may not go wait with `wait()`, which returns when the state changes or
the open period ends; then they ask `admit()` again.

Failures count per job: a job's retries (in process, or on redelivery) count once in
the run of failures and once in the window, so one poison job (a payload its service
answers 500 to) opens no breaker for every other job of that service.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

import structlog

from worker.core.catalog import BreakerSpec

log = structlog.get_logger("worker.core.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(self, name: str, spec: BreakerSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.spec = spec
        self._clock = clock
        self._state = CLOSED
        self._consecutive = 0
        self._window: deque[tuple[float, bool, str | None]] = deque()
        self._window_failures = 0
        self._streak_jobs: set[str] = set()  # jobs counted in the current run of failures
        self._window_jobs: dict[str, int] = {}  # failed jobs in the window -> their entries
        self._opened_at = 0.0
        self._probes_out = 0
        self._probes_ok = 0
        self._changed = asyncio.Event()
        self.opened = 0  # times it opened, for status

    @property
    def state(self) -> str:
        if self._state == OPEN and self._clock() - self._opened_at >= self.spec.open_s:
            self._set(HALF_OPEN, reason="open period over")
        return self._state

    def admit(self) -> bool:
        """May a call go now? In half-open, True takes one of the probe places."""
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN and self._probes_out + self._probes_ok < self.spec.probes:
            self._probes_out += 1
            return True
        return False

    def record(self, ok: bool, job: str | None = None) -> None:
        """The outcome of an admitted call: ok, or a failure of the service; `job` (its
        id) counts a job's failures once (None: every failure counts)."""
        now = self._clock()
        if self._state == HALF_OPEN:
            self._probes_out = max(0, self._probes_out - 1)
            if not ok:
                self._open(now, "a probe failed")
            else:
                self._probes_ok += 1
                if self._probes_ok >= self.spec.probes:
                    self._set(CLOSED, reason=f"{self._probes_ok} probes succeeded")
            return
        if self._state == OPEN:
            return  # a call admitted before it opened
        if ok:
            self._consecutive = 0
            self._streak_jobs.clear()
        elif job is None or job not in self._streak_jobs:
            self._consecutive += 1
            if job is not None:
                self._streak_jobs.add(job)
        if ok or job is None or job not in self._window_jobs:
            self._window.append((now, ok, None if ok else job))
            self._window_failures += 0 if ok else 1
            if not ok and job is not None:
                self._window_jobs[job] = 1
        while self._window and now - self._window[0][0] > self.spec.window_s:
            _, was_ok, failed_job = self._window.popleft()
            self._window_failures -= 0 if was_ok else 1
            if failed_job is not None:
                self._window_jobs.pop(failed_job, None)
        if self._consecutive >= self.spec.failures:
            self._open(now, f"{self._consecutive} failures in a row")
        elif (
            len(self._window) >= self.spec.min_calls
            and self._window_failures / len(self._window) > self.spec.error_rate
        ):
            self._open(
                now, f"{self._window_failures} of {len(self._window)} calls failed in {self.spec.window_s:g}s"
            )

    def release_probe(self) -> None:
        """An admitted call ended without an outcome of the service's (cancelled, no token)."""
        if self._state == HALF_OPEN:
            self._probes_out = max(0, self._probes_out - 1)
            self._wake()

    async def wait(self) -> None:
        """Return when a call may be admitted again (or might be: ask `admit()`)."""
        while True:
            state = self.state
            probing = state == HALF_OPEN and self._probes_out + self._probes_ok < self.spec.probes
            if state == CLOSED or probing:
                return
            event = self._changed
            timeout = None
            if state == OPEN:
                timeout = max(0.0, self.spec.open_s - (self._clock() - self._opened_at)) + 0.001
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)

    def _open(self, now: float, reason: str) -> None:
        self._opened_at = now
        self.opened += 1
        self._set(OPEN, reason=reason)

    def _set(self, state: str, *, reason: str) -> None:
        was = self._state
        self._state = state
        self._consecutive = 0
        self._window.clear()
        self._window_failures = 0
        self._streak_jobs.clear()
        self._window_jobs.clear()
        self._probes_out = self._probes_ok = 0
        if state == OPEN:
            log.warning("breaker_open", target=self.name, was=was, reason=reason, open_s=self.spec.open_s)
        elif state == HALF_OPEN:
            log.info("breaker_half_open", target=self.name, reason=reason, probes=self.spec.probes)
        else:
            log.info("breaker_closed", target=self.name, reason=reason)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
