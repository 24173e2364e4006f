"""The reference web app's parts without a browser: the SQLite store's idempotent
upsert and batch progress, the JSON API's input checks, and the env file round trip
between `worker dev` and `python -m examples.webapp`."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from localcloud.devstack import write_env_file

from examples.webapp.__main__ import read_env_file
from examples.webapp.app import WebappConfig, create_app
from examples.webapp.store import SqliteResultStore
from tests.doubles import GOOD, VERIFIER, envelope, result
from worker.core.settings import Settings

AUDIENCE = "https://webapp-abc123-uc.a.run.app/pubsub/results"


def child(index: int, status: str = "succeeded", batch: str = "batch-1", total: int = 4) -> Any:
    return result(f"{batch}:{index}", status, batch={"id": batch, "index": index, "total": total})


def test_the_store_keeps_one_row_per_job_and_a_success_is_final(tmp_path: Path) -> None:
    store = SqliteResultStore(tmp_path / "r.sqlite3")
    assert store.record(result("j", "failed"))
    assert not store.record(result("j", "failed"))  # a redelivery changes nothing
    assert store.record(result("j", "succeeded"))
    assert not store.record(result("j", "failed"))  # a stale failure after the success
    assert store.result("j")["status"] == "succeeded"  # type: ignore[index]
    assert store.result("nope") is None
    assert store.record(result("r", "running"))
    assert store.record(result("r", "failed"))
    assert not store.record(result("r", "running"))  # a late start never hides the end
    assert store.result("r")["status"] == "failed"  # type: ignore[index]


def test_concurrent_pushes_of_one_result_store_it_once(tmp_path: Path) -> None:
    store = SqliteResultStore(tmp_path / "r.sqlite3")
    changed: list[bool] = []
    threads = [
        threading.Thread(target=lambda: changed.append(store.record(result("same")))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert changed.count(True) == 1


def test_batch_progress_counts_each_child_once(tmp_path: Path) -> None:
    store = SqliteResultStore(tmp_path / "r.sqlite3")
    assert store.progress("batch-1")["total"] is None
    records = [child(0), child(0), child(1, "failed"), child(1), child(2, "rejected"), child(3, "running")]
    for record in records:
        store.record(record)
    progress = store.progress("batch-1")
    counts = (progress["total"], progress["succeeded"], progress["rejected"], progress["finished"])
    assert counts == (4, 2, 1, 3)
    assert progress["outstanding"] == 1 and not progress["done"]
    store.record(child(3))
    store.record(result("batch-1"))  # the batch job's own result
    assert store.progress("batch-1")["done"] and store.progress("batch-1")["batch_job"] == "succeeded"


class Publisher:
    """A stand-in Pub/Sub publisher that keeps what was published."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any], dict[str, str]]] = []

    def topic_path(self, project: str, topic: str) -> str:
        return f"projects/{project}/topics/{topic}"

    def publish(self, topic: str, data: bytes, **attributes: str) -> Future[str]:
        self.published.append((topic, json.loads(data), attributes))
        future: Future[str] = Future()
        future.set_result(str(len(self.published)))
        return future


@pytest.fixture
def app(tmp_path: Path) -> Any:
    config = WebappConfig(AUDIENCE, VERIFIER.service_account, db_path=str(tmp_path / "w.sqlite3"))
    publisher = Publisher()
    # The push tests' verifier, on stand-in certificates, so their GOOD token verifies.
    flask_app = create_app(config, Settings(project="acme", catalog_dir=None), publisher, VERIFIER)
    flask_app.config["publisher"] = publisher
    return flask_app


def test_score_and_batch_publish_jobs_and_refuse_bad_input(app: Any) -> None:
    client = app.test_client()
    job = client.post("/api/score", json={"account_id": "acme"})
    assert job.status_code == 202
    batch = client.post("/api/batches", json={"size": 3})
    assert batch.status_code == 202
    (_, score_job, _), (_, batch_job, attributes) = app.config["publisher"].published
    assert score_job["kind"] == "account-scoring" and score_job["payload"] == {"account_id": "acme"}
    assert batch_job["job_id"] == batch.get_json()["batch_id"] == attributes["job_id"]
    assert len(batch_job["payload"]["account_ids"]) == 3
    for bad in ({"account_id": ""}, {"account_id": "a b"}, {}):
        assert client.post("/api/score", json=bad).status_code == 400
    for size in (0, 1001, "3", True, None):
        assert client.post("/api/batches", json={"size": size}).status_code == 400


def test_score_in_1_minute_publishes_a_job_with_not_before_and_refuses_a_bad_delay(app: Any) -> None:
    client = app.test_client()
    before = datetime.now(UTC)
    assert client.post("/api/score", json={"account_id": "acme", "in_s": 60}).status_code == 202
    ((_, job, _),) = app.config["publisher"].published
    ahead = (datetime.fromisoformat(job["not_before"]) - before).total_seconds()
    assert 59 <= ahead <= 62
    for bad in (0, -5, "60", True, 31 * 86400, 1.5):
        answer = client.post("/api/score", json={"account_id": "acme", "in_s": bad})
        assert answer.status_code == 400 and "in_s" in answer.get_json()["error"]


def test_the_store_shows_scheduled_until_the_end_replaces_it(tmp_path: Path) -> None:
    store = SqliteResultStore(tmp_path / "s.sqlite3")
    assert store.record(result("s", "scheduled"))
    assert store.result("s")["status"] == "scheduled"
    assert store.record(result("s", "succeeded"))
    assert not store.record(result("s", "scheduled"))  # a late duplicate never hides the end
    assert store.result("s")["status"] == "succeeded"


def test_a_pushed_result_shows_up_in_the_api(app: Any) -> None:
    client = app.test_client()
    assert client.get("/api/jobs/job-1").status_code == 202
    assert client.post("/pubsub/results", data=envelope(result().to_bytes())).status_code == 401
    assert client.get("/api/jobs/job-1").status_code == 202
    body = envelope(result().to_bytes())
    pushed = client.post("/pubsub/results", data=body, headers={"Authorization": GOOD})
    assert pushed.status_code == 204
    assert client.get("/api/jobs/job-1").get_json()["response"] == {"score": 71}


def test_the_env_file_worker_dev_writes_is_what_the_web_app_reads(tmp_path: Path) -> None:
    env = {"WEBAPP_PUSH_AUDIENCE": "http://127.0.0.1:8090/pubsub/results", "ODD": 'it\'s $HOME; "q"'}
    write_env_file(str(tmp_path / "dev.env"), env)
    assert read_env_file(str(tmp_path / "dev.env")) == env


def test_the_web_app_names_the_settings_it_misses() -> None:
    with pytest.raises(SystemExit, match="WEBAPP_PUSH_AUDIENCE and WEBAPP_PUSH_SERVICE_ACCOUNT"):
        WebappConfig.from_env({})
    config = WebappConfig.from_env({"WEBAPP_PUSH_AUDIENCE": AUDIENCE, "WEBAPP_PUSH_SERVICE_ACCOUNT": "a@b.c"})
    assert config.certs_url == "https://www.googleapis.com/oauth2/v1/certs"  # local tokens only when told


def test_recent_lists_stored_jobs_newest_first_and_batches_by_their_progress(app: Any) -> None:
    store = app.config["store"]
    assert app.test_client().get("/api/recent").get_json() == {"jobs": [], "batches": []}
    store.record(result("from-the-cli"))
    store.record(result("from-dev", "failed"))
    for index in range(4):
        store.record(child(index))
    store.record(result("batch-1"))  # the batch job's own result: the batch, not a job
    recent = app.test_client().get("/api/recent").get_json()
    assert [job["job_id"] for job in recent["jobs"]] == ["from-dev", "from-the-cli"]
    assert [(b["batch_id"], b["done"], b["succeeded"]) for b in recent["batches"]] == [("batch-1", True, 4)]


def test_an_account_id_as_long_as_the_catalog_allows_is_accepted(app: Any) -> None:
    client = app.test_client()
    assert client.post("/api/score", json={"account_id": "a" * 128}).status_code == 202
    assert client.post("/api/score", json={"account_id": "a" * 129}).status_code == 400
