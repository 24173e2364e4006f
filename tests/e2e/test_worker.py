"""`worker run` end to end: emulator -> worker process -> local Cloud Run -> results.

Each test gets fresh topics and subscriptions and a catalog of its own pointing at
services of its own, so knobs set in one test never leak into another.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from localcloud.functions import score_account

from tests.e2e.harness import (
    WorkerProcess,
    collect_results,
    drain,
    provision,
    publish,
    uid,
    worker_env,
    write_kind,
)

pytestmark = pytest.mark.e2e

# On the emulator the worker rotates its pull streams (worker/gcp/emulator.py); on real
# Pub/Sub it uses the client library's own transport. "plain" runs that path here.
STREAMS = pytest.mark.parametrize("streams", ["rotating", "plain"])


def with_streams(env: dict[str, str], streams: str) -> dict[str, str]:
    return dict(env, WORKER_EMULATOR_PLAIN_STREAMS="1") if streams == "plain" else env


JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.")


@pytest.fixture
def stack(local_cloud: Any, pubsub_emulator: Any, names: Any, tmp_path: Path) -> dict[str, Any]:
    """A scoring service and an echo service of this test's own, a catalog for them, topics."""
    suffix = uid()
    scoring = local_cloud.add_service(f"scoring-{suffix}", "account-scoring")
    echo = local_cloud.add_service(f"echo-{suffix}", "echo")
    catalog = tmp_path / "jobs"
    write_kind(
        catalog, "account-scoring", scoring.name, attempts=6, backoff_initial_s=0.05, backoff_max_s=0.2
    )
    write_kind(catalog, "echo", echo.name, attempts=2, timeout_s=1, backoff_initial_s=0.05, backoff_max_s=0.1)
    env = worker_env(local_cloud, names, WORKER_CATALOG_DIR=str(catalog))
    provision(env)
    return {"env": env, "scoring": scoring, "echo": echo, "catalog": catalog, "cloud": local_cloud}


def account(i: int) -> dict[str, Any]:
    return {
        "account_id": f"acct-{i:05d}",
        "employees": (i * 37) % 5000,
        "annual_revenue": 10_000.0 * (i % 97),
        "industry": ("software", "retail", "finance")[i % 3],
    }


def scoring_jobs(n: int, prefix: str = "job") -> list[dict[str, Any]]:
    return [{"job_id": f"{prefix}-{i}", "kind": "account-scoring", "payload": account(i)} for i in range(n)]


@STREAMS
def test_a_thousand_jobs_succeed_with_one_token_and_one_lookup_per_service(
    stack: dict[str, Any], streams: str
) -> None:
    cloud, scoring = stack["cloud"], stack["scoring"]
    tokens_before = cloud.id_tokens_minted[scoring.url]
    lookups_before = cloud.admin_api_calls[("GetService", scoring.name)]
    jobs = scoring_jobs(1000)
    with WorkerProcess(with_streams(stack["env"], streams)) as worker:
        worker.wait_ready()
        publish(stack["env"], jobs)
        results = collect_results(stack["env"], {j["job_id"] for j in jobs})
        assert worker.stop() == 0
    stopped = next(e for e in worker.log_events() if e.get("message") == "consumer_stopped")
    assert stopped["succeeded"] == stopped["acked"] == 1000, stopped
    for job in jobs:
        result = results[job["job_id"]][0]
        assert result["status"] == "succeeded", result
        assert result["response"]["score"] == score_account(job["payload"])
        assert result["http_status"] == 200 and result["kind"] == "account-scoring"
    assert cloud.id_tokens_minted[scoring.url] - tokens_before == 1
    assert cloud.admin_api_calls[("GetService", scoring.name)] - lookups_before == 1


def test_a_function_failing_30_percent_with_503_still_succeeds_every_job(stack: dict[str, Any]) -> None:
    stack["scoring"].error_rate = 0.3
    stack["scoring"].error_status = 503
    jobs = scoring_jobs(300, prefix="flaky")
    with WorkerProcess(stack["env"]) as worker:
        worker.wait_ready()
        publish(stack["env"], jobs)
        results = collect_results(stack["env"], {j["job_id"] for j in jobs})
    statuses = {r[0]["status"] for r in results.values()}
    assert statuses == {"succeeded"}
    attempts = [r[0]["attempts"] for r in results.values()]
    assert max(attempts) > 1, "30% failures must show up as extra attempts"
    assert stack["scoring"].status_counts[503] > 0


def test_a_service_denying_the_worker_fails_naming_the_invoker_role(stack: dict[str, Any]) -> None:
    cloud = stack["cloud"]
    denied = cloud.add_service(f"denied-{uid()}", "echo", invokers=())
    write_kind(stack["catalog"], "denied", denied.name, attempts=3)
    jobs = [{"job_id": f"deny-{i}", "kind": "denied", "payload": {"i": i}} for i in range(5)]
    with WorkerProcess(stack["env"]) as worker:
        worker.wait_ready()
        publish(stack["env"], jobs)
        results = collect_results(stack["env"], {j["job_id"] for j in jobs})
        dead = drain(stack["env"], "WORKER_DEAD_LETTER_SUBSCRIPTION", 5, timeout=30)
    for job in jobs:
        result = results[job["job_id"]][0]
        assert result["status"] == "failed" and result["http_status"] == 403
        assert "roles/run.invoker" in result["error"]["message"]
    assert {m.attributes["job_id"] for m in dead} == {j["job_id"] for j in jobs}
    assert {m.attributes["error_code"] for m in dead} == {"forbidden"}
    per_job = [r.job_id for r in denied.requests]
    assert all(per_job.count(j["job_id"]) == 1 for j in jobs), "a 403 must not be retried"


def test_invalid_jobs_are_rejected_and_the_worker_keeps_consuming(stack: dict[str, Any]) -> None:
    env = stack["env"]
    bad: list[Any] = [
        b"{this is not json",
        {"job_id": "bad-kind", "kind": "no-such-kind", "payload": {}},
        {"kind": "account-scoring", "payload": {"account_id": "x"}},
        {"job_id": "too-big", "kind": "echo", "payload": "x" * 1_100_000},
    ]
    good = scoring_jobs(3, prefix="after-bad")
    with WorkerProcess(env) as worker:
        worker.wait_ready()
        publish(env, bad)
        publish(env, good)
        messages = drain(env, "WORKER_RESULTS_SUBSCRIPTION", len(bad) + len(good), timeout=60)
        dead = drain(env, "WORKER_DEAD_LETTER_SUBSCRIPTION", len(bad), timeout=30)
        assert worker.proc.poll() is None, "the worker must survive bad input"
    results = [json.loads(m.data) for m in messages]
    rejected = sorted(r["error"]["code"] for r in results if r["status"] == "rejected")
    assert rejected == ["invalid_job", "invalid_json", "payload_too_large", "unknown_kind"]
    assert sum(r["status"] == "succeeded" for r in results) == 3
    assert sorted(m.attributes["error_code"] for m in dead) == rejected
    assert b"{this is not json" in [m.data for m in dead], "a dead letter keeps the original bytes"


def test_a_function_that_hangs_is_retried_then_failed(stack: dict[str, Any]) -> None:
    stack["echo"].hang_rate = 1.0
    # A lone job failing every call would otherwise open the breaker and be held, not
    # failed (tests/e2e/test_limits.py): here the retry policy alone is under test.
    with (stack["catalog"] / "echo.toml").open("a") as toml:
        toml.write("[breaker]\nfailures = 100\n")
    job = {"job_id": f"hang-{uid()}", "kind": "echo", "payload": {}}
    with WorkerProcess(stack["env"]) as worker:
        worker.wait_ready()
        publish(stack["env"], [job])
        results = collect_results(stack["env"], {job["job_id"]}, timeout=90)
    result = results[job["job_id"]][0]
    assert result["status"] == "failed" and result["error"]["code"] == "timeout"
    # Two attempts per delivery, five deliveries before the dead-letter policy's limit.
    calls = [r for r in stack["echo"].requests if r.job_id == job["job_id"]]
    assert len(calls) == 10


def sigterm_when_calls_started(
    env: dict[str, Any], service: Any, jobs: list[dict[str, Any]], calls: int
) -> tuple[int, float, WorkerProcess]:
    worker = WorkerProcess(env, "first")
    try:
        worker.wait_ready()
        publish(env, jobs)
        deadline = time.monotonic() + 30
        while service.calls < calls and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        code = worker.stop(signal.SIGTERM)
        return code, time.monotonic() - started, worker
    finally:
        worker.kill()


@STREAMS
def test_sigterm_lets_200_calls_in_flight_finish_and_exits_0(stack: dict[str, Any], streams: str) -> None:
    env = dict(stack["env"], WORKER_MAX_IN_FLIGHT="200", WORKER_SHUTDOWN_GRACE_SECONDS="6")
    env = with_streams(env, streams)
    stack["scoring"].latency_s = 1.0
    jobs = scoring_jobs(200, prefix="term")
    code, took, worker = sigterm_when_calls_started(env, stack["scoring"], jobs, 200)
    assert code == 0, worker.logs()[-2000:]
    assert took < 6 + 2, f"shutdown took {took:.1f}s, over the grace period"
    results = collect_results(env, {j["job_id"] for j in jobs}, timeout=30)
    assert all(r[0]["status"] == "succeeded" for r in results.values())


def test_calls_outliving_the_grace_period_are_redelivered_to_the_next_worker(stack: dict[str, Any]) -> None:
    env = dict(stack["env"], WORKER_SHUTDOWN_GRACE_SECONDS="1")
    stack["scoring"].latency_s = 5.0
    jobs = scoring_jobs(20, prefix="late")
    code, took, worker = sigterm_when_calls_started(env, stack["scoring"], jobs, 20)
    assert code == 0 and took < 1 + 2, worker.logs()[-2000:]
    assert "grace_period_over_releasing" in worker.logs()
    stack["scoring"].latency_s = 0.0
    with WorkerProcess(env, "second") as second:
        second.wait_ready()
        results = collect_results(env, {j["job_id"] for j in jobs}, timeout=90)
    assert all(r[0]["status"] == "succeeded" for r in results.values())


def test_jobs_running_at_sigterm_keep_their_leases_through_a_grace_longer_than_the_lease_step(
    stack: dict[str, Any],
) -> None:
    """The stream's leaser stops with the stream; the worker keeps the leases itself, so a
    second worker pulling the same subscription never gets a job that is still running."""
    env = dict(stack["env"], WORKER_SHUTDOWN_GRACE_SECONDS="40", WORKER_LEASE_EXTENSION_SECONDS="10")
    stack["scoring"].latency_s = 22.0
    jobs = scoring_jobs(10, prefix="kept")
    second = WorkerProcess(env, "second")  # pulls the same subscription all along
    try:
        second.wait_ready()
        code, _, first = sigterm_when_calls_started(env, stack["scoring"], jobs, 10)
        assert code == 0, first.logs()[-2000:]
        results = collect_results(env, {j["job_id"] for j in jobs}, timeout=60)
    finally:
        second.kill()
    assert all(r[0]["status"] == "succeeded" for r in results.values())
    calls = Counter(r.job_id for r in stack["scoring"].requests)
    assert calls == dict.fromkeys((j["job_id"] for j in jobs), 1), f"a job ran twice: {calls}"


@STREAMS
def test_three_workers_share_one_subscription(stack: dict[str, Any], streams: str) -> None:
    env = with_streams(stack["env"], streams)
    jobs = scoring_jobs(3000, prefix="share")
    workers = [WorkerProcess(env, f"w{i}") for i in range(3)]
    try:
        for worker in workers:
            worker.wait_ready()
        publish(env, jobs)
        results = collect_results(env, {j["job_id"] for j in jobs}, timeout=180)
        for worker in workers:
            assert worker.stop() == 0
    finally:
        for worker in workers:
            worker.kill()
    assert all(r[0]["status"] == "succeeded" for r in results.values())
    done_by = [
        next(e for e in w.log_events() if e.get("message") == "consumer_stopped").get("succeeded", 0)
        for w in workers
    ]
    assert all(n > 0 for n in done_by), f"each worker should have done some jobs: {done_by}"
    assert sum(done_by) >= 3000


def test_no_token_appears_in_logs_results_or_dead_letters(stack: dict[str, Any]) -> None:
    env = dict(stack["env"], WORKER_LOG_LEVEL="debug")
    denied = stack["cloud"].add_service(f"denied-{uid()}", "echo", invokers=())
    write_kind(stack["catalog"], "denied", denied.name, attempts=1)
    jobs = [
        {"job_id": "leak-echo", "kind": "echo", "payload": {"look": "at my headers"}},
        {"job_id": "leak-denied", "kind": "denied", "payload": {}},
    ]
    with WorkerProcess(env) as worker:
        worker.wait_ready()
        publish(env, jobs)
        results = collect_results(env, {"leak-echo", "leak-denied"})
        dead = drain(env, "WORKER_DEAD_LETTER_SUBSCRIPTION", 1, timeout=30)
        worker.stop()
        logs = worker.logs()
    echoed = results["leak-echo"][0]["response"]
    assert echoed["headers"]["X-Job-Id"] == "leak-echo", echoed
    seen = [logs, json.dumps(results), *(m.data.decode() + json.dumps(dict(m.attributes)) for m in dead)]
    for text in seen:
        assert not JWT.search(text), "an ID token leaked"
        assert "Bearer ey" not in text and "ya29." not in text


def test_jobs_whose_result_cannot_be_published_are_not_acked_and_end_with_a_result(
    stack: dict[str, Any],
) -> None:
    # The results topic is deleted under a running worker (an operator's mistake, or a
    # publish path that stays down longer than the client's own retries): every result
    # fails to publish, so no job may be acked. Once the topic is back, the held jobs
    # come round again and each gets its result.
    from google.cloud import pubsub_v1

    env = dict(stack["env"], WORKER_LOG_LEVEL="debug")  # job_succeeded is a debug line
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    project = env["GOOGLE_CLOUD_PROJECT"]
    results_topic = publisher.topic_path(project, env["WORKER_RESULTS_TOPIC"])
    jobs = scoring_jobs(20, prefix="unpublishable")
    with WorkerProcess(env, name="publish-outage") as worker:
        worker.wait_ready()
        publisher.delete_topic(topic=results_topic)
        publish(env, jobs)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            failures = [e for e in worker.log_events() if e.get("message") == "result_publish_failed"]
            if len(failures) >= len(jobs):
                break
            time.sleep(0.2)
        assert len(failures) >= len(jobs), worker.logs()[-3000:]
        assert "NotFound" in failures[0]["error"]
        # Back: a new topic of the same name, read through a new subscription (the old
        # one was detached with the deleted topic).
        publisher.create_topic(name=results_topic)
        fresh = f"{env['WORKER_RESULTS_SUBSCRIPTION']}-again"
        subscriber.create_subscription(name=subscriber.subscription_path(project, fresh), topic=results_topic)
        results = collect_results(
            {**env, "WORKER_RESULTS_SUBSCRIPTION": fresh}, {j["job_id"] for j in jobs}, timeout=90
        )
        assert worker.stop() == 0
    assert {r[0]["status"] for r in results.values()} == {"succeeded"}
    attempts = {e["job_id"]: e["attempt"] for e in worker.log_events() if e.get("message") == "job_succeeded"}
    # Each job was delivered again after its failed publish: none had been acked.
    assert min(attempts.values()) >= 2, attempts
    assert not drain(env, "WORKER_DEAD_LETTER_SUBSCRIPTION", 1, timeout=2)
