"""The operators' console in a real headless Chromium, on the local cloud and the emulator.

`python -m worker console --port P` runs as an operator runs it, beside three `worker
run` processes; the browser clicks what an operator clicks. Set CONSOLE_SCREENSHOT=path
to keep a screenshot (docs/img/console.png is made that way).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.cloud import pubsub_v1
from localcloud.ports import free_port

from tests.e2e.harness import REPO, WorkerProcess, provision, publish, uid, worker_cli, worker_env, write_kind
from tests.e2e.test_batch import write_batch_kind
from tests.e2e.test_run_jobs import write_run_job_kind
from tests.e2e.test_webapp_browser import CHROMIUM, CHROMIUM_ARGS
from worker.core.messages import ErrorInfo, JobStatus, Result, now

pytestmark = pytest.mark.e2e

HOSTILE_KIND = "<b>bold</b><script>window.pwned=1</script>"
HOSTILE_CODE = '<img src=x onerror="window.pwned=2">'
MEGABYTE_TEXT = "<script>window.pwned=3</script>" + "lorem <i>ipsum</i> " * 55_000


class ConsoleProcess:
    """`python -m worker console --port P` as a process."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "console", "--port", str(self.port)],
            env=env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                with urllib.request.urlopen(self.url + "/api/kinds", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"console not up in {timeout}s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent: apt-get install -y chromium (.ci/run installs it in CI)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: make test")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def stack(local_cloud: Any, pubsub_emulator: Any, names: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    suffix = uid()
    echo = local_cloud.add_service(f"echo-{suffix}", "echo")
    scoring = local_cloud.add_service(f"scoring-{suffix}", "account-scoring")
    source = local_cloud.add_service(f"source-{suffix}", "accounts-source")
    source.total_accounts = 30
    catalog = tmp_path / "jobs"
    write_kind(catalog, "echo", echo.name, attempts=1, timeout_s=5)
    write_kind(catalog, "account-scoring", scoring.name, attempts=4, backoff_initial_s=0.05)
    write_batch_kind(catalog, source.name)
    long = local_cloud.add_run_job(f"long-{suffix}", task_seconds=300)
    write_run_job_kind(catalog, "long", long.name)
    env = worker_env(local_cloud, names, WORKER_CATALOG_DIR=str(catalog), WORKER_SHUTDOWN_GRACE_SECONDS="1")
    provision(env)
    console = ConsoleProcess(env, tmp_path / "console.log")
    try:
        console.wait_ready()
        yield {"env": env, "echo": echo, "console": console, "tmp": tmp_path}
    finally:
        console.stop()
        for name in (echo.name, scoring.name, source.name):
            local_cloud.remove_service(name)


def publish_dead_letter(env: dict[str, str], data: bytes, **attributes: str) -> None:
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(env["GOOGLE_CLOUD_PROJECT"], env["WORKER_DEAD_LETTER_TOPIC"])
    publisher.publish(topic, data, **attributes).result(timeout=30)


def rescan_until(page: Any, selector: str, timeout_s: float = 60) -> Any:
    """Press Rescan until `selector` shows (dead letters arrive as the worker gives up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = page.locator(selector)
        if found.count():
            return found
        assert time.monotonic() < deadline, (
            page.locator("[data-testid=dl-summary]").inner_text()
            + page.locator("[data-testid=dl-groups]").inner_text()
            + page.locator("[data-testid=flash]").inner_text()
        )
        page.click("[data-testid=dl-rescan]")
        page.wait_for_timeout(700)


def test_dead_letters_dry_run_replay_and_their_results_live(stack: dict[str, Any], browser: Any) -> None:
    env, echo = stack["env"], stack["echo"]
    echo.error_rate, echo.error_status = 1.0, 403
    job_ids = [f"dl-{uid()}" for _ in range(5)]
    # A dead letter no worker wrote: markup and script in its kind, reason and 1 MB of data.
    publish_dead_letter(
        env,
        MEGABYTE_TEXT.encode(),
        kind=HOSTILE_KIND,
        job_id="hostile-1",
        status="failed",
        error_code=HOSTILE_CODE,
        error_message="<script>window.pwned=4</script><h1>big</h1>",
    )
    with WorkerProcess(env) as worker:
        worker.wait_ready()
        publish(env, [{"job_id": j, "kind": "echo", "payload": {"n": i}} for i, j in enumerate(job_ids)])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(stack["console"].url + "/")
        group = rescan_until(page, "[data-testid=dl-group][data-kind=echo][data-reason=forbidden]")
        deadline = time.monotonic() + 60
        while group.locator("[data-testid=dl-count]").inner_text() != "5":
            assert time.monotonic() < deadline, group.inner_text()
            page.click("[data-testid=dl-rescan]")
            page.wait_for_timeout(700)
            group = page.locator("[data-testid=dl-group][data-kind=echo][data-reason=forbidden]")

        # The hostile one is text: its markup is shown, nothing of it ran or became an element.
        hostile = page.locator("[data-testid=dl-group]", has_text="window.pwned=1")
        assert hostile.count() == 1
        assert HOSTILE_KIND in hostile.inner_text() and HOSTILE_CODE in hostile.inner_text()
        page.locator("[data-testid=dl-open]", has_text="hostile-1").click()
        data = page.locator("[data-testid=dl-detail-data]")
        data.wait_for()
        assert data.inner_text().startswith("<script>window.pwned=3</script>lorem <i>ipsum</i>")
        assert len(data.text_content() or "") == len(MEGABYTE_TEXT)
        assert page.evaluate("window.pwned") is None
        assert page.locator("main script, main b, main img, main h1, main i").count() == 0

        # The dry run first, then a confirmation that states the scope; cancel changes nothing.
        group.locator("[data-testid=dl-replay]").click()
        dialog = page.locator("[data-testid=confirm]")
        dialog.wait_for()
        text = page.locator("[data-testid=confirm-text]").inner_text()
        assert "dry run: would replay 5 jobs of kind echo, reason forbidden, skip 1; nothing changed." in text
        yes = page.locator("[data-testid=confirm-yes]")
        assert yes.inner_text() == "Replay 5 jobs of kind echo, reason forbidden"
        assert sorted(page.locator("[data-testid=confirm-list] li").all_inner_texts()) == sorted(job_ids)
        page.click("[data-testid=confirm-no]")
        assert "cancelled; nothing changed" in page.locator("[data-testid=flash]").inner_text()
        page.click("[data-testid=dl-rescan]")
        page.locator("[data-testid=dl-group][data-kind=echo] [data-testid=dl-count]:text-is('5')").wait_for()

        echo.error_rate = 0.0  # the service is fixed: the replay succeeds
        group.locator("[data-testid=dl-replay]").click()
        yes.wait_for()
        yes.click()
        page.locator("[data-testid=flash]:has-text('replayed 5, skipped 1, failed 0')").wait_for(
            timeout=30_000
        )
        for job_id in job_ids:
            page.locator(f"[data-testid=dl-watched][data-job-id='{job_id}'][data-status=succeeded]").wait_for(
                timeout=60_000
            )
        assert page.locator("[data-testid=dl-group][data-kind=echo]").count() == 0
        assert page.locator("[data-testid=dl-summary]").get_attribute("data-total") == "1"

        page.click("[data-testid=tab-results]")
        for job_id in job_ids:
            page.locator(
                f"[data-testid=rs-row][data-job-id='{job_id}'][data-status=succeeded]"
            ).first.wait_for()
        succeeded = page.locator("[data-testid=rs-count][data-kind=echo][data-status=succeeded] td").nth(2)
        assert succeeded.inner_text() == "5"
        page.fill("[data-testid=rs-job]", job_ids[0])
        page.click("[data-testid=rs-find]")
        page.locator("[data-testid=rs-found-status]:text-is('succeeded')").wait_for()
        logs = page.locator("[data-testid=rs-found] a", has_text="logs").get_attribute("href")
        assert (
            logs
            and logs.startswith("https://console.cloud.google.com/logs/query;query=")
            and job_ids[0] in logs
        )
        assert worker.stop() == 0


def test_pause_and_resume_from_the_page_show_on_worker_status_for_three_instances(
    stack: dict[str, Any], browser: Any
) -> None:
    env = stack["env"]
    workers = [WorkerProcess(env, name=f"worker-{i}") for i in range(3)]
    try:
        for worker in workers:
            worker.wait_ready()
        time.sleep(1)  # the control channels subscribe just after the consumers start
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(stack["console"].url + "/#instances")
        deadline = time.monotonic() + 30
        while page.locator("[data-testid=in-summary]").get_attribute("data-count") != "3":
            assert time.monotonic() < deadline, page.locator("[data-testid=in-summary]").inner_text()
            page.click("[data-testid=in-refresh]")
            page.wait_for_timeout(2500)

        page.select_option("[data-testid=in-kind]", "echo")
        page.fill("[data-testid=in-duration]", "15m")
        page.click("[data-testid=in-pause]")
        text = page.locator("[data-testid=confirm-text]")
        text.wait_for()
        assert "Pause echo on every worker instance (3 answered last time) for 15m?" in text.inner_text()
        page.click("[data-testid=confirm-yes]")
        flash = page.locator("[data-testid=flash]:has-text('answering worker instance(s) confirm')")
        flash.wait_for(timeout=30_000)
        assert "echo paused until " in flash.inner_text()
        assert "3 of 3 answering worker instance(s) confirm." in flash.inner_text()
        assert page.locator("[data-testid=in-confirmed]").all_inner_texts() == ["confirmed"] * 3
        assert all(
            p.startswith("echo (until ") for p in page.locator("[data-testid=in-paused]").all_inner_texts()
        )

        status = worker_cli(env, "status", "--json")
        assert status.returncode == 0, status.stderr
        replies = [json.loads(line) for line in status.stdout.splitlines()]
        assert len(replies) == 3 and all("echo" in r["paused"] for r in replies), replies

        page.click("[data-testid=in-resume]")
        assert "Resume echo on every worker instance" in text.inner_text()
        page.click("[data-testid=confirm-yes]")
        page.locator("[data-testid=flash]:has-text('echo resumed')").wait_for(timeout=30_000)
        assert (
            "3 of 3 answering worker instance(s) confirm." in page.locator("[data-testid=flash]").inner_text()
        )
        assert page.locator("[data-testid=in-paused]").all_inner_texts() == ["-"] * 3
        status = worker_cli(env, "status", "--json")
        replies = [json.loads(line) for line in status.stdout.splitlines()]
        assert len(replies) == 3 and not any(r["paused"] for r in replies), replies

        # An unknown kind gets the CLI's own sentence.
        page.evaluate("document.getElementById('in-kind').append(new Option('no-such-kind', 'no-such-kind'))")
        page.select_option("[data-testid=in-kind]", "no-such-kind")
        page.click("[data-testid=in-pause]")
        page.click("[data-testid=confirm-yes]")
        page.locator(
            "[data-testid=flash][data-kind=error]:has-text(\"unknown kind 'no-such-kind'\")"
        ).wait_for()
        assert (
            "known kinds: account-scoring, batch-scoring, echo, long"
            in page.locator("[data-testid=flash]").inner_text()
        )
    finally:
        for worker in workers:
            worker.kill()


def test_a_batch_bar_reaches_done(stack: dict[str, Any], browser: Any) -> None:
    env = stack["env"]
    batch_id = f"batch-{uid()}"
    with WorkerProcess(env) as worker:
        worker.wait_ready()
        page = browser.new_page(viewport={"width": 1280, "height": 600})
        page.goto(stack["console"].url + "/#batches")
        publish(env, [{"job_id": batch_id, "kind": "batch-scoring", "payload": {"source": True}}])
        batch = page.locator(f"[data-testid=batch][data-batch-id='{batch_id}'][data-done=true]")
        batch.wait_for(timeout=90_000)
        assert (
            batch.locator("[data-testid=batch-text]")
            .inner_text()
            .startswith("30 of 30 finished: 30 succeeded")
        )
        assert batch.locator("[data-testid=batch-bar]").get_attribute("value") == "30"
        assert worker.stop() == 0

    # A hostile result on the results topic is text on the live page too.
    hostile = Result(
        job_id="<script>window.pwned=5</script>",
        kind="<b>bold</b>",
        status=JobStatus.FAILED,
        error=ErrorInfo(code="<i>x</i>", message='<img src=x onerror="window.pwned=6">'),
        started_at=now(),
        finished_at=now(),
        duration_ms=1,
    )
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(env["GOOGLE_CLOUD_PROJECT"], env["WORKER_RESULTS_TOPIC"])
    publisher.publish(topic, hostile.to_bytes()).result(timeout=30)
    page.click("[data-testid=tab-results]")
    row = page.locator("[data-testid=rs-row][data-status=failed]", has_text="window.pwned=5")
    row.wait_for(timeout=30_000)
    assert "<b>bold</b>" in row.inner_text() and 'onerror="window.pwned=6"' in row.inner_text()
    assert page.evaluate("window.pwned") is None
    assert page.locator("main script, main b, main img, main i").count() == 0


def test_a_running_execution_is_cancelled_from_the_page(stack: dict[str, Any], browser: Any) -> None:
    env = stack["env"]
    job_id = f"long-{uid()}"
    with WorkerProcess(env) as worker:
        worker.wait_ready()
        publish(env, [{"job_id": job_id, "kind": "long", "payload": None}])
        page = browser.new_page(viewport={"width": 1280, "height": 600})
        page.goto(stack["console"].url + "/#executions")
        running = page.locator(f"[data-testid=ex-row][data-job-id='{job_id}'][data-state=running]")
        deadline = time.monotonic() + 30
        while not running.count():
            assert time.monotonic() < deadline, page.locator("[data-testid=ex-summary]").inner_text()
            page.click("[data-testid=ex-refresh]")
            page.wait_for_timeout(700)
        running.locator("[data-testid=ex-cancel]").click()
        text = page.locator("[data-testid=confirm-text]").inner_text()
        assert text.startswith("Cancel execution ") and f"of job {job_id} (kind long)?" in text
        page.click("[data-testid=confirm-yes]")
        flash = page.locator("[data-testid=flash]:has-text('published job')")
        flash.wait_for(timeout=60_000)
        assert f"published job {job_id}'s `cancelled` result" in flash.inner_text()
        page.locator(f"[data-testid=ex-row][data-job-id='{job_id}'][data-state=cancelled]").wait_for()
        page.click("[data-testid=tab-results]")
        page.locator(f"[data-testid=rs-row][data-job-id='{job_id}'][data-status=cancelled]").first.wait_for()

        # Nothing left to cancel: the CLI's own sentence, as an error.
        page.click("[data-testid=tab-executions]")
        page.evaluate(
            "fetch('/api/cancel', {method: 'POST', headers: {'Content-Type': 'application/json', "
            f"'X-Worker-Console': '1'}}, body: JSON.stringify({{job_id: '{job_id}'}})}})"
            ".then(r => r.json()).then(d => {{ window.again = d; }})"
        )
        page.wait_for_function("window.again !== undefined", timeout=60_000)
        again = page.evaluate("window.again")
        assert not again["ok"] and f"job {job_id} has no running execution" in again["message"]
        assert worker.stop() == 0


def test_ten_thousand_dead_letters_page_in_under_two_seconds(stack: dict[str, Any], browser: Any) -> None:
    env = stack["env"]
    publisher = pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=1000, max_latency=0.05)
    )
    topic = publisher.topic_path(env["GOOGLE_CLOUD_PROJECT"], env["WORKER_DEAD_LETTER_TOPIC"])
    futures = [
        publisher.publish(
            topic,
            json.dumps({"job_id": f"many-{i}", "kind": "echo", "payload": {"n": i}}).encode(),
            job_id=f"many-{i}",
            kind="echo" if i % 2 else "account-scoring",
            status="failed",
            error_code=("http_403", "http_500", "timeout")[i % 3],
            error_message=f"the service answered badly <{i}>",
        )
        for i in range(10_000)
    ]
    for future in futures:
        future.result(timeout=120)
    publisher.stop()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(stack["console"].url + "/")
    rescan_until(page, "[data-testid=dl-summary][data-total='10000']", timeout_s=120)
    scan = page.locator("[data-testid=dl-summary]").inner_text()

    started = time.monotonic()
    page.goto(stack["console"].url + "/")  # a fresh page over the console's scan
    page.locator("[data-testid=dl-summary][data-total='10000']").wait_for()
    assert page.locator("[data-testid=dl-row]").count() == 100
    first_page_s = time.monotonic() - started
    assert page.locator("[data-testid=dl-group]").count() == 6
    assert page.locator("[data-testid=dl-page]").inner_text() == "1-100 of 10000"

    started = time.monotonic()
    page.click("[data-testid=dl-next]")
    page.locator("[data-testid=dl-page]:text-is('101-200 of 10000')").wait_for()
    next_page_s = time.monotonic() - started
    print(f"\n10,000 dead letters: {scan}; first page {first_page_s:.2f}s, next page {next_page_s:.2f}s")
    assert first_page_s < 2.0 and next_page_s < 2.0, (first_page_s, next_page_s)
    screenshot = os.environ.get("CONSOLE_SCREENSHOT")
    if screenshot:
        page.goto(stack["console"].url + "/")
        page.locator("[data-testid=dl-row]").first.wait_for()
        page.screenshot(path=screenshot)


def test_a_scheduled_job_is_cancelled_from_the_page_and_the_other_still_waits(
    stack: dict[str, Any], browser: Any
) -> None:
    from datetime import timedelta
    from unittest import mock

    from worker.client import enqueue
    from worker.core.settings import load_settings

    env = stack["env"]
    keep, drop = f"keep-{uid()}", f"drop-{uid()}"
    with WorkerProcess(env) as worker:
        worker.wait_ready()
        with mock.patch.dict(os.environ, env):
            settings = load_settings()
            for job_id, minutes in ((drop, 4), (keep, 5)):
                enqueue("echo", {"n": 1}, job_id, settings=settings, not_before=timedelta(minutes=minutes))
        page = browser.new_page(viewport={"width": 1280, "height": 600})
        page.goto(stack["console"].url + "/#scheduled")
        rows = {j: page.locator(f"[data-testid=sc-row][data-job-id='{j}']") for j in (keep, drop)}
        deadline = time.monotonic() + 30  # the worker puts each off once it pulls it
        while not (rows[keep].count() and rows[drop].count()):
            assert time.monotonic() < deadline, page.locator("[data-testid=sc-summary]").inner_text()
            page.click("[data-testid=sc-refresh]")
            page.wait_for_timeout(700)
        assert rows[drop].get_attribute("data-kind") == "echo"

        # The confirmation states its scope; saying no changes nothing.
        rows[drop].locator("[data-testid=sc-cancel]").click()
        text = page.locator("[data-testid=confirm-text]").inner_text()
        assert text.startswith(f"Cancel scheduled job {drop} of kind echo?"), text
        page.click("[data-testid=confirm-no]")
        assert page.locator("[data-testid=flash]").inner_text() == "cancelled: nothing sent."
        page.click("[data-testid=sc-refresh]")
        page.wait_for_timeout(500)
        assert rows[drop].count() == 1

        rows[drop].locator("[data-testid=sc-cancel]").click()
        assert (
            page.locator("[data-testid=confirm-yes]").inner_text()
            == f"Cancel scheduled job {drop} of kind echo"
        )
        page.click("[data-testid=confirm-yes]")
        flash = page.locator("[data-testid=flash]:has-text('published its')")
        flash.wait_for(timeout=60_000)
        said = flash.inner_text()
        assert said.startswith(f"cancelled job {drop} before its not_before (") and said.endswith(
            "; published its `cancelled` result"
        ), said
        assert page.locator("[data-testid=flash]").get_attribute("data-kind") == "ok"
        assert rows[drop].count() == 0 and rows[keep].count() == 1  # the list came back with the answer
        page.locator(f"[data-testid=sc-watched][data-job-id='{drop}'][data-status=cancelled]").wait_for(
            timeout=30_000
        )
        page.click("[data-testid=tab-results]")
        page.locator(f"[data-testid=rs-row][data-job-id='{drop}'][data-status=cancelled]").first.wait_for()

        # Still scheduled for `worker scheduled` too; the cancelled one is not.
        listed = worker_cli(env, "scheduled", "--kind", "echo", "--json")
        assert listed.returncode == 0, listed.stderr
        waiting = {json.loads(line)["job_id"] for line in listed.stdout.splitlines()}
        assert keep in waiting and drop not in waiting

        # Cancelling it again: the CLI's own sentence, as an error.
        page.click("[data-testid=tab-scheduled]")
        page.evaluate(
            "fetch('/api/scheduled/cancel', {method: 'POST', headers: {'Content-Type': 'application/json', "
            f"'X-Worker-Console': '1'}}, body: JSON.stringify({{job_id: '{drop}', kind: 'echo'}})}})"
            ".then(r => r.json()).then(d => {{ window.again = d; }})"
        )
        page.wait_for_function("window.again !== undefined", timeout=60_000)
        again = page.evaluate("window.again")
        assert not again["ok"] and again["message"].startswith(f"job {drop} is not scheduled (no task for it")
        worker_cli(env, "cancel", keep)
        assert worker.stop() == 0
