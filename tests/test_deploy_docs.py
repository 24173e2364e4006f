"""docs/deploy.md against the code it describes: the IAM table and the log events.

An operator grants what the guide's table says and greps for the events its runbook
lists; when the code changes either, this test names the row to update.
"""

from __future__ import annotations

import re
from pathlib import Path

from worker.core.catalog import Catalog
from worker.core.settings import Settings
from worker.ops import gcloud

REPO = Path(__file__).resolve().parents[1]
GUIDE = (REPO / "docs" / "deploy.md").read_text()
SEVERITY = {"debug": "DEBUG", "info": "INFO", "warning": "WARNING", "error": "ERROR", "exception": "ERROR"}


def table(header: list[str]) -> list[list[str]]:
    """The rows of the guide's Markdown table with this header, cells without backticks."""
    lines = GUIDE.splitlines()
    wanted = "| " + " | ".join(header) + " |"
    start = lines.index(wanted) + 2  # skip the |---| line
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip().strip("|").split(" | ")])
    return rows


def test_the_iam_table_is_what_setup_grants() -> None:
    settings = Settings(project="PROJECT_ID")
    bindings = gcloud.iam_bindings(
        settings,
        Catalog.load(REPO / "jobs"),
        gcloud.default_worker_sa("PROJECT_ID"),
        gcloud.default_webapp_sa("PROJECT_ID"),
    )
    expected = [[b.member, b.role, b.resource, b.why] for b in bindings]
    assert table(["Member", "Role", "Resource", "Why"]) == expected


def test_the_operator_table_is_what_setup_grants_an_operator() -> None:
    settings = Settings(project="PROJECT_ID")
    bindings = gcloud.operator_bindings(settings, "user:OPERATOR", gcloud.default_worker_sa("PROJECT_ID"))
    assert table(["Operator role", "Resource", "Why"]) == [[b.role, b.resource, b.why] for b in bindings]


def logged_events() -> dict[str, str]:
    """Every event the worker's modules log, with the severity Cloud Logging shows."""
    events = {}
    for module in sorted((REPO / "worker").rglob("*.py")):
        source = module.read_text()
        for level, name in re.findall(r"\blog\.(\w+)\(\s*\"(\w+)\"", source):
            if name == "job_" and re.search(r"log\.\w+\(\s*\"job_\"\s*\+\s*status\.value", source):
                # pipeline._finish logs "job_" + status for the two outcomes that dead-letter.
                events.update({"job_failed": SEVERITY[level], "job_rejected": SEVERITY[level]})
            else:
                events[name] = SEVERITY[level]
    return events


def test_the_runbook_explains_every_log_event() -> None:
    documented = {row[0]: row[1] for row in table(["Event", "Severity", "Meaning", "Action"])}
    events = logged_events()
    assert {
        "job_succeeded",
        "job_failed",
        "job_rejected",
        "worker_ready",
        "liveness_failing",
    } <= events.keys()
    missing = sorted(events.keys() - documented.keys())
    assert not missing, f"add these events to docs/deploy.md's runbook table: {missing}"
    stale = sorted(documented.keys() - events.keys())
    assert not stale, f"no longer logged, remove from the runbook table: {stale}"
    wrong = {name: (documented[name], level) for name, level in events.items() if documented[name] != level}
    assert not wrong, f"severity in the guide vs the code: {wrong}"
