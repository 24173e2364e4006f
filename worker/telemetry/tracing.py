"""The OpenTelemetry SDK behind `worker.telemetry.Telemetry`: one span per job and its steps.

A job's span (`process <jobs topic>`, kind CONSUMER) continues the trace of the job's
`traceparent` (a malformed or all-zero one starts a fresh trace); its children are
`resolve`, `token`, one CLIENT span per HTTP attempt (whose context goes to the
function as its `traceparent`) and `send <results topic>` for the result. Attribute
names follow OpenTelemetry's messaging and HTTP semantic conventions; the worker's own
are under `worker.`.

The tracer provider is the worker's own, not the global one, so tests and a process
embedding the worker choose where spans go. Exporters run on the batch processor's
thread: an unreachable endpoint makes it drop spans when its queue is full; it never
blocks a job. `shutdown` waits a bounded time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from worker.core.errors import JobError
from worker.core.telemetry import NO_SPAN, JobSpan, Metrics, Step, Telemetry
from worker.telemetry.config import TelemetryConfig
from worker.telemetry.exporters import quiet_exporter_logs, resource, span_exporters
from worker.telemetry.recorder import job_attributes

if TYPE_CHECKING:
    from worker.core.messages import Job
    from worker.core.shapes import Delivery

_PROPAGATOR = TraceContextTextMapPropagator()
_FAILED = frozenset({"failed", "rejected", "retry"})
_KINDS = {"internal": SpanKind.INTERNAL, "client": SpanKind.CLIENT, "producer": SpanKind.PRODUCER}


def traceparent_of(span: trace.Span) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def parent_context(traceparent: str | None) -> otel_context.Context | None:
    """The context a job's traceparent names; None (a new trace) if it names none validly."""
    if not traceparent:
        return None
    ctx = _PROPAGATOR.extract({"traceparent": traceparent})
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def _error_type(exc: BaseException) -> str:
    return exc.code if isinstance(exc, JobError) else type(exc).__name__


class SdkStep(Step):
    __slots__ = ("_span",)

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    @property
    def traceparent(self) -> str:  # type: ignore[override]
        return traceparent_of(self._span)

    def set(self, key: str, value: Any) -> None:
        if value is not None:
            self._span.set_attribute(key, value)

    def fail(self, error_type: str) -> None:
        self._span.set_attribute("error.type", error_type)
        self._span.set_status(Status(StatusCode.ERROR))


class _StepContext:
    """Starts a child span on enter, ends it on exit; an exception marks it failed."""

    __slots__ = ("_attributes", "_kind", "_name", "_parent", "_span", "_tracer")

    def __init__(
        self,
        tracer: trace.Tracer,
        name: str,
        kind: SpanKind,
        attributes: dict[str, Any],
        parent: otel_context.Context | None,
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._kind = kind
        self._attributes = attributes
        self._parent = parent
        self._span: trace.Span | None = None

    def __enter__(self) -> SdkStep:
        self._span = self._tracer.start_span(
            self._name, context=self._parent, kind=self._kind, attributes=self._attributes
        )
        return SdkStep(self._span)

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        assert self._span is not None
        if exc is not None:
            self._span.set_attribute("error.type", _error_type(exc))
            self._span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
        self._span.end()


def _step(
    tracer: trace.Tracer, name: str, attributes: dict[str, Any], parent: otel_context.Context | None
) -> _StepContext:
    kind = _KINDS[attributes.pop("span_kind", "internal")]
    return _StepContext(tracer, name, kind, {k: v for k, v in attributes.items() if v is not None}, parent)


class SdkJobSpan(JobSpan):
    recording = True

    def __init__(self, tracer: trace.Tracer, span: trace.Span) -> None:
        self._tracer = tracer
        self._span = span
        self._context = trace.set_span_in_context(span)
        self.trace_id = f"{span.get_span_context().trace_id:032x}"
        self.traceparent = traceparent_of(span)

    @contextmanager
    def active(self) -> Iterator[None]:
        token = otel_context.attach(self._context)
        try:
            yield
        finally:
            otel_context.detach(token)

    def step(self, name: str, **attributes: Any) -> _StepContext:
        return _step(self._tracer, name, attributes, self._context)

    def end(self, status: str, error_code: str | None = None) -> None:
        span = self._span
        span.set_attribute("worker.job.status", status)
        if status in _FAILED:
            span.set_attribute("error.type", error_code or status)
            span.set_status(Status(StatusCode.ERROR))
        span.end()


class SdkTelemetry(Telemetry):
    """Traces through `provider` (None: no tracing) and `metrics`: the SDK's own tracer,
    in this process. `worker run` records spans without it and exports them from the
    span relay (`build_telemetry`); this one serves a process that embeds the worker
    with a tracer provider of its own, and is what the recorder is checked against."""

    def __init__(
        self,
        provider: TracerProvider | None,
        metrics: Metrics,
        *,
        subscription: str,
        topic: str,
        processors: list[SpanProcessor] | None = None,
    ) -> None:
        self.tracing = provider is not None
        self.metrics = metrics
        self._provider = provider
        self._processors = processors or []
        self._tracer = provider.get_tracer("worker") if provider is not None else None
        self._subscription = subscription
        self._topic = topic

    def start_job(self, delivery: Delivery, job: Job | None, started: datetime) -> JobSpan:
        if self._tracer is None:
            return NO_SPAN
        attributes = job_attributes(delivery, job, self._topic, self._subscription)
        parent = parent_context(job.traceparent) if job is not None else None
        span = self._tracer.start_span(
            f"process {self._topic}",
            context=parent if parent is not None else otel_context.Context(),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            start_time=int(started.timestamp() * 1e9),
        )
        return SdkJobSpan(self._tracer, span)

    def step(self, name: str, **attributes: Any) -> Any:
        if self._tracer is None:
            return super().step(name)
        return _step(self._tracer, name, attributes, None)

    def shutdown(self, timeout_s: float) -> None:
        """Export what is queued, waiting at most `timeout_s` in all (a dead endpoint
        cannot hold the shutdown: the batch processor's thread is a daemon)."""
        deadline = time.monotonic() + timeout_s

        def stop() -> None:
            for processor in self._processors:
                processor.shutdown()  # a last export, then the exporter's shutdown
            self.metrics.shutdown(max(0.0, deadline - time.monotonic()))

        # The processor's own shutdown waits up to 30 s for an export in progress.
        stopping = threading.Thread(target=stop, name="telemetry-shutdown", daemon=True)
        stopping.start()
        stopping.join(timeout_s)
        if stopping.is_alive():
            logging.getLogger("worker.telemetry").warning(
                "telemetry export did not finish within %.1fs at shutdown; the rest is dropped", timeout_s
            )


def build_telemetry(config: TelemetryConfig, *, project: str, subscription: str, topic: str) -> Telemetry:
    """The Telemetry `config` switches on: spans recorded in the worker and exported by
    the span relay (worker/telemetry/recorder.py, relay.py), metrics by the SDK here."""
    quiet_exporter_logs()
    metrics: Metrics = Metrics()
    if config.metric_exporters:
        from worker.telemetry.metrics import SdkMetrics

        metrics = SdkMetrics.from_exporters(config.metric_exporters, resource(), project)
    if not config.trace_exporters:
        return SdkTelemetry(None, metrics, subscription=subscription, topic=topic)
    from worker.telemetry.recorder import RecordingTelemetry, Sampler
    from worker.telemetry.relay import RelaySink

    # Built here once and dropped: an exporter that cannot be made (Cloud Trace without
    # credentials) fails the start-up, as before, instead of the relay, silently.
    for exporter in span_exporters(config.trace_exporters, project):
        exporter.shutdown()

    return RecordingTelemetry(
        RelaySink(project), metrics, subscription=subscription, topic=topic, sampler=Sampler(os.environ)
    )
