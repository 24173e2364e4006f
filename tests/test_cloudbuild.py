"""cloudbuild.yaml, checked the way Cloud Build would reject it, and against the worker's settings.

Cloud Build fails a build that uses an undeclared user substitution or (for manual
builds) declares one it never uses; a typo in an environment variable name would
instead deploy a worker silently running on a default. Both are caught here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
CONFIG_TEXT = (REPO / "cloudbuild.yaml").read_text()
CONFIG: dict[str, Any] = yaml.safe_load(CONFIG_TEXT)
IMAGE = "${_REGION}-docker.pkg.dev/$PROJECT_ID/${_REPOSITORY}/worker:$SHORT_SHA"
BUILT_INS = {"PROJECT_ID", "PROJECT_NUMBER", "BUILD_ID", "LOCATION", "SHORT_SHA", "COMMIT_SHA", "BRANCH_NAME"}
SUBSTITUTION = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def step(step_id: str) -> dict[str, Any]:
    (found,) = [s for s in CONFIG["steps"] if s.get("id") == step_id]
    return found


def deploy_flags() -> dict[str, str]:
    """The deploy step's `--flag=value` arguments (`--flag` alone maps to "")."""
    flags = {}
    for arg in step("deploy")["args"]:
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            flags[name] = value
    return flags


def used_in_steps() -> set[str]:
    text = yaml.safe_dump(CONFIG["steps"])
    return {a or b for a, b in SUBSTITUTION.findall(text)}


def test_steps_run_in_order_test_build_push_deploy() -> None:
    assert [s["id"] for s in CONFIG["steps"]] == ["test", "build", "push", "deploy"]


def test_the_tests_that_need_no_emulator_gate_the_build() -> None:
    test = step("test")
    assert test["name"].startswith("python:3.11")
    assert [test["entrypoint"], *test["args"]] == ["make", "test-fast"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r'^test-fast:.*\n\t.*pytest .*-m "not e2e"', makefile, re.M)


def test_the_image_built_is_the_image_pushed_and_deployed() -> None:
    assert f"--tag={IMAGE}" in step("build")["args"]
    assert step("push")["args"] == ["push", IMAGE]
    assert deploy_flags()["--image"] == IMAGE


def test_the_deploy_step_runs_gcloud_without_a_shell() -> None:
    deploy = step("deploy")
    assert deploy["entrypoint"] == "gcloud" and deploy["args"][:3] == ["run", "deploy", "${_SERVICE}"]


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--no-allow-unauthenticated", ""),
        ("--no-cpu-throttling", ""),
        ("--ingress", "internal"),
        ("--service-account", "${_SERVICE_ACCOUNT}"),
        ("--region", "${_REGION}"),
        ("--min-instances", "${_MIN_INSTANCES}"),
        ("--max-instances", "${_MAX_INSTANCES}"),
        ("--concurrency", "${_CONCURRENCY}"),
    ],
)
def test_the_deploy_flags(flag: str, value: str) -> None:
    assert deploy_flags()[flag] == value


def test_probes_point_at_the_health_endpoints() -> None:
    flags = deploy_flags()
    assert "httpGet.path=/readyz" in flags["--startup-probe"].split(",")
    assert "httpGet.path=/healthz" in flags["--liveness-probe"].split(",")


def test_at_least_one_instance_always_runs() -> None:
    defaults = CONFIG["substitutions"]
    # Nothing wakes a pull worker up: with zero instances, jobs would wait forever.
    assert int(defaults["_MIN_INSTANCES"]) >= 1
    assert int(defaults["_MAX_INSTANCES"]) >= int(defaults["_MIN_INSTANCES"])


def test_the_environment_names_real_settings() -> None:
    pairs = dict(item.split("=", 1) for item in deploy_flags()["--set-env-vars"].split(","))
    known = {name for field in Settings.model_fields.values() for name in field.validation_alias.choices}
    assert set(pairs) <= known, f"not settings: {set(pairs) - known}"
    assert pairs["GOOGLE_CLOUD_PROJECT"] == "$PROJECT_ID"
    for required in (
        "WORKER_REGION",
        "WORKER_MAX_IN_FLIGHT",
        "WORKER_JOBS_TOPIC",
        "WORKER_JOBS_SUBSCRIPTION",
        "WORKER_RESULTS_TOPIC",
        "WORKER_DEAD_LETTER_TOPIC",
        "WORKER_DEAD_LETTER_SUBSCRIPTION",
    ):
        assert SUBSTITUTION.fullmatch(pairs[required]), f"{required} should come from a substitution"
    # Cloud Run sets PORT itself and refuses a deploy that sets it.
    assert "PORT" not in pairs


def test_every_substitution_used_is_declared_and_every_declared_one_is_used() -> None:
    used = used_in_steps()
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
