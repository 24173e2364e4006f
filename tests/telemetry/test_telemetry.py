"""worker.telemetry: configuration from OTEL_* variables, the free no-op, the job span's life."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from localcloud import free_port
from tests.doubles import Invoker, Resolver
from worker.core.catalog import Catalog, default_catalog_dir
from worker.core.errors import ConfigError, TransientJobError
from worker.core.guard import Guard
from worker.core.pauses import PauseEntry
from worker.core.pipeline import Pipeline
from worker.core.shapes import Delivery
from worker.core.telemetry import NO_TELEMETRY, Metrics, Telemetry, trace_id_of
from worker.runtime.gauges import watch_protections
from worker.telemetry import setup_telemetry
from worker.telemetry.config import TelemetryConfig
from worker.telemetry.exporters import span_exporters
from worker.telemetry.metrics import SdkMetrics
from worker.telemetry.recorder import ProcessorSink, RecordingTelemetry
from worker.telemetry.tracing import SdkTelemetry

SENDER = "00-" + "c" * 32 + "-" + "d" * 16 + "-01"


@pytest.mark.parametrize(
    "env",
    [{}, {"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}],
)
def test_off_unless_an_exporter_is_named(env: dict[str, str]) -> None:
    assert setup_telemetry("p", "s", "t", environ=env) is NO_TELEMETRY


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin'"),
        ({"OTEL_TRACES_EXPORTER": "none,otlp"}, "none cannot be combined"),
        ({"OTEL_METRICS_EXPORTER": "statsd"}, "OTEL_METRICS_EXPORTER"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "set it to http/protobuf",
        ),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "10%",
            },
            "a number from 0 to 1",
        ),
    ],
)
def test_a_bad_setting_names_the_variable_and_the_fix(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace("(", r"\(")):
        TelemetryConfig.from_env(env)


def test_exporters_by_name() -> None:
    env = {"OTEL_TRACES_EXPORTER": "otlp, console", "OTEL_METRICS_EXPORTER": "none"}
    config = TelemetryConfig.from_env(env)
    assert config.trace_exporters == ("otlp", "console") and config.metric_exporters == ()
    kinds = [type(e).__name__ for e in span_exporters(config.trace_exporters, "p")]
    assert kinds == ["OTLPSpanExporter", "ConsoleSpanExporter"]


def test_trace_id_of_reads_only_well_formed_traceparents() -> None:
    assert trace_id_of(SENDER) == "c" * 32
    assert trace_id_of(None) is None and trace_id_of("00-abc-01") is None


def pipeline(telemetry: Any, invoker: Invoker | None = None) -> Pipeline:
    catalog = Catalog.load(default_catalog_dir())
    return Pipeline(
        catalog,
        Resolver(),
        invoker or Invoker(),
        region="r",
        max_payload_bytes=10_000,
        telemetry=telemetry,
    )


def delivery(body: dict[str, Any], **kw: Any) -> Delivery:
    return Delivery(data=json.dumps(body).encode(), attributes={}, message_id="m-1", **kw)


def test_tracing_off_touches_no_opentelemetry_code_per_job() -> None:
    """'Off and then free': a job handled with tracing off runs no OpenTelemetry function."""
    subject = pipeline(NO_TELEMETRY)
    job = delivery({"job_id": "j", "kind": "echo", "payload": {}, "traceparent": SENDER})
    called: set[str] = set()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            called.add(frame.f_globals.get("__name__", ""))

    async def handle() -> Any:
        sys.setprofile(profile)
        try:
            return await subject.handle(job)
        finally:
            sys.setprofile(None)

    outcome = asyncio.run(handle())
    assert outcome.result is not None and outcome.result.status.value == "succeeded"
    assert outcome.result.trace_id == "c" * 32  # the sender's trace, still named for the web app
    assert not {name for name in called if name.startswith("opentelemetry")}, sorted(called)
    assert "worker.core.telemetry" in called  # the no-op interface was called, and nothing behind it


@pytest.fixture(params=["recorder", "sdk"])
def traced(request: pytest.FixtureRequest) -> Iterator[tuple[Telemetry, InMemorySpanExporter]]:
    """Both tracers: the worker's recorder (spans made SDK spans by a ProcessorSink, as the
    relay does) and the SDK's own; every test of a span below holds for both."""
    exporter = InMemorySpanExporter()
    if request.param == "recorder":
        sink = ProcessorSink([SimpleSpanProcessor(exporter)])
        yield RecordingTelemetry(sink, Metrics(), subscription="jobs-worker", topic="jobs"), exporter
        sink.shutdown(1)
        return
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield SdkTelemetry(provider, Metrics(), subscription="jobs-worker", topic="jobs"), exporter
    provider.shutdown()


def test_a_job_span_continues_the_senders_trace(traced: tuple[Telemetry, InMemorySpanExporter]) -> None:
    telemetry, exporter = traced
    outcome = asyncio.run(
        pipeline(telemetry).handle(
            delivery(
                {"job_id": "j", "kind": "echo", "payload": {}, "traceparent": SENDER}, delivery_attempt=2
            )
        )
    )
    outcome.span.end("succeeded")
    (process,) = exporter.get_finished_spans()  # the stand-in resolver and invoker make none
    assert process.name == "process jobs" and process.kind is SpanKind.CONSUMER
    assert f"{process.context.trace_id:032x}" == "c" * 32
    assert process.parent is not None and f"{process.parent.span_id:016x}" == "d" * 16
    assert process.attributes["messaging.gcp_pubsub.message.delivery_attempt"] == 2
    assert process.attributes["messaging.message.id"] == "m-1"
    assert outcome.result is not None and outcome.result.trace_id == "c" * 32


@pytest.mark.parametrize(
    "bad",
    [
        "00-" + "0" * 32 + "-" + "d" * 16 + "-01",  # all-zero trace id
        "ff-" + "c" * 32 + "-" + "d" * 16 + "-01",  # forbidden version
        "00-" + "C" * 32 + "-" + "d" * 16 + "-01",  # upper case
        SENDER + "\r\nHost: evil.example",
        12,
    ],
)
def test_a_malformed_traceparent_starts_a_fresh_trace_and_the_job_runs(
    traced: tuple[Telemetry, InMemorySpanExporter], bad: Any
) -> None:
    telemetry, exporter = traced
    invoker = Invoker()
    outcome = asyncio.run(
        pipeline(telemetry, invoker).handle(
            delivery({"job_id": "j", "kind": "echo", "payload": {}, "traceparent": bad})
        )
    )
    outcome.span.end("succeeded")
    assert outcome.result is not None and outcome.result.status.value == "succeeded"
    assert invoker.calls  # the function was called
    process = next(s for s in exporter.get_finished_spans() if s.name == "process jobs")
    assert process.parent is None
    assert outcome.result.trace_id == f"{process.context.trace_id:032x}" != "c" * 32


def test_a_retried_job_ends_its_span_as_an_error(traced: tuple[Telemetry, InMemorySpanExporter]) -> None:
    telemetry, exporter = traced
    invoker = Invoker(TransientJobError("http_503", "svc answered 503"))
    outcome = asyncio.run(pipeline(telemetry, invoker).handle(delivery({"job_id": "j", "kind": "echo"})))
    assert not outcome.ack and outcome.retry_code == "http_503"
    outcome.span.end("retry", outcome.retry_code)
    process = next(s for s in exporter.get_finished_spans() if s.name == "process jobs")
    assert process.status.status_code is StatusCode.ERROR
    assert process.attributes["error.type"] == "http_503"
    assert process.attributes["worker.job.status"] == "retry"


def test_metrics_count_in_flight_and_age_per_catalog_kind() -> None:
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False, registry=registry)
    metrics = SdkMetrics([reader], Resource({}), registry)
    telemetry = SdkTelemetry(None, metrics, subscription="s", topic="t")
    published = datetime.now(UTC) - timedelta(seconds=42)
    subject = pipeline(telemetry)
    asyncio.run(subject.handle(delivery({"job_id": "j", "kind": "echo"}, publish_time=published)))
    # A kind the catalog does not know never becomes a label (no unbounded cardinality).
    asyncio.run(subject.handle(delivery({"job_id": "j2", "kind": "x" * 100})))
    text = (metrics.prometheus_text() or b"").decode()
    assert 'worker_jobs_in_flight{kind="echo"} 0.0' in text
    assert 'worker_job_age_seconds_count{kind="echo"} 1.0' in text
    assert 'worker_job_age_seconds_bucket{kind="echo",le="30"} 0.0' in text
    assert 'worker_job_age_seconds_bucket{kind="echo",le="60"} 1.0' in text
    assert "x" * 100 not in text


def test_breakers_limits_and_pauses_are_gauges_read_when_scraped() -> None:
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False, registry=registry)
    metrics = SdkMetrics([reader], Resource({}), registry)
    catalog = Catalog.load(default_catalog_dir())
    guard = Guard(catalog, region="us-central1", default_ceiling=50)
    watch_protections(metrics, guard)
    kind = catalog["account-scoring"]
    target = (kind.service, "us-central1")
    text = (metrics.prometheus_text() or b"").decode()
    assert 'worker_kind_paused{kind="account-scoring"} 0.0' in text
    assert "worker_breaker_open{" not in text  # no service called yet: no series

    async def call_then_fail() -> None:
        async with guard.call(kind) as call:
            call.answered(200)
        breaker = guard.breaker(target)
        for _ in range(breaker.spec.failures + 5):
            breaker.record(False)

    asyncio.run(call_then_fail())
    guard.pauses.apply(PauseEntry("account-scoring", paused=True, at=time.time()))
    text = (metrics.prometheus_text() or b"").decode()
    labels = f'region="us-central1",service="{kind.service}"'
    assert f"worker_breaker_open{{{labels}}} 1.0" in text
    assert f"worker_limit{{{labels}}} 50.0" in text  # WORKER_MAX_IN_FLIGHT: no 429 taught it less
    assert f"worker_limit_in_flight{{{labels}}} 0.0" in text
    assert 'worker_kind_paused{kind="account-scoring"} 1.0' in text
    assert 'worker_kind_paused{kind="batch-scoring"} 0.0' in text


def test_an_unreachable_otlp_endpoint_neither_blocks_a_job_nor_the_shutdown() -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    dead = f"http://127.0.0.1:{free_port()}/v1/traces"
    provider = TracerProvider()
    processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=dead, timeout=10), schedule_delay_millis=50)
    provider.add_span_processor(processor)
    telemetry = SdkTelemetry(provider, Metrics(), subscription="s", topic="t", processors=[processor])
    subject = pipeline(telemetry)

    async def many() -> list[Any]:
        outcomes = []
        for i in range(200):
            outcome = await subject.handle(delivery({"job_id": f"j{i}", "kind": "echo"}))
            outcome.span.end("succeeded")
            outcomes.append(outcome)
        return outcomes

    outcomes = asyncio.run(many())
    assert all(o.result is not None and o.result.status.value == "succeeded" for o in outcomes)
    time.sleep(0.2)  # the processor's thread is now retrying the dead endpoint
    started = time.monotonic()
    telemetry.shutdown(1.0)
    assert time.monotonic() - started < 3.0


def test_the_processor_sink_shuts_down_within_its_timeout_even_if_a_processor_hangs() -> None:
    import threading
    import time

    from worker.telemetry.recorder import ProcessorSink

    class Hanging:
        """A span processor whose exporter hangs: flush and shutdown block for 5 s."""

        def __init__(self) -> None:
            self.flushed_ms: list[int] = []
            self.gate = threading.Event()

        def on_end(self, span: object) -> None:
            return None

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            self.flushed_ms.append(timeout_millis)
            return False

        def shutdown(self) -> None:
            self.gate.wait(5)

    hanging = Hanging()
    sink = ProcessorSink([hanging])  # type: ignore[list-item]
    started = time.monotonic()
    sink.shutdown(0.2)
    took = time.monotonic() - started
    hanging.gate.set()
    assert took < 1.0, f"shutdown(0.2) took {took:.2f}s"
    assert hanging.flushed_ms and hanging.flushed_ms[0] <= 200
