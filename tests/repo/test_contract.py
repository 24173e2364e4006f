"""docs/contract.md names what the code has: every status, field, attribute, error code,
catalog field, verb and variable, and nothing the code lacks."""

from __future__ import annotations

import ast
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import AliasChoices

from worker.cli import cli
from worker.core.catalog import BatchSpec, BreakerSpec, JobKind
from worker.core.dead_letters import DeadLetterAttributes
from worker.core.messages import BatchRef, Job, JobStatus, Result
from worker.core.runjob import RunJobSpec
from worker.core.settings import Settings

REPO = Path(__file__).parents[2]
CONTRACT = (REPO / "docs" / "contract.md").read_text("utf-8")


def section(title: str) -> str:
    """The text under a `## title` or `### title` heading, up to the next heading."""
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", CONTRACT, re.M | re.S)
    assert match, f"docs/contract.md has no section {title!r}"
    return match.group(1)


def tables(title: str) -> list[list[str]]:
    """Each table of a section, as the backticked names in its rows' first cells."""
    found: list[list[str]] = []
    rows: list[str] = []
    for line in [*section(title).splitlines(), ""]:
        if line.startswith("|"):
            rows.append(line)
            continue
        if rows:
            body = rows[2:]  # past the header and its separator
            found.append([name for r in body for name in re.findall(r"`([^`]+)`", r.split("|")[1])])
            rows = []
    return found


def test_every_setting_has_its_variable_in_the_configuration_table() -> None:
    (names,) = tables("Configuration")
    variables = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        assert isinstance(alias, AliasChoices)
        variables |= {str(choice) for choice in alias.choices}
    assert variables - set(names) == set(), "missing from docs/contract.md's configuration table"
    stale = {n for n in names if n.startswith("WORKER_")} - variables
    assert not stale, f"in the configuration table but not read by Settings: {stale}"


def test_every_status_is_listed() -> None:
    (names,) = tables("Statuses")
    assert names == [status.value for status in JobStatus]


def test_the_job_messages_fields_and_the_results_fields_are_listed() -> None:
    job_fields, _attributes = tables("Job message")
    assert job_fields == list(Job.model_fields)
    result_fields, result_attributes = tables("Result message")
    assert result_fields == list(Result.model_fields)
    at = datetime.now(UTC)
    result = Result(
        job_id="j:1",
        kind="k",
        status=JobStatus.SUCCEEDED,
        started_at=at,
        finished_at=at,
        duration_ms=0,
        batch=BatchRef(id="j", index=1, total=2),
    )
    assert sorted(result_attributes) == sorted(result.attributes())


def test_every_dead_letter_attribute_is_listed() -> None:
    (names,) = tables("Dead letter")
    everything = DeadLetterAttributes(
        status="failed",
        error_code="c",
        error_message="m",
        attempts=1,
        delivery_attempt=1,
        dead_lettered_at=datetime.now(UTC),
        job_id="j",
        kind="k",
        replay_count=1,
        traceparent="t",
        lane="batch",
    )
    assert sorted(names) == sorted(everything.to_attributes())


def test_every_catalog_field_is_listed() -> None:
    (names,) = tables("Job catalog")
    fields = (
        list(JobKind.model_fields)
        + [f"batch.{name}" for name in BatchSpec.model_fields]
        + [f"run_job.{name}" for name in RunJobSpec.model_fields]
        + [f"breaker.{name}" for name in BreakerSpec.model_fields]
    )
    assert sorted(names) == sorted(fields)


def test_every_verb_is_listed() -> None:
    (rows,) = tables("Command line")
    assert {row.split()[1] for row in rows} == set(cli.commands)


def error_codes() -> set[str]:
    """Every code the worker raises a job error with (`http_{status}` as `http_NNN`)."""
    codes = set()
    for path in (REPO / "worker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if not (name.endswith("JobError") or name == "CallFailed"):
                continue
            code = node.args[0]
            if isinstance(code, ast.Constant):
                codes.add(code.value)
            elif isinstance(code, ast.JoinedStr):
                codes.add("".join(v.value if isinstance(v, ast.Constant) else "NNN" for v in code.values))
            else:
                pytest.fail(f"{path}:{node.lineno}: a job error whose code is not written out")
    return codes


def test_every_error_code_is_listed() -> None:
    (names,) = tables("Error codes")
    assert sorted(names) == sorted(error_codes())
