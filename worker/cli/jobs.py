"""`worker enqueue`: publish one job the way the web app does, and optionally wait for its result;
`worker cancel`: cancel the Cloud Run job execution a job started."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from worker.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    CommandError,
    exits_with_code,
    google_errors,
    load_catalog_or_fail,
    load_settings_or_fail,
    operator_clients,
    reachable_or_fail,
)
from worker.cli.control import parse_duration
from worker.core.errors import InvalidJobError
from worker.core.lanes import INTERACTIVE, LANES

if TYPE_CHECKING:
    from worker.core.messages import Result
    from worker.core.settings import Settings

STATUS_WAIT_S = 2.0  # how long a timed-out --wait asks the instances why


@click.command()
@click.argument("kind")
@click.option("--payload", required=True, help="The job's payload, as JSON.")
@click.option("--job-id", help="The job's id, its idempotency key [a new UUID].")
@click.option(
    "--at", "at", metavar="TIME", help="Not before this time: RFC 3339 with a zone, 2026-12-24T02:00:00Z."
)
@click.option("--in", "in_", metavar="DURATION", help="Not before this long from now: 90s, 15m, 2h, 3d.")
@click.option("--wait", is_flag=True, help="Print the result: exit 0 if it succeeded, 1 if not, 3 timed out.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=None,
    help="Seconds --wait waits [120, plus the delay of --at/--in].",
)
@click.option(
    "--lane",
    type=click.Choice(LANES),
    default=INTERACTIVE,
    show_default=True,
    help="batch: behind interactive jobs, for bulk work (docs/contract.md, Lanes).",
)
@exits_with_code
def enqueue(
    kind: str,
    payload: str,
    job_id: str | None,
    at: str | None,
    in_: str | None,
    wait: bool,
    timeout: float | None,
    lane: str,
) -> int:
    """Publish one job (checked against the catalog first) and print its id."""
    from worker.client import ResultWaiter, build_job
    from worker.client import enqueue as publish_job
    from worker.core.messages import JobStatus

    if (
        not wait
        and click.get_current_context().get_parameter_source("timeout") is not ParameterSource.DEFAULT
    ):
        raise CommandError("--timeout goes with --wait: without it enqueue does not wait", EXIT_USAGE)
    settings = load_settings_or_fail()
    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise CommandError(f"--payload is not JSON: {exc}", EXIT_USAGE) from None
    not_before = not_before_option(at, in_)
    catalog = load_catalog_or_fail(settings)
    try:
        job = build_job(kind, body, job_id, catalog=catalog, not_before=not_before)
    except InvalidJobError as exc:
        raise CommandError(f"job refused, nothing published: {exc}", EXIT_USAGE) from None
    if timeout is None:
        ahead = (job.not_before - job.created_at).total_seconds() if job.not_before and job.created_at else 0
        timeout = 120.0 + max(0.0, ahead)

    def publish() -> str:
        return publish_job(
            kind,
            job.payload,
            job.job_id,
            publisher=publisher,
            settings=settings,
            not_before=job.not_before,
            lane=lane,
        )

    def progress(result: Result) -> None:
        when = f" until {result.not_before.isoformat()}" if result.not_before else ""
        click.echo(f"{result.status.value}{when}" + (f" ({result.task})" if result.task else ""))

    publisher, subscriber = operator_clients(settings)
    with google_errors(settings):
        if not wait:
            click.echo(publish())
            return EXIT_OK
        with ResultWaiter(subscriber, settings, job.job_id) as waiter:
            click.echo(publish())
            result = waiter.wait(timeout, on_progress=progress)
    if result is None:
        click.echo(
            f"worker: no result for job {job.job_id} within {timeout:g}s; it stays queued. "
            + why_no_result(settings, kind),
            err=True,
        )
        return EXIT_TIMEOUT
    click.echo(result.model_dump_json())
    return EXIT_OK if result.status == JobStatus.SUCCEEDED else EXIT_FAILED


def not_before_option(at: str | None, in_: str | None) -> datetime | timedelta | None:
    """--at TIME or --in DURATION, as `not_before`; a bad value names the flag."""
    if at and in_:
        raise CommandError("give --at or --in, not both", EXIT_USAGE)
    if in_:
        try:
            return timedelta(seconds=parse_duration(in_))
        except ValueError as exc:
            raise CommandError(f"--in: {exc}", EXIT_USAGE) from None
    if at:
        try:
            when = datetime.fromisoformat(at.replace("Z", "+00:00"))
        except ValueError:
            when = None
        if when is None or when.tzinfo is None:
            raise CommandError(
                f"--at: {at!r} is not RFC 3339 with a time zone, such as 2026-12-24T02:00:00Z", EXIT_USAGE
            )
        return when
    return None


def why_no_result(settings: Settings, kind: str) -> str:
    """Ask the running instances (a second or two) rather than guess why a job has no result."""
    from worker.cli.control import collect

    replies = collect(settings, STATUS_WAIT_S)
    if not replies:
        return (
            f"No worker instance answered on {settings.control_topic}: start one (`make dev`, or "
            "`worker run`); the job runs when one does."
        )
    paused = [r for r in replies if kind in ((r.get("status") or {}).get("paused") or {})]
    if paused:
        return (
            f"{kind} is paused on {len(paused)} of {len(replies)} worker instance(s) (`worker status`): "
            f"it runs after `worker resume {kind}`."
        )
    return (
        f"{len(replies)} worker instance(s) answer and none has {kind} paused: the job may be behind "
        "a backlog or retrying; look for it later with `worker dead-letters`."
    )


@click.command()
@click.argument("job_ids", nargs=-1, required=True, metavar="JOB_ID...")
@click.option("--kind", help="Only look at this run_job kind's Cloud Run job [every run_job kind's].")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the execution to stop.",
)
@exits_with_code
def cancel(job_ids: tuple[str, ...], kind: str | None, timeout: float) -> int:
    """Cancel jobs: delete a job's Cloud Tasks task if it is scheduled, else cancel its
    running Cloud Run job execution; publish its `cancelled` result."""
    from worker.cli.later import cancel_if_scheduled

    settings = load_settings_or_fail()
    catalog = load_catalog_or_fail(settings)
    reachable_or_fail()
    has_run_jobs = any(k.run_job is not None for k in catalog.values())
    codes = []
    for job_id in job_ids:
        try:
            if cancel_if_scheduled(settings, job_id, kind, quiet_failure=has_run_jobs):
                codes.append(EXIT_OK)
            else:
                codes.append(cancel_execution(settings, catalog, job_id, kind, timeout))
        except CommandError as exc:
            if len(job_ids) == 1:
                raise
            click.echo(f"worker: error: {exc.message}", err=True)  # the others are still cancelled
            codes.append(EXIT_FAILED)
    return max(codes)


def cancel_execution(settings: Any, catalog: Any, job_id: str, kind: str | None, timeout: float) -> int:
    from google.api_core import exceptions

    from worker.ops.cancel import CancelError, cancel_job, cancelled_result
    from worker.runtime.app import access_credentials, run_client

    executions = run_client(settings, access_credentials(settings), "ExecutionsClient")
    try:
        report = cancel_job(
            executions, catalog, settings.project, settings.region, job_id, kind=kind, wait_s=timeout
        )
    except CancelError as exc:
        raise CommandError(str(exc)) from None
    except exceptions.Forbidden as exc:
        raise CommandError(
            f"the Admin API refused: {exc.message}; cancelling needs roles/run.jobsExecutor on the job "
            "and roles/run.viewer (see `worker setup --print-gcloud --operator MEMBER`)"
        ) from None
    except exceptions.GoogleAPICallError as exc:
        raise CommandError(f"the Cloud Run Admin API failed: {exc.message}") from None
    publisher, _ = operator_clients(settings)
    topic = publisher.topic_path(settings.project, settings.results_topic)
    with google_errors(settings):
        for job_kind, execution in report.cancelled:
            result = cancelled_result(job_id, job_kind, execution)
            publisher.publish(topic, result.to_bytes(), **result.attributes()).result(timeout=60)
            click.echo(
                f"cancelled {execution.name} ({execution.cancelled_count} of {execution.task_count} "
                f"task(s) cancelled); published job {job_id}'s `cancelled` result"
            )
    for _, execution, state in report.ended_otherwise:
        click.echo(f"{execution.name} ended {state} before the cancel took effect")
    for _, execution in report.still_running:
        click.echo(f"{execution.name} is still stopping after {timeout:g}s; the worker records how it ends")
    return EXIT_OK if report.cancelled else EXIT_FAILED


COMMANDS = [enqueue, cancel]
