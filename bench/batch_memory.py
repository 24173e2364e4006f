"""Peak RSS of a `worker run` process fanning out a 50,000-account batch, against idle.

    .venv/bin/python bench/batch_memory.py [--accounts 50000] [--page-size 500]

Starts the Pub/Sub emulator and the local cloud, a worker process with a catalog of
its own (batch-scoring paging an accounts-source service), lets it settle, samples
its RSS for a second (idle), publishes one batch job and samples every 20 ms until
the batch job's own result arrives (all children published). The worker consumes
children meanwhile, as it would in production, so the figure includes that work at
the worker's in-flight limit; it does not grow with the batch size if the fan-out
streams, which running with different --accounts shows.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

# google-auth reads GCE_METADATA_HOST once, at import: pin it before anything imports it.
with socket.socket() as _probe:
    _probe.bind(("127.0.0.1", 0))
    METADATA_PORT = int(_probe.getsockname()[1])
os.environ["GCE_METADATA_HOST"] = os.environ["GCE_METADATA_IP"] = f"127.0.0.1:{METADATA_PORT}"
os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
os.environ["CLOUDSDK_CONFIG"] = tempfile.mkdtemp(prefix="gcloud-config-")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil
from google.cloud import pubsub_v1

from localcloud import LocalCloud, PubSubEmulator
from tests.conftest import Names
from tests.e2e.harness import WorkerProcess, provision, publish, worker_env, write_kind

MIB = 1024 * 1024


def sample(process: psutil.Process, stop: threading.Event, every_s: float) -> list[int]:
    samples: list[int] = []
    while not stop.is_set():
        samples.append(process.memory_info().rss)
        time.sleep(every_s)
    return samples


def wait_for_batch_result(env: dict[str, str], batch_id: str, timeout_s: float) -> dict[str, object]:
    """The batch job's result; child results are acked and skipped (the web app's role)."""
    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(env["GOOGLE_CLOUD_PROJECT"], env["WORKER_RESULTS_SUBSCRIPTION"])
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            response = subscriber.pull(subscription=path, max_messages=1000, timeout=10)
            if response.received_messages:
                ack_ids = [m.ack_id for m in response.received_messages]
                subscriber.acknowledge(subscription=path, ack_ids=ack_ids)
            for received in response.received_messages:
                result = json.loads(received.message.data)
                if result["job_id"] == batch_id:
                    return result
    finally:
        subscriber.close()
    raise TimeoutError(f"no result for batch {batch_id} in {timeout_s}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accounts", type=int, default=50_000)
    parser.add_argument("--page-size", type=int, default=500)
    args = parser.parse_args()

    with (
        PubSubEmulator(project="local-project") as emulator,
        LocalCloud(project="local-project", metadata_port=METADATA_PORT) as cloud,
    ):
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        os.environ.update(cloud.env)
        scoring = cloud.add_service("scoring-bench", "account-scoring")
        source = cloud.add_service("source-bench", "accounts-source")
        source.total_accounts = args.accounts
        catalog = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
        write_kind(catalog, "account-scoring", scoring.name)
        (catalog / "batch-scoring.toml").write_text(
            f'kind = "batch-scoring"\nhandler = "batch"\nservice = "{source.name}"\n'
            f'[batch]\nchild_kind = "account-scoring"\npage_size = {args.page_size}\n'
        )
        env = worker_env(cloud, Names(), WORKER_CATALOG_DIR=str(catalog))
        provision(env)
        with WorkerProcess(env, name="bench-worker") as worker:
            worker.wait_ready()
            process = psutil.Process(worker.proc.pid)
            time.sleep(2)  # let start-up allocations settle
            idle = max(sample_for(process, 1.0))
            stop = threading.Event()
            peak: list[int] = []
            sampler = threading.Thread(target=lambda: peak.extend(sample(process, stop, 0.02)))
            sampler.start()
            started = time.monotonic()
            batch_id = "bench-batch"
            publish(env, [{"job_id": batch_id, "kind": "batch-scoring", "payload": {"source": True}}])
            result = wait_for_batch_result(env, batch_id, timeout_s=600)
            elapsed = time.monotonic() - started
            stop.set()
            sampler.join()
            worker.stop()
    print(f"batch result: {result['status']} {json.dumps(result['response'])}")
    print(f"fan-out of {args.accounts} accounts (page size {args.page_size}) took {elapsed:.1f}s")
    print(
        f"worker RSS idle {idle / MIB:.1f} MiB, peak during fan-out {max(peak) / MIB:.1f} MiB, "
        f"growth {(max(peak) - idle) / MIB:.1f} MiB"
    )


def sample_for(process: psutil.Process, seconds: float) -> list[int]:
    stop = threading.Event()
    threading.Timer(seconds, stop.set).start()
    return sample(process, stop, 0.02)


if __name__ == "__main__":
    main()
