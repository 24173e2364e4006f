"""The web app's side of jobs at a time: enqueue(not_before=) and `scheduled` not final."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.doubles import result
from worker.client import BatchProgress, InvalidJobError, SeenResults, build_job
from worker.core.messages import BatchRef


def test_not_before_is_a_time_or_a_delay_from_now() -> None:
    soon = build_job("echo", {}, not_before=timedelta(minutes=1))
    assert soon.created_at is not None and soon.not_before == soon.created_at + timedelta(minutes=1)
    at = datetime.now(UTC) + timedelta(days=30)
    assert build_job("echo", {}, not_before=at).not_before == at


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (datetime(2026, 1, 1), "not_before: Value error, must be RFC 3339 with a time zone"),
        (timedelta(days=400), "not_before: Value error, more than 365 days ahead"),
    ],
)
def test_a_bad_not_before_is_refused_before_publishing_naming_the_field(value: object, fragment: str) -> None:
    with pytest.raises(InvalidJobError) as err:
        build_job("echo", {}, not_before=value)  # type: ignore[arg-type]
    assert fragment in err.value.message


def test_scheduled_is_outstanding_in_batch_progress_and_replaced_by_the_end() -> None:
    progress = BatchProgress("b", total=2)
    ref = {"batch": BatchRef(id="b", index=0, total=2)}
    assert progress.update(result("b:0", "scheduled", **ref))
    assert (progress.scheduled, progress.finished, progress.outstanding) == (1, 0, 2)
    assert progress.update(result("b:0", "succeeded", **ref))
    assert (progress.scheduled, progress.succeeded, progress.outstanding) == (0, 1, 1)
    assert not progress.update(result("b:0", "scheduled", **ref))  # a late duplicate
    assert progress.as_dict()["scheduled"] == 0


def test_results_reader_hands_out_scheduled_then_the_final_result_once() -> None:
    seen = SeenResults()
    for status, new in (("scheduled", True), ("scheduled", False), ("succeeded", True), ("scheduled", False)):
        r = result("j", status)
        assert seen.is_new(r) is new
        if new:
            seen.add(r)
