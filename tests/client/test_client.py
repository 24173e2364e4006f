"""`worker.client`: the web app publishes jobs and reads each job's result once."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from google.cloud import pubsub_v1

from tests.e2e.harness import drain, provision
from worker.client import ResultsReader, SeenResults, build_job, enqueue
from worker.core.catalog import Catalog, JobKind
from worker.core.errors import InvalidJobError
from worker.core.messages import ExecutionInfo, JobStatus, Result, decode_job
from worker.core.settings import Settings, load_settings

CATALOG = Catalog(
    {
        "account-scoring": JobKind(
            kind="account-scoring",
            service="account-scoring",
            payload_schema={"type": "object", "required": ["account_id"]},
        )
    }
)


def result(job_id: str | None, status: JobStatus = JobStatus.SUCCEEDED, **fields: Any) -> Result:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return Result(
        job_id=job_id,
        kind="account-scoring",
        status=status,
        started_at=at,
        finished_at=at,
        duration_ms=0,
        **fields,
    )


def test_build_job_refuses_what_the_worker_would_reject() -> None:
    with pytest.raises(InvalidJobError, match="job_id"):
        build_job("account-scoring", {"account_id": "a"}, "has spaces")
    with pytest.raises(InvalidJobError, match="unknown kind 'nope'; known kinds: account-scoring"):
        build_job("nope", {}, catalog=CATALOG)
    with pytest.raises(InvalidJobError, match="'account_id' is a required property"):
        build_job("account-scoring", {"employees": 3}, catalog=CATALOG)
    job = build_job("account-scoring", {"account_id": "a"}, catalog=CATALOG)
    assert len(job.job_id) == 36 and job.created_at is not None


def test_seen_results_drop_redeliveries_but_let_a_replayed_success_through() -> None:
    seen = SeenResults(capacity=2)
    first = result("j1", JobStatus.FAILED)
    assert seen.is_new(first)
    seen.add(first)
    assert not seen.is_new(result("j1", JobStatus.FAILED))
    success = result("j1", JobStatus.SUCCEEDED)
    assert seen.is_new(success)  # the job was replayed and now succeeded
    seen.add(success)
    assert not seen.is_new(result("j1", JobStatus.FAILED))  # succeeded is final
    assert seen.is_new(result(None, JobStatus.REJECTED))  # no id: nothing to match
    seen.add(result("j2"))
    seen.add(result("j3"))
    assert seen.is_new(result("j1"))  # the oldest id was forgotten: the set is bounded


@pytest.fixture
def topics(pubsub_emulator: Any, names: Any) -> Settings:
    env = {"GOOGLE_CLOUD_PROJECT": pubsub_emulator.project, **names.env}
    provision(env)
    return load_settings(**env)


@pytest.mark.e2e
def test_enqueue_publishes_a_job_the_worker_accepts(topics: Settings) -> None:
    job_id = enqueue("account-scoring", {"account_id": "acct-1"}, settings=topics, catalog=CATALOG)
    env = {"GOOGLE_CLOUD_PROJECT": topics.project, "WORKER_JOBS_SUBSCRIPTION": topics.jobs_subscription}
    [message] = drain(env, "WORKER_JOBS_SUBSCRIPTION", 1, timeout=10)
    assert dict(message.attributes) == {"job_id": job_id, "kind": "account-scoring"}
    job = decode_job(message.data, dict(message.attributes), max_bytes=1_000_000)
    assert (job.job_id, job.payload) == (job_id, {"account_id": "acct-1"})


@pytest.mark.e2e
def test_reader_yields_each_result_once_when_pubsub_delivers_it_twice(topics: Settings) -> None:
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(topics.project, topics.results_topic)
    for sent in (result("dup-1"), result("dup-1"), result("other-1", JobStatus.FAILED)):
        publisher.publish(topic, sent.to_bytes(), **sent.attributes()).result(30)
    publisher.publish(topic, b"not a result").result(30)

    reader = ResultsReader(settings=topics, pull_timeout_s=1.0)
    got: list[Result] = []
    deadline = time.monotonic() + 20
    while reader.duplicates < 1 or len(got) < 2:
        assert time.monotonic() < deadline, f"got {got}, duplicates {reader.duplicates}"
        got.extend(reader.poll())
    assert sorted((r.job_id, r.status) for r in got) == [
        ("dup-1", JobStatus.SUCCEEDED),
        ("other-1", JobStatus.FAILED),
    ]
    assert reader.duplicates == 1
    # Everything was acked, the duplicate and the unreadable message too.
    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(topics.project, topics.results_subscription)
    assert not subscriber.pull(subscription=path, max_messages=10, timeout=1).received_messages


@pytest.mark.e2e
def test_reader_acks_a_result_only_once_the_loop_moves_past_it(topics: Settings) -> None:
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(topics.project, topics.results_topic)
    for job_id in ("first", "second"):
        sent = result(job_id)
        publisher.publish(topic, sent.to_bytes(), **sent.attributes()).result(30)
    reader = ResultsReader(settings=topics, pull_timeout_s=1.0)
    taken: list[str | None] = []
    deadline = time.monotonic() + 20
    while not taken:
        assert time.monotonic() < deadline
        for got in reader.poll():
            taken.append(got.job_id)
            break  # the web app stopped after one result (a crash, a shutdown)
    env = {"GOOGLE_CLOUD_PROJECT": topics.project, "SUB": topics.results_subscription}
    left = {json.loads(m.data)["job_id"] for m in drain(env, "SUB", 2, timeout=5)}
    # Leaving the loop inside a result's body cannot prove it was stored, so it is
    # given back with the rest, at once (not after the lease): at-least-once, never lost.
    assert taken == ["first"] or taken == ["second"]
    assert left == {"first", "second"}


def test_running_is_replaced_by_its_executions_end_and_a_late_running_is_a_duplicate() -> None:
    seen = SeenResults()
    first = ExecutionInfo(name="projects/p/locations/r/jobs/j/executions/j-1")
    replay = ExecutionInfo(name="projects/p/locations/r/jobs/j/executions/j-2")
    for update, new in [
        (result("j", JobStatus.RUNNING, execution=first), True),
        (result("j", JobStatus.RUNNING, execution=first), False),  # Pub/Sub's duplicate
        (result("j", JobStatus.FAILED, execution=first), True),
        (result("j", JobStatus.RUNNING, execution=first), False),  # late: that execution ended
        (result("j", JobStatus.RUNNING, execution=replay), True),  # the replay's execution
        (result("j", JobStatus.SUCCEEDED, execution=replay), True),
        (result("j", JobStatus.RUNNING, execution=replay), False),
    ]:
        assert seen.is_new(update) is new, update.status
        if new:
            seen.add(update)
