"""`worker setup`: create the topics and subscriptions, or print the gcloud script (IAM included)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from worker.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    exits_with_code,
    load_catalog_or_fail,
    load_settings_or_fail,
    operator_clients,
)

if TYPE_CHECKING:
    from worker.core.settings import Settings
    from worker.ops.iam import PushTarget
    from worker.ops.provision import Change, SetupOptions


@click.command()
@click.option("--max-delivery-attempts", type=click.IntRange(5, 100), default=5, show_default=True)
@click.option("--min-backoff", type=click.IntRange(0, 600), default=10, show_default=True, help="Seconds.")
@click.option("--max-backoff", type=click.IntRange(0, 600), default=600, show_default=True, help="Seconds.")
@click.option("--ack-deadline", type=click.IntRange(10, 600), default=60, show_default=True, help="Seconds.")
@click.option("--retention-days", type=click.IntRange(1, 7), default=7, show_default=True)
@click.option("--print-gcloud", is_flag=True, help="Print the gcloud commands (IAM included) instead.")
@click.option("--worker-sa", help="Worker service account for --print-gcloud [worker@PROJECT...].")
@click.option("--webapp-sa", help="Web app service account for --print-gcloud [webapp@PROJECT...].")
@click.option(
    "--schedule",
    default="0 2 * * *",
    show_default=True,
    help="Cron schedule of the nightly batch-scoring job, for --print-gcloud.",
)
@click.option(
    "--time-zone",
    default="Etc/UTC",
    show_default=True,
    help="Time zone of --schedule (tz database name), for --print-gcloud.",
)
@click.option(
    "--operator",
    "operators",
    multiple=True,
    metavar="MEMBER",
    help="IAM member (user:alice@example.com, group:ops@example.com) to grant what "
    "dead-letters, replay, pause/resume/status and cancel need, for --print-gcloud. Repeatable.",
)
@click.option(
    "--operator-can-impersonate",
    is_flag=True,
    help="Also let each --operator act as the worker's service account (TokenCreator on it), "
    "for `worker doctor` with WORKER_IMPERSONATE_SERVICE_ACCOUNT; it can then do all the worker can.",
)
@click.option(
    "--webapp-push-endpoint",
    metavar="URL",
    help="For --print-gcloud: the results subscription pushes to this https URL of the web app "
    "(Cloud Run), with an OIDC token, instead of being pulled.",
)
@click.option(
    "--webapp-push-sa",
    metavar="EMAIL",
    help="Service account of the push requests' tokens [results-push@PROJECT...].",
)
@click.option(
    "--webapp-push-audience",
    metavar="AUDIENCE",
    help="Audience of the push requests' tokens [the push endpoint].",
)
@click.option(
    "--webapp-service",
    default="webapp",
    show_default=True,
    help="The web app's Cloud Run service, which the push service account may invoke.",
)
@exits_with_code
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
    operator_can_impersonate: bool,
    webapp_push_endpoint: str | None,
    webapp_push_sa: str | None,
    webapp_push_audience: str | None,
    webapp_service: str,
) -> int:
    """Create the topics and subscriptions, idempotently."""
    from worker.ops.provision import SetupOptions

    settings = load_settings_or_fail()
    if operator_can_impersonate and not operators:
        raise CommandError("--operator-can-impersonate needs at least one --operator MEMBER", EXIT_USAGE)
    if operators and not print_gcloud:
        raise CommandError(
            "--operator goes with --print-gcloud: `worker setup` creates topics and "
            "subscriptions, IAM bindings are printed for you to apply",
            EXIT_USAGE,
        )
    if (webapp_push_endpoint or webapp_push_sa or webapp_push_audience) and not print_gcloud:
        raise CommandError(
            "--webapp-push-* go with --print-gcloud: a push subscription needs IAM bindings "
            "that only the printed script grants; run `worker setup --print-gcloud "
            "--webapp-push-endpoint URL` and apply its output",
            EXIT_USAGE,
        )
    if (webapp_push_sa or webapp_push_audience) and not webapp_push_endpoint:
        raise CommandError(
            "--webapp-push-sa and --webapp-push-audience need --webapp-push-endpoint URL", EXIT_USAGE
        )
    options = SetupOptions(max_delivery_attempts, min_backoff, max_backoff, ack_deadline, retention_days)
    if print_gcloud:
        return print_script(
            settings,
            worker_sa=worker_sa,
            webapp_sa=webapp_sa,
            options=options,
            schedule=schedule,
            time_zone=time_zone,
            operators=operators,
            operators_can_impersonate=operator_can_impersonate,
            push=_push_target(
                settings, webapp_push_endpoint, webapp_push_sa, webapp_push_audience, webapp_service
            ),
        )
    return apply(settings, options)


def _push_target(
    settings: Settings, endpoint: str | None, service_account: str | None, audience: str | None, service: str
) -> PushTarget | None:
    from worker.ops.iam import push_target

    if endpoint is None:
        return None
    try:
        return push_target(
            settings, endpoint, service_account=service_account, audience=audience, service=service
        )
    except ValueError as exc:
        raise CommandError(f"--webapp-push-endpoint: {exc}", EXIT_USAGE) from None


def apply(settings: Settings, options: SetupOptions) -> int:
    from worker.ops.provision import apply_setup, for_target

    options = for_target(options)
    publisher, subscriber = operator_clients(settings)
    if not options.retry_policy:
        click.echo("Pub/Sub emulator: the jobs subscription gets no retry policy (nacks redeliver at once).")
    changes = apply_setup(publisher, subscriber, settings, options)
    changes.append(delay_queue_change(settings))
    for change in changes:
        click.echo(
            f"{change.action:>9}  {change.resource}" + (f"  ({change.detail})" if change.detail else "")
        )
    if all(c.action == "unchanged" for c in changes):
        click.echo("No change: everything already exists as configured.")
    return EXIT_FAILED if any(c.action == "differs" for c in changes) else EXIT_OK


def delay_queue_change(settings: Settings) -> Change:
    """The Cloud Tasks queue of jobs with a not_before, created if missing."""
    from worker.ops.delay import apply_queue
    from worker.ops.provision import Change
    from worker.runtime.app import access_credentials, tasks_client

    try:
        return apply_queue(tasks_client(settings, access_credentials(settings)), settings)
    except Exception as exc:  # unreachable: the topics are made all the same
        name = f"Cloud Tasks queue {settings.delay_queue}"
        return Change(name, "differs", f"Cloud Tasks did not answer ({type(exc).__name__}); run setup again")


def telemetry_exporters() -> tuple[str, ...]:
    """The exporters OTEL_TRACES_EXPORTER and OTEL_METRICS_EXPORTER name here: set them as
    the worker's deployment does, and the script grants what they need."""
    import os

    from worker.core.errors import ConfigError
    from worker.telemetry.config import TelemetryConfig

    try:
        config = TelemetryConfig.from_env(os.environ)
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    return config.trace_exporters + config.metric_exporters


def print_script(
    settings: Settings,
    *,
    worker_sa: str | None,
    webapp_sa: str | None,
    options: SetupOptions,
    schedule: str,
    time_zone: str,
    operators: Sequence[str] = (),
    operators_can_impersonate: bool = False,
    push: PushTarget | None = None,
) -> int:
    from worker.ops.gcloud import gcloud_script, scheduler_commands
    from worker.ops.iam import check_operator, default_webapp_sa, default_worker_sa

    catalog = load_catalog_or_fail(settings)
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
            operators_can_impersonate=operators_can_impersonate,
            push=push,
            telemetry=telemetry_exporters(),
            # The nightly batch only where the catalog has the kind it publishes.
            extra_commands=(
                scheduler_commands(settings, schedule, time_zone) if "batch-scoring" in catalog else ()
            ),
        ),
        nl=False,
    )
    from worker.ops.limits import report

    click.echo("\n".join(f"# {line}" for line in report(settings, catalog)))
    return EXIT_OK


COMMANDS = [setup]
