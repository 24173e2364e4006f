"""RunJobs with google-cloud-run's own JobsClient/ExecutionsClient over REST, on the local Admin API.

No Pub/Sub here: deliveries are built by hand, outcomes read directly. The e2e test
(tests/e2e/test_run_jobs.py) runs the same code under `worker run`.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
    run_job = RunJobSpec(job=job, poll_initial_s=1, **spec)
    # what the catalog demands: every field the template reads bounded by the schema
    schema = {
        "type": "object",
        "properties": {f: {"type": ["string", "integer"], "maxLength": 200} for f in run_job.fields()},
    }
    return JobKind(kind=name, handler="run_job", run_job=run_job, payload_schema=schema)


def build(cloud: Any, *kinds: JobKind) -> tuple[RunJobs, Any]:
    jobs_client, executions_client = clients(cloud)
    catalog = Catalog({k.kind: k for k in kinds})
    return RunJobs(
        jobs_client, executions_client, catalog, cloud.project, region=cloud.region
    ), executions_client


def delivery(job: Job, replay: int = 0, proof: str | None = None) -> Delivery:
    attributes = {"job_id": job.job_id, "kind": job.kind}
    if replay:
        attributes["replay_count"] = str(replay)
    if proof is not None:
        attributes["replay_of"] = proof
    return Delivery(job.to_bytes(), attributes, publish_time=now())


def start(runner: RunJobs, spec: JobKind, job: Job, replay: int = 0, proof: str | None = None) -> Any:
    return asyncio.run(runner.start(job, spec, delivery(job, replay, proof)))


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
    proof = failed.dead_letter.attributes["replay_of"]
    assert proof == job.executions[0].uid and proof not in failed.result.model_dump_json()
    assert start(runner, spec, message).response["started"] is False  # a redelivery: no second one
    job.failing_tasks = 0
    replayed = start(runner, spec, message, replay=1, proof=proof)
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
    # a failed execution's dead letter names it; the replay passes that on, as its proof
    proved = dataclasses.replace(entry, attributes={**attributes, "replay_of": "u-1"}, by_pubsub=False)
    assert proved.replay_attributes()["replay_of"] == "u-1"
    assert "replay_of" not in entry.replay_attributes()


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


# -- forged follow-ups and replays (issue 24): anyone who may publish a job may publish these.


def forged(body: FollowUp, **change: Any) -> Delivery:
    copy = body.model_copy(update=change)
    return Delivery(copy.to_bytes(), copy.attributes(), publish_time=now())


def test_a_follow_up_naming_another_jobs_execution_does_not_mark_the_victim(cloud: Any) -> None:
    job = cloud.add_run_job(f"victim-{time.monotonic_ns()}", task_seconds=0.2)
    spec = kind("shared", job.name)
    runner, _ = build(cloud, spec)
    mine = until_due(runner, start(runner, spec, Job(job_id="attacker-1", kind="shared")))
    assert mine.result.status == JobStatus.SUCCEEDED
    call = start(runner, spec, Job(job_id="victim-9", kind="shared"))
    victim = FollowUp.model_validate_json(call.follow_up.data)
    # victim-9's follow-up, pointed at attacker-1's succeeded execution
    attack = forged(victim, execution=job.executions[0].name, check_at=now())
    outcome = asyncio.run(runner.follow(attack))
    assert outcome.result.status == JobStatus.REJECTED and outcome.result.error.code == "forged_follow_up"
    assert outcome.result.job_id is None, "its result names no job, so it marks victim-9 nothing"
    assert outcome.dead_letter.attributes["job_id"] == "victim-9"  # operators see the claim
    assert "was not started for job 'victim-9'" in outcome.result.error.message
    # the wrong replay count of the right execution is no better
    again = forged(victim, replay_count=3, check_at=now())
    outcome = asyncio.run(runner.follow(again))
    assert outcome.result.error.code == "forged_follow_up" and "not replay 3" in outcome.result.error.message


@pytest.mark.parametrize(
    "change",
    [
        {"check_at": "9999-12-31T00:00:00Z"},
        {"started_at": "9999-12-31T00:00:00Z"},
        {"interval_s": 1e300},
        {"checks": 10**12},
    ],
)
def test_a_follow_up_that_would_never_come_due_is_refused_at_once(cloud: Any, change: dict[str, Any]) -> None:
    job = cloud.add_run_job(f"never-{time.monotonic_ns()}", task_seconds=60)
    spec = kind("never", job.name)
    runner, _ = build(cloud, spec)
    body = json.loads(start(runner, spec, Job(job_id="n-1", kind="never")).follow_up.data)
    body.update(change)
    attack = Delivery(json.dumps(body).encode(), {"follow_up": "execution"}, publish_time=now())
    outcome = asyncio.run(runner.follow(attack))
    assert outcome.result.status == JobStatus.REJECTED and outcome.follow_up is None
    assert "follow-up refused" in outcome.result.error.message


def test_a_follow_up_too_old_is_reported_failed_not_followed_forever(cloud: Any) -> None:
    from worker.core.followup import MAX_AGE_S

    job = cloud.add_run_job(f"old-{time.monotonic_ns()}", task_seconds=60)
    spec = kind("old", job.name)
    runner, _ = build(cloud, spec)
    body = FollowUp.model_validate_json(start(runner, spec, Job(job_id="o-1", kind="old")).follow_up.data)
    started = now() - timedelta(seconds=MAX_AGE_S + 60)
    outcome = asyncio.run(runner.follow(forged(body, started_at=started, check_at=now())))
    assert outcome.result.status == JobStatus.FAILED and outcome.result.error.code == "follow_up_expired"
    assert outcome.follow_up is None


def test_a_forged_failed_follow_up_plants_no_dead_letter_with_the_attackers_data(cloud: Any) -> None:
    job = cloud.add_run_job(f"plant-{time.monotonic_ns()}", task_seconds=0.2)
    job.failing_tasks = 1
    spec = kind("plant", job.name, args=("--account={account}",))
    runner, _ = build(cloud, spec)
    real = Job(job_id="p-1", kind="plant", payload={"account": "acme"})
    call = start(runner, spec, real)
    assert until_due(runner, call).result.status == JobStatus.FAILED
    body = FollowUp.model_validate_json(call.follow_up.data)
    evil = Job(job_id="p-1", kind="plant", payload={"account": "acme --delete-everything"})
    for change in (
        {"job_data": evil.to_bytes().decode()},  # the right execution, other data
        {"job_data": Job(job_id="other", kind="plant", payload={"account": "x"}).to_bytes().decode()},
        {"job_data": "not json"},
        {"execution": body.execution.rsplit("/", 1)[0] + "/made-up"},  # no such execution
    ):
        outcome = asyncio.run(runner.follow(forged(body, check_at=now(), **change)))
        assert outcome.result.status == JobStatus.REJECTED, change
        letter = outcome.dead_letter
        assert letter.attributes["status"] == "rejected" and "replay_of" not in letter.attributes
        # what is dead-lettered is the forged follow-up itself, not a job: replayed, it is
        # rejected again and never starts an execution
        assert json.loads(letter.data)["execution"]
        with pytest.raises(ValueError):
            Job.model_validate_json(letter.data)


def test_a_publisher_set_replay_count_starts_no_second_execution(cloud: Any) -> None:
    job = cloud.add_run_job(f"rerun-{time.monotonic_ns()}", task_seconds=0.2)
    job.failing_tasks = 1
    spec = kind("rerun", job.name)
    runner, _ = build(cloud, spec)
    message = Job(job_id="r-1", kind="rerun")
    failed = until_due(runner, start(runner, spec, message))
    job.failing_tasks = 0
    for proof in (None, "", "00000000-0000-0000-0000-000000000000", failed.result.execution.name):
        with pytest.raises(InvalidJobError, match="only `worker replay") as caught:
            start(runner, spec, message, replay=1, proof=proof)
        assert caught.value.code == "replay_not_proven"
    assert len(job.executions) == 1
    # a replay count on a job that never ran starts it as any new job would: nothing is re-run
    fresh = start(runner, spec, Job(job_id="r-2", kind="rerun"), replay=7)
    assert fresh.response["started"] is True
