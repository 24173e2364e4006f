"""`worker enqueue`: publish one job the way the web app does, and optionally wait for its result;
`worker cancel`: cancel the Cloud Run job execution a job started."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

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
from worker.core.errors import InvalidJobError
from worker.core.lanes import INTERACTIVE, LANES

if TYPE_CHECKING:
    from worker.core.settings import Settings

STATUS_WAIT_S = 2.0  # how long a timed-out --wait asks the instances why


@click.command()
@click.argument("kind")
@click.option("--payload", required=True, help="The job's payload, as JSON.")
@click.option("--job-id", help="The job's id, its idempotency key [a new UUID].")
@click.option("--wait", is_flag=True, help="Print the result: exit 0 if it succeeded, 1 if not, 3 timed out.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=120.0,
    show_default=True,
    help="Seconds --wait waits.",
)
@click.option(
    "--lane",
    type=click.Choice(LANES),
    default=INTERACTIVE,
    show_default=True,
    help="batch: behind interactive jobs, for bulk work (docs/contract.md, Lanes).",
)
@exits_with_code
def enqueue(kind: str, payload: str, job_id: str | None, wait: bool, timeout: float, lane: str) -> int:
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
    catalog = load_catalog_or_fail(settings)
    try:
        job = build_job(kind, body, job_id, catalog=catalog)
    except InvalidJobError as exc:
        raise CommandError(f"job refused, nothing published: {exc}", EXIT_USAGE) from None
    publisher, subscriber = operator_clients(settings)
    with google_errors(settings):
        if not wait:
            click.echo(
                publish_job(kind, job.payload, job.job_id, publisher=publisher, settings=settings, lane=lane)
            )
            return EXIT_OK
        with ResultWaiter(subscriber, settings, job.job_id) as waiter:
            click.echo(
                publish_job(kind, job.payload, job.job_id, publisher=publisher, settings=settings, lane=lane)
            )
            result = waiter.wait(timeout)
    if result is None:
        click.echo(
            f"worker: no result for job {job.job_id} within {timeout:g}s; it stays queued. "
            + why_no_result(settings, kind),
            err=True,
        )
        return EXIT_TIMEOUT
    click.echo(result.model_dump_json())
    return EXIT_OK if result.status == JobStatus.SUCCEEDED else EXIT_FAILED


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
@click.argument("job_id")
@click.option("--kind", help="Only look at this run_job kind's Cloud Run job [every run_job kind's].")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the execution to stop.",
)
@exits_with_code
def cancel(job_id: str, kind: str | None, timeout: float) -> int:
    """Cancel a job's running Cloud Run job execution and publish its `cancelled` result."""
    from google.api_core import exceptions

    from worker.ops.cancel import CancelError, cancel_job, cancelled_result
    from worker.runtime.app import access_credentials, run_client

    settings = load_settings_or_fail()
    catalog = load_catalog_or_fail(settings)
    reachable_or_fail()
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
