"""The span exporters OTEL_TRACES_EXPORTER names, the resource, and their logging.

Shared by the worker (`tracing.py`) and the span relay (`relay.py`).
"""

from __future__ import annotations

import logging
import os
import time

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter

from worker.core.errors import ConfigError

SERVICE_NAME = "cloudrun-job-worker"


def resource() -> Resource:
    """OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, else service.name=cloudrun-job-worker."""
    named = "OTEL_SERVICE_NAME" in os.environ or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    return Resource.create({} if named else {"service.name": os.environ.get("K_SERVICE", SERVICE_NAME)})


def span_exporters(names: tuple[str, ...], project: str) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "gcp_trace":
            from opentelemetry.exporter.cloud_trace import CloudTraceSpanExporter

            exporters.append(CloudTraceSpanExporter(project_id=project))
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        else:  # TelemetryConfig allows no other
            raise ConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}")
    return exporters


class _OncePerMinute(logging.Filter):
    """Let a given message through once a minute: an exporter whose endpoint is down
    would otherwise log every failed batch and every dropped span."""

    def __init__(self, interval_s: float = 60.0) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.msg}"
        now = time.monotonic()
        if now - self._last.get(key, -self._interval_s) < self._interval_s:
            return False
        self._last[key] = now
        if len(self._last) > 1000:
            self._last.clear()
        return True


_NOISY_LOGGERS = (
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.trace.export",
    "opentelemetry.sdk.metrics._internal.export",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.cloud_trace",
    "opentelemetry.exporter.cloud_monitoring",
)


def quiet_exporter_logs() -> None:
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OncePerMinute) for f in logger.filters):
            logger.addFilter(_OncePerMinute())
