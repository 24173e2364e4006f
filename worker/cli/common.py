"""What every verb shares: the one error path, exit codes, settings, Pub/Sub clients, tables.

Every failure a person should read ends the command through `CommandError`, a
`click.ClickException`: click prints it as `worker: error: MESSAGE` and exits with its
code, in a terminal and under `CliRunner` alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import IO, Any, ParamSpec

import click

from worker.core.errors import ConfigError
from worker.core.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3

P = ParamSpec("P")


class CommandError(click.ClickException):
    """Ends a verb with `worker: error: MESSAGE` and the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]  # click declares it on the class; each error has its own

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"worker: error: {self.format_message()}", err=True, file=file)


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


@contextmanager
def google_errors(settings: Settings) -> Iterator[None]:
    """Turn Pub/Sub's refusals into a sentence naming the resource and the fix."""
    from google.api_core import exceptions

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


def operator_clients(settings: Settings) -> tuple[Any, Any]:
    """Publisher and subscriber with the operator's own application-default credentials (or the emulator)."""
    from worker.runtime.app import pubsub_clients

    return pubsub_clients(settings, None)


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A rich table whose cells are plain text: a '[' in an error or an id is never markup."""
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
