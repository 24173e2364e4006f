"""The protections' state as metrics: breakers, adaptive limits and pauses (issue 15's
state, issue 16's metrics), read from the Guard each time the metrics are collected.

Labels are bounded: `service` and `region` name a Cloud Run service of the catalog,
`kind` is a kind of the catalog.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from worker.core.breaker import CLOSED
from worker.core.guard import Guard
from worker.core.telemetry import Metrics

Reading = Callable[[], list[tuple[float, dict[str, str]]]]


def watch_protections(metrics: Metrics, guard: Guard) -> None:
    """Register gauges on `metrics` that read `guard` at collection time."""
    if not metrics.enabled:
        return

    def read(field: str, value: Callable[[Any], float]) -> Reading:
        def readings() -> list[tuple[float, dict[str, str]]]:
            return [
                (value(entry[field]), {"service": service, "region": region})
                for (service, region), entry in guard.states().items()
                if field in entry
            ]

        return readings

    def paused() -> list[tuple[float, dict[str, str]]]:
        now_paused = guard.pauses.paused()
        return [(1.0 if kind in now_paused else 0.0, {"kind": kind}) for kind in sorted(guard.catalog)]

    metrics.observe(
        "worker.breaker.open",
        "1 while calls to the service are stopped by its circuit breaker (open or half-open)",
        read("breaker", lambda state: 0.0 if state == CLOSED else 1.0),
    )
    metrics.observe(
        "worker.limit", "Calls the adaptive limit lets go to the service at once", read("limit", float)
    )
    metrics.observe("worker.limit.in_flight", "Calls to the service in flight now", read("in_flight", float))
    metrics.observe("worker.kind.paused", "1 while the kind is paused (worker pause)", paused)
