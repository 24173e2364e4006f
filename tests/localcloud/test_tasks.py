"""The local cloud's Cloud Tasks, through google-cloud-tasks unmodified (REST transport, whose
errors are the HTTP classes: Forbidden, Conflict, BadRequest, NotFound):
queues, named tasks (deduplication, tombstones), deletion, listing, IAM, and dispatch at
`schedule_time` to the Pub/Sub emulator's REST publish with the task's OAuth token."""

from __future__ import annotations

import base64
import itertools
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import google.auth
import pytest
from google.api_core import exceptions
from google.cloud import pubsub_v1, tasks_v2
from google.oauth2 import service_account
from google.protobuf import timestamp_pb2
from localcloud.cloud import DELAY_QUEUE
from localcloud.ports import free_port

from localcloud import LocalCloud

CLOUD_PLATFORM = ["https://www.googleapis.com/auth/cloud-platform"]


def tasks_client(cloud: LocalCloud, credentials: Any = None) -> tasks_v2.CloudTasksClient:
    if credentials is None:
        credentials, _ = google.auth.default(scopes=CLOUD_PLATFORM)
    return tasks_v2.CloudTasksClient(
        transport="rest", credentials=credentials, client_options={"api_endpoint": cloud.tasks_api_endpoint}
    )


def at(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + timedelta(seconds=seconds))
    return stamp


def publish_task(
    name: str, url: str, data: bytes, email: str, *, seconds: float, attributes: dict[str, str] | None = None
) -> tasks_v2.Task:
    body = {"messages": [{"data": base64.b64encode(data).decode(), "attributes": attributes or {}}]}
    return tasks_v2.Task(
        name=name,
        schedule_time=at(seconds),
        http_request=tasks_v2.HttpRequest(
            url=url,
            http_method=tasks_v2.HttpMethod.POST,
            headers={"Content-Type": "application/json"},
            body=json.dumps(body).encode(),
            oauth_token=tasks_v2.OAuthToken(service_account_email=email, scope=CLOUD_PLATFORM[0]),
        ),
    )


def queue_path(cloud: LocalCloud) -> str:
    return f"projects/{cloud.project}/locations/{cloud.region}/queues/{DELAY_QUEUE}"


def test_queue_is_read_and_created_and_an_unknown_one_is_not_found(local_cloud: LocalCloud) -> None:
    client = tasks_client(local_cloud)
    queue = client.get_queue(name=queue_path(local_cloud))
    assert queue.state == tasks_v2.Queue.State.RUNNING
    assert queue.retry_config.max_attempts == 100
    # As on Google: a queue one holds no role on, existing or not, is refused...
    with pytest.raises(exceptions.Forbidden, match="may not exist"):
        client.get_queue(name=queue_path(local_cloud) + "-missing")
    # Creating a queue needs cloudtasks.queues.create on the project: the worker has it not.
    parent = f"projects/{local_cloud.project}/locations/{local_cloud.region}"
    new = tasks_v2.Queue(name=f"{parent}/queues/q-{uuid.uuid4().hex[:8]}")
    with pytest.raises(exceptions.Forbidden):
        client.create_queue(parent=parent, queue=new)
    member = f"serviceAccount:{local_cloud.worker_email}"
    local_cloud.iam.grant(member, "roles/cloudtasks.queueAdmin", local_cloud.iam.project_resource)
    try:
        # ...and with a role on the project, a missing one is not found.
        with pytest.raises(exceptions.NotFound):
            client.get_queue(name=queue_path(local_cloud) + "-missing")
        created = client.create_queue(parent=parent, queue=new)
        assert created.name == new.name
        with pytest.raises(exceptions.Conflict):
            client.create_queue(parent=parent, queue=new)
    finally:
        local_cloud.iam.revoke(member, "roles/cloudtasks.queueAdmin", local_cloud.iam.project_resource)


def test_a_named_task_is_created_once_listed_read_deleted_and_its_name_stays_taken(
    local_cloud: LocalCloud,
) -> None:
    client = tasks_client(local_cloud)
    name = f"{queue_path(local_cloud)}/tasks/t-{uuid.uuid4().hex}"
    task = publish_task(name, "http://127.0.0.1:9/never", b"{}", local_cloud.worker_email, seconds=3600)
    created = client.create_task(parent=queue_path(local_cloud), task=task)
    assert created.name == name
    assert abs(created.schedule_time.timestamp() - (time.time() + 3600)) < 5
    with pytest.raises(exceptions.Conflict):
        client.create_task(parent=queue_path(local_cloud), task=task)
    full = client.get_task(request={"name": name, "response_view": tasks_v2.Task.View.FULL})
    assert json.loads(full.http_request.body)["messages"][0]["data"] == base64.b64encode(b"{}").decode()
    assert full.http_request.oauth_token.service_account_email == local_cloud.worker_email
    assert name in [t.name for t in client.list_tasks(parent=queue_path(local_cloud))]
    client.delete_task(name=name)
    with pytest.raises(exceptions.NotFound):
        client.get_task(name=name)
    with pytest.raises(exceptions.NotFound):
        client.delete_task(name=name)
    # Deleted, the name is a tombstone: the same task cannot be made again (deduplication).
    with pytest.raises(exceptions.Conflict):
        client.create_task(parent=queue_path(local_cloud), task=task)


def test_bad_tasks_are_refused_naming_what_is_wrong(local_cloud: LocalCloud) -> None:
    client = tasks_client(local_cloud)
    parent = queue_path(local_cloud)
    email = local_cloud.worker_email
    with pytest.raises(exceptions.BadRequest, match="too far in the future"):
        client.create_task(
            parent=parent, task=publish_task("", "http://127.0.0.1:9/", b"", email, seconds=31 * 86400)
        )
    with pytest.raises(exceptions.BadRequest, match="TASK_ID"):
        client.create_task(
            parent=parent,
            task=publish_task(parent + "/tasks/a.b", "http://127.0.0.1:9/", b"", email, seconds=1),
        )


def test_naming_an_account_needs_act_as_on_it(local_cloud: LocalCloud, tmp_path: Any) -> None:
    email = f"other-{uuid.uuid4().hex[:6]}@local-project.iam.gserviceaccount.com"
    key = local_cloud.create_service_account_key(tmp_path / "key.json", email)
    creds = service_account.Credentials.from_service_account_file(str(key), scopes=CLOUD_PLATFORM)
    client = tasks_client(local_cloud, creds)
    parent = queue_path(local_cloud)
    task = publish_task("", "http://127.0.0.1:9/", b"", local_cloud.worker_email, seconds=60)
    with pytest.raises(exceptions.Forbidden, match=r"cloudtasks\.tasks\.create"):
        client.create_task(parent=parent, task=task)
    local_cloud.iam.grant(
        f"serviceAccount:{email}", "roles/cloudtasks.enqueuer", f"cloudtasks.queue:{DELAY_QUEUE}"
    )
    with pytest.raises(exceptions.Forbidden, match="actAs"):
        client.create_task(parent=parent, task=task)


def test_a_failing_task_is_retried_with_backoff_until_its_attempts_run_out(local_cloud: LocalCloud) -> None:
    queue_id = f"retry-{uuid.uuid4().hex[:8]}"
    local_cloud.add_queue(queue_id, max_attempts=3, min_backoff_s=0.2, max_backoff_s=1.0)
    parent = f"projects/{local_cloud.project}/locations/{local_cloud.region}/queues/{queue_id}"
    name = f"{parent}/tasks/fails"
    dead = f"http://127.0.0.1:{free_port()}/refused"
    tasks_client(local_cloud).create_task(
        parent=parent, task=publish_task(name, dead, b"{}", local_cloud.worker_email, seconds=0)
    )
    deadline = time.time() + 10
    while time.time() < deadline and name in local_cloud.tasks.tasks:
        time.sleep(0.1)
    tries = [d for d in local_cloud.tasks.dispatches if d.task == name]
    assert [d.attempt for d in tries] == [1, 2, 3]
    assert all(d.status == 0 for d in tries)
    gaps = [b.at - a.at for a, b in itertools.pairwise(tries)]
    assert gaps[0] >= 0.19 and gaps[1] >= 0.39  # 0.2 s, doubled
    assert name not in local_cloud.tasks.tasks


@pytest.mark.e2e
def test_a_task_publishes_to_the_emulator_at_its_schedule_time_with_its_oauth_token(
    local_cloud: LocalCloud, pubsub_emulator: Any
) -> None:
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    suffix = uuid.uuid4().hex[:8]
    topic = publisher.topic_path(local_cloud.project, f"tasks-{suffix}")
    subscription = subscriber.subscription_path(local_cloud.project, f"tasks-{suffix}")
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic)
    url = f"http://{pubsub_emulator.host}/v1/{topic}:publish"
    minted = local_cloud.access_tokens_minted
    due = time.time() + 2.0
    tasks_client(local_cloud).create_task(
        parent=queue_path(local_cloud),
        task=publish_task(
            f"{queue_path(local_cloud)}/tasks/p-{suffix}",
            url,
            b'{"hello": 1}',
            local_cloud.worker_email,
            seconds=2.0,
            attributes={"scheduled": "1"},
        ),
    )
    received = None
    while received is None and time.time() < due + 10:
        response = subscriber.pull(subscription=subscription, max_messages=1, timeout=5)
        if response.received_messages:
            received = response.received_messages[0]
    assert received is not None
    arrived = time.time()
    assert due - 0.05 <= arrived <= due + 2.0
    assert received.message.data == b'{"hello": 1}'
    assert received.message.attributes["scheduled"] == "1"
    assert local_cloud.access_tokens_minted > minted  # the task's OAuth token
    assert [d.status for d in local_cloud.tasks.dispatches if d.task.endswith(f"p-{suffix}")] == [200]
