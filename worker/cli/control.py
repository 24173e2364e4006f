"""Operators' control verbs: `pause`, `resume`, `status` (worker/gcp/control.py carries them).

`pause KIND [--for DURATION]` and `resume KIND` publish an order on the control
topic; every running worker instance obeys it within seconds. Both then ask the
instances for their status and say how many confirm. `status` lists, per instance,
its paused kinds, breaker states and current limits.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import TYPE_CHECKING, Any

import click

from worker.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    exits_with_code,
    google_errors,
    load_catalog_or_fail,
    load_settings_or_fail,
    operator_clients,
    table,
)

if TYPE_CHECKING:
    from worker.core.settings import Settings

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '2h', '1d' -> seconds (> 0)."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 90s, 15m, 2h or 1d")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text!r}: a duration must be more than 0")
    return seconds


@click.command()
@click.argument("kind")
@click.option(
    "--for", "duration", metavar="DURATION", help="Resume by itself after this long (90s, 15m, 2h, 1d)."
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(0, 60),
    default=3.0,
    show_default=True,
    help="Seconds to collect the instances' confirmations.",
)
@exits_with_code
def pause(kind: str, duration: str | None, wait_s: float) -> int:
    """Stop calling KIND's service on every worker instance; its jobs wait in Pub/Sub."""
    settings = load_settings_or_fail()
    check_kind(settings, kind)
    until = None
    if duration is not None:
        try:
            until = time.time() + parse_duration(duration)
        except ValueError as exc:
            raise CommandError(f"--for: {exc}", EXIT_USAGE) from None
    return order(settings, kind, paused=True, until=until, wait_s=wait_s)


@click.command()
@click.argument("kind")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(0, 60),
    default=3.0,
    show_default=True,
    help="Seconds to collect the instances' confirmations.",
)
@exits_with_code
def resume(kind: str, wait_s: float) -> int:
    """Call KIND's service again on every worker instance."""
    settings = load_settings_or_fail()
    check_kind(settings, kind)
    return order(settings, kind, paused=False, until=None, wait_s=wait_s)


@click.command()
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(0.5, 60),
    default=3.0,
    show_default=True,
    help="Seconds to collect the instances' answers.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per instance.")
@exits_with_code
def status(wait_s: float, as_json: bool) -> int:
    """Paused kinds, breaker states and current limits of every running worker instance."""
    settings = load_settings_or_fail()
    replies = collect(settings, wait_s)
    if as_json:
        for reply in replies:
            click.echo(json.dumps({"replica": reply["replica"], **reply.get("status", {})}))
        return EXIT_OK
    if not replies:
        click.echo(f"No worker instance answered on {settings.control_topic} within {wait_s:g}s.")
        return EXIT_OK
    rows = []
    for reply in replies:
        state = reply.get("status") or {}
        paused = ", ".join(
            f"{k} (until {u})" if u else k for k, u in sorted((state.get("paused") or {}).items())
        )
        targets = state.get("targets") or {}
        rows.append(
            [
                str(reply.get("replica")),
                paused or "-",
                "\n".join(
                    f"{name}: {t.get('breaker', '?')}, limit {t.get('limit', '-')}/{t.get('ceiling', '-')}, "
                    f"{t.get('in_flight', 0)} in flight"
                    for name, t in sorted(targets.items())
                )
                or "- (no call made yet)",
                f"{state.get('in_flight', 0)} / {state.get('held', 0)}",
                _lanes(state.get("lanes")),
            ]
        )
    table(
        f"{len(replies)} worker instance(s) on {settings.control_topic}",
        [
            "instance",
            "paused kinds",
            "targets: breaker, limit/ceiling",
            "jobs in flight / held",
            "lanes: in flight, calling, waiting, held",
        ],
        rows,
    )
    return EXIT_OK


def check_kind(settings: Settings, kind: str) -> None:
    catalog = load_catalog_or_fail(settings)
    if kind not in catalog:
        raise CommandError(
            f"unknown kind {kind!r}; known kinds: {', '.join(sorted(catalog))} (catalog {catalog.source})",
            EXIT_USAGE,
        )


def order(settings: Settings, kind: str, *, paused: bool, until: float | None, wait_s: float) -> int:
    from worker.core.pauses import PauseEntry
    from worker.gcp.control import send_order

    entry = PauseEntry(kind, paused, time.time(), until, by=operator_name()[:100])
    publisher, _ = operator_clients(settings)
    with google_errors(settings):
        send_order(publisher, settings.project, settings.control_topic, entry)
    verb = "paused" if paused else "resumed"
    when = "" if until is None else f" until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(until))}"
    if wait_s <= 0:
        click.echo(f"{kind} {verb}{when}: order sent on {settings.control_topic}, confirmations not asked.")
        return EXIT_OK
    time.sleep(min(0.5, wait_s))  # let the order land before the question
    replies = collect(settings, wait_s)
    if not replies:
        # Pause state lives in the running instances only (docs/protections.md): with none, nothing holds it.
        if not paused:
            click.echo(
                f"No worker instance answered within {wait_s:g}s: none runs, so {kind} is paused nowhere."
            )
            return EXIT_OK
        raise CommandError(
            f"no worker instance answered on {settings.control_topic} within {wait_s:g}s, so the order is "
            "forgotten (pause state lives in running instances): start a worker (`make dev` or "
            f"`worker run`), then `worker pause {kind}` again"
        )
    agree = [r for r in replies if (kind in ((r.get("status") or {}).get("paused") or {})) == paused]
    click.echo(f"{kind} {verb}{when}: {len(agree)} of {len(replies)} answering worker instance(s) confirm.")
    return EXIT_OK


def operator_name() -> str:
    """Who gave the order, for the instances' `kind_paused by=` log line: USER is often
    unset (containers, cron), so the login name from the system, then the uid."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def collect(settings: Settings, wait_s: float) -> list[dict[str, Any]]:
    from worker.gcp.control import ask_status

    publisher, subscriber = operator_clients(settings)
    with google_errors(settings):
        return ask_status(publisher, subscriber, settings.project, settings.control_topic, wait_s=wait_s)


def _lanes(lanes: Any) -> str:
    if not isinstance(lanes, dict) or not lanes:
        return "-"
    return "\n".join(
        f"{name}: {lane.get('in_flight', 0)}, {lane.get('calling', 0)}, {lane.get('waiting', 0)}, "
        f"{lane.get('held', 0)}"
        for name, lane in sorted(lanes.items())
        if isinstance(lane, dict)
    )


COMMANDS = [pause, resume, status]
