"""Which credentials `worker run` accepts, end to end on the local cloud."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    WorkerProcess,
    collect_results,
    provision,
    publish,
    uid,
    worker_cli,
    worker_env,
    write_kind,
)

pytestmark = pytest.mark.e2e


def test_user_credentials_are_refused_at_start_up_with_the_fix(
    local_cloud: Any, pubsub_emulator: Any, names: Any, tmp_path: Path
) -> None:
    user_file = local_cloud.create_authorized_user_file(tmp_path / "adc.json", "dev@example.com")
    env = worker_env(local_cloud, names, GOOGLE_APPLICATION_CREDENTIALS=str(user_file))
    done = worker_cli(env, "run")
    assert done.returncode == 2
    assert "cannot mint the ID token" in done.stderr
    assert "roles/iam.serviceAccountTokenCreator" in done.stderr
    assert "WORKER_IMPERSONATE_SERVICE_ACCOUNT" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_setting_names_the_variable(local_cloud: Any, pubsub_emulator: Any, names: Any) -> None:
    done = worker_cli(worker_env(local_cloud, names, WORKER_MAX_IN_FLIGHT="lots"), "run")
    assert done.returncode == 2
    assert "WORKER_MAX_IN_FLIGHT='lots' is invalid" in done.stderr and "Traceback" not in done.stderr


def test_a_missing_subscription_says_to_run_setup(local_cloud: Any, pubsub_emulator: Any, names: Any) -> None:
    done = worker_cli(worker_env(local_cloud, names), "run")
    assert done.returncode == 2
    assert "worker setup" in done.stderr and names.jobs_subscription in done.stderr


def test_impersonation_mints_tokens_as_the_worker_service_account(
    local_cloud: Any, pubsub_emulator: Any, names: Any, tmp_path: Path
) -> None:
    """A laptop: a developer identity (here a key file) impersonates the worker's account."""
    developer = f"dev-{uid()}@local-project.iam.gserviceaccount.com"
    key = local_cloud.create_service_account_key(tmp_path / "dev.json", developer)
    target = "worker@local-project.iam.gserviceaccount.com"
    service = local_cloud.add_service(f"imp-{uid()}", "echo")
    catalog = tmp_path / "jobs"
    write_kind(catalog, "echo", service.name)
    env = worker_env(
        local_cloud,
        names,
        WORKER_CATALOG_DIR=str(catalog),
        GOOGLE_APPLICATION_CREDENTIALS=str(key),
        WORKER_IMPERSONATE_SERVICE_ACCOUNT=target,
    )
    provision(env)

    # Without the token creator role the job fails for good, naming the role.
    with WorkerProcess(env) as worker:
        worker.wait_ready()
        publish(env, [{"job_id": "imp-denied", "kind": "echo", "payload": {}}])
        denied = collect_results(env, {"imp-denied"})["imp-denied"][0]
    assert denied["status"] == "failed" and denied["error"]["code"] == "token_creator_missing"
    assert "roles/iam.serviceAccountTokenCreator" in denied["error"]["message"]

    local_cloud.iam.grant(
        f"serviceAccount:{developer}", "roles/iam.serviceAccountTokenCreator", f"serviceAccount:{target}"
    )
    with WorkerProcess(env) as worker:
        worker.wait_ready()
        assert "impersonation via IAM Credentials" in worker.logs()
        publish(env, [{"job_id": "imp-ok", "kind": "echo", "payload": {}}])
        ok = collect_results(env, {"imp-ok"})["imp-ok"][0]
    assert ok["status"] == "succeeded", ok
    calls = [r for r in service.requests if r.job_id == "imp-ok"]
    assert calls and all(r.token_email == target and r.token_audience == service.url for r in calls)
