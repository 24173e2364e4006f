"""The reference web app in a real headless Chromium: click Score and see the score,
start a batch and see its progress bar finish.

Everything runs as documented: `worker run` on the local cloud, the web app started
with `python -m examples.webapp --env-file FILE` (what `make webapp` runs) from the
file `worker dev` writes, and results pushed to it by the local cloud's push
deliverer with an OIDC token the web app verifies. Set WEBAPP_SCREENSHOT=path to keep
a screenshot (docs/webapp.png is made that way).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.cloud import pubsub_v1
from localcloud.devstack import push_service_account, webapp_env, write_env_file
from localcloud.functions import score_account
from localcloud.ports import free_port

from tests.e2e.harness import REPO, WorkerProcess, provision, uid, worker_cli, worker_env, write_kind
from tests.e2e.test_batch import write_batch_kind

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BATCH = 25


class WebApp:
    """`python -m examples.webapp --env-file FILE` as a process on a free port."""

    def __init__(self, env_file: Path, db: Path, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = db.with_suffix(".log")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "examples.webapp",
                "--env-file",
                str(env_file),
                "--port",
                str(self.port),
                "--db",
                str(db),
            ],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                with urllib.request.urlopen(self.url + "/", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"web app not up in {timeout}s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
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
    scoring = local_cloud.add_service(f"scoring-{suffix}", "account-scoring")
    source = local_cloud.add_service(f"source-{suffix}", "accounts-source")
    catalog = tmp_path / "jobs"
    write_kind(catalog, "account-scoring", scoring.name)
    write_batch_kind(catalog, source.name)
    env = worker_env(local_cloud, names, WORKER_CATALOG_DIR=str(catalog), WORKER_LOG_FORMAT="json")
    provision(env)

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/pubsub/results"
    # The file `worker dev` writes, with this test's topic names and catalog.
    env_file = tmp_path / "worker-dev.env"
    write_env_file(
        str(env_file),
        {
            **webapp_env(local_cloud, pubsub_emulator.host, endpoint),
            **names.env,
            "WORKER_CATALOG_DIR": str(catalog),
        },
    )
    subscriber = pubsub_v1.SubscriberClient()
    deliverer = local_cloud.push_deliverer(
        subscriber,
        subscriber.subscription_path(pubsub_emulator.project, f"{names.results_subscription}-push"),
        endpoint,
        service_account=push_service_account(local_cloud.project),
        topic=f"projects/{pubsub_emulator.project}/topics/{names.results_topic}",
    ).start()
    db = tmp_path / "webapp.sqlite3"
    with WorkerProcess(env) as worker:
        app = WebApp(env_file, db, port)
        try:
            worker.wait_ready()
            app.wait_ready()
            yield {"app": app, "db": db, "deliverer": deliverer, "worker": worker, "env": env}
        finally:
            deliverer.stop()
            app.stop()


def test_score_an_account_and_watch_a_batch_finish_in_chromium(stack: dict[str, Any], browser: Any) -> None:
    page = browser.new_page(viewport={"width": 1100, "height": 330})
    page.goto(stack["app"].url + "/")

    page.fill("[data-testid=account-id]", "acme-corp")
    page.click("[data-testid=score]")
    row = page.locator("[data-testid=job]").first
    row.locator("[data-testid=status]:text('succeeded')").wait_for(timeout=60_000)
    expected = score_account({"account_id": "acme-corp"})
    assert row.locator("[data-testid=score-value]").inner_text() == str(expected)

    page.fill("[data-testid=batch-size]", str(BATCH))
    page.click("[data-testid=start-batch]")
    page.locator("[data-testid=batch][data-done=true]").wait_for(timeout=90_000)
    text = page.locator("[data-testid=progress-text]").first.inner_text()
    assert text.startswith(f"{BATCH} of {BATCH} scored"), text
    assert page.locator("[data-testid=progress]").first.get_attribute("aria-valuenow") == str(BATCH)
    page.wait_for_timeout(400)  # the bar's width transition, for the screenshot
    screenshot = os.environ.get("WEBAPP_SCREENSHOT")
    if screenshot:
        page.screenshot(path=screenshot)

    # A job the page did not publish (the CLI's, as `worker dev`'s samples) shows up by itself.
    published = worker_cli(
        stack["env"], "enqueue", "account-scoring", "--payload", '{"account_id": "from-cli"}'
    )
    assert published.returncode == 0, published.stderr
    cli_row = page.locator(f"[data-testid=job][data-job-id='{published.stdout.strip()}']")
    cli_row.locator("[data-testid=status]:text('succeeded')").wait_for(timeout=60_000)
    assert cli_row.locator("td").first.inner_text() == "from-cli"

    # A reload forgets nothing: the page draws what the store holds.
    page.reload()
    account = page.locator("[data-testid=job]:has-text('acme-corp')")
    account.locator("[data-testid=status]:text('succeeded')").wait_for(timeout=10_000)
    assert account.locator("[data-testid=score-value]").inner_text() == str(expected)
    page.locator("[data-testid=job]:has-text('from-cli')").wait_for(timeout=10_000)
    done = page.locator("[data-testid=batch][data-done=true]")
    done.wait_for(timeout=10_000)
    assert done.locator("[data-testid=progress-text]").inner_text().startswith(f"{BATCH} of {BATCH} scored")
    assert page.locator("[data-testid=job]").count() == 2, "the batch's children are in its bar, not rows"

    # A phone's width: one column, nothing wider than the screen.
    page.set_viewport_size({"width": 420, "height": 800})
    overflow = page.evaluate(
        """() => [document.documentElement, ...document.querySelectorAll('main, section, table')]
              .filter(el => el.scrollWidth > el.clientWidth + 1).map(el => el.tagName)"""
    )
    assert overflow == [], f"wider than 420 px: {overflow}"
    box = page.locator("section").nth(1).bounding_box()
    assert box is not None and box["x"] + box["width"] <= 420

    # Every result arrived by push, verified, and is stored once per job_id.
    with sqlite3.connect(stack["db"]) as db:
        rows = dict(db.execute("SELECT status, COUNT(*) FROM results GROUP BY status").fetchall())
    assert rows == {"succeeded": 2 + BATCH + 1}  # two accounts, the children, the batch job itself
    assert stack["deliverer"].acked >= 2 + BATCH + 1
    assert set(stack["deliverer"].statuses) == {204}
