"""Traces and metrics end to end, on the local cloud, with the worker run in this process.

One trace id goes from `enqueue` (the web app's span) through the worker's job span and
its HTTP attempt into the function (the local service records the `traceparent` it
received) and back in the result's `trace_id`; the span tree is read from an in-memory
exporter shared by the "web app" and the worker. A scrape of the health server's
`/metrics` after N jobs shows those N jobs by kind and status.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

from localcloud import free_port
from tests.e2e.harness import (
    WorkerProcess,
    collect_results,
    provision,
    publish,
    uid,
    worker_env,
    write_kind,
)
from worker.client import enqueue
from worker.core.logs import configure_logging
from worker.core.settings import load_settings
from worker.core.telemetry import Telemetry
from worker.runtime.app import run_worker
from worker.telemetry.metrics import SdkMetrics
from worker.telemetry.recorder import ProcessorSink, RecordingTelemetry
from worker.telemetry.tracing import SdkTelemetry

pytestmark = pytest.mark.e2e

_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider(resource=Resource.create({"service.name": "telemetry-test"}))
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))


def global_provider() -> TracerProvider:
    """The "web app's" tracer provider: OpenTelemetry allows one global per process."""
    if trace.get_tracer_provider() is not _PROVIDER:
        trace.set_tracer_provider(_PROVIDER)
    assert trace.get_tracer_provider() is _PROVIDER, "another test set a global tracer provider"
    return _PROVIDER


class InProcessWorker:
    """`run_worker` on a thread of its own with the given telemetry; stop() drains it."""

    def __init__(self, env: dict[str, str], telemetry: Telemetry) -> None:
        self.settings = load_settings(**env)
        self.telemetry = telemetry
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(run_worker(self.settings, self._stop, self.telemetry))
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> InProcessWorker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        assert not self._thread.is_alive(), "the worker did not stop within 60 s"
        self._loop.close()
        if self.error is not None:
            raise self.error


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("json", "debug", "local-project", stream=stream)  # job_succeeded is debug
    yield stream
    configure_logging("console", "warning")  # the stdlib handler off the StringIO
    # and structlog as the other tests find it: a level filter left behind drops the
    # info lines that tests capturing logs look for (test_health's probe events).
    structlog.reset_defaults()


def wait_http(url: str, timeout: float = 30) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return bytes(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def prometheus_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    samples = {}
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(1))))
            samples[labels] = float(match.group(2))
    return samples


def dump_trace(path: Path, spans: list[ReadableSpan], calls: dict[str | None, Any]) -> None:
    def parent_of(span: ReadableSpan) -> str | None:
        return f"{span.parent.span_id:016x}" if span.parent else None

    records = [
        {
            "name": s.name,
            "kind": s.kind.name,
            "span_id": f"{s.context.span_id:016x}",
            "parent_id": parent_of(s),
            "start_ns": s.start_time,
            "end_ns": s.end_time,
            "service": s.resource.attributes.get("service.name"),
            "attributes": {k: v for k, v in (s.attributes or {}).items() if isinstance(v, str | int)},
        }
        for s in sorted(spans, key=lambda s: s.start_time or 0)
    ]
    job_id = next(r["attributes"]["worker.job.id"] for r in records if "worker.job.id" in r["attributes"])
    received = calls[job_id]
    function = {"function_traceparent": received.traceparent, "function_at": received.at}
    path.write_text(json.dumps({"spans": records, **function}))


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


@pytest.mark.parametrize("tracer", ["recorder", "sdk"])
def test_one_trace_from_enqueue_through_the_worker_into_the_function_and_back(
    local_cloud: Any, pubsub_emulator: Any, names: Any, tmp_path: Path, logs: io.StringIO, tracer: str
) -> None:
    """The worker's recorder (as `worker run` uses it, its spans made SDK spans in this
    process instead of the relay's) and the SDK's own tracer make the same trace."""
    provider = global_provider()
    _EXPORTER.clear()
    echo = local_cloud.add_service(f"echo-tel-{uid()}", "echo")
    catalog = tmp_path / "jobs"
    write_kind(catalog, "echo", echo.name, attempts=3, backoff_initial_s=0.01, backoff_max_s=0.02)
    port = free_port()
    env = worker_env(local_cloud, names, WORKER_CATALOG_DIR=str(catalog), PORT=str(port))
    provision(env)
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False, registry=registry)
    metrics = SdkMetrics([reader], Resource({}), registry)
    # The recorder's sink shuts its processors (and their exporter) down with the worker.
    worker_spans = InMemorySpanExporter() if tracer == "recorder" else _EXPORTER
    telemetry: Telemetry = (
        RecordingTelemetry(
            ProcessorSink([SimpleSpanProcessor(worker_spans)], provider.resource),
            metrics,
            subscription=names.jobs_subscription,
            topic=names.jobs_topic,
        )
        if tracer == "recorder"
        else SdkTelemetry(provider, metrics, subscription=names.jobs_subscription, topic=names.jobs_topic)
    )
    settings = load_settings(**env)
    n = 5
    with InProcessWorker(env, telemetry):
        wait_http(f"http://127.0.0.1:{port}/readyz")
        job_ids = [enqueue("echo", {"i": i}, settings=settings) for i in range(n)]
        # A malformed traceparent never fails its job: it runs in a trace of its own.
        publish(
            env,
            [
                {"job_id": "bad-tp", "kind": "echo", "payload": {}, "traceparent": "00-xyz-01"},
                {"job_id": "unknown-kind", "kind": "nope", "payload": {}},
            ],
        )
        results = collect_results(env, {*job_ids, "bad-tp", "unknown-kind"}, timeout=60)
        # A job is counted once acked, a moment after its result is out.
        deadline = time.monotonic() + 10
        while True:
            scrape = wait_http(f"http://127.0.0.1:{port}/metrics").decode()
            counted = sum(prometheus_samples(scrape, "worker_jobs_total").values())
            if counted >= n + 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)

    spans = list(_EXPORTER.get_finished_spans())
    if worker_spans is not _EXPORTER:
        spans += worker_spans.get_finished_spans()
    by_job = {s.attributes.get("worker.job.id"): s for s in spans if s.name == f"process {names.jobs_topic}"}
    calls = {r.job_id: r for r in echo.requests}
    for job_id in job_ids:
        result = results[job_id][0]
        assert result["status"] == "succeeded", result
        sends = [s for s in spans if s.name == f"send {names.jobs_topic}"]
        send = next(s for s in sends if s.attributes["worker.job.id"] == job_id)
        trace_id = f"{send.context.trace_id:032x}"
        assert send.kind is SpanKind.PRODUCER
        # The worker's job span continues the web app's trace, as a child of its send span.
        process = by_job[job_id]
        assert process.kind is SpanKind.CONSUMER
        assert process.context.trace_id == send.context.trace_id
        assert process.parent is not None and process.parent.span_id == send.context.span_id
        assert process.attributes["messaging.system"] == "gcp_pubsub"
        assert process.attributes["messaging.operation.type"] == "process"
        assert process.attributes["messaging.destination.subscription.name"] == names.jobs_subscription
        assert process.attributes["messaging.message.id"]
        assert process.attributes["worker.job.status"] == "succeeded"
        tree = {s.name: s for s in children(spans, process)}
        # resolve and token are spans when they did work (the Admin API, a token minted):
        # once, under whichever job came first; a cache hit is no span.
        assert (
            {"POST", f"send {names.results_topic}"}
            <= set(tree)
            <= {
                "resolve",
                "token",
                "POST",
                f"send {names.results_topic}",
            }
        ), sorted(tree)
        call = tree["POST"]
        assert call.kind is SpanKind.CLIENT and call.attributes["http.response.status_code"] == 200
        assert tree[f"send {names.results_topic}"].kind is SpanKind.PRODUCER
        # The function got the call span as its parent: same trace, the call's span id.
        received = calls[job_id].traceparent
        assert received == f"00-{trace_id}-{call.context.span_id:016x}-{int(call.context.trace_flags):02x}"
        assert call.context.trace_flags.sampled
        # ... and the result names the trace, for the web app's link.
        assert result["trace_id"] == trace_id

    if os.environ.get("TRACE_PICTURE_JSON"):  # scripts/trace_waterfall.py draws docs/operations.md's picture
        first = by_job[job_ids[0]].context.trace_id
        one_trace = [s for s in spans if s.context.trace_id == first]
        dump_trace(Path(os.environ["TRACE_PICTURE_JSON"]), one_trace, calls)

    job_spans = {s.context.span_id for s in by_job.values()}
    for name in ("resolve", "token"):
        (step,) = [s for s in spans if s.name == name]
        assert step.parent is not None and step.parent.span_id in job_spans

    # A malformed traceparent: a fresh trace, through to the function and the result.
    bad = results["bad-tp"][0]
    assert bad["status"] == "succeeded"
    assert bad["trace_id"] and calls["bad-tp"].traceparent.split("-")[1] == bad["trace_id"]
    assert by_job["bad-tp"].parent is None
    # A rejected message still gets a span, marked as an error.
    rejected = by_job["unknown-kind"]
    assert rejected.attributes["worker.job.status"] == "rejected"
    assert rejected.attributes["error.type"] == "unknown_kind"

    # Log lines carry the worker's span of the same trace, in Cloud Logging's fields.
    lines = [json.loads(line) for line in logs.getvalue().splitlines() if line.startswith("{")]
    traced = [
        line for line in lines if line.get("job_id") == job_ids[0] and line["message"] == "job_succeeded"
    ]
    assert traced, lines[-5:]
    trace_id = results[job_ids[0]][0]["trace_id"]
    assert traced[0]["logging.googleapis.com/trace"] == f"projects/local-project/traces/{trace_id}"
    assert traced[0]["logging.googleapis.com/spanId"] == f"{by_job[job_ids[0]].context.span_id:016x}"

    # /metrics: the N jobs by kind and status, and the other instruments.
    jobs = prometheus_samples(scrape, "worker_jobs_total")
    assert jobs[(("kind", "echo"), ("lane", "interactive"), ("status", "succeeded"))] == n + 1  # and bad-tp
    assert jobs[(("kind", "unknown"), ("lane", "interactive"), ("status", "rejected"))] == 1
    assert prometheus_samples(scrape, "worker_job_age_seconds_count")[(("kind", "echo"),)] == n + 1
    assert prometheus_samples(scrape, "worker_jobs_in_flight")[(("kind", "echo"),)] == 0
    calls_seen = prometheus_samples(scrape, "worker_call_duration_seconds_count")
    assert calls_seen[(("http_response_status_code", "200"), ("kind", "echo"))] == n + 1
    assert sum(prometheus_samples(scrape, "worker_token_refreshes_total").values()) >= 1


def test_jobs_flow_and_the_worker_stops_in_time_with_the_collector_down(
    local_cloud: Any, pubsub_emulator: Any, names: Any, tmp_path: Path
) -> None:
    """`worker run` exporting spans to an OTLP endpoint where nothing listens."""
    echo = local_cloud.add_service(f"echo-down-{uid()}", "echo")
    catalog = tmp_path / "jobs"
    write_kind(catalog, "echo", echo.name)
    env = worker_env(
        local_cloud,
        names,
        WORKER_CATALOG_DIR=str(catalog),
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_TRACES_SAMPLER="always_on",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"http://127.0.0.1:{free_port()}/v1/traces",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    provision(env)
    jobs = [{"job_id": f"down-{i}", "kind": "echo", "payload": {"i": i}} for i in range(300)]
    with WorkerProcess(env, name="otlp-down") as worker:
        worker.wait_ready()
        publish(env, jobs)
        results = collect_results(env, {j["job_id"] for j in jobs}, timeout=120)
        # Let the exporter fail a few times, then stop while it is retrying.
        time.sleep(1.5)
        started = time.monotonic()
        assert worker.stop() == 0
        stopped_in = time.monotonic() - started
        logs = worker.logs()
    assert all(r[0]["status"] == "succeeded" and r[0]["trace_id"] for r in results.values())
    # Grace period (5 s here) plus the 2 s given to the last export, with room for a busy
    # machine; before the bound, the SDK's exit hook waited 30 s for the dead endpoint.
    grace = float(env["WORKER_SHUTDOWN_GRACE_SECONDS"])
    assert stopped_in < grace + 2 + 5, f"stopped in {stopped_in:.1f}s"
    # The exporter's complaints are rate-limited, not one per batch.
    assert 1 <= logs.count("Failed to export") + logs.count("Transient error") <= 4, logs[-3000:]


class OtlpReceiver:
    """An OTLP/HTTP trace endpoint on a thread: keeps every span it is sent, decoded."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list[tuple[dict[str, Any], Any]] = []  # (resource attributes, span)
        received = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                request = ExportTraceServiceRequest.FromString(body)
                for rs in request.resource_spans:
                    attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
                    received.extend((attrs, span) for ss in rs.scope_spans for span in ss.spans)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()


def test_worker_run_exports_each_jobs_spans_through_the_relay_to_an_otlp_collector(
    local_cloud: Any, pubsub_emulator: Any, names: Any, tmp_path: Path
) -> None:
    """`worker run` as deployed: spans recorded in the worker, exported over OTLP by the
    span relay (a child process); they arrive whole, in the sender's traces, and the
    function's parent is the call span."""
    receiver = OtlpReceiver()
    echo = local_cloud.add_service(f"echo-relay-{uid()}", "echo")
    catalog = tmp_path / "jobs"
    write_kind(catalog, "echo", echo.name)
    env = worker_env(
        local_cloud,
        names,
        WORKER_CATALOG_DIR=str(catalog),
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_SERVICE_NAME="relay-test",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    provision(env)
    senders = {f"relay-{i}": (f"{i + 1:032x}", f"{i + 1:016x}") for i in range(40)}
    jobs = [
        {"job_id": job_id, "kind": "echo", "payload": {}, "traceparent": f"00-{trace_hex}-{span}-01"}
        for job_id, (trace_hex, span) in senders.items()
    ]
    try:
        with WorkerProcess(env, name="relay") as worker:
            worker.wait_ready()
            publish(env, jobs)
            results = collect_results(env, set(senders), timeout=60)
            assert worker.stop() == 0  # the relay exports what it holds before the worker exits
    finally:
        receiver.close()
    spans = receiver.spans
    assert {attrs.get("service.name") for attrs, _ in spans} == {"relay-test"}
    by_id = {span.span_id: span for _, span in spans}
    calls = {r.job_id: r for r in echo.requests}
    for job_id, (trace_hex, parent) in senders.items():
        assert results[job_id][0]["trace_id"] == trace_hex
        process = [
            s
            for _, s in spans
            if s.name == f"process {names.jobs_topic}"
            and any(a.key == "worker.job.id" and a.value.string_value == job_id for a in s.attributes)
        ]
        assert len(process) == 1, job_id
        job = process[0]
        assert job.trace_id.hex() == trace_hex and job.parent_span_id.hex() == parent
        assert job.kind == 5  # SPAN_KIND_CONSUMER in OTLP's numbering
        children = [s for s in by_id.values() if s.parent_span_id == job.span_id]
        call = next(s for s in children if s.name == "POST")
        assert call.kind == 3 and call.trace_id.hex() == trace_hex  # SPAN_KIND_CLIENT
        assert calls[job_id].traceparent == f"00-{trace_hex}-{call.span_id.hex()}-01"
        assert any(s.name == f"send {names.results_topic}" and s.kind == 4 for s in children)  # PRODUCER
        assert job.start_time_unix_nano <= call.start_time_unix_nano <= call.end_time_unix_nano
        assert call.end_time_unix_nano <= job.end_time_unix_nano
