"""What every verb shares: the one error path, exit codes, settings, Pub/Sub clients, tables.

Every failure a person should read ends the command through `CommandError`, a
`click.ClickException`: click prints it as `worker: error: MESSAGE` and exits with its
code, in a terminal and under `CliRunner` alike.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import IO, TYPE_CHECKING, Any, ParamSpec

import click

from worker.core.errors import ConfigError, shorten
from worker.core.gcloud_command import gcloud

if TYPE_CHECKING:  # imported by the verbs that run, so `worker --help` loads no pydantic
    from worker.core.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3
PROBE_TIMEOUT_S = 2.0  # a listening port answers a connect in milliseconds, even on a busy machine

P = ParamSpec("P")


class CommandError(click.ClickException):
    """Ends a verb with `worker: error: MESSAGE` and the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]  # click declares it on the class; each error has its own

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"worker: error: {self.format_message()}", err=True, file=file)


class Verbs(click.Group):
    """The `worker` group: every verb runs inside `google_errors`, so a Google library's
    failure anywhere (building a client, a call) ends as one `worker: error:` line."""

    def invoke(self, ctx: click.Context) -> Any:
        with google_errors():
            return super().invoke(ctx)


def exits_with_code(verb: Callable[P, int]) -> Callable[P, None]:
    """A verb body returns its exit code (0 ok, 1 failed, 3 timed out); click exits with it."""

    @functools.wraps(verb)
    def command(*args: P.args, **kwargs: P.kwargs) -> None:
        code = verb(*args, **kwargs)
        if code:
            click.get_current_context().exit(code)

    return command


def load_settings_or_fail(**overrides: Any) -> Settings:
    from worker.core.settings import load_settings

    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


def with_logging(settings: Settings) -> Settings:
    from worker.core.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level, settings.project)
    return settings


def load_catalog_or_fail(settings: Settings) -> Any:
    from worker.runtime.app import load_catalog

    try:
        return load_catalog(settings)
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


SECOND_SHELL = "see README, Second shell"
LOGIN = gcloud("auth", "application-default", "login")


@contextmanager
def google_errors(settings: Settings | None = None) -> Iterator[None]:
    """Turn Google's failures (refusals, no answer, no credentials) into one sentence naming
    the cause and the fix. The `worker` group wraps every verb in it, client construction
    included; a verb may wrap a narrower block to name its settings' project."""
    try:
        yield
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise  # click's own (usage errors, --help): nothing of Google's to load for them
    except Exception as exc:
        sentence = google_failure(exc, settings)
        if sentence is None or _debugging():
            raise
        raise sentence from None


def _debugging() -> bool:
    """`worker --debug VERB`: let the original exception through, traceback and all."""
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("debug"))


def google_failure(exc: BaseException, settings: Settings | None) -> CommandError | None:
    """The `CommandError` a Google library failure reads as, or None for any other error."""
    if not (type(exc).__module__.startswith("google.") or isinstance(exc, TimeoutError)):
        return None
    from google.api_core import exceptions
    from google.auth import exceptions as auth

    project = settings.project if settings else os.environ.get("GOOGLE_CLOUD_PROJECT", "?")
    if isinstance(exc, auth.DefaultCredentialsError):
        return CommandError(
            f"no Google credentials found: for the local cloud run `make dev` and `source .worker-dev.env` "
            f"({SECOND_SHELL}); for a real project run {LOGIN}",
            EXIT_USAGE,
        )
    if isinstance(exc, auth.RefreshError | auth.TransportError):
        return CommandError(
            f"your credentials were refused or could not be refreshed ({_one_line(exc)}); "
            f"log in again: {LOGIN}",
            EXIT_USAGE,
        )
    if isinstance(exc, exceptions.NotFound):
        return CommandError(
            f"{exc.message.rstrip('.')} in project {project}: if GOOGLE_CLOUD_PROJECT is the project "
            "your workers serve, create the topics and subscriptions with `worker setup`; if not, fix "
            "it (or the WORKER_*_TOPIC/SUBSCRIPTION variables) rather than create a project no worker reads"
        )
    if isinstance(exc, exceptions.PermissionDenied):
        return CommandError(
            f"{exc.message}: your credentials lack a Pub/Sub role on it; see "
            "`worker setup --print-gcloud` for the bindings"
        )
    if isinstance(exc, exceptions.RetryError | exceptions.ServiceUnavailable | exceptions.DeadlineExceeded):
        cause = exc.cause if isinstance(exc, exceptions.RetryError) and exc.cause else exc
        return CommandError(f"Pub/Sub did not answer ({_one_line(cause)}): {_unreachable_fix()}", EXIT_USAGE)
    if isinstance(exc, TimeoutError):
        return CommandError(f"Pub/Sub did not answer in time: {_unreachable_fix()}", EXIT_USAGE)
    if isinstance(exc, exceptions.GoogleAPICallError):
        return CommandError(f"Pub/Sub refused the call: {exc.message}")
    return None


def _one_line(exc: BaseException) -> str:
    return shorten(" ".join(str(exc).split()), 200) or type(exc).__name__


def _unreachable_fix() -> str:
    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if host:
        return f"is `make dev` running, its emulator at {host} (PUBSUB_EMULATOR_HOST)? ({SECOND_SHELL})"
    return "check the network and GOOGLE_CLOUD_PROJECT, or for the local cloud `source .worker-dev.env`"


def reachable_or_fail() -> None:
    """Fail in seconds, not after a minute of retries, when the emulator or the local cloud
    the environment names is not listening (typically: `make dev` was stopped)."""
    targets = [("the Pub/Sub emulator", "PUBSUB_EMULATOR_HOST")]
    if os.environ.get("WORKER_LOCAL_CLOUD"):
        targets.append(("the local cloud's metadata server", "GCE_METADATA_HOST"))
    for name, variable in targets:
        address = os.environ.get(variable)
        if address and not _listening(address):
            raise CommandError(
                f"cannot reach {name} at {address} ({variable}): is `make dev` running? Start it, "
                f"then `source .worker-dev.env` in this shell ({SECOND_SHELL})",
                EXIT_USAGE,
            )


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=PROBE_TIMEOUT_S):
            return True
    except (OSError, ValueError):
        return False


def operator_clients(settings: Settings) -> tuple[Any, Any]:
    """Publisher and subscriber with the operator's own application-default credentials (or the emulator)."""
    from worker.runtime.app import pubsub_clients

    reachable_or_fail()
    return pubsub_clients(settings, None)


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A rich table on a terminal, whose cells are plain text: a '[' in an error or an id is
    never markup. Piped, one tab-separated line per row instead (rich would wrap its cells
    to 80 columns): what grep, cut and a test read."""
    if not sys.stdout.isatty():
        click.echo(title)
        for line in (columns, *rows):
            click.echo(
                "\t".join("; ".join(" ".join(part.split()) for part in cell.splitlines()) for cell in line)
            )
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    rendered = Table(title=Text(title), title_justify="left")
    for column in columns:
        rendered.add_column(column, overflow="fold")
    for row in rows:
        rendered.add_row(*(Text(cell) for cell in row))
    Console(soft_wrap=False).print(rendered)


def age(delta: timedelta | None) -> str:
    if delta is None:
        return "-"
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
