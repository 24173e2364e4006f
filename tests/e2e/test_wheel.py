"""`pip install .` installs the worker and its catalog, and no local cloud.

The image is built from uv.lock and smoke-tested in tests/e2e/test_container.py; this
checks the wheel a user gets from `pip install .` or `uv build`.
"""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UV = REPO / ".tools" / "bin" / "uv"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    uv = str(UV) if UV.exists() else shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed: run `make test`, which installs it in .tools/")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [uv, "build", "--wheel", "--package", "cloudrun-job-worker", "--out-dir", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("cloudrun_job_worker-*.whl")
    return built


def test_the_wheel_carries_the_code_and_the_catalog_and_nothing_else(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    expected = {
        "worker/_catalog/account-scoring.toml",
        "worker/_catalog/echo.toml",
        "worker/cli/__init__.py",
        # `worker console`'s page, served from the installed package
        "worker/console/static/index.html",
        "worker/console/static/console.js",
        "worker/console/static/console.css",
    }
    assert expected <= set(names)
    assert not [n for n in names if n.startswith(("tests/", "bench/", "jobs/")) or "__pycache__" in n]
    # The local cloud is a distribution of its own (localcloud/): `pip install .` brings
    # neither it nor what only it needs.
    assert not [n for n in names if "localcloud" in n]
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [
        line
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert requires and not [line for line in requires if "localcloud" in line]
