"""The circuit breaker's states on a fake clock."""

from __future__ import annotations

import asyncio

from tests.aio import run_async
from worker.core.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from worker.core.catalog import BreakerSpec


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def breaker(**spec: float) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker("svc (r)", BreakerSpec(**spec), clock), clock  # type: ignore[arg-type]


def test_it_opens_after_failures_in_a_row_and_a_success_resets_the_count() -> None:
    b, _ = breaker(failures=3)
    for ok in (False, False, True, False, False):
        assert b.admit()
        b.record(ok)
    assert b.state == CLOSED
    b.admit()
    b.record(False)
    assert b.state == OPEN
    assert not b.admit(), "no call while open"


def test_it_opens_on_the_error_rate_of_its_window() -> None:
    b, clock = breaker(failures=100, error_rate=0.5, min_calls=10, window_s=10)
    for i in range(9):  # 5 of 9 failed: not enough calls yet to judge
        b.record(i % 2 == 1)
        clock.now += 0.1
    assert b.state == CLOSED
    b.record(False)  # 6 of 10
    assert b.state == OPEN


def test_old_calls_leave_the_window() -> None:
    b, clock = breaker(failures=100, error_rate=0.5, min_calls=4, window_s=10)
    for _ in range(3):
        b.record(False)
    clock.now += 11
    for _ in range(3):
        b.record(True)
    b.record(False)  # 1 of 4 in the window
    assert b.state == CLOSED


def test_half_open_lets_a_few_probes_through_and_closes_when_they_succeed() -> None:
    b, clock = breaker(failures=1, open_s=5, probes=2)
    b.record(False)
    assert b.state == OPEN
    clock.now += 5
    assert b.state == HALF_OPEN
    assert b.admit() and b.admit()
    assert not b.admit(), "only `probes` calls at a time"
    b.record(True)
    assert b.state == HALF_OPEN
    b.record(True)
    assert b.state == CLOSED


def test_a_failed_probe_opens_it_again() -> None:
    b, clock = breaker(failures=1, open_s=5, probes=2)
    b.record(False)
    clock.now += 5
    assert b.admit()
    b.record(False)
    assert b.state == OPEN
    clock.now += 4.9
    assert b.state == OPEN


def test_a_probe_without_an_answer_frees_its_place() -> None:
    b, clock = breaker(failures=1, open_s=1, probes=1)
    b.record(False)
    clock.now += 1
    assert b.admit() and not b.admit()
    b.release_probe()
    assert b.admit()


@run_async
async def test_waiters_wake_when_the_open_period_ends() -> None:
    b = CircuitBreaker("svc (r)", BreakerSpec(failures=1, open_s=0.05))
    b.record(False)
    assert b.state == OPEN
    await asyncio.wait_for(b.wait(), 1)
    assert b.state == HALF_OPEN and b.admit()


def test_one_poison_jobs_retries_count_once_in_a_row_and_in_the_window() -> None:
    b, clock = breaker(failures=5, error_rate=0.7, min_calls=4, window_s=60)
    for _ in range(50):  # one job answered 500 on every attempt and every redelivery
        b.record(False, "poison")
        clock.now += 0.1
    assert b.state == CLOSED
    for i in range(3):
        b.record(True, f"ok-{i}")  # 1 failed job of 4 in the window
    assert b.state == CLOSED
    for i in range(4):
        b.record(False, f"bad-{i}")
    assert b.state == CLOSED  # 4 distinct jobs in a row, under 5; 5 of 8 in the window
    b.record(False, "bad-4")
    assert b.state == OPEN, "five jobs failing is the service failing"


def test_a_job_leaving_the_window_counts_again_later() -> None:
    b, clock = breaker(failures=100, error_rate=0.5, min_calls=2, window_s=10)
    b.record(False, "j")
    b.record(True, "k")
    clock.now += 11
    b.record(True, "k")
    b.record(False, "j")  # the old entry left the window: this one counts
    assert b.state == CLOSED
    b.record(False, "j2")
    assert b.state == OPEN
