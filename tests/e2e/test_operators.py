"""Operators and the web app, through the real `worker` command on the local cloud.

Every test drives `python -m worker VERB` as a subprocess with the local cloud's
environment, and asserts what an operator sees: the output, and the exit status.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from google.cloud import pubsub_v1
from google.protobuf import field_mask_pb2

from localcloud import RUN_INVOKER, RUN_VIEWER, TOKEN_CREATOR, member_for
from tests.e2e.harness import WorkerProcess, drain, provision, uid, worker_cli, worker_env, write_kind

pytestmark = pytest.mark.e2e

JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.")
WORKER_SA = "worker@local-project.iam.gserviceaccount.com"


@pytest.fixture
def ops(local_cloud: Any, pubsub_emulator: Any, names: Any, tmp_path: Path) -> dict[str, Any]:
    """An echo service of this test's own, kind `echo` calling it once per delivery, topics."""
    service = local_cloud.add_service(f"echo-{uid()}", "echo")
    catalog = tmp_path / "jobs"
    write_kind(catalog, "echo", service.name, attempts=1, timeout_s=2)
    write_kind(catalog, "account-scoring", service.name, attempts=1)
    with (catalog / "account-scoring.toml").open("a") as toml:
        toml.write('[payload_schema]\ntype = "object"\nrequired = ["account_id"]\n')
    env = worker_env(
        local_cloud,
        names,
        WORKER_CATALOG_DIR=str(catalog),
        WORKER_SHUTDOWN_GRACE_SECONDS="1",
        COLUMNS="250",
    )
    provision(env)
    try:
        yield {"env": env, "service": service, "cloud": local_cloud, "names": names}
    finally:
        local_cloud.remove_service(service.name)


def dead_letter_lines(env: dict[str, str]) -> list[dict[str, Any]]:
    done = worker_cli(env, "dead-letters", "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def wait_for_dead_letters(env: dict[str, str], job_ids: set[str], timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        lines = dead_letter_lines(env)
        if job_ids <= {line["job_id"] for line in lines} or time.monotonic() > deadline:
            return lines
        time.sleep(0.3)


def pending(project: str, subscription: str) -> list[Any]:
    """Messages waiting on a subscription (a one-second look; they are left there)."""
    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(project, subscription)
    found = list(subscriber.pull(subscription=path, max_messages=10, timeout=1).received_messages)
    if found:
        subscriber.modify_ack_deadline(
            subscription=path, ack_ids=[m.ack_id for m in found], ack_deadline_seconds=0
        )
    return found


def result_of(env: dict[str, str], job_id: str, status: str, timeout: float = 30) -> dict[str, Any]:
    """The first result for `job_id` with `status` on the web app's subscription (results read are acked)."""
    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path("local-project", env["WORKER_RESULTS_SUBSCRIPTION"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = subscriber.pull(subscription=path, max_messages=100, timeout=1).received_messages
        if got:
            subscriber.acknowledge(subscription=path, ack_ids=[m.ack_id for m in got])
        for received in got:
            result = json.loads(received.message.data)
            if result["job_id"] == job_id and result["status"] == status:
                return result
    raise AssertionError(f"no {status} result for {job_id} in {timeout}s")


def test_replay_round_trip_failed_job_comes_back_succeeded(ops: dict[str, Any]) -> None:
    env, service = ops["env"], ops["service"]
    service.error_rate, service.error_status = 1.0, 400
    with WorkerProcess(env) as worker:
        worker.wait_ready()
        for job_id in ("a-1", "b-1"):
            done = worker_cli(
                env,
                "enqueue",
                "echo",
                "--payload",
                '{"n": 1}',
                "--job-id",
                job_id,
                "--wait",
                "--timeout",
                "20",
            )
            assert done.returncode == 1, done.stderr
            assert json.loads(done.stdout.splitlines()[-1])["status"] == "failed"

        lines = wait_for_dead_letters(env, {"a-1", "b-1"})
        assert {(x["job_id"], x["status"], x["error_code"], x["replay_count"]) for x in lines} == {
            ("a-1", "failed", "http_400", 0),
            ("b-1", "failed", "http_400", 0),
        }
        table = worker_cli(env, "dead-letters")
        assert table.returncode == 0
        assert "a-1" in table.stdout and "http_400" in table.stdout and "2 dead letter(s)" in table.stdout

        dry = worker_cli(env, "replay", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would replay 2, skip 0; nothing changed" in dry.stdout
        assert "a-1" in dry.stdout and "b-1" in dry.stdout
        assert {x["job_id"] for x in dead_letter_lines(env)} == {"a-1", "b-1"}

        # Replayed while still broken: back in the dead letters, its replay counted.
        again = worker_cli(env, "replay", "--job-id", "a-1")
        assert again.returncode == 0, again.stderr
        assert "replayed 1, skipped 1, failed 0" in again.stdout
        lines = wait_for_dead_letters(env, {"a-1"})
        assert {x["job_id"]: x["replay_count"] for x in lines} == {"a-1": 1, "b-1": 0}

        service.error_rate = 0.0
        fixed = worker_cli(env, "replay", "--job-id", "a-1")
        assert "replayed 1, skipped 1, failed 0" in fixed.stdout
        result = result_of(env, "a-1", "succeeded")
        assert result["response"]["json"] == {"n": 1}
        # The filtered replay left b-1 alone.
        assert [(x["job_id"], x["replay_count"]) for x in dead_letter_lines(env)] == [("b-1", 0)]

        rest = worker_cli(env, "replay", "--kind", "echo")
        assert "replayed 1, skipped 0, failed 0" in rest.stdout
        result_of(env, "b-1", "succeeded")
        empty = worker_cli(env, "dead-letters")
        assert "No dead letters on" in empty.stdout
        assert worker.stop() == 0


def test_dead_letters_lists_jobs_pubsub_gave_up_on_and_replay_moves_them(ops: dict[str, Any]) -> None:
    env, names = ops["env"], ops["names"]
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path("local-project", names.jobs_topic)
    job = {"job_id": "crashy-1", "kind": "echo", "payload": {"x": 1}}
    publisher.publish(topic, json.dumps(job).encode(), job_id="crashy-1", kind="echo").result(30)
    # No worker acks it: nack it until the subscription's policy (5 attempts) forwards it.
    subscriber = pubsub_v1.SubscriberClient()
    jobs_sub = subscriber.subscription_path("local-project", names.jobs_subscription)
    # Without a retry policy the emulator redelivers a nacked message at once (not after ~2 s).
    subscriber.update_subscription(
        subscription={"name": jobs_sub}, update_mask=field_mask_pb2.FieldMask(paths=["retry_policy"])
    )
    # The emulator forwards it when it would deliver it a sixth time: keep pulling.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pulled = subscriber.pull(subscription=jobs_sub, max_messages=10, timeout=1).received_messages
        if pulled:
            subscriber.modify_ack_deadline(
                subscription=jobs_sub, ack_ids=[m.ack_id for m in pulled], ack_deadline_seconds=0
            )
            continue
        if pending("local-project", names.dead_letter_subscription):
            break
        time.sleep(0.1)
    [line] = dead_letter_lines(env)
    assert line["job_id"] == "crashy-1" and line["dead_lettered_by"] == "pubsub"
    assert line["error_code"] is None and line["attempts"] == 5
    assert line["error_message"].startswith("delivery attempts exhausted (5 deliveries from")
    table = worker_cli(env, "dead-letters")
    assert "dead-lettered by Pub/Sub" in table.stdout and "delivery attempts exhausted" in table.stdout

    with WorkerProcess(env) as worker:
        worker.wait_ready()
        done = worker_cli(env, "replay")
        assert "replayed 1, skipped 0, failed 0" in done.stdout, done.stdout + done.stderr
        assert result_of(env, "crashy-1", "succeeded")["response"]["json"] == {"x": 1}
    assert dead_letter_lines(env) == []


def test_enqueue_wait_exit_status_follows_the_result(ops: dict[str, Any]) -> None:
    env, service = ops["env"], ops["service"]
    with WorkerProcess(env) as worker:
        worker.wait_ready()
        ok = worker_cli(
            env, "enqueue", "echo", "--payload", '{"hello": "world"}', "--wait", "--timeout", "20"
        )
        assert ok.returncode == 0, ok.stderr
        job_id, result_line = ok.stdout.splitlines()
        result = json.loads(result_line)
        assert result["job_id"] == job_id and result["status"] == "succeeded"
        assert result["response"]["json"] == {"hello": "world"}

        service.error_rate, service.error_status = 1.0, 404
        bad = worker_cli(
            env, "enqueue", "echo", "--payload", "{}", "--job-id", "will-fail", "--wait", "--timeout", "20"
        )
        assert bad.returncode == 1
        failed = json.loads(bad.stdout.splitlines()[-1])
        assert (failed["job_id"], failed["status"], failed["http_status"]) == ("will-fail", "failed", 404)
        assert worker.stop() == 0
    # --wait used subscriptions of its own: the web app's still holds both results.
    got = {json.loads(m.data)["job_id"] for m in drain(env, "WORKER_RESULTS_SUBSCRIPTION", 2, timeout=10)}
    assert got == {job_id, "will-fail"}


def test_enqueue_refuses_invalid_jobs_locally_and_times_out_without_a_worker(ops: dict[str, Any]) -> None:
    env = ops["env"]
    unknown = worker_cli(env, "enqueue", "no-such-kind", "--payload", "{}")
    assert unknown.returncode == 2
    assert "unknown kind 'no-such-kind'; known kinds: account-scoring, echo" in unknown.stderr
    schema = worker_cli(env, "enqueue", "account-scoring", "--payload", '{"employees": 3}')
    assert schema.returncode == 2
    assert "payload does not match kind 'account-scoring'" in schema.stderr
    assert "'account_id' is a required property" in schema.stderr
    not_json = worker_cli(env, "enqueue", "echo", "--payload", "{oops")
    assert not_json.returncode == 2 and "--payload is not JSON" in not_json.stderr
    bad_id = worker_cli(env, "enqueue", "echo", "--payload", "{}", "--job-id", "no spaces")
    assert bad_id.returncode == 2 and "job_id" in bad_id.stderr
    assert not pending("local-project", env["WORKER_JOBS_SUBSCRIPTION"]), "a refused job was published"

    late = worker_cli(
        env, "enqueue", "echo", "--payload", "{}", "--job-id", "nobody-home", "--wait", "--timeout", "1"
    )
    assert late.returncode == 3
    assert late.stdout.strip() == "nobody-home"
    assert "no result for job nobody-home within 1s" in late.stderr


def test_setup_twice_reports_no_change(local_cloud: Any, pubsub_emulator: Any, names: Any) -> None:
    env = worker_env(local_cloud, names)
    first = worker_cli(env, "setup")
    assert first.returncode == 0, first.stderr
    # Five topics (jobs, jobs-batch, results, dead letters, control) and four subscriptions;
    # the Cloud Tasks queue of jobs at a time is shared by the session's tests (created
    # by whichever ran first).
    pubsub = [line for line in first.stdout.splitlines() if "/queues/" not in line]
    assert sum(line.strip().startswith("created") for line in pubsub) == 9
    assert f"created  projects/local-project/topics/{names.control_topic}" in first.stdout
    second = worker_cli(env, "setup")
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("unchanged") == 10 and "created" not in second.stdout
    assert "No change: everything already exists as configured." in second.stdout


def test_doctor_passes_for_a_working_service(ops: dict[str, Any]) -> None:
    env, service = ops["env"], ops["service"]
    done = worker_cli(env, "doctor", service.name)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"credentials: metadata server as {WORKER_SA}" in out
    assert f"service URL: {service.url} (Cloud Run Admin API)" in out
    assert f"ID token: aud={service.url} email={WORKER_SA} exp=" in out
    assert f"GET {service.url}/ -> 200: the service accepted the token" in out
    assert "The identity chain works end to end." in out
    assert not JWT.search(out + done.stderr), "doctor printed a token"


def test_doctor_403_story_names_the_invoker_binding_that_fixes_it(ops: dict[str, Any]) -> None:
    env, cloud = ops["env"], ops["cloud"]
    locked = cloud.add_service(f"locked-{uid()}", "echo", invokers=())
    try:
        done = worker_cli(env, "doctor", locked.name)
        assert done.returncode == 1
        assert f"403 Forbidden: {WORKER_SA} may not invoke {locked.name}" in done.stdout
        fix = (
            f"fix: gcloud run services add-iam-policy-binding {locked.name} --region=us-central1 "
            f"--project=local-project --member=serviceAccount:{WORKER_SA} --role=roles/run.invoker"
        )
        assert fix in done.stdout
        assert "The identity chain is broken at: HTTP call." in done.stdout  # the local cloud: http
        # Doing what the fix says mends the chain.
        cloud.iam.grant(member_for(WORKER_SA), RUN_INVOKER, f"run.service:{locked.name}")
        assert worker_cli(env, "doctor", locked.name).returncode == 0
    finally:
        cloud.remove_service(locked.name)


def test_doctor_401_story_for_a_wrong_audience(ops: dict[str, Any]) -> None:
    env, service = ops["env"], ops["service"]
    done = worker_cli(env, "doctor", service.name, "--audience", "https://other.example.com")
    assert done.returncode == 1
    out = done.stdout
    assert "ID token: aud=https://other.example.com" in out
    assert "401 Unauthorized: the token's audience is wrong" in out
    assert f"but {service.name} accepts only its URL {service.url}" in out
    assert "Cloud Run answers 401 unless the bearer is an OIDC ID token" in out
    assert (
        f"fix: gcloud run services update {service.name} --region=us-central1 --project=local-project "
        "--add-custom-audiences=https://other.example.com"
    ) in out
    assert not JWT.search(out)


def test_doctor_401_story_for_user_credentials(ops: dict[str, Any], tmp_path: Path) -> None:
    adc = ops["cloud"].create_authorized_user_file(tmp_path / "adc.json", "dev@example.com")
    env = {**ops["env"], "GOOGLE_APPLICATION_CREDENTIALS": str(adc)}
    done = worker_cli(env, "doctor")
    assert done.returncode == 1
    out = done.stdout
    assert f"user credentials of dev@example.com (GOOGLE_APPLICATION_CREDENTIALS={adc})" in out
    assert "ID token: user credentials cannot mint one" in out
    assert "User credentials (gcloud auth application-default login)" in out
    assert "This is the 401 the web app saw" in out
    assert (
        f"fix: gcloud iam service-accounts add-iam-policy-binding {WORKER_SA} --project=local-project "
        f"--member=user:dev@example.com --role={TOKEN_CREATOR}"
    ) in out
    assert f"fix: export WORKER_IMPERSONATE_SERVICE_ACCOUNT={WORKER_SA}" in out
    assert "The identity chain is broken at: ID token." in out
    assert "services not checked" in out


def test_doctor_walks_a_key_file_identity_from_admin_api_403_to_working(
    ops: dict[str, Any], tmp_path: Path
) -> None:
    cloud, service = ops["cloud"], ops["service"]
    email = f"reporting-{uid()}@local-project.iam.gserviceaccount.com"
    key = cloud.create_service_account_key(tmp_path / "key.json", email)
    env = {**ops["env"], "GOOGLE_APPLICATION_CREDENTIALS": str(key)}

    no_viewer = worker_cli(env, "doctor", service.name)
    assert no_viewer.returncode == 1
    assert f"credentials: service account key {key} as {email}" in no_viewer.stdout
    assert "service URL: the Admin API did not give a URL (permission_denied)" in no_viewer.stdout
    assert (
        f"fix: gcloud run services add-iam-policy-binding {service.name} --region=us-central1 "
        f"--project=local-project --member=serviceAccount:{email} --role=roles/run.viewer"
    ) in no_viewer.stdout
    # What the fix grants: the viewer role on that one service.
    cloud.iam.grant(member_for(email), RUN_VIEWER, f"run.service:{service.name}")

    no_invoker = worker_cli(env, "doctor", service.name)
    assert no_invoker.returncode == 1
    assert f"ID token: aud={service.url} email={email}" in no_invoker.stdout
    assert f"403 Forbidden: {email} may not invoke {service.name}" in no_invoker.stdout
    cloud.iam.grant(member_for(email), RUN_INVOKER, f"run.service:{service.name}")

    assert worker_cli(env, "doctor", service.name).returncode == 0


def test_doctor_names_a_service_the_admin_api_does_not_know(ops: dict[str, Any]) -> None:
    # Granted roles/run.viewer per service, the worker gets 403 for a service that does
    # not exist, as from Cloud Run: the fix lists the services to tell the two apart.
    done = worker_cli(ops["env"], "doctor", "no-such-service")
    assert done.returncode == 1
    assert "service URL: the Admin API did not give a URL (permission_denied)" in done.stdout
    assert "or it does not exist" in done.stdout
    assert "fix: gcloud run services list --project=local-project --region=us-central1" in done.stdout
    # With the viewer role on the whole project, Cloud Run says 404 instead.
    cloud = ops["cloud"]
    member = member_for(cloud.worker_email)
    cloud.iam.grant(member, RUN_VIEWER, cloud.iam.project_resource)
    try:
        done = worker_cli(ops["env"], "doctor", "no-such-service")
    finally:
        cloud.iam.revoke(member, RUN_VIEWER, cloud.iam.project_resource)
    assert "service URL: the Admin API did not give a URL (service_not_found)" in done.stdout
    assert "fix: gcloud run services list --project=local-project --region=us-central1" in done.stdout
