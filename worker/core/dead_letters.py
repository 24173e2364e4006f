"""The attributes of a dead letter: written by the pipeline, read by operators' tools.

A dead letter's data is the original job's bytes, so it can be replayed as it was;
its attributes say why it died (docs/contract.md, "Dead letter"). The worker writes
them when a job fails for good (`for_failure`, then `to_attributes`); `worker
dead-letters` and `worker replay` read them back (`from_attributes`). Pub/Sub writes
only its own `CloudPubSubDeadLetterSource*` attributes when it dead-letters a job no
worker finished; `from_attributes` reads those too.

Reading never fails: a dead letter is whatever arrived on the topic, so a missing or
malformed value reads as None.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from worker.core.errors import JobError
from worker.core.lanes import BATCH, LANE_ATTRIBUTE, current_lane
from worker.core.messages import Result, clip
from worker.core.shapes import DeadLetter, Delivery

# Attributes of the original message that travel with its dead letter (Pub/Sub allows
# 100 attributes of 1 KiB; a hostile message must not make the dead letter unpublishable).
CARRIED = ("job_id", "kind", "replay_count", "traceparent")
# Pub/Sub adds attributes with this prefix when *it* dead-letters a message.
PUBSUB_SOURCE_PREFIX = "CloudPubSubDeadLetterSource"


@dataclass(frozen=True)
class DeadLetterAttributes:
    """Why a job was dead-lettered, and which job it was."""

    status: str | None = None  # the result's status: failed or rejected
    error_code: str | None = None
    error_message: str | None = None
    attempts: int | None = None  # calls made to the function (the result's attempts)
    delivery_attempt: int | None = None  # Pub/Sub's delivery attempt that gave up
    dead_lettered_at: datetime | None = None
    job_id: str | None = None
    kind: str | None = None
    replay_count: int | None = None  # times operators replayed it (`worker replay`)
    traceparent: str | None = None
    lane: str | None = None  # "batch" when the job came down the batch lane
    # Set when Pub/Sub dead-lettered it (delivery attempts exhausted, no worker result).
    by_pubsub: bool = False
    pubsub_subscription: str | None = None
    pubsub_delivery_count: int | None = None

    @classmethod
    def for_failure(
        cls, original: Mapping[str, str], result: Result, error: JobError, delivery_attempt: int | None
    ) -> DeadLetterAttributes:
        """The worker's dead letter for a job that failed for good with `result`; the
        original message's job_id, kind, replay_count and traceparent travel with it."""
        carried = {key: original[key] for key in CARRIED if original.get(key)}
        return cls(
            status=result.status.value,
            error_code=error.code,
            error_message=error.message,
            attempts=result.attempts,
            delivery_attempt=delivery_attempt or 1,
            dead_lettered_at=result.finished_at,
            job_id=carried.get("job_id") or result.job_id,
            kind=carried.get("kind") or result.kind,
            replay_count=_int(carried.get("replay_count")),
            traceparent=carried.get("traceparent"),
            # The lane of the consumer that ran it: a replay goes back down the same one.
            lane=BATCH if current_lane() == BATCH else None,
        )

    def to_attributes(self) -> dict[str, str]:
        """Pub/Sub attributes: text values, each cut to fit Pub/Sub's 1 KiB; None left out."""
        values = {
            "job_id": self.job_id,
            "kind": self.kind,
            "replay_count": None if self.replay_count is None else str(self.replay_count),
            "traceparent": self.traceparent,
            LANE_ATTRIBUTE: self.lane,
            "status": self.status,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "attempts": None if self.attempts is None else str(self.attempts),
            "delivery_attempt": None if self.delivery_attempt is None else str(self.delivery_attempt),
            "dead_lettered_at": self.dead_lettered_at.isoformat() if self.dead_lettered_at else None,
        }
        return {key: clip(value) for key, value in values.items() if value is not None}

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, str]) -> DeadLetterAttributes:
        """Read a dead letter's attributes, the worker's or Pub/Sub's; never raises."""
        get = attributes.get
        return cls(
            status=get("status"),
            error_code=get("error_code"),
            error_message=get("error_message"),
            attempts=_int(get("attempts")),
            delivery_attempt=_int(get("delivery_attempt")),
            dead_lettered_at=_time(get("dead_lettered_at")),
            job_id=get("job_id") or None,
            kind=get("kind") or None,
            replay_count=_int(get("replay_count")),
            traceparent=get("traceparent"),
            lane=get(LANE_ATTRIBUTE) or None,
            by_pubsub="error_code" not in attributes
            and any(key.startswith(PUBSUB_SOURCE_PREFIX) for key in attributes),
            pubsub_subscription=get(f"{PUBSUB_SOURCE_PREFIX}Subscription"),
            pubsub_delivery_count=_int(get(f"{PUBSUB_SOURCE_PREFIX}DeliveryCount")),
        )


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def dead_letter_for(delivery: Delivery, result: Result, error: JobError) -> DeadLetter:
    """The dead letter of a job that failed for good: its original bytes, and why."""
    why = DeadLetterAttributes.for_failure(delivery.attributes, result, error, delivery.delivery_attempt)
    return DeadLetter(data=delivery.data, attributes=why.to_attributes())
