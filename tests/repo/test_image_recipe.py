"""One lock, pinned bases: what the Dockerfile, the Makefile and pyproject.toml promise together.

hadolint checks the Dockerfile as a Dockerfile (`make lint`); tests/e2e/test_container.py
builds and runs it. This file checks what neither sees: that the image and `make`
install the same uv.lock with the same uv, that both base images are pinned by digest,
and that the dependency layer comes before the code so a code change rebuilds fast.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
MAKEFILE = (REPO / "Makefile").read_text()


def arg(name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M)
    return value


def instructions(keyword: str) -> list[tuple[int, str]]:
    return [(m.start(), m.group(1)) for m in re.finditer(rf"^{keyword} (.*)$", DOCKERFILE, re.M)]


def test_both_base_images_are_pinned_by_digest() -> None:
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", arg("PYTHON_IMAGE"))
    assert re.fullmatch(r"ghcr\.io/astral-sh/uv:[0-9.]+@sha256:[0-9a-f]{64}", arg("UV_IMAGE"))
    assert [f for _, f in instructions("FROM")] == [
        "${UV_IMAGE} AS uv",
        "${PYTHON_IMAGE} AS build",
        "${PYTHON_IMAGE}",
    ]


def test_the_image_and_make_use_one_uv_release() -> None:
    required = PYPROJECT["tool"]["uv"]["required-version"]
    image_tag = arg("UV_IMAGE").split(":")[1].split("@")[0]
    (make_version,) = re.findall(r"^UV_VERSION := (\S+)$", MAKEFILE, re.M)
    assert required == f"=={image_tag}" == f"=={make_version}"


def test_the_image_and_make_install_uv_lock_exactly() -> None:
    runs = [r for _, r in instructions("RUN") if r.startswith("uv ")]
    assert runs == [
        "uv sync --locked --no-dev --no-install-project",
        "uv sync --locked --no-dev --no-editable",
    ]
    assert re.search(r"^\t\$\(UV\) sync --locked\b", MAKEFILE, re.M)
    # The local cloud is a dev dependency: `make` installs it, the image does not.
    assert "cloudrun-job-worker-localcloud" in PYPROJECT["dependency-groups"]["dev"]
    assert PYPROJECT["tool"]["uv"]["workspace"]["members"] == ["localcloud"]


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    copies = instructions("COPY")
    (deps_at,) = [at for at, r in instructions("RUN") if "--no-install-project" in r]
    before = [c for at, c in copies if at < deps_at]
    after = [c for at, c in copies if at > deps_at]
    assert before == [
        "--from=uv /uv /usr/local/bin/uv",
        "pyproject.toml uv.lock ./",
        "localcloud/pyproject.toml localcloud/",
    ]
    # Only the worker's code and catalog (and the readme its metadata names), no local cloud code.
    assert after[:3] == ["README.md ./", "jobs/ jobs/", "worker/ worker/"]
    assert after[3:] == ["--from=build /opt/worker /opt/worker"]


def test_the_build_context_is_an_allow_list_of_what_the_image_copies() -> None:
    text = (REPO / ".dockerignore").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "uv.lock",
        "localcloud/pyproject.toml",
        "README.md",
        "jobs",
        "worker",
    }
