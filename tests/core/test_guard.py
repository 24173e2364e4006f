"""The guard around each HTTP attempt: pauses, breakers, limits; and how a hold reaches the consumer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.aio import run_async
from worker.core.breaker import OPEN
from worker.core.catalog import Catalog, JobKind
from worker.core.errors import ConfigError, HoldJob, TransientJobError
from worker.core.guard import Capacity, Guard, target_ceiling
from worker.core.pauses import PauseEntry
from worker.core.pipeline import Pipeline
from worker.core.shapes import Delivery


def guard(*kinds: JobKind, capacity: Capacity | None = None, default: int = 100) -> Guard:
    catalog = Catalog({k.kind: k for k in kinds})
    return Guard(catalog, region="r", default_ceiling=default, capacity=lambda s, r: capacity)


async def attempt(g: Guard, kind: JobKind, status: int | None = 200, exc: Exception | None = None) -> None:
    async with g.call(kind, "r") as call:
        if exc is not None:
            raise exc
        assert status is not None
        call.answered(status)


SCORE = JobKind(kind="score", service="scoring")
ECHO = JobKind(kind="echo", service="echo")


@run_async
async def test_a_paused_kind_is_held_until_resumed_and_other_kinds_still_go() -> None:
    g = guard(SCORE, ECHO)
    g.pauses.apply(PauseEntry("score", True, at=1.0))
    with pytest.raises(HoldJob) as held:
        await attempt(g, SCORE)
    assert held.value.reason == "paused"
    await attempt(g, ECHO)
    waiter = asyncio.ensure_future(held.value.wait())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    g.pauses.apply(PauseEntry("score", False, at=2.0))
    await asyncio.wait_for(waiter, 1)
    await attempt(g, SCORE)


@run_async
async def test_the_failure_that_opens_the_breaker_holds_its_job_and_no_call_goes_after() -> None:
    g = guard(SCORE, ECHO)
    for _ in range(4):
        await attempt(g, SCORE, 503)
    with pytest.raises(HoldJob, match="breaker_open"):
        await attempt(g, SCORE, 503)
    assert g.breaker(("scoring", "r")).state == OPEN
    calls = 0

    async def count() -> None:
        nonlocal calls
        async with g.call(SCORE, "r") as call:
            calls += 1
            call.answered(200)

    with pytest.raises(HoldJob):
        await count()
    assert calls == 0
    await attempt(g, ECHO), "another service's breaker is its own"
    assert g.snapshot()["targets"]["scoring (r)"]["breaker"] == "open"


@run_async
async def test_timeouts_count_as_failures_and_429_does_not() -> None:
    g = guard(SCORE)
    for _ in range(20):
        await attempt(g, SCORE, 429)
    assert g.breaker(("scoring", "r")).state == "closed"
    assert g.limit(("scoring", "r")).current < 100, "but 429 cuts the adaptive limit"
    for _ in range(4):
        with pytest.raises(TransientJobError):
            await attempt(g, SCORE, exc=TransientJobError("timeout", "svc did not answer"))
    with pytest.raises(HoldJob):
        await attempt(g, SCORE, exc=TransientJobError("timeout", "svc did not answer"))


def test_the_ceiling_comes_from_the_kind_else_the_service_else_the_default() -> None:
    capacity = Capacity(3, 10, "Service scoring (scaling.max_instance_count)")
    assert target_ceiling([SCORE], capacity, 100) == (30, capacity.describe())
    assert "max_instance_count 3 x max_instance_request_concurrency 10" in capacity.describe()
    limited = JobKind(kind="score", service="scoring", max_concurrency=7)
    assert target_ceiling([limited], capacity, 100) == (7, "catalog: kind 'score' max_concurrency")
    ceiling, source = target_ceiling([SCORE], None, 100)
    assert ceiling == 100 and source.startswith("WORKER_MAX_IN_FLIGHT")
    g = guard(SCORE, capacity=capacity)
    assert g.limit(("scoring", "r")).ceiling == 30


@run_async
async def test_max_concurrency_and_the_service_figure_bound_calls_in_flight() -> None:
    for kind, capacity in [
        (JobKind(kind="score", service="scoring", max_concurrency=3), None),
        (SCORE, Capacity(1, 3)),
    ]:
        g = guard(kind, capacity=capacity)
        in_flight = peak = 0

        async def one(g: Guard = g, kind: JobKind = kind) -> None:
            nonlocal in_flight, peak
            async with g.call(kind, "r") as call:
                in_flight += 1
                peak = max(peak, in_flight)
                await asyncio.sleep(0.01)
                in_flight -= 1
                call.answered(200)

        await asyncio.gather(*(one() for _ in range(12)))
        assert peak == 3


@run_async
async def test_rate_per_s_spaces_call_starts() -> None:
    kind = JobKind(kind="score", service="scoring", rate_per_s=100, rate_burst=1)
    g = guard(kind)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(11):
        await attempt(g, kind)
    assert loop.time() - started >= 0.095  # 10 intervals of 10 ms after the first token


async def _wait() -> None:
    return None


def held_pipeline() -> Pipeline:
    """A pipeline whose every call is held (an open breaker), waiting on `_wait`."""

    class Resolver:
        async def resolve(self, service: str, region: str) -> str:
            return "https://scoring"

    class Invoker:
        async def invoke(self, kind, url, job, region="R"):  # type: ignore[no-untyped-def]
            raise HoldJob("breaker_open", _wait)

    return Pipeline(Catalog({"score": SCORE}), Resolver(), Invoker(), region="r", max_payload_bytes=10_000)


def test_a_hold_leaves_the_pipeline_as_an_outcome_to_hold_not_a_nack() -> None:
    pipeline = held_pipeline()
    body = json.dumps({"job_id": "j1", "kind": "score", "payload": {}}).encode()
    outcome = asyncio.run(pipeline.handle(Delivery(body, {}, final_attempt=True)))
    assert not outcome.ack and outcome.result is None and outcome.dead_letter is None
    assert outcome.hold is _wait, "held even on the last attempt: never failed for it"
    assert outcome.is_held and outcome.counted, "a held job counts as an outcome of its kind"
    assert outcome.kind == "score"


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("max_concurrency = 0", "max_concurrency"),
        ("rate_per_s = -5", "rate_per_s"),
        ("rate_burst = 0\nrate_per_s = 5", "rate_burst"),
        ("max_concurency = 5", "max_concurency"),
        ("[breaker]\nfailures = 0", "breaker.failures"),
        ("[breaker]\nopen_after = 3", "breaker.open_after"),
    ],
)
def test_a_bad_limit_or_unknown_field_fails_start_up_naming_file_and_field(
    tmp_path: Path, line: str, field: str
) -> None:
    (tmp_path / "score.toml").write_text(f'kind = "score"\nservice = "scoring"\n{line}\n')
    with pytest.raises(ConfigError) as failed:
        Catalog.load(tmp_path)
    assert str(tmp_path / "score.toml") in str(failed.value)
    assert f"field {field!r}" in str(failed.value)


def test_limits_in_the_catalog_are_read() -> None:
    kind = JobKind.model_validate(
        {
            "kind": "score",
            "service": "s",
            "max_concurrency": 20,
            "rate_per_s": 2.5,
            "breaker": {"failures": 3, "open_s": 2},
        }
    )
    assert (kind.max_concurrency, kind.rate_per_s, kind.burst) == (20, 2.5, 2)
    assert (kind.breaker.failures, kind.breaker.open_s, kind.breaker.probes) == (3, 2, 3)
    assert JobKind(kind="x", service="s", rate_per_s=0.2).burst == 1


@run_async
async def test_a_call_waiting_for_room_when_the_kind_is_paused_is_held_not_made() -> None:
    kind = JobKind(kind="score", service="scoring", max_concurrency=1)
    g = guard(kind)
    running = g.call(kind, "r")
    await running.__aenter__()
    waiting = asyncio.ensure_future(attempt(g, kind))
    await asyncio.sleep(0.01)
    g.pauses.apply(PauseEntry("score", True, at=1.0))
    running.answered(200)
    await running.__aexit__(None, None, None)
    with pytest.raises(HoldJob, match="paused"):
        await waiting
    assert g.limit(("scoring", "r")).in_flight == 0


def test_a_job_held_too_long_on_its_last_attempt_fails_with_a_result() -> None:
    pipeline = held_pipeline()
    body = json.dumps({"job_id": "j1", "kind": "score", "payload": {}}).encode()
    outcome = asyncio.run(pipeline.handle(Delivery(body, {}, final_attempt=True, may_hold=False)))
    assert outcome.ack and outcome.hold is None and outcome.dead_letter is not None
    assert outcome.result is not None and outcome.result.error is not None
    assert outcome.result.status.value == "failed" and outcome.result.error.code == "held_too_long"


async def answered(
    g: Guard, kind: JobKind, status: int, retry_after: float | None = None, retry: bool = False
) -> None:
    async with g.call(kind, "r", retry=retry) as call:
        call.answered(status, retry_after)


@run_async
async def test_429_and_503_with_retry_after_cut_the_limit_and_a_bare_503_does_not() -> None:
    quiet = JobKind(kind="score", service="scoring", breaker={"failures": 1000, "min_calls": 1000})
    g = guard(quiet, default=40)
    limit = g.limit(("scoring", "r"))
    await answered(g, quiet, 503)
    assert limit.current == 40, "one bare 503 is a failure, not overload"
    await answered(g, quiet, 503, retry_after=2.0)
    assert limit.current == 1, "Cloud Run's overload answer (cut from the 1 call in flight)"
    g = guard(quiet, default=40)
    await answered(g, quiet, 429)
    assert g.limit(("scoring", "r")).current == 1


@run_async
async def test_a_jobs_retries_count_once_for_the_limit() -> None:
    quiet = JobKind(kind="score", service="scoring", breaker={"failures": 1000, "min_calls": 1000})
    g = guard(quiet, default=40)
    limit = g.limit(("scoring", "r"))
    # 8 jobs in flight are refused; six retry (room for six now), three times each,
    # and are refused each time.
    first = [g.call(quiet, "r") for _ in range(8)]
    for call in first:
        await call.__aenter__()
    for call in first:
        call.answered(429)
        await call.__aexit__(None, None, None)
    assert limit.current == 6
    for _ in range(3):
        retries = [g.call(quiet, "r", retry=True) for _ in range(6)]
        for call in retries:
            await call.__aenter__()
        for call in retries:
            call.answered(429)
            await call.__aexit__(None, None, None)
    assert limit.current == 6, "retries of refused jobs cut it again"
    await answered(g, quiet, 200, retry=True)  # a retry's success still counts
    assert limit.in_flight == 0


@run_async
async def test_a_job_waiting_for_a_rate_token_holds_no_place_under_the_adaptive_limit() -> None:
    rated = JobKind(kind="score", service="scoring", rate_per_s=20, rate_burst=1)
    g = guard(rated, default=40)
    limit = g.limit(("scoring", "r"))
    first = g.call(rated, "r")
    await first.__aenter__()  # took the one token of the burst
    second = asyncio.ensure_future(attempt(g, rated))  # waits ~50 ms for the next token
    await asyncio.sleep(0.01)
    assert limit.in_flight == 1, "the job waiting for a token counts as a call in flight"
    first.answered(200)
    await first.__aexit__(None, None, None)
    await asyncio.wait_for(second, 1)
    assert limit.in_flight == 0
