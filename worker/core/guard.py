"""The protections every call to a function goes through, in one place.

Before a call: is the kind paused (`PauseBook`)? is the target's circuit breaker
open? Either way the job is held (`HoldJob`: the consumer keeps it under lease
without using up a delivery attempt, and sends it round again when `wait()`
returns). Then the call waits for room under the kind's `max_concurrency`, under the
target's adaptive limit, and for a token of the kind's `rate_per_s` (taken before
the place under the limit, so a job waiting for a token holds none). After it: the
answer feeds the adaptive limit and the breaker. The limit is cut by what says
overload (429; 503 with Retry-After) and by a failure rate over its window (other
5xx, timeouts, refused connections), never by one random failure, and a job's
retries in process count once: only its first attempt's refusal or failure feeds the
limit (successes always do). The breaker counts 5xx, timeouts and refused
connections as failures. A call that fails while the breaker is (or just went) open
holds its job instead of failing it.

A target is a Cloud Run service in a region. Its adaptive limit's ceiling is, per
kind calling it, the kind's `max_concurrency`, else what the target's `Service` says
it can hold (`max_instance_count x max_instance_request_concurrency`), else
WORKER_MAX_IN_FLIGHT; with several kinds on one target, the largest of theirs.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from worker.core.breaker import CLOSED, OPEN, CircuitBreaker
from worker.core.catalog import BreakerSpec, Catalog, JobKind
from worker.core.errors import HoldJob, JobError
from worker.core.limits import AdaptiveLimit, TokenBucket
from worker.core.pauses import PauseBook

# 503 says overload only with a Retry-After (Cloud Run's own "no instance available"
# answers carry one); a bare 503 is a failure, which cuts the limit only as a rate.
OVERLOAD_WITH_RETRY_AFTER = frozenset({503})
_FAILURE_CODES = frozenset({"timeout", "connection"})


@dataclass(frozen=True)
class Capacity:
    """What a Cloud Run `Service` states it can hold at once."""

    max_instances: int
    concurrency: int
    where: str = "the Service"

    @property
    def calls(self) -> int:
        return self.max_instances * self.concurrency

    def describe(self) -> str:
        return (
            f"{self.where}: max_instance_count {self.max_instances} x "
            f"max_instance_request_concurrency {self.concurrency}"
        )


CapacityLookup = Callable[[str, str], Capacity | None]


def _no_capacity(service: str, region: str) -> Capacity | None:
    return None


def target_ceiling(kinds: list[JobKind], capacity: Capacity | None, default: int) -> tuple[int, str]:
    """The adaptive limit's ceiling for a target called by `kinds`, and where it came from."""
    best: tuple[int, str] | None = None
    for kind in kinds:
        if kind.max_concurrency is not None:
            figure = (kind.max_concurrency, f"catalog: kind {kind.kind!r} max_concurrency")
        elif capacity is not None:
            figure = (capacity.calls, capacity.describe())
        else:
            figure = (
                default,
                "WORKER_MAX_IN_FLIGHT (the Service states no max_instance_count "
                "and max_instance_request_concurrency)",
            )
        if best is None or figure[0] > best[0]:
            best = figure
    return best if best is not None else (default, "WORKER_MAX_IN_FLIGHT")


class Guard:
    """Per worker instance: the pause book, and per target its breaker and adaptive
    limit, per kind its concurrency semaphore and rate bucket. `call(kind)` is the one
    way through them (see the module docstring); `snapshot()` is what status shows."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        region: str,
        default_ceiling: int,
        capacity: CapacityLookup = _no_capacity,
        pauses: PauseBook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self.pauses = pauses or PauseBook()
        self._region = region
        self._default = default_ceiling
        self._capacity = capacity
        self._clock = clock
        self._kinds_of: dict[tuple[str, str], list[JobKind]] = {}
        for name in sorted(catalog):
            kind = catalog[name]
            if kind.service:
                self._kinds_of.setdefault((kind.service, kind.region or region), []).append(kind)
        self._semaphores = {
            k.kind: asyncio.Semaphore(k.max_concurrency) for k in catalog.values() if k.max_concurrency
        }
        self._buckets = {k.kind: TokenBucket(k.rate_per_s, k.burst) for k in catalog.values() if k.rate_per_s}
        self._limits: dict[tuple[str, str], AdaptiveLimit] = {}
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}

    def call(self, kind: JobKind, region: str | None = None, *, retry: bool = False) -> GuardedCall:
        """`async with guard.call(kind) as call: ...; call.answered(status, retry_after)`.
        `retry`: a job's second or later attempt in process, whose refusal or failure
        its first attempt already told the adaptive limit."""
        target = (kind.service or kind.kind, region or kind.region or self._region)
        return GuardedCall(self, kind, target, retry=retry)

    def limit(self, target: tuple[str, str]) -> AdaptiveLimit:
        ceiling, source = target_ceiling(
            self._kinds_of.get(target, []), self._capacity(*target), self._default
        )
        limit = self._limits.get(target)
        if limit is None:
            limit = self._limits[target] = AdaptiveLimit(_name(target), ceiling, source, clock=self._clock)
        else:
            limit.set_ceiling(ceiling, source)
        return limit

    def breaker(self, target: tuple[str, str]) -> CircuitBreaker:
        breaker = self._breakers.get(target)
        if breaker is None:
            specs = [k.breaker for k in self._kinds_of.get(target, []) if k.breaker != BreakerSpec()]
            breaker = CircuitBreaker(_name(target), specs[0] if specs else BreakerSpec(), self._clock)
            self._breakers[target] = breaker
        return breaker

    def snapshot(self) -> dict[str, Any]:
        """Paused kinds, breaker states and current limits, for /readyz and `worker status`."""
        targets = {_name(target): entry for target, entry in self.states().items()}
        paused = {
            kind: None if until is None else datetime.fromtimestamp(until, UTC).isoformat(timespec="seconds")
            for kind, until in self.pauses.paused().items()
        }
        return {"paused": paused, "targets": targets}

    def states(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Per (service, region) called so far: its breaker's state and its limit's figures."""
        targets: dict[tuple[str, str], dict[str, Any]] = {}
        for target in sorted(set(self._limits) | set(self._breakers)):
            entry: dict[str, Any] = {}
            if target in self._breakers:
                entry["breaker"] = self._breakers[target].state
            if target in self._limits:
                limit = self._limits[target]
                entry.update(
                    limit=limit.current, ceiling=limit.ceiling, in_flight=limit.in_flight, source=limit.source
                )
            targets[target] = entry
        return targets


class GuardedCall:
    """One HTTP attempt under the guard (see the module docstring)."""

    def __init__(self, guard: Guard, kind: JobKind, target: tuple[str, str], *, retry: bool = False) -> None:
        self._guard = guard
        self._kind = kind
        self._target = target
        self._retry = retry
        self._status: int | None = None
        self._retry_after: float | None = None
        self._breaker: CircuitBreaker | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._limit: AdaptiveLimit | None = None
        self._epoch = 0

    def answered(self, status: int, retry_after: float | None = None) -> None:
        self._status = status
        self._retry_after = retry_after

    async def __aenter__(self) -> GuardedCall:
        guard, kind = self._guard, self._kind
        if guard.pauses.is_paused(kind.kind):
            raise HoldJob("paused", functools.partial(guard.pauses.wait, kind.kind))
        breaker = guard.breaker(self._target)
        if not breaker.admit():
            raise HoldJob("breaker_open", breaker.wait)
        self._breaker = breaker
        try:
            semaphore = guard._semaphores.get(kind.kind)
            if semaphore is not None:
                await semaphore.acquire()
                self._semaphore = semaphore
            # The rate token first: a job waiting for one holds no place under the
            # adaptive limit, whose in-flight count (and the cut taken from it) is calls.
            bucket = guard._buckets.get(kind.kind)
            if bucket is not None:
                await bucket.take()
            limit = guard.limit(self._target)
            self._epoch = await limit.acquire()
            self._limit = limit
        except BaseException:
            self._let_go("none")
            raise
        # Waiting for room may have taken a while: an order or a breaker that came
        # meanwhile holds the job now, before its call.
        if guard.pauses.is_paused(kind.kind):
            self._let_go("none")
            raise HoldJob("paused", functools.partial(guard.pauses.wait, kind.kind))
        if breaker.state == OPEN:
            self._let_go("none")
            raise HoldJob("breaker_open", breaker.wait)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        status = self._status
        if exc is None and status is not None:
            failed = status >= 500
            overload = status == 429 or (
                status in OVERLOAD_WITH_RETRY_AFTER and self._retry_after is not None
            )
            outcome = "overload" if overload else "fail" if failed else "ok"
            breaker_outcome = "none" if status == 429 else "fail" if failed else "ok"
        elif isinstance(exc, JobError) and exc.code in _FAILURE_CODES:
            outcome, breaker_outcome = "fail", "fail"
        else:  # cancelled, or no answer of the service's: tells nothing about it
            outcome, breaker_outcome = "none", "none"
        if self._retry and outcome != "ok":
            outcome = "none"  # the job's first attempt spoke for it
        self._let_go(outcome, breaker_outcome)
        breaker = self._breaker
        if breaker_outcome == "fail" and breaker is not None and breaker.state != CLOSED:
            raise HoldJob("breaker_open", breaker.wait)

    def _let_go(self, outcome: str, breaker_outcome: str = "none") -> None:
        if self._limit is not None:
            self._limit.release(self._epoch, outcome)
            self._limit = None
        if self._semaphore is not None:
            self._semaphore.release()
            self._semaphore = None
        if self._breaker is not None:
            if breaker_outcome == "none":
                self._breaker.release_probe()
            else:
                self._breaker.record(breaker_outcome == "ok")


def _name(target: tuple[str, str]) -> str:
    return f"{target[0]} ({target[1]})"
