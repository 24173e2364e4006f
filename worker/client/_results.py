"""Reading results: each job's result once (`ResultsReader`, `SeenResults`), one job's
result (`ResultWaiter`) and a batch's progress (`BatchProgress`). Which of two results of
one job wins is `worker.core.messages.supersedes`, the one rule push and pull share.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import structlog
from google.api_core import exceptions
from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # lazy-loaded module
from google.protobuf import duration_pb2
from pydantic import ValidationError

from worker.core.messages import JobStatus, Result, supersedes
from worker.core.settings import Settings, load_settings

log = structlog.get_logger("worker.client")


class SeenResults:
    """Which job ids' results were handed out, bounded (least recently seen forgotten first).

    A job's result is new if its id was not seen, or if the last one was not
    `succeeded` and this one has another status: a replayed job that then succeeds
    must reach the web app, while Pub/Sub's redeliveries must not. A `running` result
    (a Cloud Run job execution started) is not final: the final status of the same
    execution replaces it, and a late `running` of an execution that already ended
    is a duplicate; a replay's new execution is new.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._status: OrderedDict[str, tuple[JobStatus, str | None]] = OrderedDict()

    def is_new(self, result: Result) -> bool:
        if result.job_id is None:
            return True  # a rejected message without an id cannot be a duplicate of anything
        seen = self._status.get(result.job_id)
        if seen is None:
            return True
        self._status.move_to_end(result.job_id)
        status, execution = seen
        return supersedes(status, result.status, new_execution=execution != _execution(result))

    def add(self, result: Result) -> None:
        if result.job_id is None:
            return
        self._status[result.job_id] = (result.status, _execution(result))
        self._status.move_to_end(result.job_id)
        while len(self._status) > self._capacity:
            self._status.popitem(last=False)


def _execution(result: Result) -> str | None:
    return result.execution.name if result.execution else None


# A child's state in BatchProgress: 0 while no result has arrived; `running` (5) is not final.
_STATUS_CODES = {
    JobStatus.SUCCEEDED: 1,
    JobStatus.FAILED: 2,
    JobStatus.REJECTED: 3,
    JobStatus.EXPIRED: 4,
    JobStatus.RUNNING: 5,
    JobStatus.CANCELLED: 6,
    JobStatus.SCHEDULED: 7,
}
_FINAL_CODES = (1, 2, 3, 4, 6)
_STATUSES: dict[int, JobStatus | None] = {0: None, **{code: status for status, code in _STATUS_CODES.items()}}


class BatchProgress:
    """How far one batch has got, from its children's results, each child counted once.

    A child is known by its index in the batch (its id is `{batch_id}:{index}`), so
    the state is one byte per child: 50,000 children cost 50 kB. A child's last
    status counts, except that `succeeded` is final: a replayed child that failed
    and then succeeds moves from failed to succeeded, and a stale failure delivered
    after its success changes nothing. `running` (a Cloud Run job execution) is
    outstanding, and never replaces a final status; so is `scheduled` (put off to its `not_before`).
    """

    def __init__(self, batch_id: str, total: int | None = None) -> None:
        self.batch_id = batch_id
        self.total = total
        self._states = bytearray(total or 0)
        self._counts = [0] * 8
        self.parent: Result | None = None  # the batch job's own result, once it arrives

    def update(self, result: Result) -> bool:
        """Count `result` if it belongs to this batch; True if the counts changed."""
        batch = result.batch
        if batch is None:
            if self.batch_id in (result.job_id, _parent_batch_id(result)):
                self.parent = result
            return False
        if batch.id != self.batch_id:
            return False
        if self.total is None:
            self.total = batch.total
            self._states = bytearray(batch.total)
        if batch.index >= self.total:
            return False  # a result from a differently sized run of the same batch id
        old, new = self._states[batch.index], _STATUS_CODES[result.status]
        if not supersedes(_STATUSES[old], result.status):
            return False  # a duplicate, a stale failure after success, or a late `running`
        self._counts[old] -= 1
        self._counts[new] += 1
        self._states[batch.index] = new
        return True

    @property
    def succeeded(self) -> int:
        return self._counts[1]

    @property
    def failed(self) -> int:
        return self._counts[2]

    @property
    def rejected(self) -> int:
        return self._counts[3]

    @property
    def expired(self) -> int:
        return self._counts[4]

    @property
    def running(self) -> int:
        return self._counts[5]

    @property
    def cancelled(self) -> int:
        return self._counts[6]

    @property
    def scheduled(self) -> int:
        """Children put off to their `not_before` (not final)."""
        return self._counts[7]

    @property
    def finished(self) -> int:
        return sum(self._counts[code] for code in _FINAL_CODES)

    @property
    def outstanding(self) -> int | None:
        return None if self.total is None else self.total - self.finished

    @property
    def done(self) -> bool:
        return self.total is not None and self.outstanding == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "rejected": self.rejected,
            "expired": self.expired,
            "cancelled": self.cancelled,
            "running": self.running,
            "scheduled": self.scheduled,
            "outstanding": self.outstanding,
            "done": self.done,
        }


class ResultsReader:
    """Iterates over the web app's results subscription, each job's result once.

    A message is acked once the loop body has handled its result (when iteration
    resumes), so a crash mid-way means redelivery, not loss. `stop()` ends the
    iteration after the current pull.
    """

    def __init__(
        self,
        subscriber: Any = None,
        settings: Settings | None = None,
        *,
        subscription: str | None = None,
        seen_capacity: int = 10_000,
        max_messages: int = 100,
        pull_timeout_s: float = 10.0,
        batch_capacity: int = 100,
    ) -> None:
        settings = settings or load_settings()
        self._subscriber = subscriber or pubsub_v1.SubscriberClient()
        self.subscription = self._subscriber.subscription_path(
            settings.project, subscription or settings.results_subscription
        )
        self._seen = SeenResults(seen_capacity)
        self._max_messages = max_messages
        self._pull_timeout_s = pull_timeout_s
        self._stop = threading.Event()
        self.duplicates = 0
        # Progress of the batches seen lately, oldest forgotten first, so a reader
        # running for months holds a bounded number of them.
        self._batches: OrderedDict[str, BatchProgress] = OrderedDict()
        self._batch_capacity = batch_capacity

    def stop(self) -> None:
        self._stop.set()

    def progress(self, batch_id: str) -> BatchProgress:
        """The progress of a batch, from the results this reader has handed out so far.

        Every batch whose results pass through is tracked (the last `batch_capacity`
        of them), so asking late loses nothing unless the batch was forgotten.
        """
        progress = self._batches.get(batch_id)
        if progress is None:
            progress = self._batches[batch_id] = BatchProgress(batch_id)
            while len(self._batches) > self._batch_capacity:
                self._batches.popitem(last=False)
        return progress

    def _track(self, result: Result) -> None:
        batch_id = result.batch.id if result.batch else _parent_batch_id(result) or result.job_id
        if batch_id is not None and (result.batch or batch_id in self._batches):
            self.progress(batch_id).update(result)

    def __iter__(self) -> Iterator[Result]:
        while not self._stop.is_set():
            yield from self.poll()

    def poll(self) -> Iterator[Result]:
        """One pull: yield the new results in it, ack everything handled."""
        try:
            response = self._subscriber.pull(
                subscription=self.subscription,
                max_messages=self._max_messages,
                timeout=self._pull_timeout_s,
            )
        except exceptions.DeadlineExceeded:
            return
        handled: list[str] = []
        pending = [m.ack_id for m in response.received_messages]
        try:
            for received in response.received_messages:
                result = _parse(received.message.data)
                if result is not None and self._seen.is_new(result):
                    self._track(result)
                    yield result
                    self._seen.add(result)
                elif result is not None:
                    self.duplicates += 1
                handled.append(received.ack_id)
        finally:
            if handled:
                self._subscriber.acknowledge(subscription=self.subscription, ack_ids=handled)
            unhandled = pending[len(handled) :]
            if unhandled:
                # The loop stopped early: hand the rest back now rather than at lease expiry.
                self._subscriber.modify_ack_deadline(
                    subscription=self.subscription, ack_ids=unhandled, ack_deadline_seconds=0
                )


def _parent_batch_id(result: Result) -> str | None:
    # A batch job's response names its batch, which differs from its job id when daily.
    response = result.response
    batch_id = response.get("batch_id") if isinstance(response, dict) else None
    return batch_id if isinstance(batch_id, str) else None


def _parse(data: bytes) -> Result | None:
    try:
        return Result.model_validate_json(data)
    except ValidationError as exc:
        # Not a result (someone published by hand?): acked and logged, never retried forever.
        log.warning("result_unreadable", error=str(exc)[:300])
        return None


class ResultWaiter:
    """A temporary subscription on the results topic that waits for one job's result.

    Created before the job is published, so the result cannot slip past, and
    separate from the web app's subscription, so nothing is taken from it. Pub/Sub
    filters on the job id; the emulator ignores filters, so other ids are skipped
    here too. The subscription expires by itself a day after use if deleting it fails.
    """

    def __init__(self, subscriber: Any, settings: Settings, job_id: str) -> None:
        self._subscriber = subscriber
        self.job_id = job_id
        self.topic = f"projects/{settings.project}/topics/{settings.results_topic}"
        self.subscription = subscriber.subscription_path(
            settings.project, f"{settings.results_subscription}-wait-{uuid.uuid4().hex[:12]}"
        )

    def __enter__(self) -> ResultWaiter:
        self._subscriber.create_subscription(
            request={
                "name": self.subscription,
                "topic": self.topic,
                "filter": f'attributes.job_id = "{self.job_id}"',
                "ack_deadline_seconds": 10,
                "message_retention_duration": duration_pb2.Duration(seconds=600),
                "expiration_policy": {"ttl": duration_pb2.Duration(seconds=86400)},
            }
        )
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._subscriber.delete_subscription(subscription=self.subscription, timeout=30)
        except exceptions.GoogleAPICallError as error:
            log.warning("wait_subscription_not_deleted", subscription=self.subscription, error=str(error))

    def wait(self, timeout_s: float, on_progress: Callable[[Result], None] | None = None) -> Result | None:
        """The job's final result, or None if none arrived within `timeout_s`; each result
        that is not final (`scheduled`, `running`) is given to `on_progress` on the way."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                response = self._subscriber.pull(
                    subscription=self.subscription, max_messages=100, timeout=min(left, 10.0)
                )
            except exceptions.DeadlineExceeded:
                continue
            if not response.received_messages:
                continue
            self._subscriber.acknowledge(
                subscription=self.subscription, ack_ids=[m.ack_id for m in response.received_messages]
            )
            for received in response.received_messages:
                result = _parse(received.message.data)
                # A Cloud Run job's `running` result is not the answer: wait for its end.
                if result is None or result.job_id != self.job_id:
                    continue
                if result.status.final:
                    return result
                if on_progress is not None:
                    on_progress(result)
        return None
