"""The console's backend and HTTP side without Pub/Sub: a fake subscriber hands out dead
letters; the page's guards, errors and views are asserted through aiohttp's test client.
The browser test (tests/e2e/test_console_browser.py) drives the same on the emulator."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner
from google.api_core import exceptions
from google.cloud.pubsub_v1 import types

from tests.aio import run_async
from worker.cli import cli
from worker.cli.console import explain, is_loopback
from worker.console.app import CSP, make_app
from worker.console.backend import (
    NO_KIND,
    Backend,
    ConsoleError,
    LiveResults,
    groups,
    logging_url,
    scope,
)
from worker.core.messages import BatchRef, JobStatus, Result
from worker.core.settings import load_settings
from worker.ops.operations import DeadLetterEntry

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def received(i: int, kind: str | None, code: str | None, *, data: bytes = b"{}", **extra: str) -> Any:
    attrs = {"job_id": f"job-{i}", "status": "failed", "error_message": f"boom {i}", **extra}
    if kind:
        attrs["kind"] = kind
    if code:
        attrs["error_code"] = code
    attrs["dead_lettered_at"] = (T0 + timedelta(minutes=i)).isoformat()
    return types.ReceivedMessage(
        ack_id=f"ack-{i}",
        message=types.PubsubMessage(data=data, attributes=attrs, message_id=f"m-{i}"),
    )


class FakeSubscriber:
    """Pull hands out the messages once per scan; modify_ack_deadline(0) gives them back."""

    def __init__(self, messages: list[Any], fail: Exception | None = None) -> None:
        self.messages = messages
        self.fail = fail
        self.out: set[str] = set()
        self.acked: list[str] = []

    @staticmethod
    def subscription_path(project: str, name: str) -> str:
        return f"projects/{project}/subscriptions/{name}"

    def pull(self, **_: Any) -> Any:
        if self.fail is not None:
            raise self.fail
        fresh = [m for m in self.messages if m.ack_id not in self.out and m.ack_id not in self.acked]
        self.out |= {m.ack_id for m in fresh}
        return types.PullResponse(received_messages=fresh)

    def modify_ack_deadline(self, *, ack_ids: list[str], ack_deadline_seconds: int, **_: Any) -> None:
        if ack_deadline_seconds == 0:
            self.out -= set(ack_ids)

    def acknowledge(self, *, ack_ids: list[str], **_: Any) -> None:
        self.acked += ack_ids
        self.out -= set(ack_ids)


class FakeFuture:
    def result(self, timeout: float | None = None) -> str:
        return "id"

    def add_done_callback(self, fn: Any) -> None:
        fn(self)

    def done(self) -> bool:
        return True


class FakePublisher:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, dict[str, str]]] = []

    @staticmethod
    def topic_path(project: str, name: str) -> str:
        return f"projects/{project}/topics/{name}"

    def publish(self, topic: str, data: bytes, **attrs: str) -> Any:
        import concurrent.futures

        self.published.append((topic, data, attrs))
        future: concurrent.futures.Future[str] = concurrent.futures.Future()
        future.set_result("id")
        return future


def backend(
    messages: list[Any], fail: Exception | None = None
) -> tuple[Backend, FakeSubscriber, FakePublisher]:
    settings = load_settings(GOOGLE_CLOUD_PROJECT="p")
    subscriber, publisher = FakeSubscriber(messages, fail), FakePublisher()
    made = Backend(
        settings,
        publisher,
        subscriber,
        explain=lambda exc: explain(settings, exc),
        check_kind=lambda kind: None,
        parse_duration=float,
        kinds=["echo", "scoring"],
    )
    return made, subscriber, publisher


def mixed() -> list[Any]:
    return [
        *(received(i, "echo", "forbidden", **({"lane": "batch"} if i == 2 else {})) for i in range(3)),
        received(3, "echo", "timeout"),
        received(4, "scoring", "forbidden"),
        received(5, None, None),
    ]


def test_groups_count_by_kind_and_reason_with_first_and_last_seen() -> None:
    entries = [DeadLetterEntry.from_received(m) for m in mixed()]
    found = groups(entries)
    assert [(g["kind"], g["reason"], g["count"]) for g in found] == [
        ("echo", "forbidden", 3),
        ("", "failed", 1),
        ("echo", "timeout", 1),
        ("scoring", "forbidden", 1),
    ]
    assert (found[0]["first"], found[0]["last"]) == (T0.isoformat(), (T0 + timedelta(minutes=2)).isoformat())


def test_scope_is_the_sentence_a_confirmation_states() -> None:
    assert (
        scope(312, "account-scoring", "http_403")
        == "replay 312 jobs of kind account-scoring, reason http_403"
    )
    assert scope(1, "echo", None) == "replay 1 job of kind echo"


def test_dry_run_then_replay_only_the_confirmed_count_of_kind_and_reason() -> None:
    made, subscriber, publisher = backend(mixed())
    dry = made.dry_run("echo", "forbidden")
    assert (dry["count"], dry["skipped"]) == (3, 3)
    assert dry["scope"] == "replay 3 jobs of kind echo, reason forbidden"
    assert publisher.published == [] and subscriber.acked == [] and subscriber.out == set()

    subscriber.messages.append(received(9, "echo", "forbidden"))  # arrived after the dry run
    done = made.replay("echo", "forbidden", dry["count"])
    assert done["message"] == "replayed 3, skipped 4, failed 0"
    assert sorted(subscriber.acked) == ["ack-0", "ack-1", "ack-2"]
    assert [attrs["job_id"] for _, _, attrs in publisher.published] == ["job-0", "job-1", "job-2"]
    # Each down the lane it came from, as `worker replay` sends it.
    assert [topic for topic, _, _ in publisher.published] == [
        "projects/p/topics/jobs",
        "projects/p/topics/jobs",
        "projects/p/topics/jobs-batch",
    ]
    # The list was rescanned: what is left, the late one included.
    assert made.dead_letters(kind=None, reason=None, offset=0)["total"] == 4


def test_replay_needs_a_kind_and_a_positive_count() -> None:
    made, _, publisher = backend(mixed())
    for call in (lambda: made.dry_run(None, "forbidden"), lambda: made.replay(None, None, 3)):
        with pytest.raises(ConsoleError, match="choose a kind"):
            call()
    with pytest.raises(ConsoleError, match="nothing to replay"):
        made.replay("echo", "forbidden", 0)
    assert publisher.published == [] and NO_KIND.startswith("choose a kind")


def test_pubsub_refusals_read_as_the_clis_sentences() -> None:
    made, _, _ = backend([], fail=exceptions.PermissionDenied("User not authorized"))
    with pytest.raises(ConsoleError) as caught:
        made.rescan()
    assert str(caught.value) == (
        "User not authorized: your credentials lack a Pub/Sub role on it; see "
        "`worker setup --print-gcloud` for the bindings"
    )
    made, _, _ = backend([], fail=exceptions.NotFound("Subscription does not exist"))
    with pytest.raises(ConsoleError, match="create the topics and subscriptions with `worker setup`"):
        made.dry_run("echo", None)


def test_pages_of_ten_thousand_are_served_from_one_scan() -> None:
    made, _, _ = backend([received(i, "echo", ("a", "b")[i % 2]) for i in range(10_000)])
    made.rescan()
    page = made.dead_letters(kind="echo", reason="b", offset=4_900)
    assert (page["total"], page["matching"], len(page["entries"])) == (10_000, 5_000, 100)
    assert page["entries"][0]["job_id"] == "job-9801"
    last = made.dead_letters(kind=None, reason=None, offset=99_999)
    assert (last["offset"], last["entries"]) == (10_000, [])


def result(job_id: str, status: JobStatus, *, batch: BatchRef | None = None, **extra: Any) -> bytes:
    return Result(
        job_id=job_id,
        kind="scoring",
        status=status,
        started_at=T0,
        finished_at=T0,
        duration_ms=5,
        batch=batch,
        **extra,
    ).to_bytes()


def test_live_results_count_rate_latest_and_batches() -> None:
    live = LiveResults("p")
    live.add(result("a", JobStatus.FAILED), at=1000.2)
    live.add(result("a", JobStatus.SUCCEEDED, trace_id="ab" * 16), at=1000.7)
    for i in range(2):
        live.add(result(f"b:{i}", JobStatus.SUCCEEDED, batch=BatchRef(id="b", index=i, total=2)), at=1001)
    live.add(b"<not a result>", at=1001)
    view = live.view(at=1001.5)
    assert view["rate"][-2:] == [2, 2] and len(view["rate"]) == 120
    assert {(c["status"], c["count"]) for c in view["counts"]} == {("failed", 1), ("succeeded", 3)}
    assert view["unreadable"] == 1
    latest = live.job("a")
    assert latest is not None and latest["status"] == "succeeded"
    assert latest["trace"] == f"https://console.cloud.google.com/traces/list?tid={'ab' * 16}&project=p"
    assert [b["batch_id"] for b in live.batch_view()] == ["b"]
    assert live.batch_view()[0]["done"] and live.batch_view()[0]["finished"] == 2
    assert [r["job_id"] for r in live.view(status="failed")["results"]] == ["a"]


def test_a_hostile_job_id_cannot_break_out_of_the_logging_link() -> None:
    url = logging_url("p", '"><script>x</script>')
    assert "<" not in url and '"' not in url and " " not in url


def test_only_loopback_binds_without_the_flag() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "::", "example.com"))
    done = CliRunner().invoke(cli, ["console", "--host", "0.0.0.0"], env={"GOOGLE_CLOUD_PROJECT": "p"})
    assert done.exit_code == 2
    assert done.output.startswith("worker: error: --host 0.0.0.0 is not a loopback address")
    assert "--allow-remote" in done.output


async def client_for(made: Backend) -> TestClient:
    made.start_live = lambda: None  # type: ignore[method-assign]  # no results topic here
    made.stop_live = lambda: None  # type: ignore[method-assign]
    client = TestClient(TestServer(make_app(made)))
    await client.start_server()
    return client


@run_async
async def test_page_headers_and_the_guards_against_other_sites() -> None:
    made, _, publisher = backend(mixed())
    client = await client_for(made)
    try:
        page = await client.get("/")
        assert page.status == 200 and page.headers["Content-Security-Policy"] == CSP
        assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
        assert '<script src="/static/console.js"' in await page.text()

        rebound = await client.get("/api/kinds", headers={"Host": "evil.example:8089"})
        assert rebound.status == 421
        assert "is not this console's" in (await rebound.json())["error"]

        forged = await client.post("/api/replay", data=json.dumps({"kind": "echo", "count": 3}))
        assert forged.status == 403 and "X-Worker-Console" in (await forged.json())["error"]
        assert publisher.published == []

        no_count = await client.post("/api/replay", json={"kind": "echo"}, headers={"X-Worker-Console": "1"})
        assert no_count.status == 400 and "dry run first" in (await no_count.json())["error"]

        refused = await client.post("/api/dry-run", json={}, headers={"X-Worker-Console": "1"})
        assert refused.status == 502 and (await refused.json())["error"] == NO_KIND

        listed = await (await client.get("/api/dead-letters?kind=echo&reason=forbidden")).json()
        assert (listed["total"], listed["matching"]) == (6, 3)
        none_kind = await (await client.get("/api/dead-letters?kind=")).json()
        assert [e["job_id"] for e in none_kind["entries"]] == ["job-5"]
        detail = await (await client.get("/api/dead-letters/m-4")).json()
        assert (detail["kind"], detail["attributes"]["error_code"]) == ("scoring", "forbidden")
        gone = await client.get("/api/dead-letters/m-99")
        assert gone.status == 404 and "press Rescan" in (await gone.json())["error"]
    finally:
        await client.close()


def execution(name: str, job_id: str, *, done: bool, created_min: int) -> Any:
    from google.cloud import run_v2

    return run_v2.Execution(
        name=f"projects/p/locations/r/jobs/j/executions/{name}",
        task_count=1,
        succeeded_count=1 if done else 0,
        create_time=T0 + timedelta(minutes=created_min),
        completion_time=T0 + timedelta(minutes=created_min + 1) if done else None,
        template=run_v2.TaskTemplate(
            containers=[run_v2.Container(env=[run_v2.EnvVar(name="WORKER_JOB_ID", value=job_id)])]
        ),
    )


class FakeExecutions:
    def __init__(self, listed: list[Any] | Exception) -> None:
        self.listed = listed

    def list_executions(self, *, request: dict[str, Any], **_: Any) -> Any:
        if isinstance(self.listed, Exception):
            raise self.listed
        assert request["parent"] == "projects/p/locations/europe-west1/jobs/rescore-job"
        return iter(self.listed)


def with_executions(client: FakeExecutions, cancel: Any = None) -> Backend:
    from worker.cli.console import explain_admin_api

    made, _, _ = backend([])
    made._run_jobs = [("rescore", "rescore-job", "europe-west1")]
    made._executions_client = lambda: client
    made._explain_run = explain_admin_api
    if cancel:
        made._cancel = cancel
    return made


def test_executions_running_first_then_newest_and_cancel_says_what_the_cli_said() -> None:
    listed = [
        execution("old", "a", done=True, created_min=0),
        execution("new", "b", done=True, created_min=5),
        execution("run", "c", done=False, created_min=1),
    ]
    asked: list[str] = []
    made = with_executions(
        FakeExecutions(listed), cancel=lambda job_id: (asked.append(job_id) or True, "said")
    )
    rows = made.executions()["executions"]
    assert [(r["short"], r["job_id"], r["state"]) for r in rows] == [
        ("run", "c", "running"),
        ("new", "b", "succeeded"),
        ("old", "a", "succeeded"),
    ]
    done = made.cancel("c")
    assert (asked, done["ok"], done["message"]) == (["c"], True, "said")


def test_an_admin_api_refusal_names_the_role() -> None:
    made = with_executions(FakeExecutions(exceptions.Forbidden("caller lacks run.executions.list")))
    shown = made.executions()
    assert shown["executions"] == []
    assert "listing executions needs roles/run.viewer" in shown["message"]
    assert shown["message"].startswith(
        "projects/p/locations/europe-west1/jobs/rescore-job: the Admin API refused"
    )


# -- scheduled jobs: `worker scheduled` and `worker cancel`'s path, on the local Cloud Tasks


def scheduled_console(cloud: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Backend, FakePublisher, Any]:
    """The backend wired as `worker console` wires it; only the results publisher is a fake."""
    from functools import partial

    from worker.cli import later
    from worker.cli.console import cancel_scheduled_job, list_scheduled
    from worker.gcp.delay import TaskDeferrer, queue_path
    from worker.runtime.app import access_credentials, tasks_client

    settings = load_settings()
    publisher = FakePublisher()
    monkeypatch.setattr(later, "operator_clients", lambda _: (publisher, None))
    made, _, _ = backend([])
    made._scheduled = partial(list_scheduled, settings)
    made._cancel_scheduled = partial(cancel_scheduled_job, settings)
    timer = TaskDeferrer(
        tasks_client(settings, access_credentials(settings)),
        queue_path(settings.project, settings.region, settings.delay_queue),
        f"projects/{settings.project}/topics/{settings.jobs_topic}",
        service_account=cloud.worker_email,
        pubsub_endpoint="http://127.0.0.1:9",  # never reached: every task is hours ahead
    )
    return made, publisher, timer


def schedule(timer: Any, job_id: str, kind: str, due: datetime) -> str:
    import asyncio

    from worker.core.messages import decode_job
    from worker.core.shapes import Delivery

    body = {"job_id": job_id, "kind": kind, "payload": {}, "not_before": due.isoformat()}
    d = Delivery(data=json.dumps(body).encode(), attributes={"job_id": job_id})
    return asyncio.run(timer.defer(decode_job(d.data, d.attributes, max_bytes=10_000), d, due))


def test_scheduled_jobs_page_and_cancel_one_as_worker_cancel_does(
    local_cloud: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uuid

    made, publisher, timer = scheduled_console(local_cloud, monkeypatch)
    kind = f"<b>later</b>-{uuid.uuid4().hex[:6]}"  # a kind is free text: the page puts it in as text
    soon = datetime.now(UTC) + timedelta(hours=2)
    ids = [f"j{i}:{uuid.uuid4().hex[:6]}" for i in range(3)]
    tasks = [schedule(timer, job_id, kind, soon + timedelta(minutes=i)) for i, job_id in enumerate(ids)]

    first = made.scheduled(kind=kind, limit=2)
    assert (first["matching"], first["offset"]) == (3, 0)
    assert [(j["job_id"], j["kind"], j["task"]) for j in first["jobs"]] == list(
        zip(ids[:2], [kind] * 2, tasks[:2], strict=True)
    )  # soonest first
    assert first["jobs"][0]["not_before"] == soon.isoformat()
    assert first["jobs"][0]["short"] == tasks[0].rsplit("/", 1)[1]
    second = made.scheduled(kind=kind, offset=2, limit=2)
    assert [j["job_id"] for j in second["jobs"]] == ids[2:]

    # The wrong kind deletes nothing: the confirmation named job X of kind K.
    wrong = made.cancel_scheduled(ids[0], "other-kind")
    assert not wrong["ok"] and wrong["message"].startswith(f"job {ids[0]} is not scheduled (no task for it")
    assert publisher.published == []

    done = made.cancel_scheduled(ids[0], kind)
    assert done["ok"], done["message"]
    assert done["message"] == (
        f"cancelled job {ids[0]} before its not_before ({soon}): deleted {tasks[0]}; "
        "published its `cancelled` result"
    )
    assert ids[0] not in [j["job_id"] for j in done["jobs"]]
    assert [j["job_id"] for j in made.scheduled(kind=kind)["jobs"]] == ids[1:]
    ((topic, data, attrs),) = publisher.published
    result = Result.model_validate_json(data)
    assert topic.endswith("/topics/" + made.settings.results_topic)
    assert (result.job_id, result.kind, result.status) == (ids[0], kind, JobStatus.CANCELLED)
    assert result.error is not None and result.error.code == "scheduled_cancelled"
    assert result.task == tasks[0] and attrs["job_id"] == ids[0]

    again = made.cancel_scheduled(ids[0], kind)
    assert not again["ok"] and "it ran already, was cancelled, or had no not_before" in again["message"]
    for job_id in ids[1:]:
        assert made.cancel_scheduled(job_id, kind)["ok"]
    assert made.scheduled(kind=kind)["matching"] == 0


def test_cloud_tasks_away_or_refusing_reads_as_the_clis_sentence(
    local_cloud: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    made, publisher, _ = scheduled_console(local_cloud, monkeypatch)
    from worker.cli import later

    def refused(_: Any) -> Any:
        class Refusing:
            def list_tasks(self, **_: Any) -> Any:
                raise exceptions.Forbidden("caller lacks cloudtasks.tasks.list")

            delete_task = list_tasks

        return "projects/p/locations/r/queues/q", Refusing()

    monkeypatch.setattr(later, "_queue_and_client", refused)
    with pytest.raises(ConsoleError, match=r"listing needs roles/cloudtasks\.viewer on the queue"):
        made.scheduled()
    failed = made.cancel_scheduled("a", "echo")
    assert not failed["ok"] and failed["message"].startswith("Cloud Tasks refused on projects/p/")
    assert "(the list was not refreshed: Cloud Tasks refused" in failed["message"]
    assert publisher.published == []


@run_async
async def test_the_scheduled_api_needs_the_header_a_job_id_and_a_kind() -> None:
    made, _, _ = backend([])
    asked: list[tuple[str, str]] = []
    made._scheduled = lambda: ("projects/p/locations/r/queues/q", [])
    made._cancel_scheduled = lambda job_id, kind: (asked.append((job_id, kind)) or False, "the CLI's words")
    client = await client_for(made)
    try:
        forged = await client.post("/api/scheduled/cancel", data=json.dumps({"job_id": "a", "kind": "echo"}))
        assert forged.status == 403 and "X-Worker-Console" in (await forged.json())["error"]
        no_kind = await client.post(
            "/api/scheduled/cancel", json={"job_id": "a"}, headers={"X-Worker-Console": "1"}
        )
        assert no_kind.status == 400 and "job id and kind" in (await no_kind.json())["error"]
        bad = await client.get("/api/scheduled?offset=x")
        assert bad.status == 400
        assert asked == []
        said = await client.post(
            "/api/scheduled/cancel", json={"job_id": "a", "kind": "echo"}, headers={"X-Worker-Console": "1"}
        )
        body = await said.json()
        assert (asked, body["ok"], body["message"], body["jobs"]) == (
            [("a", "echo")],
            False,
            "the CLI's words",
            [],
        )
        unwired = Backend(
            made.settings,
            FakePublisher(),
            FakeSubscriber([]),
            explain=lambda e: None,
            check_kind=lambda k: None,
            parse_duration=float,
        )
        with pytest.raises(ConsoleError, match="start the console with `worker console`"):
            unwired.scheduled()
    finally:
        await client.close()
