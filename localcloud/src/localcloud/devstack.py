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
import shutil
import signal
import threading
import uuid
from pathlib import Path
from typing import Any

import click

from localcloud.ports import free_port

# Where the reference web app (examples/webapp, `make webapp`) listens for pushes.
DEFAULT_PUSH_ENDPOINT = "http://127.0.0.1:8090/pubsub/results"
DEFAULT_ENV_FILE = ".worker-dev.env"
# Accounts the dev accounts-source serves without --fire-batch, so a `{"source": true}`
# batch from a second shell has children to fan out (with 0 it succeeded with none).
DEFAULT_SOURCE_ACCOUNTS = 25
# A run_job kind of `worker dev`'s own (not in jobs/, which the image ships), on a Cloud
# Run job of the local cloud whose execution takes a while: `enqueue`, `cancel` and
# `replay` of long work can be tried from a second shell.
DEV_RUN_JOB = "rescore"
DEV_RUN_JOB_SECONDS = 30.0
DEV_RUN_JOB_KIND = f"""# Written by `worker dev`: a local Cloud Run job, {DEV_RUN_JOB_SECONDS:g} s a run.
kind = "{DEV_RUN_JOB}"
description = "Re-score every account on a Cloud Run job (worker dev only)"
handler = "run_job"

[run_job]
job = "{DEV_RUN_JOB}"
poll_initial_s = 2
poll_max_s = 5
"""


def _pin_metadata_host() -> int:
    # google-auth reads GCE_METADATA_HOST once, at import: fix it before anything imports it.
    port = free_port()  # ports.py imports no google module
    os.environ["GCE_METADATA_HOST"] = os.environ["GCE_METADATA_IP"] = f"127.0.0.1:{port}"
    return port


def push_service_account(project: str) -> str:
    return f"results-push@{project}.iam.gserviceaccount.com"


def add_dev_services(cloud: Any, fire_batch: int) -> None:
    """The shipped catalog's services; the accounts source serves `fire_batch` accounts
    when a batch is fired, DEFAULT_SOURCE_ACCOUNTS otherwise."""
    cloud.add_service("account-scoring", "account-scoring")
    cloud.add_service("echo", "echo")
    source = cloud.add_service("accounts-source", "accounts-source")
    source.total_accounts = fire_batch or DEFAULT_SOURCE_ACCOUNTS


def write_dev_catalog(directory: Path, source: Path) -> None:
    """The catalog `worker dev` runs: the configured one's kinds, plus DEV_RUN_JOB's. It
    stays after `worker dev` stops, so a second shell whose environment still names it
    hears that the emulator is gone, not that its catalog is."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for kind in sorted(source.glob("*.toml")):
        shutil.copy(kind, directory / kind.name)
    if not (directory / f"{DEV_RUN_JOB}.toml").exists():
        (directory / f"{DEV_RUN_JOB}.toml").write_text(DEV_RUN_JOB_KIND)


def webapp_env(cloud: Any, emulator_host: str, push_endpoint: str) -> dict[str, str]:
    """What the web app needs beside the cloud's environment: the emulator, and the push
    token's audience, account and (the explicit opt-in to local tokens) certificates URL."""
    env = dict(cloud.env, PUBSUB_EMULATOR_HOST=emulator_host)
    if push_endpoint:
        env.update(
            WEBAPP_PUSH_AUDIENCE=push_endpoint,
            WEBAPP_PUSH_SERVICE_ACCOUNT=push_service_account(cloud.project),
            WEBAPP_PUSH_CERTS_URL=cloud.certs_url,
        )
    return env


def write_env_file(path: str, env: dict[str, str]) -> None:
    """`export` lines a shell can source and `python -m examples.webapp --env-file` reads."""
    with open(path, "w") as out:
        out.write("# Written by `worker dev` while it runs; removed when it stops.\n")
        for key, value in sorted(env.items()):
            out.write(f"export {key}={shlex.quote(value)}\n")


def run_dev(
    *,
    sample_jobs: int,
    max_in_flight: int,
    fire_batch: int = 0,
    push_endpoint: str = DEFAULT_PUSH_ENDPOINT,
    env_file: str = DEFAULT_ENV_FILE,
) -> None:
    metadata_port = _pin_metadata_host()
    os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    from localcloud import LocalCloud, PubSubEmulator
    from worker.core.catalog import default_catalog_dir

    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or "local-project"
    # Beside the env file, whose stack alone writes it (worker/cli/dev.py's lock).
    catalog = os.path.abspath(f"{env_file or DEFAULT_ENV_FILE}.jobs")
    with (
        PubSubEmulator(project=project) as emulator,
        LocalCloud(project=project, metadata_port=metadata_port) as cloud,
    ):
        write_dev_catalog(Path(catalog), Path(os.environ.get("WORKER_CATALOG_DIR") or default_catalog_dir()))
        cloud.add_run_job(DEV_RUN_JOB, task_seconds=DEV_RUN_JOB_SECONDS)
        os.environ["WORKER_CATALOG_DIR"] = catalog
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        os.environ.update(cloud.env)
        os.environ["WORKER_MAX_IN_FLIGHT"] = str(max_in_flight)
        add_dev_services(cloud, fire_batch)
        env = dict(webapp_env(cloud, emulator.host, push_endpoint), WORKER_CATALOG_DIR=catalog)
        if env_file:
            write_env_file(env_file, env)
        try:
            _print_environment(env, env_file, push_endpoint)
            asyncio.run(_run(sample_jobs, fire_batch, cloud, push_endpoint))
        finally:
            if env_file:
                with contextlib.suppress(OSError):
                    os.remove(env_file)


def _print_environment(env: dict[str, str], env_file: str, push_endpoint: str) -> None:
    click.secho("Local cloud is up. In a second shell:", bold=True)
    for key, value in sorted(env.items()):
        click.echo(f"  export {key}={shlex.quote(value)}")
    click.echo('  .venv/bin/worker enqueue account-scoring --payload \'{"account_id": "acme"}\' --wait')
    if env_file:
        click.echo(f"(also in {env_file}: `make webapp` starts the reference web app with it)")
    if push_endpoint:
        click.echo(f"Results are pushed, with an OIDC token, to {push_endpoint}.")
    click.echo("Press Ctrl-C to stop.\n")


async def _run(sample_jobs: int, fire_batch: int, cloud: Any = None, push_endpoint: str = "") -> None:
    from worker.core.logs import configure_logging
    from worker.core.settings import load_settings
    from worker.ops.provision import SetupOptions, apply_setup, for_target
    from worker.runtime.app import pubsub_clients, run_worker

    settings = load_settings()
    configure_logging("console", "warning", settings.project)
    publisher, subscriber = pubsub_clients(settings, None)
    for change in apply_setup(publisher, subscriber, settings, for_target(SetupOptions())):
        click.echo(f"{change.action:>9}  {change.resource}")
    deliverer = None
    if cloud is not None and push_endpoint:
        # Pub/Sub push, as the web app on Cloud Run gets it: a pull subscription underneath.
        deliverer = cloud.push_deliverer(
            subscriber,
            subscriber.subscription_path(settings.project, f"{settings.results_subscription}-push"),
            push_endpoint,
            service_account=push_service_account(settings.project),
            topic=publisher.topic_path(settings.project, settings.results_topic),
        ).start()
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
    if deliverer is not None:
        deliverer.stop()
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


class ResultPrinter:
    """One line per result, one per tenth of a batch. The subscriber calls `show` from
    several threads at once: a batch's update and its line are one step under a lock, so
    its progress never prints backwards (`done: true`, then an older `done: false`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: dict[str, Any] = {}

    def show(self, message: Any) -> None:
        from worker.client import BatchProgress
        from worker.core.messages import Result

        result = json.loads(message.data)
        if result.get("batch"):
            batch = result["batch"]
            step = max(1, batch["total"] // 10)
            with self._lock:
                progress = self._batches.setdefault(batch["id"], BatchProgress(batch["id"]))
                counted = progress.update(Result.model_validate(result))
                if counted and (progress.finished % step == 0 or progress.done):
                    click.echo(f"    batch  {progress.batch_id}  " + json.dumps(progress.as_dict()))
            message.ack()
            return
        colour = {"succeeded": "green", "expired": "yellow", "running": "cyan"}.get(result["status"], "red")
        answer = (
            result.get("response") if result["status"] in ("succeeded", "running") else result.get("error")
        )
        # A rejected job may have had no readable id or kind: say so, not "None None".
        job_id, kind = result.get("job_id") or "(no job id)", result.get("kind") or "(no kind)"
        click.echo(
            click.style(f"{result['status']:>9}", fg=colour)
            + f"  {job_id}  {kind}  attempts={result['attempts']}  "
            + json.dumps(answer)[:120]
        )
        message.ack()


def _print_results(subscriber: Any, settings: Any, stop: asyncio.Event) -> None:
    path = subscriber.subscription_path(settings.project, settings.results_subscription)
    future = subscriber.subscribe(path, ResultPrinter().show)
    with contextlib.suppress(Exception):  # the stream ends when the emulator stops
        future.result()
