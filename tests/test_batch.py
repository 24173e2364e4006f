"""BatchProgress: each child counted once, succeeded final, the parent recognised."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from worker.batch import batch_id_for
from worker.client import BatchProgress
from worker.messages import BatchRef, Job, JobStatus, Result

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def child(index: int, status: str = "succeeded", *, batch_id: str = "b1", total: int = 4) -> Result:
    return Result(
        job_id=f"{batch_id}:{index}",
        kind="account-scoring",
        status=JobStatus(status),
        started_at=T0,
        finished_at=T0,
        duration_ms=1,
        batch=BatchRef(id=batch_id, index=index, total=total),
    )


def parent(job_id: str, response: Any) -> Result:
    return Result(
        job_id=job_id, kind="batch-scoring", status=JobStatus.SUCCEEDED, response=response,
        started_at=T0, finished_at=T0, duration_ms=1,
    )


def counts(progress: BatchProgress) -> tuple[int | None, int, int, int, int, int | None]:
    p = progress
    return (p.total, p.succeeded, p.failed, p.rejected, p.expired, p.outstanding)


def test_total_comes_from_the_first_child_and_outstanding_falls() -> None:
    progress = BatchProgress("b1")
    assert counts(progress) == (None, 0, 0, 0, 0, None) and not progress.done
    assert progress.update(child(0))
    assert progress.update(child(1, "failed"))
    assert progress.update(child(2, "rejected"))
    assert counts(progress) == (4, 1, 1, 1, 0, 1)
    assert progress.update(child(3, "expired"))
    assert counts(progress) == (4, 1, 1, 1, 1, 0) and progress.done


def test_a_redelivered_child_counts_once() -> None:
    progress = BatchProgress("b1")
    for _ in range(3):
        progress.update(child(0))
    assert not progress.update(child(0))
    assert counts(progress) == (4, 1, 0, 0, 0, 3)


def test_a_success_after_a_failure_wins_and_a_stale_failure_does_not() -> None:
    progress = BatchProgress("b1")
    progress.update(child(2, "failed"))
    assert (progress.failed, progress.succeeded) == (1, 0)
    assert progress.update(child(2, "succeeded"))
    assert (progress.failed, progress.succeeded) == (0, 1)
    assert not progress.update(child(2, "failed"))
    assert (progress.failed, progress.succeeded, progress.outstanding) == (0, 1, 3)


def test_other_batches_and_plain_jobs_are_ignored() -> None:
    progress = BatchProgress("b1")
    assert not progress.update(child(0, batch_id="b2"))
    assert not progress.update(parent("other", {"score": 3}))
    assert counts(progress) == (None, 0, 0, 0, 0, None) and progress.parent is None


def test_the_parent_result_is_kept_by_job_id_or_by_its_batch_id() -> None:
    progress = BatchProgress("nightly-20260101")
    result = parent("nightly", {"batch_id": "nightly-20260101", "children_published": 4, "total": 4})
    assert not progress.update(result)
    assert progress.parent == result
    assert progress.as_dict()["outstanding"] is None


def test_an_index_beyond_the_known_total_is_not_counted() -> None:
    progress = BatchProgress("b1", total=2)
    assert not progress.update(child(3, total=4))
    assert progress.outstanding == 2


@pytest.mark.parametrize(
    ("payload", "expected"),
    [({"daily": True}, "nightly-20260101"), ({"source": True}, "nightly"), (None, "nightly")],
)
def test_a_daily_batch_id_carries_the_utc_date(payload: Any, expected: str) -> None:
    job = Job(job_id="nightly", kind="batch-scoring", payload=payload)
    assert batch_id_for(job, datetime(2026, 1, 1, 23, 30, tzinfo=UTC)) == expected
