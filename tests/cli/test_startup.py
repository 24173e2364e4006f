"""`worker --help` and usage errors answer at once: no Google client, pydantic or rich is
imported before a verb runs (each of them costs a fraction of a second to load)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("google", "grpc", "pydantic", "rich", "aiohttp", "opentelemetry")

PROBE = """
import json, sys
from worker.cli import cli
try:
    cli(sys.argv[1:], prog_name="worker")
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


@pytest.mark.parametrize(
    ("argv", "code"),
    [(["--help"], 0), (["enqueue", "--help"], 0), (["enqueue", "echo"], 2), (["no-such-verb"], 2)],
    ids=["--help", "enqueue --help", "a missing option", "an unknown verb"],
)
def test_help_and_usage_errors_load_no_heavy_library(argv: list[str], code: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60, check=True
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == code
    assert [name for name in report["loaded"] if name in HEAVY] == []
