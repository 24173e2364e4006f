"""`worker setup` creates the Cloud Tasks queue and `worker doctor` checks the worker may
put jobs off on it, against the local cloud's Cloud Tasks through google-cloud-tasks."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from localcloud import LocalCloud
from worker.core.settings import load_settings
from worker.ops.delay import apply_queue, check_delay_queue
from worker.runtime.app import access_credentials, tasks_client


def client() -> Any:
    settings = load_settings()
    return tasks_client(settings, access_credentials(settings))


def test_setup_leaves_an_existing_queue_and_creates_a_missing_one_or_names_the_role(
    local_cloud: LocalCloud,
) -> None:
    assert apply_queue(client(), load_settings()).action == "unchanged"
    settings = load_settings(delay_queue=f"q-{uuid.uuid4().hex[:8]}")
    refused = apply_queue(client(), settings)
    assert refused.action == "differs"
    assert "roles/cloudtasks.queueAdmin" in refused.detail and "gcloud tasks queues create" in refused.detail
    member = f"serviceAccount:{local_cloud.worker_email}"
    local_cloud.iam.grant(member, "roles/cloudtasks.queueAdmin", local_cloud.iam.project_resource)
    try:
        assert apply_queue(client(), settings).action == "created"
        assert apply_queue(client(), settings).action == "unchanged"
    finally:
        local_cloud.iam.revoke(member, "roles/cloudtasks.queueAdmin", local_cloud.iam.project_resource)


def test_doctor_passes_with_the_enqueuer_role_and_prints_the_grants_without(local_cloud: LocalCloud) -> None:
    member = f"serviceAccount:{local_cloud.worker_email}"
    good = asyncio.run(check_delay_queue(client(), load_settings(), member, local_cloud.worker_email))
    assert good.ok, good.checks
    assert "roles/iam.serviceAccountUser" in good.checks[0].summary
    bare = load_settings(delay_queue=f"bare-{uuid.uuid4().hex[:8]}")
    local_cloud.tasks.add_queue(bare.delay_queue, local_cloud.region)  # no grants on it
    bad = asyncio.run(check_delay_queue(client(), bare, member, local_cloud.worker_email))
    assert not bad.ok
    (check,) = bad.checks
    assert "may not create tasks" in check.summary
    assert any("roles/cloudtasks.enqueuer" in fix and bare.delay_queue in fix for fix in check.fix)
    assert any("roles/iam.serviceAccountUser" in fix for fix in check.fix)


def test_doctor_says_cloud_tasks_is_unreachable(local_cloud: LocalCloud) -> None:
    local_cloud.set_down("tasks", True)
    try:
        report = asyncio.run(
            check_delay_queue(client(), load_settings(), "serviceAccount:x", local_cloud.worker_email)
        )
    finally:
        local_cloud.set_down("tasks", False)
    assert not report.ok and "unreachable" in report.checks[0].summary
