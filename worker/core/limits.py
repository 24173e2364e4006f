"""Two ways of holding calls back: a token bucket (a rate) and an adaptive concurrency limit.

`TokenBucket` hands out call starts at `rate` per second with bursts of `burst`,
by reservation: `reserve()` says how long the caller must wait for its token, so
waiters never race each other for the next one.

`AdaptiveLimit` bounds calls in flight to one target. Its limit starts at the
ceiling (what the catalog or the target's own Cloud Run `Service` allows) and moves
by AIMD, on what says overload and not on noise. It is cut, to `DECREASE` x the
smaller of the limit and the calls in flight, by an overload answer (429, or 503
with Retry-After: the guard decides, worker/core/guard.py), or by failures (other
5xx, timeouts, refused connections) once more than `ERROR_RATE` of the answers of
the last `WINDOW_S` seconds were failures, over at least `MIN_CALLS` of them. An
isolated failure never cuts it: a service failing 20 % of calls at random is flaky,
not overloaded (AIMD cutting on each would settle near sqrt(2/0.2), about 3 calls).
Cuts come once per round of calls: answers to calls started before the last cut do
not cut it again, and the failure window starts afresh. Each success adds 1/limit
while the limit binds (at least half of it in use), so it climbs back by about one
per round trip. It never leaves [1, ceiling]. Waiters are served first come,
first served within a lane, interactive jobs' before the batch's
(worker/core/lanes.py): a web-app job calling the target a batch fills waits for the
next call to end, not for the batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import structlog

from worker.core.lanes import INTERACTIVE, LANES, current_lane

log = structlog.get_logger("worker.core.limits")

DECREASE = 0.75
# Failures cut the limit only as a rate: over this share of the answers of the window.
ERROR_RATE = 0.5
WINDOW_S = 10.0
MIN_CALLS = 20
_INCREASE_LOG_INTERVAL_S = 1.0


class TokenBucket:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self._turn = asyncio.Lock()

    def reserve(self) -> float:
        """Take the next token; the seconds to wait before using it (0 when one is at hand)."""
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def take(self) -> None:
        """Wait for a token. Waiters queue on a lock and reserve one at a time, so a
        stalled event loop cannot release a crowd of overdue reservations at once:
        after a stall at most `burst` calls start together."""
        async with self._turn:
            delay = self.reserve()
            if delay > 0:
                await asyncio.sleep(delay)


class AdaptiveLimit:
    """Calls in flight to one target, at most `limit` (AIMD between 1 and `ceiling`)."""

    def __init__(
        self,
        name: str,
        ceiling: int,
        source: str,
        *,
        decrease: float = DECREASE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.ceiling = max(1, ceiling)
        self.source = source
        self.limit = float(self.ceiling)
        self.in_flight = 0
        self._decrease = decrease
        self._clock = clock
        self._epoch = 0  # bumped by each cut
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {lane: deque() for lane in LANES}
        self._window: deque[tuple[float, bool]] = deque()  # (when, failed) of recent answers
        self._window_failures = 0
        self._logged_limit = self.ceiling
        self._logged_at = 0.0
        log.info("target_limit_ceiling", target=name, ceiling=self.ceiling, source=source)

    @property
    def current(self) -> int:
        return max(1, int(self.limit))

    def set_ceiling(self, ceiling: int, source: str) -> None:
        """A new maximum (the Service changed): the limit is cut to it at once, or may grow to it."""
        ceiling = max(1, ceiling)
        if (ceiling, source) == (self.ceiling, self.source):
            return
        log.info("target_limit_ceiling", target=self.name, ceiling=ceiling, source=source)
        self.ceiling, self.source = ceiling, source
        self.limit = min(self.limit, float(ceiling))
        self._wake()

    async def acquire(self) -> int:
        """Wait for room; returns the epoch to hand back to `release`."""
        lane = current_lane()
        # Queues this job would overtake: none of its own lane's, and the batch's own
        # waiters wait behind interactive ones too.
        ahead = [self._waiters[INTERACTIVE]] if lane == INTERACTIVE else list(self._waiters.values())
        if self.in_flight < self.current and not any(ahead):
            self.in_flight += 1
            return self._epoch
        waiter = asyncio.get_running_loop().create_future()
        queue = self._waiters[lane]
        queue.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Room was handed to us as we were cancelled: pass it on.
                self.in_flight -= 1
                self._wake()
            elif waiter in queue:
                queue.remove(waiter)
            raise
        return self._epoch

    def release(self, epoch: int, outcome: str) -> None:
        """`outcome`: "ok" (grow), "overload" (cut, once per epoch), "fail" (cut once
        failures are over `ERROR_RATE` of the window) or anything else (no change)."""
        self.in_flight -= 1
        if outcome == "overload":
            if epoch == self._epoch:
                self._cut(self.in_flight + 1, "overload")
        elif outcome in ("ok", "fail"):
            failed = outcome == "fail"
            if self._failing(failed) and epoch == self._epoch:
                self._cut(self.in_flight + 1, "error_rate")
            elif not failed and self.limit < self.ceiling and 2 * (self.in_flight + 1) >= self.limit:
                # Grown only while it binds: a limit far above what is sent proves nothing.
                self.limit = min(float(self.ceiling), self.limit + 1.0 / self.limit)
                self._log_growth()
        self._wake()

    def _failing(self, failed: bool) -> bool:
        """Record an answer; True when failures are over ERROR_RATE of the window."""
        now = self._clock()
        self._window.append((now, failed))
        self._window_failures += failed
        while self._window and now - self._window[0][0] > WINDOW_S:
            self._window_failures -= self._window.popleft()[1]
        return (
            failed
            and len(self._window) >= MIN_CALLS
            and self._window_failures > ERROR_RATE * len(self._window)
        )

    def _cut(self, in_flight: int, reason: str) -> None:
        # From what was in flight when the target refused, when that is below the limit.
        before = self.current
        self.limit = max(1.0, min(self.limit, float(in_flight)) * self._decrease)
        self._epoch += 1
        self._window.clear()
        self._window_failures = 0
        if self.current != before:
            log.warning(
                "target_limit_lowered",
                target=self.name,
                limit=self.current,
                was=before,
                ceiling=self.ceiling,
                reason=reason,
            )
            self._logged_limit, self._logged_at = self.current, self._clock()

    def _log_growth(self) -> None:
        now = self._clock()
        current = self.current
        if current == self._logged_limit:
            return
        if current == self.ceiling or now - self._logged_at >= _INCREASE_LOG_INTERVAL_S:
            log.info("target_limit_raised", target=self.name, limit=current, ceiling=self.ceiling)
            self._logged_limit, self._logged_at = current, now

    def _wake(self) -> None:
        for lane in LANES:  # interactive first
            queue = self._waiters[lane]
            while queue and self.in_flight < self.current:
                waiter = queue.popleft()
                if waiter.done():
                    continue
                self.in_flight += 1
                waiter.set_result(None)
