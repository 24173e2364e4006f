"""`worker dev`: the whole system on this machine, from the separate local-cloud package."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

import click

from worker.cli.common import EXIT_USAGE, CommandError
from worker.core.errors import ConfigError

LOCALCLOUD_HINT = (
    "`worker dev` needs the local cloud, which the runtime package does not ship: "
    "run `make dev` in a checkout, or `pip install -e ./localcloud` there"
)


@contextmanager
def single_instance(env_file: str) -> Iterator[None]:
    """Hold `ENV_FILE.lock` while this stack runs, so the env file belongs to the stack that
    wrote it: a second `worker dev` in the same checkout refuses, naming the first one's pid.
    An flock, not a pid file: the kernel releases it when the first one dies, however it dies."""
    lock_path = f"{env_file or '.worker-dev.env'}.lock"
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise CommandError(
                f"`worker dev` is already running in this checkout (pid {holder}; its environment "
                f"is in {env_file or '.worker-dev.env'}): use that one from a second shell, or stop it "
                "with Ctrl-C first; `--env-file OTHER` runs a second stack beside it",
                EXIT_USAGE,
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield  # the file stays: removing it would let a third stack lock a new one beside a second


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
        with single_instance(env_file):
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
