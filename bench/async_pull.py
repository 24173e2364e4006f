"""Issue "Past the library's floor", step one: the pull candidates side by side.

    .venv/bin/python -m bench.async_pull [--messages 60000] [--rounds 2]

Before the hot path is redesigned, what does each way of pulling cost with nothing
else in the process? On one emulator, the same backlog each time, each contender in a
process of its own that acks every message and nothing more:

- `threaded`: google-cloud-pubsub's `SubscriberClient.subscribe` (stream, leaser and
  dispatcher threads, callbacks on a thread pool): what `worker run` stands on today,
  and bench/ceiling.py's "ceiling";
- `async`: the GAPIC `SubscriberAsyncClient.streaming_pull` that ships with the same
  library, on one asyncio loop, acks sent back on the same stream in batches: the
  candidate for one event loop.

Rounds alternate the two so a machine's drift falls on both. Prints, per contender,
messages per second (first to last ack) and CPU seconds per 10,000 messages, and
writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = ("threaded", "async")


def consume_threaded(project: str, subscription: str, expect: int) -> dict[str, float]:
    import threading

    from google.cloud import pubsub_v1

    seen: set[str] = set()
    times: list[float] = []
    lock = threading.Lock()
    done = threading.Event()

    def on_message(message: Any) -> None:
        message.ack()
        with lock:
            if message.message_id not in seen:
                seen.add(message.message_id)
                times.append(time.monotonic())
                if len(seen) >= expect:
                    done.set()

    subscriber = pubsub_v1.SubscriberClient()
    flow = pubsub_v1.types.FlowControl(max_messages=400)
    future = subscriber.subscribe(
        subscriber.subscription_path(project, subscription), on_message, flow_control=flow
    )
    done.wait()
    time.sleep(0.5)
    future.cancel()
    return {"first": times[0], "last": times[-1], "count": len(seen)}


async def consume_async(project: str, subscription: str, expect: int) -> dict[str, float]:
    import grpc
    from google.pubsub_v1 import StreamingPullRequest
    from google.pubsub_v1.services.subscriber import SubscriberAsyncClient
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcAsyncIOTransport

    host = os.environ["PUBSUB_EMULATOR_HOST"]
    channel = grpc.aio.insecure_channel(host, options=[("grpc.max_receive_message_length", -1)])
    client = SubscriberAsyncClient(transport=SubscriberGrpcAsyncIOTransport(channel=channel))
    path = f"projects/{project}/subscriptions/{subscription}"
    acks: asyncio.Queue[list[str]] = asyncio.Queue()
    seen: set[str] = set()
    times: list[float] = []
    finished = asyncio.Event()

    async def requests() -> Any:
        yield StreamingPullRequest(
            subscription=path, stream_ack_deadline_seconds=60, max_outstanding_messages=400
        )
        while not finished.is_set():
            batch = await acks.get()
            # Everything queued since: one request per turn of the loop, not per message.
            while not acks.empty():
                batch += acks.get_nowait()
            yield StreamingPullRequest(ack_ids=batch)

    stream = await client.streaming_pull(requests=requests())
    async for response in stream:
        ack_ids = []
        for received in response.received_messages:
            ack_ids.append(received.ack_id)
            if received.message.message_id not in seen:
                seen.add(received.message.message_id)
                times.append(time.monotonic())
        acks.put_nowait(ack_ids)
        if len(seen) >= expect:
            await asyncio.sleep(0.5)  # the last acks go out
            finished.set()
            acks.put_nowait([])
            break
    await channel.close()
    return {"first": times[0], "last": times[-1], "count": len(seen)}


def child(contender: str, subscription: str, expect: int) -> None:
    project = os.environ["GOOGLE_CLOUD_PROJECT"]
    before = resource.getrusage(resource.RUSAGE_SELF)
    if contender == "threaded":
        got = consume_threaded(project, subscription, expect)
    else:
        got = asyncio.run(consume_async(project, subscription, expect))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(json.dumps({**got, "cpu_s": cpu}), flush=True)


def backlog(project: str, topic: str, subscription: str, messages: int) -> None:
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=1000, max_latency=0.05)
    )
    subscriber = pubsub_v1.SubscriberClient()
    topic_path = publisher.topic_path(project, topic)
    publisher.create_topic(name=topic_path)
    subscriber.create_subscription(
        name=subscriber.subscription_path(project, subscription), topic=topic_path, ack_deadline_seconds=60
    )
    body = json.dumps({"job_id": "x", "kind": "bench-echo", "payload": {"n": 1}}).encode()
    futures = [publisher.publish(topic_path, body, job_id=str(i)) for i in range(messages)]
    for future in futures:
        future.result(timeout=120)
    publisher.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--messages", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=CONTENDERS)
    parser.add_argument("--subscription")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.subscription, args.messages)
        return

    from localcloud import PubSubEmulator

    rows: list[dict[str, Any]] = []
    with PubSubEmulator(project="local-project") as emulator:
        env = {**os.environ, "PUBSUB_EMULATOR_HOST": emulator.host, "GOOGLE_CLOUD_PROJECT": "local-project"}
        os.environ.update(env)
        for round_ in range(args.rounds):
            for contender in CONTENDERS if round_ % 2 == 0 else reversed(CONTENDERS):
                name = f"pull-{contender}-{round_}"
                backlog("local-project", name, name, args.messages)
                done = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bench.async_pull",
                        "--child",
                        contender,
                        "--subscription",
                        name,
                        "--messages",
                        str(args.messages),
                    ],
                    env=env,
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    timeout=900,
                    check=True,
                )
                got = json.loads(done.stdout.strip().splitlines()[-1])
                seconds = got["last"] - got["first"]
                row = {
                    "contender": contender,
                    "round": round_,
                    "messages": got["count"],
                    "per_s": round(got["count"] / seconds, 1),
                    "cpu_s_per_10k": round(got["cpu_s"] / got["count"] * 10_000, 3),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = REPO / "bench" / "results" / f"async-pull-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    for contender in CONTENDERS:
        mine = [r for r in rows if r["contender"] == contender]
        print(
            f"{contender:>9}: {sum(r['per_s'] for r in mine) / len(mine):,.0f} msgs/s, "
            f"{sum(r['cpu_s_per_10k'] for r in mine) / len(mine):.2f} CPU-s per 10,000"
        )
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
