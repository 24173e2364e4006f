"""The minimal worker: the floor of what these libraries allow, as the benchmark's yardstick.

    python -m bench.minimal_worker   (the environment `worker run` reads)

The "~150-line aiohttp worker" of issue 12, written as tightly as a team would for a
benchmark and no more: the service's URL from the Admin API once, one ID token minted
once (never refreshed), a google-cloud-pubsub streaming pull on the plain client whose
callback hands each message to an asyncio loop, WORKER_MAX_IN_FLIGHT calls at once
with aiohttp, the result published and waited for, then the ack. No catalog, no
validation, no retries, no logging, no limits, no leases of its own, no stream
rotation, no shutdown drain. What `worker run` spends per job beyond this is what
its features cost; the gap is in BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import google.auth
import google.oauth2.id_token
from google.auth.transport.requests import Request
from google.cloud import pubsub_v1, run_v2  # type: ignore[attr-defined]  # lazy-loaded module

from bench.naive_worker import load_services


async def serve() -> None:
    project = os.environ["GOOGLE_CLOUD_PROJECT"]
    region = os.environ.get("WORKER_REGION", "us-central1")
    in_flight = int(os.environ.get("WORKER_MAX_IN_FLIGHT", "200"))
    services = load_services(Path(os.environ["WORKER_CATALOG_DIR"]))
    credentials, _ = google.auth.default()
    admin = run_v2.ServicesClient(
        transport="rest",
        client_options={"api_endpoint": os.environ["WORKER_RUN_API_ENDPOINT"]},
        credentials=credentials,
    )
    urls = {
        kind: admin.get_service(name=f"projects/{project}/locations/{region}/services/{service}").uri
        for kind, service in services.items()
    }
    tokens = {url: google.oauth2.id_token.fetch_id_token(Request(), url) for url in set(urls.values())}
    publisher = pubsub_v1.PublisherClient()
    results_topic = publisher.topic_path(project, os.environ["WORKER_RESULTS_TOPIC"])
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(in_flight)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def handle(message: Any) -> None:
            async with slots:
                job = json.loads(message.data)
                url = urls[job["kind"]]
                async with session.post(
                    url, json=job["payload"], headers={"Authorization": f"Bearer {tokens[url]}"}
                ) as response:
                    body = await response.json()
                    status = response.status
            result = {
                "job_id": job["job_id"],
                "kind": job["kind"],
                "status": "succeeded" if status < 400 else "failed",
                "http_status": status,
                "response": body,
                "finished_at": datetime.now(UTC).isoformat(),
            }
            published = publisher.publish(results_topic, json.dumps(result).encode(), job_id=job["job_id"])
            await asyncio.wrap_future(published)
            message.ack()

        def callback(message: Any) -> None:  # on the client's thread pool
            loop.call_soon_threadsafe(loop.create_task, handle(message))

        subscriber = pubsub_v1.SubscriberClient()
        path = subscriber.subscription_path(project, os.environ["WORKER_JOBS_SUBSCRIPTION"])
        flow = pubsub_v1.types.FlowControl(max_messages=2 * in_flight)
        future = subscriber.subscribe(path, callback, flow_control=flow)
        print("consumer_started", flush=True)
        await asyncio.wrap_future(future)  # runs until the driver, done with it, stops the process


if __name__ == "__main__":
    asyncio.run(serve())
