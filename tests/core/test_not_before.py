"""Jobs at a time in the pipeline: `not_before` is validated naming the field, a job due
later is put off (a `scheduled` result, acked), never run early, and kept (nacked) when
the timer cannot be set."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest

from tests.doubles import Invoker, Resolver
from worker.core.catalog import Catalog, default_catalog_dir
from worker.core.errors import TransientJobError
from worker.core.messages import Job, JobStatus, decode_job, supersedes
from worker.core.pipeline import Pipeline
from worker.core.shapes import Delivery


class Timer:
    """A Deferrer that remembers what it was asked, or fails as told."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[tuple[str, datetime]] = []

    async def defer(self, job: Job, delivery: Delivery, at: datetime) -> str:
        self.calls.append((job.job_id, at))
        if self.error:
            raise self.error
        return f"projects/p/locations/r/queues/q/tasks/{job.job_id}-1"


def pipeline(timer: Timer | None, slept: list[float] | None = None) -> tuple[Pipeline, Invoker]:
    invoker = Invoker()

    async def sleep(seconds: float) -> None:
        (slept if slept is not None else []).append(seconds)

    catalog = Catalog.load(default_catalog_dir())
    return (
        Pipeline(
            catalog, Resolver(), invoker, region="r", max_payload_bytes=10_000, deferrer=timer, sleep=sleep
        ),
        invoker,
    )


def job(not_before: datetime | str | None, **extra: object) -> bytes:
    body: dict[str, object] = {"job_id": "j-1", "kind": "echo", "payload": {}, **extra}
    if not_before is not None:
        body["not_before"] = not_before if isinstance(not_before, str) else not_before.isoformat()
    return json.dumps(body).encode()


def handle(p: Pipeline, data: bytes, **kw: object):  # type: ignore[no-untyped-def]
    return asyncio.run(p.handle(Delivery(data=data, attributes={}, **kw)))  # type: ignore[arg-type]


def test_a_job_due_later_is_put_off_not_called_and_its_result_says_scheduled() -> None:
    timer = Timer()
    p, invoker = pipeline(timer)
    due = datetime.now(UTC) + timedelta(minutes=5)
    out = handle(p, job(due))
    assert out.ack and out.dead_letter is None
    assert out.result is not None and out.result.status is JobStatus.SCHEDULED
    assert out.result.not_before == due
    assert out.result.task == "projects/p/locations/r/queues/q/tasks/j-1-1"
    assert timer.calls == [("j-1", due)]
    assert invoker.calls == []


def test_a_job_due_within_the_second_is_waited_for_then_run_never_early() -> None:
    slept: list[float] = []
    timer = Timer()
    p, invoker = pipeline(timer, slept)
    out = handle(p, job(datetime.now(UTC) + timedelta(milliseconds=600)))
    assert out.result is not None and out.result.status is JobStatus.SUCCEEDED
    assert timer.calls == []
    assert len(slept) == 1 and 0.4 < slept[0] <= 0.6
    assert len(invoker.calls) == 1


def test_a_job_whose_time_has_come_runs_at_once() -> None:
    slept: list[float] = []
    p, invoker = pipeline(Timer(), slept)
    out = handle(p, job(datetime.now(UTC) - timedelta(seconds=3)))
    assert out.result is not None and out.result.status is JobStatus.SUCCEEDED
    assert slept == [] and len(invoker.calls) == 1


def test_when_the_timer_cannot_be_set_the_job_is_held_then_kept_never_run() -> None:
    slept: list[float] = []
    timer = Timer(TransientJobError("delay_unavailable", "Cloud Tasks did not answer"))
    p, invoker = pipeline(timer, slept)
    due = datetime.now(UTC) + timedelta(hours=1)
    # Held (no delivery attempt used), and tried again after a growing backoff.
    out = handle(p, job(due))
    assert out.is_held and not out.ack
    assert out.hold is not None
    asyncio.run(out.hold())
    out = handle(p, job(due))
    asyncio.run(out.hold())  # type: ignore[misc]
    assert 0 < slept[0] < slept[1] <= 10
    # Held for WORKER_MAX_HOLD_SECONDS: nacked, and on the last attempt failed with a
    # dead letter (replayable), never run.
    out = handle(p, job(due), may_hold=False)
    assert not out.ack and not out.is_held and out.retry_code == "delay_unavailable"
    out = handle(p, job(due), may_hold=False, final_attempt=True)
    assert out.result is not None and out.result.status is JobStatus.FAILED
    assert out.dead_letter is not None and invoker.calls == []


def test_without_a_timer_a_job_due_later_is_kept_naming_the_fix() -> None:
    p, invoker = pipeline(None)
    out = handle(p, job(datetime.now(UTC) + timedelta(hours=1)))
    assert out.is_held and invoker.calls == []
    out = handle(p, job(datetime.now(UTC) + timedelta(hours=1)), may_hold=False)
    assert not out.ack and out.retry_code == "delay_unavailable" and invoker.calls == []


@pytest.mark.parametrize(
    ("not_before", "extra", "fragment"),
    [
        ("tomorrow", {}, "not_before"),
        ("2026-01-01T00:00:00", {}, "not_before: Value error, must be RFC 3339 with a time zone"),
        ((datetime.now(UTC) + timedelta(days=400)).isoformat(), {}, "not_before: Value error, more than 365"),
        (
            (datetime.now(UTC) + timedelta(hours=2)).isoformat(),
            {"not_after": (datetime.now(UTC) + timedelta(hours=1)).isoformat()},
            "not_after: Value error, must be later than not_before",
        ),
        (7, {}, "not_before"),
    ],
)
def test_a_bad_not_before_is_rejected_naming_the_field(
    not_before: object, extra: dict, fragment: str
) -> None:
    timer = Timer()
    p, invoker = pipeline(timer)
    body = {"job_id": "j-1", "kind": "echo", "payload": {}, "not_before": not_before, **extra}
    out = handle(p, json.dumps(body).encode())
    assert out.ack and out.result is not None and out.result.status is JobStatus.REJECTED
    assert out.result.error is not None and out.result.error.code == "invalid_job"
    assert fragment in out.result.error.message
    assert timer.calls == [] and invoker.calls == []


def test_not_before_round_trips_and_scheduled_is_not_final() -> None:
    due = datetime(2026, 12, 24, 2, 0, tzinfo=UTC)
    decoded = decode_job(job(due), {}, max_bytes=10_000)
    assert decoded.not_before == due
    assert decode_job(decoded.to_bytes(), {}, max_bytes=10_000) == decoded
    assert not JobStatus.SCHEDULED.final
    assert supersedes(JobStatus.SCHEDULED, JobStatus.SUCCEEDED)
    assert supersedes(JobStatus.SCHEDULED, JobStatus.CANCELLED)
    assert not supersedes(JobStatus.SUCCEEDED, JobStatus.SCHEDULED)
    assert not supersedes(JobStatus.CANCELLED, JobStatus.SCHEDULED)


def test_a_message_that_was_due_later_when_published_goes_through_the_timer_even_once_due() -> None:
    # A worker put it off, then died before its ack: the redelivery must not run it
    # beside the task's publication; the timer's task name (taken) makes it run once.
    timer = Timer()
    p, invoker = pipeline(timer)
    due = datetime.now(UTC) - timedelta(seconds=5)
    out = handle(p, job(due), publish_time=due - timedelta(minutes=10))
    assert out.ack and out.result is not None and out.result.status is JobStatus.SCHEDULED
    assert timer.calls == [("j-1", due)] and invoker.calls == []
    # The timer's own message is published at not_before: it runs.
    out = handle(p, job(due), publish_time=due + timedelta(milliseconds=3))
    assert out.result is not None and out.result.status is JobStatus.SUCCEEDED
    assert len(invoker.calls) == 1


class RetryAfterInvoker(Invoker):
    """Answers as a function that said 503 with Retry-After: the invoker's retry_later."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__()
        self.retry_after_s = retry_after_s

    async def invoke(self, kind, url, job, region="REGION"):  # type: ignore[no-untyped-def]
        self.calls.append((kind.kind, url, job.job_id))
        error = TransientJobError("retry_later", "echo answered 503 with Retry-After", http_status=503)
        error.retry_after_s = self.retry_after_s
        error.attempts = 1
        raise error


def retry_after_pipeline(opted_in: bool, retry_after_s: float, timer: Timer) -> Pipeline:
    from worker.core.catalog import JobKind

    kind = JobKind(kind="echo", service="echo", defer_on_retry_after=opted_in, defer_max_s=60)
    return Pipeline(
        Catalog({"echo": kind}),
        Resolver(),
        RetryAfterInvoker(retry_after_s),
        region="r",
        max_payload_bytes=10_000,
        deferrer=timer,
    )


def test_an_opted_in_kind_puts_the_job_off_to_the_retry_after_bounded_by_defer_max_s() -> None:
    timer = Timer()
    before = datetime.now(UTC)
    out = handle(retry_after_pipeline(True, 30, timer), job(None))
    assert out.ack and out.result is not None and out.result.status is JobStatus.SCHEDULED
    assert out.result.http_status == 503 and out.result.attempts == 1
    ((job_id, at),) = timer.calls
    assert job_id == "j-1" and 29 <= (at - before).total_seconds() <= 31
    assert out.result.not_before == at
    # Bounded: a Retry-After of a day is put off defer_max_s (60 s).
    timer = Timer()
    handle(retry_after_pipeline(True, 86_400, timer), job(None))
    assert 59 <= (timer.calls[0][1] - before).total_seconds() <= 62


def test_a_kind_not_opted_in_or_a_job_put_off_too_often_takes_the_usual_course() -> None:
    timer = Timer()
    out = handle(retry_after_pipeline(False, 30, timer), job(None))
    assert not out.ack and out.retry_code == "retry_later" and timer.calls == []
    p = retry_after_pipeline(True, 30, timer)
    data = job(None)
    out = asyncio.run(p.handle(Delivery(data=data, attributes={"scheduled": "20"})))
    assert not out.ack and out.retry_code == "retry_later" and timer.calls == []
    # The timer failing: the usual course too (nacked for redelivery).
    failing = Timer(TransientJobError("delay_unavailable", "away"))
    out = handle(retry_after_pipeline(True, 30, failing), job(None))
    assert not out.ack and out.retry_code == "retry_later"
