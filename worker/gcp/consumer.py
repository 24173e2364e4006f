"""Pub/Sub streaming pull -> pipeline -> publish -> ack. Knows nothing of HTTP.

One Consumer pulls one lane's subscription (worker/core/lanes.py); the lanes' consumers
share the in-flight slots (`WORKER_MAX_IN_FLIGHT`, a `LaneSlots`), so a batch's backlog
never stands between the web app's jobs and a slot. `Lanes` runs them side by side.

The client library hands each message to a scheduler; ours (`LoopScheduler`) passes
them to the asyncio loop in batches, where each job becomes a task. The client's flow
control lets through twice the slots, so a small buffer waits here.

At shutdown, jobs not yet started are nacked while the pull stream is still open,
the running jobs' leases pass from the client to `HeldLeases` (extended by unary
RPCs from then on: the client's leaser stops with the stream), then the stream
closes and running jobs finish within the grace period (acked by unary RPCs, since
the client's ack path closes with the stream). Jobs still running
after the grace period are released: their leases lapse (within
WORKER_LEASE_EXTENSION_SECONDS) and Pub/Sub redelivers them.
Nacks are not sent after the stream closed: on the emulator the message would go
straight back to this worker's closed stream (worker/gcp/emulator.py, fault 1).
Leases are extended by the client while a job runs. Acknowledgement rules
(docs/contract.md): ack only after the result and any dead letter are published;
nack a transient failure for redelivery; on shutdown stop pulling, let in-flight jobs
finish within the grace period, nack the rest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import queue
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # lazy-loaded module
from google.cloud.pubsub_v1.subscriber.scheduler import Scheduler

from worker.core.backoff import Backoff
from worker.core.lanes import BATCH, INTERACTIVE, LaneSlot, LaneSlots, enter_lane, lane_of
from worker.core.logs import bind_job_fields
from worker.core.messages import clip
from worker.core.shapes import Delivery, Outcome
from worker.core.telemetry import NO_TELEMETRY, Telemetry
from worker.gcp.inbox import Inbox
from worker.gcp.lease import HeldLeases
from worker.gcp.results import ResultPublisher

log = structlog.get_logger("worker.gcp.consumer")

NACK_DELAY_BASE_S = 0.5
NACK_DELAY_MAX_S = 10.0
# Time for the client to send the shutdown nacks before its stream closes.
_NACK_FLUSH_S = 0.3
# How often `jobs_done` logs what was finished since the last one (successes are not
# logged one by one at info).
SUMMARY_EVERY_S = 60.0


@dataclass
class ConsumerStats:
    received: int = 0
    acked: int = 0
    nacked: int = 0
    publish_failures: int = 0
    released: int = 0
    held: int = 0
    moved: int = 0  # jobs marked lane=batch moved from the interactive lane
    last_message_at: float = 0.0
    longest_lease_s: float = 0.0  # receipt to ack or nack, of any message
    # Results published, by status (succeeded, failed, rejected, expired).
    finished: Counter[str] = field(default_factory=Counter)


class LoopScheduler(Scheduler):  # type: ignore[misc]
    """Runs the client library's message callbacks on the asyncio loop, in batches.

    The library's default scheduler runs each message's callback on a thread pool,
    and ours would only pass the message on to the loop: a thread hop and a loop
    wake-up per job. This one is called on the library's stream thread, queues the
    callback and wakes the loop once for everything queued since its last turn. The
    library's contract is kept: `queue` carries acks back to it, `shutdown` returns
    the messages never handed over (the library nacks them)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self._inbox = Inbox(loop)

    @property
    def queue(self) -> queue.Queue[Any]:
        return self._queue

    def schedule(self, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if kwargs:
            callback = functools.partial(callback, **kwargs)
        self._inbox.put(callback, *args)

    def shutdown(self, await_msg_callbacks: bool = False) -> list[Any]:
        return [args[0] for _, args in self._inbox.close() if args]


class StreamFailed(Exception):
    """The pull stream ended by itself (subscription deleted, permission revoked...)."""


class Consumer:
    """One lane's subscription: pulls it, runs each job through `handle` in a slot of
    the lane's share, publishes the outcome, then acks or nacks (the module docstring
    has the rules). `run(stop)` consumes until `stop`, then drains."""

    def __init__(
        self,
        subscriber: Any,
        subscription: str,
        handle: Callable[[Delivery], Awaitable[Outcome]],
        publisher: ResultPublisher,
        *,
        max_in_flight: int,
        grace_s: float,
        max_delivery_attempts: int | None,
        lease_extension_s: int = 20,
        telemetry: Telemetry = NO_TELEMETRY,
        max_hold_s: float = 3600.0,
        max_held: int = 5000,
        lane: str = INTERACTIVE,
        slots: LaneSlot | None = None,
        batch_topic: str | None = None,
        longest_run_s: float = 0.0,
        max_held_bytes: int | None = None,
    ) -> None:
        """`slots`: this lane's share of the slots (a lane alone gets `max_in_flight`).
        `batch_topic`: where the interactive lane moves a job marked `lane=batch`."""
        self.lane = lane
        # Lanes share one publisher and flush it once, after every lane has drained.
        self.flush_at_drain = True
        self.slots = slots or LaneSlots(max_in_flight, floor=0).lane(lane)
        self._batch_topic = batch_topic if lane == INTERACTIVE else None
        self._subscriber = subscriber
        self._subscription = subscription
        self._handle = handle
        self._publisher = publisher
        self.publisher = publisher
        self._max_in_flight = max_in_flight
        self._lease_extension_s = lease_extension_s
        self._grace_s = grace_s
        self._max_hold_s = max_hold_s
        # The client library stops extending a lease after this (its default: 1 h, no
        # more than WORKER_MAX_HOLD_SECONDS' own default): see `lease_cap`.
        self.max_lease_s = lease_cap(max_hold_s, longest_run_s, grace_s)
        self.leases = HeldLeases(
            lease_extension_s, max_held, unary=self._modack_unary, max_bytes=max_held_bytes
        )
        self.max_delivery_attempts = max_delivery_attempts
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: set[asyncio.Task[Any]] = set()
        self._message_of: dict[asyncio.Task[None], Any] = {}  # each job's task -> its message
        self._streaming = False
        self._draining = False
        self._future: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = ConsumerStats()
        self._metrics = telemetry.metrics
        results_topic = (getattr(publisher, "results_topic", "") or "").rsplit("/", 1)[-1]
        self._send_span = f"send {results_topic}"
        self._send_attributes = {
            "span_kind": "producer",
            "messaging.system": "gcp_pubsub",
            "messaging.operation.type": "send",
            "messaging.destination.name": results_topic,
        }

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def subscription_id(self) -> str:
        return self._subscription.rsplit("/", 1)[-1]

    @property
    def _stream_open(self) -> bool:
        """Settles may go on the stream: it is ours and has not ended (by itself, too:
        on a dead stream an ack or nack goes nowhere, so they take unary RPCs)."""
        return self._streaming and (self._future is None or not self._future.done())

    @property
    def stream_alive(self) -> bool:
        return self._streaming and self._future is not None and not self._future.done()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then drain. Raises StreamFailed if the stream dies."""
        self._loop = asyncio.get_running_loop()
        failed = asyncio.Event()
        # Leases are extended a short step at a time: a job released at shutdown, or
        # held by a worker that was killed, is redelivered within one step (the
        # client's default step is the stream's 60 s).
        flow = pubsub_v1.types.FlowControl(
            max_messages=2 * self._max_in_flight,
            max_bytes=1024 * 1024 * 1024,
            max_duration_per_lease_extension=self._lease_extension_s,
            max_lease_duration=self.max_lease_s,
        )
        self._streaming = True
        self._future = self._subscriber.subscribe(
            self._subscription, self._spawn, flow_control=flow, scheduler=LoopScheduler(self._loop)
        )
        self._future.add_done_callback(lambda _: self._loop.call_soon_threadsafe(failed.set))  # type: ignore[union-attr]
        log.info(
            "consumer_started",
            subscription=self._subscription,
            lane=self.lane,
            max_in_flight=self._max_in_flight,
        )
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(failed.wait())]
        keeper = asyncio.ensure_future(self.leases.run())
        summary = asyncio.ensure_future(self._summarize())
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in [*waiters, summary]:
            waiter.cancel()
        error = None if stop.is_set() else self._stream_error()
        if error is not None:  # the keeper's modacks would go nowhere on the dead stream
            self.leases.streaming = False
        await self._drain()
        keeper.cancel()
        if error is not None:
            raise StreamFailed(error)

    def _stream_error(self) -> str:
        try:
            self._future.result(timeout=0)
        except concurrent.futures.CancelledError:
            return "the pull stream was cancelled"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "the pull stream ended"

    async def _drain(self) -> None:
        # Give back what has not started while the stream is still open: a nack sent then
        # is redelivered at once, to another worker (see the module docstring).
        self._draining = True
        for task in list(self._waiting):
            task.cancel()
        await asyncio.sleep(_NACK_FLUSH_S)
        # The stream's leaser stops with it: the jobs still running keep their leases
        # through the grace period by the worker's own unary modacks (worker/gcp/lease.py).
        for task, message in list(self._message_of.items()):
            if not task.done():
                self.leases.keep(message)
        self._streaming = False
        self.leases.streaming = False
        self._future.cancel()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self._future.result, 30)
        pending = set(self._tasks)
        log.info("draining", in_flight=len(pending), grace_s=self._grace_s)
        if pending:
            _, late = await asyncio.wait(pending, timeout=self._grace_s)
            for task in late:
                task.cancel()
            if late:
                log.warning("grace_period_over_releasing", jobs=len(late))
                await asyncio.gather(*late, return_exceptions=True)
        if self.flush_at_drain:  # alone, not one of Lanes (which says consumer_stopped)
            await asyncio.to_thread(self._publisher.flush)
            log.info("consumer_stopped", **stopped_fields(self.stats))
        else:
            log.info("lane_stopped", lane=self.lane, **stopped_fields(self.stats))

    async def _summarize(self) -> None:
        """Every SUMMARY_EVERY_S, what was finished since the last line, if anything."""
        reported: Counter[str] = Counter()
        while True:
            await asyncio.sleep(SUMMARY_EVERY_S)
            done = self.stats.finished - reported
            if done:
                log.info("jobs_done", seconds=SUMMARY_EVERY_S, in_flight=self.in_flight, **done)
                reported = self.stats.finished.copy()

    def _spawn(self, message: Any) -> None:
        # On the loop (LoopScheduler): one task per job.
        self.stats.received += 1
        self.stats.last_message_at = time.monotonic()
        if self._draining:
            # Arrived while shutting down (perhaps our own nack coming straight back): a
            # second nack would only loop it back again, so let its lease lapse instead.
            self.stats.released += 1
            return
        task = asyncio.ensure_future(self._process(message))
        self._tasks.add(task)
        self._message_of[task] = message
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._message_of.pop(task, None)

    async def _process(self, message: Any) -> None:
        if self._draining:
            # Spawned before the drain began but first run after it gave back the jobs
            # waiting: given back the same way, not run during the shutdown.
            if self._stream_open:
                self.stats.nacked += 1
                message.nack()
            else:
                self.stats.released += 1
            return
        task = asyncio.current_task()
        enter_lane(self.lane)
        received = time.monotonic()
        delivery = self._delivery(message)
        bind_job_fields(
            job_id=clip(delivery.attributes.get("job_id", ""), 128) or None,
            kind=clip(delivery.attributes.get("kind", ""), 64) or None,
            attempt=delivery.delivery_attempt,
        )
        try:
            if self._batch_topic is not None and lane_of(delivery.attributes) == BATCH:
                await self._move_to_batch(message, delivery)
                return
            self._waiting.add(task)  # type: ignore[arg-type]
            # The slot bounds calls to the functions; publishing the result and
            # acking happen outside it, so a slot turns over as soon as a call ends.
            async with self.slots:
                self._waiting.discard(task)  # type: ignore[arg-type]
                outcome = await self._handle(delivery)
            held_s = 0.0  # spent held in this delivery, summed over its hold cycles
            while outcome.is_held:
                assert outcome.hold is not None
                outcome.span.end("held", None)  # the run after the hold gets a span of its own
                outcome, held_s = await self._hold(message, delivery, outcome.hold, held_s)
            await self._conclude(message, outcome)
            lease = time.monotonic() - received
            self.stats.longest_lease_s = max(self.stats.longest_lease_s, lease)
        except asyncio.CancelledError:
            if self._stream_open:
                self.stats.nacked += 1
                message.nack()
            else:
                self.stats.released += 1
            raise
        finally:
            self.leases.give_back(message)

    async def _hold(
        self, message: Any, delivery: Delivery, wait: Callable[[], Awaitable[None]], held_s: float
    ) -> tuple[Outcome, float]:
        """Hold a job out of the call slots, leased and not nacked, until `wait()` returns;
        then run it again. Returns its outcome and the seconds it has now been held in
        this delivery, `held_s` included: holds add up over the cycles of one delivery
        (a breaker that goes half-open and opens again, a pause after a breaker), and
        once they reach WORKER_MAX_HOLD_SECONDS it is nacked (which uses up a delivery
        attempt); on its last attempt it runs once more and, if it would be held again,
        fails (a nack there would dead-letter it without a result)."""
        task = asyncio.current_task()
        self.leases.take(message)
        self.stats.held += 1
        self._waiting.add(task)  # type: ignore[arg-type]  # drained like a job not started
        started = time.monotonic()
        try:
            remaining = self._max_hold_s - held_s
            if remaining <= 0:
                raise TimeoutError
            await asyncio.wait_for(wait(), remaining)
        except TimeoutError:
            held_s += time.monotonic() - started
            log.warning(
                "job_held_too_long",
                held_s=round(held_s, 3),
                max_hold_s=self._max_hold_s,
                final_attempt=delivery.final_attempt,
            )
            if not delivery.final_attempt:
                return Outcome.retry("held_too_long"), held_s
            # A nack now would dead-letter it without a result: run it once more, and
            # if it would be held again, fail it (result and dead letter).
            delivery = dataclasses.replace(delivery, may_hold=False)
        else:
            held_s += time.monotonic() - started
        finally:
            self.stats.held -= 1
            self._waiting.discard(task)  # type: ignore[arg-type]
        self._waiting.add(task)  # type: ignore[arg-type]
        async with self.slots:
            self._waiting.discard(task)  # type: ignore[arg-type]
            return await self._handle(delivery), held_s

    async def _move_to_batch(self, message: Any, delivery: Delivery) -> None:
        """A job its publisher marked `lane=batch` but sent to the interactive topic:
        republished unchanged to the batch lane's topic, then acked (not run here)."""
        assert self._batch_topic is not None
        try:
            await self._publisher.forward(self._batch_topic, delivery.data, delivery.attributes)
        except Exception as exc:
            self.stats.publish_failures += 1
            log.error("job_move_failed", lane=BATCH, error=f"{type(exc).__name__}: {exc}"[:300])
            await asyncio.sleep(nack_delay(message.delivery_attempt))
            await self._settle(message, ack=False)
            return
        self.stats.moved += 1
        await self._settle(message, ack=True)

    def _delivery(self, message: Any) -> Delivery:
        attempt = message.delivery_attempt
        return Delivery(
            data=bytes(message.data),
            attributes=dict(message.attributes),
            message_id=message.message_id,
            delivery_attempt=attempt,
            final_attempt=bool(
                self.max_delivery_attempts and attempt and attempt >= self.max_delivery_attempts
            ),
            publish_time=message.publish_time,
        )

    async def _conclude(self, message: Any, outcome: Outcome) -> None:
        status, code = "retry", outcome.retry_code
        try:
            if await self._publish_and_settle(message, outcome) and outcome.result is not None:
                status = outcome.result.status.value
                code = outcome.result.error.code if outcome.result.error else None
            elif outcome.ack:
                code = "result_publish_failed"
        finally:
            outcome.span.end(status, code)
            # A run_job follow-up held and republished has no outcome of its own to count.
            if self._metrics.enabled and outcome.counted:
                attempts = outcome.result.attempts if outcome.result else 0
                self._metrics.job_finished(outcome.kind, status, attempts, self.lane)

    async def _publish_and_settle(self, message: Any, outcome: Outcome) -> bool:
        """Publish and ack, or nack: True if the message was acked."""
        if outcome.ack:
            if outcome.hold_s > 0:
                # A follow-up not yet due (worker/core/followup.py): a few seconds under
                # lease, outside the call slots, then republished and acked.
                await asyncio.sleep(outcome.hold_s)
            try:
                with outcome.span.step(self._send_span, **self._send_attributes):
                    await self._publisher.publish(outcome)
            except Exception as exc:
                # Not published means not acked: Pub/Sub will deliver it again.
                self.stats.publish_failures += 1
                if self._metrics.enabled:
                    self._metrics.publish_failed()
                log.error("result_publish_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            else:
                if outcome.result is not None:
                    self.stats.finished[outcome.result.status.value] += 1
                await self._settle(message, ack=True)
                return True
        # Hold a job that must go back a little before nacking it: a nack is redelivered
        # at once where the subscription has no retry policy (the emulator: fault 2 in
        # worker/gcp/emulator.py), and an outage (Admin API, metadata server, Pub/Sub
        # publish) would otherwise burn every delivery attempt in a second. The client
        # keeps extending the lease meanwhile.
        await asyncio.sleep(nack_delay(message.delivery_attempt))
        await self._settle(message, ack=False)
        return False

    def _modack_unary(self, ack_ids: list[str], seconds: int) -> None:
        self._subscriber.modify_ack_deadline(
            subscription=self._subscription, ack_ids=ack_ids, ack_deadline_seconds=seconds
        )

    async def _settle(self, message: Any, *, ack: bool) -> None:
        if ack:
            self.stats.acked += 1
        else:
            self.stats.nacked += 1
        if self._stream_open:
            message.ack() if ack else message.nack()
            return
        # The stream is closed, and with it the client's ack path: use unary RPCs.
        try:
            if ack:
                await asyncio.to_thread(
                    self._subscriber.acknowledge, subscription=self._subscription, ack_ids=[message.ack_id]
                )
            else:
                await asyncio.to_thread(
                    self._subscriber.modify_ack_deadline,
                    subscription=self._subscription,
                    ack_ids=[message.ack_id],
                    ack_deadline_seconds=0,
                )
        except Exception as exc:  # the message will simply be redelivered
            log.warning("settle_failed", ack=ack, error=f"{type(exc).__name__}: {exc}"[:300])


class Lanes:
    """The lanes' consumers, run side by side on one `LaneSlots`: what the run loop,
    /healthz and `worker status` see of the worker's pulling."""

    def __init__(self, consumers: list[Consumer]) -> None:
        self.consumers = {consumer.lane: consumer for consumer in consumers}
        self.max_delivery_attempts = consumers[0].max_delivery_attempts
        self._publishers = {id(c.publisher): c.publisher for c in consumers}
        for consumer in consumers:
            consumer.flush_at_drain = False

    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in self.consumers.values())

    @property
    def stream_alive(self) -> bool:
        return all(c.stream_alive for c in self.consumers.values())

    @property
    def stats(self) -> ConsumerStats:
        """The lanes' figures added up (last_message_at and longest_lease_s: the latest, longest)."""
        total = ConsumerStats()
        for consumer in self.consumers.values():
            part = consumer.stats
            for name in ("received", "acked", "nacked", "publish_failures", "released", "held", "moved"):
                setattr(total, name, getattr(total, name) + getattr(part, name))
            total.last_message_at = max(total.last_message_at, part.last_message_at)
            total.longest_lease_s = max(total.longest_lease_s, part.longest_lease_s)
            total.finished.update(part.finished)
        return total

    def status(self) -> dict[str, Any]:
        """Per lane: jobs calling (in slots), held, and waiting for a slot."""
        lanes = {}
        for lane, consumer in self.consumers.items():
            lanes[lane] = {
                "in_flight": consumer.in_flight,
                "calling": consumer.slots.in_use,
                "waiting": consumer.slots.slots.waiting(lane),
                "held": consumer.stats.held,
                "subscription": consumer.subscription_id,
            }
        return lanes

    async def run(self, stop: asyncio.Event) -> None:
        """Consume every lane until `stop` is set, then drain them all; if one lane's
        stream dies the others drain too and StreamFailed is raised."""
        halt = asyncio.Event()

        async def relay() -> None:
            await stop.wait()
            halt.set()

        async def one(consumer: Consumer) -> None:
            try:
                await consumer.run(halt)
            finally:
                halt.set()

        relay_task = asyncio.ensure_future(relay())
        try:
            outcomes = await asyncio.gather(
                *(one(c) for c in self.consumers.values()), return_exceptions=True
            )
        finally:
            relay_task.cancel()
        for publisher in self._publishers.values():
            await asyncio.to_thread(publisher.flush)
        log.info("consumer_stopped", **stopped_fields(self.stats))
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome


def stopped_fields(stats: ConsumerStats) -> dict[str, Any]:
    """What consumer_stopped and lane_stopped say of a drained consumer."""
    return {
        "acked": stats.acked,
        "nacked": stats.nacked,
        "released": stats.released,
        "moved": stats.moved,
        "longest_lease_s": round(stats.longest_lease_s, 2),
        **stats.finished,
    }


def lease_cap(max_hold_s: float, longest_run_s: float, grace_s: float) -> float:
    """The longest the worker means to keep one delivery, for the client library's
    `max_lease_duration` (past it the library stops extending a lease, and Pub/Sub
    redelivers a job this worker still has): a run of the catalog's longest kind
    before its first hold, WORKER_MAX_HOLD_SECONDS of holds, a last run after them,
    the hold before a nack, and the shutdown grace period."""
    return max_hold_s + 2 * longest_run_s + NACK_DELAY_MAX_S + grace_s


def nack_delay(delivery_attempt: int | None) -> float:
    """Seconds to hold a job before nacking it: worker.core.backoff's equal jitter over
    the delivery attempt, from NACK_DELAY_BASE_S up to NACK_DELAY_MAX_S."""
    return Backoff(NACK_DELAY_BASE_S, NACK_DELAY_MAX_S).equal_jitter(delivery_attempt or 1)


def read_max_delivery_attempts(subscriber: Any, subscription: str) -> int | None:
    """The subscription's dead-letter `max_delivery_attempts`, or None without a policy."""
    found = subscriber.get_subscription(subscription=subscription)
    policy = found.dead_letter_policy
    if policy and policy.dead_letter_topic:
        return int(policy.max_delivery_attempts or 5)
    return None
