"""Topics and subscriptions of docs/contract.md, created idempotently (`worker setup`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import proto
from google.api_core import exceptions
from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # lazy-loaded module
from google.protobuf import duration_pb2, field_mask_pb2

from worker.core.settings import Settings


@dataclass(frozen=True)
class SetupOptions:
    max_delivery_attempts: int = 5
    min_backoff_s: int = 10
    max_backoff_s: int = 600
    ack_deadline_s: int = 60
    retention_days: int = 7
    # Off only on the emulator, which loses nacked jobs under a retry policy
    # (worker/gcp/emulator.py, fault 2).
    retry_policy: bool = True


def for_target(options: SetupOptions) -> SetupOptions:
    """The options as they apply where PUBSUB_EMULATOR_HOST points: no retry policy on the
    emulator (see `retry_policy`), unchanged on Pub/Sub itself."""
    if os.environ.get("PUBSUB_EMULATOR_HOST"):
        return dataclasses.replace(options, retry_policy=False)
    return options


@dataclass(frozen=True)
class Change:
    resource: str
    action: str  # created | updated | unchanged | differs
    detail: str = ""


def _subscriptions(settings: Settings, options: SetupOptions) -> list[dict[str, Any]]:
    project = settings.project
    retention = duration_pb2.Duration(seconds=options.retention_days * 86400)
    # One subscription per lane (worker/core/lanes.py), each with the same dead-letter
    # policy onto the one dead-letter topic.
    lanes: list[dict[str, Any]] = [
        {
            "name": f"projects/{project}/subscriptions/{settings.lane_subscription(lane)}",
            "topic": f"projects/{project}/topics/{settings.lane_topic(lane)}",
            "ack_deadline_seconds": options.ack_deadline_s,
            "message_retention_duration": retention,
            "dead_letter_policy": pubsub_v1.types.DeadLetterPolicy(
                dead_letter_topic=f"projects/{project}/topics/{settings.dead_letter_topic}",
                max_delivery_attempts=options.max_delivery_attempts,
            ),
        }
        for lane in settings.lanes
    ]
    if options.retry_policy:
        for subscription in lanes:
            subscription["retry_policy"] = pubsub_v1.types.RetryPolicy(
                minimum_backoff=duration_pb2.Duration(seconds=options.min_backoff_s),
                maximum_backoff=duration_pb2.Duration(seconds=options.max_backoff_s),
            )
    return [
        *lanes,
        {
            "name": f"projects/{project}/subscriptions/{settings.results_subscription}",
            "topic": f"projects/{project}/topics/{settings.results_topic}",
            "ack_deadline_seconds": options.ack_deadline_s,
            "message_retention_duration": retention,
        },
        {
            "name": f"projects/{project}/subscriptions/{settings.dead_letter_subscription}",
            "topic": f"projects/{project}/topics/{settings.dead_letter_topic}",
            "ack_deadline_seconds": options.ack_deadline_s,
            "message_retention_duration": retention,
        },
    ]


def topics(settings: Settings) -> list[str]:
    return [
        f"projects/{settings.project}/topics/{name}"
        for name in (
            settings.jobs_topic,
            settings.batch_topic,
            settings.results_topic,
            settings.dead_letter_topic,
            settings.control_topic,
        )
    ]


def apply_setup(publisher: Any, subscriber: Any, settings: Settings, options: SetupOptions) -> list[Change]:
    """Create what is missing, update settings that differ where Pub/Sub allows; report each."""
    changes = []
    for topic in topics(settings):
        try:
            publisher.create_topic(name=topic)
            changes.append(Change(topic, "created"))
        except exceptions.AlreadyExists:
            changes.append(Change(topic, "unchanged"))
    for wanted in _subscriptions(settings, options):
        try:
            subscriber.create_subscription(request=wanted)
            changes.append(Change(wanted["name"], "created"))
            continue
        except exceptions.AlreadyExists:
            pass
        changes.append(_reconcile(subscriber, wanted))
    return changes


def _reconcile(subscriber: Any, wanted: dict[str, Any]) -> Change:
    current = subscriber.get_subscription(subscription=wanted["name"])
    if current.topic != wanted["topic"]:
        return Change(
            wanted["name"],
            "differs",
            f"it is attached to {current.topic}, not {wanted['topic']}; Pub/Sub cannot move a "
            "subscription: delete it or choose another name",
        )
    differing = []
    for field, value in wanted.items():
        if field in ("name", "topic"):
            continue
        have = getattr(current, field)
        if _normalise(have) != _normalise(value):
            differing.append(field)
    if not differing:
        return Change(wanted["name"], "unchanged")
    update = pubsub_v1.types.Subscription(**wanted)
    try:
        subscriber.update_subscription(
            subscription=update, update_mask=field_mask_pb2.FieldMask(paths=differing)
        )
    except exceptions.GoogleAPICallError as exc:
        return Change(
            wanted["name"], "differs", f"{', '.join(differing)} differ; update refused: {exc.message}"
        )
    return Change(wanted["name"], "updated", ", ".join(differing))


def _normalise(value: Any) -> Any:
    if hasattr(value, "total_seconds"):
        return int(value.total_seconds())
    if isinstance(value, duration_pb2.Duration):
        return value.seconds
    if isinstance(value, proto.Message):
        value = type(value).pb(value)
    if hasattr(value, "SerializeToString"):
        return value.SerializeToString(deterministic=True)
    return value
