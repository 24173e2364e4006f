"""Operators' tools over the dead-letter subscription: look, and replay.

Looking never consumes: messages are pulled with the unary `pull` RPC, their leases
held while the scan runs (so the same message is not pulled twice), then given
back with `modify_ack_deadline(0)`. Replaying republishes a dead letter's original
job bytes to the jobs topic and acks the dead letter only once that publish has
resolved, so a job is never in neither place.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from google.api_core import exceptions
from pydantic import ValidationError

from worker.core.dead_letters import PUBSUB_SOURCE_PREFIX, REPLAY_OF, DeadLetterAttributes
from worker.core.followup import FOLLOW_UP_ATTRIBUTE
from worker.core.lanes import BATCH, INTERACTIVE, LANE_ATTRIBUTE
from worker.core.messages import Job, describe_validation_error, salvage_identity

EXHAUSTED = "delivery attempts exhausted"
_HOLD_S = 600  # lease held on scanned messages, so a long scan never sees one twice
_ACK_CHUNK = 500  # ack ids per modify call, well under the API's limit
_ACK_BATCH = 100  # republished dead letters acked per call: small, so a crash repeats few
_MAX_SCAN = 10_000
_PUBLISH_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DeadLetterEntry:
    """One dead-lettered job as operators see it."""

    ack_id: str
    message_id: str
    data: bytes
    attributes: dict[str, str]
    job_id: str | None
    kind: str | None
    status: str
    error_code: str | None
    error_message: str
    attempts: int | None
    dead_lettered_at: datetime | None
    replay_count: int
    by_pubsub: bool
    # The batch lane's subscription, to tell which lane Pub/Sub forwarded it from.
    batch_subscription: str = "jobs-batch-worker"

    @classmethod
    def from_received(cls, received: Any) -> DeadLetterEntry:
        message = received.message
        attrs = dict(message.attributes)
        data = bytes(message.data)
        why = DeadLetterAttributes.from_attributes(attrs)
        job_id, kind = why.job_id, why.kind
        if not job_id or not kind:
            salvaged_id, salvaged_kind = salvage_identity(data, attrs)
            job_id, kind = job_id or salvaged_id, kind or salvaged_kind
        published = _timestamp(message.publish_time)
        common = {
            "ack_id": received.ack_id,
            "message_id": message.message_id,
            "data": data,
            "attributes": attrs,
            "job_id": job_id,
            "kind": kind,
            "replay_count": why.replay_count or 0,
        }
        if why.by_pubsub:
            source = why.pubsub_subscription or "its subscription"
            deliveries = why.pubsub_delivery_count
            return cls(
                **common,
                status="dead-lettered by Pub/Sub",
                error_code=None,
                error_message=(
                    f"{EXHAUSTED} ({deliveries or '?'} deliveries from {source}): no worker finished "
                    "it; look for crashes or timeouts in the worker's logs around that time"
                ),
                attempts=deliveries,
                dead_lettered_at=published,
                by_pubsub=True,
            )
        return cls(
            **common,
            status=why.status if why.status is not None else "unknown",
            error_code=why.error_code,
            error_message=why.error_message if why.error_message is not None else "no reason recorded",
            attempts=why.attempts,
            dead_lettered_at=why.dead_lettered_at or published,
            by_pubsub=False,
        )

    def age(self, at: datetime) -> timedelta | None:
        return at - self.dead_lettered_at if self.dead_lettered_at else None

    def to_json(self, at: datetime) -> dict[str, Any]:
        age = self.age(at)
        return {
            "message_id": self.message_id,
            "job_id": self.job_id,
            "kind": self.kind,
            "status": self.status,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "attempts": self.attempts,
            "dead_lettered_at": self.dead_lettered_at.isoformat() if self.dead_lettered_at else None,
            "age_s": int(age.total_seconds()) if age is not None else None,
            "replay_count": self.replay_count,
            "lane": self.lane,
            "dead_lettered_by": "pubsub" if self.by_pubsub else "worker",
        }

    @property
    def lane(self) -> str:
        """The lane it came from: its `lane` attribute (the worker's dead letters, and
        jobs published marked batch), else the subscription Pub/Sub forwarded it from."""
        if self.attributes.get(LANE_ATTRIBUTE) == BATCH:
            return BATCH
        source = self.attributes.get(f"{PUBSUB_SOURCE_PREFIX}Subscription", "")
        return BATCH if source and source.rsplit("/", 1)[-1] == self.batch_subscription else INTERACTIVE

    @property
    def reason(self) -> str:
        """What killed it, in one word: the error code, else why it has none."""
        if self.error_code:
            return self.error_code
        return "delivery_attempts_exhausted" if self.by_pubsub else self.status

    def matches(self, kind: str | None, job_id: str | None, reason: str | None = None) -> bool:
        return (
            (kind is None or self.kind == kind)
            and (job_id is None or self.job_id == job_id)
            and (reason is None or self.reason == reason)
        )

    def replay_attributes(self, lane: str | None = None) -> dict[str, str]:
        """The attributes of the republished job, down `lane` (default: where it came from)."""
        attrs = {"replay_count": str(self.replay_count + 1)}
        if (lane or self.lane) == BATCH:
            attrs[LANE_ATTRIBUTE] = BATCH
        if self.job_id:
            attrs["job_id"] = self.job_id
        if self.kind:
            attrs["kind"] = self.kind
        if self.attributes.get(REPLAY_OF):
            attrs[REPLAY_OF] = self.attributes[REPLAY_OF]
        if self.attributes.get(FOLLOW_UP_ATTRIBUTE):
            # A follow-up Pub/Sub gave up on goes back to following its execution.
            attrs[FOLLOW_UP_ATTRIBUTE] = self.attributes[FOLLOW_UP_ATTRIBUTE]
        return attrs


class DeadLetterScan:
    """Dead letters pulled and held; `release()` gives back whatever was not acked.

    Use as a context manager: leaving it releases the rest, even on Ctrl-C.
    """

    def __init__(self, subscriber: Any, subscription: str, *, pull_timeout_s: float = 2.0) -> None:
        self._subscriber = subscriber
        self.subscription = subscription
        self._pull_timeout_s = pull_timeout_s
        self.entries: list[DeadLetterEntry] = []
        self._held: dict[str, str] = {}  # message id -> latest ack id
        self.truncated = False

    def __enter__(self) -> DeadLetterScan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def pull(
        self, *, stop: Callable[[list[DeadLetterEntry]], bool] | None = None, max_scan: int = _MAX_SCAN
    ) -> list[DeadLetterEntry]:
        """Pull until the subscription has nothing more, or `stop(entries)` says enough."""
        by_id: dict[str, DeadLetterEntry] = {}
        while not (stop and stop(list(by_id.values()))):
            if len(by_id) >= max_scan:
                self.truncated = True
                break
            try:
                response = self._subscriber.pull(
                    subscription=self.subscription,
                    max_messages=min(1000, max_scan - len(by_id)),
                    timeout=self._pull_timeout_s,
                )
            except exceptions.DeadlineExceeded:
                break
            received = list(response.received_messages)
            if not received:
                break
            ack_ids = [r.ack_id for r in received]
            self._modify(ack_ids, _HOLD_S)
            for item in received:
                entry = DeadLetterEntry.from_received(item)
                self._held[entry.message_id] = entry.ack_id
                by_id[entry.message_id] = entry
        self.entries = sorted(by_id.values(), key=_sort_key)
        return self.entries

    def ack(self, entries: list[DeadLetterEntry]) -> None:
        ack_ids = [self._held.pop(e.message_id) for e in entries]
        self._subscriber.acknowledge(subscription=self.subscription, ack_ids=ack_ids)

    def give_back(self, entries: Iterable[DeadLetterEntry]) -> None:
        ack_ids = [self._held.pop(e.message_id) for e in entries if e.message_id in self._held]
        self._modify(ack_ids, 0)

    def release(self) -> None:
        ack_ids, self._held = list(self._held.values()), {}
        self._modify(ack_ids, 0)

    def _modify(self, ack_ids: list[str], seconds: int) -> None:
        for start in range(0, len(ack_ids), _ACK_CHUNK):
            self._subscriber.modify_ack_deadline(
                subscription=self.subscription,
                ack_ids=ack_ids[start : start + _ACK_CHUNK],
                ack_deadline_seconds=seconds,
            )


def list_dead_letters(
    subscriber: Any, subscription: str, *, limit: int | None = None, pull_timeout_s: float = 2.0
) -> tuple[list[DeadLetterEntry], bool]:
    """Up to `limit` dead letters, oldest first, left on the subscription; and whether
    there may be more than were listed."""
    with DeadLetterScan(subscriber, subscription, pull_timeout_s=pull_timeout_s) as scan:
        entries = scan.pull(stop=(lambda got: len(got) >= limit) if limit else None)
        more = scan.truncated or bool(limit and len(entries) >= limit)
    return entries[:limit] if limit else entries, more


@dataclass
class ReplayReport:
    selected: list[DeadLetterEntry] = field(default_factory=list)
    replayed: list[DeadLetterEntry] = field(default_factory=list)
    failed: list[tuple[DeadLetterEntry, str]] = field(default_factory=list)
    skipped: int = 0
    truncated: bool = False


def replay_dead_letters(
    subscriber: Any,
    publisher: Any,
    subscription: str,
    jobs_topic: str | Callable[[str], str],
    *,
    kind: str | None = None,
    job_id: str | None = None,
    reason: str | None = None,
    limit: int | None = None,
    dry_run: bool = False,
    lane: str | None = None,
    pull_timeout_s: float = 2.0,
    on_selected: Callable[[list[DeadLetterEntry]], None] | None = None,
    on_settled: Callable[[DeadLetterEntry, str | None], None] | None = None,
    not_before: datetime | None = None,
) -> ReplayReport:
    """Republish matching dead letters' original data, then ack them.

    `jobs_topic`: the topic, or the topic of a lane; each goes back down `lane`, by
    default the lane it came from (`DeadLetterEntry.lane`).

    Non-matching ones (and, past `limit`, matching ones) are given back untouched.
    `on_selected` hears what will be replayed, `on_settled` each one's fate (None
    for success, else the reason), for a progress display. With `not_before` (`--at`,
    `--in`) each job is republished with that `not_before` (the worker puts it off until
    then); one that is not a job object, or whose `not_after` comes first, stays.
    """
    report = ReplayReport()
    with DeadLetterScan(subscriber, subscription, pull_timeout_s=pull_timeout_s) as scan:
        entries = scan.pull(
            stop=(lambda got: sum(e.matches(kind, job_id, reason) for e in got) >= limit) if limit else None
        )
        report.truncated = scan.truncated
        matching = [e for e in entries if e.matches(kind, job_id, reason)]
        report.selected = matching[:limit] if limit else matching
        report.skipped = len(entries) - len(report.selected)
        chosen = {e.message_id for e in report.selected}
        scan.give_back(e for e in entries if e.message_id not in chosen)
        if on_selected:
            on_selected(report.selected)
        if dry_run:
            return report
        topic_of = jobs_topic if callable(jobs_topic) else lambda _lane: jobs_topic
        futures = {}
        for entry in report.selected:
            data, refused = entry.data, None
            if not_before is not None:
                data, refused = with_not_before(entry.data, not_before)
            if refused is not None:
                scan.give_back([entry])
                _settle(report, entry, refused, on_settled)
                continue
            futures[
                publisher.publish(topic_of(lane or entry.lane), data, **entry.replay_attributes(lane))
            ] = entry
        published: list[DeadLetterEntry] = []

        def ack_published() -> None:
            # Acks go in batches: one RPC per dead letter would make a big replay crawl.
            error = None
            try:
                scan.ack(published)
            except exceptions.GoogleAPICallError as exc:
                # Republished but still dead-lettered: a later replay would run them twice.
                error = f"republished, but the dead letter was not acked: {exc.message}"
            for entry in published:
                _settle(report, entry, error, on_settled)
            published.clear()

        try:
            for future in concurrent.futures.as_completed(futures, timeout=_PUBLISH_TIMEOUT_S):
                entry = futures.pop(future)
                error = _publish_error(future)
                if error is not None:
                    _settle(report, entry, error, on_settled)
                    continue
                published.append(entry)
                if len(published) >= _ACK_BATCH:
                    ack_published()
        except concurrent.futures.TimeoutError:
            for entry in futures.values():
                error = "republish did not resolve in time; it stays dead-lettered (it may run twice)"
                _settle(report, entry, error, on_settled)
        finally:
            if published:
                ack_published()
    return report


def with_not_before(data: bytes, not_before: datetime) -> tuple[bytes, str | None]:
    """A dead letter's job with `not_before` set, or why it cannot have one."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        return data, "not a job object, so it cannot wait; replay it without --at/--in"
    body["not_before"] = not_before.isoformat()
    try:
        Job.model_validate(body)
    except ValidationError as exc:
        return data, f"it cannot wait until {not_before.isoformat()}: {describe_validation_error(exc)}"
    return json.dumps(body, separators=(",", ":")).encode(), None


def _settle(
    report: ReplayReport,
    entry: DeadLetterEntry,
    error: str | None,
    on_settled: Callable[[DeadLetterEntry, str | None], None] | None,
) -> None:
    if error is None:
        report.replayed.append(entry)
    else:
        report.failed.append((entry, error))
    if on_settled:
        on_settled(entry, error)


def _publish_error(future: Any) -> str | None:
    try:
        future.result(timeout=0)
    except Exception as exc:
        return f"republish failed ({type(exc).__name__}: {str(exc)[:200]}); it stays dead-lettered"
    return None


def _sort_key(entry: DeadLetterEntry) -> tuple[datetime, str]:
    return (entry.dead_lettered_at or datetime.max.replace(tzinfo=UTC), entry.message_id)


def _timestamp(value: Any) -> datetime | None:
    # proto-plus gives publish_time as a DatetimeWithNanoseconds (a datetime).
    if isinstance(value, datetime) and value.year > 1970:
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return None
