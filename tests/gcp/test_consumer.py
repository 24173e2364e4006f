"""The consumer's acknowledgement rules (docs/contract.md), on the Pub/Sub stand-in.

Each test runs `Consumer.run` against tests/pubsub_stub.py in milliseconds: ack only
after the result (and dead letter) is published, no ack when a publish fails, hold
then nack, the final delivery attempt, and shutdown (nack what has not started while
the stream is open, finish what runs within the grace period over unary RPCs, release
the rest). The emulator's behaviour is tested end to end in tests/e2e/.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.doubles import Invoker, Resolver
from tests.pubsub_stub import Event, StubMessage, StubPubSub
from worker.core.catalog import Catalog, default_catalog_dir
from worker.core.errors import TransientJobError
from worker.core.lanes import BATCH, LaneSlots
from worker.core.messages import JobStatus, Result
from worker.core.pipeline import Pipeline
from worker.core.shapes import DeadLetter, Delivery, Outcome
from worker.gcp import consumer as consumer_module
from worker.gcp.consumer import (
    NACK_DELAY_BASE_S,
    NACK_DELAY_MAX_S,
    Consumer,
    Lanes,
    StreamFailed,
    nack_delay,
    read_max_delivery_attempts,
)
from worker.gcp.results import ResultPublisher

SUBSCRIPTION = "projects/p/subscriptions/jobs-worker"
RESULTS = "projects/p/topics/job-results"
DEAD_LETTERS = "projects/p/topics/jobs-dead-letter"
Handle = Callable[[Delivery], Awaitable[Outcome]]


@pytest.fixture(autouse=True)
def short_holds(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """Holds of 20 ms instead of 0.25-10 s (the policy itself is tested below), and a
    5 ms nack flush at shutdown; returns the delivery attempts holds were asked for."""
    asked: list[int | None] = []

    def hold(attempt: int | None) -> float:
        asked.append(attempt)
        return 0.02

    monkeypatch.setattr(consumer_module, "nack_delay", hold)
    monkeypatch.setattr(consumer_module, "_NACK_FLUSH_S", 0.005)
    return asked


def result_for(delivery: Delivery, status: JobStatus = JobStatus.SUCCEEDED) -> Result:
    body = json.loads(delivery.data)
    at = datetime.now(UTC)
    return Result(
        job_id=body["job_id"], kind=body["kind"], status=status, started_at=at, finished_at=at, duration_ms=0
    )


async def succeed(delivery: Delivery) -> Outcome:
    return Outcome(ack=True, result=result_for(delivery))


def job(job_id: str = "j1") -> bytes:
    return json.dumps({"job_id": job_id, "kind": "account-scoring", "payload": {"account_id": "a"}}).encode()


class Running:
    """A consumer running on the stand-in, in the test's event loop."""

    def __init__(
        self,
        pubsub: StubPubSub,
        handle: Handle,
        *,
        max_in_flight: int = 4,
        grace_s: float = 1.0,
        max_delivery_attempts: int | None = 5,
    ) -> None:
        self.pubsub = pubsub
        self.consumer = Consumer(
            pubsub.subscriber,
            SUBSCRIPTION,
            handle,
            ResultPublisher(pubsub.publisher, RESULTS, DEAD_LETTERS),
            max_in_flight=max_in_flight,
            grace_s=grace_s,
            max_delivery_attempts=max_delivery_attempts,
        )
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.ensure_future(self.consumer.run(self.stop))
        await until(lambda: self.pubsub.subscriber.stream is not None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)

    async def deliver(self, data: bytes, **kw: Any) -> StubMessage:
        return await asyncio.to_thread(self.pubsub.subscriber.deliver, data, **kw)

    async def settled(self, message: StubMessage) -> list[str]:
        """Acks and nacks (a modack to 0 is a nack) that reached Pub/Sub; lease
        extensions (tests/gcp/test_holds.py) left out."""
        await until(lambda: bool(settles(self.pubsub, message)))
        return [f"{e.what}/{e.via}" for e in settles(self.pubsub, message)]


def settles(pubsub: StubPubSub, message: StubMessage) -> list[Event]:
    return [e for e in pubsub.settles(message) if not (e.what == "modack" and e.seconds)]


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


def test_a_job_is_acked_on_its_stream_only_once_its_result_is_published() -> None:
    pubsub = StubPubSub()
    pubsub.publisher.hold = True

    async def scenario() -> None:
        async with Running(pubsub, succeed) as running:
            message = await running.deliver(job("j1"), attributes={"job_id": "j1", "kind": "account-scoring"})
            await until(lambda: pubsub.publisher.held == 1)
            await asyncio.sleep(0.01)
            assert pubsub.settles(message) == [], "acked before the result was published"
            pubsub.publisher.release()
            assert await running.settled(message) == ["ack/stream"]
            (result,) = pubsub.published(RESULTS)
            (ack,) = pubsub.settles(message)
            assert pubsub.index(result) < pubsub.index(ack)
            assert result.attributes == {"status": "succeeded", "job_id": "j1", "kind": "account-scoring"}
            assert running.consumer.stats.acked == 1

    asyncio.run(scenario())


def test_a_result_that_fails_to_publish_is_not_acked_but_held_then_nacked(short_holds: list) -> None:
    pubsub = StubPubSub()
    pubsub.publisher.error = RuntimeError("results topic deleted")

    async def scenario() -> None:
        async with Running(pubsub, succeed) as running:
            message = await running.deliver(job(), delivery_attempt=3)
            assert await running.settled(message) == ["nack/stream"]
            assert pubsub.published(RESULTS) == []
            assert running.consumer.stats.publish_failures == 1
            assert running.consumer.stats.acked == 0
        assert short_holds == [3]

    asyncio.run(scenario())


def test_a_transient_failure_is_held_for_the_attempts_delay_then_nacked(short_holds: list) -> None:
    pubsub = StubPubSub()
    finished = asyncio.Event()

    async def retry_later(delivery: Delivery) -> Outcome:
        finished.set()
        return Outcome(ack=False)

    async def scenario() -> None:
        async with Running(pubsub, retry_later) as running:
            message = await running.deliver(job(), delivery_attempt=2)
            await finished.wait()
            await asyncio.sleep(0.005)
            assert pubsub.settles(message) == [], "nacked before its hold"
            assert await running.settled(message) == ["nack/stream"]
            assert pubsub.events == pubsub.settles(message), "nothing was published"
        assert short_holds == [2]

    asyncio.run(scenario())


def pipeline_failing_transiently() -> Pipeline:
    failing = Invoker(TransientJobError("http_503", "account-scoring answered 503", http_status=503))
    return Pipeline(
        Catalog.load(default_catalog_dir()),
        Resolver(),
        failing,
        region="europe-west1",
        max_payload_bytes=10_000,
    )


def test_the_final_delivery_attempt_publishes_failed_and_a_dead_letter_then_acks() -> None:
    pubsub = StubPubSub()
    pipeline = pipeline_failing_transiently()

    async def scenario() -> None:
        async with Running(pubsub, pipeline.handle, max_delivery_attempts=5) as running:
            earlier = await running.deliver(job("j4"), delivery_attempt=4)
            assert await running.settled(earlier) == ["nack/stream"]
            final = await running.deliver(job("j5"), attributes={"traceparent": "x"}, delivery_attempt=5)
            assert await running.settled(final) == ["ack/stream"]
        (result,) = pubsub.published(RESULTS)
        assert json.loads(result.data)["status"] == "failed"
        (dead,) = pubsub.published(DEAD_LETTERS)
        assert dead.data == job("j5"), "the dead letter carries the original job bytes"
        assert dead.attributes["error_code"] == "http_503" and dead.attributes["delivery_attempt"] == "5"
        (ack,) = pubsub.settles(final)
        assert pubsub.index(result) < pubsub.index(ack) and pubsub.index(dead) < pubsub.index(ack)

    asyncio.run(scenario())


def test_without_a_dead_letter_policy_no_attempt_is_final() -> None:
    pubsub = StubPubSub()
    pipeline = pipeline_failing_transiently()

    async def scenario() -> None:
        async with Running(pubsub, pipeline.handle, max_delivery_attempts=None) as running:
            message = await running.deliver(job(), delivery_attempt=100)
            assert await running.settled(message) == ["nack/stream"]

    asyncio.run(scenario())


def test_a_dead_letter_that_fails_to_publish_keeps_the_job() -> None:
    pubsub = StubPubSub()

    async def rejected(delivery: Delivery) -> Outcome:
        return Outcome(
            ack=True,
            result=result_for(delivery, JobStatus.REJECTED),
            dead_letter=DeadLetter(delivery.data, {"error_code": "invalid_job"}),
        )

    async def scenario() -> None:
        pubsub.publisher.topic_errors[DEAD_LETTERS] = RuntimeError("dead-letter topic gone")
        async with Running(pubsub, rejected) as running:
            message = await running.deliver(job())
            # The result lands, the dead letter does not: no ack.
            assert await running.settled(message) == ["nack/stream"]
            assert len(pubsub.published(RESULTS)) == 1 and pubsub.published(DEAD_LETTERS) == []

    asyncio.run(scenario())


def test_shutdown_gives_back_waiting_jobs_on_the_open_stream_and_acks_running_ones_by_unary_rpc() -> None:
    pubsub = StubPubSub()
    release = asyncio.Event()
    started: list[str] = []

    async def slow(delivery: Delivery) -> Outcome:
        started.append(json.loads(delivery.data)["job_id"])
        await release.wait()
        return await succeed(delivery)

    async def scenario() -> None:
        running = Running(pubsub, slow, max_in_flight=1, grace_s=2.0)
        async with running:
            first = await running.deliver(job("first"))
            second = await running.deliver(job("second"))  # waits for the only slot
            await until(lambda: started == ["first"])
            running.stop.set()
            assert await running.settled(second) == ["nack/stream"], "given back while the stream is open"
            await until(lambda: not pubsub.subscriber.stream.open)  # type: ignore[union-attr]
            release.set()
            assert await running.settled(first) == ["ack/unary"]
        assert first.lost == [], "nothing was sent on the closed stream"
        assert started == ["first"]
        assert pubsub.publisher.stopped, "the publisher is flushed at the end"
        stats = running.consumer.stats
        assert (stats.acked, stats.nacked, stats.released) == (1, 1, 0)

    asyncio.run(scenario())


def test_a_job_still_running_after_the_grace_period_is_released_not_nacked() -> None:
    pubsub = StubPubSub()

    async def hangs(delivery: Delivery) -> Outcome:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def scenario() -> None:
        running = Running(pubsub, hangs, grace_s=0.02)
        async with running:
            message = await running.deliver(job())
            await until(lambda: running.consumer.in_flight == 1)
        assert settles(pubsub, message) == [] and message.lost == []
        assert running.consumer.stats.released == 1

    asyncio.run(scenario())


def test_a_held_job_at_shutdown_is_nacked_by_unary_rpc_once_the_stream_closed() -> None:
    pubsub = StubPubSub()
    finished = asyncio.Event()

    async def retry_later(delivery: Delivery) -> Outcome:
        finished.set()
        return Outcome(ack=False)

    async def scenario() -> None:
        running = Running(pubsub, retry_later)
        async with running:
            message = await running.deliver(job())
            await finished.wait()
            running.stop.set()  # the 20 ms hold outlasts the 5 ms nack flush
        assert [(e.what, e.via, e.seconds) for e in settles(pubsub, message)] == [("modack", "unary", 0)]

    asyncio.run(scenario())


def test_a_failed_unary_settle_is_logged_and_the_job_left_to_redelivery() -> None:
    pubsub = StubPubSub()
    release = asyncio.Event()

    async def slow(delivery: Delivery) -> Outcome:
        await release.wait()
        return await succeed(delivery)

    async def scenario() -> None:
        running = Running(pubsub, slow)
        async with running:
            message = await running.deliver(job())
            await until(lambda: running.consumer.in_flight == 1)
            pubsub.subscriber.unary_error = RuntimeError("unavailable")
            running.stop.set()
            await until(lambda: not pubsub.subscriber.stream.open)  # type: ignore[union-attr]
            release.set()
        assert settles(pubsub, message) == [] and message.lost == []

    asyncio.run(scenario())


def test_a_stream_that_ends_by_itself_drains_and_raises_stream_failed() -> None:
    pubsub = StubPubSub()

    async def scenario() -> None:
        running = Running(pubsub, succeed)
        task = asyncio.ensure_future(running.consumer.run(running.stop))
        await until(lambda: pubsub.subscriber.stream is not None)
        assert running.consumer.stream_alive
        pubsub.subscriber.stream.fail(PermissionError("403 subscription access revoked"))  # type: ignore[union-attr]
        with pytest.raises(StreamFailed, match="PermissionError: 403 subscription access revoked"):
            await asyncio.wait_for(task, 5)
        assert not running.consumer.stream_alive

    asyncio.run(scenario())


def test_the_stream_leases_twice_the_in_flight_bound_and_extends_leases_a_short_step() -> None:
    pubsub = StubPubSub()

    async def scenario() -> None:
        async with Running(pubsub, succeed, max_in_flight=7):
            flow = pubsub.subscriber.stream.flow_control  # type: ignore[union-attr]
            assert flow.max_messages == 14 and flow.max_duration_per_lease_extension == 20

    asyncio.run(scenario())


def test_the_delivery_carries_the_attempt_publish_time_and_attributes() -> None:
    pubsub = StubPubSub()
    seen: list[Delivery] = []
    published = datetime(2026, 3, 1, 23, 59, tzinfo=UTC)

    async def record(delivery: Delivery) -> Outcome:
        seen.append(delivery)
        return await succeed(delivery)

    async def scenario() -> None:
        async with Running(pubsub, record, max_delivery_attempts=5) as running:
            message = await running.deliver(
                job(), attributes={"kind": "account-scoring"}, delivery_attempt=5, publish_time=published
            )
            await running.settled(message)

    asyncio.run(scenario())
    (delivery,) = seen
    assert delivery.final_attempt and delivery.delivery_attempt == 5
    assert delivery.publish_time == published and delivery.attributes == {"kind": "account-scoring"}


def test_max_delivery_attempts_is_read_from_the_dead_letter_policy() -> None:
    pubsub = StubPubSub()
    assert read_max_delivery_attempts(pubsub.subscriber, SUBSCRIPTION) is None
    pubsub.subscriber.max_delivery_attempts = 7
    assert read_max_delivery_attempts(pubsub.subscriber, SUBSCRIPTION) == 7


def test_nack_delay_grows_with_the_delivery_attempt_and_is_capped() -> None:
    for attempt, ceiling in [(None, 0.5), (1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (6, 10.0), (40, 10.0)]:
        delays = [nack_delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > 0, "jittered, so replicas do not retry in step"
    assert NACK_DELAY_BASE_S == 0.5 and NACK_DELAY_MAX_S == 10.0


class HeldMessage:
    """The parts of a pubsub_v1 subscriber Message the consumer uses, recording what it is told."""

    def __init__(self, n: int) -> None:
        self.data = b"{}"
        self.attributes = {"job_id": f"j{n}", "kind": "score"}
        self.message_id = str(n)
        self.ack_id = f"ack-{n}"
        self.delivery_attempt = 1
        self.publish_time = None
        self.calls: list[str] = []

    def ack(self) -> None:
        self.calls.append("ack")

    def nack(self) -> None:
        self.calls.append("nack")

    def drop(self) -> None:
        self.calls.append("drop")

    def modify_ack_deadline(self, seconds: int) -> None:
        self.calls.append(f"modack {seconds}")


class NoopPublisher:
    async def publish(self, outcome: object) -> None:
        return None

    def flush(self) -> None:
        return None


def test_a_held_job_leaves_its_slot_keeps_its_lease_and_is_never_nacked() -> None:
    import asyncio

    from worker.core.shapes import Outcome
    from worker.gcp.consumer import Consumer

    async def main() -> None:
        resumed = asyncio.Event()
        seen: list[str] = []

        async def handle(delivery):  # type: ignore[no-untyped-def]
            seen.append(delivery.attributes["job_id"])
            if delivery.attributes["job_id"] == "j1" and not resumed.is_set():
                return Outcome(ack=False, hold=resumed.wait)
            return Outcome(ack=True)

        consumer = Consumer(
            None,
            "sub",
            handle,
            NoopPublisher(),
            max_in_flight=1,
            grace_s=1,  # type: ignore[arg-type]
            max_delivery_attempts=5,
            lease_extension_s=10,
        )
        consumer._slots = asyncio.Semaphore(1)
        consumer._streaming = True
        held, other = HeldMessage(1), HeldMessage(2)
        first = asyncio.ensure_future(consumer._process(held))
        await asyncio.sleep(0.01)
        assert consumer.stats.held == 1 and len(consumer.leases) == 1
        # The one slot is free while j1 waits: j2 runs to its ack.
        await asyncio.wait_for(consumer._process(other), 1)
        assert other.calls == ["ack"]
        resumed.set()
        await asyncio.wait_for(first, 1)
        assert seen == ["j1", "j2", "j1"]
        # Taken from the client's lease management, kept by the worker, acked.
        assert held.calls == ["drop", "modack 10", "ack"]
        assert consumer.stats.held == 0 and len(consumer.leases) == 0

    asyncio.run(main())


def test_a_job_held_too_long_on_its_last_attempt_runs_once_more_without_a_hold() -> None:
    import asyncio

    from worker.core.shapes import Outcome
    from worker.gcp.consumer import Consumer

    async def main() -> None:
        deliveries = []

        async def never() -> None:
            await asyncio.Event().wait()

        async def handle(delivery):  # type: ignore[no-untyped-def]
            deliveries.append(delivery)
            return Outcome(ack=True) if not delivery.may_hold else Outcome(ack=False, hold=never)

        consumer = Consumer(
            None,
            "sub",
            handle,
            NoopPublisher(),
            max_in_flight=1,
            grace_s=1,  # type: ignore[arg-type]
            max_delivery_attempts=5,
            lease_extension_s=10,
            max_hold_s=0.05,
        )
        consumer._slots = asyncio.Semaphore(1)
        consumer._streaming = True
        message = HeldMessage(1)
        message.delivery_attempt = 5
        await asyncio.wait_for(consumer._process(message), 2)
        assert [d.may_hold for d in deliveries] == [True, False]
        assert message.calls[-1] == "ack" and "nack" not in message.calls

    asyncio.run(main())


BATCH_TOPIC = "projects/p/topics/jobs-batch"


def test_a_job_marked_batch_on_the_interactive_lane_is_moved_unrun_then_acked() -> None:
    pubsub = StubPubSub()
    ran: list[Delivery] = []

    async def handle(delivery: Delivery) -> Outcome:
        ran.append(delivery)
        return await succeed(delivery)

    async def scenario() -> None:
        async with Running(pubsub, handle) as running:
            running.consumer._batch_topic = BATCH_TOPIC  # as runtime/app.py builds it
            attributes = {"job_id": "bulk-1", "kind": "account-scoring", "lane": "batch"}
            message = await running.deliver(job("bulk-1"), attributes=attributes)
            assert await running.settled(message) == ["ack/stream"]
            (moved,) = pubsub.published(BATCH_TOPIC)
            assert moved.data == job("bulk-1") and moved.attributes == attributes
            assert ran == [] and pubsub.published(RESULTS) == []
            assert running.consumer.stats.moved == 1

    asyncio.run(scenario())


def test_a_job_that_cannot_be_moved_to_the_batch_lane_is_nacked_not_lost() -> None:
    pubsub = StubPubSub()
    pubsub.publisher.topic_errors[BATCH_TOPIC] = RuntimeError("PermissionDenied")

    async def scenario() -> None:
        async with Running(pubsub, succeed) as running:
            running.consumer._batch_topic = BATCH_TOPIC
            attributes = {"job_id": "bulk-2", "kind": "account-scoring", "lane": "batch"}
            message = await running.deliver(job("bulk-2"), attributes=attributes)
            assert await running.settled(message) == ["nack/stream"]
            assert pubsub.published(RESULTS) == []

    asyncio.run(scenario())


def test_the_batch_lane_runs_a_job_marked_batch_and_never_moves_it() -> None:
    pubsub = StubPubSub()

    async def scenario() -> None:
        slots = LaneSlots(4)
        consumer = Consumer(
            pubsub.subscriber,
            SUBSCRIPTION,
            succeed,
            ResultPublisher(pubsub.publisher, RESULTS, DEAD_LETTERS),
            max_in_flight=4,
            grace_s=1.0,
            max_delivery_attempts=5,
            lane=BATCH,
            slots=slots.lane(BATCH),
            batch_topic=BATCH_TOPIC,
        )
        stop = asyncio.Event()
        task = asyncio.ensure_future(Lanes([consumer]).run(stop))
        await until(lambda: pubsub.subscriber.stream is not None)
        attributes = {"job_id": "c1", "kind": "account-scoring", "lane": "batch"}
        message = await asyncio.to_thread(pubsub.subscriber.deliver, job("c1"), attributes=attributes)
        await until(lambda: bool(pubsub.settles(message)))
        assert [e.what for e in pubsub.settles(message)] == ["ack"]
        assert len(pubsub.published(RESULTS)) == 1 and pubsub.published(BATCH_TOPIC) == []
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
