"""`worker run`'s health endpoints as Cloud Run's probes see them, on the local cloud.

The stall test runs a Pub/Sub emulator of its own and stops it under the running
worker: the client library keeps retrying the stream, so only the health check can
tell Cloud Run that this instance no longer gets jobs.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import psutil
import pytest

from localcloud import PubSubEmulator, free_port
from tests.e2e.harness import WorkerProcess, provision, worker_env

pytestmark = pytest.mark.e2e


def probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """What Cloud Run's HTTP probe sees: the status code (and the JSON body, for the test)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for(port: int, path: str, status: int, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen: tuple[int, dict[str, Any]] | None = None
    while time.monotonic() < deadline:
        seen = probe(port, path)
        if seen[0] == status:
            return seen[1]
        time.sleep(0.25)
    raise AssertionError(f"{path} never answered {status} in {timeout}s; last: {seen}")


def listening_ports(pid: int) -> set[int]:
    return {
        conn.laddr.port
        for conn in psutil.Process(pid).net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    }


def test_healthz_turns_503_when_pubsub_stops_answering(
    local_cloud: Any, names: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    with PubSubEmulator(project=local_cloud.project) as emulator:
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator.host)
        # A window of 6 s (probes every 2 s): one probe slowed by a busy machine must not fail it.
        env = worker_env(
            local_cloud,
            names,
            WORKER_HEALTH_PORT=str(port),
            WORKER_HEALTH_HOST="127.0.0.1",
            WORKER_HEALTH_STALL_SECONDS="6",
        )
        provision(env)
        with WorkerProcess(env, name="health") as worker:
            worker.wait_ready()
            assert wait_for(port, "/readyz", 200)["subscription"] == names.jobs_subscription
            alive = wait_for(port, "/healthz", 200)
            assert alive["status"] == "ok" and alive["stream_alive"] is True
            assert listening_ports(worker.proc.pid) == {port}
            # Longer than the stall window: only answered probes keep it at 200.
            time.sleep(7)
            assert probe(port, "/healthz")[0] == 200
            assert "pubsub_unreachable" not in worker.logs()

            emulator.stop()
            stalled = wait_for(port, "/healthz", 503, timeout=30)
            assert stalled["status"] == "stalled" and stalled["pubsub_silent_s"] >= 6
            # The stream never failed by itself: without the probe this instance would look fine.
            assert stalled["stream_alive"] is True
            assert worker.proc.poll() is None
            assert probe(port, "/readyz")[0] == 200
            assert worker.stop() == 0
    messages = [event.get("message") for event in worker.log_events()]
    assert "health_listening" in messages
    assert "pubsub_unreachable" in messages
    assert messages.count("liveness_failing") == 1


def test_without_port_the_worker_listens_on_nothing(
    local_cloud: Any, pubsub_emulator: Any, names: Any
) -> None:
    env = worker_env(local_cloud, names)
    env.pop("PORT", None)
    provision(env)
    with WorkerProcess(env, name="no-port") as worker:
        worker.wait_ready()
        assert listening_ports(worker.proc.pid) == set()
        assert worker.stop() == 0
    assert "health_listening" not in [event.get("message") for event in worker.log_events()]
