"""RunJobs with google-cloud-run's own JobsClient/ExecutionsClient over REST, on the local Admin API.

No Pub/Sub here: deliveries are built by hand, outcomes read directly. The e2e test
(tests/e2e/test_run_jobs.py) runs the same code under `worker run`.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
from typing import Any

import pytest

from worker.core.catalog import Catalog, JobKind
from worker.core.errors import InvalidJobError, PermanentJobError
from worker.core.followup import FollowUp, is_follow_up
from worker.core.messages import Job, JobStatus, now
from worker.core.runjob import RunJobSpec
from worker.core.settings import Settings
from worker.core.shapes import Delivery, Outcome
from worker.gcp.runjobs import RunJobs
from worker.ops.cancel import CancelError, cancel_job
from worker.runtime.app import access_credentials, run_client


@pytest.fixture
def cloud(local_cloud: Any) -> Any:
    return local_cloud


def clients(cloud: Any) -> tuple[Any, Any]:
    settings = Settings(project=cloud.project, run_api_endpoint=cloud.run_api_endpoint)
    credentials = access_credentials(settings)
    return run_client(settings, credentials, "JobsClient"), run_client(
        settings, credentials, "ExecutionsClient"
    )


def kind(name: str, job: str, **spec: Any) -> JobKind:
    return JobKind(kind=name, handler="run_job", run_job=RunJobSpec(job=job, poll_initial_s=1, **spec))


def build(cloud: Any, *kinds: JobKind) -> tuple[RunJobs, Any]:
    jobs_client, executions_client = clients(cloud)
    catalog = Catalog({k.kind: k for k in kinds})
    return RunJobs(
        jobs_client, executions_client, catalog, cloud.project, region=cloud.region
    ), executions_client


def delivery(job: Job, replay: int = 0) -> Delivery:
    attributes = {"job_id": job.job_id, "kind": job.kind}
    if replay:
        attributes["replay_count"] = str(replay)
    return Delivery(job.to_bytes(), attributes, publish_time=now())


def start(runner: RunJobs, spec: JobKind, job: Job, replay: int = 0) -> Any:
    return asyncio.run(runner.start(job, spec, delivery(job, replay)))


def follow(runner: RunJobs, call_or_outcome: Any) -> Outcome:
    message = call_or_outcome.follow_up
    return asyncio.run(runner.follow(Delivery(message.data, message.attributes, publish_time=now())))


def until_due(runner: RunJobs, call: Any, timeout: float = 10) -> Outcome:
    """Follow the follow-ups (skipping the holds) until one is the final result."""
    outcome = follow(runner, call)
    deadline = time.monotonic() + timeout
    while outcome.result is None:
        assert time.monotonic() < deadline, "the execution never ended"
        assert outcome.hold_s <= 4.0 and outcome.follow_up is not None
        time.sleep(min(outcome.hold_s, 0.5))
        outcome = follow(runner, outcome)
    return outcome


def test_a_start_runs_one_execution_and_a_redelivery_adopts_it(cloud: Any) -> None:
    job = cloud.add_run_job(f"adopt-{time.monotonic_ns()}", task_seconds=0.5)
    spec = kind("rescore", job.name, args=("--account={account_id}",), task_count=2)
    runner, _ = build(cloud, spec)
    message = Job(job_id="a-1", kind="rescore", payload={"account_id": "acme"}, created_at=now())
    first = start(runner, spec, message)
    assert first.status == JobStatus.RUNNING and first.response["started"] is True
    again = start(runner, spec, message)
    assert again.execution.name == first.execution.name and again.response["started"] is False
    assert len(job.executions) == 1
    [execution] = job.executions
    assert execution.containers[0]["args"] == ["--account=acme"] and execution.task_count == 2
    body = FollowUp.model_validate_json(first.follow_up.data)
    assert is_follow_up(first.follow_up.attributes) and json.loads(body.job_data)["job_id"] == "a-1"
    final = until_due(runner, first)
    assert final.result.status == JobStatus.SUCCEEDED and final.dead_letter is None and final.ack
    assert final.result.execution.succeeded_count == 2 and final.result.duration_ms >= 500
    assert final.kind == "rescore"  # the metrics count it under its kind, not "unknown"


def test_a_failed_execution_is_dead_lettered_and_only_a_replay_starts_another(cloud: Any) -> None:
    job = cloud.add_run_job(f"replay-{time.monotonic_ns()}", task_seconds=0.2)
    job.failing_tasks = 1
    spec = kind("fragile", job.name)
    runner, _ = build(cloud, spec)
    message = Job(job_id="f-1", kind="fragile", created_at=now())
    failed = until_due(runner, start(runner, spec, message))
    assert failed.result.status == JobStatus.FAILED and failed.result.error.code == "execution_failed"
    assert failed.dead_letter.data == message.to_bytes()
    assert failed.dead_letter.attributes["replay_count"] == "0"
    assert start(runner, spec, message).response["started"] is False  # a redelivery: no second one
    job.failing_tasks = 0
    replayed = start(runner, spec, message, replay=1)
    assert replayed.response["started"] is True
    assert start(runner, spec, message, replay=1).execution.name == replayed.execution.name
    assert until_due(runner, replayed).result.status == JobStatus.SUCCEEDED
    assert start(runner, spec, message, replay=2).response["started"] is False  # it succeeded
    assert len(job.executions) == 2


class LateLister:
    """ExecutionsClient whose first listing misses everything, as when another worker's
    RunJob for the same message lands between our look and our start."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.listings = 0

    def list_executions(self, **kw: Any) -> Any:
        self.listings += 1
        return [] if self.listings == 1 else self._client.list_executions(**kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_two_workers_racing_on_one_message_keep_the_oldest_execution(cloud: Any) -> None:
    job = cloud.add_run_job(f"race-{time.monotonic_ns()}", task_seconds=5)
    spec = kind("race", job.name)
    runner, executions_client = build(cloud, spec)
    message = Job(job_id="r-1", kind="race", created_at=now())
    rival = start(runner, spec, message)  # the other worker's
    late = RunJobs(
        runner._jobs, LateLister(executions_client), runner._catalog, cloud.project, region=cloud.region
    )
    mine = asyncio.run(late.start(message, spec, delivery(message)))
    assert mine.execution.name == rival.execution.name and mine.response["started"] is False
    assert len(job.executions) == 2 and job.executions[1].cancelled_at is not None


@pytest.mark.parametrize("case", ["missing", "forbidden"])
def test_a_missing_job_or_a_refused_run_fails_naming_it(cloud: Any, case: str) -> None:
    name = f"{case}-{time.monotonic_ns()}"
    if case == "forbidden":
        cloud.add_run_job(name, executors=[])
    spec = kind("k", name)
    runner, _ = build(cloud, spec)
    with pytest.raises(PermanentJobError) as caught:
        start(runner, spec, Job(job_id="x", kind="k"))
    if case == "missing":
        # The worker holds roles on its own jobs only, so Cloud Run answers 403 for a job
        # that does not exist, as for one it may not read: the message names both.
        assert caught.value.code == "permission_denied" and f"'{name}'" in caught.value.message
        assert "or it does not exist" in caught.value.message
        assert "gcloud run jobs list" in caught.value.message
    else:
        assert caught.value.code == "permission_denied"
        assert "roles/run.jobsExecutorWithOverrides" in caught.value.message
        assert f"gcloud run jobs add-iam-policy-binding {name}" in caught.value.message


def test_run_permission_without_overrides_is_not_enough(cloud: Any) -> None:
    name = f"invoker-{time.monotonic_ns()}"
    job = cloud.add_run_job(name, executor_role="roles/run.invoker")
    spec = kind("k", name)
    runner, _ = build(cloud, spec)
    with pytest.raises(PermanentJobError, match="runWithOverrides"):
        start(runner, spec, Job(job_id="x", kind="k"))
    assert job.executions == []


def test_an_unfit_payload_is_rejected_before_the_admin_api_is_asked(cloud: Any) -> None:
    spec = kind("k", "never-called", args=("{account_id}",))
    runner, _ = build(cloud, spec)
    before = cloud.admin_api_calls[("ListExecutions", "never-called")]
    with pytest.raises(InvalidJobError, match="missing field"):
        start(runner, spec, Job(job_id="x", kind="k", payload={}))
    assert cloud.admin_api_calls[("ListExecutions", "never-called")] == before


def test_a_follow_up_not_due_is_republished_after_a_short_hold_without_asking_the_api(cloud: Any) -> None:
    job = cloud.add_run_job(f"slow-{time.monotonic_ns()}", task_seconds=60)
    spec = kind("slow", job.name)
    runner, _ = build(cloud, spec)
    call = start(runner, spec, Job(job_id="s-1", kind="slow"))
    body = FollowUp.model_validate_json(call.follow_up.data)
    early = body.model_copy(update={"check_at": now() + timedelta(seconds=30)})
    calls = cloud.admin_api_calls[("GetExecution", call.execution.name.rsplit("/", 1)[1])]
    outcome = asyncio.run(runner.follow(Delivery(early.to_bytes(), early.attributes())))
    assert outcome.ack and outcome.result is None and outcome.hold_s == 4.0
    assert outcome.follow_up.data == early.to_bytes()
    assert cloud.admin_api_calls[("GetExecution", call.execution.name.rsplit("/", 1)[1])] == calls
    due = body.model_copy(update={"check_at": now()})
    checked = asyncio.run(runner.follow(Delivery(due.to_bytes(), due.attributes())))
    later = FollowUp.model_validate_json(checked.follow_up.data)
    assert checked.result is None and later.interval_s == 2 and later.checks == 1


@pytest.mark.parametrize(
    "change",
    [{"execution": "projects/p/locations/r/jobs/other/executions/x"}, {"kind": "unknown"}],
)
def test_a_forged_follow_up_is_rejected_not_acted_on(cloud: Any, change: dict[str, str]) -> None:
    job = cloud.add_run_job(f"forged-{time.monotonic_ns()}", task_seconds=60)
    spec = kind("forged", job.name)
    runner, _ = build(cloud, spec)
    body = FollowUp.model_validate_json(start(runner, spec, Job(job_id="g", kind="forged")).follow_up.data)
    forged = body.model_copy(update=change)
    outcome = asyncio.run(runner.follow(Delivery(forged.to_bytes(), forged.attributes())))
    assert outcome.result.status == JobStatus.REJECTED and outcome.dead_letter is not None


def test_cancel_finds_the_running_execution_by_job_id(cloud: Any) -> None:
    job = cloud.add_run_job(f"cancel-{time.monotonic_ns()}", task_seconds=60)
    spec = kind("long", job.name)
    runner, executions_client = build(cloud, spec)
    call = start(runner, spec, Job(job_id="c-1", kind="long"))
    report = cancel_job(executions_client, runner._catalog, cloud.project, cloud.region, "c-1", wait_s=5)
    [(_, execution)] = report.cancelled
    assert execution.name == call.execution.name and execution.cancelled_count == 1
    assert until_due(runner, call).result.status == JobStatus.CANCELLED
    with pytest.raises(CancelError, match="has no running execution; its executions have ended"):
        cancel_job(executions_client, runner._catalog, cloud.project, cloud.region, "c-1")
    with pytest.raises(CancelError, match="none was started"):
        cancel_job(executions_client, runner._catalog, cloud.project, cloud.region, "never")


def test_a_follow_up_pubsub_dead_lettered_is_replayed_as_a_follow_up() -> None:
    from worker.ops.operations import DeadLetterEntry

    attributes = {
        "job_id": "j",
        "kind": "k",
        "follow_up": "execution",
        "replay_count": "0",
        "CloudPubSubDeadLetterSourceDeliveryCount": "5",
    }
    entry = DeadLetterEntry(
        ack_id="a",
        message_id="m",
        data=b"{}",
        attributes=attributes,
        job_id="j",
        kind="k",
        status="dead-lettered by Pub/Sub",
        error_code=None,
        error_message="",
        attempts=5,
        dead_lettered_at=None,
        replay_count=0,
        by_pubsub=True,
    )
    assert is_follow_up(entry.replay_attributes())


def test_a_worker_that_may_not_list_executions_is_told_to_get_run_viewer(cloud: Any) -> None:
    from localcloud.iam import RUN_VIEWER, member_for

    name = f"unlisted-{time.monotonic_ns()}"
    job = cloud.add_run_job(name)
    spec = kind("k", name)
    runner, _ = build(cloud, spec)
    worker = member_for(cloud.worker_email)
    cloud.iam.revoke(worker, RUN_VIEWER, f"run.job:{name}")
    with pytest.raises(PermanentJobError) as caught:
        start(runner, spec, Job(job_id="x", kind="k"))
    assert (
        "it needs roles/run.viewer" in caught.value.message and "run.executions.list" in caught.value.message
    )
    assert job.executions == []
