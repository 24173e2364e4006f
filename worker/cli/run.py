"""`worker run`: consume jobs until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio

import click

from worker.cli.common import CommandError, load_settings_or_fail, with_logging
from worker.core.errors import ConfigError


@click.command()
@click.option("--max-in-flight", type=int, help="Jobs in flight at once (WORKER_MAX_IN_FLIGHT).")
@click.option("--subscription", help="Subscription to pull (WORKER_JOBS_SUBSCRIPTION).")
def run(max_in_flight: int | None, subscription: str | None) -> None:
    """Consume jobs until SIGTERM/SIGINT, then drain in-flight work and exit 0."""
    from worker.gcp.consumer import StreamFailed
    from worker.runtime.app import run_worker

    settings = load_settings_or_fail(max_in_flight=max_in_flight, jobs_subscription=subscription)
    with_logging(settings)
    try:
        asyncio.run(run_worker(settings, own_process=True))
    except ConfigError as exc:
        raise CommandError(str(exc), 2) from None
    except StreamFailed as exc:
        raise CommandError(f"the pull stream stopped: {exc}") from None


COMMANDS = [run]
