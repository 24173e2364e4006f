"""Helpers for end-to-end tests: real `worker run` processes on the local cloud.

Everything here drives the product the way a user does: publish job messages to the
emulator, start `worker run` as a process, read results and dead letters back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from google.api_core import exceptions
from google.cloud import pubsub_v1

from worker.core.settings import load_settings
from worker.ops.provision import SetupOptions, apply_setup, for_target

REPO = Path(__file__).resolve().parents[2]


def uid() -> str:
    return uuid.uuid4().hex[:8]


def worker_env(local_cloud: Any, names: Any, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(local_cloud.env)
    env.update(names.env)
    env.update(
        {
            "WORKER_LOG_FORMAT": "json",
            "WORKER_SHUTDOWN_GRACE_SECONDS": "5",
            "WORKER_LEASE_EXTENSION_SECONDS": "10",
        }
    )
    env.update(extra)
    return env


def worker_cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The `worker` command as a user runs it, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def provision(env: dict[str, str], **options: Any) -> None:
    """Create the test's topics and subscriptions with `worker setup`'s own code.

    A 10 s ack deadline (the minimum) makes a released job come back quickly; no retry
    policy, as `worker setup` does on the emulator (see SetupOptions.retry_policy)."""
    settings = load_settings(**env)  # the variables' names are the settings' aliases
    opts = for_target(SetupOptions(**{"ack_deadline_s": 10, **options}))
    apply_setup(pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient(), settings, opts)


def write_kind(directory: Path, kind: str, service: str, **fields: Any) -> None:
    """A catalog file for a test: a kind calling a service of the test's own."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f'kind = "{kind}"', f'service = "{service}"']
    for key, value in fields.items():
        lines.append(f"{key} = {json.dumps(value)}")
    (directory / f"{kind}.toml").write_text("\n".join(lines) + "\n")


class WorkerProcess:
    """`worker run` in its own process, logs captured to a file.

    `module` runs another consumer the same way (the benchmark's ceiling and naive
    worker); it must log `consumer_started` when it is pulling."""

    def __init__(self, env: dict[str, str], name: str = "worker", module: str = "worker") -> None:
        self.log_path = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        argv = (
            [sys.executable, "-m", "worker", "run"] if module == "worker" else [sys.executable, "-m", module]
        )
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "consumer_started" in self.logs():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.logs()}")
            time.sleep(0.1)
        raise AssertionError(f"worker not ready in {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.logs().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def publish(env: dict[str, str], jobs: Iterable[dict[str, Any] | bytes]) -> int:
    """Publish jobs (dicts as JSON, bytes as they are) to the test's jobs topic."""
    publisher = pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=500, max_latency=0.01)
    )
    topic = publisher.topic_path(env["GOOGLE_CLOUD_PROJECT"], env["WORKER_JOBS_TOPIC"])
    futures = []
    for job in jobs:
        if isinstance(job, bytes):
            futures.append(publisher.publish(topic, job))
        else:
            futures.append(
                publisher.publish(topic, json.dumps(job).encode(), job_id=str(job.get("job_id", "")))
            )
    for future in futures:
        future.result(timeout=60)
    publisher.stop()
    return len(futures)


def drain(env: dict[str, str], subscription_var: str, until: int, timeout: float = 120) -> list[Any]:
    """Pull (and ack) messages from a subscription until `until` have arrived or time is up."""
    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(env["GOOGLE_CLOUD_PROJECT"], env[subscription_var])
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < until and time.monotonic() < deadline:
        try:
            response = subscriber.pull(subscription=path, max_messages=1000, timeout=5)
        except exceptions.DeadlineExceeded:
            continue
        if not response.received_messages:
            time.sleep(0.2)
            continue
        got.extend(m.message for m in response.received_messages)
        subscriber.acknowledge(subscription=path, ack_ids=[m.ack_id for m in response.received_messages])
    subscriber.close()
    return got


def results_by_job(messages: list[Any]) -> dict[str | None, list[dict[str, Any]]]:
    by_job: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for message in messages:
        result = json.loads(message.data)
        by_job[result["job_id"]].append(result)
    return by_job


def collect_results(
    env: dict[str, str], job_ids: set[str], timeout: float = 120
) -> dict[str | None, list[dict[str, Any]]]:
    """Results for every job id (duplicates kept), or fail naming the missing ones."""
    by_job: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not job_ids <= by_job.keys():
        missing = len(job_ids - by_job.keys())
        for job_id, results in results_by_job(
            drain(env, "WORKER_RESULTS_SUBSCRIPTION", missing, timeout=max(1.0, deadline - time.monotonic()))
        ).items():
            by_job[job_id].extend(results)
    missing_ids = job_ids - by_job.keys()
    assert not missing_ids, f"{len(missing_ids)} jobs have no result, e.g. {sorted(missing_ids)[:5]}"
    return by_job
