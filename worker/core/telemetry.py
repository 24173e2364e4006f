"""Traces and metrics, as the pipeline, invoker and consumer see them: a thin interface.

`Telemetry` is the no-op: it is what runs when tracing and metrics are off (the
default), and every call on it returns a shared constant without touching the
OpenTelemetry SDK, so an untraced worker pays a few attribute look-ups per job.
`worker.telemetry.setup_telemetry` reads OpenTelemetry's own environment variables
and, only when something is switched on, returns an SDK-backed `Telemetry`
(`worker/telemetry/tracing.py`, `worker/telemetry/metrics.py`).

Nothing here imports OpenTelemetry.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.core.messages import Job


def trace_id_of(traceparent: str | None) -> str | None:
    """The 32-hex trace id of a well-formed W3C traceparent, else None."""
    if traceparent and len(traceparent) == 55 and traceparent.count("-") == 3:
        return traceparent[3:35]
    return None


class Step:
    """One child span (resolve, token, an HTTP attempt, a publish); the no-op one."""

    traceparent: str | None = None  # what to send downstream as this step's context

    def set(self, key: str, value: Any) -> None:
        """Record an attribute on the step (no-op when tracing is off)."""

    def fail(self, error_type: str) -> None:
        """Mark the step failed, with a short error type (semconv `error.type`)."""


class JobSpan:
    """The span of one job, from delivery to ack or nack; the no-op one."""

    recording = False
    trace_id: str | None = None
    traceparent: str | None = None  # this span's own context, for log correlation

    def active(self) -> Any:
        """Make this span the parent of the steps started inside (a no-op here)."""
        return _NO_STEP_CM

    def step(self, name: str, **attributes: Any) -> Any:
        """A child span as a context manager yielding a `Step`; `span_kind` may be
        "internal" (the default), "client" or "producer"."""
        return _NO_STEP_CM

    def end(self, status: str, error_code: str | None = None) -> None:
        """Close the span with the job's status (succeeded, failed, rejected, expired, retry)."""


class _NoStepContext:
    __slots__ = ()

    def __enter__(self) -> Step:
        return NO_STEP

    def __exit__(self, *exc: object) -> None:
        return None


NO_STEP = Step()
NO_SPAN = JobSpan()
_NO_STEP_CM = _NoStepContext()


class Metrics:
    """The worker's instruments; the no-op one. See worker/telemetry/metrics.py."""

    enabled = False

    def job_started(self, kind: str, age_s: float | None) -> None:
        """A job of `kind` begins (age_s: now minus Pub/Sub's publish time); in flight +1."""

    def job_left(self, kind: str) -> None:
        """The job of `kind` that job_started announced is no longer being handled."""

    def job_finished(self, kind: str | None, status: str, attempts: int, lane: str = "interactive") -> None:
        """A delivery ended with `status` (succeeded, failed, rejected, expired, retry)."""

    def call_finished(self, kind: str, duration_s: float, http_status: int | None) -> None:
        """One HTTP attempt to a function took `duration_s` (http_status None: no answer)."""

    def publish_failed(self) -> None:
        """A result (or dead letter) could not be published; the job will come back."""

    def token_refreshed(self, audience: str) -> None:
        """An ID token for `audience` is being minted (a cache miss)."""

    def observe(
        self, name: str, description: str, read: Any, *, unit: str = "1", counter: bool = False
    ) -> None:
        """Report a value read at collection time: `read()` returns [(value, {attr: value})].

        A gauge, or a monotonic counter with `counter=True`. The hook for state that
        lives elsewhere, such as per-kind limiter and breaker state."""

    def prometheus_text(self) -> bytes | None:
        """The Prometheus exposition of every instrument, or None when not exported so."""
        return None

    def shutdown(self, timeout_s: float) -> None:
        """Export a last time and stop, waiting at most `timeout_s`."""


class Telemetry:
    """No tracing, no metrics: the default."""

    tracing = False
    metrics: Metrics = Metrics()

    def start_job(self, delivery: Any, job: Job | None, started: datetime) -> JobSpan:
        """The span of the job in `delivery` (a `worker.core.pipeline.Delivery`),
        continuing `job.traceparent` when it has one."""
        return NO_SPAN

    def step(self, name: str, **attributes: Any) -> Any:
        """A child span of whatever span is active (a job's), as a context manager."""
        return _NO_STEP_CM

    def shutdown(self, timeout_s: float) -> None:
        """Flush and stop exporters, waiting at most `timeout_s`."""


NO_TELEMETRY = Telemetry()
