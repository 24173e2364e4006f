"""`worker console`: the operators' console, a local web page (worker/console/).

It runs with the operator's own credentials on the same clients as the other verbs,
and speaks with their words: a refusal from Pub/Sub reads as `google_errors` says it,
an unknown kind as `worker pause` says it (both passed to the console's backend).
It listens on 127.0.0.1 unless told otherwise, and refuses any other address
without --allow-remote: the page replays jobs and pauses kinds, with no login of its
own (docs/console.md says what serving it to a team would take).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from functools import partial
from typing import TYPE_CHECKING

import click

from worker.cli.common import (
    EXIT_USAGE,
    CommandError,
    exits_with_code,
    google_errors,
    load_catalog_or_fail,
    load_settings_or_fail,
    operator_clients,
)
from worker.cli.control import check_kind, parse_duration

if TYPE_CHECKING:  # `worker --help` loads no pydantic (tests/cli/test_startup.py)
    from worker.core.settings import Settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def explain(settings: Settings, exc: BaseException) -> str | None:
    """The sentence `google_errors` would end a verb with for `exc`; None if it is not Google's."""
    try:
        with google_errors(settings):
            raise exc
    except CommandError as error:
        return error.format_message()
    except BaseException:
        return None


def explain_admin_api(exc: BaseException) -> str | None:
    from google.api_core import exceptions

    if isinstance(exc, exceptions.Forbidden):
        return (
            f"the Admin API refused: {exc.message}; listing executions needs roles/run.viewer "
            "(see `worker setup --print-gcloud --operator MEMBER`)"
        )
    if isinstance(exc, exceptions.GoogleAPICallError):
        return f"the Cloud Run Admin API failed: {exc.message}"
    return None


def cancel_with_the_cli(job_id: str, timeout_s: float = 30) -> tuple[bool, str]:
    """`worker cancel JOB_ID` as the operator would type it: its exit status and its own words."""
    done = subprocess.run(
        [sys.executable, "-m", "worker", "cancel", job_id, "--timeout", f"{timeout_s:g}"],
        capture_output=True,
        text=True,
        timeout=timeout_s + 60,
    )
    said = "\n".join(part.strip() for part in (done.stdout, done.stderr) if part.strip())
    return done.returncode == 0, said or f"`worker cancel {job_id}` exited {done.returncode}"


def list_scheduled(settings: Settings) -> tuple[str, list[dict[str, object]]]:
    """`worker scheduled --json`'s rows (worker/cli/later.py), its failure in its words."""
    from worker.cli.later import scheduled_rows
    from worker.console.backend import ConsoleError

    try:
        return scheduled_rows(settings, None)
    except CommandError as error:
        raise ConsoleError(error.format_message()) from None


def cancel_scheduled_job(settings: Settings, job_id: str, kind: str) -> tuple[bool, str]:
    """`worker cancel JOB_ID --kind KIND` for a scheduled job, on its code path: its task
    deleted, its `cancelled` result published, the CLI's sentences back. Unlike the CLI it
    never goes on to a running execution: the page's confirmation named a scheduled job."""
    from worker.cli.later import delete_scheduled, not_scheduled, publish_cancelled

    try:
        queue, cancelled = delete_scheduled(settings, job_id, kind)
        if not cancelled:
            return False, not_scheduled(job_id, queue)
        return True, "\n".join(publish_cancelled(settings, job_id, cancelled))
    except CommandError as error:
        return False, error.format_message()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=8089, show_default=True, help="Port to listen on."
)
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Listen on a non-loopback address: anyone who reaches it can replay and pause, "
    "so only behind an authenticating proxy (docs/console.md).",
)
@exits_with_code
def console(host: str, port: int, allow_remote: bool) -> int:
    """Serve the operators' console: dead letters and replay, instances and pause, live results, batches,
    scheduled jobs and executions."""
    if not is_loopback(host) and not allow_remote:
        raise CommandError(
            f"--host {host} is not a loopback address: the console has no login of its own, so anyone "
            "reaching it could replay jobs and pause kinds; keep the default 127.0.0.1, or pass "
            "--allow-remote behind an authenticating proxy (docs/console.md)",
            EXIT_USAGE,
        )
    from aiohttp import web

    from worker.console.app import make_app
    from worker.console.backend import Backend
    from worker.runtime.app import access_credentials, run_client

    settings = load_settings_or_fail()
    catalog = load_catalog_or_fail(settings)
    publisher, subscriber = operator_clients(settings)

    def known_kind(kind: str) -> None:
        from worker.console.backend import ConsoleError

        try:
            check_kind(settings, kind)
        except CommandError as error:
            raise ConsoleError(error.format_message()) from None

    backend = Backend(
        settings,
        publisher,
        subscriber,
        explain=partial(explain, settings),
        check_kind=known_kind,
        parse_duration=parse_duration,
        kinds=list(catalog),
        run_jobs=[
            (k.kind, k.run_job.job, k.region or settings.region) for k in catalog.values() if k.run_job
        ],
        executions_client=lambda: run_client(settings, access_credentials(settings), "ExecutionsClient"),
        cancel=cancel_with_the_cli,
        scheduled=partial(list_scheduled, settings),
        cancel_scheduled=partial(cancel_scheduled_job, settings),
        explain_run=explain_admin_api,
        operator=os.environ.get("USER", ""),
    )
    # Behind a proxy the Host is the proxy's name; on loopback, any other Host is a rebinding attack.
    app = make_app(backend, check_host=not allow_remote)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"worker console on http://{shown}:{port}/ (project {settings.project}); Ctrl-C stops it.")
    web.run_app(app, host=host, port=port, print=None, handle_signals=True, access_log=None)
    return 0


COMMANDS = [console]
