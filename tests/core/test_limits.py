"""Token bucket and adaptive (AIMD) concurrency limit, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from tests.aio import run_async
from worker.core.limits import DECREASE, ERROR_RATE, MIN_CALLS, WINDOW_S, AdaptiveLimit, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_gives_its_burst_at_once_then_one_token_per_interval() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=50, burst=5, clock=clock)
    assert [bucket.reserve() for _ in range(5)] == [0.0] * 5
    # Reservations queue up: each waiter is told its own slot, 1/50 s apart.
    assert [round(bucket.reserve(), 4) for _ in range(3)] == [0.02, 0.04, 0.06]
    clock.now += 10  # a long quiet spell refills to the burst, never beyond
    assert [bucket.reserve() for _ in range(5)] == [0.0] * 5
    assert bucket.reserve() > 0


def test_a_bucket_holds_its_rate_over_a_minute_of_demand() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=50, burst=50, clock=clock)
    started = 0
    while True:
        delay = bucket.reserve()
        if delay > 60:
            break
        started += 1
    # 50 at once, then 50 per second for 60 s.
    assert started == 50 + 50 * 60


def test_a_bucket_refuses_a_rate_of_zero() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)


@run_async
async def test_the_limit_cuts_once_per_round_on_overload_and_grows_back_by_one_per_round() -> None:
    limit = AdaptiveLimit("svc", 20, "test")
    epochs = [await limit.acquire() for _ in range(20)]
    assert limit.in_flight == 20
    # Every call of the round answers 429: the limit is cut once, not twenty times.
    for epoch in epochs:
        limit.release(epoch, "overload")
    assert limit.current == int(20 * DECREASE) == 15
    # While the limit binds, a round of successes (about `limit` calls) adds one.
    busy = [await limit.acquire() for _ in range(15)]
    for _ in range(16):
        limit.release(busy.pop(0), "ok")
        busy.append(await limit.acquire())
    assert limit.current == 16
    for _ in range(400):
        limit.release(busy.pop(0), "ok")
        busy.append(await limit.acquire())
    assert limit.current == 20, "never above the ceiling"


@run_async
async def test_a_cut_starts_from_what_was_in_flight_and_an_idle_limit_does_not_grow() -> None:
    limit = AdaptiveLimit("svc", 800, "Service: 10 x 80")
    epochs = [await limit.acquire() for _ in range(40)]
    limit.release(epochs.pop(), "overload")
    assert limit.current == int(40 * DECREASE), "refused at 40 in flight, not at 800"
    for epoch in epochs:
        limit.release(epoch, "ok")
    before = limit.current
    for _ in range(100):
        limit.release(await limit.acquire(), "ok")  # one at a time: the limit does not bind
    assert limit.current == before


@run_async
async def test_the_limit_never_goes_below_one_and_waiters_go_first_come_first_served() -> None:
    limit = AdaptiveLimit("svc", 4, "test")
    for _ in range(10):
        limit.release(await limit.acquire(), "overload")
    assert limit.current == 1
    first = await limit.acquire()
    order: list[int] = []

    async def wait(n: int) -> None:
        epoch = await limit.acquire()
        order.append(n)
        limit.release(epoch, "none")

    waiters = [asyncio.ensure_future(wait(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert order == [] and limit.in_flight == 1
    limit.release(first, "none")
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2] and limit.in_flight == 0


@run_async
async def test_a_cancelled_waiter_gives_its_place_on() -> None:
    limit = AdaptiveLimit("svc", 1, "test")
    held = await limit.acquire()
    cancelled = asyncio.ensure_future(limit.acquire())
    after = asyncio.ensure_future(limit.acquire())
    await asyncio.sleep(0)
    cancelled.cancel()
    limit.release(held, "none")
    await asyncio.sleep(0)
    assert after.done() and limit.in_flight == 1


@run_async
async def test_a_lower_ceiling_cuts_the_limit_at_once() -> None:
    limit = AdaptiveLimit("svc", 100, "WORKER_MAX_IN_FLIGHT")
    limit.set_ceiling(8, "Service svc")
    assert (limit.current, limit.ceiling, limit.source) == (8, 8, "Service svc")
    limit.set_ceiling(50, "Service svc")
    assert limit.current == 8, "a higher ceiling is reached by growing, not at once"


@run_async
async def test_a_stalled_loop_does_not_release_a_crowd_of_waiters_at_once() -> None:
    import time

    bucket = TokenBucket(rate=100, burst=1)
    started: list[float] = []

    async def call() -> None:
        await bucket.take()
        started.append(time.monotonic())

    tasks = [asyncio.ensure_future(call()) for _ in range(10)]
    await asyncio.sleep(0)
    time.sleep(0.2)  # the event loop stalls (a loaded host) while everyone waits
    await asyncio.gather(*tasks)
    # Without the queue, all ten reservations would be overdue and start together.
    first_burst = [t for t in started if t - started[0] < 0.005]
    assert len(first_burst) <= 2, len(first_burst)


@run_async
async def test_isolated_failures_never_cut_the_limit_but_a_failure_rate_over_the_window_does() -> None:
    clock = Clock()
    limit = AdaptiveLimit("svc", 40, "test", clock=clock)
    busy = [await limit.acquire() for _ in range(40)]
    # A flaky service: one answer in five fails, at random, for a minute of calls.
    for n in range(2000):
        clock.now += 0.03
        limit.release(busy.pop(0), "fail" if n % 5 == 0 else "ok")
        busy.append(await limit.acquire())
    assert limit.current == 40, "20 % random failures are noise, not overload"
    # Then every answer fails: once failures pass half the window's answers, one cut.
    answers = 0
    while answers < 1000:
        clock.now += 0.03
        limit.release(busy.pop(0), "fail")
        answers += 1
        if limit.current < 40:
            break
        busy.append(await limit.acquire())
    assert limit.current == int(40 * DECREASE)
    assert 100 < answers < 160, "when failures passed half of the 10 s window (~125 answers)"


@run_async
async def test_failures_need_enough_answers_in_the_window_to_cut() -> None:
    clock = Clock()
    limit = AdaptiveLimit("svc", 10, "test", clock=clock)
    for _ in range(MIN_CALLS - 1):
        limit.release(await limit.acquire(), "fail")
    assert limit.current == 10, "too few answers to be a rate"
    clock.now += WINDOW_S + 1  # the window forgets them
    limit.release(await limit.acquire(), "fail")
    assert limit.current == 10
    assert ERROR_RATE == 0.5
