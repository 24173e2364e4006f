"""The worker's metrics through the OpenTelemetry metrics SDK.

Instruments (Prometheus names in brackets, as `/metrics` shows them):

    worker.jobs               counter    kind, status, lane   [worker_jobs_total]
        one per job outcome: succeeded, failed, rejected, expired, or retry (handed back)
    worker.job.attempts       histogram  kind           [worker_job_attempts]
        HTTP attempts per finished job
    worker.call.duration      histogram  kind, http.response.status_code  [worker_call_duration_seconds]
        one per HTTP attempt to a function; status 0 when it never answered
    worker.job.age            histogram  kind           [worker_job_age_seconds]
        when a job starts: now minus Pub/Sub's publish time (the lag that matters)
    worker.jobs.in_flight     up-down    kind           [worker_jobs_in_flight]
    worker.result.publish_failures  counter             [worker_result_publish_failures_total]
    worker.token.refreshes    counter    audience       [worker_token_refreshes_total]
    (and whatever is registered through `observe`, e.g. limiter and breaker state)

Exported as Prometheus text on the health server's `/metrics` (a registry of the
worker's own, not prometheus_client's global one), to Cloud Monitoring (under
workload.googleapis.com/), over OTLP, or to the console, every
OTEL_METRIC_EXPORT_INTERVAL ms (default 60,000) for the pushing exporters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from worker.core.errors import ConfigError
from worker.core.telemetry import Metrics

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_AGE_BUCKETS_S = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200, 21600, 86400)
_ATTEMPT_BUCKETS = (0, 1, 2, 3, 5, 10)

Reading = Callable[[], Iterable[tuple[float, dict[str, Any]]]]


class SdkMetrics(Metrics):
    enabled = True

    def __init__(self, readers: list[MetricReader], resource: Resource, registry: Any = None) -> None:
        self._registry = registry
        self._provider = MeterProvider(
            metric_readers=readers,
            resource=resource,
            shutdown_on_exit=False,  # bounded by Telemetry.shutdown instead
            views=[
                View(
                    instrument_name="worker.call.duration",
                    aggregation=ExplicitBucketHistogramAggregation(_LATENCY_BUCKETS_S),
                ),
                View(
                    instrument_name="worker.job.age",
                    aggregation=ExplicitBucketHistogramAggregation(_AGE_BUCKETS_S),
                ),
                View(
                    instrument_name="worker.job.attempts",
                    aggregation=ExplicitBucketHistogramAggregation(_ATTEMPT_BUCKETS),
                ),
            ],
        )
        meter = self._provider.get_meter("worker")
        self._meter = meter
        self._jobs = meter.create_counter("worker.jobs", "{job}", "Jobs finished, by kind, status and lane")
        self._attempts = meter.create_histogram(
            "worker.job.attempts", "{attempt}", "HTTP attempts per finished job"
        )
        self._call = meter.create_histogram("worker.call.duration", "s", "One HTTP attempt to a function")
        self._age = meter.create_histogram(
            "worker.job.age", "s", "Job age when it starts: now minus Pub/Sub's publish time"
        )
        self._in_flight = meter.create_up_down_counter(
            "worker.jobs.in_flight", "{job}", "Jobs being handled, by kind"
        )
        self._publish_failures = meter.create_counter(
            "worker.result.publish_failures", "{failure}", "Results or dead letters not published"
        )
        self._token_refreshes = meter.create_counter(
            "worker.token.refreshes", "{token}", "ID tokens minted, by audience"
        )

    @classmethod
    def from_exporters(cls, names: tuple[str, ...], resource: Resource, project: str) -> SdkMetrics:
        readers: list[MetricReader] = []
        registry = None
        for name in names:
            if name == "prometheus":
                from opentelemetry.exporter.prometheus import PrometheusMetricReader
                from prometheus_client import CollectorRegistry

                registry = CollectorRegistry(auto_describe=True)
                readers.append(
                    PrometheusMetricReader(
                        disable_target_info=True, scope_info_enabled=False, registry=registry
                    )
                )
            elif name == "gcp_monitoring":
                from opentelemetry.exporter.cloud_monitoring import CloudMonitoringMetricsExporter

                readers.append(
                    PeriodicExportingMetricReader(CloudMonitoringMetricsExporter(project_id=project))
                )
            elif name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

                readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
            elif name == "console":
                from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

                readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
            else:  # TelemetryConfig allows no other
                raise ConfigError(f"OTEL_METRICS_EXPORTER: unknown exporter {name!r}")
        return cls(readers, resource, registry)

    def job_started(self, kind: str, age_s: float | None) -> None:
        attrs = {"kind": kind}
        self._in_flight.add(1, attrs)
        if age_s is not None:
            self._age.record(max(0.0, age_s), attrs)

    def job_left(self, kind: str) -> None:
        self._in_flight.add(-1, {"kind": kind})

    def job_finished(self, kind: str | None, status: str, attempts: int, lane: str = "interactive") -> None:
        kind = kind or "unknown"
        self._jobs.add(1, {"kind": kind, "status": status, "lane": lane})
        if status != "retry":
            self._attempts.record(attempts, {"kind": kind})

    def call_finished(self, kind: str, duration_s: float, http_status: int | None) -> None:
        self._call.record(duration_s, {"kind": kind, "http.response.status_code": http_status or 0})

    def publish_failed(self) -> None:
        self._publish_failures.add(1)

    def token_refreshed(self, audience: str) -> None:
        self._token_refreshes.add(1, {"audience": audience})

    def observe(
        self, name: str, description: str, read: Reading, *, unit: str = "1", counter: bool = False
    ) -> None:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, attrs) for value, attrs in read()]

        if counter:
            self._meter.create_observable_counter(name, [callback], unit, description)
        else:
            self._meter.create_observable_gauge(name, [callback], unit, description)

    def prometheus_text(self) -> bytes | None:
        if self._registry is None:
            return None
        from prometheus_client import generate_latest

        return bytes(generate_latest(self._registry))

    def shutdown(self, timeout_s: float) -> None:
        self._provider.shutdown(timeout_millis=max(0.0, timeout_s) * 1000)
