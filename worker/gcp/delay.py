"""Jobs at a time: a job whose `not_before` is ahead waits on Cloud Tasks, not in Pub/Sub.

The job is turned into an HTTP task that calls Pub/Sub's own REST publish
(`POST https://pubsub.googleapis.com/v1/projects/P/topics/T:publish`) at `not_before`
with an OAuth token for `WORKER_DELAY_SERVICE_ACCOUNT`: the message published is the
delivery's bytes, unchanged, and its attributes plus `scheduled` (how many times it
was put off). Then the delivery is acked: no lease is held while it waits, no message
goes round. A worker pool has no ingress, so publishing back onto the jobs topic is
the only way in.

The task's name comes from the job id and the `scheduled` count of the delivery, so a
duplicate delivery names the same task and Cloud Tasks refuses it (AlreadyExists: the
name is taken, also for about an hour after the task ran or was deleted): a job is
put off once. Cloud Tasks holds a task 30 days at most: a job due later is published
earlier, found not yet due, and put off again under the next name.

When Cloud Tasks does not answer or refuses, the job is not lost and not run early:
`TransientJobError`, so the delivery is nacked and comes back.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import structlog
from google.api_core import exceptions

from worker.core.errors import InvalidJobError, TransientJobError
from worker.core.lanes import BATCH, LANE_ATTRIBUTE, current_lane
from worker.core.messages import SCHEDULED_ATTRIBUTE, Job, decode_job, now, times_put_off
from worker.core.shapes import Delivery

log = structlog.get_logger("worker.gcp.delay")

# Cloud Tasks refuses a schedule_time more than 30 days ahead; keep a margin for clocks.
MAX_AHEAD = timedelta(days=30) - timedelta(minutes=10)
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
GOOGLE_PUBSUB_ENDPOINT = "https://pubsub.googleapis.com"
_API_TIMEOUT_S = 20.0


def task_id(job_id: str, hop: int) -> str:
    """A Cloud Tasks task id ([A-Za-z0-9_-]) for the `hop`th putting off of `job_id`.

    A hash prefix spreads names over Cloud Tasks' key space (sequential names are
    slower there); the job id follows, escaped one to one ('_' '_u', '.' '_d', ':' '_c')
    so a person can read it."""
    escaped = job_id.replace("_", "_u").replace(".", "_d").replace(":", "_c")
    return f"{task_prefix(job_id)}{escaped}-{hop}"


def task_prefix(job_id: str) -> str:
    return hashlib.sha256(job_id.encode()).hexdigest()[:8] + "-"


hop_of = times_put_off


def publish_url(endpoint: str, topic_path: str) -> str:
    return f"{endpoint.rstrip('/')}/v1/{topic_path}:publish"


def queue_path(project: str, region: str, queue: str) -> str:
    return f"projects/{project}/locations/{region}/queues/{queue}"


class TaskDeferrer:
    """`Deferrer` (worker/core/shapes.py) on a `tasks_v2.CloudTasksClient` (sync; in a thread)."""

    def __init__(
        self,
        client: Any,
        queue: str,
        topic_path: str,
        *,
        lane_topics: dict[str, str] | None = None,
        service_account: str | None,
        pubsub_endpoint: str = GOOGLE_PUBSUB_ENDPOINT,
        clock: Callable[[], datetime] = now,
    ) -> None:
        self._client = client
        self.queue = queue  # projects/P/locations/L/queues/Q
        self._endpoint = pubsub_endpoint
        self._url = publish_url(pubsub_endpoint, topic_path)
        # Lanes (worker/core/lanes.py): a job comes back on the topic of the lane it was pulled from.
        self._lane_urls = {lane: publish_url(pubsub_endpoint, t) for lane, t in (lane_topics or {}).items()}
        self.service_account = service_account
        self._clock = clock

    async def defer(self, job: Job, delivery: Delivery, at: datetime) -> str:
        from google.cloud import tasks_v2
        from google.protobuf import timestamp_pb2

        if not self.service_account:
            raise TransientJobError(
                "delay_unavailable",
                "no service account to publish scheduled jobs as; set WORKER_DELAY_SERVICE_ACCOUNT",
            )
        hop = hop_of(delivery.attributes) + 1
        name = f"{self.queue}/tasks/{task_id(job.job_id, hop)}"
        when = min(at, self._clock() + MAX_AHEAD)
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(when)
        attributes = {**delivery.attributes, SCHEDULED_ATTRIBUTE: str(hop)}
        lane = current_lane()
        url = self._lane_urls.get(lane, self._url)
        if lane == BATCH:
            attributes[LANE_ATTRIBUTE] = BATCH
        body = {"messages": [{"data": base64.b64encode(delivery.data).decode(), "attributes": attributes}]}
        task = tasks_v2.Task(
            name=name,
            schedule_time=stamp,
            http_request=tasks_v2.HttpRequest(
                url=url,
                http_method=tasks_v2.HttpMethod.POST,
                headers={"Content-Type": "application/json"},
                body=json.dumps(body).encode(),
                oauth_token=tasks_v2.OAuthToken(
                    service_account_email=self.service_account, scope=CLOUD_PLATFORM
                ),
            ),
        )
        try:
            await asyncio.to_thread(
                self._client.create_task, parent=self.queue, task=task, timeout=_API_TIMEOUT_S
            )
        except exceptions.Conflict:
            log.info("job_schedule_duplicate", task=name)  # put off already (a duplicate delivery)
        except exceptions.Forbidden as exc:
            raise TransientJobError(
                "delay_refused",
                f"Cloud Tasks refused to schedule on {self.queue}: {exc.message}; create it with "
                "`worker setup` if it is missing, and grant the worker "
                f"roles/cloudtasks.enqueuer on the queue and roles/iam.serviceAccountUser on "
                f"{self.service_account} (`worker setup --print-gcloud`)",
            ) from None
        except exceptions.NotFound:
            raise TransientJobError(
                "delay_queue_not_found",
                f"Cloud Tasks queue {self.queue} does not exist; create it with `worker setup` "
                "(or set WORKER_DELAY_QUEUE)",
            ) from None
        except Exception as exc:  # unreachable, 5xx, timeouts: keep the job, try again
            raise TransientJobError(
                "delay_unavailable",
                f"Cloud Tasks did not take the task ({type(exc).__name__}: {str(exc)[:200]}); "
                "the job is kept and retried",
            ) from None
        return name


# -- what operators see and do (worker cancel, worker scheduled) -----------------------


def scheduled_tasks(client: Any, queue: str) -> Iterator[tuple[Any, Job | None, dict[str, str]]]:
    """Each task in `queue` with the job it will publish (None if it is not one of ours)."""
    from google.cloud import tasks_v2

    request = {"parent": queue, "response_view": tasks_v2.Task.View.FULL}
    for task in client.list_tasks(request=request, timeout=_API_TIMEOUT_S):
        yield task, *job_of(task)


def job_of(task: Any) -> tuple[Job | None, dict[str, str]]:
    """The job a task publishes, and its attributes, read from the task's body."""
    try:
        message = json.loads(task.http_request.body)["messages"][0]
        attributes = {str(k): str(v) for k, v in (message.get("attributes") or {}).items()}
        return decode_job(base64.b64decode(message["data"]), attributes, max_bytes=10**8), attributes
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, InvalidJobError):
        return None, {}


def find_job_tasks(client: Any, queue: str, job_id: str) -> list[Any]:
    """The tasks of `queue` that will publish job `job_id` (normally one)."""
    prefix = f"{queue}/tasks/{task_prefix(job_id)}"
    return [
        task
        for task, job, _ in scheduled_tasks(client, queue)
        if task.name.startswith(prefix) and job is not None and job.job_id == job_id
    ]
