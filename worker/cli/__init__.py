"""The `worker` command. Each verb is a thin layer over a module that does the work.

Google's libraries are imported inside the verbs, not here: `worker dev` must set
GCE_METADATA_HOST before google.auth is first imported.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click

from worker.core.errors import ConfigError


def fail(message: str, code: int = 2) -> None:
    click.echo(f"worker: error: {message}", err=True)
    sys.exit(code)


def settings_or_exit(**overrides: Any) -> Any:
    from worker.core.settings import load_settings

    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        fail(str(exc))


def configured(settings: Any) -> Any:
    from worker.core.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level, settings.project)
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Run Pub/Sub jobs against private Cloud Run services with proper ID tokens."""


@cli.command()
@click.option("--max-in-flight", type=int, help="Jobs in flight at once (WORKER_MAX_IN_FLIGHT).")
@click.option("--subscription", help="Subscription to pull (WORKER_JOBS_SUBSCRIPTION).")
def run(max_in_flight: int | None, subscription: str | None) -> None:
    """Consume jobs until SIGTERM/SIGINT, then drain in-flight work and exit 0."""
    from worker.gcp.consumer import StreamFailed
    from worker.runtime.app import run_worker

    settings = configured(settings_or_exit(max_in_flight=max_in_flight, jobs_subscription=subscription))
    try:
        asyncio.run(run_worker(settings))
    except ConfigError as exc:
        fail(str(exc))
    except StreamFailed as exc:
        fail(f"the pull stream stopped: {exc}", code=1)


@cli.command()
@click.option("--max-delivery-attempts", type=click.IntRange(5, 100), default=5, show_default=True)
@click.option("--min-backoff", type=click.IntRange(0, 600), default=10, show_default=True, help="Seconds.")
@click.option("--max-backoff", type=click.IntRange(0, 600), default=600, show_default=True, help="Seconds.")
@click.option("--ack-deadline", type=click.IntRange(10, 600), default=60, show_default=True, help="Seconds.")
@click.option("--retention-days", type=click.IntRange(1, 7), default=7, show_default=True)
@click.option("--print-gcloud", is_flag=True, help="Print the gcloud commands (IAM included) instead.")
@click.option("--worker-sa", help="Worker service account for --print-gcloud [worker@PROJECT...].")
@click.option("--webapp-sa", help="Web app service account for --print-gcloud [webapp@PROJECT...].")
@click.option("--schedule", default="0 2 * * *", show_default=True,
              help="Cron schedule of the nightly batch-scoring job, for --print-gcloud.")
@click.option("--time-zone", default="Etc/UTC", show_default=True,
              help="Time zone of --schedule (tz database name), for --print-gcloud.")
@click.option("--operator", "operators", multiple=True, metavar="MEMBER",
              help="IAM member (user:alice@example.com, group:ops@example.com) to grant what "
              "dead-letters, replay and doctor need, for --print-gcloud. Repeatable.")
def setup(
    max_delivery_attempts: int,
    min_backoff: int,
    max_backoff: int,
    ack_deadline: int,
    retention_days: int,
    print_gcloud: bool,
    worker_sa: str | None,
    webapp_sa: str | None,
    schedule: str,
    time_zone: str,
    operators: tuple[str, ...],
) -> None:
    """Create the topics and subscriptions, idempotently."""
    from worker.cli import ops as ops_cli
    from worker.ops.provision import SetupOptions, apply_setup, for_target
    from worker.runtime.app import pubsub_clients

    settings = settings_or_exit()
    if operators and not print_gcloud:
        fail("--operator goes with --print-gcloud: `worker setup` creates topics and "
             "subscriptions, IAM bindings are printed for you to apply")
    options = SetupOptions(max_delivery_attempts, min_backoff, max_backoff, ack_deadline, retention_days)
    if print_gcloud:
        ops_cli.run_verb(
            lambda: ops_cli.print_gcloud(
                settings,
                worker_sa=worker_sa,
                webapp_sa=webapp_sa,
                options=options,
                schedule=schedule,
                time_zone=time_zone,
                operators=operators,
            )
        )
    options = for_target(options)
    if not options.retry_policy:
        click.echo("Pub/Sub emulator: the jobs subscription gets no retry policy (nacks redeliver at once).")
    publisher, subscriber = pubsub_clients(settings, None)
    changes = apply_setup(publisher, subscriber, settings, options)
    for change in changes:
        click.echo(
            f"{change.action:>9}  {change.resource}" + (f"  ({change.detail})" if change.detail else "")
        )
    if all(c.action == "unchanged" for c in changes):
        click.echo("No change: everything already exists as configured.")
    if any(c.action == "differs" for c in changes):
        sys.exit(1)


@cli.command()
@click.option("--jobs", "sample_jobs", type=int, default=20, show_default=True, help="Sample jobs to send.")
@click.option("--max-in-flight", type=int, default=100, show_default=True)
@click.option("--fire-batch", type=click.IntRange(min=0), default=0, metavar="N",
              help="Also send one batch-scoring job over N accounts of the accounts-source service.")
def dev(sample_jobs: int, max_in_flight: int, fire_batch: int) -> None:
    """Run the whole system here: Pub/Sub emulator, local Cloud Run, the worker, sample jobs."""
    from localcloud.devstack import run_dev

    try:
        run_dev(sample_jobs=sample_jobs, max_in_flight=max_in_flight, fire_batch=fire_batch)
    except ConfigError as exc:
        fail(str(exc))
    except RuntimeError as exc:
        fail(str(exc))


@cli.command()
@click.argument("kind")
@click.option("--payload", required=True, help="The job's payload, as JSON.")
@click.option("--job-id", help="The job's id, its idempotency key [a new UUID].")
@click.option("--wait", is_flag=True, help="Print the result: exit 0 if it succeeded, 1 if not, 3 timed out.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=120.0, show_default=True,
              help="Seconds --wait waits.")
def enqueue(kind: str, payload: str, job_id: str | None, wait: bool, timeout: float) -> None:
    """Publish one job (checked against the catalog first) and print its id."""
    from worker.cli import ops as ops_cli

    settings = settings_or_exit()
    ops_cli.run_verb(lambda: ops_cli.enqueue(settings, kind, payload, job_id, wait=wait, timeout_s=timeout))


@cli.command("dead-letters")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--limit", type=click.IntRange(min=1), help="List at most this many.")
def dead_letters(as_json: bool, limit: int | None) -> None:
    """List dead-lettered jobs without consuming them."""
    from worker.cli import ops as ops_cli

    settings = settings_or_exit()
    ops_cli.run_verb(lambda: ops_cli.dead_letters(settings, as_json=as_json, limit=limit))


@cli.command()
@click.option("--kind", help="Only jobs of this kind.")
@click.option("--job-id", help="Only this job.")
@click.option("--limit", type=click.IntRange(min=1), help="Replay at most this many.")
@click.option("--dry-run", is_flag=True, help="List what would be replayed; change nothing.")
def replay(kind: str | None, job_id: str | None, limit: int | None, dry_run: bool) -> None:
    """Move dead-lettered jobs back to the jobs topic (each acked only once republished)."""
    from worker.cli import ops as ops_cli

    settings = settings_or_exit()
    ops_cli.run_verb(
        lambda: ops_cli.replay(settings, kind=kind, job_id=job_id, limit=limit, dry_run=dry_run)
    )


@cli.command("batch-status")
@click.argument("batch_id")
@click.option("--from-file", "results_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Results as JSON lines, e.g. what the web app stored.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def batch_status(batch_id: str, results_file: Path, as_json: bool) -> None:
    """Show a batch's progress; exit 0 once every child has a result, 1 before."""
    from worker.cli import ops as ops_cli
    from worker.cli.batch import batch_status as show

    ops_cli.run_verb(lambda: show(batch_id, results_file, as_json=as_json))


@cli.command()
@click.argument("service", required=False)
@click.option("--audience", help="Mint the token for this audience instead of the service URL.")
@click.option("--worker-sa", help="The service account to impersonate, for the fix commands.")
def doctor(service: str | None, audience: str | None, worker_sa: str | None) -> None:
    """Diagnose the identity chain (credentials, ID token, URL, call) and print the fix."""
    from worker.cli import ops as ops_cli

    settings = settings_or_exit()
    ops_cli.run_verb(lambda: ops_cli.doctor(settings, service, audience=audience, worker_sa=worker_sa))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
