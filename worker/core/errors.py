"""Errors the worker names to its users.

A job error is either permanent (retrying cannot help: the job gets a `failed` or
`rejected` result and a dead letter) or transient (the job is retried in process,
then nacked so Pub/Sub redelivers it). The `code` is what the result's
`error.code` carries; the message names the cause and the fix.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable


class ConfigError(Exception):
    """Bad configuration found at start-up; the message names the variable or file."""


class JobError(Exception):
    """A job could not be completed. `code` is stable and machine-readable."""

    def __init__(self, code: str, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        # HTTP calls made before giving up, when the error came from the invoker.
        self.attempts: int | None = None
        # The function's Retry-After (seconds), when it sent one (a 429 or 503).
        self.retry_after_s: float | None = None


class PermanentJobError(JobError):
    """Retrying will not help (a 403, a missing service, a 4xx from the function)."""


class TransientJobError(JobError):
    """May succeed later (a 503, a timeout, the Admin API or metadata server away)."""


class InvalidJobError(PermanentJobError):
    """The message is not a valid job: its result is `rejected`."""


class HoldJob(Exception):
    """The job may not be called now (its kind is paused, its target's breaker is open).

    It is held under lease, uses up no delivery attempt, and goes round the pipeline
    again once `wait()` returns (worker/gcp/consumer.py)."""

    def __init__(self, reason: str, wait: Callable[[], Awaitable[None]]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


def shorten(value: object, limit: int = 300, *, with_type: bool = True) -> str:
    """A value for a one-line message: an exception as `Type: message` (or its message
    alone), anything else as str or repr, cut to `limit` characters with "..."."""
    if isinstance(value, BaseException):
        text = f"{type(value).__name__}: {value}" if with_type else str(value)
    else:
        text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
