"""Operators' verbs: `dead-letters`, `replay`, `doctor`.

The work is done in `worker.ops` (operations, doctor); this module turns flags into
calls and results into what a person reads (rich tables and progress on a terminal,
plain lines or JSON lines otherwise) and into exit codes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import click

from worker.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    CommandError,
    age,
    exits_with_code,
    google_errors,
    load_catalog_or_fail,
    load_settings_or_fail,
    operator_clients,
    table,
)
from worker.core.lanes import LANES

if TYPE_CHECKING:
    from worker.core.settings import Settings


@click.command("dead-letters")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--limit", type=click.IntRange(min=1), help="List at most this many.")
@exits_with_code
def dead_letters(as_json: bool, limit: int | None) -> int:
    """List dead-lettered jobs without consuming them."""
    return list_dead_letters(load_settings_or_fail(), as_json=as_json, limit=limit)


@click.command()
@click.option("--kind", help="Only jobs of this kind.")
@click.option("--job-id", help="Only this job.")
@click.option("--limit", type=click.IntRange(min=1), help="Replay at most this many.")
@click.option("--dry-run", is_flag=True, help="List what would be replayed; change nothing.")
@click.option(
    "--lane",
    type=click.Choice(LANES),
    help="Replay down this lane [the lane each came from]; batch for a large backlog.",
)
@click.option(
    "--at", "at", metavar="TIME", help="Run them not before this time (RFC 3339 with a zone), off-peak."
)
@click.option(
    "--in", "in_", metavar="DURATION", help="Run them not before this long from now: 90s, 15m, 2h, 3d."
)
@exits_with_code
def replay(
    kind: str | None,
    job_id: str | None,
    limit: int | None,
    dry_run: bool,
    lane: str | None,
    at: str | None,
    in_: str | None,
) -> int:
    """Move dead-lettered jobs back to their lane's topic (each acked only once republished)."""
    from worker.cli.jobs import not_before_option
    from worker.core.messages import now

    settings = load_settings_or_fail()
    later = not_before_option(at, in_)
    not_before = now() + later if isinstance(later, timedelta) else later
    return replay_dead_letters(
        settings, kind=kind, job_id=job_id, limit=limit, dry_run=dry_run, lane=lane, not_before=not_before
    )


@click.command()
@click.argument("service", required=False)
@click.option("--audience", help="Mint the token for this audience instead of the service URL.")
@click.option("--worker-sa", help="The service account to impersonate, for the fix commands.")
@exits_with_code
def doctor(service: str | None, audience: str | None, worker_sa: str | None) -> int:
    """Diagnose the identity chain (credentials, ID token, URL, call; Cloud Run jobs: the job,
    the run permission) and print the fix."""
    return diagnose(load_settings_or_fail(), service, audience=audience, worker_sa=worker_sa)


def list_dead_letters(settings: Settings, *, as_json: bool, limit: int | None) -> int:
    from worker.core.messages import now
    from worker.ops import operations

    _, subscriber = operator_clients(settings)
    path = subscriber.subscription_path(settings.project, settings.dead_letter_subscription)
    with google_errors(settings):
        entries, more = operations.list_dead_letters(subscriber, path, limit=limit)
    at = now()
    if as_json:
        for entry in entries:
            click.echo(json.dumps(entry.to_json(at)))
        return EXIT_OK
    if not entries:
        click.echo(f"No dead letters on {path}.")
        return EXIT_OK
    table(
        f"Dead letters on {path} (left in place)",
        ["job id", "kind", "lane", "status", "error", "attempts", "age", "replays"],
        [
            [
                e.job_id or "-",
                e.kind or "-",
                e.lane,
                e.status,
                f"{e.error_code}: {e.error_message}" if e.error_code else e.error_message,
                "-" if e.attempts is None else str(e.attempts),
                age(e.age(at)),
                str(e.replay_count),
            ]
            for e in entries
        ],
    )
    shown = f"{len(entries)} dead letter(s)" + (" shown; there may be more (--limit)" if more else "")
    click.echo(f"{shown}. Replay with `worker replay [--kind K] [--job-id ID]`.")
    return EXIT_OK


def replay_dead_letters(
    settings: Settings,
    *,
    kind: str | None,
    job_id: str | None,
    limit: int | None,
    dry_run: bool,
    lane: str | None = None,
    not_before: datetime | None = None,
) -> int:
    from worker.ops import operations

    publisher, subscriber = operator_clients(settings)
    path = subscriber.subscription_path(settings.project, settings.dead_letter_subscription)

    def topic(lane: str) -> str:
        return str(publisher.topic_path(settings.project, settings.lane_topic(lane)))

    progress = _Progress(enabled=sys.stdout.isatty() and not dry_run)

    def settled(entry: operations.DeadLetterEntry, error: str | None) -> None:
        progress.advance()
        if error is not None:
            progress.log(f"failed: {entry.job_id or entry.message_id}: {error}")

    with google_errors(settings), progress:
        report = operations.replay_dead_letters(
            subscriber,
            publisher,
            path,
            topic,
            kind=kind,
            job_id=job_id,
            limit=limit,
            dry_run=dry_run,
            lane=lane,
            on_selected=lambda chosen: progress.start(len(chosen)),
            on_settled=settled,
            not_before=not_before,
        )
    publisher.stop()
    if dry_run:
        rows = [
            [
                e.job_id or "-",
                e.kind or "-",
                e.error_code or e.status,
                str(e.replay_count + 1),
                lane or e.lane,
            ]
            for e in report.selected
        ]
        if rows:
            table("Would replay (dry run)", ["job id", "kind", "error", "replay #", "lane"], rows)
        click.echo(f"dry run: would replay {len(report.selected)}, skip {report.skipped}; nothing changed.")
        return EXIT_OK
    if not sys.stdout.isatty():
        for entry, error in report.failed:
            click.echo(f"failed: {entry.job_id or entry.message_id}: {error}", err=True)
    if (kind or job_id) and not report.selected:
        wanted = " and ".join(
            f"{name} {value}" for name, value in (("kind", kind), ("job id", job_id)) if value
        )
        raise CommandError(
            f"no dead letter on {path} has {wanted} ({report.skipped} other(s) left in place); "
            "nothing replayed: `worker dead-letters` lists them"
        )
    truncated = " (stopped scanning at 10000; run again for more)" if report.truncated else ""
    click.echo(
        f"replayed {len(report.replayed)}, skipped {report.skipped}, failed {len(report.failed)}{truncated}"
    )
    return EXIT_FAILED if report.failed else EXIT_OK


class _Progress:
    """A rich progress bar on a terminal; silent otherwise (and for a dry run)."""

    def __init__(self, *, enabled: bool) -> None:
        self._bar: Any = None
        self._task: Any = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(TextColumn("replaying"), BarColumn(), MofNCompleteColumn())

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start(self, total: int) -> None:
        if self._bar is not None:
            self._task = self._bar.add_task("replay", total=total)

    def advance(self) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task)

    def log(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, markup=False, soft_wrap=True)


def diagnose(settings: Settings, service: str | None, *, audience: str | None, worker_sa: str | None) -> int:
    from worker.ops import doctor as chain
    from worker.ops.iam import default_worker_sa
    from worker.runtime.app import access_credentials, run_client, tasks_client

    catalog = load_catalog_or_fail(settings)
    known = sorted(catalog.services(settings.region))
    jobs = sorted(catalog.run_jobs(settings.region))
    if service is not None:
        jobs = [j for j in jobs if j[0] == service]
        in_catalog = [s for s in known if s[0] == service]
        if not in_catalog and not jobs:
            names = sorted(
                {name for name, _ in catalog.services(settings.region)}
                | {name for name, _ in catalog.run_jobs(settings.region)}
            )
            click.echo(
                f"{service} is not a service or Cloud Run job of the catalog ({catalog.source}: "
                f"{', '.join(names) or 'none'}); diagnosing it anyway, but no job of this catalog calls it.",
                err=True,
            )
        known = in_catalog or ([] if jobs else [(service, settings.region)])
    worker_sa = worker_sa or settings.impersonate_service_account or default_worker_sa(settings.project)
    diagnosis = asyncio.run(
        chain.diagnose(
            settings,
            known,
            run_client=lambda: run_client(settings, access_credentials(settings)),
            worker_sa=worker_sa,
            audience=audience,
            catalog=catalog,
            run_jobs=jobs,
            jobs_client=lambda: run_client(settings, access_credentials(settings), "JobsClient"),
            # The queue of jobs at a time, when the whole chain is asked about (no SERVICE).
            tasks_client=(lambda: tasks_client(settings, access_credentials(settings)))
            if service is None
            else None,
        )
    )
    colours = {"ok": "green", "fail": "red", "fix": "cyan"}
    for text, style in chain.render(diagnosis, settings.project):
        click.echo(click.style(text, fg=colours.get(style or "")) if style else text)
    return EXIT_OK if diagnosis.ok else EXIT_FAILED


COMMANDS = [dead_letters, replay, doctor]
