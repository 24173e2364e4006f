"""JSON log lines as Cloud Logging reads them from a Cloud Run container's stderr.

Cloud Logging lifts `severity`, `message`, `time` and `logging.googleapis.com/trace`
out of a JSON line; anything else lands in jsonPayload. A credential must never get
that far, whichever logger wrote it.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import structlog
from google.auth.credentials import AnonymousCredentials
from google.cloud import pubsub_v1

from worker.core.logs import REDACTED, configure_logging

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL3gifQ.c2lnbmF0dXJl"
ACCESS_TOKEN = "ya29.a0AfH6SMBx-secret_token"
PRIVATE_KEY = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    configure_logging(fmt="json", level="debug", project="P", stream=stream)
    yield stream
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize(
    ("method", "severity"),
    [
        ("debug", "DEBUG"),
        ("info", "INFO"),
        ("warning", "WARNING"),
        ("error", "ERROR"),
        ("critical", "CRITICAL"),
    ],
)
def test_severity_uses_cloud_logging_names(lines: io.StringIO, method: str, severity: str) -> None:
    getattr(structlog.get_logger("worker"), method)("job_succeeded", job_id="j1")
    (record,) = records(lines)
    assert record["severity"] == severity
    assert record["message"] == "job_succeeded" and record["job_id"] == "j1"
    assert "event" not in record and "level" not in record


def test_time_is_rfc3339_utc(lines: io.StringIO) -> None:
    structlog.get_logger("worker").info("worker_ready")
    (record,) = records(lines)
    assert record["time"].endswith("Z")
    assert datetime.fromisoformat(record["time"]).utcoffset().total_seconds() == 0


def test_a_bound_traceparent_links_the_line_to_its_trace(lines: io.StringIO) -> None:
    with structlog.contextvars.bound_contextvars(traceparent=TRACEPARENT, job_id="j1"):
        structlog.get_logger("worker").info("job_succeeded")
    structlog.get_logger("worker").info("consumer_stopped")
    traced, untraced = records(lines)
    assert traced["logging.googleapis.com/trace"] == f"projects/P/traces/{TRACE_ID}"
    assert traced["logging.googleapis.com/spanId"] == "00f067aa0ba902b7"
    assert traced["job_id"] == "j1"
    assert "logging.googleapis.com/trace" not in untraced


def test_an_exception_is_logged_at_error_with_its_traceback(lines: io.StringIO) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        structlog.get_logger("worker").exception("job_internal_error")
    (record,) = records(lines)
    assert record["severity"] == "ERROR" and "RuntimeError: boom" in record["exception"]


@pytest.mark.parametrize(
    "secret",
    [f"Bearer {JWT}", JWT, ACCESS_TOKEN, PRIVATE_KEY, "authorization: bearer abc.def-ghi"],
)
def test_credentials_are_redacted_wherever_they_appear(lines: io.StringIO, secret: str) -> None:
    log = structlog.get_logger("worker")
    log.warning("job_failed", error=f"401 from service, sent {secret}")
    log.info("invoked", headers={"Authorization": secret}, tokens=[secret])
    with structlog.contextvars.bound_contextvars(note=secret):
        log.info(f"message carrying {secret}")
    text = lines.getvalue()
    for fragment in (secret.strip(), JWT, "ya29.", "MIIEvQ", "abc.def-ghi"):
        if fragment in secret:
            assert fragment not in text
    first, second, third = records(lines)
    assert first["error"].startswith("401 from service, sent ") and REDACTED in first["error"]
    assert REDACTED in second["headers"]["Authorization"] and REDACTED in second["tokens"][0]
    assert REDACTED in third["message"] and REDACTED in third["note"]


def test_standard_library_records_get_the_same_fields_and_redaction(lines: io.StringIO) -> None:
    # Building a client lets google-api-core detach the "google" logger, unless it is
    # configured; its warnings must still come out as JSON, redacted.
    pubsub_v1.PublisherClient(credentials=AnonymousCredentials())
    logging.getLogger("google.auth").warning("refresh failed for token %s", ACCESS_TOKEN)
    (record,) = records(lines)
    assert record["severity"] == "WARNING"
    assert record["message"] == f"refresh failed for token {REDACTED}"
    assert record["logger"] == "google.auth" and record["time"].endswith("Z")
