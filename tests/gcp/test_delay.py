"""worker/gcp/delay.py on the local cloud's Cloud Tasks, through google-cloud-tasks: the
task it makes, deduplication by name, the 30-day cap, and what happens when Cloud Tasks
is away or refuses."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.cloud import tasks_v2
from localcloud.cloud import DELAY_QUEUE

from localcloud import LocalCloud
from worker.core.errors import TransientJobError
from worker.core.messages import decode_job
from worker.core.settings import load_settings
from worker.core.shapes import Delivery
from worker.gcp.delay import (
    SCHEDULED_ATTRIBUTE,
    TaskDeferrer,
    find_job_tasks,
    hop_of,
    queue_path,
    task_id,
)
from worker.runtime.app import access_credentials, tasks_client


def deferrer(cloud: LocalCloud, queue: str = DELAY_QUEUE) -> TaskDeferrer:
    settings = load_settings()
    return TaskDeferrer(
        tasks_client(settings, access_credentials(settings)),
        queue_path(cloud.project, cloud.region, queue),
        f"projects/{cloud.project}/topics/jobs-x",
        service_account=cloud.worker_email,
        pubsub_endpoint="http://127.0.0.1:8681",
    )


def delivery(job_id: str, due: datetime, **attributes: str) -> Delivery:
    body = {"job_id": job_id, "kind": "echo", "payload": {"n": 1}, "not_before": due.isoformat()}
    return Delivery(data=json.dumps(body).encode(), attributes={"job_id": job_id, **attributes})


def defer(timer: TaskDeferrer, d: Delivery) -> str:
    job = decode_job(d.data, d.attributes, max_bytes=10_000)
    assert job.not_before is not None
    return asyncio.run(timer.defer(job, d, job.not_before))


def test_task_ids_are_valid_distinct_and_carry_the_hop() -> None:
    ids = {task_id(j, 1) for j in ("a", "a.b", "a:b", "a_b", "a_db", "A-b")}
    assert len(ids) == 6
    assert all(set(i) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") for i in ids)
    assert task_id("x" * 128, 99).endswith("-99") and len(task_id(":" * 128, 99)) < 500
    assert hop_of({}) == 0 and hop_of({"scheduled": "3"}) == 3 and hop_of({"scheduled": "x"}) == 0


def test_a_job_becomes_a_task_publishing_it_unchanged_at_not_before_once(local_cloud: LocalCloud) -> None:
    timer = deferrer(local_cloud)
    job_id = f"job:{uuid.uuid4().hex[:8]}"
    due = datetime.now(UTC) + timedelta(hours=2)
    d = delivery(job_id, due, replay_count="1")
    name = defer(timer, d)
    assert name == f"{timer.queue}/tasks/{task_id(job_id, 1)}"
    # A duplicate delivery names the same task: Cloud Tasks takes it once.
    assert defer(timer, d) == name
    tasks = find_job_tasks(
        tasks_client(load_settings(), access_credentials(load_settings())), timer.queue, job_id
    )
    assert [t.name for t in tasks] == [name]
    task = tasks[0]
    assert abs(task.schedule_time.timestamp() - due.timestamp()) < 0.01
    assert task.http_request.url == "http://127.0.0.1:8681/v1/projects/local-project/topics/jobs-x:publish"
    assert task.http_request.oauth_token.service_account_email == local_cloud.worker_email
    message = json.loads(task.http_request.body)["messages"][0]
    assert base64.b64decode(message["data"]) == d.data
    assert message["attributes"] == {"job_id": job_id, "replay_count": "1", SCHEDULED_ATTRIBUTE: "1"}
    # Once the task has published it, the job comes back with scheduled=1: put off again
    # (a due time past Cloud Tasks' 30 days), it is the next task.
    again = delivery(job_id, due, **{SCHEDULED_ATTRIBUTE: "1"})
    assert defer(timer, again).endswith("-2")


def test_a_job_due_past_30_days_lands_within_them(local_cloud: LocalCloud) -> None:
    timer = deferrer(local_cloud)
    job_id = f"far-{uuid.uuid4().hex[:8]}"
    name = defer(timer, delivery(job_id, datetime.now(UTC) + timedelta(days=90)))
    client = tasks_client(load_settings(), access_credentials(load_settings()))
    task = client.get_task(name=name)
    ahead = task.schedule_time.timestamp() - datetime.now(UTC).timestamp()
    assert 29 * 86400 < ahead < 30 * 86400


def test_cloud_tasks_away_keeps_the_job_with_a_transient_error(local_cloud: LocalCloud) -> None:
    timer = deferrer(local_cloud)
    local_cloud.set_down("tasks", True)
    try:
        with pytest.raises(TransientJobError) as err:
            defer(timer, delivery(f"down-{uuid.uuid4().hex[:8]}", datetime.now(UTC) + timedelta(hours=1)))
    finally:
        local_cloud.set_down("tasks", False)
    assert err.value.code == "delay_unavailable" and "kept and retried" in err.value.message


def test_a_refusal_names_the_roles_and_a_missing_account_the_variable(local_cloud: LocalCloud) -> None:
    timer = deferrer(local_cloud, queue="no-such-queue")
    with pytest.raises(TransientJobError) as err:
        defer(timer, delivery("refused-1", datetime.now(UTC) + timedelta(hours=1)))
    assert err.value.code == "delay_refused"
    assert "roles/cloudtasks.enqueuer" in err.value.message and "worker setup" in err.value.message
    timer = deferrer(local_cloud)
    timer.service_account = None
    with pytest.raises(TransientJobError, match="WORKER_DELAY_SERVICE_ACCOUNT"):
        defer(timer, delivery("no-sa-1", datetime.now(UTC) + timedelta(hours=1)))


def test_the_task_is_google_cloud_tasks_own_message(local_cloud: LocalCloud) -> None:
    # What the deferrer sends is a real tasks_v2.Task (read back FULL): no stand-in types.
    timer = deferrer(local_cloud)
    name = defer(timer, delivery(f"t-{uuid.uuid4().hex[:8]}", datetime.now(UTC) + timedelta(hours=1)))
    client: Any = tasks_client(load_settings(), access_credentials(load_settings()))
    task = client.get_task(request={"name": name, "response_view": tasks_v2.Task.View.FULL})
    assert task.http_request.http_method == tasks_v2.HttpMethod.POST
    assert task.http_request.headers["Content-Type"] == "application/json"
