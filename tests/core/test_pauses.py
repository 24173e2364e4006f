"""Pause orders: the newest per kind wins, `--for` runs out by itself, waiters wake."""

from __future__ import annotations

import asyncio

import pytest

from tests.aio import run_async
from worker.core.pauses import PauseBook, PauseEntry


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_the_newest_order_wins_whatever_order_they_arrive_in() -> None:
    clock = Clock()
    book = PauseBook(clock)
    resume = PauseEntry("score", False, at=clock.now + 2)
    pause = PauseEntry("score", True, at=clock.now + 1)
    assert book.apply(resume)
    assert not book.apply(pause), "older than what is known"
    assert not book.is_paused("score")
    assert book.apply(PauseEntry("score", True, at=clock.now + 3))
    assert book.is_paused("score") and not book.is_paused("echo")


def test_a_pause_for_a_while_runs_out_by_itself() -> None:
    clock = Clock()
    book = PauseBook(clock)
    book.apply(PauseEntry("score", True, at=clock.now, until=clock.now + 60))
    assert book.paused() == {"score": clock.now + 60}
    clock.now += 61
    assert not book.is_paused("score") and book.paused() == {}


def test_entries_round_trip_and_bad_ones_are_refused() -> None:
    entry = PauseEntry("score", True, at=1.5, until=9.0, by="alice")
    assert PauseEntry.from_json(entry.to_json()) == entry
    for bad in (
        [],
        {"kind": "x"},
        {"kind": "x", "paused": "yes", "at": 1},
        {"kind": "x", "paused": True, "at": 1, "until": "soon"},
    ):
        with pytest.raises(ValueError):
            PauseEntry.from_json(bad)


@run_async
async def test_a_waiter_wakes_on_resume() -> None:
    book = PauseBook()
    book.apply(PauseEntry("score", True, at=1.0))
    waiter = asyncio.ensure_future(book.wait("score"))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    book.apply(PauseEntry("score", False, at=2.0))
    await asyncio.wait_for(waiter, 1)


def test_old_orders_that_pause_nothing_are_pruned_and_not_taken_again() -> None:
    from worker.core.pauses import FORGET_AFTER_S

    now = [1_000_000_000.0]
    book = PauseBook(clock=lambda: now[0])
    book.apply(PauseEntry("a", True, at=now[0]))
    book.apply(PauseEntry("a", False, at=now[0] + 1))
    book.apply(PauseEntry("forever", True, at=now[0]))  # paused until `worker resume`
    now[0] += FORGET_AFTER_S + 10
    book.apply(PauseEntry("b", True, at=now[0]))
    assert "a" not in book._entries, "a resumed kind's old entry is kept for ever"
    assert book.is_paused("forever") and book.is_paused("b")
    # A replica passing on the forgotten pause of "a" does not pause it again.
    assert not book.apply(PauseEntry("a", True, at=now[0] - FORGET_AFTER_S - 10))
    assert not book.is_paused("a")
