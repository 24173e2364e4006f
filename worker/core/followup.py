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
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from worker.core.messages import JOB_ID_PATTERN, clip

FOLLOW_UP_ATTRIBUTE = "follow_up"
FOLLOW_UP_EXECUTION = "execution"
# The longest a follow-up is held under lease before it is republished: each running
# execution costs one publish and one ack per HOLD_S, and no lease outlives it by much.
HOLD_S = 4.0


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
