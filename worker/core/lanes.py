"""Lanes: the web app's jobs never queue behind a batch.

Pub/Sub has no priorities: one subscription is one queue. So each lane is a topic and
a subscription of its own (docs/contract.md, "Lanes"), pulled side by side, and the
worker's in-flight slots (WORKER_MAX_IN_FLIGHT) are shared between the lanes here:

- `interactive` (the default: the web app, `worker enqueue`, Cloud Scheduler) always
  finds a slot within its floor (WORKER_INTERACTIVE_SLOTS), which the batch lane may
  never take;
- past the floor the lanes share by weight (`WEIGHTS`): a freed slot goes to the lane
  with the fewest slots in use for its weight among those that have a job waiting;
- an idle lane lends every slot it does not use (but the floor) to the other, so a
  batch alone runs as fast as it did on one lane.

The same order decides who goes first at a target's adaptive limit (core/limits.py):
`current_lane()` is the lane of the job the running task works on, set by the
consumer that pulled it.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from types import TracebackType

INTERACTIVE = "interactive"
BATCH = "batch"
LANES = (INTERACTIVE, BATCH)
# The job attribute a publisher sets to send a job down the batch lane.
LANE_ATTRIBUTE = "lane"
# Under contention, interactive jobs get three slots for each one of the batch's.
WEIGHTS = {INTERACTIVE: 3.0, BATCH: 1.0}

_current: contextvars.ContextVar[str] = contextvars.ContextVar("worker_lane", default=INTERACTIVE)


def current_lane() -> str:
    """The lane of the job this task works on (interactive outside a consumer)."""
    return _current.get()


def enter_lane(lane: str) -> None:
    """Mark the running task's jobs as `lane`'s (each asyncio task has its own context)."""
    _current.set(lane)


def lane_of(attributes: dict[str, str]) -> str:
    """The lane a job asks for by its `lane` attribute: batch, else interactive."""
    return BATCH if attributes.get(LANE_ATTRIBUTE) == BATCH else INTERACTIVE


def check_lane(lane: str) -> str:
    if lane not in LANES:
        raise ValueError(f"unknown lane {lane!r}: use one of {', '.join(LANES)}")
    return lane


def default_floor(total: int) -> int:
    """Interactive slots the batch lane may never take: a tenth of the slots, at least one
    (and none to spare when there is a single slot)."""
    return 0 if total < 2 else max(1, total // 10)


class LaneSlots:
    """`total` in-flight slots shared by the lanes (see the module docstring)."""

    def __init__(self, total: int, floor: int | None = None) -> None:
        if total < 1:
            raise ValueError("lanes need at least one slot")
        self.total = total
        self.floor = default_floor(total) if floor is None else min(max(0, floor), total - 1)
        self.in_use = dict.fromkeys(LANES, 0)
        self._used = 0
        # Waiters not yet handed a slot (a cancelled one leaves its queue at once).
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {lane: deque() for lane in LANES}
        self._waiting = dict.fromkeys(LANES, 0)

    def lane(self, lane: str) -> LaneSlot:
        return LaneSlot(self, check_lane(lane))

    def waiting(self, lane: str) -> int:
        return self._waiting[lane]

    def _may_take(self, lane: str) -> bool:
        if self._used >= self.total:
            return False
        return lane != BATCH or self.in_use[BATCH] < self.total - self.floor

    async def acquire(self, lane: str) -> None:
        if not self._waiting[lane] and self._may_take(lane):
            self.in_use[lane] += 1
            self._used += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[lane].append(waiter)
        self._waiting[lane] += 1
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Handed a slot as we were cancelled: give it back.
                self.release(lane)
            elif waiter in self._waiters[lane]:  # else _wake already dropped it
                self._waiters[lane].remove(waiter)
                self._waiting[lane] -= 1
            raise

    def release(self, lane: str) -> None:
        self.in_use[lane] -= 1
        self._used -= 1
        self._wake()

    def _wake(self) -> None:
        # Counters, not scans: this runs once per finished call, with hundreds waiting.
        while self._used < self.total:
            interactive = self._waiting[INTERACTIVE] > 0
            batch = self._waiting[BATCH] > 0 and self._may_take(BATCH)
            if interactive and batch:
                share = self.in_use[INTERACTIVE] / WEIGHTS[INTERACTIVE] <= self.in_use[BATCH] / WEIGHTS[BATCH]
                lane = INTERACTIVE if share else BATCH
            elif interactive or batch:
                lane = INTERACTIVE if interactive else BATCH
            else:
                return
            waiter = self._waiters[lane].popleft()
            self._waiting[lane] -= 1
            if waiter.done():  # cancelled, its task not yet resumed to leave the queue
                continue
            self.in_use[lane] += 1
            self._used += 1
            waiter.set_result(None)


class LaneSlot:
    """One lane's handle on the shared slots: `async with slot: ...` holds one."""

    def __init__(self, slots: LaneSlots, lane: str) -> None:
        self.slots = slots
        self.lane = lane

    @property
    def in_use(self) -> int:
        return self.slots.in_use[self.lane]

    async def __aenter__(self) -> None:
        await self.slots.acquire(self.lane)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.slots.release(self.lane)
