"""The shapes a job turns into on its way through the worker, shared by every layer.

A `Delivery` comes in (from Pub/Sub, or a test's stand-in); the orchestrator
(worker/core/pipeline.py) answers with an `Outcome`; what it publishes travels as a
`Result` (worker/core/messages.py), a `DeadLetter` and a `Republish`. Handlers answer
with a `CallResult`. The ports the pipeline is given (`Resolver`, `Caller`) are here too,
so adapters import shapes, never the orchestrator (as google-cloud-pubsub's
`subscriber/_protocol/requests.py` does for its leaser and dispatcher).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from worker.core.catalog import JobKind
from worker.core.messages import ExecutionInfo, Job, JobStatus, Result
from worker.core.telemetry import NO_SPAN, JobSpan


@dataclass
class CallResult:
    """What a handler (an HTTP call, a batch fan-out, a Cloud Run job start) answered.

    A job start answers `running` with the execution it started and the follow-up
    message that will report its end (worker/core/followup.py)."""

    http_status: int | None
    response: Any
    attempts: int
    status: JobStatus = JobStatus.SUCCEEDED
    execution: ExecutionInfo | None = None
    follow_up: Republish | None = None


@dataclass(frozen=True)
class Delivery:
    """One delivery of a message: its bytes and attributes, which attempt it is, and
    whether it may still be held (False once held for WORKER_MAX_HOLD_SECONDS)."""

    data: bytes
    attributes: dict[str, str]
    message_id: str = ""  # Pub/Sub's, for the job span's messaging.message.id
    delivery_attempt: int | None = None
    final_attempt: bool = False
    publish_time: datetime | None = None  # Pub/Sub's, the same on every redelivery
    may_hold: bool = True  # False once held for WORKER_MAX_HOLD_SECONDS on the last attempt


@dataclass(frozen=True)
class DeadLetter:
    """The original job bytes, so it can be replayed as it was, plus why it died
    (worker.core.dead_letters.DeadLetterAttributes)."""

    data: bytes
    attributes: dict[str, str]


@dataclass(frozen=True)
class Republish:
    """A message for the jobs topic, published with the result, before the ack."""

    data: bytes
    attributes: dict[str, str]


@dataclass
class Outcome:
    """What to do with one delivery. Exactly one of three shapes (build them with the
    class methods; the consumer matches them in one place, `Consumer._settle`):

    - **settled** (`ack=True`): publish `result` (and `dead_letter`, `follow_up` when
      set), then ack; `hold_s` keeps the message leased that long first.
    - **retry** (`ack=False`, `hold=None`): nack, so Pub/Sub redelivers it (a delivery
      attempt used); `retry_code` says why.
    - **held** (`ack=False`, `hold` set): keep it leased outside the call slots, no
      delivery attempt used, and run it again once `hold()` returns (a paused kind, an
      open circuit breaker; worker/core/guard.py).

    `span` is ended by whoever settles the message; `kind` is the catalog's kind once
    the job's kind was found in it (None for a message that never named a known kind).
    """

    ack: bool
    result: Result | None = None
    dead_letter: DeadLetter | None = None
    span: JobSpan = NO_SPAN
    kind: str | None = None
    retry_code: str | None = None
    hold: Callable[[], Awaitable[None]] | None = None
    follow_up: Republish | None = None
    hold_s: float = 0.0

    @classmethod
    def settled(
        cls,
        result: Result | None,
        *,
        dead_letter: DeadLetter | None = None,
        follow_up: Republish | None = None,
        span: JobSpan = NO_SPAN,
        kind: str | None = None,
        hold_s: float = 0.0,
    ) -> Outcome:
        return cls(
            ack=True,
            result=result,
            dead_letter=dead_letter,
            follow_up=follow_up,
            span=span,
            kind=kind,
            hold_s=hold_s,
        )

    @classmethod
    def retry(cls, code: str | None = None, *, span: JobSpan = NO_SPAN, kind: str | None = None) -> Outcome:
        return cls(ack=False, retry_code=code, span=span, kind=kind)

    @classmethod
    def held(
        cls, wait: Callable[[], Awaitable[None]], *, span: JobSpan = NO_SPAN, kind: str | None = None
    ) -> Outcome:
        return cls(ack=False, hold=wait, span=span, kind=kind)

    @property
    def is_held(self) -> bool:
        return not self.ack and self.hold is not None

    @property
    def counted(self) -> bool:
        """Whether this outcome counts as a job outcome in the metrics: a settled job, a
        retry, or anything of a known kind. A bare `Outcome.retry()` of a message that
        is only passed along (a follow-up not yet due) is not."""
        return self.result is not None or self.kind is not None or not self.ack


class Resolver(Protocol):
    """Finds a Cloud Run service's URL (worker/gcp/resolver.py)."""

    async def resolve(self, service: str, region: str) -> str: ...


class Caller(Protocol):
    """Calls a service for a job and says what it answered (worker/gcp/invoker.py)."""

    async def invoke(self, kind: JobKind, url: str, job: Job, region: str = ...) -> CallResult: ...


class Deferrer(Protocol):
    """Puts a job off until `at` on a durable timer (worker/gcp/delay.py: a Cloud Tasks task
    that publishes the delivery again); returns the task's name. A duplicate of the same
    delivery is put off once. Raises TransientJobError when the timer cannot be set."""

    async def defer(self, job: Job, delivery: Delivery, at: datetime) -> str: ...


# A batch handler fans a job out (given the job, its kind and when the message was
# published); it returns the parent's response and child count.
BatchHandler = Callable[[Job, JobKind, Delivery], Awaitable[CallResult]]
# A run-job handler starts (or finds) the Cloud Run job execution of a job.
RunJobHandler = Callable[[Job, JobKind, Delivery], Awaitable[CallResult]]
