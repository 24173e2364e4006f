"""The dead-letter attributes: what the pipeline writes is what operators' tools read."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from types import SimpleNamespace

from tests.doubles import Invoker, make, run
from worker.core.dead_letters import DeadLetterAttributes
from worker.core.errors import PermanentJobError
from worker.core.shapes import Delivery
from worker.ops.operations import DeadLetterEntry

JOB = {"job_id": "j1", "kind": "account-scoring", "payload": {"account_id": "a"}}


def received(data: bytes, attributes: dict[str, str]) -> SimpleNamespace:
    """A pulled message, shaped as `pull()`'s ReceivedMessage presents it."""
    published = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    message = SimpleNamespace(data=data, attributes=attributes, message_id="m1", publish_time=published)
    return SimpleNamespace(ack_id="a1", message=message)


def test_what_the_pipeline_writes_the_operators_read() -> None:
    refused = PermanentJobError("http_404", "account-scoring answered 404: no such account")
    pipeline, _, _ = make(Invoker(refused))
    out = run(pipeline, JOB, delivery_attempt=2)
    assert out.dead_letter is not None and out.result is not None
    entry = DeadLetterEntry.from_received(received(out.dead_letter.data, out.dead_letter.attributes))
    assert (entry.job_id, entry.kind, entry.status) == ("j1", "account-scoring", "failed")
    assert entry.error_code == "http_404"
    assert entry.error_message == "account-scoring answered 404: no such account"
    assert entry.dead_lettered_at == out.result.finished_at and not entry.by_pubsub
    assert entry.replay_count == 0 and json.loads(entry.data) == JOB
    why = DeadLetterAttributes.from_attributes(out.dead_letter.attributes)
    assert why.delivery_attempt == 2 and why.attempts == out.result.attempts


def test_the_original_messages_identity_replays_and_trace_travel_with_it() -> None:
    pipeline, _, _ = make(Invoker(PermanentJobError("http_400", "bad")))
    original = {"job_id": "j1", "kind": "account-scoring", "replay_count": "2", "traceparent": "t", "x": "-"}
    out = asyncio.run(pipeline.handle(Delivery(data=json.dumps(JOB).encode(), attributes=original)))
    assert out.dead_letter is not None
    attributes = out.dead_letter.attributes
    assert "x" not in attributes and attributes["replay_count"] == "2" and attributes["traceparent"] == "t"
    assert DeadLetterAttributes.from_attributes(attributes).replay_count == 2


def test_a_round_trip_keeps_every_field_and_clips_long_values() -> None:
    written = DeadLetterAttributes(
        status="rejected",
        error_code="invalid_job",
        error_message="é" * 2000,
        attempts=0,
        delivery_attempt=1,
        dead_lettered_at=datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC),
        job_id="j",
        kind="k",
        replay_count=1,
    )
    attributes = written.to_attributes()
    assert all(isinstance(v, str) and len(v.encode()) <= 1024 for v in attributes.values())
    read = DeadLetterAttributes.from_attributes(attributes)
    assert read.error_message is not None and read.error_message.endswith("...")
    assert read == DeadLetterAttributes(**{**written.__dict__, "error_message": read.error_message})


def test_pubsubs_own_dead_letters_and_junk_read_without_failing() -> None:
    by_pubsub = DeadLetterAttributes.from_attributes(
        {
            "CloudPubSubDeadLetterSourceDeliveryCount": "5",
            "CloudPubSubDeadLetterSourceSubscription": "jobs-worker",
            "job_id": "j",
        }
    )
    assert by_pubsub.by_pubsub and by_pubsub.pubsub_delivery_count == 5
    assert by_pubsub.pubsub_subscription == "jobs-worker" and by_pubsub.job_id == "j"
    junk = DeadLetterAttributes.from_attributes(
        {"attempts": "many", "dead_lettered_at": "yesterday", "replay_count": "x", "job_id": ""}
    )
    assert (junk.attempts, junk.dead_lettered_at, junk.replay_count, junk.job_id) == (None, None, None, None)
    naive = DeadLetterAttributes.from_attributes({"dead_lettered_at": "2026-01-01T00:00:00"})
    assert naive.dead_lettered_at == datetime(2026, 1, 1, tzinfo=UTC)
