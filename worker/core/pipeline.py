"""One job, from raw message to outcome: validate -> resolve -> token -> invoke -> result.

The pipeline knows nothing of Pub/Sub: it takes a `Delivery` (bytes, attributes and
which delivery attempt this is) and returns an `Outcome` saying what to publish and
whether to ack. It never raises: whatever goes wrong becomes a result or a nack.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import structlog

from worker.core.catalog import Catalog, JobKind
from worker.core.dead_letters import dead_letter_for
from worker.core.errors import HoldJob, InvalidJobError, JobError, PermanentJobError, TransientJobError
from worker.core.logs import bind_job_fields, debug_enabled
from worker.core.messages import (
    ErrorInfo,
    Job,
    JobStatus,
    Result,
    decode_job,
    now,
    salvage_identity,
    times_put_off,
)
from worker.core.shapes import (
    BatchHandler,
    Caller,
    CallResult,
    Deferrer,
    Delivery,
    Outcome,
    Resolver,
    RunJobHandler,
)
from worker.core.telemetry import NO_TELEMETRY, JobSpan, Telemetry, trace_id_of

log = structlog.get_logger("worker.core.pipeline")

# A job due sooner than this is waited for in process; later, it is put off on the timer.
DEFER_AFTER_S = 1.0
# While Cloud Tasks cannot take a job's task, the job is held and tried again after a
# backoff doubling from 1 s to this (consecutive failures of this worker).
DEFER_RETRY_MAX_S = 10.0
# A job a function keeps answering Retry-After is put off this many times at most, then
# its errors take their usual course (redelivery, then the dead letter).
MAX_RETRY_AFTER_DEFERRALS = 20


class Pipeline:
    """Turns one delivery into an Outcome: decode and check the job against the
    catalog, then run its kind's handler (a call through the resolver and invoker, a
    batch fan-out, a Cloud Run job start) and build the result and any dead letter."""

    def __init__(
        self,
        catalog: Catalog,
        resolver: Resolver,
        invoker: Caller,
        *,
        region: str,
        max_payload_bytes: int,
        batch_handler: BatchHandler | None = None,
        run_job_handler: RunJobHandler | None = None,
        clock: Callable[[], datetime] = now,
        telemetry: Telemetry = NO_TELEMETRY,
        deferrer: Deferrer | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.catalog = catalog
        self._resolver = resolver
        self._invoker = invoker
        self._region = region
        self._max_payload_bytes = max_payload_bytes
        self._batch_handler = batch_handler
        self._run_job_handler = run_job_handler
        self._clock = clock
        self._telemetry = telemetry
        self._metrics = telemetry.metrics
        self._deferrer = deferrer
        self._sleep = sleep
        self._defer_failures = 0

    async def handle(self, delivery: Delivery) -> Outcome:
        """The outcome of one delivery; never raises. An invalid job is `rejected`, a
        permanent failure (or a transient one on the last attempt) `failed` with a dead
        letter, a transient one a retry (nack), a refused call a hold."""
        started = self._clock()
        job: Job | None = None
        span: JobSpan | None = None
        known: str | None = None  # the job's kind, once the catalog knows it
        try:
            job = decode_job(delivery.data, delivery.attributes, max_bytes=self._max_payload_bytes)
            span = self._telemetry.start_job(delivery, job, started)
            kind = self.catalog.lookup(job.kind)
            known = kind.kind
            if self._metrics.enabled:
                age = (started - delivery.publish_time).total_seconds() if delivery.publish_time else None
                self._metrics.job_started(known, age)
            kind.check_payload(job.payload)
            if job.not_after is not None and started > job.not_after:
                return self._finish(delivery, job, started, JobStatus.EXPIRED, span, known, ack_only=True)
            if job.not_before is not None:
                wait_s = (job.not_before - self._clock()).total_seconds()
                if wait_s > DEFER_AFTER_S or self._was_put_off(job.not_before, delivery):
                    task = await self._defer(job, delivery, job.not_before)
                    return self._finish(
                        delivery,
                        job,
                        started,
                        JobStatus.SCHEDULED,
                        span,
                        known,
                        scheduled=(job.not_before, task),
                    )
                if wait_s > 0:
                    await self._sleep(wait_s)  # never early: the last second is waited here
            # Log lines carry the trace: the worker's own span when tracing, else the sender's.
            bind_job_fields(traceparent=span.traceparent or job.traceparent)
            with span.active():
                try:
                    call = await self._run(job, kind, delivery)
                except TransientJobError as exc:
                    deferred = await self._defer_retry_after(job, kind, delivery, exc)
                    if deferred is None:
                        raise
                    call = CallResult(exc.http_status, None, exc.attempts or 0, status=JobStatus.SCHEDULED)
                    return self._finish(
                        delivery,
                        job,
                        started,
                        JobStatus.SCHEDULED,
                        span,
                        known,
                        call=call,
                        scheduled=deferred,
                    )
            return self._finish(delivery, job, started, call.status, span, known, call=call)
        except HoldJob as exc:
            if delivery.may_hold:
                log.debug("job_held", reason=exc.reason)
                held = self._span(span, delivery, job, started)
                return Outcome.held(exc.wait, span=held, kind=known)
            error = TransientJobError(
                "held_too_long",
                f"held for WORKER_MAX_HOLD_SECONDS on its last delivery attempt ({exc.reason}): "
                "resume the kind or mend the service, then `worker replay`",
            )
            return self._finish(delivery, job, started, JobStatus.FAILED, span, known, error=error)
        except InvalidJobError as exc:
            return self._finish(delivery, job, started, JobStatus.REJECTED, span, known, error=exc)
        except PermanentJobError as exc:
            return self._finish(delivery, job, started, JobStatus.FAILED, span, known, error=exc)
        except TransientJobError as exc:
            if delivery.final_attempt:
                return self._finish(delivery, job, started, JobStatus.FAILED, span, known, error=exc)
            log.warning("job_retry_later", code=exc.code, error=exc.message, attempts=exc.attempts)
            return self._retry(delivery, job, started, span, known, exc)
        except Exception as exc:  # a bug must not lose the job nor stop the worker
            log.exception("job_internal_error")
            error = TransientJobError("internal_error", f"{type(exc).__name__}: {str(exc)[:300]}")
            if delivery.final_attempt:
                return self._finish(delivery, job, started, JobStatus.FAILED, span, known, error=error)
            return self._retry(delivery, job, started, span, known, error)
        finally:
            if known is not None and self._metrics.enabled:
                self._metrics.job_left(known)

    @staticmethod
    def _was_put_off(not_before: datetime, delivery: Delivery) -> bool:
        """Whether this message was due later when published, so a worker may have put it
        off already (then killed before its ack): if it is due now, it goes through the
        timer all the same, whose task name is taken if it was, so it runs once. The
        message the timer publishes is published at not_before, so this is false for it."""
        if delivery.publish_time is None:
            return False
        return (not_before - delivery.publish_time).total_seconds() > DEFER_AFTER_S

    async def _defer_retry_after(
        self, job: Job, kind: JobKind, delivery: Delivery, exc: TransientJobError
    ) -> tuple[datetime, str] | None:
        """A kind that opted in (`defer_on_retry_after`) and a function that asked to be
        called again later: put the job off until then (at most `defer_max_s`) instead of
        using delivery attempts. None when it does not apply or the timer cannot be set
        (then the error takes its usual course)."""
        if exc.retry_after_s is None or not kind.defer_on_retry_after or self._deferrer is None:
            return None
        if times_put_off(delivery.attributes) >= MAX_RETRY_AFTER_DEFERRALS:
            return None
        at = self._clock() + timedelta(seconds=min(exc.retry_after_s, kind.defer_max_s))
        try:
            task = await self._deferrer.defer(job, delivery, at)
        except TransientJobError as failed:
            log.warning("job_schedule_retry", code=failed.code, error=failed.message, retry_in_s=None)
            return None
        log.info("job_retry_after_deferred", retry_after_s=exc.retry_after_s, not_before=at.isoformat())
        return at, task

    async def _defer(self, job: Job, delivery: Delivery, at: datetime) -> str:
        try:
            if self._deferrer is None:
                raise TransientJobError(
                    "delay_unavailable",
                    f"job is due at {at.isoformat()} but this worker has no Cloud Tasks queue to wait in; "
                    "set WORKER_DELAY_QUEUE and create it with `worker setup`",
                )
            task = await self._deferrer.defer(job, delivery, at)
        except TransientJobError as exc:
            if not delivery.may_hold:
                raise  # held for WORKER_MAX_HOLD_SECONDS already: nacked, or failed on the last attempt
            # Held, not nacked: an outage of Cloud Tasks must not use up delivery attempts.
            self._defer_failures += 1
            wait_s = min(DEFER_RETRY_MAX_S, 0.5 * 2 ** min(self._defer_failures, 8)) * random.uniform(
                0.5, 1.0
            )
            log.warning("job_schedule_retry", code=exc.code, error=exc.message, retry_in_s=round(wait_s, 2))
            raise HoldJob(exc.code, functools.partial(self._sleep, wait_s)) from None
        self._defer_failures = 0
        return task

    async def _run(self, job: Job, kind: JobKind, delivery: Delivery) -> CallResult:
        if kind.handler == "batch":
            if self._batch_handler is None:
                raise PermanentJobError("batch_unavailable", f"kind {kind.kind!r} needs the batch fan-out")
            return await self._batch_handler(job, kind, delivery)
        if kind.handler == "run_job":
            if self._run_job_handler is None:
                raise PermanentJobError(
                    "run_job_unavailable", f"kind {kind.kind!r} needs the Cloud Run jobs handler"
                )
            return await self._run_job_handler(job, kind, delivery)
        assert kind.service is not None  # the catalog guarantees it for "call" kinds
        region = kind.region or self._region
        url = await self._resolver.resolve(kind.service, region)
        return await self._invoker.invoke(kind, url, job, region)

    def _span(self, span: JobSpan | None, delivery: Delivery, job: Job | None, started: datetime) -> JobSpan:
        # A message that could not be decoded still gets a span (in a new trace).
        return span if span is not None else self._telemetry.start_job(delivery, job, started)

    def _retry(
        self,
        delivery: Delivery,
        job: Job | None,
        started: datetime,
        span: JobSpan | None,
        known: str | None,
        error: JobError,
    ) -> Outcome:
        span = self._span(span, delivery, job, started)
        return Outcome.retry(error.code, span=span, kind=known)

    def _finish(
        self,
        delivery: Delivery,
        job: Job | None,
        started: datetime,
        status: JobStatus,
        span: JobSpan | None,
        known: str | None,
        *,
        call: CallResult | None = None,
        error: JobError | None = None,
        ack_only: bool = False,
        scheduled: tuple[datetime, str] | None = None,
    ) -> Outcome:
        finished = self._clock()
        span = self._span(span, delivery, job, started)
        job_id: str | None
        kind_name: str | None
        if job is not None:
            job_id, kind_name = job.job_id, job.kind
        else:
            job_id, kind_name = salvage_identity(delivery.data, delivery.attributes)
        result = Result(
            job_id=job_id,
            kind=kind_name,
            status=status,
            attempts=call.attempts if call else (error.attempts or 0) if error else 0,
            http_status=call.http_status if call else error.http_status if error else None,
            response=call.response if call else None,
            error=ErrorInfo(code=error.code, message=error.message) if error else None,
            started_at=started,
            finished_at=finished,
            duration_ms=int((finished - started).total_seconds() * 1000),
            batch=job.batch if job else None,
            execution=call.execution if call else None,
            trace_id=span.trace_id or trace_id_of(job.traceparent if job else None),
            not_before=scheduled[0] if scheduled else None,
            task=scheduled[1] if scheduled else None,
        )
        dead_letter = None
        if status in (JobStatus.FAILED, JobStatus.REJECTED) and error is not None:
            dead_letter = dead_letter_for(delivery, result, error)
            log.warning("job_" + status.value, code=error.code, error=error.message)
        elif status == JobStatus.SCHEDULED:
            log.info("job_scheduled", not_before=str(result.not_before), task=result.task)
        elif status == JobStatus.RUNNING:
            log.info("job_running", execution=result.execution.name if result.execution else None)
        elif not ack_only:
            # Debug: at thousands of jobs a second a line per success was the worker's
            # largest avoidable cost; the consumer logs counts every minute (jobs_done).
            if debug_enabled():
                log.debug("job_succeeded", http_status=result.http_status, attempts=result.attempts)
        else:
            log.info("job_expired", not_after=str(job.not_after if job else None))
        follow_up = call.follow_up if call else None
        return Outcome.settled(result, dead_letter=dead_letter, follow_up=follow_up, span=span, kind=known)
