"""The worker's image, built from the Dockerfile with podman and run against the local cloud.

scripts/container-build.sh builds it on local stand-ins for the two base images: the
Python base is a Debian bookworm root standing in for python:3.11-slim, NOT the
official image (no Docker Hub here). Everything else is the Dockerfile as Cloud Build
runs it. The container shares the host's network (`--network=host`) to reach the
emulator and the local cloud on 127.0.0.1; its health server is told to listen on
127.0.0.1 only.

Run with `make test-container` (CI runs it from .ci/run); `make test` leaves it out.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from localcloud import free_port, score_account
from tests.e2e.harness import collect_results, provision, publish

pytestmark = [pytest.mark.e2e, pytest.mark.container]

REPO = Path(__file__).resolve().parents[2]
TAG = "localhost/cloudrun-job-worker:test"


@dataclass(frozen=True)
class Image:
    ref: str
    base: str
    env: dict[str, str]  # the host environment with CONTAINERS_CONF, for every podman call

    def podman(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )


@pytest.fixture(scope="module")
def image() -> Image:
    build = subprocess.run(
        [REPO / "scripts" / "container-build.sh", TAG],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    out = dict(re.findall(r"^(image|containers_conf|base)=(.*)$", build.stdout, re.M))
    assert out["image"] == TAG
    return Image(TAG, out["base"], {**os.environ, "CONTAINERS_CONF": out["containers_conf"]})


def test_the_image_runs_the_worker_as_a_non_root_user_without_installers(image: Image) -> None:
    (config,) = json.loads(image.podman("image", "inspect", image.ref).stdout)
    assert config["Config"]["User"] == "10001:10001"
    assert config["Config"]["Entrypoint"] == ["worker"] and config["Config"]["Cmd"] == ["run"]
    assert "PYTHONUNBUFFERED=1" in config["Config"]["Env"]

    done = image.podman("run", "--rm", "--network=none", image.ref, "--help")
    assert done.returncode == 0, done.stderr
    assert "run" in done.stdout and "setup" in done.stdout and "doctor" in done.stdout

    # No installer and no local cloud. (cryptography is there: google-auth requires it;
    # the next test holds the image to the lock's runtime packages exactly.)
    probe = (
        "import importlib.util as u, shutil;"
        "print([m for m in ('pip', 'setuptools', 'localcloud') if u.find_spec(m)], shutil.which('uv'))"
    )
    done = image.podman("run", "--rm", "--network=none", "--entrypoint", "python", image.ref, "-c", probe)
    assert done.stdout.strip() == "[] None", done.stdout + done.stderr


def test_the_image_holds_exactly_the_locked_runtime_packages(image: Image) -> None:
    """The image and `make` install one lock: uv.lock's runtime packages, at its versions."""
    exported = subprocess.run(
        [
            REPO / ".tools" / "bin" / "uv",
            "export",
            "--frozen",
            "--no-dev",
            "--no-hashes",
            "--no-emit-project",
            "--no-header",
            "--no-annotate",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    locked = {}
    for line in exported.splitlines():
        requirement = line.split(";")[0].strip()
        if requirement and not requirement.startswith("#"):
            name, version = requirement.split("==")
            locked[canonical(name)] = version
    listing = (
        "import importlib.metadata as m, json;"
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    done = image.podman("run", "--rm", "--network=none", "--entrypoint", "python", image.ref, "-c", listing)
    assert done.returncode == 0, done.stderr
    installed = {canonical(name): version for name, version in json.loads(done.stdout).items()}
    assert installed.pop("cloudrun-job-worker") == "0.1.0"
    assert installed == locked


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_doctor_without_credentials_fails_cleanly(image: Image) -> None:
    done = image.podman(
        "run", "--rm", "--network=none", "--env", "GOOGLE_CLOUD_PROJECT=acme", image.ref, "doctor"
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL credentials: no credentials that can mint ID tokens" in done.stdout
    assert "fix: gcloud auth application-default login" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


@pytest.fixture
def container_name(image: Image) -> Iterator[str]:
    name = f"worker-smoke-{uuid.uuid4().hex[:8]}"
    yield name
    image.podman("rm", "--force", "--time", "0", name)


def http_get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_worker_run_in_the_container_serves_probes_completes_a_job_and_stops_on_sigterm(
    image: Image, container_name: str, local_cloud: Any, pubsub_emulator: Any, names: Any
) -> None:
    for service in ("account-scoring", "echo"):  # what the packaged catalog calls
        try:
            local_cloud.service(service)
        except KeyError:
            local_cloud.add_service(service, service)
    port = free_port()
    env = {
        **local_cloud.env,
        **names.env,
        "PUBSUB_EMULATOR_HOST": pubsub_emulator.host,
        "WORKER_LOG_FORMAT": "json",
        "WORKER_LOG_LEVEL": "debug",  # job_succeeded is a debug line
        # What a worker pool's deploy sets (it gets no PORT); 127.0.0.1 here because the
        # container shares the host's network.
        "WORKER_HEALTH_PORT": str(port),
        "WORKER_HEALTH_HOST": "127.0.0.1",
    }
    provision({**os.environ, **env})
    env_args = [f"--env={key}={value}" for key, value in env.items()]
    started = image.podman(
        "run", "--detach", "--network=host", "--name", container_name, *env_args, image.ref
    )
    assert started.returncode == 0, started.stderr

    def logs() -> str:
        done = image.podman("logs", container_name)
        return done.stdout + done.stderr

    deadline = time.monotonic() + 60
    while True:
        try:
            status, body = http_get(f"http://127.0.0.1:{port}/readyz")
        except (urllib.error.URLError, ConnectionError):
            status, body = 0, {}
        if status == 200:
            break
        assert time.monotonic() < deadline, f"/readyz never answered 200 ({status} {body}):\n{logs()}"
        time.sleep(0.25)
    # Ready, on its subscription; the protections' detail (pauses, breakers, the control
    # channel the image reaches too) comes with it and never fails readiness.
    assert body["status"] == "ready" and body["subscription"] == names.jobs_subscription, body
    assert body["paused"] == {} and body["control"] == "listening", body

    payload = {"account_id": "acct-image", "employees": 42, "annual_revenue": 900_000.0, "industry": "retail"}
    publish({**os.environ, **env}, [{"job_id": "image-1", "kind": "account-scoring", "payload": payload}])
    (result,) = collect_results({**os.environ, **env}, {"image-1"}, timeout=60)["image-1"]
    assert result["status"] == "succeeded", result
    assert result["response"]["score"] == score_account(payload)
    status, health = http_get(f"http://127.0.0.1:{port}/healthz")
    assert status == 200 and health["status"] == "ok" and health["received"] >= 1, health

    # PID 1 is the worker itself, running as uid 10001, so Cloud Run's SIGTERM reaches it.
    proc = image.podman(
        "exec",
        container_name,
        "python",
        "-c",
        "import json;"
        "print(json.dumps(open('/proc/1/cmdline').read().split(chr(0))[:3]));"
        "print(json.dumps([l.split()[1] for l in open('/proc/1/status') if l.startswith('Uid:')]))",
    )
    cmdline, uid = map(json.loads, proc.stdout.splitlines())
    assert cmdline[0].startswith("/opt/worker/bin/python"), cmdline
    assert cmdline[1:] == ["/opt/worker/bin/worker", "run"]
    assert uid == ["10001"]

    began = time.monotonic()
    stopped = image.podman("stop", "--time", "10", container_name)
    elapsed = time.monotonic() - began
    assert stopped.returncode == 0, stopped.stderr
    exit_code = image.podman("inspect", "--format", "{{.State.ExitCode}}", container_name).stdout.strip()
    assert exit_code == "0", logs()
    assert elapsed < 2.0, f"podman stop took {elapsed:.1f} s"
    events = [json.loads(line) for line in logs().splitlines() if line.startswith("{")]
    expected = {"health_listening", "worker_ready", "job_succeeded", "shutdown_requested", "consumer_stopped"}
    assert expected <= {e["message"] for e in events}
    # The catalog packaged in the image is the repository's jobs/, kind for kind.
    ready = next(e for e in events if e["message"] == "worker_ready")
    shipped = sorted(tomllib.loads(f.read_text())["kind"] for f in (REPO / "jobs").glob("*.toml"))
    assert ready["kinds"] == shipped
