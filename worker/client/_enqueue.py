"""Publishing jobs: `enqueue` and the job it builds (docs/contract.md, "Job message").

`enqueue` traces through OpenTelemetry's API (the web app's own tracer provider, if
it configured one): a `send <topic>` PRODUCER span, child of whatever span is current
(the web request's), whose context travels as the job's `traceparent`; the worker
continues that trace and each result names it in `trace_id`.
"""

from __future__ import annotations

import functools
import uuid
from datetime import datetime, timedelta
from typing import Any

import structlog
from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # lazy-loaded module
from opentelemetry import trace
from pydantic import ValidationError

from worker.core.catalog import Catalog
from worker.core.errors import InvalidJobError
from worker.core.lanes import BATCH, INTERACTIVE, LANE_ATTRIBUTE, check_lane
from worker.core.messages import MAX_PUBLISH_BYTES, Job, describe_validation_error, now
from worker.core.settings import Settings, load_settings

log = structlog.get_logger("worker.client")
_tracer = trace.get_tracer("worker.client")

_PUBLISH_TIMEOUT_S = 60.0


@functools.cache
def _default_publisher() -> Any:
    # One client per process: it holds a gRPC channel and a batching thread.
    return pubsub_v1.PublisherClient()


def new_job_id() -> str:
    return str(uuid.uuid4())


def build_job(
    kind: str,
    payload: Any,
    job_id: str | None = None,
    *,
    catalog: Catalog | None = None,
    traceparent: str | None = None,
    not_before: datetime | timedelta | None = None,
) -> Job:
    """A valid job, or InvalidJobError saying what is wrong (checked against `catalog` if given).

    `not_before`: not run before this time (a datetime with a time zone), or this long
    from now (a timedelta); the worker puts it off on Cloud Tasks until then."""
    created = now()
    fields: dict[str, Any] = {
        "job_id": job_id or new_job_id(),
        "kind": kind,
        "payload": payload,
        "created_at": created,
    }
    if traceparent:
        fields["traceparent"] = traceparent
    if isinstance(not_before, timedelta):
        fields["not_before"] = created + not_before
    elif not_before is not None:
        fields["not_before"] = not_before
    try:
        job = Job.model_validate(fields)
    except ValidationError as exc:
        raise InvalidJobError("invalid_job", describe_validation_error(exc)) from None
    if catalog is not None:
        catalog.lookup(kind).check_payload(payload)
    size = len(job.to_bytes())
    if size > MAX_PUBLISH_BYTES:
        raise InvalidJobError(
            "payload_too_large",
            f"job is {size} bytes, over Pub/Sub's limit; store large inputs elsewhere and pass a reference",
        )
    return job


def enqueue(
    kind: str,
    payload: Any,
    job_id: str | None = None,
    *,
    publisher: Any = None,
    settings: Settings | None = None,
    catalog: Catalog | None = None,
    not_before: datetime | timedelta | None = None,
    lane: str = INTERACTIVE,
) -> str:
    """Publish one job to its lane's topic and return its id once Pub/Sub has it.

    `lane`: "interactive" (the jobs topic: a person waits for it) or "batch" (the batch
    lane's topic, marked `lane=batch`: bulk work that must not delay interactive jobs).

    With `not_before` (a datetime with a time zone, or a timedelta from now) the job
    runs at that time, not before: its first result is `scheduled`, not final.

    Raises InvalidJobError for a job the worker would reject, and google-api-core's
    errors when Pub/Sub refuses the publish (for example PermissionDenied without
    roles/pubsub.publisher on the topic).
    """
    settings = settings or load_settings()
    topic_name = settings.lane_topic(check_lane(lane))
    with _tracer.start_as_current_span(
        f"send {topic_name}",
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": "gcp_pubsub",
            "messaging.operation.type": "send",
            "messaging.destination.name": topic_name,
            "worker.job.kind": kind,
        },
    ) as span:
        context = span.get_span_context()
        # Without a tracer provider the span is a no-op: then the current trace, if any, travels.
        traceparent = (
            f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
            if context.is_valid
            else None
        )
        job = build_job(
            kind, payload, job_id, catalog=catalog, traceparent=traceparent, not_before=not_before
        )
        span.set_attribute("worker.job.id", job.job_id)
        publisher = publisher or _default_publisher()
        topic = publisher.topic_path(settings.project, topic_name)
        attributes = job.attributes()
        if lane == BATCH:
            attributes[LANE_ATTRIBUTE] = BATCH
        message_id = publisher.publish(topic, job.to_bytes(), **attributes).result(timeout=_PUBLISH_TIMEOUT_S)
        if isinstance(message_id, str):
            span.set_attribute("messaging.message.id", message_id)
    return job.job_id
