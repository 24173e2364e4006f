"""The naive worker: the first thing a team writes, as the benchmark's baseline.

    python -m bench.naive_worker   (the environment `worker run` reads)

A google-cloud-pubsub subscriber callback, on the client's default thread pool,
that for every message looks the service up in the Admin API, fetches an ID token
for it, POSTs the payload with `requests`, publishes the result, waits for that
publish, then acks. Nothing is cached and nothing is retried: it is correct, just
slow, which is what the benchmark measures. The kind -> service map is read from
the same catalog directory `worker run` uses.
"""

from __future__ import annotations

import json
import os
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import google.auth
import google.oauth2.id_token
import requests
from google.auth.transport.requests import Request
from google.cloud import pubsub_v1, run_v2  # type: ignore[attr-defined]  # lazy-loaded module


def load_services(catalog: Path) -> dict[str, str]:
    kinds = (tomllib.loads(path.read_text()) for path in catalog.glob("*.toml"))
    return {kind["kind"]: kind["service"] for kind in kinds if "service" in kind}


def main() -> None:
    project = os.environ["GOOGLE_CLOUD_PROJECT"]
    region = os.environ.get("WORKER_REGION", "us-central1")
    endpoint = os.environ["WORKER_RUN_API_ENDPOINT"]
    services = load_services(Path(os.environ["WORKER_CATALOG_DIR"]))
    publisher = pubsub_v1.PublisherClient()
    results_topic = publisher.topic_path(project, os.environ["WORKER_RESULTS_TOPIC"])

    def callback(message: Any) -> None:
        job = json.loads(message.data)
        credentials, _ = google.auth.default()
        client = run_v2.ServicesClient(
            transport="rest", client_options={"api_endpoint": endpoint}, credentials=credentials
        )
        name = f"projects/{project}/locations/{region}/services/{services[job['kind']]}"
        url = client.get_service(name=name).uri
        token = google.oauth2.id_token.fetch_id_token(Request(), url)
        response = requests.post(url, json=job["payload"], headers={"Authorization": f"Bearer {token}"})
        result = {
            "job_id": job["job_id"],
            "kind": job["kind"],
            "status": "succeeded" if response.ok else "failed",
            "http_status": response.status_code,
            "response": response.json(),
            "finished_at": datetime.now(UTC).isoformat(),
        }
        publisher.publish(results_topic, json.dumps(result).encode(), job_id=job["job_id"]).result()
        message.ack()

    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(project, os.environ["WORKER_JOBS_SUBSCRIPTION"])
    future = subscriber.subscribe(path, callback)
    print("consumer_started", flush=True)
    future.result()  # runs until the driver, done with it, stops the process


if __name__ == "__main__":
    main()
