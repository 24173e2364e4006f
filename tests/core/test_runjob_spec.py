"""A `run_job` kind: its [run_job] table is checked at load, and a payload fills it or is rejected."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from worker.core.catalog import Catalog
from worker.core.errors import ConfigError, InvalidJobError
from worker.core.followup import HOLD_S, FollowUp, is_follow_up
from worker.core.runjob import RunJobSpec, render


def load(tmp_path: Path, table: str, head: str = 'kind = "rescore"\nhandler = "run_job"\n') -> Catalog:
    (tmp_path / "rescore.toml").write_text(head + table)
    return Catalog.load(tmp_path)


SCHEMA = (
    '[payload_schema]\ntype = "object"\n'
    '[payload_schema.properties.account_id]\ntype = "string"\npattern = "^[a-z0-9-]{1,64}$"\n'
    '[payload_schema.properties.shards]\ntype = "integer"\n'
    '[payload_schema.properties.mode]\nenum = ["fast", "full"]\n'
)


def test_a_run_job_kind_loads_and_names_its_job(tmp_path: Path) -> None:
    catalog = load(
        tmp_path,
        '[run_job]\njob = "rescore-all"\nargs = ["--account={account_id}"]\ntask_count = "{shards}"\n'
        '[run_job.env]\nMODE = "{mode}"\n' + SCHEMA,
        'kind = "rescore"\nhandler = "run_job"\nregion = "europe-west1"\n',
    )
    assert catalog.run_jobs("us-central1") == {("rescore-all", "europe-west1")}
    assert catalog.services("us-central1") == set()


@pytest.mark.parametrize(
    ("table", "complaint"),
    [
        ("", "needs a [run_job] table"),
        ('[run_job]\njob = "Rescore_All"\n', "Cloud Run job name"),
        ('[run_job]\njob = "j"\nargs = ["--x={account.id}"]\n', "top-level payload field"),
        ('[run_job]\njob = "j"\nargs = ["--x={"]\n', "literal brace"),
        ('[run_job]\njob = "j"\nargs = ["--x={a!r}"]\n', "top-level payload field"),
        ('[run_job]\njob = "j"\n[run_job.env]\nWORKER_JOB_ID = "x"\n', "set by the worker or by Cloud Run"),
        ('[run_job]\njob = "j"\n[run_job.env]\nCLOUD_RUN_TASK_INDEX = "x"\n', "set by the worker"),
        ('[run_job]\njob = "j"\n[run_job.env]\n"BAD-NAME" = "x"\n', "not an environment variable name"),
        ('[run_job]\njob = "j"\ntask_count = 0\n', "between 1 and 10000"),
        ('[run_job]\njob = "j"\ntask_count = "{a} {b}"\n', "one {field}"),
        ('[run_job]\njob = "j"\ntask_timeout_s = 604801\n', "between 1 and 604800"),
        ('[run_job]\njob = "j"\nimage = "evil"\n', "Extra inputs"),
        # every field a template reads is bounded by the schema (issue 24)
        (
            '[run_job]\njob = "j"\nargs = ["--t={tenant}"]\n',
            "describe it in [payload_schema.properties.tenant]",
        ),
        (
            '[run_job]\njob = "j"\nargs = ["--t={tenant}"]\n'
            '[payload_schema.properties.tenant]\ntype = "string"\n',
            "bound it in [payload_schema.properties.tenant]",
        ),
        *(
            (f'[run_job]\njob = "j"\n[run_job.env]\n{name} = "x"\n', "changes how the job's process")
            for name in (
                "LD_PRELOAD",
                "PATH",
                "PYTHONPATH",
                "GOOGLE_APPLICATION_CREDENTIALS",
                "HTTPS_PROXY",
                "https_proxy",
                "K_SERVICE",
                "PORT",
            )
        ),
        ('[run_job]\njob = "j"\nmax_task_count = 10001\n', "less than or equal to 10000"),
    ],
)
def test_a_broken_table_stops_the_load_naming_the_field(tmp_path: Path, table: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, table)
    assert complaint in str(caught.value) and "rescore.toml" in str(caught.value)


def test_a_call_kind_may_not_carry_a_run_job_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only it may have one"):
        load(tmp_path, '[run_job]\njob = "j"\n', 'kind = "rescore"\nservice = "svc"\n')


SPEC = RunJobSpec(
    job="rescore",
    args=("--account={account_id}", "--depth={depth}", "{{literal}}"),
    env={"MODE": "{mode}-x"},
    task_count="{shards}",
    task_timeout_s=600,
)


def test_render_fills_the_template_and_adds_the_job_id_env() -> None:
    payload = {"account_id": "acme", "depth": 2, "mode": True, "shards": 3, "unused": {"x": 1}}
    overrides = render(SPEC, "rescore", payload, "job-1", 2)
    assert overrides.args == ["--account=acme", "--depth=2", "{literal}"]
    assert overrides.env == {"MODE": "true-x", "WORKER_JOB_ID": "job-1", "WORKER_REPLAY_COUNT": "2"}
    assert (overrides.task_count, overrides.task_timeout_s) == (3, 600)


def test_a_template_without_fields_takes_any_payload_and_keeps_the_jobs_args() -> None:
    overrides = render(RunJobSpec(job="j"), "k", ["anything"], "id", 0)
    assert overrides.args is None and overrides.task_count is None
    assert overrides.env == {"WORKER_JOB_ID": "id", "WORKER_REPLAY_COUNT": "0"}


@pytest.mark.parametrize(
    ("payload", "complaint"),
    [
        ("acme", "must be a JSON object"),
        ({"account_id": "a", "depth": 1, "mode": "m"}, "missing field(s) ['shards']"),
        ({"account_id": {"id": 1}, "depth": 1, "mode": "m", "shards": 1}, "'account_id' must be a string"),
        ({"account_id": None, "depth": 1, "mode": "m", "shards": 1}, "got null"),
        ({"account_id": "a", "depth": 1, "mode": "m", "shards": 101}, "integer from 1 to 100"),
        ({"account_id": "a", "depth": 1, "mode": "m", "shards": True}, "integer from 1 to 100"),
        # values that would change what the job runs, not fill it (issue 24)
        (
            {"account_id": "acme\n--delete-everything", "depth": 1, "mode": "m", "shards": 1},
            "control character",
        ),
        ({"account_id": "a\x00b", "depth": 1, "mode": "m", "shards": 1}, "control character"),
        ({"account_id": "a", "depth": 1, "mode": "\x1b[31m", "shards": 1}, "control character"),
        ({"account_id": "a", "depth": 1, "mode": "\u009b", "shards": 1}, "control character"),
        ({"account_id": "a" * 40_000, "depth": 1, "mode": "m", "shards": 1}, "pass a reference"),
    ],
)
def test_a_payload_that_does_not_fit_is_rejected(payload: object, complaint: str) -> None:
    with pytest.raises(InvalidJobError) as caught:
        render(SPEC, "rescore", payload, "job-1", 0)
    assert caught.value.code == "invalid_payload" and complaint in caught.value.message


def test_a_whole_argument_placeholder_may_not_start_with_a_dash() -> None:
    spec = RunJobSpec(job="j", args=("{tenant}", "--name={tenant}"))
    with pytest.raises(InvalidJobError, match="the argument '\\{tenant\\}' may not start with '-'"):
        render(spec, "k", {"tenant": "--delete-everything"}, "id", 0)
    # inside an option's value, a dash is just a character
    assert render(RunJobSpec(job="j", args=("--name={t}",)), "k", {"t": "-x"}, "id", 0).args == ["--name=-x"]


def follow_up(check_in_s: float, interval_s: float = 10.0) -> tuple[FollowUp, datetime]:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    body = FollowUp(
        job_id="j",
        kind="k",
        execution="projects/p/locations/r/jobs/x/executions/x-1",
        check_at=at + timedelta(seconds=check_in_s),
        interval_s=interval_s,
        started_at=at,
        job_data="{}",
        checks=0,
    )
    return body, at


def test_a_follow_up_is_held_a_few_seconds_at_most_and_backs_off_to_the_cap() -> None:
    body, at = follow_up(60)
    assert not body.due(at) and body.hold(at) == HOLD_S
    assert body.hold(at + timedelta(seconds=58)) == pytest.approx(2.0)
    assert body.due(at + timedelta(seconds=60)) and body.hold(at + timedelta(seconds=61)) == 0
    later = body.next_check(at, poll_max_s=15)
    assert later.interval_s == 15 and later.check_at == at + timedelta(seconds=15) and later.checks == 1
    assert is_follow_up(later.attributes()) and later.attributes()["job_id"] == "j"
    assert FollowUp.model_validate_json(later.to_bytes()) == later
