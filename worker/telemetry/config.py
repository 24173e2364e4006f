"""Which telemetry is on, from OpenTelemetry's own environment variables.

The worker reads the variables the OpenTelemetry SDK documents, with one difference:
an unset OTEL_TRACES_EXPORTER or OTEL_METRICS_EXPORTER means `none` (the SDK's
auto-configuration defaults to `otlp`), so a worker deployed without telemetry
configuration exports nothing and does no per-job SDK work.

    OTEL_TRACES_EXPORTER    none | otlp | gcp_trace | console   (comma-separated list allowed)
    OTEL_METRICS_EXPORTER   none | prometheus | gcp_monitoring | otlp | console
    OTEL_SDK_DISABLED       true switches both off
    OTEL_EXPORTER_OTLP_PROTOCOL  http/protobuf (the only one shipped)
    OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
    OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]ENDPOINT/HEADERS/TIMEOUT, OTEL_BSP_*,
    OTEL_METRIC_EXPORT_INTERVAL: read by the SDK and the exporters themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from worker.core.errors import ConfigError

TRACE_EXPORTERS = ("otlp", "gcp_trace", "console")
METRIC_EXPORTERS = ("prometheus", "gcp_monitoring", "otlp", "console")
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


@dataclass(frozen=True)
class TelemetryConfig:
    trace_exporters: tuple[str, ...] = ()
    metric_exporters: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.trace_exporters or self.metric_exporters)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TelemetryConfig:
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls()
        traces = _exporters(env, "OTEL_TRACES_EXPORTER", TRACE_EXPORTERS)
        metrics = _exporters(env, "OTEL_METRICS_EXPORTER", METRIC_EXPORTERS)
        if "otlp" in traces + metrics:
            for var in (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
            ):
                protocol = env.get(var, "").strip()
                if protocol and protocol != "http/protobuf":
                    raise ConfigError(
                        f"{var}={protocol!r} is not supported: the worker ships the OTLP exporter "
                        "over HTTP only; set it to http/protobuf (port 4318 on a collector)"
                    )
        if traces:
            _check_sampler(env)
        return cls(traces, metrics)


def _exporters(env: Mapping[str, str], var: str, known: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get(var, "").strip()
    names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    if names == ("none",) or not names:
        return ()
    unknown = [n for n in names if n not in known]
    if unknown or "none" in names:
        raise ConfigError(
            f"{var}={raw!r} is invalid: {', '.join(unknown) or 'none'} is not one of "
            f"none, {', '.join(known)} (none cannot be combined with others)"
        )
    return names


def _check_sampler(env: Mapping[str, str]) -> None:
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler and sampler not in SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER={sampler!r} is invalid: use one of {', '.join(SAMPLERS)}")
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if arg and sampler.endswith("traceidratio"):
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(
                f"OTEL_TRACES_SAMPLER_ARG={arg!r} is invalid: the ratio is a number from 0 to 1, e.g. 0.1"
            )
