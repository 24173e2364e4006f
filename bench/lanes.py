"""The web app first: interactive latency during a large batch, lanes against one lane.

    .venv/bin/python -m bench.lanes [--children 40000] [--interactive 40] [--rate 4]

Starts the Pub/Sub emulator and the local cloud, then for each mode, side by side in
the same run, one `worker run` (WORKER_MAX_IN_FLIGHT=200) and a function of 50 ms:

- `lanes`: the batch lane on (`jobs-batch`, docs/contract.md "Lanes");
- `one-lane`: WORKER_BATCH_TOPIC set to the jobs topic, so batch children share the
  interactive FIFO: the worker as it was before lanes.

Each mode measures, where the web app sees it (publish time at the publisher; first
call at the function, by `X-Job-Id`; result on the results subscription):
1. idle: `--interactive 20` jobs at `--rate` per second on an idle worker;
2. during a batch: a batch job of `--children` account ids, then, once its children
   reach the function, `--interactive` jobs at `--rate` per second;
3. the batch alone: another batch of the same size with nothing else, for its own
   throughput (children results per second, first to last);
4. (lanes only) two batches of half the size started `--gap` seconds apart: how long
   each waits for its first child result.
Every child must be called exactly once and succeed. Writes JSON and a PNG to
bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
FUNCTION_LATENCY_S = 0.05
MODES = ("lanes", "one-lane")


@dataclass
class Observed:
    """What the function and the results subscription saw, by job id (wall-clock times)."""

    calls: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    results: dict[str, float] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def first_call(self, job_id: str) -> float | None:
        with self.lock:
            calls = self.calls.get(job_id)
            return calls[0] if calls else None

    def count_results(self, prefix: str) -> int:
        with self.lock:
            return sum(1 for job_id in self.results if job_id.startswith(prefix))


def make_function(observed: Observed) -> Any:
    async def function(payload: Any, info: dict[str, Any]) -> tuple[int, Any]:
        job_id = info["headers"].get("X-Job-Id", "")
        with observed.lock:
            observed.calls[job_id].append(time.time())
        await asyncio.sleep(FUNCTION_LATENCY_S)
        return 200, {"ok": True}

    return function


def watch_results(env: dict[str, str], observed: Observed, stop: threading.Event) -> threading.Thread:
    from google.cloud import pubsub_v1

    def run() -> None:
        subscriber = pubsub_v1.SubscriberClient()
        path = subscriber.subscription_path(env["GOOGLE_CLOUD_PROJECT"], env["WORKER_RESULTS_SUBSCRIPTION"])

        def take(message: Any) -> None:
            at = time.time()
            result = json.loads(message.data)
            with observed.lock:
                observed.results.setdefault(result["job_id"], at)
                observed.statuses[result["status"]] += 1
            message.ack()

        future = subscriber.subscribe(path, take, flow_control=pubsub_v1.types.FlowControl(max_messages=5000))
        stop.wait()
        future.cancel()
        subscriber.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def write_catalog(service: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="bench-lanes-"))
    (directory / "lane-score.toml").write_text(
        f'kind = "lane-score"\nservice = "{service}"\ntimeout_s = 30\nattempts = 5\n'
    )
    (directory / "lane-batch.toml").write_text(
        f'kind = "lane-batch"\nhandler = "batch"\nservice = "{service}"\n'
        '[batch]\nchild_kind = "lane-score"\npage_size = 1000\nmax_ids = 1000000\n'
    )
    return directory


class Publisher:
    def __init__(self, env: dict[str, str]) -> None:
        from google.cloud import pubsub_v1

        self._client = pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(max_messages=100, max_latency=0.001)
        )
        self._topic = self._client.topic_path(env["GOOGLE_CLOUD_PROJECT"], env["WORKER_JOBS_TOPIC"])
        self.published: dict[str, float] = {}

    def job(self, job_id: str, kind: str, payload: Any) -> None:
        body = json.dumps({"job_id": job_id, "kind": kind, "payload": payload}).encode()
        self.published[job_id] = time.time()
        self._client.publish(self._topic, body, job_id=job_id, kind=kind).result(timeout=60)

    def paced(self, prefix: str, count: int, rate: float) -> list[str]:
        """`count` interactive jobs, `rate` per second; their ids."""
        ids = []
        start = time.monotonic()
        for index in range(count):
            time.sleep(max(0.0, start + index / rate - time.monotonic()))
            job_id = f"{prefix}-{index}"
            self.job(job_id, "lane-score", {"account_id": job_id})
            ids.append(job_id)
        return ids

    def batch(self, batch_id: str, children: int) -> None:
        self.job(batch_id, "lane-batch", {"account_ids": [f"acct-{i}" for i in range(children)]})


def wait(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached in {timeout_s:g}s")
        time.sleep(0.05)


def latencies(ids: list[str], publisher: Publisher, observed: Observed) -> dict[str, Any]:
    to_call = [observed.first_call(i) - publisher.published[i] for i in ids if observed.first_call(i)]
    to_result = [observed.results[i] - publisher.published[i] for i in ids if i in observed.results]
    return {
        "jobs": len(ids),
        "to_call_s": summary(to_call),
        "to_result_s": summary(to_result),
        "series": [
            [round(publisher.published[i] - publisher.published[ids[0]], 3), round(c, 4)]
            for i, c in zip(ids, to_call, strict=False)
        ],
    }


def summary(values: list[float]) -> dict[str, float | int]:
    from bench.measure import percentile

    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 4),
        "p95": round(percentile(values, 95), 4),
        "max": round(max(values), 4),
    }


def batch_throughput(prefix: str, observed: Observed) -> dict[str, Any]:
    with observed.lock:
        times = sorted(t for job_id, t in observed.results.items() if job_id.startswith(prefix))
    if len(times) < 2:
        return {"children": len(times)}
    per_second = Counter(int(t - times[0]) for t in times)
    return {
        "children": len(times),
        "seconds": round(times[-1] - times[0], 2),
        "jobs_per_s": round(len(times) / (times[-1] - times[0]), 1),
        "per_second": [per_second[s] for s in range(int(times[-1] - times[0]) + 1)],
    }


def run_mode(
    cloud: Any,
    mode: str,
    *,
    children: int,
    interactive: int,
    rate: float,
    gap_s: float,
    fairness: bool,
) -> dict[str, Any]:
    from tests.conftest import Names
    from tests.e2e.harness import WorkerProcess, provision, worker_env

    observed = Observed()
    service = cloud.add_service(f"lanes-{mode}-{os.urandom(3).hex()}", make_function(observed))
    names = Names()
    extra = {"WORKER_MAX_IN_FLIGHT": "200", "WORKER_CATALOG_DIR": str(write_catalog(service.name))}
    if mode == "one-lane":
        extra["WORKER_BATCH_TOPIC"] = names.jobs_topic
    env = worker_env(cloud, names, **extra)
    provision(env)
    stop = threading.Event()
    watch_results(env, observed, stop)
    publisher = Publisher(env)
    report: dict[str, Any] = {"mode": mode}
    try:
        with WorkerProcess(env, name=f"bench-lanes-{mode}") as worker:
            worker.wait_ready()
            time.sleep(1.0)
            idle = publisher.paced("idle", 20, rate)
            wait(lambda: all(i in observed.results for i in idle), 60, "idle results")
            report["idle"] = latencies(idle, publisher, observed)

            publisher.batch("big", children)
            wait(lambda: observed.count_results("big:") > 0, 120, "the batch's first child")
            during = publisher.paced("web", interactive, rate)
            wait(lambda: all(i in observed.results for i in during), 600, "interactive results")
            report["during_batch"] = latencies(during, publisher, observed)
            wait(lambda: observed.count_results("big:") >= children, 900, "every child of the batch")
            report["batch_with_interactive"] = batch_throughput("big:", observed)

            publisher.batch("alone", children)
            wait(lambda: observed.count_results("alone:") >= children, 900, "every child, batch alone")
            report["batch_alone"] = batch_throughput("alone:", observed)

            if fairness:
                half = children // 2
                started = {}
                started["A"] = time.time()
                publisher.batch("fairA", half)
                time.sleep(gap_s)
                started["B"] = time.time()
                publisher.batch("fairB", half)
                wait(
                    lambda: (
                        observed.count_results("fairA:") >= half and observed.count_results("fairB:") >= half
                    ),
                    900,
                    "both batches",
                )
                with observed.lock:
                    first = {
                        name: min(t for j, t in observed.results.items() if j.startswith(f"fair{name}:"))
                        for name in ("A", "B")
                    }
                report["two_batches"] = {
                    "children_each": half,
                    "gap_s": gap_s,
                    "first_progress_s": {name: round(first[name] - started[name], 2) for name in first},
                }
            assert worker.stop() == 0, worker.logs()[-3000:]
    finally:
        stop.set()
    with observed.lock:
        child_calls = Counter(
            len(calls)
            for job_id, calls in observed.calls.items()
            if job_id.startswith(("big:", "alone:", "fair"))
        )
        report["children_called"] = dict(child_calls)
        report["statuses"] = dict(observed.statuses)
    return report


def plot(reports: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for report in reports:
        series = report["during_batch"]["series"]
        left.plot([s[0] for s in series], [s[1] for s in series], marker="o", label=report["mode"])
        right.plot(
            report["batch_with_interactive"]["per_second"], label=f"{report['mode']}: with interactive"
        )
        right.plot(report["batch_alone"]["per_second"], linestyle="--", label=f"{report['mode']}: alone")
    left.set_yscale("log")
    left.set_xlabel("seconds since the first interactive job (batch running)")
    left.set_ylabel("publish to first call at the function (s, log)")
    left.set_title("Interactive jobs during a batch")
    left.legend()
    right.set_xlabel("seconds since the batch's first result")
    right.set_ylabel("children results per second")
    right.set_title("The batch's own throughput")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--children", type=int, default=40_000)
    parser.add_argument("--interactive", type=int, default=40)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--gap", type=float, default=5.0)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()

    from localcloud import LocalCloud, PubSubEmulator
    from tests.conftest import METADATA_PORT, PROJECT  # pins the metadata port before google.auth

    reports = []
    with (
        PubSubEmulator(project=PROJECT) as emulator,
        LocalCloud(project=PROJECT, metadata_port=METADATA_PORT) as cloud,
    ):
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        os.environ.update(cloud.env)
        for mode in args.modes.split(","):
            print(f"lanes bench: {mode} ...", flush=True)
            reports.append(
                run_mode(
                    cloud,
                    mode,
                    children=args.children,
                    interactive=args.interactive,
                    rate=args.rate,
                    gap_s=args.gap,
                    fairness=mode == "lanes",
                )
            )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = args.out / f"lanes-{stamp}.json"
    path.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "reports": reports}, indent=1))
    picture = plot(reports, args.out / f"lanes-{stamp}.png")
    for report in reports:
        idle, during = report["idle"]["to_call_s"], report["during_batch"]["to_call_s"]
        fair = report.get("two_batches", {}).get("first_progress_s")
        print(
            f"{report['mode']:>8}: interactive to first call: idle p95 {idle.get('p95')} s, during the "
            f"batch p50 {during.get('p50')} s p95 {during.get('p95')} s; batch alone "
            f"{report['batch_alone'].get('jobs_per_s')} jobs/s, with interactive "
            f"{report['batch_with_interactive'].get('jobs_per_s')} jobs/s; children called "
            f"{report['children_called']}; two batches' first progress {fair}"
        )
    print(f"JSON: {path}" + (f"\nplot: {picture}" if picture else ""))


if __name__ == "__main__":
    main()
