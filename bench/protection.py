"""Protecting the functions (issue 15): capacity found from 429s, a held rate, a 60 s outage.

    .venv/bin/python -m bench.protection [--only capacity,rate,outage] [--outage-s 60] [--rate-s 60]

Starts the Pub/Sub emulator and the local cloud, then one `worker run` process per
measurement, each with a catalog of its own:

- capacity: a service answering 429 above C=10 requests at once, 0.1 s per request,
  whose Service claims 10 x 80; 2,000 jobs. Throughput against 0.8 x C / latency,
  the share of calls refused over time, jobs failed.
- rate: a kind with rate_per_s = 50 (burst 1), jobs published at 55/s: calls per
  second at the service over `--rate-s` seconds (target: within 5% of 50).
- outage: two kinds published open-loop (flaky 20 jobs/s, steady 100 jobs/s); the
  flaky service answers 503 for `--outage-s` seconds. When its breaker opens, the
  steady kind's throughput during the outage against before, jobs failed or
  dead-lettered, and how soon calls resume after recovery.
Prints the figures and writes them as JSON to bench/results/protection-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from localcloud import LocalCloud, PubSubEmulator
from tests.conftest import METADATA_PORT, PROJECT, Names  # pins GCE_METADATA_HOST first
from tests.e2e.harness import (
    WorkerProcess,
    collect_results,
    drain,
    provision,
    publish,
    worker_env,
    write_kind,
)

RESULTS = Path(__file__).resolve().parent / "results"


def jobs(kind: str, n: int, prefix: str) -> list[dict[str, Any]]:
    return [{"job_id": f"{prefix}-{i}", "kind": kind, "payload": {"i": i}} for i in range(n)]


def statuses(results: dict[Any, list[dict[str, Any]]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entries in results.values():
        counts[entries[0]["status"]] = counts.get(entries[0]["status"], 0) + 1
    return counts


def log_times(worker: WorkerProcess, name: str) -> list[float]:
    return [
        datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp()
        for e in worker.log_events()
        if e.get("message") == name
    ]


def env_for(cloud: Any, catalog: Path, **extra: str) -> dict[str, str]:
    env = worker_env(cloud, Names(), WORKER_CATALOG_DIR=str(catalog), **extra)
    provision(env)
    return env


def capacity(cloud: Any) -> dict[str, Any]:
    """The service says nothing true about its capacity; then, as a baseline, it does."""
    found = capacity_run(cloud, stated=False)
    stated = capacity_run(cloud, stated=True)
    found["baseline_stated_throughput_per_s"] = stated["throughput_per_s"]
    found["baseline_stated_refused_429"] = stated["refused_429"]
    found["throughput_vs_stated"] = round(found["throughput_per_s"] / stated["throughput_per_s"], 3)
    return found


def capacity_run(cloud: Any, *, stated: bool) -> dict[str, Any]:
    c, latency, n = 10, 0.1, 2000
    service = cloud.add_service(f"narrow-bench-{'stated' if stated else 'found'}", "echo")
    service.latency_s = latency
    service.set_capacity(1, c, stated=stated)
    if not stated:
        service.max_instance_count, service.max_instance_request_concurrency = 10, 80
    catalog = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    write_kind(catalog, "narrow", service.name, attempts=10, backoff_initial_s=0.05, backoff_max_s=0.5)
    env = env_for(cloud, catalog, WORKER_MAX_IN_FLIGHT="100")
    batch = jobs("narrow", n, "n")
    with WorkerProcess(env, name="bench-capacity") as worker:
        worker.wait_ready()
        publish(env, batch)
        results = collect_results(env, {j["job_id"] for j in batch}, timeout=300)
        worker.stop()
    requests = sorted(service.requests, key=lambda r: r.at)
    ok = [r.at for r in requests if r.status == 200]
    start = requests[0].at
    windows = []
    for second in range(int(requests[-1].at - start) + 1):
        inside = [r for r in requests if second <= r.at - start < second + 1]
        refused = sum(1 for r in inside if r.status == 429)
        windows.append(round(refused / len(inside), 3) if inside else 0.0)
    # Settled: from this second on, the refused share averages under 5%.
    settled_after = next(
        (i for i in range(len(windows)) if sum(windows[i:]) / len(windows[i:]) <= 0.05), None
    )
    throughput = (len(ok) - 1) / (ok[-1] - ok[0])
    return {
        "capacity": c,
        "latency_s": latency,
        "jobs": n,
        "statuses": statuses(results),
        "peak_in_flight_at_service": service.peak_active,
        "throughput_per_s": round(throughput, 1),
        "target_per_s": 0.8 * c / latency,
        "throughput_vs_c_over_latency": round(throughput / (c / latency), 3),
        "calls": len(requests),
        "refused_429": len(requests) - len(ok),
        "refused_share_per_second": windows,
        "settled_after_s": settled_after,
    }


def rate(cloud: Any, seconds: float) -> dict[str, Any]:
    """Jobs published open-loop at 1.1 x the rate, so the bucket, not the supply, sets the pace.

    (A backlog of thousands consumed slowly is not used: on the emulator the worker then
    stops being fed after about 50 s, with or without a rate; see BENCHMARKS.md.)"""
    target = 50
    service = cloud.add_service("rated-bench", "echo")
    catalog = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    write_kind(catalog, "rated", service.name, rate_per_s=target, rate_burst=1)
    env = env_for(cloud, catalog)
    supply = int(target * 1.1)
    ticks = int(seconds) + 5
    with WorkerProcess(env, name="bench-rate") as worker:
        worker.wait_ready()
        start = time.time()
        for tick in range(ticks):
            publish(env, jobs("rated", supply, f"r{tick}"))
            time.sleep(max(0.0, start + tick + 1 - time.time()))
        worker.stop()
    drain(env, "WORKER_RESULTS_SUBSCRIPTION", supply * ticks, timeout=10)
    arrivals = sorted(r.at for r in service.requests)
    first = arrivals[0] + 1.0  # past the first second's start-up
    inside = [a for a in arrivals if first <= a < first + seconds]
    per_second = [sum(1 for a in arrivals if s <= a - first < s + 1) for s in range(int(seconds))]
    measured = len(inside) / seconds
    return {
        "rate_per_s": target,
        "supplied_per_s": supply,
        "window_s": seconds,
        "calls_in_window": len(inside),
        "measured_per_s": round(measured, 2),
        "error": round(measured / target - 1, 4),
        "per_second_min_max": [min(per_second), max(per_second)],
    }


def outage(cloud: Any, outage_s: float) -> dict[str, Any]:
    flaky = cloud.add_service("flaky-bench", "echo")
    steady = cloud.add_service("steady-bench", "echo")
    flaky.latency_s = steady.latency_s = 0.02
    catalog = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    write_kind(catalog, "flaky", flaky.name, attempts=3, backoff_initial_s=0.05, backoff_max_s=0.5)
    write_kind(catalog, "steady", steady.name, attempts=3)
    env = env_for(cloud, catalog, WORKER_MAX_IN_FLIGHT="100")
    before_s, after_s = 10.0, 15.0
    total_s = before_s + outage_s + after_s
    flaky_rate, steady_rate = 20, 100
    published: dict[str, list[dict[str, Any]]] = {"flaky": [], "steady": []}
    marks: dict[str, float] = {}

    def feed() -> None:
        start = time.time()
        tick = 0
        while time.time() - start < total_s:
            batch = jobs("flaky", flaky_rate, f"f{tick}") + jobs("steady", steady_rate, f"s{tick}")
            publish(env, batch)
            for j in batch:
                published[j["kind"]].append(j)
            tick += 1
            time.sleep(max(0.0, start + tick - time.time()))

    with WorkerProcess(env, name="bench-outage") as worker:
        worker.wait_ready()
        feeder = threading.Thread(target=feed)
        feeder.start()
        time.sleep(before_s)
        flaky.error_rate, flaky.error_status = 1.0, 503
        marks["down"] = time.time()
        time.sleep(outage_s)
        flaky.error_rate = 0.0
        marks["up"] = time.time()
        feeder.join()
        ids = {j["job_id"] for kind in published.values() for j in kind}
        results = collect_results(env, ids, timeout=180)
        dead = drain(env, "WORKER_DEAD_LETTER_SUBSCRIPTION", 1, timeout=3)
        worker.stop()
    opened = [t for t in log_times(worker, "breaker_open") if t >= marks["down"]]
    steady_calls = sorted(r.at for r in steady.requests if r.status == 200)

    def per_s(calls: list[float], start: float, end: float) -> float:
        return round(sum(1 for a in calls if start <= a < end) / (end - start), 1)

    flaky_ok_after = [r.at for r in flaky.requests if r.at >= marks["up"] and r.status == 200]
    resumed = round(min(flaky_ok_after) - marks["up"], 2) if flaky_ok_after else None
    by_kind = {
        kind: statuses({j["job_id"]: results[j["job_id"]] for j in published[kind]}) for kind in published
    }
    attempts = [e.get("attempt") for e in worker.log_events() if e.get("message") == "job_succeeded"]
    return {
        "outage_s": outage_s,
        "published": {k: len(v) for k, v in published.items()},
        "statuses": by_kind,
        "dead_lettered": len(dead),
        "breaker_opened_after_s": round(opened[0] - marks["down"], 2) if opened else None,
        "steady_per_s_before": per_s(steady_calls, marks["down"] - before_s + 2, marks["down"]),
        "steady_per_s_during": per_s(steady_calls, marks["down"], marks["up"]),
        "flaky_calls_during_outage": sum(1 for r in flaky.requests if marks["down"] <= r.at < marks["up"]),
        "flaky_calls_resumed_after_s": resumed,
        "max_delivery_attempt": max(a or 1 for a in attempts),
        "nacked": next(e["nacked"] for e in worker.log_events() if e.get("message") == "consumer_stopped"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--only", default="capacity,rate,outage")
    parser.add_argument("--outage-s", type=float, default=60.0)
    parser.add_argument("--rate-s", type=float, default=60.0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wanted = args.only.split(",")
    report: dict[str, Any] = {"at": datetime.now().isoformat(timespec="seconds")}
    with (
        PubSubEmulator(project=PROJECT) as emulator,
        LocalCloud(project=PROJECT, metadata_port=METADATA_PORT) as cloud,
    ):
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        os.environ.update(cloud.env)
        if "capacity" in wanted:
            report["capacity"] = capacity(cloud)
            print(json.dumps(report["capacity"]), flush=True)
        if "rate" in wanted:
            report["rate"] = rate(cloud, args.rate_s)
            print(json.dumps(report["rate"]), flush=True)
        if "outage" in wanted:
            report["outage"] = outage(cloud, args.outage_s)
            print(json.dumps(report["outage"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"protection-{report['at'].replace(':', '')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
