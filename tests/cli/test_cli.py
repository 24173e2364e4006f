"""The `worker` command's argument handling and its one error path, through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from worker.cli import cli


@pytest.fixture()
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test-project")
    return CliRunner()


def test_every_verb_is_registered_once() -> None:
    assert set(cli.commands) == {
        "run",
        "setup",
        "enqueue",
        "cancel",
        "scheduled",
        "dead-letters",
        "replay",
        "doctor",
        "batch-status",
        "dev",
        "pause",
        "resume",
        "status",
        "console",
    }


def test_a_missing_project_names_the_variable_and_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    done = CliRunner().invoke(cli, ["dead-letters"])
    assert done.exit_code == 2
    assert done.output.startswith("worker: error: GOOGLE_CLOUD_PROJECT is not set")


def test_operator_without_print_gcloud_is_refused(runner: CliRunner) -> None:
    done = runner.invoke(cli, ["setup", "--operator", "user:alice@example.com"])
    assert done.exit_code == 2
    assert "--operator goes with --print-gcloud" in done.output


def test_an_operator_member_without_a_prefix_names_the_fix(runner: CliRunner) -> None:
    done = runner.invoke(cli, ["setup", "--print-gcloud", "--operator", "alice@example.com"])
    assert done.exit_code == 2
    assert done.output.startswith("worker: error: --operator:")
    assert "user:" in done.output


def test_print_gcloud_grants_the_telemetry_roles_the_deployments_exporters_need(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    plain = runner.invoke(cli, ["setup", "--print-gcloud"])
    assert plain.exit_code == 0 and "cloudtrace" not in plain.output and "metricWriter" not in plain.output
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "gcp_trace")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "gcp_monitoring")
    done = runner.invoke(cli, ["setup", "--print-gcloud"])
    assert done.exit_code == 0
    assert (
        "gcloud projects add-iam-policy-binding test-project "
        "--member=serviceAccount:worker@test-project.iam.gserviceaccount.com --role=roles/cloudtrace.agent"
    ) in done.output
    assert "--role=roles/monitoring.metricWriter" in done.output
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    refused = runner.invoke(cli, ["setup", "--print-gcloud"])
    assert refused.exit_code == 2 and "OTEL_TRACES_EXPORTER" in refused.output


def test_enqueue_refuses_a_payload_that_is_not_json(runner: CliRunner) -> None:
    done = runner.invoke(cli, ["enqueue", "echo", "--payload", "{nope"])
    assert done.exit_code == 2
    assert "--payload is not JSON" in done.output


def test_enqueue_refuses_an_unknown_kind_before_publishing(runner: CliRunner) -> None:
    done = runner.invoke(cli, ["enqueue", "no-such-kind", "--payload", "{}"])
    assert done.exit_code == 2
    assert "job refused, nothing published" in done.output


@pytest.mark.parametrize("batch_id", ["x[/]", "[bold]b[/bold]", "a[red"])
def test_batch_status_prints_markup_in_an_id_literally(
    tmp_path: Path, runner: CliRunner, batch_id: str
) -> None:
    results = tmp_path / "results.jsonl"
    results.write_text("")
    done = runner.invoke(cli, ["batch-status", batch_id, "--from-file", str(results)])
    assert done.output == f"batch {batch_id}: no child results yet\n"
    assert done.exit_code == 1  # not finished


def test_batch_status_shows_progress(tmp_path: Path, runner: CliRunner) -> None:
    results = tmp_path / "results.jsonl"
    child = {
        "job_id": "b1:0",
        "kind": "account-scoring",
        "status": "succeeded",
        "attempts": 1,
        "started_at": "2026-01-01T00:00:00Z",
        "finished_at": "2026-01-01T00:00:01Z",
        "duration_ms": 1000,
        "batch": {"id": "b1", "index": 0, "total": 2},
    }
    results.write_text(json.dumps(child) + "\n[not a result]\n")
    done = runner.invoke(cli, ["batch-status", "b1", "--from-file", str(results)])
    assert "batch b1  1/2  50.0%" in done.output
    assert "1 lines were not results and were skipped" in done.output
    assert done.exit_code == 1


def test_batch_status_names_an_unreadable_file(tmp_path: Path, runner: CliRunner) -> None:
    done = runner.invoke(cli, ["batch-status", "b", "--from-file", str(tmp_path / "missing.jsonl")])
    assert done.exit_code == 2
    assert "cannot read" in done.output


MARKUP = "x[/] [bold]b[/bold] a[red"


def test_batch_status_prints_markup_in_a_parents_answer_literally(tmp_path: Path, runner: CliRunner) -> None:
    at = {"started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:01Z", "duration_ms": 1000}
    child = {
        "job_id": "b1:0",
        "kind": "k",
        "status": "succeeded",
        "batch": {"id": "b1", "index": 0, "total": 1},
    }
    parent = {
        "job_id": "b1",
        "kind": "batch-scoring",
        "status": "succeeded",
        "response": {"batch_id": "b1", "children_published": MARKUP},
    }
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({**child, **at}) + "\n" + json.dumps({**parent, **at}) + "\n")
    done = runner.invoke(cli, ["batch-status", "b1", "--from-file", str(results)])
    assert done.exit_code == 0, done.output
    assert "batch b1  1/1  100.0%" in done.output
    assert f"batch job succeeded: {MARKUP} children published" in done.output


def test_tables_and_the_replay_log_print_markup_in_user_text_literally(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from worker.cli.common import table
    from worker.cli.ops import _Progress

    table(MARKUP, ["job id", "error"], [[MARKUP, MARKUP]])
    printed = capsys.readouterr().out
    assert printed.count(MARKUP) == 3, printed
    progress = _Progress(enabled=True)
    with progress:
        progress.start(1)
        progress.log(f"failed: {MARKUP}: republish failed")
        progress.advance()
    assert f"failed: {MARKUP}: republish failed" in capsys.readouterr().out


def test_a_table_piped_is_one_line_per_row_however_long_its_cells(capsys: pytest.CaptureFixture[str]) -> None:
    from worker.cli.common import table

    error = "http_503: " + "the service answered 503 Service Unavailable " * 4
    table("Dead letters", ["job id", "error", "targets"], [["job-1", error, "a: closed\nb: open"]])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["Dead letters", "job id\terror\ttargets", f"job-1\t{error.strip()}\ta: closed; b: open"]
