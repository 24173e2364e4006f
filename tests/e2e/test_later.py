"""Jobs at a time, end to end: real `worker run` processes, the Pub/Sub emulator and the
local cloud's Cloud Tasks (issue 27, "Done when" 1-3 and 5)."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from google.cloud import pubsub_v1

from tests.e2e.harness import (
    REPO,
    WorkerProcess,
    collect_results,
    drain,
    provision,
    publish,
    uid,
    worker_cli,
    worker_env,
    write_kind,
)

pytestmark = pytest.mark.e2e

FIGURES = REPO / "docs" / "bench" / "later.json"


def setup_stack(local_cloud: Any, names: Any, tmp_path: Path) -> tuple[dict[str, str], str, str]:
    """The test's topics, a kind `later` calling its own echo service, and a tap
    subscription on the jobs topic that counts every message published there."""
    service = f"later-{uid()}"
    local_cloud.add_service(service, "echo")
    write_kind(tmp_path / "jobs", "later", service)
    env = worker_env(local_cloud, names, WORKER_CATALOG_DIR=str(tmp_path / "jobs"))
    provision(env)
    subscriber = pubsub_v1.SubscriberClient()
    tap = subscriber.subscription_path(env["GOOGLE_CLOUD_PROJECT"], f"tap-{names.suffix}")
    subscriber.create_subscription(
        name=tap, topic=subscriber.topic_path(env["GOOGLE_CLOUD_PROJECT"], names.jobs_topic)
    )
    subscriber.close()
    env["TAP_SUBSCRIPTION"] = tap.rsplit("/", 1)[1]
    return env, service, tap


def first_calls(local_cloud: Any, service: str) -> tuple[dict[str, float], Counter[str]]:
    """When each job first reached the service, and how many times each did."""
    first: dict[str, float] = {}
    count: Counter[str] = Counter()
    for request in local_cloud.requests:
        if request.service == service and request.job_id:
            count[request.job_id] += 1
            first[request.job_id] = min(first.get(request.job_id, request.at), request.at)
    return first, count


def wait_for_calls(local_cloud: Any, service: str, job_ids: set[str], timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        first, _ = first_calls(local_cloud, service)
        if job_ids <= first.keys():
            return first
        time.sleep(0.2)
    first, _ = first_calls(local_cloud, service)
    missing = job_ids - first.keys()
    raise AssertionError(f"{len(missing)} jobs never reached the function, e.g. {sorted(missing)[:5]}")


def final_results(env: dict[str, str], job_ids: set[str], timeout: float) -> dict[str, list[str]]:
    """Every status published for each job, read until each has a final one."""
    statuses: dict[str, list[str]] = {j: [] for j in job_ids}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = [j for j, seen in statuses.items() if not set(seen) - {"scheduled", "running"}]
        if not pending:
            break
        for message in drain(env, "WORKER_RESULTS_SUBSCRIPTION", len(pending), timeout=5):
            result = json.loads(message.data)
            if result["job_id"] in statuses:
                statuses[result["job_id"]].append(result["status"])
    return statuses


def record_figures(name: str, figures: dict[str, Any]) -> None:
    """Into docs/bench/later.json, only when RECORD_FIGURES=1 (the figures in docs/bench/later.md)."""
    if os.environ.get("RECORD_FIGURES") != "1":
        return
    data = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    data[name] = figures
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    FIGURES.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def test_200_jobs_spread_over_60s_run_on_time_once_across_a_worker_sigkill(
    local_cloud: Any, pubsub_emulator: Any, names: Any, tmp_path: Path
) -> None:
    env, service, _ = setup_stack(local_cloud, names, tmp_path)
    worker = WorkerProcess(env, "later-a")
    worker.wait_ready()
    start = time.time() + 5
    # 200 due times over 60 s, none in [24 s, 32 s): the worker is SIGKILLed at 25 s and
    # restarted while all of them wait (none in its hands), so lateness measures the
    # timer, not Pub/Sub's redelivery of a message a dead worker held.
    offsets = [i * 0.26 for i in range(231) if not 24 <= i * 0.26 < 32][:200]
    due = {f"later-{names.suffix}-{i}": start + offset for i, offset in enumerate(offsets)}
    jobs = [
        {
            "job_id": job_id,
            "kind": "later",
            "payload": {"i": i},
            "not_before": datetime.fromtimestamp(at, UTC).isoformat(),
        }
        for i, (job_id, at) in enumerate(due.items())
    ]
    publish(env, jobs)
    restarted = None
    try:
        while time.time() < start + 25:
            time.sleep(0.1)
        worker.proc.kill()
        worker.kill()
        restarted = WorkerProcess(env, "later-b")
        restarted.wait_ready()
        ready_after_kill = time.time() - (start + 25)
        first = wait_for_calls(local_cloud, service, set(due), timeout=90)
        results = final_results(env, set(due), timeout=30)
    finally:
        worker.kill()
        if restarted is not None:
            restarted.stop()
    lateness = {job_id: first[job_id] - at for job_id, at in due.items()}
    early = {j: round(s, 3) for j, s in lateness.items() if s < 0}
    assert not early, f"jobs reached the function before their not_before: {early}"
    late = {j: round(s, 3) for j, s in lateness.items() if s > 2.0}
    assert not late, f"jobs reached the function more than 2 s after their not_before: {late}"
    _, calls = first_calls(local_cloud, service)
    twice = {j: n for j, n in calls.items() if j in due and n > 1}
    assert not twice, f"jobs that ran more than once: {twice}"
    for job_id in due:
        assert "succeeded" in results[job_id] and "scheduled" in results[job_id], (job_id, results[job_id])
    tap = drain(env, "TAP_SUBSCRIPTION", until=10**6, timeout=8)
    per_job = Counter(m.attributes.get("job_id") for m in tap)
    assert max(per_job[j] for j in due) <= 2, per_job.most_common(3)
    values = sorted(lateness.values())
    record_figures(
        "200_jobs_over_60s_sigkill",
        {
            "jobs": len(due),
            "lateness_s_p50": round(statistics.median(values), 3),
            "lateness_s_p99": round(values[int(len(values) * 0.99) - 1], 3),
            "lateness_s_max": round(values[-1], 3),
            "early": 0,
            "ran_twice": 0,
            "jobs_topic_messages_per_job_max": max(per_job[j] for j in due),
            "restarted_worker_ready_s_after_kill": round(ready_after_kill, 2),
        },
    )


def test_cancel_of_20_scheduled_jobs_none_runs_each_cancelled(
    local_cloud: Any, pubsub_emulator: Any, names: Any, tmp_path: Path
) -> None:
    env, service, _ = setup_stack(local_cloud, names, tmp_path)
    due = datetime.now(UTC) + timedelta(seconds=40)
    ids = [f"cancel-{names.suffix}-{i}" for i in range(20)]
    with WorkerProcess(env, "later-cancel") as worker:
        worker.wait_ready()
        publish(
            env, [{"job_id": j, "kind": "later", "payload": {}, "not_before": due.isoformat()} for j in ids]
        )
        scheduled = collect_results(env, set(ids), timeout=30)
        assert all(r["status"] == "scheduled" for rs in scheduled.values() for r in rs)
        listed = worker_cli(env, "scheduled", "--kind", "later", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert {r["job_id"] for r in rows} >= set(ids)
        one = worker_cli(env, "cancel", ids[0])
        assert one.returncode == 0, one.stdout + one.stderr
        assert "published its `cancelled` result" in one.stdout
        rest = worker_cli(env, "cancel", *ids[1:])
        assert rest.returncode == 0, rest.stdout + rest.stderr
        assert rest.stdout.count("published its `cancelled` result") == 19
        assert datetime.now(UTC) < due, "the cancels took too long to prove anything"
        again = worker_cli(env, "cancel", ids[0])
        assert again.returncode == 1 and "is not scheduled" in again.stderr
        cancelled = collect_results(env, set(ids), timeout=30)
        for job_id in ids:
            (result,) = cancelled[job_id]
            assert result["status"] == "cancelled" and result["error"]["code"] == "scheduled_cancelled"
        while datetime.now(UTC) < due + timedelta(seconds=4):
            time.sleep(0.5)
    _, calls = first_calls(local_cloud, service)
    assert not [j for j in ids if calls[j]], "a cancelled job ran"


def test_tasks_api_down_for_20s_while_delayed_jobs_arrive_none_lost_none_early(
    local_cloud: Any, pubsub_emulator: Any, names: Any, tmp_path: Path
) -> None:
    env, service, _ = setup_stack(local_cloud, names, tmp_path)
    with WorkerProcess(env, "later-down") as worker:
        worker.wait_ready()
        local_cloud.set_down("tasks", True)
        try:
            down_at = time.time()
            due = {f"down-{names.suffix}-{i}": down_at + 8 + i for i in range(20)}
            publish(
                env,
                [
                    {
                        "job_id": j,
                        "kind": "later",
                        "payload": {},
                        "not_before": datetime.fromtimestamp(at, UTC).isoformat(),
                    }
                    for j, at in due.items()
                ],
            )
            while time.time() < down_at + 20:
                time.sleep(0.2)
            _, calls = first_calls(local_cloud, service)
            assert not [j for j in due if calls[j]], "a job ran while its timer could not be set"
        finally:
            local_cloud.set_down("tasks", False)
        first = wait_for_calls(local_cloud, service, set(due), timeout=90)
        results = final_results(env, set(due), timeout=30)
    early = {j: round(first[j] - at, 3) for j, at in due.items() if first[j] < at}
    assert not early, f"ran before not_before: {early}"
    assert all("succeeded" in results[j] for j in due), results
    _, calls = first_calls(local_cloud, service)
    assert all(calls[j] == 1 for j in due), calls
    late = sorted(first[j] - at for j, at in due.items())
    record_figures(
        "tasks_api_down_20s",
        {"jobs": len(due), "lost": 0, "early": 0, "lateness_s_max": round(late[-1], 3), "ran_twice": 0},
    )


def test_enqueue_in_20s_wait_prints_scheduled_then_the_result_20s_later(
    local_cloud: Any, pubsub_emulator: Any, names: Any, tmp_path: Path
) -> None:
    env, _, _ = setup_stack(local_cloud, names, tmp_path)
    with WorkerProcess(env, "later-cli") as worker:
        worker.wait_ready()
        started = time.monotonic()
        done = worker_cli(env, "enqueue", "later", "--payload", "{}", "--in", "20s", "--wait", timeout=120)
        took = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].startswith("scheduled until "), lines
    assert json.loads(lines[-1])["status"] == "succeeded"
    assert 20 <= took < 30, took


def test_503_retry_after_30_puts_an_opted_in_job_off_and_it_succeeds_30s_later_on_one_attempt(
    local_cloud: Any, pubsub_emulator: Any, names: Any, tmp_path: Path
) -> None:
    service = f"busy-{uid()}"
    busy = local_cloud.add_service(service, "echo")
    write_kind(tmp_path / "jobs", "busy", service, defer_on_retry_after=True)
    env = worker_env(local_cloud, names, WORKER_CATALOG_DIR=str(tmp_path / "jobs"))
    provision(env)
    subscriber = pubsub_v1.SubscriberClient()
    tap = subscriber.subscription_path(env["GOOGLE_CLOUD_PROJECT"], f"tap-{names.suffix}")
    subscriber.create_subscription(
        name=tap, topic=subscriber.topic_path(env["GOOGLE_CLOUD_PROJECT"], names.jobs_topic)
    )
    subscriber.close()
    env["TAP_SUBSCRIPTION"] = tap.rsplit("/", 1)[1]
    busy.error_rate, busy.error_status, busy.retry_after = 1.0, 503, 30
    job_id = f"busy-{names.suffix}"
    with WorkerProcess(env, "later-busy") as worker:
        worker.wait_ready()
        publish(env, [{"job_id": job_id, "kind": "busy", "payload": {}}])
        deadline = time.monotonic() + 30
        while busy.calls == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert busy.calls == 1
        busy.error_rate = 0.0  # the function is well again: the next call succeeds
        results = final_results(env, {job_id}, timeout=60)
        logs = worker.logs()
    calls = sorted(r.at for r in busy.requests)
    assert len(calls) == 2, calls
    assert 29.5 <= calls[1] - calls[0] <= 32.5, calls[1] - calls[0]
    assert results[job_id] == ["scheduled", "succeeded"], results
    # One delivery attempt in all: the first delivery was acked (never nacked), the task
    # published the job once more, and that delivery succeeded.
    assert "job_retry_later" not in logs and "job_retry_after_deferred" in logs
    tap_messages = drain(env, "TAP_SUBSCRIPTION", until=10, timeout=6)
    assert sorted(m.attributes.get("scheduled", "") for m in tap_messages) == ["", "1"]
    record_figures(
        "retry_after_30s",
        {"called_again_after_s": round(calls[1] - calls[0], 3), "delivery_attempts_used": 1, "calls": 2},
    )
