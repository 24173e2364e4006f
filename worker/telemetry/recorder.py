"""A job's spans recorded as plain tuples in the worker, made OpenTelemetry SDK spans elsewhere.

Measured in `bench/` (BENCHMARKS.md, issue 16): with the SDK's tracer in the worker,
every job sampled cost the worker ~40 % of its throughput on a CPU-bound backlog.
About a third of that was creating SDK spans on the event loop (attribute
validation, locks, context objects, ~35 us a span) and two thirds the OTLP encoding
on the batch processor's thread, which holds the same GIL.

So the worker records what a span is and nothing more (names, ids, times,
attributes, status) in a `SpanRecord` per span, and hands a finished job's records
to a `SpanSink`:

- `ProcessorSink` makes them `ReadableSpan`s of the SDK and gives them to SDK span
  processors: in the process (tests, and a process that embeds the worker), or in
- the relay (`worker/telemetry/relay.py`): `RelaySink` pickles batches down a pipe to
  a child process that runs a `ProcessorSink` with the configured exporters (OTLP,
  Cloud Trace, console), so their encoding and network I/O use another core.

What reaches the exporters is what the SDK would have made: the same names, kinds,
ids, parents, attributes and status. Sampling follows OTEL_TRACES_SAMPLER and
OTEL_TRACES_SAMPLER_ARG as the SDK reads them (parent-based always-on by default); a
job not sampled still sends the function a traceparent (flags 00), as the SDK does.
"""

from __future__ import annotations

import contextvars
import functools
import random
import re
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from worker.core.errors import JobError
from worker.core.telemetry import JobSpan, Metrics, Step, Telemetry

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor

    from worker.core.messages import Job
    from worker.core.shapes import Delivery

# Span kinds as OpenTelemetry numbers them (opentelemetry.trace.SpanKind).
INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER = range(5)
_KINDS = {"internal": INTERNAL, "client": CLIENT, "producer": PRODUCER}
_FAILED = frozenset({"failed", "rejected", "retry"})
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACE_ID_LIMIT = (1 << 64) - 1
_ACTIVE: contextvars.ContextVar[RecordedJobSpan | None] = contextvars.ContextVar("worker_span", default=None)


class SpanRecord:
    """One finished span, as plain values (pickled as a tuple to the relay)."""

    __slots__ = (
        "attributes",
        "end_ns",
        "error",
        "kind",
        "name",
        "parent_id",
        "parent_remote",
        "span_id",
        "start_ns",
        "trace_id",
    )

    def __init__(
        self,
        name: str,
        kind: int,
        trace_id: int,
        span_id: int,
        parent_id: int,
        parent_remote: bool,
        start_ns: int,
        attributes: dict[str, Any],
    ) -> None:
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id  # 0: a root span
        self.parent_remote = parent_remote
        self.start_ns = start_ns
        self.end_ns = start_ns
        self.attributes = attributes
        self.error: str | None = None  # status ERROR with this description ("" for none)

    def as_tuple(self) -> tuple[Any, ...]:
        return (
            self.name,
            self.kind,
            self.trace_id,
            self.span_id,
            self.parent_id,
            self.parent_remote,
            self.start_ns,
            self.end_ns,
            self.attributes,
            self.error,
        )


def parse_traceparent(value: str | None) -> tuple[int, int, bool] | None:
    """(trace id, span id, sampled) of a valid W3C traceparent, else None (a fresh trace)."""
    if not value:
        return None
    found = _TRACEPARENT.fullmatch(value.strip())
    if found is None or found.group(1) == "ff":
        return None
    trace_id, span_id = int(found.group(2), 16), int(found.group(3), 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(found.group(4), 16) & 1)


class Sampler:
    """OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (checked by TelemetryConfig), decided
    as the SDK's samplers decide: a ratio compares the trace id's low 64 bits."""

    def __init__(self, env: Mapping[str, str]) -> None:
        name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
        self.parent_based = name.startswith("parentbased_")
        root = name.removeprefix("parentbased_")
        ratio = 1.0 if root == "always_on" else 0.0 if root == "always_off" else _ratio(env)
        self._bound = round(ratio * (_TRACE_ID_LIMIT + 1))

    def sampled(self, trace_id: int, parent_sampled: bool | None) -> bool:
        if parent_sampled is not None and self.parent_based:
            return parent_sampled
        return (trace_id & _TRACE_ID_LIMIT) < self._bound


def _ratio(env: Mapping[str, str]) -> float:
    try:
        return float(env.get("OTEL_TRACES_SAMPLER_ARG", "") or 1.0)
    except ValueError:
        return 1.0


def job_attributes(delivery: Delivery, job: Job | None, topic: str, subscription: str) -> dict[str, Any]:
    """A job span's attributes (OpenTelemetry's messaging conventions, and the worker's)."""
    attributes: dict[str, Any] = {
        "messaging.system": "gcp_pubsub",
        "messaging.operation.type": "process",
        "messaging.destination.name": topic,
        "messaging.destination.subscription.name": subscription,
        "messaging.message.id": delivery.message_id,
    }
    if delivery.delivery_attempt:
        attributes["messaging.gcp_pubsub.message.delivery_attempt"] = delivery.delivery_attempt
    if job is not None:
        attributes["worker.job.id"] = job.job_id
        attributes["worker.job.kind"] = job.kind
    return attributes


def _traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def _new_id(bits: int) -> int:
    return random.getrandbits(bits) or 1


def _error_type(exc: BaseException) -> str:
    return exc.code if isinstance(exc, JobError) else type(exc).__name__


class RecordedStep(Step):
    __slots__ = ("_record",)

    def __init__(self, record: SpanRecord) -> None:
        self._record = record

    @property
    def traceparent(self) -> str:  # type: ignore[override]
        return _traceparent(self._record.trace_id, self._record.span_id, True)

    def set(self, key: str, value: Any) -> None:
        if value is not None:
            self._record.attributes[key] = value

    def fail(self, error_type: str) -> None:
        self._record.attributes["error.type"] = error_type
        self._record.error = self._record.error or ""


class _RecordedStepContext:
    __slots__ = ("_attributes", "_kind", "_name", "_owner", "_record")

    def __init__(self, owner: RecordedJobSpan, name: str, kind: int, attributes: dict[str, Any]) -> None:
        self._owner = owner
        self._name = name
        self._kind = kind
        self._attributes = attributes
        self._record: SpanRecord | None = None

    def __enter__(self) -> RecordedStep:
        owner = self._owner.record
        self._record = record = SpanRecord(
            self._name,
            self._kind,
            owner.trace_id,
            _new_id(64),
            owner.span_id,
            False,
            time.time_ns(),
            self._attributes,
        )
        self._owner.children.append(record)
        return RecordedStep(record)

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        record = self._record
        assert record is not None
        record.end_ns = time.time_ns()
        if exc is not None:
            record.attributes["error.type"] = _error_type(exc)
            record.error = str(exc)[:200]


class _UnsampledStep(Step):
    """A step of a job not sampled: nothing recorded, but the function still gets a
    traceparent of the job's trace (flags 00), as the SDK's non-recording spans give."""

    __slots__ = ("traceparent",)

    def __init__(self, trace_id: int) -> None:
        self.traceparent = _traceparent(trace_id, _new_id(64), False)

    def __enter__(self) -> Step:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _Activation:
    __slots__ = ("_span", "_token")

    def __init__(self, span: RecordedJobSpan) -> None:
        self._span = span
        self._token: contextvars.Token[RecordedJobSpan | None] | None = None

    def __enter__(self) -> None:
        self._token = _ACTIVE.set(self._span)

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _ACTIVE.reset(self._token)


class RecordedJobSpan(JobSpan):
    """The `process <topic>` span of one job and its steps; sent to the sink at `end`."""

    def __init__(self, sink: SpanSink, record: SpanRecord, sampled: bool) -> None:
        self._sink = sink
        self.record = record
        self.children: list[SpanRecord] = []
        self.recording = sampled
        self.trace_id = f"{record.trace_id:032x}"
        self.traceparent = _traceparent(record.trace_id, record.span_id, sampled)

    def active(self) -> Any:
        return _Activation(self)

    def step(self, name: str, **attributes: Any) -> Any:
        if not self.recording:
            return _UnsampledStep(self.record.trace_id)
        kind = _KINDS[attributes.pop("span_kind", "internal")]
        return _RecordedStepContext(self, name, kind, {k: v for k, v in attributes.items() if v is not None})

    def end(self, status: str, error_code: str | None = None) -> None:
        if not self.recording:
            return
        record = self.record
        record.end_ns = time.time_ns()
        record.attributes["worker.job.status"] = status
        if status in _FAILED:
            record.attributes["error.type"] = error_code or status
            record.error = ""
        self.children.append(record)
        self._sink.submit(self.children)
        self.recording = False  # a second end() records nothing more


class SpanSink:
    """Where a finished job's span records go."""

    def submit(self, records: list[SpanRecord]) -> None:
        raise NotImplementedError

    def shutdown(self, timeout_s: float) -> None:
        """Export what is queued, waiting at most `timeout_s`."""


class RecordingTelemetry(Telemetry):
    """Tracing by `SpanRecord`s into `sink`, sampled by `sampler`; `metrics` as given."""

    tracing = True

    def __init__(
        self,
        sink: SpanSink,
        metrics: Metrics,
        *,
        subscription: str,
        topic: str,
        sampler: Sampler | None = None,
    ) -> None:
        self.metrics = metrics
        self._sink = sink
        self._sampler = sampler or Sampler({})
        self._name = f"process {topic}"
        self._subscription = subscription
        self._topic = topic

    def start_job(self, delivery: Delivery, job: Job | None, started: datetime) -> JobSpan:
        attributes = job_attributes(delivery, job, self._topic, self._subscription)
        parent = parse_traceparent(job.traceparent) if job is not None else None
        if parent is None:
            trace_id, parent_id = _new_id(128), 0
            sampled = self._sampler.sampled(trace_id, None)
        else:
            trace_id, parent_id, parent_sampled = parent
            sampled = self._sampler.sampled(trace_id, parent_sampled)
        record = SpanRecord(
            self._name,
            CONSUMER,
            trace_id,
            _new_id(64),
            parent_id,
            parent_id != 0,
            int(started.timestamp() * 1e9),
            attributes,
        )
        return RecordedJobSpan(self._sink, record, sampled)

    def step(self, name: str, **attributes: Any) -> Any:
        span = _ACTIVE.get()
        if span is None:  # outside a job (start-up): nothing to be a child of
            return super().step(name)
        return span.step(name, **attributes)

    def shutdown(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self._sink.shutdown(timeout_s)
        self.metrics.shutdown(max(0.0, deadline - time.monotonic()))


class ProcessorSink(SpanSink):
    """Records made SDK `ReadableSpan`s and handed to SDK span processors (a batch
    processor with an exporter, or a simple one in tests), in this process."""

    def __init__(self, processors: Iterable[SpanProcessor], resource: Resource | None = None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        self.processors = list(processors)
        self._resource = _hashed_once(resource or Resource.create({}))
        self._scope = InstrumentationScope("worker")
        # Built once: the relay makes thousands of spans a second from these.
        self._readable_span, self._context = ReadableSpan, SpanContext
        self._kinds = {int(k.value): k for k in SpanKind}
        self._flags = TraceFlags(TraceFlags.SAMPLED)
        self._unset = Status(StatusCode.UNSET)
        self._error = functools.partial(Status, StatusCode.ERROR)

    def submit(self, records: list[SpanRecord]) -> None:
        self.submit_tuples(r.as_tuple() for r in records)

    def submit_tuples(self, records: Iterable[tuple[Any, ...]]) -> None:
        for record in records:
            span = self.readable(record)
            for processor in self.processors:
                processor.on_end(span)

    def readable(self, record: tuple[Any, ...]) -> Any:
        name, kind, trace_id, span_id, parent_id, parent_remote, start, end, attributes, error = record
        context, flags = self._context, self._flags
        return self._readable_span(
            name,
            context=context(trace_id, span_id, is_remote=False, trace_flags=flags),
            parent=context(trace_id, parent_id, is_remote=parent_remote, trace_flags=flags)
            if parent_id
            else None,
            resource=self._resource,
            attributes=attributes,
            kind=self._kinds[kind],
            status=self._error(error or None) if error is not None else self._unset,
            start_time=start,
            end_time=end,
            instrumentation_scope=self._scope,
        )

    def shutdown(self, timeout_s: float) -> None:
        """Flush and shut down every processor within `timeout_s` in all: the SDK's own
        `shutdown()` takes no timeout (a batch processor joins its export thread, which
        waits on its exporter), so it runs on a daemon thread waited for no longer."""
        deadline = time.monotonic() + timeout_s
        for processor in self.processors:
            processor.force_flush(int(max(0.0, deadline - time.monotonic()) * 1000))
            closing = threading.Thread(target=processor.shutdown, name="span-processor-shutdown", daemon=True)
            closing.start()
            closing.join(max(0.0, deadline - time.monotonic()))


def _hashed_once(resource: Resource) -> Resource:
    """`resource`, hashing once: the OTLP encoder groups spans by resource, and
    `Resource.__hash__` serializes the attributes to JSON at every call (a tenth of
    the relay's CPU, measured with py-spy)."""
    from opentelemetry.sdk.resources import Resource

    class HashedOnce(Resource):
        def __init__(self) -> None:
            super().__init__(resource.attributes, resource.schema_url)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash

    return HashedOnce()
