"""`make bench` in miniature: the benchmark's code runs end to end and reports correctly.

A few hundred jobs through the ceiling, `worker run` (also on a subscription with a
retry policy), the minimal aiohttp worker, the naive worker and the Celery peer;
asserts counts, successes, the calls to Google, the results-per-second series, the
plot and the JSON's shape, never speed (the machine is shared and small).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from bench.report import run_suite, table
from bench.scenarios import Run, Scenario

pytestmark = pytest.mark.e2e


CONTENDERS = ("ceiling", "ours", "ours-retry", "minimal", "naive", "celery")


def test_bench_runs_every_contender_and_writes_every_field(
    local_cloud: Any, pubsub_emulator: Any, tmp_path: Path
) -> None:
    scenarios = [
        Scenario("a", "smoke backlog", 200, 0.0, CONTENDERS, max_in_flight=50),
        Scenario("c", "smoke open loop", 20, 0.05, ("ceiling", "ours"), max_in_flight=50, rate_per_s=20.0),
    ]
    report, path = run_suite(local_cloud, scenarios, tmp_path, echo=lambda _: None)

    written = json.loads(path.read_text())
    assert path.parent == tmp_path
    assert {"machine", "scenarios", "runs", "ratios", "targets"} <= written.keys()
    assert {"date", "nproc", "cpu_model", "python", "libraries"} <= written["machine"].keys()
    assert [(r["scenario"], r["contender"]) for r in written["runs"]] == [
        *(("a", c) for c in CONTENDERS),
        ("c", "ceiling"),
        ("c", "ours"),
    ]
    every_field = {f.name for f in fields(Run)}
    for run in written["runs"]:
        assert run.keys() == every_field
        assert run["completed"] == run["succeeded"] == run["jobs"], run
        assert run["duplicates"] == run["dead_lettered"] == 0 and not run["capped"], run
        assert run["jobs_per_s"] > 0 and run["cpu_s_per_1000"] > 0 and run["peak_rss_mib"] > 0, run
        # Arrivals per second since the consumer was ready add up to every job.
        assert sum(run["per_second"]) == run["jobs"], run
        assert run["driver_cpu_s_per_1000"] is not None and len(run["load_average"]) == 3, run
    by_contender = {(r["scenario"], r["contender"]): r for r in written["runs"]}
    ceiling, ours, retry, minimal, naive, celery = (by_contender[("a", c)] for c in CONTENDERS)
    assert retry["retry_policy"] and not ours["retry_policy"]
    # The naive worker asks Google for everything on every job; ours, the minimal worker
    # and Celery's task (URL looked up at start, token cached) once per service.
    assert naive["id_tokens_for_service"] == naive["admin_api_calls_for_service"] == 200
    for run in (ours, retry, minimal, celery):
        assert run["id_tokens_for_service"] == run["admin_api_calls_for_service"] == 1, run
    assert ceiling["id_tokens_minted"] == ceiling["admin_api_calls"] == 0
    for run in written["runs"]:
        assert set(run["latency_ms"]) == {"p50", "p95", "p99"}
        assert 0 < run["latency_ms"]["p50"] <= run["latency_ms"]["p95"] <= run["latency_ms"]["p99"]
    assert set(written["ratios"]) == {
        "a_ours_over_ceiling",
        "a_ours_retry_over_ceiling",
        "a_minimal_over_ceiling",
        "a_naive_over_ceiling",
        "a_celery_over_ceiling",
        "a_ours_over_minimal",
        "a_ours_over_celery",
        "a_ours_over_naive",
        "b_ours_over_naive",
        "b_ours_over_ceiling",
    }
    assert written["ratios"]["a_ours_over_ceiling"] > 0 and written["ratios"]["a_celery_over_ceiling"] > 0
    judged = {t["target"]: t for t in written["targets"]}
    assert {"a: ours / ceiling", "a: ours-retry / ceiling", "c: p50 ms", "c: p99 ms"} <= judged.keys()
    assert judged["a: ours jobs without a result, dead-lettered"]["met"] is True
    assert judged["a: ours-retry jobs without a result, dead-lettered"]["met"] is True
    assert [Path(p).name for p in written["plots"]] == [f"{path.stem}-a.png", f"{path.stem}-c.png"]
    assert all(Path(p).read_bytes().startswith(b"\x89PNG") for p in written["plots"])
    assert all(t["met"] in (True, False, None) for t in written["targets"])
    assert "ours" in table(report)
