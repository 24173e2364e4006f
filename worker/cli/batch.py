"""Batch scoring for operators: `worker batch-status` and the nightly Cloud Scheduler job."""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable
from pathlib import Path

import click
from pydantic import ValidationError
from rich.console import Console
from rich.progress_bar import ProgressBar
from rich.table import Table

from worker.cli.ops import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError
from worker.client import BatchProgress
from worker.core.messages import Result
from worker.core.settings import Settings

SCHEDULER_JOB = "nightly-batch-scoring"


def scheduler_commands(settings: Settings, schedule: str, time_zone: str) -> list[str]:
    """The Cloud Scheduler job that publishes the nightly batch-scoring job.

    Cloud Scheduler publishes the same body every night and cannot put the date in
    it, so the body says `"daily": true` and the worker makes the batch id the job id
    plus the UTC date (worker.gcp.batch.batch_id_for): each night's children get ids of
    their own, while redeliveries of one night's message reuse them.
    """
    body = {
        "job_id": SCHEDULER_JOB,
        "kind": "batch-scoring",
        "payload": {"source": True, "daily": True},
    }
    return [
        f"gcloud services enable cloudscheduler.googleapis.com --project={settings.project}",
        f"gcloud scheduler jobs create pubsub {SCHEDULER_JOB} --project={settings.project} "
        f"--location={settings.region} "
        f"--schedule={shlex.quote(schedule)} --time-zone={shlex.quote(time_zone)} "
        f"--topic={settings.jobs_topic} --message-body={shlex.quote(json.dumps(body))} "
        f"--attributes=job_id={SCHEDULER_JOB},kind=batch-scoring",
    ]


def read_progress(batch_id: str, lines: Iterable[str]) -> tuple[BatchProgress, int]:
    """Progress from results as JSON lines, and how many lines were not results."""
    progress = BatchProgress(batch_id)
    unreadable = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            progress.update(Result.model_validate_json(line))
        except ValidationError:
            unreadable += 1
    return progress, unreadable


def batch_status(batch_id: str, results_file: Path, *, as_json: bool) -> int:
    """Print a batch's progress from a results file; exit 0 when every child finished."""
    try:
        with results_file.open(encoding="utf-8") as lines:
            progress, unreadable = read_progress(batch_id, lines)
    except OSError as exc:
        raise CommandError(f"cannot read {results_file}: {exc.strerror}", EXIT_USAGE) from None
    if as_json:
        click.echo(json.dumps(dict(progress.as_dict(), unreadable_lines=unreadable)))
    else:
        _render(progress, unreadable)
    return EXIT_OK if progress.done else EXIT_FAILED


def _render(progress: BatchProgress, unreadable: int) -> None:
    console = Console()
    if progress.total is None:
        console.print(f"batch {progress.batch_id}: no child results yet")
    else:
        percent = 100 * progress.finished / progress.total
        console.print(
            f"batch [bold]{progress.batch_id}[/]  {progress.finished}/{progress.total}  {percent:.1f}%"
        )
        console.print(ProgressBar(total=progress.total, completed=progress.finished, width=50))
        table = Table(show_header=False, box=None)
        for label, value, style in (
            ("succeeded", progress.succeeded, "green"),
            ("failed", progress.failed, "red"),
            ("rejected", progress.rejected, "red"),
            ("expired", progress.expired, "yellow"),
            ("outstanding", progress.outstanding, "cyan"),
        ):
            table.add_row(f"[{style}]{label}[/]", str(value))
        console.print(table)
    if progress.parent is not None:
        response = progress.parent.response if isinstance(progress.parent.response, dict) else {}
        published = response.get("children_published", "?")
        console.print(f"batch job {progress.parent.status.value}: {published} children published")
    if unreadable:
        console.print(f"[yellow]{unreadable} lines were not results and were skipped[/]")
