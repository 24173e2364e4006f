"""cloudbuild.yaml, checked the way Cloud Build would reject it, and against the worker's settings.

The Cloud Build schema itself is check-jsonschema's (`make lint`). Here: Cloud Build
fails a build that uses an undeclared user substitution or (for manual builds) declares
one it never uses; a typo in an environment variable name would instead deploy a worker
silently running on a default. Both are caught here, and the deploy step is held to
scripts/cloud_run_deploy.py's inputs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from scripts import cloud_run_deploy
from worker.core.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CONFIG_TEXT = (REPO / "cloudbuild.yaml").read_text()
CONFIG: dict[str, Any] = yaml.safe_load(CONFIG_TEXT)
IMAGE = "${_REGION}-docker.pkg.dev/$PROJECT_ID/${_REPOSITORY}/worker:$SHORT_SHA"
BUILT_INS = {"PROJECT_ID", "PROJECT_NUMBER", "BUILD_ID", "LOCATION", "SHORT_SHA", "COMMIT_SHA", "BRANCH_NAME"}
SUBSTITUTION = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def step(step_id: str) -> dict[str, Any]:
    (found,) = [s for s in CONFIG["steps"] if s.get("id") == step_id]
    return found


def deploy_env() -> dict[str, str]:
    return dict(item.split("=", 1) for item in step("deploy")["env"])


def used_in_config() -> set[str]:
    text = yaml.safe_dump({"steps": CONFIG["steps"], "images": CONFIG["images"]})
    return {a or b for a, b in SUBSTITUTION.findall(text)}


def test_steps_run_in_order_test_build_push_deploy() -> None:
    assert [s["id"] for s in CONFIG["steps"]] == ["test", "build", "push", "deploy"]


def test_the_tests_that_need_no_emulator_gate_the_build() -> None:
    test = step("test")
    assert test["name"].startswith("python:3.11")
    assert [test["entrypoint"], *test["args"]] == ["make", "test-fast"]
    makefile = (REPO / "Makefile").read_text()
    # No emulator, no podman and no gcloud in the Python image.
    assert re.search(
        r'^test-fast:.*\n\t.*pytest .*-m "not e2e and not container and not gcloud"', makefile, re.M
    )


def test_the_image_built_is_pushed_recorded_and_deployed_by_digest() -> None:
    assert f"--tag={IMAGE}" in step("build")["args"]
    assert step("push")["args"] == ["push", IMAGE]
    assert CONFIG["images"] == [IMAGE]
    assert deploy_env()["IMAGE"] == IMAGE  # the script resolves it to REPO@sha256:...


def test_the_deploy_step_runs_the_deploy_script_without_a_shell() -> None:
    deploy = step("deploy")
    assert deploy["name"].startswith("gcr.io/google.com/cloudsdktool/cloud-sdk")
    assert [deploy["entrypoint"], *deploy["args"]] == ["python3", "scripts/cloud_run_deploy.py"]
    assert "script" not in deploy and "bash" not in str(deploy)


def expand(value: str, **overrides: str) -> str:
    """A value as Cloud Build would expand it with the defaults (and a sample build)."""
    values = {"PROJECT_ID": "acme", "SHORT_SHA": "abc1234", **CONFIG["substitutions"], **overrides}
    for _ in range(2):  # a default may refer to a built-in
        value = SUBSTITUTION.sub(lambda m: values[m.group(1) or m.group(2)], value)
    return value


def test_the_defaults_give_the_deploy_script_every_setting_it_reads() -> None:
    for kind in cloud_run_deploy.TARGETS:
        env = {k: expand(v, _TARGET=kind) for k, v in deploy_env().items()}
        target = cloud_run_deploy.Target.from_environ(env)
        assert target.kind == kind and target.name == "job-worker"
        assert target.image == "us-central1-docker.pkg.dev/acme/worker/worker:abc1234"
        assert target.service_account == "worker@acme.iam.gserviceaccount.com"
    assert CONFIG["substitutions"]["_TARGET"] == "worker-pool"


def test_the_container_environment_names_real_settings() -> None:
    env = deploy_env()
    container = {k: v for k, v in env.items() if k.startswith("WORKER_") or k == "GOOGLE_CLOUD_PROJECT"}
    known = {name for field in Settings.model_fields.values() for name in field.validation_alias.choices}
    assert set(container) <= known, f"not settings: {set(container) - known}"
    assert container["GOOGLE_CLOUD_PROJECT"] == "$PROJECT_ID"
    for required in (
        "WORKER_REGION",
        "WORKER_MAX_IN_FLIGHT",
        "WORKER_JOBS_TOPIC",
        "WORKER_JOBS_SUBSCRIPTION",
        "WORKER_RESULTS_TOPIC",
        "WORKER_DEAD_LETTER_TOPIC",
        "WORKER_DEAD_LETTER_SUBSCRIPTION",
    ):
        assert SUBSTITUTION.fullmatch(container[required]), f"{required} should come from a substitution"
    # Cloud Run sets PORT itself and refuses a deploy that sets it; the script sets
    # WORKER_HEALTH_PORT for a worker pool from HEALTH_PORT.
    assert "PORT" not in env and "WORKER_HEALTH_PORT" not in env


def test_every_substitution_used_is_declared_and_every_declared_one_is_used() -> None:
    used = used_in_config()
    declared = set(CONFIG["substitutions"])
    user = {name for name in used if name.startswith("_")}
    assert user == declared, f"undeclared: {user - declared}; unused: {declared - user}"
    assert used - user <= BUILT_INS


def test_substitution_defaults_refer_only_to_built_ins() -> None:
    # Dynamic substitutions expand built-ins in defaults; one user substitution
    # referring to another is not relied upon.
    assert CONFIG["options"]["dynamicSubstitutions"] is True
    for value in CONFIG["substitutions"].values():
        assert {a or b for a, b in SUBSTITUTION.findall(str(value))} <= BUILT_INS


def test_every_substitution_is_documented_in_the_header() -> None:
    header = CONFIG_TEXT.split("\nsteps:", 1)[0]
    documented = set(re.findall(r"\b(_[A-Z0-9_]+)\b", header))
    assert set(CONFIG["substitutions"]) <= documented
