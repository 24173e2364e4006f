"""What the operator verbs print: `enqueue`, `dead-letters`, `replay`, `doctor`, `setup --print-gcloud`.

The work is done in `client`, `operations`, `doctor` and `gcloud`; this module turns
flags into calls and results into what a person reads (rich tables and progress on a
terminal, plain lines or JSON lines otherwise) and into exit codes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, NoReturn

import click
from google.api_core import exceptions

from worker.core.errors import ConfigError, InvalidJobError
from worker.core.messages import JobStatus, now
from worker.core.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3


class CommandError(Exception):
    """Ends a verb with `worker: error: MESSAGE` and the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


@contextmanager
def google_errors(settings: Settings) -> Iterator[None]:
    """Turn Pub/Sub's refusals into a sentence naming the resource and the fix."""
    try:
        yield
    except exceptions.NotFound as exc:
        raise CommandError(
            f"{exc.message}: create the topics and subscriptions with `worker setup` "
            f"(project {settings.project}), or check the WORKER_*_TOPIC/SUBSCRIPTION variables"
        ) from None
    except exceptions.PermissionDenied as exc:
        raise CommandError(
            f"{exc.message}: your credentials lack a Pub/Sub role on it; see "
            "`worker setup --print-gcloud` for the bindings"
        ) from None
    except exceptions.GoogleAPICallError as exc:
        raise CommandError(f"Pub/Sub refused the call: {exc.message}") from None


def _clients(settings: Settings) -> tuple[Any, Any]:
    from worker.runtime.app import pubsub_clients

    # None: the operator's own application-default credentials (or the emulator).
    return pubsub_clients(settings, None)


def enqueue(settings: Settings, kind: str, payload_json: str, job_id: str | None,
            *, wait: bool, timeout_s: float) -> int:
    from worker.client import ResultWaiter, build_job
    from worker.client import enqueue as publish_job
    from worker.runtime.app import load_catalog

    try:
        payload = json.loads(payload_json)
    except ValueError as exc:
        raise CommandError(f"--payload is not JSON: {exc}", EXIT_USAGE) from None
    try:
        catalog = load_catalog(settings)
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    try:
        job = build_job(kind, payload, job_id, catalog=catalog)
    except InvalidJobError as exc:
        raise CommandError(f"job refused, nothing published: {exc}", EXIT_USAGE) from None
    publisher, subscriber = _clients(settings)
    with google_errors(settings):
        if not wait:
            click.echo(publish_job(kind, job.payload, job.job_id, publisher=publisher, settings=settings))
            return EXIT_OK
        with ResultWaiter(subscriber, settings, job.job_id) as waiter:
            click.echo(publish_job(kind, job.payload, job.job_id, publisher=publisher, settings=settings))
            result = waiter.wait(timeout_s)
    if result is None:
        click.echo(
            f"worker: no result for job {job.job_id} within {timeout_s:g}s; it stays queued. Is a "
            "worker running (`worker run`)? Look for it later with `worker dead-letters`.",
            err=True,
        )
        return EXIT_TIMEOUT
    click.echo(result.model_dump_json())
    return EXIT_OK if result.status == JobStatus.SUCCEEDED else EXIT_FAILED


def dead_letters(settings: Settings, *, as_json: bool, limit: int | None) -> int:
    from worker.ops.operations import list_dead_letters

    _, subscriber = _clients(settings)
    path = subscriber.subscription_path(settings.project, settings.dead_letter_subscription)
    with google_errors(settings):
        entries, more = list_dead_letters(subscriber, path, limit=limit)
    at = now()
    if as_json:
        for entry in entries:
            click.echo(json.dumps(entry.to_json(at)))
        return EXIT_OK
    if not entries:
        click.echo(f"No dead letters on {path}.")
        return EXIT_OK
    _table(
        f"Dead letters on {path} (left in place)",
        ["job id", "kind", "status", "error", "attempts", "age", "replays"],
        [
            [
                e.job_id or "-",
                e.kind or "-",
                e.status,
                f"{e.error_code}: {e.error_message}" if e.error_code else e.error_message,
                "-" if e.attempts is None else str(e.attempts),
                _age(e.age(at)),
                str(e.replay_count),
            ]
            for e in entries
        ],
    )
    shown = f"{len(entries)} dead letter(s)" + (" shown; there may be more (--limit)" if more else "")
    click.echo(f"{shown}. Replay with `worker replay [--kind K] [--job-id ID]`.")
    return EXIT_OK


def replay(settings: Settings, *, kind: str | None, job_id: str | None, limit: int | None,
           dry_run: bool) -> int:
    from worker.ops.operations import DeadLetterEntry, replay_dead_letters

    publisher, subscriber = _clients(settings)
    path = subscriber.subscription_path(settings.project, settings.dead_letter_subscription)
    topic = publisher.topic_path(settings.project, settings.jobs_topic)
    progress = _Progress(enabled=sys.stdout.isatty() and not dry_run)

    def settled(entry: DeadLetterEntry, error: str | None) -> None:
        progress.advance()
        if error is not None:
            progress.log(f"failed: {entry.job_id or entry.message_id}: {error}")

    with google_errors(settings), progress:
        report = replay_dead_letters(
            subscriber, publisher, path, topic, kind=kind, job_id=job_id, limit=limit,
            dry_run=dry_run, on_selected=lambda chosen: progress.start(len(chosen)), on_settled=settled,
        )
    publisher.stop()
    if dry_run:
        rows = [[e.job_id or "-", e.kind or "-", e.error_code or e.status, str(e.replay_count + 1)]
                for e in report.selected]
        if rows:
            _table("Would replay (dry run)", ["job id", "kind", "error", "replay #"], rows)
        click.echo(f"dry run: would replay {len(report.selected)}, skip {report.skipped}; nothing changed.")
        return EXIT_OK
    if not sys.stdout.isatty():
        for entry, error in report.failed:
            click.echo(f"failed: {entry.job_id or entry.message_id}: {error}", err=True)
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


def doctor(settings: Settings, service: str | None, *, audience: str | None, worker_sa: str | None) -> int:
    from worker.ops.doctor import diagnose, render
    from worker.ops.gcloud import default_worker_sa
    from worker.runtime.app import access_credentials, load_catalog, run_client

    try:
        catalog = load_catalog(settings)
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    known = sorted(catalog.services(settings.region))
    if service is not None:
        known = [s for s in known if s[0] == service] or [(service, settings.region)]
    worker_sa = worker_sa or settings.impersonate_service_account or default_worker_sa(settings.project)
    diagnosis = asyncio.run(
        diagnose(
            settings,
            known,
            run_client=lambda: run_client(settings, access_credentials(settings)),
            worker_sa=worker_sa,
            audience=audience,
        )
    )
    colours = {"ok": "green", "fail": "red", "fix": "cyan"}
    for text, style in render(diagnosis, settings.project):
        click.echo(click.style(text, fg=colours.get(style or "")) if style else text)
    return EXIT_OK if diagnosis.ok else EXIT_FAILED


def print_gcloud(
    settings: Settings,
    *,
    worker_sa: str | None,
    webapp_sa: str | None,
    options: Any,
    schedule: str,
    time_zone: str,
    operators: Sequence[str] = (),
) -> int:
    from worker.cli.batch import scheduler_commands
    from worker.ops.gcloud import check_operator, default_webapp_sa, default_worker_sa, gcloud_script
    from worker.runtime.app import load_catalog

    try:
        catalog = load_catalog(settings)
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    try:
        for operator in operators:
            check_operator(operator)
    except ValueError as exc:
        raise CommandError(f"--operator: {exc}", EXIT_USAGE) from None
    click.echo(
        gcloud_script(
            settings,
            catalog,
            worker_sa or default_worker_sa(settings.project),
            webapp_sa or default_webapp_sa(settings.project),
            options,
            operators=operators,
            # The nightly batch only where the catalog has the kind it publishes.
            extra_commands=(
                scheduler_commands(settings, schedule, time_zone) if "batch-scoring" in catalog else ()
            ),
        ),
        nl=False,
    )
    return EXIT_OK


def run_verb(verb: Callable[[], int]) -> NoReturn:
    """Run a verb body, print a CommandError the way every verb does, exit with its code."""
    try:
        code = verb()
    except CommandError as exc:
        click.echo(f"worker: error: {exc}", err=True)
        sys.exit(exc.code)
    sys.exit(code)


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # Text: a '[' in an error is not markup
    Console(soft_wrap=False).print(table)


def _age(age: timedelta | None) -> str:
    if age is None:
        return "-"
    seconds = max(0, int(age.total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
