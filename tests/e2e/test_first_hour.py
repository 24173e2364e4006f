"""What a newcomer reads when something is not as they think, through the real `worker`
command on the local cloud: each hint says what is really the case."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import WorkerProcess, provision, uid, worker_cli, worker_env, write_kind

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(local_cloud: Any, pubsub_emulator: Any, names: Any, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Topics of this test's own and a catalog with one kind, `echo`, calling a service of its own."""
    service = local_cloud.add_service(f"echo-{uid()}", "echo")
    write_kind(tmp_path / "jobs", "echo", service.name, attempts=1, timeout_s=2)
    environment = worker_env(
        local_cloud, names, WORKER_CATALOG_DIR=str(tmp_path / "jobs"), WORKER_SHUTDOWN_GRACE_SECONDS="1"
    )
    provision(environment)
    try:
        yield environment
    finally:
        local_cloud.remove_service(service.name)


def test_pause_with_no_instance_says_the_order_is_forgotten_and_fails(env: dict[str, str]) -> None:
    paused = worker_cli(env, "pause", "echo", "--wait", "1")
    assert paused.returncode == 1, paused.stdout
    assert "confirm" not in paused.stdout
    assert "worker: error: no worker instance answered" in paused.stderr
    assert "the order is forgotten" in paused.stderr and "`worker pause echo` again" in paused.stderr
    resumed = worker_cli(env, "resume", "echo", "--wait", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert "none runs, so echo is paused nowhere" in resumed.stdout


def test_replay_of_an_unknown_job_id_says_nothing_matched(env: dict[str, str]) -> None:
    done = worker_cli(env, "replay", "--job-id", "nosuch")
    assert done.returncode == 1
    assert "replayed 0" not in done.stdout
    assert "worker: error: no dead letter on" in done.stderr
    assert "has job id nosuch (0 other(s) left in place); nothing replayed" in done.stderr


def test_enqueue_wait_names_a_paused_kind_and_a_missing_worker(env: dict[str, str]) -> None:
    nobody = worker_cli(env, "enqueue", "echo", "--payload", "{}", "--wait", "--timeout", "1")
    assert nobody.returncode == 3
    assert "No worker instance answered on" in nobody.stderr and "start one (`make dev`" in nobody.stderr
    with WorkerProcess(env) as worker:
        worker.wait_ready()
        assert worker_cli(env, "pause", "echo").returncode == 0
        held = worker_cli(env, "enqueue", "echo", "--payload", "{}", "--wait", "--timeout", "2")
        assert held.returncode == 3
        assert "echo is paused on 1 of 1 worker instance(s)" in held.stderr
        assert "after `worker resume echo`" in held.stderr and "Is a worker running" not in held.stderr
        assert worker_cli(env, "resume", "echo").returncode == 0
        assert worker.stop() == 0


def test_doctor_says_a_service_is_not_in_the_catalog(env: dict[str, str]) -> None:
    done = worker_cli(env, "doctor", "nosuchservice")
    assert done.returncode == 1
    assert "nosuchservice is not a service or Cloud Run job of the catalog" in done.stderr
    assert "no job of this catalog calls it" in done.stderr


def test_a_wrong_project_is_not_sent_to_worker_setup_alone(env: dict[str, str]) -> None:
    done = worker_cli({**env, "GOOGLE_CLOUD_PROJECT": "someone-elses"}, "dead-letters")
    assert done.returncode == 1
    line = done.stderr.strip()
    assert line.startswith("worker: error: ") and "\n" not in line
    assert "in project someone-elses: if GOOGLE_CLOUD_PROJECT is the project your workers serve" in line
    assert "rather than create a project no worker reads" in line


def read_exports(path: Path) -> dict[str, str]:
    exports = [shlex.split(line)[1] for line in path.read_text().splitlines() if line.startswith("export ")]
    return dict(export.split("=", 1) for export in exports)


def test_make_dev_then_a_second_one_then_ctrl_c_as_the_readme_tells_it(tmp_path: Path) -> None:
    """`make dev`'s own stack: the second shell gets a result, a second `worker dev` refuses
    and leaves the first one's env file alone, and after Ctrl-C the old shell hears why."""
    base = {k: v for k, v in os.environ.items() if k not in ("PUBSUB_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")}
    argv = [sys.executable, "-m", "worker", "dev", "--jobs", "1", "--webapp-push-endpoint", ""]
    log = (tmp_path / "dev.log").open("w")
    first = subprocess.Popen(
        argv, cwd=tmp_path, env=base, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while "Sent 1 sample jobs." not in (tmp_path / "dev.log").read_text():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "dev.log").read_text()
            time.sleep(0.5)
        env_file = tmp_path / ".worker-dev.env"
        written = env_file.read_text()
        shell = {**base, **read_exports(env_file)}
        ok = worker_cli(shell, "enqueue", "account-scoring", "--payload", '{"account_id": "acme"}', "--wait")
        assert ok.returncode == 0, ok.stderr
        assert '"status":"succeeded"' in ok.stdout

        second = subprocess.run(argv, cwd=tmp_path, env=base, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert f"`worker dev` is already running in this checkout (pid {first.pid};" in second.stderr
        assert env_file.read_text() == written
    finally:
        first.send_signal(signal.SIGINT)
        assert first.wait(60) == 0
        log.close()
    assert not env_file.exists(), "the env file goes with the stack that wrote it"
    started = time.monotonic()
    stale = worker_cli(shell, "enqueue", "account-scoring", "--payload", '{"account_id": "acme"}', "--wait")
    assert time.monotonic() - started < 20
    assert stale.returncode == 2 and "Traceback" not in stale.stderr
    assert "cannot reach the Pub/Sub emulator at" in stale.stderr and "is `make dev` running?" in stale.stderr
