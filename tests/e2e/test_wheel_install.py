"""The image's install recipe, run without Docker: build context -> wheel -> venv -> `worker run`.

The Dockerfile's build stage is replayed instruction by instruction from the file
itself (its COPYs into a context filtered by .dockerignore, then its RUN lines, which
call the shared scripts), with the container's absolute paths mapped into a temporary
directory. The worker then runs from that venv, in a directory outside the checkout,
so it can only use the packaged catalog.

Dependencies are the one deliberate difference from a Docker build. Downloading them
from PyPI on every test run would be slow and prove only that PyPI works (Cloud Build's
docker step proves that). Instead, before the install runs, the venv receives exactly
the dependency closure the wheel declares (its Requires-Dist, followed recursively,
extras and markers included), linked from the versions installed in .venv. The
install script's `pip install` then finds every requirement satisfied, checks the
versions and installs only the wheel; and since nothing outside the declared closure
is present, a module the code imports without declaring it fails here as in the image.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from localcloud import score_account
from tests.dockerfile import Stage, build_context, parse_dockerfile
from tests.e2e.harness import collect_results, provision, publish, worker_env

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e

DEV_BIN = Path(sys.executable).parent  # .venv/bin: `python` there is a 3.11, like the image's


def replay_build_stage(stage: Stage, context: Path, root: Path, before_run: Any) -> None:
    """COPY and RUN as Docker would, with the container's / at `root`."""
    workdir = root
    for instruction in stage.instructions:
        words = shlex.split(instruction.args)
        if instruction.keyword == "WORKDIR":
            workdir = root / words[0].lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            *sources, destination = words
            into_directory = len(sources) > 1 or destination.endswith("/")
            for source in sources:
                copy_from_context(context / source, workdir / destination, into_directory=into_directory)
        elif instruction.keyword == "RUN":
            before_run(words)
            argv = [str(root) + w if w.startswith("/") else w for w in words]
            env = dict(os.environ, PATH=f"{DEV_BIN}{os.pathsep}{os.environ['PATH']}")
            subprocess.run(argv, cwd=workdir, env=env, check=True, capture_output=True, timeout=600)
        else:
            raise AssertionError(f"the replay does not know {instruction.keyword}; teach it")


def copy_from_context(source: Path, destination: Path, *, into_directory: bool) -> None:
    assert source.exists(), f"{source.name} is not in the build context: check .dockerignore"
    if source.is_dir():
        for file in source.rglob("*"):
            if file.is_file():
                target = destination / file.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(file.read_bytes())
                target.chmod(file.stat().st_mode)
        return
    target = destination / source.name if into_directory else destination
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
    target.chmod(source.stat().st_mode)


def declared_closure(wheel: Path) -> list[importlib.metadata.Distribution]:
    """The installed distributions the wheel's requirements reach, extras included."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    requires = [line.split(":", 1)[1] for line in text.splitlines() if line.startswith("Requires-Dist:")]
    pending = [r for r in map(Requirement, requires) if r.marker is None or r.marker.evaluate({"extra": ""})]
    found: dict[str, importlib.metadata.Distribution] = {}
    walked: set[tuple[str, str]] = set()  # (distribution, extra); "" is its base requirements
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name not in found:
            try:
                found[name] = importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                raise AssertionError(f"{requirement} is declared but not in .venv: run `make`") from None
        for extra in {"", *requirement.extras} - {e for n, e in walked if n == name}:
            walked.add((name, extra))
            for child in map(Requirement, found[name].requires or []):
                if child.marker is None or child.marker.evaluate({"extra": extra}):
                    pending.append(child)
    return list(found.values())


def link_distributions(dists: list[importlib.metadata.Distribution], site_packages: Path) -> None:
    for dist in dists:
        for file in dist.files or []:
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue  # console scripts outside site-packages; bytecode is rebuilt
            target = site_packages / file
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(Path(dist.locate_file(file)).resolve())


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/ of the build stage after its last RUN: /wheels and /opt/worker."""
    base = tmp_path_factory.mktemp("image")
    context = build_context(base / "context")
    root = base / "root"

    def before_run(words: list[str]) -> None:
        if words[0] != "scripts/install-wheel.sh":
            return
        venv, wheels = root / words[1].lstrip("/"), root / words[2].lstrip("/")
        subprocess.run([DEV_BIN / "python", "-m", "venv", "--without-pip", venv], check=True)
        (site_packages,) = (venv / "lib").glob("python3.*/site-packages")
        (wheel,) = wheels.glob("*.whl")
        link_distributions(declared_closure(wheel), site_packages)

    build, _runtime = parse_dockerfile()
    replay_build_stage(build, context, root, before_run)
    return root


def test_the_wheel_carries_the_code_and_the_catalog_and_nothing_else(image_root: Path) -> None:
    (wheel,) = (image_root / "wheels").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    expected = {"worker/_catalog/account-scoring.toml", "worker/_catalog/echo.toml", "worker/cli/__init__.py"}
    assert expected <= set(names)
    assert not [n for n in names if n.startswith(("tests/", "bench/", "jobs/")) or "__pycache__" in n]
    # The local cloud is a distribution of its own (localcloud/): `pip install .` brings
    # neither it nor what only it needs.
    assert not [n for n in names if "localcloud" in n]
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [line for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert requires and not [line for line in requires if "cryptography" in line or "localcloud" in line]


def test_the_installed_worker_imports_from_the_venv_with_its_packaged_catalog(
    image_root: Path, tmp_path: Path
) -> None:
    venv = image_root / "opt" / "worker"
    probe = (
        "import json, worker, worker.core.catalog as c;"
        "print(json.dumps([worker.__file__, str(c.default_catalog_dir())]))"
    )
    out = subprocess.run(
        [venv / "bin" / "python", "-c", probe],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    module, catalog = json.loads(out.stdout)
    assert module.startswith(str(venv)) and catalog.endswith("worker/_catalog")
    check = subprocess.run(
        [DEV_BIN / "python", "-m", "pip", "--python", venv / "bin" / "python", "check"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    help_text = subprocess.run(
        [venv / "bin" / "worker", "--help"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "run" in help_text and "setup" in help_text


def clean_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """No trace of the development venv or checkout: the image has neither."""
    env = {
        k: v for k, v in (base or os.environ).items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    }
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != DEV_BIN)
    return env


def test_the_installed_worker_runs_a_job_and_exits_0_on_sigterm(
    image_root: Path, tmp_path: Path, local_cloud: Any, pubsub_emulator: Any, names: Any
) -> None:
    for service, function in (("account-scoring", "account-scoring"), ("echo", "echo")):
        try:
            local_cloud.service(service)
        except KeyError:  # the packaged catalog names these services; another test may have added them
            local_cloud.add_service(service, function)
    env = clean_env(worker_env(local_cloud, names))
    env.pop("WORKER_CATALOG_DIR", None)
    provision(env)
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [image_root / "opt" / "worker" / "bin" / "worker", "run"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "consumer_started" not in log_path.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()
            time.sleep(0.1)
        payload = {
            "account_id": "acct-wheel",
            "employees": 120,
            "annual_revenue": 2_500_000.0,
            "industry": "software",
        }
        publish(env, [{"job_id": "wheel-1", "kind": "account-scoring", "payload": payload}])
        (result,) = collect_results(env, {"wheel-1"}, timeout=60)["wheel-1"]
        assert result["status"] == "succeeded", result
        assert result["response"]["score"] == score_account(payload)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    ready = next(e for e in events if e["message"] == "worker_ready")
    # The packaged catalog is the repository's jobs/, kind for kind.
    shipped = sorted(tomllib.loads(f.read_text())["kind"] for f in (REPO_ROOT / "jobs").glob("*.toml"))
    assert ready["kinds"] == shipped
    assert "consumer_stopped" in [e["message"] for e in events]
