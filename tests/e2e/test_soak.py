"""Chaos soak: jobs over three `worker run` replicas while everything fails.

While jobs are published at a steady rate, the function answers 503 to 20% of calls
and hangs on 5% (past the kind's 1 s timeout), one replica is SIGKILLed and restarted
every few seconds, the Admin API and then the metadata server are down for a while,
and the workers' path to Pub/Sub is cut once (a proxy drops and refuses connections),
so results cannot be published and acks are lost for a few seconds. (The client
library's publish retry usually rides the cut out, so results come late rather than
fail; a publish that does fail is covered by test_worker.py's deleted results topic.)

Afterwards every job must have a terminal result: `succeeded`, or `failed` with a dead
letter. Duplicated results are expected (a replica killed between publishing a result
and acking it, acks lost in the cut) and are counted, not failed on.

Logs of every replica incarnation must show no Traceback and no ERROR line other than
`result_publish_failed`, the worker saying a result could not be published and the
job will be redelivered, which the cut is there to provoke.

SOAK_SCALE=full (`make soak`): 5,000 jobs, 10 s outages; it writes soak-report.json.
Anything else (CI): 600 jobs, shorter outages, well under 90 s on a small machine.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.chaos import CuttableProxy
from tests.e2e.harness import (
    REPO,
    WorkerProcess,
    drain,
    provision,
    publish,
    results_by_job,
    uid,
    worker_cli,
    worker_env,
    write_kind,
)

FULL = os.environ.get("SOAK_SCALE") == "full"

pytestmark = [pytest.mark.e2e, pytest.mark.soak, pytest.mark.timeout(1200 if FULL else 240)]

REPLICAS = 3
# Errors the soak provokes on purpose; anything else at ERROR is a finding.
EXPECTED_ERRORS = {"result_publish_failed"}
TERMINAL = {"succeeded", "failed"}


@dataclass(frozen=True)
class Plan:
    """Times are seconds from the first publish; outages are (start, duration)."""

    jobs: int
    publish_s: float
    kill_every_s: float
    run_api_down: tuple[float, float]
    metadata_down: tuple[float, float]
    proxy_cut: tuple[float, float]
    # Each kill costs the jobs its replica held one delivery attempt; Pub/Sub's own
    # dead lettering (which leaves no result) should stay out of reach, and the test
    # replays what it dead-lettered anyway, as an operator would.
    max_delivery_attempts: int = 15
    drain_timeout_s: float = 150.0


PLAN = (
    Plan(5000, 60, 3, run_api_down=(5, 10), metadata_down=(20, 10), proxy_cut=(35, 5), drain_timeout_s=300)
    if FULL
    else Plan(600, 20, 4, run_api_down=(2, 4), metadata_down=(8, 4), proxy_cut=(13, 3))
)


@dataclass
class Replicas:
    """Three worker slots; every incarnation is kept so its log can be checked."""

    env: dict[str, str]
    current: list[WorkerProcess] = field(default_factory=list)
    incarnations: list[WorkerProcess] = field(default_factory=list)
    kills: int = 0
    self_exits: list[tuple[str, int]] = field(default_factory=list)

    def start(self, slot: int) -> WorkerProcess:
        worker = WorkerProcess(self.env, name=f"soak-replica{slot}-{len(self.incarnations)}")
        self.incarnations.append(worker)
        if slot < len(self.current):
            self.current[slot] = worker
        else:
            self.current.append(worker)
        return worker

    def kill(self, slot: int) -> None:
        self.current[slot].kill()
        self.kills += 1
        self.start(slot)

    def restart_exited(self) -> None:
        # A replica must only die when killed; one that exits by itself is restarted
        # (the soak goes on) and reported.
        for slot, worker in enumerate(self.current):
            code = worker.proc.poll()
            if code is not None:
                self.self_exits.append((str(worker.log_path), code))
                worker.kill()
                self.start(slot)


def timeline(
    plan: Plan, replicas: Replicas, cloud: Any, proxy: CuttableProxy
) -> list[tuple[float, str, Callable[[], None]]]:
    events: list[tuple[float, str, Callable[[], None]]] = []
    for component, (start, length) in (("run_api", plan.run_api_down), ("metadata", plan.metadata_down)):
        events.append((start, f"{component} down", lambda c=component: cloud.set_down(c, True)))
        events.append((start + length, f"{component} up", lambda c=component: cloud.set_down(c, False)))
    events.append((plan.proxy_cut[0], "pubsub cut", proxy.cut))
    events.append((sum(plan.proxy_cut), "pubsub healed", proxy.heal))
    kill_at = plan.kill_every_s
    while kill_at < plan.publish_s + plan.kill_every_s:
        slot = len([e for e in events if e[1].startswith("kill")]) % REPLICAS
        events.append((kill_at, f"kill replica{slot}", lambda s=slot: replicas.kill(s)))
        kill_at += plan.kill_every_s
    return sorted(events, key=lambda e: e[0])


class Chaos(threading.Thread):
    """Runs the timeline; the heals always run, even when the test stops it early."""

    def __init__(self, events: list[tuple[float, str, Callable[[], None]]], replicas: Replicas) -> None:
        super().__init__(name="soak-chaos", daemon=True)
        self.events = events
        self.replicas = replicas
        self.halt = threading.Event()
        self.done: list[tuple[float, str]] = []
        self.error: BaseException | None = None
        self.t0 = time.monotonic()

    def run(self) -> None:
        try:
            for at, label, action in self.events:
                while not self.halt.is_set() and time.monotonic() - self.t0 < at:
                    self.replicas.restart_exited()
                    time.sleep(0.2)
                if self.halt.is_set() and not label.endswith(("up", "healed")):
                    continue
                action()
                self.done.append((round(time.monotonic() - self.t0, 1), label))
            while not self.halt.wait(0.5):
                self.replicas.restart_exited()
        except BaseException as exc:  # surfaced by the test after join()
            self.error = exc


def gather_results(env: dict[str, str], job_ids: set[str], timeout: float) -> dict[str, list[dict[str, Any]]]:
    """Drain results (duplicates kept) until every job has one or time is up."""
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not job_ids <= results.keys():
        left = deadline - time.monotonic()
        for job_id, found in results_by_job(
            drain(env, "WORKER_RESULTS_SUBSCRIPTION", 1, timeout=left)
        ).items():
            results[str(job_id)].extend(found)
    return results


def soak_jobs(n: int) -> list[dict[str, Any]]:
    run = uid()
    return [{"job_id": f"soak-{run}-{i}", "kind": "soak", "payload": {"i": i}} for i in range(n)]


def publish_steadily(env: dict[str, str], jobs: list[dict[str, Any]], seconds: float) -> None:
    batches = max(1, int(seconds * 2))
    size = -(-len(jobs) // batches)
    start = time.monotonic()
    for n, offset in enumerate(range(0, len(jobs), size)):
        time.sleep(max(0.0, start + n * seconds / batches - time.monotonic()))
        publish(env, jobs[offset : offset + size])


def highest_delivery_attempts(workers: list[WorkerProcess]) -> Counter[int]:
    """How many jobs had their last logged delivery at attempt 1, 2, ... (from the logs;
    a delivery to a replica killed before it logged anything is not seen)."""
    highest: dict[str, int] = {}
    for worker in workers:
        for event in worker.log_events():
            job_id, attempt = event.get("job_id"), event.get("attempt")
            if isinstance(job_id, str) and isinstance(attempt, int):
                highest[job_id] = max(attempt, highest.get(job_id, 0))
    return Counter(highest.values())


def unexpected_log_lines(worker: WorkerProcess) -> tuple[list[str], Counter[str]]:
    bad: list[str] = []
    expected: Counter[str] = Counter()
    for line in worker.logs().splitlines():
        if "Traceback" in line:
            bad.append(line)
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue  # the last line of a SIGKILLed replica may be cut short
        if not isinstance(event, dict) or event.get("severity") not in ("ERROR", "CRITICAL"):
            continue
        if event.get("message") in EXPECTED_ERRORS:
            expected[str(event["message"])] += 1
        else:
            bad.append(line)
    return bad, expected


@pytest.fixture
def soak_stack(
    local_cloud: Any, pubsub_emulator: Any, names: Any, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    service = local_cloud.add_service(f"soak-{uid()}", "echo")
    service.error_rate, service.error_status = 0.2, 503
    service.hang_rate, service.hang_s = 0.05, 3.0
    catalog = tmp_path / "jobs"
    # Three quick attempts: a hung call costs 1 s, not the stream of jobs behind it.
    write_kind(
        catalog, "soak", service.name, attempts=3, timeout_s=1, backoff_initial_s=0.05, backoff_max_s=0.2
    )
    direct = worker_env(local_cloud, names, WORKER_CATALOG_DIR=str(catalog))
    provision(direct, max_delivery_attempts=PLAN.max_delivery_attempts)
    proxy = CuttableProxy(pubsub_emulator.host).start()
    replicas = Replicas(
        worker_env(
            local_cloud,
            names,
            WORKER_CATALOG_DIR=str(catalog),
            PUBSUB_EMULATOR_HOST=proxy.host,
            # job_succeeded (a debug line) carries each job's delivery attempt.
            WORKER_LOG_LEVEL="debug",
        )
    )
    try:
        yield {"env": direct, "service": service, "cloud": local_cloud, "proxy": proxy, "replicas": replicas}
    finally:
        for worker in replicas.current:
            worker.kill()
        for component in ("run_api", "metadata"):
            local_cloud.set_down(component, False)
        proxy.stop()


def test_soak_every_job_ends_succeeded_or_dead_lettered(soak_stack: dict[str, Any]) -> None:
    env, service, proxy = soak_stack["env"], soak_stack["service"], soak_stack["proxy"]
    replicas: Replicas = soak_stack["replicas"]
    for slot in range(REPLICAS):
        replicas.start(slot)
    for worker in replicas.current:
        worker.wait_ready()
    jobs = soak_jobs(PLAN.jobs)
    job_ids = {j["job_id"] for j in jobs}

    chaos = Chaos(timeline(PLAN, replicas, soak_stack["cloud"], proxy), replicas)
    publisher = threading.Thread(target=publish_steadily, args=(env, jobs, PLAN.publish_s), daemon=True)
    chaos.start()
    publisher.start()
    try:
        # Collected straight from the emulator while the chaos runs, not through the proxy.
        results = gather_results(env, job_ids, timeout=PLAN.publish_s + PLAN.drain_timeout_s)
        all_in_s = time.monotonic() - chaos.t0
    finally:
        chaos.halt.set()
        chaos.join(30)
        publisher.join(30)
    assert chaos.error is None, f"chaos thread failed: {chaos.error!r}"
    assert not publisher.is_alive()
    # Late duplicates (a killed replica's leases lapsing) are counted too.
    for message in drain(env, "WORKER_RESULTS_SUBSCRIPTION", 10**9, timeout=5):
        result = json.loads(message.data)
        results[result["job_id"]].append(result)
    missing = job_ids - results.keys()
    # Kills can use up a job's delivery attempts before any replica finishes it; Pub/Sub
    # then dead-letters it itself, with no result. Not lost: the operator's answer is
    # `worker replay`, run here as an operator would, while the replicas still run.
    listing = worker_cli(env, "dead-letters", "--json", timeout=120)
    listing.check_returncode()
    listed = listing.stdout.splitlines()
    dead_letters = [json.loads(line) for line in listed if line.startswith("{")]
    dead_ids = {d["job_id"] for d in dead_letters}
    pubsub_dead = {d["job_id"] for d in dead_letters if d.get("dead_lettered_by") == "pubsub"}
    replayed = set()
    if missing and missing <= pubsub_dead:
        worker_cli(env, "replay", timeout=300).check_returncode()
        replayed = set(missing)
        for job_id, found in gather_results(env, replayed, timeout=PLAN.drain_timeout_s).items():
            results[job_id].extend(found)
        missing = job_ids - results.keys()
    exit_codes = [worker.stop(signal.SIGTERM) for worker in replicas.current]
    statuses = {job_id: {r["status"] for r in results[job_id]} for job_id in job_ids - missing}
    failed = {job_id for job_id, s in statuses.items() if "succeeded" not in s}

    unexpected: list[str] = []
    expected_errors: Counter[str] = Counter()
    for worker in replicas.incarnations:
        bad, expected = unexpected_log_lines(worker)
        unexpected += [f"{worker.log_path.name}: {line[:400]}" for line in bad]
        expected_errors += expected

    attempts = highest_delivery_attempts(replicas.incarnations)
    duplicates = sum(len(results[j]) - 1 for j in job_ids - missing)
    report = {
        "scale": "full" if FULL else "ci",
        "jobs": PLAN.jobs,
        "replicas": REPLICAS,
        "missing": len(missing),
        "dead_lettered_by_pubsub_then_replayed": len(replayed),
        "succeeded": len(job_ids) - len(failed) - len(missing),
        "failed_dead_lettered": len(failed),
        "kills": replicas.kills,
        "self_exits": len(replicas.self_exits),
        "duplicate_results": duplicates,
        "jobs_with_duplicates": sum(len(results[j]) > 1 for j in job_ids - missing),
        "jobs_by_highest_delivery_attempt": dict(sorted(attempts.items())),
        "publish_s": PLAN.publish_s,
        "all_results_in_s": round(all_in_s, 1),
        "drain_after_publish_s": round(all_in_s - PLAN.publish_s, 1),
        "function_calls": service.calls,
        "function_status_counts": dict(service.status_counts),
        "proxy_connections": proxy.connections,
        "expected_errors": dict(expected_errors),
        "chaos": chaos.done,
    }
    print("\nSOAK " + json.dumps(report))
    if FULL:
        (REPO / "soak-report.json").write_text(json.dumps(report, indent=2) + "\n")

    assert not missing, f"{len(missing)} jobs have no result, e.g. {sorted(missing)[:5]}"
    assert all(s <= TERMINAL for s in statuses.values()), {k: s for k, s in statuses.items() if s - TERMINAL}
    assert failed <= dead_ids, f"failed without a dead letter: {sorted(failed - dead_ids)[:5]}"
    assert not unexpected, "unexpected errors in worker logs:\n" + "\n".join(unexpected[:20])
    assert not replicas.self_exits, f"replicas exited by themselves: {replicas.self_exits}"
    assert exit_codes == [0] * REPLICAS, exit_codes
    assert replicas.kills >= PLAN.publish_s // PLAN.kill_every_s
