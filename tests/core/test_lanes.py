"""The lanes' shared slots (worker/core/lanes.py) and the interactive-first order at a
target's adaptive limit (worker/core/limits.py)."""

from __future__ import annotations

import asyncio

import pytest

from tests.aio import run_async
from worker.core.lanes import BATCH, INTERACTIVE, LaneSlots, default_floor, enter_lane, lane_of
from worker.core.limits import AdaptiveLimit


async def hold(slots: LaneSlots, lane: str, release: asyncio.Event, started: list[str]) -> None:
    async with slots.lane(lane):
        started.append(lane)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@run_async
async def test_a_batch_alone_takes_every_slot_but_the_interactive_floor() -> None:
    slots = LaneSlots(10, floor=2)
    release, started = asyncio.Event(), []
    tasks = [asyncio.ensure_future(hold(slots, BATCH, release, started)) for _ in range(20)]
    await settle()
    assert slots.in_use == {INTERACTIVE: 0, BATCH: 8} and slots.waiting(BATCH) == 12
    # An interactive job arriving now finds a slot at once, however long the batch queue.
    urgent = asyncio.ensure_future(hold(slots, INTERACTIVE, release, started))
    await settle()
    assert slots.in_use[INTERACTIVE] == 1 and started[-1] == INTERACTIVE
    release.set()
    await asyncio.gather(*tasks, urgent)
    assert slots.in_use == {INTERACTIVE: 0, BATCH: 0}


@run_async
async def test_interactive_jobs_alone_may_use_every_slot() -> None:
    slots = LaneSlots(10, floor=2)
    release, started = asyncio.Event(), []
    tasks = [asyncio.ensure_future(hold(slots, INTERACTIVE, release, started)) for _ in range(12)]
    await settle()
    assert slots.in_use[INTERACTIVE] == 10 and slots.waiting(INTERACTIVE) == 2
    release.set()
    await asyncio.gather(*tasks)


@run_async
async def test_under_contention_freed_slots_go_three_to_one_and_neither_lane_starves() -> None:
    slots = LaneSlots(8, floor=0)
    gates = {lane: asyncio.Event() for lane in (INTERACTIVE, BATCH)}
    started: list[str] = []
    # Fill every slot with batch work, then queue plenty of both.
    first = [asyncio.ensure_future(hold(slots, BATCH, gates[BATCH], started)) for _ in range(8)]
    await settle()
    queued = [
        asyncio.ensure_future(hold(slots, lane, asyncio.Event(), started))
        for lane in [INTERACTIVE, BATCH] * 20
    ]
    await settle()
    started.clear()
    gates[BATCH].set()  # the eight batch jobs end: eight slots are handed out
    await asyncio.gather(*first)
    await settle()
    assert slots.in_use == {INTERACTIVE: 6, BATCH: 2}
    assert started.count(INTERACTIVE) == 6 and started.count(BATCH) == 2
    for task in queued:
        task.cancel()
    await asyncio.gather(*queued, return_exceptions=True)
    assert slots.in_use == {INTERACTIVE: 0, BATCH: 0}


@run_async
async def test_a_waiter_cancelled_as_it_is_handed_a_slot_gives_it_back() -> None:
    slots = LaneSlots(1, floor=0)
    release, started = asyncio.Event(), []
    holder = asyncio.ensure_future(hold(slots, BATCH, release, started))
    await settle()
    waiter = asyncio.ensure_future(hold(slots, BATCH, asyncio.Event(), started))
    await settle()
    release.set()
    await holder  # the slot is handed to `waiter`...
    waiter.cancel()  # ...which is cancelled before it runs
    await asyncio.gather(waiter, return_exceptions=True)
    assert slots.in_use == {INTERACTIVE: 0, BATCH: 0}


def test_the_floor_is_a_tenth_and_never_every_slot() -> None:
    assert default_floor(200) == 20 and default_floor(5) == 1 and default_floor(1) == 0
    assert LaneSlots(3, floor=10).floor == 2


def test_only_lane_batch_means_batch() -> None:
    assert lane_of({"lane": "batch"}) == BATCH
    for attributes in ({}, {"lane": "BATCH"}, {"lane": "urgent"}, {"lane": ""}):
        assert lane_of(attributes) == INTERACTIVE


@run_async
async def test_at_a_target_limit_an_interactive_job_goes_ahead_of_the_waiting_batch() -> None:
    limit = AdaptiveLimit("score", 2, "test")
    order: list[str] = []
    done = asyncio.Event()

    async def call(lane: str, name: str) -> None:
        enter_lane(lane)
        epoch = await limit.acquire()
        order.append(name)
        await done.wait()
        limit.release(epoch, "ok")

    batch = [asyncio.ensure_future(call(BATCH, f"b{i}")) for i in range(6)]
    await settle()
    assert order == ["b0", "b1"]
    urgent = asyncio.ensure_future(call(INTERACTIVE, "web"))
    await settle()
    done.set()
    await asyncio.gather(*batch, urgent)
    assert order[2] == "web", order


@pytest.mark.parametrize("lane", [INTERACTIVE, BATCH])
@run_async
async def test_a_free_target_is_taken_at_once_from_either_lane(lane: str) -> None:
    limit = AdaptiveLimit("score", 2, "test")
    enter_lane(lane)
    epoch = await asyncio.wait_for(limit.acquire(), 1)
    assert limit.in_flight == 1
    limit.release(epoch, "ok")
