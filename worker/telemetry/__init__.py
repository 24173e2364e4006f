"""OpenTelemetry behind the worker's thin interface (`worker.core.telemetry`).

`setup_telemetry` reads OpenTelemetry's own environment variables (`config.py`) and,
only when something is switched on, imports the SDK (`tracing.py`, `metrics.py`) and
returns an SDK-backed `Telemetry`; otherwise the no-op, which costs nothing per job.
"""

from __future__ import annotations

from typing import Any

from worker.core.telemetry import NO_TELEMETRY, Telemetry


def setup_telemetry(project: str, subscription: str, topic: str, environ: Any = None) -> Telemetry:
    """A Telemetry from OpenTelemetry's environment variables; the no-op one when all are off.

    Raises ConfigError (naming the variable and the fix) for a value it cannot use.
    """
    import os

    from worker.telemetry.config import TelemetryConfig

    config = TelemetryConfig.from_env(os.environ if environ is None else environ)
    if not config.enabled:
        return NO_TELEMETRY
    from worker.telemetry.tracing import build_telemetry

    return build_telemetry(config, project=project, subscription=subscription, topic=topic)
