"""The limits a deployment puts on each function, per instance and in all.

Per instance they come from the catalog (`max_concurrency`, `rate_per_s`) and from
the target's Cloud Run `Service` (worker/core/guard.py: `target_ceiling`); in all,
they are per instance x the deployment's max instances, WORKER_MAX_INSTANCES (the
worker cannot know how far its own service may scale; without it only per-instance
figures are printed). `worker setup --print-gcloud` prints these without asking the
Admin API; `worker doctor` prints them with what the Service states.
"""

from __future__ import annotations

from collections.abc import Callable

from worker.core.catalog import Catalog, JobKind
from worker.core.guard import Capacity, target_ceiling
from worker.core.settings import Settings


def _times(figure: float, instances: int | None, unit: str = "") -> str:
    if instances is None:
        return f"{figure:g}{unit} per instance"
    return f"{figure:g}{unit} per instance x {instances} instances = {figure * instances:g}{unit} in all"


def kind_lines(kind: JobKind, instances: int | None) -> list[str]:
    """The catalog's own limits of one kind."""
    lines = []
    if kind.max_concurrency is not None:
        lines.append(f"max_concurrency: {_times(kind.max_concurrency, instances)}")
    if kind.rate_per_s is not None:
        lines.append(f"rate_per_s: {_times(kind.rate_per_s, instances, '/s')} (bursts of {kind.burst})")
    return lines


def target_line(
    settings: Settings, catalog: Catalog, service: str, region: str, capacity: Capacity | None
) -> str:
    """At most how many calls at once one instance sends `service`, and why."""
    kinds = [
        catalog[k]
        for k in sorted(catalog)
        if catalog[k].service == service and (catalog[k].region or settings.region) == region
    ]
    ceiling, source = target_ceiling(kinds, capacity, settings.max_in_flight)
    return f"calls at once: {_times(ceiling, settings.max_instances)} (from {source})"


def report(
    settings: Settings,
    catalog: Catalog,
    capacity: Callable[[str, str], Capacity | None] | None = None,
) -> list[str]:
    """Lines describing every kind's limits; `capacity` None: the Services were not asked."""
    instances = settings.max_instances
    lines = [
        "Limits per worker instance"
        + (
            f" and for WORKER_MAX_INSTANCES={instances}"
            if instances
            else " (set WORKER_MAX_INSTANCES to the deployment's max instances for the global figures)"
        )
    ]
    for name in sorted(catalog):
        kind = catalog[name]
        own = kind_lines(kind, instances)
        if kind.service is None:
            lines.append(f"  {name} (batch): " + ("; ".join(own) if own else "no limit of its own"))
            continue
        region = kind.region or settings.region
        lines.append(f"  {name} -> {kind.service} ({region})")
        lines += [f"    {line}" for line in own]
        if capacity is None:
            lines.append(
                "    calls at once: "
                + (
                    f"max_concurrency, {_times(kind.max_concurrency, instances)}"
                    if kind.max_concurrency
                    else "the Service's max_instance_count x max_instance_request_concurrency, read at run "
                    f"time (`worker doctor` shows it), else WORKER_MAX_IN_FLIGHT: "
                    f"{_times(settings.max_in_flight, instances)}"
                )
            )
        else:
            stated = capacity(kind.service, region)
            lines.append("    " + target_line(settings, catalog, kind.service, region, stated))
    return lines
