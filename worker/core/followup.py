"""The follow-up message: how a running Cloud Run job execution is followed without a long lease.

A `run_job` kind's job is acked as soon as its execution has started; what remains
to do (look at the execution until it ends, then publish the final result) travels
as a follow-up message on the jobs topic, marked by the attribute
`follow_up=execution`. Any replica may take it, so following survives restarts and
scaling. Pub/Sub cannot delay a message, so a follow-up that is not yet due is held
for at most HOLD_S seconds, republished unchanged and acked (publish first: never
lost); one that is due looks at the execution once and, if it is still running, is
republished due again after twice the interval (up to the kind's `poll_max_s`).
docs/run-jobs.md explains the trade-offs.

Anyone who may publish a job may publish a follow-up, so nothing in one is believed
(docs/run-jobs.md, "What a follow-up cannot forge"): `refusal` bounds its times and
counts before it is held (a follow-up is checked within `poll_max_s + HOLD_S`, so
none is republished forever), and worker/gcp/runjobs.py acts on a due one only when
the execution it names carries its job id and replay count and its `job_data`
renders to that execution's overrides.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from worker.core.messages import JOB_ID_PATTERN, clip
from worker.core.runjob import MAX_TASK_TIMEOUT_S

FOLLOW_UP_ATTRIBUTE = "follow_up"
FOLLOW_UP_EXECUTION = "execution"
# The longest a follow-up is held under lease before it is republished: each running
# execution costs one publish and one ack per HOLD_S, and no lease outlives it by much.
HOLD_S = 4.0
# How far ahead of this worker's clock another's may be (started_at, check_at).
CLOCK_SKEW_S = 60.0
# The oldest a follow-up may be: longer than any task may run (MAX_TASK_TIMEOUT_S), plus
# a day of queueing. An execution still running after that is reported `failed`.
MAX_AGE_S = MAX_TASK_TIMEOUT_S + 24 * 3600.0
# At most one check per second for MAX_AGE_S: a count above it was not counted by a worker.
MAX_CHECKS = int(MAX_AGE_S)


class FollowUp(BaseModel):
    """Body of a follow-up message (UTF-8 JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    kind: str
    execution: str
    replay_count: int = Field(0, ge=0)
    check_at: datetime
    interval_s: float = Field(gt=0)
    started_at: datetime
    job_data: str  # the start message's data, for the dead letter a failed execution gets
    checks: int = Field(0, ge=0)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    def attributes(self) -> dict[str, str]:
        return {
            "job_id": self.job_id,
            "kind": clip(self.kind),
            FOLLOW_UP_ATTRIBUTE: FOLLOW_UP_EXECUTION,
            "replay_count": str(self.replay_count),
        }

    def refusal(self, at: datetime, poll_max_s: float) -> str | None:
        """Why this follow-up cannot be one the worker wrote at or before `at`, or None."""
        ahead = timedelta(seconds=poll_max_s + HOLD_S + CLOCK_SKEW_S)
        if self.check_at > at + ahead:
            return (
                f"check_at {self.check_at.isoformat()} is more than {ahead.total_seconds():.0f} s "
                "ahead (the kind's poll_max_s + hold + clock skew): the worker never writes one so late"
            )
        if self.started_at > at + timedelta(seconds=CLOCK_SKEW_S):
            return f"started_at {self.started_at.isoformat()} is in the future"
        if self.check_at < self.started_at:
            return "check_at is before started_at"
        if self.interval_s > poll_max_s:
            return f"interval_s {self.interval_s} is over the kind's poll_max_s {poll_max_s}"
        if self.checks > MAX_CHECKS:
            return f"checks {self.checks} is over {MAX_CHECKS}"
        return None

    def too_old(self, at: datetime) -> bool:
        return (at - self.started_at).total_seconds() > MAX_AGE_S

    def due(self, at: datetime) -> bool:
        return at >= self.check_at

    def hold(self, at: datetime, limit: float = HOLD_S) -> float:
        """Seconds to hold this message before republishing it: until due, at most `limit`."""
        return max(0.0, min(limit, (self.check_at - at).total_seconds()))

    def next_check(self, at: datetime, poll_max_s: float) -> FollowUp:
        """The follow-up for a check that found the execution still running."""
        interval = min(self.interval_s * 2, poll_max_s)
        return self.model_copy(
            update={
                "check_at": at + timedelta(seconds=interval),
                "interval_s": interval,
                "checks": self.checks + 1,
            }
        )


def is_follow_up(attributes: dict[str, str]) -> bool:
    return attributes.get(FOLLOW_UP_ATTRIBUTE) == FOLLOW_UP_EXECUTION
