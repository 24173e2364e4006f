"""`worker dev`: the whole system on this machine, from the separate local-cloud package."""

from __future__ import annotations

import click

from worker.cli.common import EXIT_USAGE, CommandError
from worker.core.errors import ConfigError

LOCALCLOUD_HINT = (
    "`worker dev` needs the local cloud, which the runtime package does not ship: "
    "run `make dev` in a checkout, or `pip install -e ./localcloud` there"
)


@click.command()
@click.option("--jobs", "sample_jobs", type=int, default=20, show_default=True, help="Sample jobs to send.")
@click.option("--max-in-flight", type=int, default=100, show_default=True)
@click.option(
    "--fire-batch",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Also send one batch-scoring job over N accounts of the accounts-source service.",
)
@click.option(
    "--webapp-push-endpoint",
    default="http://127.0.0.1:8090/pubsub/results",
    show_default=True,
    metavar="URL",
    help="Push results here as Pub/Sub does, with an OIDC token ('' for none).",
)
@click.option(
    "--env-file",
    default=".worker-dev.env",
    show_default=True,
    metavar="PATH",
    help="Write the environment a second shell needs here, while running ('' for none).",
)
def dev(
    sample_jobs: int, max_in_flight: int, fire_batch: int, webapp_push_endpoint: str, env_file: str
) -> None:
    """Run the whole system here: Pub/Sub emulator, local Cloud Run, the worker, sample jobs."""
    try:
        from localcloud.devstack import run_dev
    except ModuleNotFoundError as exc:
        if exc.name != "localcloud" and not (exc.name or "").startswith("localcloud."):
            raise
        raise CommandError(LOCALCLOUD_HINT, EXIT_USAGE) from None
    try:
        run_dev(
            sample_jobs=sample_jobs,
            max_in_flight=max_in_flight,
            fire_batch=fire_batch,
            push_endpoint=webapp_push_endpoint,
            env_file=env_file,
        )
    except (ConfigError, RuntimeError) as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


COMMANDS = [dev]
