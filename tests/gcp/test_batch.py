"""Batch scoring units: BatchProgress, BatchFanOut with fakes, batch-status and the schedule."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import worker_cli
from worker.client import BatchProgress
from worker.core.catalog import JobKind
from worker.core.errors import InvalidJobError, PermanentJobError
from worker.core.messages import BatchRef, Job, JobStatus, Result
from worker.core.shapes import CallResult, Delivery
from worker.gcp.batch import BatchFanOut, batch_id_for

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def delivery_at(published: datetime | None = None, **attributes: str) -> Delivery:
    """A delivery as the pipeline hands the fan-out: its attributes and publish time."""
    return Delivery(
        data=b"",
        attributes=attributes,
        message_id="m",
        delivery_attempt=1,
        final_attempt=False,
        publish_time=published,
    )


def make_job(**fields: Any) -> Job:
    return Job.model_validate(fields)


def child(index: int, status: str = "succeeded", *, batch_id: str = "b1", total: int = 4) -> Result:
    return Result(
        job_id=f"{batch_id}:{index}",
        kind="account-scoring",
        status=JobStatus(status),
        started_at=T0,
        finished_at=T0,
        duration_ms=1,
        batch=BatchRef(id=batch_id, index=index, total=total),
        truncated=False,
    )


def parent(job_id: str, response: Any) -> Result:
    return Result(
        job_id=job_id,
        kind="batch-scoring",
        status=JobStatus.SUCCEEDED,
        response=response,
        started_at=T0,
        finished_at=T0,
        duration_ms=1,
        truncated=False,
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
    job = make_job(job_id="nightly", kind="batch-scoring", payload=payload)
    assert batch_id_for(job, datetime(2026, 1, 1, 23, 30, tzinfo=UTC)) == expected


def run_worker_cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GOOGLE_CLOUD_PROJECT": "acme", "PUBSUB_EMULATOR_HOST": "127.0.0.1:9"}
    return worker_cli(env, *args)


def test_print_gcloud_schedules_the_nightly_batch_with_the_given_cron_and_zone(tmp_path: Path) -> None:
    done = run_worker_cli("setup", "--print-gcloud", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    line = next(c for c in done.stdout.splitlines() if c.startswith("gcloud scheduler jobs create pubsub"))
    words = shlex.split(line)
    assert "nightly-batch-scoring" in words and "--topic=jobs" in words
    assert "--attributes=job_id=nightly-batch-scoring,kind=batch-scoring" in words
    assert {"--schedule=0 2 * * *", "--time-zone=Etc/UTC", "--location=us-central1"} <= set(words)
    body = json.loads(next(w for w in words if w.startswith("--message-body=")).split("=", 1)[1])
    job = Job.model_validate(body)
    assert job.kind == "batch-scoring" and job.payload == {"source": True, "daily": True}
    assert "--role=roles/pubsub.publisher" in done.stdout.split("topics add-iam-policy-binding jobs ", 1)[1]
    other = run_worker_cli(
        "setup",
        "--print-gcloud",
        "--schedule",
        "30 1 * * 1-5",
        "--time-zone",
        "Europe/Paris",
        tmp_path=tmp_path,
    )
    assert "--schedule='30 1 * * 1-5' --time-zone=Europe/Paris" in other.stdout


def test_batch_status_counts_a_results_file(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    lines = [child(0), child(1, "failed"), child(1), child(2, "failed"), child(0, batch_id="b2")]
    results.write_text("\n".join(r.model_dump_json() for r in lines) + "\nnot json\n")
    done = run_worker_cli("batch-status", "b1", "--from-file", str(results), "--json", tmp_path=tmp_path)
    assert done.returncode == 1, done.stderr  # one child outstanding
    assert json.loads(done.stdout) == {
        "batch_id": "b1",
        "total": 4,
        "succeeded": 2,
        "failed": 1,
        "rejected": 0,
        "expired": 0,
        "cancelled": 0,
        "running": 0,
        "scheduled": 0,
        "outstanding": 1,
        "done": False,
        "unreadable_lines": 1,
    }
    results.write_text("\n".join(r.model_dump_json() for r in [*lines, child(3)]) + "\n")
    done = run_worker_cli("batch-status", "b1", "--from-file", str(results), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "4/4" in done.stdout and "succeeded" in done.stdout
    missing = run_worker_cli("batch-status", "b1", "--from-file", str(tmp_path / "nope"), tmp_path=tmp_path)
    assert missing.returncode == 2 and "cannot read" in missing.stderr


class FakeFuture:
    def result(self, timeout: float | None = None) -> str:
        return "id"


class FakePublisher:
    """Children in `jobs`; a batch's next turns, in order, in `turns` (and `order`)."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.turns: list[tuple[bytes, dict[str, str]]] = []
        self.order: list[str] = []

    def publish(self, topic: str, data: bytes, **attributes: str) -> FakeFuture:
        job = Job.model_validate_json(data)
        assert topic == "topic"
        if "batch_cursor" in attributes:
            assert attributes == {
                "job_id": job.job_id,
                "kind": job.kind,
                "lane": "batch",
                "batch_cursor": attributes["batch_cursor"],
            }
            self.turns.append((data, attributes))
            self.order.append("turn")
            return FakeFuture()
        assert attributes == {"job_id": job.job_id, "kind": job.kind, "lane": "batch"}
        self.jobs.append(job)
        self.order.append("child")
        return FakeFuture()


class FakeSource:
    """Pages `ids`; `shrink_after` pages into the second pass, the source loses ids."""

    def __init__(
        self, ids: list[str], shrink_after: int | None = None, total_size: int | None = None
    ) -> None:
        self.ids = ids
        self.bodies: list[Any] = []
        self.shrink_after = shrink_after
        self.total_size = total_size  # said on every page when set

    async def resolve(self, service: str, region: str) -> str:
        return f"https://{service}.run.app"

    async def invoke(self, kind: Any, url: str, job: Job, region: str = "r") -> CallResult:
        assert kind.handler == "call" and kind.service == "accounts-source"
        self.bodies.append(job.payload)
        if self.shrink_after is not None and len(self.bodies) > self.shrink_after:
            self.ids = self.ids[: len(self.ids) // 2]
        start = int(job.payload["page_token"] or 0)
        end = min(len(self.ids), start + job.payload["page_size"])
        token = str(end) if end < len(self.ids) else None
        page: dict[str, Any] = {"account_ids": self.ids[start:end], "next_page_token": token}
        if self.total_size is not None:
            page["total_size"] = self.total_size
        return CallResult(200, page, 1)


def batch_kind(page_size: int = 3, page_source: bool = True) -> JobKind:
    return JobKind.model_validate(
        {
            "kind": "batch-scoring",
            "handler": "batch",
            "service": "accounts-source",
            "batch": {
                "child_kind": "account-scoring",
                "page_size": page_size,
                "max_ids": 100,
                "page_source": page_source,
            },
        }
    )


def fan_out(source: FakeSource, publisher: FakePublisher) -> BatchFanOut:
    return BatchFanOut(publisher, "topic", source, source, region="r", clock=lambda: T0)


def test_fan_out_from_the_source_numbers_children_and_knows_the_total() -> None:
    source, publisher = FakeSource([f"a{i}" for i in range(7)]), FakePublisher()
    job = make_job(job_id="b1", kind="batch-scoring", payload={"source": True})
    call = asyncio.run(fan_out(source, publisher)(job, batch_kind()))
    assert call.response == {"batch_id": "b1", "children_published": 7, "total": 7}
    assert [(j.job_id, j.payload, j.batch) for j in publisher.jobs] == [
        (f"b1:{i}", {"account_id": f"a{i}"}, BatchRef(id="b1", index=i, total=7)) for i in range(7)
    ]
    assert [b["page_token"] for b in source.bodies] == [None, "3", "6"] * 2  # count, then publish
    assert {b["page_size"] for b in source.bodies} == {3}


def test_explicit_ids_need_no_source_and_a_daily_batch_gets_the_date() -> None:
    source, publisher = FakeSource([]), FakePublisher()
    job = make_job(job_id="n", kind="batch-scoring", payload={"account_ids": ["x", "y"], "daily": True})
    call = asyncio.run(fan_out(source, publisher)(job, batch_kind()))
    assert call.response == {"batch_id": "n-20260101", "children_published": 2, "total": 2}
    assert [j.job_id for j in publisher.jobs] == ["n-20260101:0", "n-20260101:1"] and not source.bodies


def test_a_daily_batch_takes_the_publish_date_not_the_workers_clock() -> None:
    # Published just before midnight UTC, handled (redelivered) after it: same night's id.
    source, publisher = FakeSource([]), FakePublisher()
    job = make_job(job_id="n", kind="batch-scoring", payload={"account_ids": ["x"], "daily": True})
    published = datetime(2025, 12, 31, 23, 59, 58, tzinfo=UTC)
    call = asyncio.run(fan_out(source, publisher)(job, batch_kind(), delivery_at(published)))
    assert call.response["batch_id"] == "n-20251231"  # the clock (T0) says 2026-01-01
    assert [j.job_id for j in publisher.jobs] == ["n-20251231:0"]


def test_a_source_that_shrinks_between_the_passes_fails_the_batch() -> None:
    source, publisher = FakeSource([f"a{i}" for i in range(8)], shrink_after=3), FakePublisher()
    job = make_job(job_id="b1", kind="batch-scoring")
    with pytest.raises(PermanentJobError, match="counted 8 ids but its pages listed only"):
        asyncio.run(fan_out(source, publisher)(job, batch_kind()))


def test_a_source_that_says_its_total_is_paged_once() -> None:
    source, publisher = FakeSource([f"a{i}" for i in range(7)], total_size=7), FakePublisher()
    job = make_job(job_id="b1", kind="batch-scoring", payload={"source": True})
    call = asyncio.run(fan_out(source, publisher)(job, batch_kind()))
    assert call.response == {"batch_id": "b1", "children_published": 7, "total": 7}
    assert [b["page_token"] for b in source.bodies] == [None, "3", "6"]
    assert [(j.job_id, j.batch) for j in publisher.jobs] == [
        (f"b1:{i}", BatchRef(id="b1", index=i, total=7)) for i in range(7)
    ]


def test_a_total_over_max_ids_fails_before_anything_is_published() -> None:
    source, publisher = FakeSource([f"a{i}" for i in range(7)], total_size=101), FakePublisher()
    job = make_job(job_id="b1", kind="batch-scoring", payload={"source": True})
    with pytest.raises(PermanentJobError, match="max_ids=100"):
        asyncio.run(fan_out(source, publisher)(job, batch_kind()))
    assert not publisher.jobs and len(source.bodies) == 1


def test_a_source_whose_pages_fall_short_of_its_total_fails_the_batch() -> None:
    source, publisher = FakeSource([f"a{i}" for i in range(7)], total_size=9), FakePublisher()
    job = make_job(job_id="b1", kind="batch-scoring", payload={"source": True})
    with pytest.raises(PermanentJobError, match="counted 9 ids but its pages listed only 7"):
        asyncio.run(fan_out(source, publisher)(job, batch_kind()))


@pytest.mark.parametrize("bad", [-1, "7", True, 2.5])
def test_a_total_size_that_is_not_a_count_is_a_bad_page(bad: Any) -> None:
    source, publisher = FakeSource(["a"], total_size=bad), FakePublisher()
    job = make_job(job_id="b1", kind="batch-scoring", payload={"source": True})
    with pytest.raises(PermanentJobError, match="total_size"):
        asyncio.run(fan_out(source, publisher)(job, batch_kind()))


def test_a_running_child_is_outstanding_and_never_replaces_a_final_status() -> None:
    progress = BatchProgress("b1", total=2)
    assert progress.update(child(0, "running"))
    assert (progress.running, progress.finished, progress.outstanding) == (1, 0, 2)
    assert progress.update(child(0, "cancelled"))
    assert (progress.running, progress.cancelled, progress.outstanding) == (0, 1, 1)
    assert not progress.update(child(0, "running"))  # late, or a replay not yet ended
    assert progress.update(child(1, "failed")) and progress.done
    assert progress.as_dict()["cancelled"] == 1 and progress.as_dict()["running"] == 0


@pytest.mark.parametrize("payload", [{"source": True}, None, {}])
def test_a_kind_that_does_not_page_its_source_refuses_a_source_batch(payload: Any) -> None:
    # a 73-byte {"source": true} fanning out to max_ids children: only where the kind says so
    source, publisher = FakeSource([f"a{i}" for i in range(7)]), FakePublisher()
    job = make_job(job_id="b1", kind="batch-scoring", payload=payload)
    with pytest.raises(InvalidJobError, match="does not page its source"):
        asyncio.run(fan_out(source, publisher)(job, batch_kind(page_source=False)))
    assert not source.bodies and not publisher.jobs
    ids = make_job(job_id="b2", kind="batch-scoring", payload={"account_ids": ["x"]})
    assert asyncio.run(fan_out(source, publisher)(ids, batch_kind(page_source=False))).response["total"] == 1


def run_turns(fan: BatchFanOut, job: Job, kind: JobKind, publisher: FakePublisher) -> list[CallResult]:
    """Handle the batch job, then each next turn it publishes, as the batch lane would."""
    calls = [asyncio.run(fan(job, kind, delivery_at()))]
    handled = 0
    while handled < len(publisher.turns):
        data, attributes = publisher.turns[handled]
        handled += 1
        calls.append(asyncio.run(fan(Job.model_validate_json(data), kind, delivery_at(**attributes))))
    return calls


def test_a_large_batch_goes_out_in_turns_each_publishing_the_next_after_its_first_page() -> None:
    source, publisher = FakeSource([]), FakePublisher()
    ids = [f"a{i}" for i in range(30)]
    job = make_job(job_id="big", kind="batch-scoring", payload={"account_ids": ids})
    calls = run_turns(fan_out(source, publisher), job, batch_kind(page_size=3), publisher)
    # Turns of 4 pages of 3: 12, 24, then the last 6 (which is the only final answer).
    assert [c.status for c in calls] == [JobStatus.RUNNING, JobStatus.RUNNING, JobStatus.SUCCEEDED]
    assert [c.response["children_published"] for c in calls] == [12, 24, 30]
    assert [j.job_id for j in publisher.jobs] == [f"big:{i}" for i in range(30)]
    assert {j.batch.total for j in publisher.jobs if j.batch} == {30}
    assert [j.payload for j in publisher.jobs] == [{"account_id": i} for i in ids]
    # The next turn goes out after the first page of each turn, never at its end.
    assert publisher.order[:5] == ["child"] * 3 + ["turn", "child"]
    assert len(publisher.turns) == 2


def test_a_paged_source_goes_on_from_its_page_token_and_is_counted_only_once() -> None:
    source, publisher = FakeSource([f"a{i}" for i in range(20)]), FakePublisher()
    job = make_job(job_id="src", kind="batch-scoring", payload={"source": True})
    calls = run_turns(fan_out(source, publisher), job, batch_kind(page_size=3), publisher)
    assert [c.response["children_published"] for c in calls] == [12, 20]
    assert [j.job_id for j in publisher.jobs] == [f"src:{i}" for i in range(20)]
    tokens = [b["page_token"] for b in source.bodies]
    # The count pass (7 pages), the first turn's 4 pages, then the second turn from "12".
    counted, first_turn, second_turn = (
        [None, "3", "6", "9", "12", "15", "18"],
        [None, "3", "6", "9"],
        ["12", "15", "18"],
    )
    assert tokens == [*counted, *first_turn, *second_turn]


@pytest.mark.parametrize(
    "cursor",
    [
        "not json",
        '{"id": "b", "start": 0, "total": 5, "token": null}',
        '{"id": "b", "start": 5, "total": 5, "token": null}',
        '{"id": "b", "start": 1, "total": 101, "token": null}',
        '{"id": "b c", "start": 1, "total": 5, "token": null}',
        '{"id": "b", "start": true, "total": 5, "token": null}',
        '{"id": "b", "start": 1, "total": 5}',
        '{"id": "b", "start": 1, "total": 5, "token": 7}',
    ],
)
def test_a_forged_or_broken_cursor_is_rejected_before_anything_is_published(cursor: str) -> None:
    source, publisher = FakeSource([f"a{i}" for i in range(5)]), FakePublisher()
    job = make_job(job_id="b", kind="batch-scoring", payload={"source": True})
    with pytest.raises(InvalidJobError, match="batch_cursor"):
        asyncio.run(fan_out(source, publisher)(job, batch_kind(), delivery_at(batch_cursor=cursor)))
    assert not publisher.jobs and not source.bodies


def test_a_turn_whose_ids_are_not_the_rest_of_the_batch_is_rejected() -> None:
    source, publisher = FakeSource([]), FakePublisher()
    job = make_job(job_id="b", kind="batch-scoring", payload={"account_ids": ["x", "y"]})
    cursor = '{"id": "b", "start": 1, "total": 5, "token": null}'
    with pytest.raises(InvalidJobError, match="not the rest"):
        asyncio.run(fan_out(source, publisher)(job, batch_kind(), delivery_at(batch_cursor=cursor)))
