"""`worker dev` knows it is running: a second one in the same checkout leaves the first alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from worker.cli import cli

HOLD = """
import sys, time
from worker.cli.dev import single_instance
with single_instance(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_dev_refuses_with_the_first_ones_pid_and_leaves_its_env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / ".worker-dev.env"
    env_file.write_text("export PUBSUB_EMULATOR_HOST=127.0.0.1:1234\n")
    started: list[object] = []
    monkeypatch.setattr("localcloud.devstack.run_dev", lambda **kwargs: started.append(kwargs))
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(env_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None and first.stdout.readline() == "held\n"
        done = CliRunner().invoke(cli, ["dev", "--env-file", str(env_file)])
    finally:
        first.kill()
        first.wait()
    assert done.exit_code == 2, done.output
    assert f"already running in this checkout (pid {first.pid};" in done.output
    assert started == []
    assert env_file.read_text() == "export PUBSUB_EMULATOR_HOST=127.0.0.1:1234\n"


def test_dev_starts_once_the_first_one_is_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / ".worker-dev.env"
    started: list[object] = []
    monkeypatch.setattr("localcloud.devstack.run_dev", lambda **kwargs: started.append(kwargs))
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(env_file)], stdout=subprocess.PIPE, text=True)
    assert first.stdout is not None and first.stdout.readline() == "held\n"
    first.kill()  # killed, not stopped: no clean-up ran, the lock went with the process
    first.wait()
    done = CliRunner().invoke(cli, ["dev", "--env-file", str(env_file)])
    assert done.exit_code == 0, done.output
    assert len(started) == 1
