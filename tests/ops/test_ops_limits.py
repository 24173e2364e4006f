"""The limits `worker doctor` and `worker setup --print-gcloud` print: per instance and in all."""

from __future__ import annotations

from worker.core.catalog import Catalog, JobKind
from worker.core.guard import Capacity
from worker.core.settings import Settings
from worker.ops.limits import report


def catalog() -> Catalog:
    return Catalog(
        {
            "score": JobKind(kind="score", service="scoring", max_concurrency=20, rate_per_s=5),
            "echo": JobKind(kind="echo", service="echo"),
        }
    )


def test_global_figures_are_per_instance_times_max_instances() -> None:
    lines = "\n".join(report(Settings(project="p", max_instances=10), catalog()))
    assert "WORKER_MAX_INSTANCES=10" in lines
    assert "max_concurrency: 20 per instance x 10 instances = 200 in all" in lines
    assert "rate_per_s: 5/s per instance x 10 instances = 50/s in all (bursts of 5)" in lines
    assert "else WORKER_MAX_IN_FLIGHT: 100 per instance x 10 instances = 1000 in all" in lines


def test_with_the_services_asked_the_figure_names_its_source() -> None:
    stated = {"echo": Capacity(3, 10, "Service echo (scaling.max_instance_count)")}
    lines = report(Settings(project="p"), catalog(), lambda service, region: stated.get(service))
    assert (
        "    calls at once: 30 per instance (from Service echo (scaling.max_instance_count): "
        "max_instance_count 3 x max_instance_request_concurrency 10)" in lines
    )
    assert "    calls at once: 20 per instance (from catalog: kind 'score' max_concurrency)" in lines
    assert lines[0].endswith(
        "(set WORKER_MAX_INSTANCES to the deployment's max instances for the global figures)"
    )
