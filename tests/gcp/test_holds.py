"""Held jobs and their bounds (docs/contract.md, "Acknowledgement rules"), on the
Pub/Sub stand-in: hold time adds up over the hold cycles of one delivery, the worker
keeps held leases itself up to WORKER_MAX_HELD (and leaves the rest to the client),
and the client's `max_lease_duration` is what the worker means to keep a job."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog

from tests.pubsub_stub import StubMessage, StubPubSub
from worker.core.breaker import CircuitBreaker
from worker.core.catalog import BreakerSpec, Catalog, default_catalog_dir
from worker.core.messages import JobStatus, Result
from worker.core.shapes import Delivery, Outcome
from worker.gcp import consumer as consumer_module
from worker.gcp.consumer import NACK_DELAY_MAX_S, Consumer, lease_cap
from worker.gcp.lease import HeldLeases
from worker.gcp.results import ResultPublisher

SUBSCRIPTION = "projects/p/subscriptions/jobs-worker"
RESULTS = "projects/p/topics/job-results"
DEAD_LETTERS = "projects/p/topics/jobs-dead-letter"
Handle = Callable[[Delivery], Awaitable[Outcome]]


@pytest.fixture(autouse=True)
def short_nack_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nacks after 5 ms instead of 0.5-10 s (the policy is tested in test_consumer.py)."""
    monkeypatch.setattr(consumer_module, "nack_delay", lambda attempt: 0.005)
    monkeypatch.setattr(consumer_module, "_NACK_FLUSH_S", 0.005)


def job(job_id: str = "j1") -> bytes:
    return json.dumps({"job_id": job_id, "kind": "account-scoring", "payload": {}}).encode()


def succeeded(delivery: Delivery) -> Outcome:
    at = datetime.now(UTC)
    body = json.loads(delivery.data)
    status = JobStatus.SUCCEEDED if delivery.may_hold else JobStatus.FAILED
    result = Result(
        job_id=body["job_id"], kind=body["kind"], status=status, started_at=at, finished_at=at, duration_ms=0
    )
    return Outcome.settled(result)


class Running:
    """A consumer running on the stand-in, in the test's event loop."""

    def __init__(self, pubsub: StubPubSub, handle: Handle, **options: Any) -> None:
        self.pubsub = pubsub
        options.setdefault("max_in_flight", 4)
        options.setdefault("grace_s", 1.0)
        options.setdefault("max_delivery_attempts", 5)
        self.consumer = Consumer(
            pubsub.subscriber,
            SUBSCRIPTION,
            handle,
            ResultPublisher(pubsub.publisher, RESULTS, DEAD_LETTERS),
            **options,
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

    async def settled(self, message: StubMessage, timeout: float = 3.0) -> list[str]:
        def done() -> bool:
            return any(e.what in ("ack", "nack") for e in self.pubsub.settles(message))

        await until(done, timeout)
        return [e.what for e in self.pubsub.settles(message) if e.what in ("ack", "nack")]


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


def breaker_always_failing(open_s: float) -> tuple[Handle, list[float]]:
    """A handler in front of a real circuit breaker whose service always fails: each run
    is refused while the breaker is open, or is a failed half-open probe (the issue's
    reproduction: a fresh WORKER_MAX_HOLD_SECONDS timer per cycle held it forever)."""
    breaker = CircuitBreaker("account-scoring", BreakerSpec(failures=1, open_s=open_s, probes=1))
    calls: list[float] = []

    async def handle(delivery: Delivery) -> Outcome:
        if not delivery.may_hold:
            return succeeded(delivery)
        if breaker.admit():
            calls.append(asyncio.get_running_loop().time())
            breaker.record(False)  # the service answered 503
        return Outcome.held(breaker.wait)

    return handle, calls


def test_hold_time_adds_up_over_breaker_cycles_and_the_job_is_nacked_at_the_bound() -> None:
    pubsub = StubPubSub()
    handle, calls = breaker_always_failing(open_s=0.02)

    async def scenario() -> None:
        async with Running(pubsub, handle, max_hold_s=0.2) as running:
            started = asyncio.get_running_loop().time()
            with structlog.testing.capture_logs() as logs:
                message = await running.deliver(job(), delivery_attempt=1)
                assert await running.settled(message) == ["nack"]
            took = asyncio.get_running_loop().time() - started
            # ~0.2 s of holds in all, not 0.2 s per cycle: about 0.2 / 0.02 probes.
            assert 0.18 <= took < 1.0, took
            assert 3 <= len(calls) <= 12, len(calls)
            (line,) = [entry for entry in logs if entry["event"] == "job_held_too_long"]
            assert line["max_hold_s"] == 0.2 and 0.18 <= line["held_s"] < 1.0
            assert running.consumer.stats.nacked == 1 and running.consumer.stats.held == 0
            assert len(running.consumer.leases) == 0, "the keeper let go of the nacked job"

    asyncio.run(scenario())


def test_hold_time_adds_up_across_a_pause_then_a_breaker() -> None:
    pubsub = StubPubSub()
    cycles: list[str] = []

    async def pause_then_breaker(delivery: Delivery) -> Outcome:
        # First held by a 0.12 s pause, then by a breaker that never closes: the pause
        # spent most of the 0.2 s budget, so the breaker hold gets only what is left.
        if not cycles:
            cycles.append("paused")
            return Outcome.held(lambda: asyncio.sleep(0.12))
        cycles.append("breaker")
        return Outcome.held(asyncio.Event().wait)

    async def scenario() -> None:
        async with Running(pubsub, pause_then_breaker, max_hold_s=0.2) as running:
            started = asyncio.get_running_loop().time()
            message = await running.deliver(job(), delivery_attempt=2)
            assert await running.settled(message) == ["nack"]
            took = asyncio.get_running_loop().time() - started
            assert 0.18 <= took < 0.3, f"{took:.3f}s: the breaker hold restarted the clock"
            assert cycles == ["paused", "breaker"]

    asyncio.run(scenario())


def test_on_its_last_attempt_a_job_held_past_the_bound_runs_once_more_and_fails() -> None:
    pubsub = StubPubSub()
    handle, calls = breaker_always_failing(open_s=0.02)

    async def scenario() -> None:
        async with Running(pubsub, handle, max_hold_s=0.1, max_delivery_attempts=5) as running:
            message = await running.deliver(job(), delivery_attempt=5)
            assert await running.settled(message) == ["ack"]
        (result,) = pubsub.published(RESULTS)
        assert json.loads(result.data)["status"] == "failed", "run once more, without a hold"
        assert calls, "the breaker was probed while the job was held"

    asyncio.run(scenario())


def test_a_held_job_is_dropped_from_the_client_and_its_lease_kept_by_the_worker() -> None:
    pubsub = StubPubSub()
    resume = asyncio.Event()

    async def held_until_resumed(delivery: Delivery) -> Outcome:
        return succeeded(delivery) if resume.is_set() else Outcome.held(resume.wait)

    async def scenario() -> None:
        running = Running(pubsub, held_until_resumed, lease_extension_s=10)
        running.consumer.leases.interval_s = 0.01
        async with running:
            message = await running.deliver(job())
            await until(lambda: running.consumer.stats.held == 1)
            assert message.dropped, "out of the client's lease management and flow control"
            await until(lambda: len([e for e in pubsub.settles(message) if e.what == "modack"]) >= 3)
            assert {e.seconds for e in pubsub.settles(message)} == {10}
            resume.set()
            assert await running.settled(message) == ["ack"]
            modacks = len(pubsub.settles(message))
            await asyncio.sleep(0.05)
            assert len(pubsub.settles(message)) == modacks, "still extended after its ack"
            assert len(running.consumer.leases) == 0

    asyncio.run(scenario())


def test_past_worker_max_held_a_held_job_stays_in_the_clients_care_and_is_still_bounded() -> None:
    pubsub = StubPubSub()

    async def never_resumed(delivery: Delivery) -> Outcome:
        return Outcome.held(asyncio.Event().wait)

    async def scenario() -> None:
        async with Running(pubsub, never_resumed, max_held=1, max_hold_s=0.15) as running:
            first = await running.deliver(job("a"))
            await until(lambda: running.consumer.stats.held == 1)
            second = await running.deliver(job("b"))
            await until(lambda: running.consumer.stats.held == 2)
            assert len(running.consumer.leases) == 1
            assert first.dropped and not second.dropped, "the second counts against flow control"
            assert await running.settled(first) == ["nack"]
            assert await running.settled(second) == ["nack"]
            assert len(running.consumer.leases) == 0

    asyncio.run(scenario())


def test_held_leases_stop_extending_a_job_given_back_and_refuse_past_the_bound() -> None:
    class Message:
        def __init__(self, ack_id: str) -> None:
            self.ack_id = ack_id
            self.data = b"{}"
            self.calls: list[str] = []

        def drop(self) -> None:
            self.calls.append("drop")

        def modify_ack_deadline(self, seconds: int) -> None:
            self.calls.append(f"modack {seconds}")

    async def scenario() -> None:
        leases = HeldLeases(12, max_held=2, interval_s=0.01)
        a, b, c = Message("a"), Message("b"), Message("c")
        assert leases.take(a) and leases.take(b) and leases.take(a)
        assert not leases.take(c) and c.calls == [], "full: left with the client"
        keeper = asyncio.ensure_future(leases.run())
        await asyncio.sleep(0.05)
        leases.give_back(a)
        extended = len(a.calls)
        await asyncio.sleep(0.05)
        keeper.cancel()
        assert a.calls[:2] == ["drop", "modack 12"] and extended > 2
        assert len(a.calls) == extended, "extended after it was given back"
        assert len(b.calls) > extended
        assert len(leases) == 1

    asyncio.run(scenario())


def test_the_clients_max_lease_duration_is_what_the_worker_means_to_keep_a_job() -> None:
    pubsub = StubPubSub()

    async def scenario() -> None:
        options = {"max_hold_s": 600.0, "longest_run_s": 130.0, "grace_s": 8.0}
        async with Running(pubsub, lambda d: asyncio.sleep(0, succeeded(d)), **options):
            flow = pubsub.subscriber.stream.flow_control  # type: ignore[union-attr]
            assert flow.max_lease_duration == 600 + 2 * 130 + NACK_DELAY_MAX_S + 8
        assert lease_cap(3600, 0, 8) > 3600, "above the client's 1 h default, which held jobs outlived"

    asyncio.run(scenario())


def test_a_kinds_longest_run_counts_every_attempt_and_the_waits_between() -> None:
    catalog = Catalog.load(default_catalog_dir())
    kind = next(iter(catalog[name] for name in catalog))
    expected = kind.attempts * kind.timeout_s + (kind.attempts - 1) * max(kind.backoff_max_s, 30.0)
    assert kind.longest_run_s(30.0) == expected
    assert catalog.longest_run_s(30.0) >= expected


def test_a_job_running_at_shutdown_keeps_its_lease_by_unary_rpc_until_it_is_acked() -> None:
    pubsub = StubPubSub()
    release = asyncio.Event()

    async def slow(delivery: Delivery) -> Outcome:
        await release.wait()
        return succeeded(delivery)

    async def scenario() -> None:
        running = Running(pubsub, slow, lease_extension_s=10, grace_s=2.0)
        running.consumer.leases.interval_s = 0.01
        async with running:
            message = await running.deliver(job())
            await until(lambda: running.consumer.in_flight == 1)
            running.stop.set()
            await until(lambda: not pubsub.subscriber.stream.open)  # type: ignore[union-attr]
            # The stream and its leaser are gone; the job still runs, and its lease is kept.
            await until(lambda: len([e for e in pubsub.settles(message) if e.via == "unary"]) >= 3)
            release.set()
        settles = [(e.what, e.via, e.seconds) for e in pubsub.settles(message)]
        assert message.dropped and settles[0] == ("modack", "stream", 10), "taken over before the close"
        assert settles[-1] == ("ack", "unary", None)
        assert set(settles[1:-1]) == {("modack", "unary", 10)}
        assert message.lost == [], "nothing was sent on the closed stream"

    asyncio.run(scenario())


def test_held_jobs_are_bounded_in_bytes_too_and_a_given_back_job_frees_its_bytes() -> None:
    class Message:
        def __init__(self, ack_id: str, size: int) -> None:
            self.ack_id = ack_id
            self.data = b"x" * size
            self.dropped = False

        def drop(self) -> None:
            self.dropped = True

        def modify_ack_deadline(self, seconds: int) -> None:
            return None

    leases = HeldLeases(10, max_held=100, max_bytes=1000)
    big, small, other = Message("a", 700), Message("b", 400), Message("c", 300)
    assert leases.take(big) and leases.bytes == 700
    assert not leases.take(small) and not small.dropped, "over the bytes bound: left with the client"
    assert leases.take(other) and leases.bytes == 1000
    leases.give_back(big)
    assert leases.bytes == 300 and leases.take(small) and leases.bytes == 700
    leases.give_back(big)  # twice: nothing more to free
    assert leases.bytes == 700


def test_past_worker_max_held_bytes_a_held_job_stays_in_the_clients_care() -> None:
    pubsub = StubPubSub()

    async def never_resumed(delivery: Delivery) -> Outcome:
        return Outcome.held(asyncio.Event().wait)

    async def scenario() -> None:
        size = len(job("a"))
        async with Running(pubsub, never_resumed, max_held_bytes=size + 1, max_hold_s=0.15) as running:
            first = await running.deliver(job("a"))
            await until(lambda: running.consumer.stats.held == 1)
            second = await running.deliver(job("b"))
            await until(lambda: running.consumer.stats.held == 2)
            assert first.dropped and not second.dropped
            assert running.consumer.leases.bytes == size
            assert await running.settled(second) == ["nack"]
            assert await running.settled(first) == ["nack"]
            assert running.consumer.leases.bytes == 0

    asyncio.run(scenario())


def test_worker_max_held_bytes_is_read_and_a_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.core.errors import ConfigError
    from worker.core.settings import load_settings

    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "p")
    assert load_settings().max_held_bytes == 256 * 1024 * 1024
    monkeypatch.setenv("WORKER_MAX_HELD_BYTES", "1048576")
    assert load_settings().max_held_bytes == 1024 * 1024
    monkeypatch.setenv("WORKER_MAX_HELD_BYTES", "0")
    with pytest.raises(ConfigError, match="WORKER_MAX_HELD_BYTES='0' is invalid"):
        load_settings()


def test_after_the_stream_dies_by_itself_settles_take_unary_rpcs_and_nothing_is_counted_as_sent() -> None:
    from worker.gcp.consumer import StreamFailed

    pubsub = StubPubSub()
    release = asyncio.Event()

    async def slow(delivery: Delivery) -> Outcome:
        await release.wait()
        return succeeded(delivery)

    async def scenario() -> None:
        running = Running(pubsub, slow, max_in_flight=1, grace_s=2.0)
        task = asyncio.ensure_future(running.consumer.run(running.stop))
        await until(lambda: pubsub.subscriber.stream is not None)
        calling = await running.deliver(job("calling"))
        waiting = await running.deliver(job("waiting"))  # behind the only slot
        await until(lambda: running.consumer.in_flight == 2)
        pubsub.subscriber.stream.fail(PermissionError("403 subscription access revoked"))  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
        release.set()
        with pytest.raises(StreamFailed):
            await asyncio.wait_for(task, 5)
        assert calling.lost == [] and waiting.lost == [], "settles sent on the dead stream"
        assert [(e.what, e.via) for e in pubsub.settles(calling) if e.what == "ack"] == [("ack", "unary")]
        stats = running.consumer.stats
        assert (stats.acked, stats.nacked, stats.released) == (1, 0, 1)

    asyncio.run(scenario())


def test_a_job_spawned_but_not_started_when_the_drain_begins_is_given_back_not_run() -> None:
    pubsub = StubPubSub()
    ran: list[Delivery] = []

    async def record(delivery: Delivery) -> Outcome:
        ran.append(delivery)
        return succeeded(delivery)

    async def scenario() -> None:
        running = Running(pubsub, record)
        consumer = running.consumer
        async with running:
            stream = pubsub.subscriber.stream
            assert stream is not None
            message = StubMessage(stream, job(), {}, delivery_attempt=1, publish_time=datetime.now(UTC))
            # The library hands the job over and the drain begins in the same turn of the
            # loop: the job's task exists but has not run when the drain gives back the
            # jobs waiting.
            consumer._spawn(message)
            running.stop.set()
            consumer._draining = True  # what the drain's first step does, before the task runs
            await until(lambda: bool(pubsub.settles(message)))
        assert ran == [], "run during the shutdown"
        assert [(e.what, e.via) for e in pubsub.settles(message)] == [("nack", "stream")]

    asyncio.run(scenario())
