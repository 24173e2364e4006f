"""The Dockerfile's promises, checked without a Docker engine.

tests/e2e/test_wheel_install.py replays the build stage; this file checks the rest:
what the runtime stage contains, who it runs as, how Cloud Run's SIGTERM reaches the
worker, and what the build context lets in.
"""

from __future__ import annotations

import shlex
import tomllib

import pytest

from tests.dockerfile import REPO, DockerIgnore, Stage, parse_dockerfile


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile()


def test_two_stages_on_the_same_slim_python_311(stages: list[Stage]) -> None:
    build, runtime = stages
    assert build.name == "build"
    assert build.base == runtime.base == "python:3.11-slim"


def test_the_build_stage_runs_the_shared_scripts(stages: list[Stage]) -> None:
    runs = [shlex.split(i.args) for i in stages[0].all("RUN")]
    assert runs == [
        ["scripts/build-wheel.sh", "/wheels"],
        ["scripts/install-wheel.sh", "/opt/worker", "/wheels"],
    ]


def test_the_runtime_stage_receives_only_the_installed_venv(stages: list[Stage]) -> None:
    runtime = stages[1]
    assert [i.args for i in runtime.all("COPY")] == ["--from=build /opt/worker /opt/worker"]
    installs = " ".join(i.args for i in runtime.all("RUN"))
    # Nothing is fetched or compiled in the final image; pip itself is removed.
    assert "apt-get" not in installs and "pip install" not in installs
    assert "pip uninstall" in installs and "useradd" in installs


def test_it_runs_as_a_non_root_user(stages: list[Stage]) -> None:
    (user,) = stages[1].all("USER")
    assert user.args.split(":")[0] not in ("root", "0")


def test_sigterm_reaches_the_worker_itself(stages: list[Stage]) -> None:
    runtime = stages[1]
    (entrypoint,) = runtime.all("ENTRYPOINT")
    (cmd,) = runtime.all("CMD")
    # Exec form: no /bin/sh in between to swallow the signal.
    assert entrypoint.exec_form == ["worker"] and cmd.exec_form == ["run"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "worker" in scripts


def test_logs_are_unbuffered(stages: list[Stage]) -> None:
    env = " ".join(i.args for i in stages[1].all("ENV")).split()
    assert "PYTHONUNBUFFERED=1" in env


@pytest.mark.parametrize(
    "path",
    [
        ".git/config",
        ".venv/bin/python",
        "tests/test_health.py",
        "bench/run.py",
        "docs/deploy.md",
        "service-account-key.json",
        ".env",
        "worker/__pycache__/app.cpython-311.pyc",
        "dist/x.whl",
        "localcloud/src/localcloud/cloud.py",
    ],
)
def test_the_build_context_leaves_out(path: str) -> None:
    assert DockerIgnore().excluded(path)


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "README.md",
        "worker/runtime/app.py",
        "jobs/echo.toml",
        "scripts/build-wheel.sh",
        "scripts/install-wheel.sh",
    ],
)
def test_the_build_context_keeps(path: str) -> None:
    assert not DockerIgnore().excluded(path)
