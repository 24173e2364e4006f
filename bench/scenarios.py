"""Run one scenario's contenders (ceiling, naive, ours) on the local cloud and measure them.

Every contender gets fresh topics and a service of its own, so one run's backlog,
leftovers or cached tokens never reach another, and the cloud's counters are read
as deltas around each run. A backlog is published before its consumer starts; an
open-loop scenario publishes at a fixed rate while the consumer runs.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # lazy-loaded module

from bench.measure import MIB, ProcessMonitor, parse_time, percentile
from tests.conftest import Names
from tests.e2e.harness import WorkerProcess, drain, provision, publish, uid, worker_env, write_kind

CONTENDERS = {"ceiling": "bench.ceiling", "naive": "bench.naive_worker", "ours": "worker"}
# Extra environment per contender (bench/tracing.py adds `worker run` with tracing on).
CONTENDER_ENV: dict[str, dict[str, str]] = {}
KIND = "bench-echo"


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    jobs: int
    latency_s: float
    contenders: tuple[str, ...]
    max_in_flight: int = 200
    rate_per_s: float | None = None  # open loop; None publishes the whole backlog first
    naive_cap_s: float = 60.0  # the naive worker is stopped here, its rate taken from what finished
    timeout_s: float = 600.0


def suite(*, quick: bool, max_in_flight: int, naive_cap_s: float) -> list[Scenario]:
    """BENCHMARKS.md's scenarios (a)-(d); `quick` shrinks them to a smoke size."""
    scale = 20 if quick else 1
    cap = min(naive_cap_s, 20.0) if quick else naive_cap_s
    duration_s = 10 if quick else 60
    rate = 50.0
    return [
        Scenario(
            "a",
            "backlog, no added latency",
            20_000 // scale,
            0.0,
            ("ceiling", "naive", "ours"),
            max_in_flight,
            naive_cap_s=cap,
        ),
        Scenario(
            "b",
            "backlog, 200 ms function",
            5_000 // scale,
            0.2,
            ("ceiling", "naive", "ours"),
            max_in_flight,
            naive_cap_s=cap,
        ),
        Scenario(
            "c",
            "open loop 50 jobs/s, 50 ms function",
            int(rate * duration_s),
            0.05,
            ("ceiling", "ours"),
            max_in_flight,
            rate_per_s=rate,
        ),
        Scenario(
            "d",
            "1,000 in flight, 2 s function",
            1_000 // (5 if quick else 1),
            2.0,
            ("ours",),
            max_in_flight=1_000,
        ),
    ]


@dataclass
class Run:
    """What one contender did in one scenario (the JSON's per-run record)."""

    scenario: str
    contender: str
    jobs: int
    max_in_flight: int | None
    completed: int = 0
    succeeded: int = 0
    duplicates: int = 0
    capped: bool = False
    elapsed_s: float | None = None
    jobs_per_s: float | None = None
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    # The worker's own started_at -> finished_at (ours' results carry it): a job's
    # latency minus this is time spent queued, in Pub/Sub or waiting for a slot.
    duration_ms_p50: float | None = None
    cpu_s: float = 0.0
    cpu_s_per_1000: float | None = None
    peak_rss_mib: float = 0.0
    machine_busy_pct: float = 0.0
    id_tokens_minted: int = 0
    id_tokens_for_service: int = 0
    admin_api_calls: int = 0
    admin_api_calls_for_service: int = 0


def job(scenario: Scenario, index: int) -> dict[str, Any]:
    return {
        "job_id": f"{scenario.name}-{index}",
        "kind": KIND,
        "payload": {"n": index},
        "created_at": datetime.now(UTC).isoformat(),
    }


def publish_open_loop(env: dict[str, str], scenario: Scenario, created: dict[str, float]) -> None:
    """Publish at `rate_per_s` on a fixed schedule (open loop: never waits for the consumer)."""
    assert scenario.rate_per_s
    publisher = pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=100, max_latency=0.001)
    )
    topic = publisher.topic_path(env["GOOGLE_CLOUD_PROJECT"], env["WORKER_JOBS_TOPIC"])
    start = time.monotonic()
    futures = []
    for index in range(scenario.jobs):
        time.sleep(max(0.0, start + index / scenario.rate_per_s - time.monotonic()))
        body = job(scenario, index)
        created[body["job_id"]] = parse_time(body["created_at"])
        futures.append(publisher.publish(topic, json.dumps(body).encode(), job_id=body["job_id"]))
    for future in futures:
        future.result(timeout=60)
    publisher.stop()


def run_contender(cloud: Any, scenario: Scenario, contender: str) -> Run:
    service = cloud.add_service(f"bench-{scenario.name}-{contender}-{uid()}", "echo")
    service.latency_s = scenario.latency_s
    catalog = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    # One attempt: a failure must show as a failed result, not be retried into the figures.
    write_kind(catalog, KIND, service.name, attempts=1, timeout_s=max(30.0, 10 * scenario.latency_s))
    acks_file = catalog / "acks.txt"
    env = worker_env(
        cloud,
        Names(),
        WORKER_CATALOG_DIR=str(catalog),
        WORKER_MAX_IN_FLIGHT=str(scenario.max_in_flight),
        BENCH_EXPECT=str(scenario.jobs),
        BENCH_ACKS_FILE=str(acks_file),
        **CONTENDER_ENV.get(contender, {}),
    )
    provision(env)
    created: dict[str, float] = {}
    if scenario.rate_per_s is None:
        jobs = [job(scenario, i) for i in range(scenario.jobs)]
        created = {j["job_id"]: parse_time(j["created_at"]) for j in jobs}
        publish(env, jobs)
    tokens_before, calls_before = Counter(cloud.id_tokens_minted), Counter(cloud.admin_api_calls)
    ours = contender not in ("ceiling", "naive")  # a `worker run`, whatever its settings
    run = Run(scenario.name, contender, scenario.jobs, scenario.max_in_flight if ours else None)
    try:
        with WorkerProcess(env, name=f"bench-{contender}", module=CONTENDERS[contender]) as process:
            process.wait_ready(timeout=60)
            with ProcessMonitor(process.proc.pid) as monitor:
                results = consume(env, scenario, contender, created, process, acks_file)
            if ours:
                process.stop()
        tokens = Counter(cloud.id_tokens_minted) - tokens_before
        calls = Counter(cloud.admin_api_calls) - calls_before
    finally:
        cloud.remove_service(service.name)
    run.cpu_s = monitor.cpu_s
    run.peak_rss_mib = round(monitor.peak_rss / MIB, 1)
    run.machine_busy_pct = monitor.machine_busy_pct
    run.id_tokens_minted = sum(tokens.values())
    run.id_tokens_for_service = sum(n for audience, n in tokens.items() if audience in service.audiences())
    run.admin_api_calls = sum(calls.values())
    run.admin_api_calls_for_service = sum(n for (_, name), n in calls.items() if name == service.name)
    finished = score(run, results, created)
    rate(run, finished)
    return run


def wait_for_file(path: Path, process: WorkerProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the ceiling wrote no acks file:\n{process.logs()[-2000:]}")
        time.sleep(0.1)


def consume(
    env: dict[str, str],
    scenario: Scenario,
    contender: str,
    created: dict[str, float],
    process: WorkerProcess,
    acks_file: Path,
) -> list[dict[str, Any]]:
    """Results read back from the results topic, or the ceiling's acks taken as results
    (an open loop publishes meanwhile)."""
    publisher = None
    if scenario.rate_per_s is not None:
        publisher = threading.Thread(target=publish_open_loop, args=(env, scenario, created))
        publisher.start()
    if contender == "ceiling":
        wait_for_file(acks_file, process, scenario.timeout_s)
        results = []
        for line in acks_file.read_text().splitlines():
            acked_at, job_id = line.split()
            finished_at = datetime.fromtimestamp(float(acked_at), UTC).isoformat()
            results.append({"job_id": job_id, "status": "succeeded", "finished_at": finished_at})
    else:
        limit = scenario.naive_cap_s if contender == "naive" else scenario.timeout_s
        messages = drain(env, "WORKER_RESULTS_SUBSCRIPTION", scenario.jobs, timeout=limit)
        results = [json.loads(message.data) for message in messages]
    if publisher is not None:
        publisher.join()
    return results


def score(run: Run, results: list[dict[str, Any]], created: dict[str, float]) -> list[float]:
    """Fill counts and latencies in; return each job's (first) finish time."""
    first: dict[str, dict[str, Any]] = {}
    for result in results:
        first.setdefault(result["job_id"], result)
    run.duplicates = len(results) - len(first)
    run.completed = len(first)
    run.succeeded = sum(1 for r in first.values() if r["status"] == "succeeded")
    run.capped = run.completed < run.jobs
    finished = {job_id: parse_time(r["finished_at"]) for job_id, r in first.items()}
    latencies = [1000 * (t - created[job_id]) for job_id, t in finished.items()]
    run.latency_ms = {f"p{q}": _round(percentile(latencies, q)) for q in (50, 95, 99)}
    durations = [float(r["duration_ms"]) for r in first.values() if "duration_ms" in r]
    run.duration_ms_p50 = _round(percentile(durations, 50))
    return list(finished.values())


def rate(run: Run, finished: list[float]) -> None:
    """Jobs per second from the first finish (result or ack) to the last, and CPU per 1,000."""
    if len(finished) > 1:
        run.elapsed_s = round(max(finished) - min(finished), 3)
        # n finishes span n - 1 intervals.
        run.jobs_per_s = round((len(finished) - 1) / max(run.elapsed_s, 1e-6), 1)
    if run.completed:
        run.cpu_s_per_1000 = round(1000 * run.cpu_s / run.completed, 3)
    run.cpu_s = round(run.cpu_s, 2)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
