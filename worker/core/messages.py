"""Job and result envelopes (docs/contract.md) and the decoding of raw messages.

Decoding never raises anything but InvalidJobError: whatever arrives on the topic,
the worker ends up with either a Job or a reason to reject it.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import structlog
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from worker.core.errors import InvalidJobError

log = structlog.get_logger("worker.core.messages")

JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
_JOB_ID_RE = re.compile(JOB_ID_PATTERN)
# W3C trace context: version-traceid-parentid-flags, lower-case hex.
_TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
# Pub/Sub rejects a message over 10 MB; keep headroom for attributes and framing.
MAX_PUBLISH_BYTES = 9_500_000
MAX_ATTRIBUTE_BYTES = 1024
# How far ahead a job's `not_before` may be (Cloud Tasks holds 30 days; the worker
# schedules again past that): further is a mistake, refused naming the field.
MAX_NOT_BEFORE_DAYS = 365


class JobStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    RUNNING = "running"  # not final: a Cloud Run job execution started (worker/gcp/runjobs.py)
    CANCELLED = "cancelled"
    SCHEDULED = "scheduled"  # not final: put off to its not_before on Cloud Tasks (worker/gcp/delay.py)

    @property
    def final(self) -> bool:
        return self not in (JobStatus.RUNNING, JobStatus.SCHEDULED)


def supersedes(stored: JobStatus | str | None, new: JobStatus | str, *, new_execution: bool = False) -> bool:
    """Which result of one job wins, the one rule the results reader, batch progress and
    the push store share: a result with status `new` replaces the stored one if nothing
    is stored, or the stored one did not succeed and this one says something else (a
    replayed job that succeeds after failing). `succeeded` is final, and a result that
    is not final (`running`) never replaces a final one (a late redelivery: the final
    result follows anyway) unless it is a replay's `new_execution`."""
    if stored is None:
        return True
    stored, new = JobStatus(stored), JobStatus(new)
    if stored is JobStatus.SUCCEEDED or stored is new:
        return False
    if not new.final and stored.final:
        return new_execution
    return True


class BatchRef(BaseModel):
    """Where a child job sits in its batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=JOB_ID_PATTERN)
    index: int = Field(ge=0)
    total: int = Field(ge=1)

    @model_validator(mode="after")
    def _index_in_range(self) -> BatchRef:
        if self.index >= self.total:
            raise ValueError(f"batch index {self.index} is not below total {self.total}")
        return self


class Job(BaseModel):
    """A job as published on the jobs topic. Unknown fields are refused: a job never
    carries a URL, host or header, so a field like `url` is a mistake or an attack."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    kind: str = Field(min_length=1, max_length=128)
    payload: Any = None
    created_at: datetime | None = Field(None, strict=False)
    not_before: datetime | None = Field(None, strict=False)
    not_after: datetime | None = Field(None, strict=False)
    batch: BatchRef | None = None
    traceparent: str | None = None

    @field_validator("created_at", "not_before", "not_after")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must be RFC 3339 with a time zone offset, e.g. 2026-01-01T00:00:00Z")
        return value

    @field_validator("not_before", mode="before")
    @classmethod
    def _a_time_string(cls, value: Any) -> Any:
        # Not a number: pydantic would read 7 as 1970-01-01T00:00:07Z and run the job at once.
        if value is not None and not isinstance(value, str | datetime):
            raise ValueError("must be an RFC 3339 string with a time zone offset, e.g. 2026-01-01T02:00:00Z")
        return value

    @field_validator("not_before")
    @classmethod
    def _within_horizon(cls, value: datetime | None) -> datetime | None:
        if value is not None and (value - now()).days >= MAX_NOT_BEFORE_DAYS:
            raise ValueError(f"more than {MAX_NOT_BEFORE_DAYS} days ahead; a job can wait that long at most")
        return value

    @field_validator("not_after")
    @classmethod
    def _after_not_before(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        start = info.data.get("not_before")
        if value is not None and start is not None and value <= start:
            raise ValueError("must be later than not_before, or the job could never run")
        return value

    @field_validator("traceparent")
    @classmethod
    def _traceparent(cls, value: str | None) -> str | None:
        if value is not None and not _TRACEPARENT_RE.fullmatch(value):
            raise ValueError("must be a W3C traceparent: 00-<32 hex>-<16 hex>-<2 hex>")
        return value

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    def attributes(self) -> dict[str, str]:
        return {"job_id": self.job_id, "kind": self.kind}


class ErrorInfo(BaseModel):
    code: str
    message: str


class ExecutionInfo(BaseModel):
    """The Cloud Run job execution a `run_job` kind's result is about."""

    name: str  # projects/P/locations/R/jobs/J/executions/E
    task_count: int = 0
    succeeded_count: int = 0
    failed_count: int = 0
    cancelled_count: int = 0
    retried_count: int = 0
    log_uri: str = ""
    create_time: datetime | None = None
    completion_time: datetime | None = None


class Result(BaseModel):
    """One result message per finished job, on the results topic."""

    job_id: str | None
    kind: str | None
    status: JobStatus
    attempts: int = 0
    http_status: int | None = None
    response: Any = None
    error: ErrorInfo | None = None
    started_at: datetime
    finished_at: datetime
    duration_ms: int
    batch: BatchRef | None = None
    truncated: bool = False  # response cut to fit Pub/Sub's message limit
    execution: ExecutionInfo | None = None  # run_job kinds only
    trace_id: str | None = None  # the job's trace (32 hex), for a link to Cloud Trace
    not_before: datetime | None = None  # `scheduled` only: when the job will run
    task: str | None = None  # `scheduled` only: the Cloud Tasks task that will publish it again

    def to_bytes(self) -> bytes:
        try:
            data = self.model_dump_json().encode()
        except (ValueError, UnicodeError):
            # e.g. a function answered JSON with lone surrogates: keep it, escaped.
            escaped = json.dumps(self.response)
            data = self.model_copy(update={"response": escaped}).model_dump_json().encode()
        if len(data) <= MAX_PUBLISH_BYTES:
            return data
        # Too large for Pub/Sub: keep the verdict and a prefix of the answer, flagged.
        text = json.dumps(self.response)[: MAX_PUBLISH_BYTES // 2]
        return self.model_copy(update={"response": text, "truncated": True}).model_dump_json().encode()

    def attributes(self) -> dict[str, str]:
        attrs = {"status": self.status.value}
        if self.job_id and _JOB_ID_RE.fullmatch(self.job_id):
            attrs["job_id"] = self.job_id
        if self.kind:
            attrs["kind"] = clip(self.kind)
        if self.batch:
            attrs["batch_id"] = self.batch.id
        return attrs


# Set by the Cloud Tasks task that publishes a put-off job back: how many times it was put off.
SCHEDULED_ATTRIBUTE = "scheduled"


def times_put_off(attributes: dict[str, str]) -> int:
    """How many times this delivery's job was put off already (its `scheduled` attribute)."""
    value = attributes.get(SCHEDULED_ATTRIBUTE, "0")
    return int(value) if value.isdigit() and len(value) < 6 else 0


def now() -> datetime:
    return datetime.now(UTC)


def clip(text: str, limit: int = MAX_ATTRIBUTE_BYTES) -> str:
    """Cut a string to fit a Pub/Sub attribute value (1024 bytes), on a character boundary."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        # Decoded back, so a lone surrogate becomes "?" rather than an unpublishable value.
        return data.decode("utf-8")
    return data[: limit - 3].decode("utf-8", "ignore") + "..."


def salvage_identity(data: bytes, attributes: dict[str, str]) -> tuple[str | None, str | None]:
    """Best-effort (job_id, kind) of a message that failed validation, for its rejection."""
    job_id = attributes.get("job_id")
    kind = attributes.get("kind")
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("job_id"), str):
            job_id = body["job_id"]
        if isinstance(body.get("kind"), str):
            kind = body["kind"]
    return (_printable(job_id, 256), _printable(kind, 128))


def _printable(text: str | None, limit: int) -> str | None:
    # Lone surrogates (legal in JSON escapes) cannot be published: replace them.
    return text[:limit].encode("utf-8", "replace").decode("utf-8") if text else None


def usable_traceparent(value: Any) -> bool:
    """A W3C traceparent that names a trace: well formed, version not ff, ids not all zero."""
    return (
        isinstance(value, str)
        and _TRACEPARENT_RE.fullmatch(value) is not None
        and not value.startswith("ff")
        and value[3:35] != "0" * 32
        and value[36:52] != "0" * 16
    )


def decode_job(data: bytes, attributes: dict[str, str], *, max_bytes: int) -> Job:
    """Raw Pub/Sub data -> Job, or InvalidJobError with a reason a person can act on.

    A `traceparent` that is not a usable W3C one is dropped (the job starts a fresh
    trace): tracing context is a hint, and a bad one never fails the job."""
    if len(data) > max_bytes:
        raise InvalidJobError(
            "payload_too_large",
            f"job is {len(data)} bytes, over the {max_bytes}-byte limit "
            "(WORKER_MAX_PAYLOAD_BYTES); store large inputs elsewhere and pass a reference",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJobError(
            "invalid_encoding", f"job data is not UTF-8 (byte {exc.start}); publish UTF-8 JSON"
        ) from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise InvalidJobError("invalid_json", "job JSON is nested too deeply") from None
    except ValueError as exc:
        raise InvalidJobError("invalid_json", f"job data is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidJobError("invalid_job", f"job must be a JSON object, got {type(body).__name__}")
    if body.get("traceparent") is not None and not usable_traceparent(body["traceparent"]):
        log.warning("traceparent_ignored", traceparent=clip(repr(body.pop("traceparent")), 100))
    try:
        job = Job.model_validate(body)
    except ValidationError as exc:
        raise InvalidJobError("invalid_job", describe_validation_error(exc)) from None
    except RecursionError:
        raise InvalidJobError("invalid_json", "job JSON is nested too deeply") from None
    attr_id = attributes.get("job_id")
    if attr_id is not None and attr_id != job.job_id:
        raise InvalidJobError(
            "invalid_job",
            f"attribute job_id {clip(attr_id, 140)!r} differs from the body's {job.job_id!r}",
        )
    return job


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "job"
        if err["type"] == "extra_forbidden":
            parts.append(
                f"unexpected field {where!r}: a job carries only job_id, kind, payload, "
                "created_at, not_before, not_after, batch, traceparent (never a URL, host or header)"
            )
        elif err["type"] == "missing":
            parts.append(f"missing required field {where!r}")
        else:
            parts.append(f"{where}: {err['msg']}")
    more = len(exc.errors()) - 5
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)
