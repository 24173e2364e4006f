"""Run one scenario's contenders on the local cloud and measure them.

Contenders: the ack-only ceiling, ours (`worker run`), ours on a jobs subscription
with a retry policy (`ours-retry`), the minimal aiohttp worker, the naive worker and
the Celery peer. Every
contender gets fresh topics and a service of its own, so one run's backlog,
leftovers or cached tokens never reach another, and the cloud's counters are read
as deltas around each run. A backlog is published before its consumer starts; an
open-loop scenario publishes at a fixed rate while the consumer runs.

Results are counted where the web app would count them: by an independent
subscriber on the results topic, started before the consumer, which notes when each
result arrived. Throughput and the per-second series come from those arrival times
(the ceiling, which publishes nothing, from its ack times).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # lazy-loaded module
from google.cloud.pubsub_v1.subscriber.scheduler import Scheduler
from google.protobuf import duration_pb2, field_mask_pb2

from bench.measure import MIB, GroupMonitor, ProcessMonitor, parse_time, percentile
from tests.conftest import Names
from tests.e2e.harness import WorkerProcess, drain, provision, publish, uid, worker_env, write_kind

CONTENDERS = {
    "ceiling": "bench.ceiling",
    "naive": "bench.naive_worker",
    "minimal": "bench.minimal_worker",
    "ours": "worker",
    "ours-retry": "worker",
    "celery": "bench.celery_peer",
}
# Extra environment per contender (bench/tracing.py adds `worker run` with tracing on).
CONTENDER_ENV: dict[str, dict[str, str]] = {}
# Stopped after the scenario's cap; their rate is taken from what finished.
CAPPED = {"naive", "celery"}
KIND = "bench-echo"
# The retry policy of `ours-retry`: the shape `worker setup` gives real Pub/Sub, shortened.
RETRY_MIN_S, RETRY_MAX_S = 1, 5


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    jobs: int
    latency_s: float
    contenders: tuple[str, ...]
    max_in_flight: int = 200
    rate_per_s: float | None = None  # open loop; None publishes the whole backlog first
    naive_cap_s: float = 60.0  # naive and Celery are stopped here, their rate taken from what finished
    timeout_s: float = 600.0
    # Backlog published for a capped contender (they finish a fraction of it in the cap).
    capped_jobs: int | None = None


def suite(*, quick: bool, max_in_flight: int, naive_cap_s: float) -> list[Scenario]:
    """BENCHMARKS.md's scenarios (a)-(d); `quick` shrinks them to a smoke size."""
    scale = 20 if quick else 1
    cap = min(naive_cap_s, 20.0) if quick else naive_cap_s
    duration_s = 10 if quick else 60
    rate = 50.0
    return [
        # Long enough for steady state: >= 60 s at the ceiling's ~2,000 jobs/s, several
        # times every periodic effect (stream rotation, lease extension, ack deadline).
        Scenario(
            "a",
            "long backlog, no added latency",
            140_000 // scale,
            0.0,
            ("ceiling", "ours", "ours-retry", "minimal", "naive", "celery"),
            max_in_flight,
            naive_cap_s=cap,
            capped_jobs=40_000 // scale,
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
    dead_lettered: int = 0
    capped: bool = False
    retry_policy: bool = False
    elapsed_s: float | None = None
    jobs_per_s: float | None = None
    # Results (the ceiling: acks) per second, from when the consumer was ready.
    per_second: list[int] = field(default_factory=list)
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    # The worker's own started_at -> finished_at (ours' results carry it): a job's
    # latency minus this is time spent queued, in Pub/Sub or waiting for a slot.
    duration_ms_p50: float | None = None
    cpu_s: float = 0.0
    cpu_s_per_1000: float | None = None
    # Who else used the two cores meanwhile, per 1,000 jobs finished: the driver (the
    # local cloud's Cloud Run services and Admin API, the results subscriber) and the
    # emulator (Java). None where not measured (an emulator this process did not start).
    driver_cpu_s_per_1000: float | None = None
    emulator_cpu_s_per_1000: float | None = None
    peak_rss_mib: float = 0.0
    machine_busy_pct: float = 0.0
    load_average: list[float] = field(default_factory=list)
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


class InlineScheduler(Scheduler):  # type: ignore[misc]
    """Runs the results subscriber's callback on the client's stream thread: it only
    parses and acks, and the default thread pool's hop per message took driver CPU
    (shared with the worker being measured)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()

    @property
    def queue(self) -> queue.Queue[Any]:
        return self._queue

    def schedule(self, callback: Any, *args: Any, **kwargs: Any) -> None:
        callback(*args, **kwargs)

    def shutdown(self, await_msg_callbacks: bool = False) -> list[Any]:
        return []


class ResultsSubscriber:
    """The web app's side: a streaming-pull subscriber on the results subscription that
    notes when each job's first result arrived (later ones count as duplicates)."""

    def __init__(self, env: dict[str, str]) -> None:
        self._client = pubsub_v1.SubscriberClient()
        path = self._client.subscription_path(env["GOOGLE_CLOUD_PROJECT"], env["WORKER_RESULTS_SUBSCRIPTION"])
        self._lock = threading.Lock()
        self.results: dict[str, dict[str, Any]] = {}
        self.arrived: dict[str, float] = {}
        self.duplicates = 0
        flow = pubsub_v1.types.FlowControl(max_messages=10_000)
        self._future = self._client.subscribe(
            path, self._on_message, flow_control=flow, scheduler=InlineScheduler()
        )

    def _on_message(self, message: Any) -> None:
        at = time.time()
        result = json.loads(message.data)
        message.ack()
        with self._lock:
            if result["job_id"] in self.results:
                self.duplicates += 1
            else:
                self.results[result["job_id"]] = result
                self.arrived[result["job_id"]] = at

    def wait(self, count: int, timeout_s: float, process: WorkerProcess) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.results) < count and time.monotonic() < deadline and process.proc.poll() is None:
            time.sleep(0.2)

    def close(self) -> None:
        self._future.cancel()
        self._client.close()


def add_retry_policy(env: dict[str, str]) -> None:
    """What `worker setup` gives real Pub/Sub's jobs subscription (its backoff shortened)."""
    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(env["GOOGLE_CLOUD_PROJECT"], env["WORKER_JOBS_SUBSCRIPTION"])
    policy = pubsub_v1.types.RetryPolicy(
        minimum_backoff=duration_pb2.Duration(seconds=RETRY_MIN_S),
        maximum_backoff=duration_pb2.Duration(seconds=RETRY_MAX_S),
    )
    subscriber.update_subscription(
        subscription={"name": path, "retry_policy": policy},
        update_mask=field_mask_pb2.FieldMask(paths=["retry_policy"]),
    )
    subscriber.close()


def run_contender(
    cloud: Any, scenario: Scenario, contender: str, emulator_pids: list[int] | None = None
) -> Run:
    service = cloud.add_service(f"bench-{scenario.name}-{contender}-{uid()}", "echo")
    service.latency_s = scenario.latency_s
    catalog = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    # One attempt: a failure must show as a failed result, not be retried into the figures.
    write_kind(catalog, KIND, service.name, attempts=1, timeout_s=max(30.0, 10 * scenario.latency_s))
    acks_file = catalog / "acks.txt"
    capped = contender in CAPPED
    jobs_count = (scenario.capped_jobs or scenario.jobs) if capped else scenario.jobs
    env = worker_env(
        cloud,
        Names(),
        WORKER_CATALOG_DIR=str(catalog),
        WORKER_MAX_IN_FLIGHT=str(scenario.max_in_flight),
        BENCH_EXPECT=str(jobs_count),
        BENCH_ACKS_FILE=str(acks_file),
        BENCH_CELERY_QUEUE=f"bench-celery-{uid()}",
        **CONTENDER_ENV.get(contender, {}),
    )
    provision(env)
    if contender == "ours-retry":
        add_retry_policy(env)
    created: dict[str, float] = {}
    if scenario.rate_per_s is None:
        jobs = [job(scenario, i) for i in range(jobs_count)]
        created = {j["job_id"]: parse_time(j["created_at"]) for j in jobs}
        if contender == "celery":
            from bench.celery_peer import enqueue

            enqueue(env, jobs)
        else:
            publish(env, jobs)
    tokens_before, calls_before = Counter(cloud.id_tokens_minted), Counter(cloud.admin_api_calls)
    ours = contender not in ("ceiling", "minimal", "naive", "celery")  # a `worker run`, whatever its settings
    profiled = ours or contender == "minimal"  # --profile
    run = Run(
        scenario.name,
        contender,
        jobs_count,
        scenario.max_in_flight if contender != "ceiling" else None,
        retry_policy=contender == "ours-retry",
        load_average=[round(x, 2) for x in os.getloadavg()],
    )
    results = ResultsSubscriber(env)
    others = {"driver": [os.getpid()], "emulator": emulator_pids or []}
    try:
        with WorkerProcess(env, name=f"bench-{contender}", module=CONTENDERS[contender]) as process:
            process.wait_ready(timeout=120)
            ready_at = time.time()
            with (
                ProcessMonitor(process.proc.pid) as monitor,
                GroupMonitor(others) as group,
                Profiler(process.proc.pid if profiled else None, scenario.name, contender),
            ):
                arrived = consume(env, scenario, contender, created, process, acks_file, results, jobs_count)
            if ours:
                process.stop()
        tokens = Counter(cloud.id_tokens_minted) - tokens_before
        calls = Counter(cloud.admin_api_calls) - calls_before
        if ours:
            run.dead_lettered = len(drain(env, "WORKER_DEAD_LETTER_SUBSCRIPTION", jobs_count, timeout=3))
    finally:
        results.close()
        cloud.remove_service(service.name)
    run.cpu_s = monitor.cpu_s
    run.peak_rss_mib = round(monitor.peak_rss / MIB, 1)
    run.machine_busy_pct = monitor.machine_busy_pct
    run.id_tokens_minted = sum(tokens.values())
    run.id_tokens_for_service = sum(n for audience, n in tokens.items() if audience in service.audiences())
    run.admin_api_calls = sum(calls.values())
    run.admin_api_calls_for_service = sum(n for (_, name), n in calls.items() if name == service.name)
    first = results.results if contender != "ceiling" else arrived_as_results(arrived)
    run.duplicates = results.duplicates
    score(run, first, created)
    rate(run, arrived, ready_at)
    if run.completed:
        run.driver_cpu_s_per_1000 = round(1000 * group.cpu_s["driver"] / run.completed, 3)
        if emulator_pids:
            run.emulator_cpu_s_per_1000 = round(1000 * group.cpu_s["emulator"] / run.completed, 3)
    return run


class Profiler:
    """`py-spy record --gil` on `pid` for BENCH_PROFILE_S seconds, starting 10 s in
    (past start-up), into bench/results/profile-<label>-<time>.txt (collapsed stacks) (`--profile`)."""

    def __init__(self, pid: int | None, scenario: str, contender: str) -> None:
        label = f"{scenario}-{contender}"
        seconds = float(os.environ.get("BENCH_PROFILE_S") or 0)
        self._proc: subprocess.Popen[bytes] | None = None
        self._timer: threading.Timer | None = None
        if pid is None or seconds <= 0:
            return
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        out = Path(__file__).resolve().parent / "results" / f"profile-{label}-{datetime.now(UTC):%H%M%S}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        command = [spy, "record", "--gil", "--nonblocking", "-p", str(pid), "-d", str(int(seconds))]
        command += ["-f", "raw", "-o", str(out)]

        def start() -> None:
            self._proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        self._timer = threading.Timer(10.0, start)
        self._timer.start()

    def __enter__(self) -> Profiler:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._proc is not None:
            self._proc.wait(timeout=120)


def wait_for_file(path: Path, process: WorkerProcess, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.proc.poll() is not None:
            raise RuntimeError(f"the ceiling exited:\n{process.logs()[-2000:]}")
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def consume(
    env: dict[str, str],
    scenario: Scenario,
    contender: str,
    created: dict[str, float],
    process: WorkerProcess,
    acks_file: Path,
    results: ResultsSubscriber,
    expected: int,
) -> dict[str, float]:
    """When each job finished, as the results subscriber saw it (the ceiling: its acks);
    an open loop publishes meanwhile."""
    publisher = None
    if scenario.rate_per_s is not None:
        publisher = threading.Thread(target=publish_open_loop, args=(env, scenario, created))
        publisher.start()
    arrived: dict[str, float] = {}
    if contender == "ceiling":
        if wait_for_file(acks_file, process, scenario.timeout_s):
            for line in acks_file.read_text().splitlines():
                acked_at, job_id = line.split()
                arrived[job_id] = float(acked_at)
    else:
        limit = scenario.naive_cap_s if contender in CAPPED else scenario.timeout_s
        results.wait(expected, limit, process)
        with results._lock:
            arrived = dict(results.arrived)
    if publisher is not None:
        publisher.join()
    return arrived


def arrived_as_results(arrived: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The ceiling's acks as results: succeeded, finished when acked."""
    return {
        job_id: {"job_id": job_id, "status": "succeeded", "finished_at": _iso(at)}
        for job_id, at in arrived.items()
    }


def score(run: Run, first: dict[str, dict[str, Any]], created: dict[str, float]) -> None:
    """Counts and latencies (a job's first result's finished_at minus its created_at)."""
    run.completed = len(first)
    run.succeeded = sum(1 for r in first.values() if r["status"] == "succeeded")
    run.capped = run.contender in CAPPED and run.completed < run.jobs
    latencies = [1000 * (parse_time(r["finished_at"]) - created[job_id]) for job_id, r in first.items()]
    run.latency_ms = {f"p{q}": _round(percentile(latencies, q)) for q in (50, 95, 99)}
    durations = [float(r["duration_ms"]) for r in first.values() if "duration_ms" in r]
    run.duration_ms_p50 = _round(percentile(durations, 50))


def rate(run: Run, arrived: dict[str, float], ready_at: float) -> None:
    """Jobs per second from the first result's arrival to the last one's, the arrivals
    per second since the consumer was ready, and CPU per 1,000 jobs."""
    times = sorted(arrived.values())
    if len(times) > 1:
        run.elapsed_s = round(times[-1] - times[0], 3)
        # n arrivals span n - 1 intervals.
        run.jobs_per_s = round((len(times) - 1) / max(run.elapsed_s, 1e-6), 1)
    if times:
        buckets = Counter(int(max(0.0, t - ready_at)) for t in times)
        run.per_second = [buckets.get(second, 0) for second in range(max(buckets) + 1)]
    if run.completed:
        run.cpu_s_per_1000 = round(1000 * run.cpu_s / run.completed, 3)
    run.cpu_s = round(run.cpu_s, 2)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
