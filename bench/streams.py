"""The emulator's stream handling, side by side: what each way of ending streams costs.

    python -m bench.streams [--jobs 40000] [--acks-per-s 1500]

A plain subscriber (no HTTP, no results) reads a backlog slower than the emulator
pushes it, as a busy worker does, through each transport of worker/gcp/emulator.py:

- plain: the client library's own (what real Pub/Sub gets; on the emulator a
  departed client's stream lives 1,800 s);
- long cap: deadline 600 s, cut by it;
- cut 13 s: deadline 13 s, cut by it (shipped before the rotation);
- rotation: deadline 13 s, half-closed at 8 s (shipped).

each on a subscription without and with a retry policy (1 s to 5 s). It prints, per
variant, the rate from first ack to last, the messages that needed a second delivery
or never came back, and the longest second without an ack. The soak (`make soak`)
measures the other side: how long a departed stream lives.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import threading
import time
import uuid
from collections import Counter
from typing import Any

from tests.conftest import PROJECT

VARIANTS = {
    "plain": None,
    "long cap 600 s": (600.0, None),
    "cut 13 s": (13.0, None),
    "rotation 8/13 s": (13.0, 8.0),
}


def run(host: str, variant: tuple[float, float | None] | None, jobs: int, rate: float, retry: bool) -> dict:
    from google.cloud import pubsub_v1  # type: ignore[attr-defined]

    from worker.gcp.emulator import subscriber_transport

    publisher = pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=500, max_latency=0.01)
    )
    admin = pubsub_v1.SubscriberClient()
    name = uuid.uuid4().hex[:8]
    topic = publisher.topic_path(PROJECT, f"streams-{name}")
    dead = publisher.topic_path(PROJECT, f"streams-dead-{name}")
    path = admin.subscription_path(PROJECT, f"streams-{name}")
    publisher.create_topic(name=topic)
    publisher.create_topic(name=dead)
    request: dict[str, Any] = {
        "name": path,
        "topic": topic,
        "ack_deadline_seconds": 10,
        "dead_letter_policy": {"dead_letter_topic": dead, "max_delivery_attempts": 100},
    }
    if retry:
        request["retry_policy"] = {"minimum_backoff": {"seconds": 1}, "maximum_backoff": {"seconds": 5}}
    admin.create_subscription(request=request)
    futures = [publisher.publish(topic, json.dumps({"n": n, "pad": "x" * 80}).encode()) for n in range(jobs)]
    for future in futures:
        future.result(timeout=120)
    if variant is None:
        client = pubsub_v1.SubscriberClient()
    else:
        client = pubsub_v1.SubscriberClient(transport=subscriber_transport(host, *variant))
    received: queue.SimpleQueue[Any] = queue.SimpleQueue()
    acked: dict[str, tuple[float, int]] = {}

    def ack_at_rate() -> None:
        start, done = time.monotonic(), 0
        while True:
            message = received.get()
            acked.setdefault(message.message_id, (time.time(), message.delivery_attempt or 1))
            message.ack()
            done += 1
            time.sleep(max(0.0, start + done / rate - time.monotonic()))

    threading.Thread(target=ack_at_rate, daemon=True).start()
    flow = pubsub_v1.types.FlowControl(max_messages=400)
    future = client.subscribe(path, received.put, flow_control=flow)
    deadline = time.monotonic() + jobs / rate + 60
    while len(acked) < jobs and time.monotonic() < deadline:
        time.sleep(0.5)
    future.cancel()
    client.close()
    times = sorted(t for t, _ in acked.values())
    attempts = Counter(a for _, a in acked.values())
    per_second = Counter(int(t - times[0]) for t in times)
    gaps = [s for s in range(int(times[-1] - times[0]) + 1) if per_second.get(s, 0) == 0]
    return {
        "acked": len(acked),
        "jobs_per_s": round((len(times) - 1) / max(times[-1] - times[0], 1e-6)),
        "second_delivery": sum(n for a, n in attempts.items() if a > 1),
        "never": jobs - len(acked),
        "seconds_without_ack": len(gaps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=int, default=40_000)
    parser.add_argument("--acks-per-s", type=float, default=1500.0)
    args = parser.parse_args()
    from localcloud import PubSubEmulator

    with PubSubEmulator(project=PROJECT) as emulator:
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        print(f"{args.jobs} jobs, acked at {args.acks_per_s:g}/s; load average {os.getloadavg()[0]:.2f}")
        print("variant          | retry policy | jobs/s | 2nd delivery | never | seconds without an ack")
        for label, variant in VARIANTS.items():
            for retry in (False, True):
                found = run(emulator.host, variant, args.jobs, args.acks_per_s, retry)
                print(
                    f"{label:16} | {'yes' if retry else 'no':12} | {found['jobs_per_s']:6} | "
                    f"{found['second_delivery']:12} | {found['never']:5} | {found['seconds_without_ack']}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
