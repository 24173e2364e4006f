"""Liveness and readiness as Cloud Run's probes see them: HTTP status and JSON body.

The subscriber here is a stand-in object passed to the probe (the real client is
exercised by tests/e2e/test_health.py against the emulator).
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import structlog
from google.api_core import exceptions

from localcloud import free_port
from worker.core.errors import ConfigError
from worker.core.settings import Settings, load_settings
from worker.gcp.consumer import ConsumerStats
from worker.runtime.health import Health, PubSubProbe, serve_health


@dataclass
class StubSubscriber:
    """Answers get_subscription the way the test says; records the calls' options."""

    error: Exception | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)

    def subscription_path(self, project: str, subscription: str) -> str:
        return f"projects/{project}/subscriptions/{subscription}"

    def get_subscription(self, **kwargs: Any) -> object:
        self.calls.append(kwargs)
        if self.error is not None:
            raise self.error
        return object()


@dataclass
class StubConsumer:
    stream_alive: bool = True
    in_flight: int = 0
    stats: ConsumerStats = field(default_factory=ConsumerStats)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings(**fields: Any) -> Settings:
    return Settings(project="p", **fields)


@pytest.mark.parametrize(
    ("error", "answered"),
    [
        (None, True),
        (exceptions.PermissionDenied("no pubsub.subscriptions.get"), True),
        (exceptions.NotFound("gone"), True),
        (exceptions.ServiceUnavailable("connection refused"), False),
        (exceptions.DeadlineExceeded("slow"), False),
        (ValueError("Cannot invoke RPC on closed channel!"), False),
    ],
)
def test_the_probe_counts_any_answer_from_pubsub(error: Exception | None, answered: bool) -> None:
    subscriber = StubSubscriber(error)
    probe = PubSubProbe(subscriber, "projects/p/subscriptions/s", interval_s=1, timeout_s=0.5)
    assert (probe.probe_once() is None) is answered
    # One short attempt: the client's own retry would hide an outage for a minute.
    assert subscriber.calls == [{"subscription": "projects/p/subscriptions/s", "retry": None, "timeout": 0.5}]


async def watched(health: Health, consumer: StubConsumer, subscriber: StubSubscriber) -> AsyncExitStack:
    stack = AsyncExitStack()
    health.watch(consumer, subscriber, stack)  # type: ignore[arg-type]
    return stack


def test_not_ready_nor_live_until_the_worker_is_built() -> None:
    async def scenario() -> None:
        health = Health(settings())
        assert (health.readiness().ok, health.readiness().status) == (False, "starting")
        assert (health.liveness().ok, health.liveness().status) == (False, "starting")
        async with await watched(health, StubConsumer(), StubSubscriber()):
            assert health.readiness().ok
            assert health.liveness().status == "ok"

    asyncio.run(scenario())


def test_silence_from_pubsub_longer_than_the_stall_window_fails_liveness() -> None:
    async def scenario() -> None:
        clock = Clock()
        health = Health(settings(health_stall_s=60), clock)
        consumer = StubConsumer()
        async with await watched(health, consumer, StubSubscriber(exceptions.ServiceUnavailable("down"))):
            clock.now += 59
            assert health.liveness().ok
            clock.now += 2
            verdict = health.liveness()
            assert (verdict.ok, verdict.status) == (False, "stalled")
            assert verdict.detail["pubsub_silent_s"] == 61 and verdict.detail["stream_alive"] is True
            # A message arriving proves the stream works, whatever the probe says.
            consumer.stats.last_message_at = clock.now
            assert health.liveness().ok

    asyncio.run(scenario())


def test_a_dead_stream_fails_liveness_at_once() -> None:
    async def scenario() -> None:
        health = Health(settings())
        async with await watched(health, StubConsumer(stream_alive=False), StubSubscriber()):
            assert health.liveness().status == "stream_down"

    asyncio.run(scenario())


def test_the_probe_runs_in_the_background_and_logs_the_outage_once() -> None:
    async def scenario() -> None:
        health = Health(settings(health_stall_s=0.3))
        subscriber = StubSubscriber(exceptions.ServiceUnavailable("connection refused"))
        with structlog.testing.capture_logs() as logs:
            async with await watched(health, StubConsumer(), subscriber):
                await asyncio.sleep(0.6)
                assert health.liveness().status == "stalled"
                assert health.liveness().status == "stalled"
                subscriber.error = None
                await asyncio.sleep(0.3)
                assert health.liveness().ok
        assert len(subscriber.calls) >= 3  # every stall_s / 3
        events = [e["event"] for e in logs]
        assert events.count("pubsub_unreachable") == 1
        assert events.count("liveness_failing") == 1
        assert "pubsub_reachable_again" in events

    asyncio.run(scenario())


def test_the_endpoints_answer_on_port_with_json() -> None:
    async def scenario() -> None:
        port = free_port()
        async with AsyncExitStack() as stack:
            health = await serve_health(settings(port=port, health_host="127.0.0.1"), stack)
            assert health is not None
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    assert response.status == 503
                    assert (await response.json())["status"] == "starting"
                health.watch(StubConsumer(), StubSubscriber(), stack)  # type: ignore[arg-type]
                async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    assert response.status == 200
                async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                    assert response.status == 200
                    body = await response.json()
                    assert body["status"] == "ok" and body["received"] == 0 and body["in_flight"] == 0

    asyncio.run(scenario())


def test_without_port_nothing_is_served() -> None:
    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            assert await serve_health(settings(), stack) is None

    asyncio.run(scenario())


def test_readiness_reports_pauses_and_breakers_but_an_open_breaker_does_not_fail_it() -> None:
    from worker.core.catalog import Catalog, JobKind
    from worker.core.guard import Guard
    from worker.core.pauses import PauseEntry

    async def scenario() -> None:
        kind = JobKind(kind="score", service="scoring")
        guard = Guard(Catalog({"score": kind}), region="r", default_ceiling=100)
        breaker = guard.breaker(("scoring", "r"))
        for _ in range(5):
            breaker.record(False)
        guard.pauses.apply(PauseEntry("score", True, at=1.0))
        health = Health(settings())
        stack = AsyncExitStack()
        health.watch(StubConsumer(), StubSubscriber(), stack, status=guard.snapshot)  # type: ignore[arg-type]
        async with stack:
            verdict = health.readiness()
        assert verdict.ok and verdict.status == "ready"
        assert verdict.detail["targets"]["scoring (r)"]["breaker"] == "open"
        assert verdict.detail["paused"] == {"score": None}

    asyncio.run(scenario())


def test_a_worker_pool_listens_on_worker_health_port_which_wins_over_port() -> None:
    """A worker pool gets no PORT: its deploy sets WORKER_HEALTH_PORT for the probes."""

    async def scenario() -> None:
        pool_port, service_port = free_port(), free_port()
        async with AsyncExitStack() as stack:
            both = settings(port=service_port, health_port=pool_port, health_host="127.0.0.1")
            assert await serve_health(both, stack) is not None
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{pool_port}/readyz") as response:
                    assert response.status == 503
                with pytest.raises(aiohttp.ClientConnectionError):
                    await http.get(f"http://127.0.0.1:{service_port}/readyz")

    asyncio.run(scenario())


def test_a_taken_health_port_is_a_configuration_error_naming_the_variable() -> None:
    async def scenario() -> None:
        port = free_port()
        async with AsyncExitStack() as stack:
            await serve_health(settings(health_port=port, health_host="127.0.0.1"), stack)
            with pytest.raises(ConfigError, match=rf"WORKER_HEALTH_PORT={port}: cannot listen"):
                await serve_health(settings(health_port=port, health_host="127.0.0.1"), stack)

    asyncio.run(scenario())


def test_the_health_host_must_be_an_address() -> None:
    with pytest.raises(ConfigError, match=r"WORKER_HEALTH_HOST='localhost' is invalid: .*127\.0\.0\.1"):
        load_settings(GOOGLE_CLOUD_PROJECT="p", WORKER_HEALTH_HOST="localhost")
