"""The ceiling: a streaming-pull subscriber that only acks, no HTTP, no result.

    python -m bench.ceiling   (env: PUBSUB_EMULATOR_HOST, GOOGLE_CLOUD_PROJECT,
                               WORKER_JOBS_SUBSCRIPTION, BENCH_EXPECT, BENCH_ACKS_FILE)

Whatever `worker run` does per job costs on top of this, so its rate on the same
backlog bounds ours. Once BENCH_EXPECT distinct messages were acked it writes one
"ack-time job-id" line per message to BENCH_ACKS_FILE and idles; the driver takes
the rate from the first ack to the last, as it does from results for the workers,
and an ack as the ceiling's "result" for latency.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # lazy-loaded module


def main() -> None:
    expect = int(os.environ["BENCH_EXPECT"])
    acks: dict[str, tuple[float, str]] = {}
    done = threading.Event()
    lock = threading.Lock()

    def on_message(message: Any) -> None:
        message.ack()
        with lock:
            # A redelivery is acked again but counted once, at its first ack.
            acks.setdefault(message.message_id, (time.time(), message.attributes.get("job_id", "")))
            if len(acks) >= expect:
                done.set()

    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(
        os.environ["GOOGLE_CLOUD_PROJECT"], os.environ["WORKER_JOBS_SUBSCRIPTION"]
    )
    future = subscriber.subscribe(path, on_message)
    print("consumer_started", flush=True)
    done.wait()
    time.sleep(0.5)  # the client sends acks in batches: let the last ones go out
    future.cancel()
    target = Path(os.environ["BENCH_ACKS_FILE"])
    partial = target.with_suffix(".partial")
    with lock:
        partial.write_text("".join(f"{t} {job_id}\n" for t, job_id in acks.values()))
    partial.rename(target)  # the driver reads the file once it exists: never half of it
    # Stay alive: the driver reads this process's CPU times, then stops it.
    threading.Event().wait()


if __name__ == "__main__":
    main()
