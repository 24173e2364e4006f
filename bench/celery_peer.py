"""The Celery peer: what many teams would pick instead of a worker of their own.

    python -m bench.celery_peer   (the environment `worker run` reads, plus BENCH_CELERY_QUEUE)

Celery 5 on kombu's `gcpubsub://` transport (kombu >= 5.4; it talks to the emulator
through PUBSUB_EMULATOR_HOST like every Google client), a thread pool of
WORKER_MAX_IN_FLIGHT threads, late acks (a task is acked after it returned, as ours
acks after the result is published). The task does the same work as `worker run`:
the service's URL from the Admin API (once), an ID token for it (cached until five
minutes before it expires, as a team would after the first 401 bill), a POST with
`requests`, the result published to the results topic and waited for.

The driver enqueues with `enqueue(jobs)` (the same Celery app, `send_task`), which
publishes through kombu onto the queue's own topic: kombu's message envelope, not
our job JSON, so Celery reads from its own subscription, created by kombu.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_ready

from bench.naive_worker import load_services

TASK = "bench.score"
_REFRESH_BEFORE_S = 300.0


def make_app(project: str, queue: str) -> Celery:
    app = Celery("bench", broker=f"gcpubsub://projects/{project}")
    app.conf.update(
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_routing_key=queue,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        broker_transport_options={"ack_deadline_seconds": 60, "bulk_max_messages": 100},
    )
    return app


class Job:
    """What one task needs, built once per process: URL, cached token, clients."""

    def __init__(self) -> None:
        import google.auth
        from google.cloud import pubsub_v1, run_v2  # type: ignore[attr-defined]

        project = os.environ["GOOGLE_CLOUD_PROJECT"]
        region = os.environ.get("WORKER_REGION", "us-central1")
        services = load_services(Path(os.environ["WORKER_CATALOG_DIR"]))
        credentials, _ = google.auth.default()
        admin = run_v2.ServicesClient(
            transport="rest",
            client_options={"api_endpoint": os.environ["WORKER_RUN_API_ENDPOINT"]},
            credentials=credentials,
        )
        self.urls = {
            kind: admin.get_service(name=f"projects/{project}/locations/{region}/services/{service}").uri
            for kind, service in services.items()
        }
        self.publisher = pubsub_v1.PublisherClient()
        self.results_topic = self.publisher.topic_path(project, os.environ["WORKER_RESULTS_TOPIC"])
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def token(self, audience: str) -> str:
        import google.oauth2.id_token
        from google.auth.transport.requests import Request

        with self._lock:
            token, expiry = self._tokens.get(audience, ("", 0.0))
            if time.time() < expiry - _REFRESH_BEFORE_S:
                return token
            token = google.oauth2.id_token.fetch_id_token(Request(), audience)
            claims = json.loads(_b64(token.split(".")[1]))
            self._tokens[audience] = (token, float(claims["exp"]))
            return token

    def session(self) -> Any:
        import requests

        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def run(self, job: dict[str, Any]) -> None:
        url = self.urls[job["kind"]]
        response = self.session().post(
            url, json=job["payload"], headers={"Authorization": f"Bearer {self.token(url)}"}, timeout=30
        )
        result = {
            "job_id": job["job_id"],
            "kind": job["kind"],
            "status": "succeeded" if response.ok else "failed",
            "http_status": response.status_code,
            "response": response.json() if response.ok else response.text[:300],
            "finished_at": datetime.now(UTC).isoformat(),
        }
        self.publisher.publish(self.results_topic, json.dumps(result).encode(), job_id=job["job_id"]).result()


def _b64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def enqueue(env: dict[str, str], jobs: Iterable[dict[str, Any]]) -> int:
    """Send every job as a Celery task (what the web app would do with Celery)."""
    app = make_app(env["GOOGLE_CLOUD_PROJECT"], env["BENCH_CELERY_QUEUE"])
    sent = 0
    with app.producer_or_acquire() as producer:
        for job in jobs:
            app.send_task(TASK, args=[job], producer=producer)
            sent += 1
    # kombu publishes without waiting: let the client library send what it batched.
    channel = app.connection_for_write().default_channel
    channel.publisher.stop()
    return sent


def main() -> None:
    app = make_app(os.environ["GOOGLE_CLOUD_PROJECT"], os.environ["BENCH_CELERY_QUEUE"])
    work = Job()

    @app.task(name=TASK)
    def score(job: dict[str, Any]) -> None:
        work.run(job)

    @worker_ready.connect
    def ready(**_: Any) -> None:
        print("consumer_started", flush=True)

    concurrency = os.environ.get("WORKER_MAX_IN_FLIGHT", "200")
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={concurrency}",
            "--loglevel=WARNING",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
        ]
    )


if __name__ == "__main__":
    main()
