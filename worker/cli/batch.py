"""`worker batch-status`: a batch's progress from the results the web app stored."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from worker.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError, exits_with_code

if TYPE_CHECKING:
    from worker.client import BatchProgress


@click.command("batch-status")
@click.argument("batch_id")
@click.option(
    "--from-file",
    "results_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Results as JSON lines, e.g. what the web app stored.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@exits_with_code
def batch_status(batch_id: str, results_file: Path, as_json: bool) -> int:
    """Show a batch's progress; exit 0 once every child has a result, 1 before."""
    return show_progress(batch_id, results_file, as_json=as_json)


def read_progress(batch_id: str, lines: Iterable[str]) -> tuple[BatchProgress, int]:
    """Progress from results as JSON lines, and how many lines were not results."""
    from pydantic import ValidationError

    from worker.client import BatchProgress
    from worker.core.messages import Result

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


def show_progress(batch_id: str, results_file: Path, *, as_json: bool) -> int:
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
    from rich.console import Console
    from rich.markup import escape
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    console = Console()
    if progress.total is None:
        console.print(f"batch {escape(progress.batch_id)}: no child results yet")
    else:
        percent = 100 * progress.finished / progress.total
        console.print(
            f"batch [bold]{escape(progress.batch_id)}[/]  "
            f"{progress.finished}/{progress.total}  {percent:.1f}%"
        )
        console.print(ProgressBar(total=progress.total, completed=progress.finished, width=50))
        table = Table(show_header=False, box=None)
        for label, value, style in (
            ("succeeded", progress.succeeded, "green"),
            ("failed", progress.failed, "red"),
            ("rejected", progress.rejected, "red"),
            ("expired", progress.expired, "yellow"),
            ("cancelled", progress.cancelled, "yellow"),
            ("outstanding", progress.outstanding, "cyan"),
            ("  of which running", progress.running, "cyan"),
            ("  of which scheduled", progress.scheduled, "cyan"),
        ):
            table.add_row(f"[{style}]{label}[/]", str(value))
        console.print(table)
    if progress.parent is not None:
        response = progress.parent.response if isinstance(progress.parent.response, dict) else {}
        published = response.get("children_published", "?")
        console.print(
            f"batch job {progress.parent.status.value}: {escape(str(published))} children published"
        )
    if unreadable:
        console.print(f"[yellow]{unreadable} lines were not results and were skipped[/]")


COMMANDS = [batch_status]
