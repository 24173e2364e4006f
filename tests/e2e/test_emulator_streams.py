"""The emulator's departed-stream fault and the worker's cap on it (worker/gcp/emulator.py,
fault 1, where both are explained).

Both halves are shown here on the real emulator: the fault with the library's default
client, and its absence with the worker's transport once the cap has passed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from google.cloud import pubsub_v1

from tests.e2e.harness import REPO, uid

pytestmark = pytest.mark.e2e

ACK_DEADLINE_S = 10
MESSAGES = 20
# A short cap so the test need not wait the worker's STREAM_DEADLINE_S.
CAP_S = 3.0

# A subscriber that never acks, in its own process so it can be SIGKILLed like a replica.
CHILD = """
import os, sys, time
from google.cloud import pubsub_v1
from worker.gcp.emulator import subscriber_transport
cap = float(sys.argv[2])
if cap:
    transport = subscriber_transport(os.environ["PUBSUB_EMULATOR_HOST"], cap)
    client = pubsub_v1.SubscriberClient(transport=transport)
else:
    client = pubsub_v1.SubscriberClient()
client.subscribe(sys.argv[1], lambda message: None)
print("up", flush=True)
time.sleep(3600)
"""


@pytest.fixture
def subscription(pubsub_emulator: Any) -> Iterator[tuple[str, str]]:
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    name = uid()
    topic = publisher.topic_path(pubsub_emulator.project, f"streams-{name}")
    dead = publisher.topic_path(pubsub_emulator.project, f"streams-dead-{name}")
    path = subscriber.subscription_path(pubsub_emulator.project, f"streams-{name}")
    publisher.create_topic(name=topic)
    publisher.create_topic(name=dead)
    # A dead-letter policy makes the emulator count delivery attempts.
    subscriber.create_subscription(
        request={
            "name": path,
            "topic": topic,
            "ack_deadline_seconds": ACK_DEADLINE_S,
            "dead_letter_policy": {"dead_letter_topic": dead, "max_delivery_attempts": 100},
        }
    )
    yield topic, path
    subscriber.delete_subscription(subscription=path)
    publisher.delete_topic(topic=topic)
    publisher.delete_topic(topic=dead)


def kill_subscribers(path: str, cap_s: float, count: int) -> None:
    for _ in range(count):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, path, str(cap_s)],
            cwd=REPO,
            env=dict(os.environ),
            stdout=subprocess.PIPE,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"up"
        time.sleep(0.5)  # the stream is open on the emulator's side
        child.kill()
        child.wait()


def deliveries_to_live_subscriber(topic: str, path: str, wait_s: float) -> dict[int, int]:
    """Publish one message at a time and return {message: delivery attempt} for those a
    live subscriber got within `wait_s` of the last publish."""
    got: dict[int, int] = {}
    lock = threading.Lock()

    def on_message(message: Any) -> None:
        with lock:
            got[json.loads(message.data)["n"]] = message.delivery_attempt
        message.ack()

    subscriber = pubsub_v1.SubscriberClient()
    future = subscriber.subscribe(path, on_message)
    publisher = pubsub_v1.PublisherClient()
    try:
        time.sleep(0.5)
        for n in range(MESSAGES):
            # Spaced out so each message is up for grabs on its own, not in one batch.
            publisher.publish(topic, json.dumps({"n": n}).encode()).result(timeout=30)
            time.sleep(0.12)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and len(got) < MESSAGES:
            time.sleep(0.1)
    finally:
        future.cancel()
        subscriber.close()
    return got


def test_the_emulator_keeps_feeding_a_killed_subscribers_stream(subscription: tuple[str, str]) -> None:
    topic, path = subscription
    kill_subscribers(path, cap_s=0, count=2)
    got = deliveries_to_live_subscriber(topic, path, wait_s=3)
    # Two dead streams and one live one compete for each message: if none went to a
    # dead stream the emulator has been fixed and the cap can go.
    assert len(got) < MESSAGES, "the emulator no longer feeds dead streams; drop worker/gcp/emulator.py"


def test_with_the_workers_cap_a_killed_stream_is_forgotten(subscription: tuple[str, str]) -> None:
    topic, path = subscription
    kill_subscribers(path, cap_s=CAP_S, count=2)
    time.sleep(CAP_S + 1)
    got = deliveries_to_live_subscriber(topic, path, wait_s=3)
    assert sorted(got) == list(range(MESSAGES))
    assert set(got.values()) == {1}, got
