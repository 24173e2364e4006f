"""scripts/cloud_run_deploy.py: what cloudbuild.yaml's deploy step sends to Cloud Run.

The worker pool's spec is checked with gcloud's own Cloud Run v1 message classes (the
ones `gcloud beta run worker-pools replace` parses the file into), so a misspelt field
fails here rather than in a deploy; the commands' flags are checked against gcloud's
--help by tests/ops/test_gcloud_commands.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from scripts.cloud_run_deploy import (
    LIVENESS_PROBE,
    MANUAL_INSTANCE_COUNT,
    STARTUP_PROBE,
    DeployError,
    Target,
    current_instances,
    main,
    service_command,
    worker_pool_spec,
)

ENV = {
    "TARGET": "worker-pool",
    "NAME": "job-worker",
    "REGION": "europe-west1",
    "PROJECT_ID": "acme",
    "SERVICE_ACCOUNT": "worker@acme.iam.gserviceaccount.com",
    "IMAGE": "europe-west1-docker.pkg.dev/acme/worker/worker:abc1234",
    "MIN_INSTANCES": "2",
    "MAX_INSTANCES": "3",
    "CONCURRENCY": "10",
    "CPU": "1",
    "MEMORY": "512Mi",
    "HEALTH_PORT": "8080",
    "GOOGLE_CLOUD_PROJECT": "acme",
    "WORKER_JOBS_SUBSCRIPTION": "jobs-worker",
    "HOME": "/builder/home",  # the step's own environment is not the container's
}
DIGEST = "europe-west1-docker.pkg.dev/acme/worker/worker@sha256:" + "0" * 64


def test_a_worker_pool_gets_its_probes_on_the_health_port_it_is_told_to_listen_on() -> None:
    target = Target.from_environ(ENV)
    spec = worker_pool_spec(target, DIGEST, instances=2)
    (container,) = spec["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {
        "GOOGLE_CLOUD_PROJECT": "acme",
        "WORKER_HEALTH_PORT": "8080",
        "WORKER_JOBS_SUBSCRIPTION": "jobs-worker",
    }
    assert container["image"] == DIGEST
    assert container["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
    # A worker pool's startup probe may last at most 240 s.
    assert STARTUP_PROBE["periodSeconds"] * STARTUP_PROBE["failureThreshold"] <= 240
    assert LIVENESS_PROBE["periodSeconds"] * LIVENESS_PROBE["failureThreshold"] >= 60
    assert spec["metadata"]["annotations"][MANUAL_INSTANCE_COUNT] == "2"
    assert spec["metadata"]["labels"] == {"cloud.googleapis.com/location": "europe-west1"}
    assert spec["spec"]["template"]["spec"]["serviceAccountName"] == ENV["SERVICE_ACCOUNT"]


def test_a_redeploy_keeps_the_instance_count_crema_set() -> None:
    described = {"metadata": {"annotations": {MANUAL_INSTANCE_COUNT: "7"}}}
    assert current_instances(described, default=1) == 7
    assert current_instances(None, default=1) == 1  # a new pool
    assert current_instances({"metadata": {"annotations": {}}}, default=1) == 1


@pytest.mark.gcloud
def test_gcloud_parses_the_worker_pool_spec(tmp_path: Path) -> None:
    """What `gcloud beta run worker-pools replace` does with the file before any API call."""
    sdk = Path(os.path.realpath(shutil.which("gcloud") or "/usr/bin/gcloud")).parents[1]
    python = sdk / "platform" / "bundledpythonunix" / "bin" / "python3"
    assert python.exists(), f"no bundled Python in {sdk}: is gcloud installed from its package?"
    good = worker_pool_spec(Target.from_environ(ENV), DIGEST, instances=2)
    typo = json.loads(json.dumps(good))
    typo["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["failureTreshold"] = 3
    check = (
        "import json, sys\n"
        f"sys.path[:0] = [{str(sdk / 'lib')!r}, {str(sdk / 'lib' / 'third_party')!r}]\n"
        "from googlecloudsdk.api_lib.util import apis, messages\n"
        "run = apis.GetMessagesModule('run', 'v1')\n"
        "try:\n"
        "    messages.DictToMessageWithErrorCheck(json.load(open(sys.argv[1])), run.WorkerPool)\n"
        "except Exception as exc:\n"
        "    sys.exit(str(exc))\n"
    )
    for name, spec in (("good", good), ("typo", typo)):
        (tmp_path / name).write_text(json.dumps(spec))
    done = subprocess.run([python, "-c", check, tmp_path / "good"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([python, "-c", check, tmp_path / "typo"], capture_output=True, text=True)
    assert done.returncode == 1 and "failureTreshold" in done.stderr


def test_a_service_deploy_keeps_the_service_flags() -> None:
    target = Target.from_environ({**ENV, "TARGET": "service"})
    command = service_command(target, DIGEST)
    assert command[:4] == ["gcloud", "run", "deploy", "job-worker"]
    for flag in (
        f"--image={DIGEST}",
        "--no-allow-unauthenticated",
        "--ingress=internal",
        "--no-cpu-throttling",
        "--min-instances=2",
        "--max-instances=3",
        "--port=8080",
        "--set-env-vars=GOOGLE_CLOUD_PROJECT=acme,WORKER_JOBS_SUBSCRIPTION=jobs-worker",
    ):
        assert flag in command
    startup = next(a for a in command if a.startswith("--startup-probe="))
    assert "httpGet.path=/readyz" in startup and "httpGet.port=8080" in startup


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"TARGET": "job"}, "TARGET='job': set _TARGET to one of worker-pool, service"),
        ({"NAME": ""}, "NAME is not set"),
        ({"HEALTH_PORT": "eighty"}, "HEALTH_PORT='eighty' is not a whole number"),
    ],
)
def test_a_bad_setting_is_named(change: dict[str, str], message: str) -> None:
    with pytest.raises(DeployError, match=message):
        Target.from_environ({**ENV, **change})


def test_dry_run_prints_without_calling_gcloud(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", "")  # no gcloud to call
    assert main(["--dry-run"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["kind"] == "WorkerPool"
    monkeypatch.setenv("TARGET", "nope")
    assert main(["--dry-run"]) == 2
    assert "set _TARGET" in capsys.readouterr().err
