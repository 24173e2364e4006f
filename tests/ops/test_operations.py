"""Operators' tools over the dead-letter subscription, on the Pub/Sub stand-in: listing
consumes nothing; replay republishes the original bytes and acks a dead letter only once
its republish resolved. End to end on the emulator: tests/e2e/test_operators.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from tests.pubsub_stub import StubPubSub
from worker.core.dead_letters import DeadLetterAttributes
from worker.ops.operations import list_dead_letters, replay_dead_letters

DEAD_LETTERS = "projects/p/subscriptions/jobs-dead-letter-ops"
JOBS = "projects/p/topics/jobs"
DAY = datetime(2026, 3, 1, tzinfo=UTC)


def dead_letter(
    pubsub: StubPubSub,
    job_id: str,
    kind: str = "account-scoring",
    *,
    hours: int = 0,
    replays: int | None = None,
) -> str:
    data = json.dumps({"job_id": job_id, "kind": kind, "payload": {}}).encode()
    why = DeadLetterAttributes(
        status="failed",
        error_code="http_503",
        error_message="answered 503",
        attempts=4,
        delivery_attempt=5,
        dead_lettered_at=DAY + timedelta(hours=hours),
        job_id=job_id,
        kind=kind,
        replay_count=replays,
    )
    return pubsub.subscriber.queue(DEAD_LETTERS, data, why.to_attributes())


def acked(pubsub: StubPubSub) -> list[str]:
    return [e.key for e in pubsub.events if e.what == "ack"]


def test_listing_consumes_nothing_and_shows_the_oldest_first() -> None:
    pubsub = StubPubSub()
    dead_letter(pubsub, "late", hours=5)
    dead_letter(pubsub, "early", hours=1)
    by_pubsub = {
        "CloudPubSubDeadLetterSourceDeliveryCount": "5",
        "CloudPubSubDeadLetterSourceSubscription": "jobs-worker",
    }
    pubsub.subscriber.queue(DEAD_LETTERS, b'{"job_id": "gave-up"}', by_pubsub, publish_time=DAY)
    entries, more = list_dead_letters(pubsub.subscriber, DEAD_LETTERS, pull_timeout_s=0.1)
    assert [e.job_id for e in entries] == ["gave-up", "early", "late"] and not more
    assert entries[0].by_pubsub and entries[0].attempts == 5
    assert entries[1].error_code == "http_503" and entries[1].attempts == 4
    assert acked(pubsub) == []
    again, _ = list_dead_letters(pubsub.subscriber, DEAD_LETTERS, pull_timeout_s=0.1)
    assert len(again) == 3, "every dead letter was given back"
    first, more = list_dead_letters(pubsub.subscriber, DEAD_LETTERS, limit=2, pull_timeout_s=0.1)
    assert len(first) == 2 and more


def test_replay_republishes_the_original_job_then_acks_and_leaves_the_rest() -> None:
    pubsub = StubPubSub()
    first = dead_letter(pubsub, "a1", replays=1)
    second = dead_letter(pubsub, "a2")
    dead_letter(pubsub, "b1", kind="echo")
    report = replay_dead_letters(
        pubsub.subscriber, pubsub.publisher, DEAD_LETTERS, JOBS, kind="account-scoring", pull_timeout_s=0.1
    )
    assert sorted(e.job_id or "" for e in report.replayed) == ["a1", "a2"] and report.skipped == 1
    republished = {json.loads(e.data)["job_id"]: e for e in pubsub.published(JOBS)}
    assert republished["a1"].attributes == {"replay_count": "2", "job_id": "a1", "kind": "account-scoring"}
    assert republished["a2"].attributes["replay_count"] == "1"
    assert sorted(acked(pubsub)) == sorted([first, second])
    acks = {e.key: pubsub.index(e) for e in pubsub.events if e.what == "ack"}
    for job_id, message_id in (("a1", first), ("a2", second)):
        assert pubsub.index(republished[job_id]) < acks[message_id], "acked before its republish resolved"
    (left,) = pubsub.subscriber.waiting(DEAD_LETTERS)
    assert json.loads(left.data)["job_id"] == "b1"
    entries, _ = list_dead_letters(pubsub.subscriber, DEAD_LETTERS, pull_timeout_s=0.1)
    assert [e.job_id for e in entries] == ["b1"], "the skipped one was given back"


def test_replay_at_a_time_republishes_each_job_with_that_not_before() -> None:
    pubsub = StubPubSub()
    dead_letter(pubsub, "a1")
    pubsub.subscriber.queue(DEAD_LETTERS, b"not json", {"job_id": "junk"})
    at = datetime.now(UTC) + timedelta(hours=3)
    report = replay_dead_letters(
        pubsub.subscriber, pubsub.publisher, DEAD_LETTERS, JOBS, not_before=at, pull_timeout_s=0.1
    )
    (published,) = pubsub.published(JOBS)
    body = json.loads(published.data)
    assert body["job_id"] == "a1" and datetime.fromisoformat(body["not_before"]) == at
    assert [e.job_id for e in report.replayed] == ["a1"]
    ((entry, why),) = report.failed
    assert entry.job_id == "junk" and "not a job object" in why and "without --at/--in" in why
    (left,) = pubsub.subscriber.waiting(DEAD_LETTERS)
    assert left.data == b"not json", "the one that cannot wait stays dead-lettered"


def test_a_failed_republish_leaves_the_dead_letter_in_place() -> None:
    pubsub = StubPubSub()
    dead_letter(pubsub, "a1")
    pubsub.publisher.topic_errors[JOBS] = RuntimeError("jobs topic deleted")
    report = replay_dead_letters(pubsub.subscriber, pubsub.publisher, DEAD_LETTERS, JOBS, pull_timeout_s=0.1)
    ((entry, error),) = report.failed
    assert entry.job_id == "a1" and "republish failed" in error and "stays dead-lettered" in error
    assert report.replayed == [] and acked(pubsub) == []
    entries, _ = list_dead_letters(pubsub.subscriber, DEAD_LETTERS, pull_timeout_s=0.1)
    assert [e.job_id for e in entries] == ["a1"]


def test_a_dry_run_changes_nothing() -> None:
    pubsub = StubPubSub()
    dead_letter(pubsub, "a1")
    dead_letter(pubsub, "a2")
    report = replay_dead_letters(
        pubsub.subscriber, pubsub.publisher, DEAD_LETTERS, JOBS, job_id="a2", dry_run=True, pull_timeout_s=0.1
    )
    assert [e.job_id for e in report.selected] == ["a2"] and report.skipped == 1
    assert pubsub.published(JOBS) == [] and acked(pubsub) == []
    assert len(list_dead_letters(pubsub.subscriber, DEAD_LETTERS, pull_timeout_s=0.1)[0]) == 2
