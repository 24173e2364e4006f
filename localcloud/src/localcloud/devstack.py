"""`worker dev`: the whole system on this machine, with no Google Cloud account.

Starts the Pub/Sub emulator and the local cloud (metadata server, Admin API, IAM,
Cloud Run services), creates the topics and subscriptions, runs the worker, sends
sample jobs and prints each result as it arrives. It prints the environment a
second shell needs to use `worker enqueue`, `worker dead-letters` and friends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import threading
import uuid
from typing import Any

import click

from localcloud.ports import free_port


def _pin_metadata_host() -> int:
    # google-auth reads GCE_METADATA_HOST once, at import: fix it before anything imports it.
    port = free_port()  # ports.py imports no google module
    os.environ["GCE_METADATA_HOST"] = os.environ["GCE_METADATA_IP"] = f"127.0.0.1:{port}"
    return port


def run_dev(*, sample_jobs: int, max_in_flight: int, fire_batch: int = 0) -> None:
    metadata_port = _pin_metadata_host()
    os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    from localcloud import LocalCloud, PubSubEmulator

    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or "local-project"
    with (
        PubSubEmulator(project=project) as emulator,
        LocalCloud(project=project, metadata_port=metadata_port) as cloud,
    ):
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        os.environ.update(cloud.env)
        os.environ["WORKER_MAX_IN_FLIGHT"] = str(max_in_flight)
        cloud.add_service("account-scoring", "account-scoring")
        cloud.add_service("echo", "echo")
        source = cloud.add_service("accounts-source", "accounts-source")
        source.total_accounts = fire_batch
        _print_environment(cloud.env, emulator.host)
        asyncio.run(_run(sample_jobs, fire_batch))


def _print_environment(env: dict[str, str], emulator_host: str) -> None:
    shown = dict(env, PUBSUB_EMULATOR_HOST=emulator_host)
    click.secho("Local cloud is up. In a second shell:", bold=True)
    for key, value in sorted(shown.items()):
        click.echo(f"  export {key}={shlex.quote(value)}")
    click.echo('  .venv/bin/worker enqueue account-scoring --payload \'{"account_id": "acme"}\' --wait')
    click.echo("Press Ctrl-C to stop.\n")


async def _run(sample_jobs: int, fire_batch: int) -> None:
    from worker.core.logs import configure_logging
    from worker.core.settings import load_settings
    from worker.ops.provision import SetupOptions, apply_setup, for_target
    from worker.runtime.app import pubsub_clients, run_worker

    settings = load_settings()
    configure_logging("console", "warning", settings.project)
    publisher, subscriber = pubsub_clients(settings, None)
    for change in apply_setup(
        publisher, subscriber, settings, for_target(SetupOptions())
    ):
        click.echo(f"{change.action:>9}  {change.resource}")
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, stop))
    results = threading.Thread(target=_print_results, args=(subscriber, settings, stop), daemon=True)
    results.start()
    topic = publisher.topic_path(settings.project, settings.jobs_topic)
    for index in range(sample_jobs):
        job = _sample_job(index)
        publisher.publish(topic, json.dumps(job).encode(), job_id=job["job_id"], kind=job["kind"])
    click.echo(f"Sent {sample_jobs} sample jobs.")
    if fire_batch:
        batch_id = f"dev-batch-{uuid.uuid4().hex[:8]}"
        batch = {"job_id": batch_id, "kind": "batch-scoring", "payload": {"source": True}}
        publisher.publish(topic, json.dumps(batch).encode(), job_id=batch["job_id"], kind=batch["kind"])
        click.echo(f"Sent batch {batch['job_id']} over {fire_batch} source accounts.")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await worker
    publisher.stop()


def _sample_job(index: int) -> dict[str, Any]:
    if index % 10 == 9:
        return {"job_id": f"dev-{uuid.uuid4().hex[:8]}", "kind": "echo", "payload": {"hello": index}}
    return {
        "job_id": f"dev-{uuid.uuid4().hex[:8]}",
        "kind": "account-scoring",
        "payload": {
            "account_id": f"acct-{index:04d}",
            "employees": 10 + index * 37 % 900,
            "annual_revenue": 250_000 * (1 + index % 17),
            "industry": ("software", "retail", "finance", "health")[index % 4],
        },
    }


def _print_results(subscriber: Any, settings: Any, stop: asyncio.Event) -> None:
    from worker.client import BatchProgress
    from worker.core.messages import Result

    path = subscriber.subscription_path(settings.project, settings.results_subscription)
    batches: dict[str, BatchProgress] = {}

    def show(message: Any) -> None:
        result = json.loads(message.data)
        if result.get("batch"):
            # One line per tenth of a batch, not one per child.
            progress = batches.setdefault(result["batch"]["id"], BatchProgress(result["batch"]["id"]))
            step = max(1, result["batch"]["total"] // 10)
            counted = progress.update(Result.model_validate(result))
            if counted and (progress.finished % step == 0 or progress.done):
                click.echo(f"    batch  {progress.batch_id}  " + json.dumps(progress.as_dict()))
            message.ack()
            return
        colour = {"succeeded": "green", "expired": "yellow"}.get(result["status"], "red")
        answer = result.get("response") if result["status"] == "succeeded" else result.get("error")
        click.echo(
            click.style(f"{result['status']:>9}", fg=colour)
            + f"  {result['job_id']}  {result['kind']}  attempts={result['attempts']}  "
            + json.dumps(answer)[:120]
        )
        message.ack()

    future = subscriber.subscribe(path, show)
    with contextlib.suppress(Exception):  # the stream ends when the emulator stops
        future.result()
