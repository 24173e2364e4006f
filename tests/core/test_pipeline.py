"""The pipeline on its own: collaborators are our own small objects, no Pub/Sub, no HTTP."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from tests.doubles import Invoker, Resolver, make, run
from worker.core.catalog import Catalog, default_catalog_dir
from worker.core.errors import PermanentJobError, TransientJobError
from worker.core.messages import JobStatus
from worker.core.pipeline import Pipeline
from worker.core.shapes import CallResult


def test_success_calls_the_catalog_service_at_the_resolved_url() -> None:
    pipeline, resolver, invoker = make()
    out = run(pipeline, {"job_id": "j1", "kind": "account-scoring", "payload": {"account_id": "a"}})
    assert out.ack and out.dead_letter is None
    assert out.result is not None and out.result.status is JobStatus.SUCCEEDED
    assert out.result.response == {"echo": {"account_id": "a"}}
    assert resolver.calls == [("account-scoring", "europe-west1")]
    assert invoker.calls == [("account-scoring", "https://account-scoring-abc-uc.a.run.app", "j1")]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"\xff\xfe", "invalid_encoding"),
        (b"{not json", "invalid_json"),
        (b"[1,2]", "invalid_job"),
        ({"kind": "echo"}, "invalid_job"),
        ({"job_id": "bad id!", "kind": "echo"}, "invalid_job"),
        ({"job_id": "j", "kind": "nope"}, "unknown_kind"),
        ({"job_id": "j", "kind": "echo", "url": "https://evil.example"}, "invalid_job"),
        ({"job_id": "j", "kind": "account-scoring", "payload": {"account_id": 7}}, "invalid_payload"),
        ({"job_id": "j", "kind": "echo", "payload": "x" * 20_000}, "payload_too_large"),
    ],
)
def test_invalid_jobs_are_rejected_with_a_dead_letter_and_acked(body: object, code: str) -> None:
    pipeline, resolver, invoker = make()
    out = run(pipeline, body)
    assert out.ack
    assert out.result is not None and out.result.status is JobStatus.REJECTED
    assert out.result.error is not None and out.result.error.code == code
    assert out.dead_letter is not None and out.dead_letter.attributes["error_code"] == code
    assert out.dead_letter.data == (body if isinstance(body, bytes) else json.dumps(body).encode())
    assert invoker.calls == [] and resolver.calls == []


def test_rejection_keeps_the_job_id_and_kind_it_can_read() -> None:
    pipeline, _, _ = make()
    out = run(pipeline, {"job_id": "j9", "kind": "nope"})
    assert out.result is not None and (out.result.job_id, out.result.kind) == ("j9", "nope")
    assert "known kinds: account-scoring" in out.result.error.message  # type: ignore[union-attr]


def test_transient_failure_is_nacked_without_result_until_the_last_attempt() -> None:
    pipeline, _, _ = make(Invoker(TransientJobError("http_503", "503")))
    body = {"job_id": "j", "kind": "echo"}
    out = run(pipeline, body, delivery_attempt=2, final_attempt=False)
    assert not out.ack and out.result is None and out.dead_letter is None
    out = run(pipeline, body, delivery_attempt=5, final_attempt=True)
    assert out.ack and out.result is not None and out.result.status is JobStatus.FAILED
    assert out.dead_letter is not None and out.dead_letter.attributes["delivery_attempt"] == "5"


def test_permanent_failure_fails_with_dead_letter() -> None:
    pipeline, _, _ = make(Invoker(PermanentJobError("forbidden", "needs roles/run.invoker", http_status=403)))
    out = run(pipeline, {"job_id": "j", "kind": "echo"})
    assert out.ack and out.result is not None and out.result.status is JobStatus.FAILED
    assert out.result.http_status == 403 and "roles/run.invoker" in out.result.error.message  # type: ignore[union-attr]
    assert out.dead_letter is not None and out.dead_letter.attributes["status"] == "failed"


def test_expired_job_is_not_run() -> None:
    pipeline, _, invoker = make()
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    out = run(pipeline, {"job_id": "j", "kind": "echo", "not_after": past})
    assert out.ack and out.result is not None and out.result.status is JobStatus.EXPIRED
    assert out.dead_letter is None and invoker.calls == []


def test_a_bug_in_a_collaborator_never_escapes() -> None:
    pipeline, _, _ = make(Invoker(ZeroDivisionError("boom")))
    out = run(pipeline, {"job_id": "j", "kind": "echo"})
    assert not out.ack
    out = run(pipeline, {"job_id": "j", "kind": "echo"}, final_attempt=True)
    assert out.result is not None and out.result.error.code == "internal_error"  # type: ignore[union-attr]


def test_batch_fields_travel_to_the_result() -> None:
    pipeline, _, _ = make()
    out = run(pipeline, {"job_id": "b:3", "kind": "echo", "batch": {"id": "b", "index": 3, "total": 10}})
    assert out.result is not None and out.result.batch is not None and out.result.batch.index == 3
    assert out.result.attributes()["batch_id"] == "b"


def test_a_batch_kind_goes_to_the_batch_handler_with_the_publish_time() -> None:
    seen: list[tuple[str, str, datetime | None]] = []

    async def fan_out(job, kind, delivery):  # type: ignore[no-untyped-def]
        seen.append((job.job_id, kind.kind, delivery.publish_time))
        return CallResult(200, {"children_published": 0}, 1)

    catalog = Catalog.load(default_catalog_dir())
    pipeline = Pipeline(
        catalog, Resolver(), Invoker(), region="r", max_payload_bytes=10_000, batch_handler=fan_out
    )
    published = datetime(2026, 3, 1, 23, 59, tzinfo=UTC)
    body = {"job_id": "nightly", "kind": "batch-scoring", "payload": {"source": True, "daily": True}}
    out = run(pipeline, body, publish_time=published)
    assert out.result is not None and out.result.status is JobStatus.SUCCEEDED
    assert seen == [("nightly", "batch-scoring", published)]
