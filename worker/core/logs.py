"""One structlog configuration: Cloud Logging JSON in production, readable in a terminal.

Every line passes through `redact_secrets` last, so a bearer token, an OAuth access
token, a JWT, a private key, an API key or the value of an `Authorization`,
`password`, `token`... pair never reaches the output, whoever logged it. `scrub` is
also what error messages quoting a service's answer pass through before they reach a
result or a dead letter (worker/gcp/invoker.py).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any

import structlog

# Credential shapes. Those with a literal prefix are one fast pass; the others run only
# when a cheap substring test finds their hint (every log line passes through here:
# an always-on case-insensitive alternation cost 7x the old scrub per string). `kv`
# keeps the name of a `name=value` / `"name": "value"` pair (Authorization, password,
# api_key...) and redacts the value, so the message still says which field held it.
_PREFIXED_RE = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # JWT
    r"|ya29\.[A-Za-z0-9._-]+"  # OAuth access token
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|AKIA[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{20,}"  # GitHub token
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack token
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
    re.S,
)
_HINTED = (
    (
        ("auth", "key", "token", "secret", "passw", "pwd", "credential"),
        re.compile(
            r"(?P<kv>(?i:\b(?:proxy-)?authorization|\bx-api-key|\bapi[_-]?key|\bapikey|\baccess[_-]?token"
            r"|\brefresh[_-]?token|\bid[_-]?token|\bclient[_-]?secret|\bsecret|\bpassword|\bpasswd|\bpwd"
            r"|\btoken|\bcredentials?)[\"']?\s*[:=]\s*[\"']?)(?!\[REDACTED\])(?i:(?:bearer|basic)\s+)?"
            r"[^\s\"'&,;}\]]+"
        ),
    ),
    (("bearer", "basic"), re.compile(r"(?i:bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")),
    (("://",), re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)")),  # user:password@ in a URL
)
REDACTED = "[REDACTED]"

# structlog level names -> Cloud Logging's LogSeverity names.
_SEVERITY = {
    "debug": "DEBUG",
    "info": "INFO",
    "warning": "WARNING",
    "warn": "WARNING",
    "error": "ERROR",
    "exception": "ERROR",
    "critical": "CRITICAL",
}


# The job a line is about (job_id, kind, attempt, traceparent). One variable set once
# per job, where structlog's bound_contextvars makes and resets a variable per field
# (about 5% of the worker's CPU at 2,000 jobs/s). Each job runs in an asyncio task of
# its own, whose context is a copy: what one job binds no other job sees, and nothing
# needs undoing when it ends.
_job_fields: ContextVar[dict[str, Any] | None] = ContextVar("worker_job_fields", default=None)


_debug = False


def debug_enabled() -> bool:
    """Whether debug lines are written. A filtered-out call on a module's lazy logger
    still builds a bound logger first: per-job debug lines are guarded with this."""
    return _debug


def bind_job_fields(**fields: Any) -> None:
    """Add `fields` (None values are left out) to every line the current task logs."""
    current = _job_fields.get()
    _job_fields.set({**current, **fields} if current else fields)


def merge_job_fields(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    fields = _job_fields.get()
    if fields:
        for key, value in fields.items():
            if value is not None:
                event.setdefault(key, value)
    return event


def _redact(match: re.Match[str]) -> str:
    return (match.groupdict().get("kv") or "") + REDACTED


def scrub(text: str) -> str:
    """Replace anything that looks like a credential with [REDACTED]."""
    low = text.lower()
    for hints, pattern in _HINTED:
        if any(hint in low for hint in hints):
            text = pattern.sub(_redact, text)
    return _PREFIXED_RE.sub(REDACTED, text)


def scrub_value(value: Any) -> Any:
    """`value` with every string in it scrubbed, dict keys included (JSON-like values)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub(k) if isinstance(k, str) else k: scrub_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_value(v) for v in value]
    return value


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        event[key] = scrub_value(value)
    return event


class CloudLoggingFields:
    """Rename structlog's keys to the ones Cloud Logging reads from a JSON line."""

    def __init__(self, project: str | None) -> None:
        self.project = project

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event["message"] = event.pop("event", "")
        event["severity"] = _SEVERITY.get(str(event.pop("level", "info")).lower(), "DEFAULT")
        if "timestamp" in event:
            event["time"] = event.pop("timestamp")
        traceparent = event.get("traceparent")
        if self.project and isinstance(traceparent, str) and traceparent.count("-") == 3:
            _, trace_id, span_id, _ = traceparent.split("-")
            event["logging.googleapis.com/trace"] = f"projects/{self.project}/traces/{trace_id}"
            event["logging.googleapis.com/spanId"] = span_id
        return event


def configure_logging(
    fmt: str = "auto", level: str = "info", project: str | None = None, stream: Any = None
) -> None:
    """Configure structlog and route the standard library's logging through it."""
    stream = stream or sys.stderr
    json_lines = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        merge_job_fields,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: list[Any]
    if json_lines:
        renderer = [CloudLoggingFields(project), redact_secrets, structlog.processors.JSONRenderer()]
    else:
        renderer = [redact_secrets, structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    numeric = getattr(logging, level.upper(), logging.INFO)
    global _debug
    _debug = numeric <= logging.DEBUG
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.stdlib.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Google's client libraries are chatty at INFO; their warnings still come through.
    root.setLevel(max(numeric, logging.WARNING))
    # google-api-core detaches the "google" logger from the root (propagate=False) when
    # the first client is built, unless that logger is already configured; detached, its
    # warnings would reach stderr as plain, unredacted text. Configure it, and re-attach.
    google = logging.getLogger("google")
    google.setLevel(max(numeric, logging.WARNING))
    google.propagate = True


log = structlog.get_logger("worker")
