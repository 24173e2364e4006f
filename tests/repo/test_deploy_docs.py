"""docs/deploy.md against the code it describes: the IAM table, the log events, the
CREMA configuration and the sizing table.

An operator grants what the guide's table says, greps for the events its runbook
lists and pastes its autoscaler configuration; when the code changes any of them, this
test names what to update.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from worker.core.catalog import Catalog
from worker.core.settings import Settings
from worker.ops import iam

REPO = Path(__file__).resolve().parents[2]
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
    bindings = iam.iam_bindings(
        settings,
        Catalog.load(REPO / "jobs"),
        iam.default_worker_sa("PROJECT_ID"),
        iam.default_webapp_sa("PROJECT_ID"),
    )
    expected = [[b.member, b.role, b.resource, b.why] for b in bindings]
    assert table(["Member", "Role", "Resource", "Why"]) == expected


def test_the_push_table_is_what_setup_grants_for_a_push_endpoint() -> None:
    settings = Settings(project="PROJECT_ID")
    catalog = Catalog.load(REPO / "jobs")
    worker, webapp = iam.default_worker_sa("PROJECT_ID"), iam.default_webapp_sa("PROJECT_ID")
    pull = iam.iam_bindings(settings, catalog, worker, webapp)
    push = iam.iam_bindings(
        settings,
        catalog,
        worker,
        webapp,
        push=iam.push_target(settings, "https://webapp-abc123-uc.a.run.app/pubsub/results"),
    )
    added = [b for b in push if b not in pull]
    assert [b for b in pull if b not in push] == [pull[-1]]  # the web app's subscriber role
    rows = [[b.member, b.role, b.resource, b.why] for b in added]
    assert table(["Push member", "Role", "Resource", "Why"]) == rows


def test_the_operator_table_is_what_setup_grants_an_operator() -> None:
    settings = Settings(project="PROJECT_ID")
    bindings = iam.operator_bindings(settings, "user:OPERATOR", iam.default_worker_sa("PROJECT_ID"))
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


def crema_config() -> dict[str, Any]:
    (block,) = [b for b in re.findall(r"^```yaml\n(.*?)^```", GUIDE, re.M | re.S) if "kind: CremaConfig" in b]
    config: dict[str, Any] = yaml.safe_load(block)
    return config


def test_the_crema_configuration_passes_cremas_own_checks() -> None:
    """metric-provider/internal/config/validator.go of CREMA, rule for rule."""
    spec = crema_config()["spec"]
    assert spec["scaledObjects"], "at least one scaled object"
    auths = [a["metadata"]["name"] for a in spec["triggerAuthentications"]]
    assert len(auths) == len(set(auths)) and all(auths)
    for auth in spec["triggerAuthentications"]:
        assert auth["spec"]["podIdentity"]["provider"] == "gcp"
    for scaled in spec["scaledObjects"]:
        assert scaled["spec"]["scaleTargetRef"]["name"]
        assert "pollingInterval" not in scaled["spec"], "only at the top of CremaConfig.spec"
        assert scaled["spec"]["triggers"]
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["type"]
            assert trigger["authenticationRef"]["name"] in auths


def test_the_crema_configuration_scales_the_deployed_pool_on_its_jobs_subscription() -> None:
    settings = Settings(project="PROJECT_ID")
    cloudbuild = yaml.safe_load((REPO / "cloudbuild.yaml").read_text())["substitutions"]
    (scaled,) = crema_config()["spec"]["scaledObjects"]
    spec = scaled["spec"]
    pool = cloudbuild["_NAME"]
    assert spec["scaleTargetRef"]["name"] == f"projects/PROJECT_ID/locations/REGION/workerpools/{pool}"
    # One trigger per lane: the backlog of every lane's subscription.
    assert [t["metadata"]["subscriptionName"] for t in spec["triggers"]] == [
        settings.lane_subscription(lane) for lane in settings.lanes
    ]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "gcp-pubsub"
        assert trigger["metadata"]["mode"] == "SubscriptionSize"
        # The backlog per instance stays under what one instance holds in flight.
        target = float(trigger["metadata"]["value"])
        assert 0.5 * settings.max_in_flight <= target < settings.max_in_flight
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]


def number(text: str) -> int:
    return int(text.replace(",", ""))


def test_the_sizing_table_adds_up_and_covers_the_crema_maximum() -> None:
    header = [
        "Worker instances (max)",
        "`WORKER_MAX_IN_FLIGHT`",
        "Concurrent calls at most",
        "Functions' max instances x concurrency needed",
        "Jobs/s at 200 ms latency",
    ]
    rows = table(header)
    assert rows
    for instances, in_flight, calls, functions, jobs_per_s in rows:
        assert number(calls) == number(instances) * number(in_flight)
        capacities = [int(a) * int(b) for a, b in re.findall(r"(\d+) x (\d+)", functions)]
        assert capacities and all(c >= number(calls) for c in capacities), functions
        assert number(jobs_per_s) == number(calls) * 5  # in flight / 0.2 s
    (scaled,) = crema_config()["spec"]["scaledObjects"]
    maximum = scaled["spec"]["maxReplicaCount"]
    default_in_flight = Settings(project="p").max_in_flight
    assert [maximum, default_in_flight] in [[number(r[0]), number(r[1])] for r in rows]
