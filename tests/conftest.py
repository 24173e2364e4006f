"""Test-session wiring for the local cloud.

google-auth reads GCE_METADATA_HOST once, at import, so the metadata port is picked
and the variables set here, before anything imports google.auth. The gcloud config
dir is a fresh temp dir, so no developer's ADC file or account leaks into a test.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

# localcloud loads lazily and ports.py imports no google module, so this is safe
# before GCE_METADATA_HOST is set.
from localcloud.ports import free_port

METADATA_PORT = free_port()
os.environ["GCE_METADATA_HOST"] = f"127.0.0.1:{METADATA_PORT}"
os.environ["GCE_METADATA_IP"] = f"127.0.0.1:{METADATA_PORT}"
os.environ["CLOUDSDK_CONFIG"] = tempfile.mkdtemp(prefix="gcloud-config-")
os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)

import pytest  # noqa: E402

from localcloud import LocalCloud, PubSubEmulator, emulator_answers  # noqa: E402

PROJECT = "local-project"


@dataclass(frozen=True)
class EmulatorHandle:
    """The Pub/Sub emulator a test session uses; `host` is PUBSUB_EMULATOR_HOST."""

    host: str
    project: str


@dataclass
class Names:
    """Fresh topic and subscription names for one test (the emulator keeps state)."""

    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        self.jobs_topic = f"jobs-{self.suffix}"
        self.jobs_subscription = f"jobs-worker-{self.suffix}"
        self.batch_topic = f"jobs-batch-{self.suffix}"
        self.batch_subscription = f"jobs-batch-worker-{self.suffix}"
        self.results_topic = f"job-results-{self.suffix}"
        self.results_subscription = f"job-results-webapp-{self.suffix}"
        self.dead_letter_topic = f"jobs-dead-letter-{self.suffix}"
        self.dead_letter_subscription = f"jobs-dead-letter-ops-{self.suffix}"
        self.control_topic = f"worker-control-{self.suffix}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "WORKER_JOBS_TOPIC": self.jobs_topic,
            "WORKER_JOBS_SUBSCRIPTION": self.jobs_subscription,
            "WORKER_BATCH_TOPIC": self.batch_topic,
            "WORKER_BATCH_SUBSCRIPTION": self.batch_subscription,
            "WORKER_RESULTS_TOPIC": self.results_topic,
            "WORKER_RESULTS_SUBSCRIPTION": self.results_subscription,
            "WORKER_DEAD_LETTER_TOPIC": self.dead_letter_topic,
            "WORKER_DEAD_LETTER_SUBSCRIPTION": self.dead_letter_subscription,
            "WORKER_CONTROL_TOPIC": self.control_topic,
        }


@pytest.fixture(scope="session")
def local_cloud() -> Iterator[LocalCloud]:
    """One local cloud per session, on the metadata port google-auth was pointed at."""
    cloud = LocalCloud(project=PROJECT, metadata_port=METADATA_PORT)
    cloud.start()
    saved = {name: os.environ.get(name) for name in cloud.env}
    os.environ.update(cloud.env)
    try:
        yield cloud
    finally:
        cloud.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def pubsub_emulator() -> Iterator[EmulatorHandle]:
    """The emulator CI started (PUBSUB_EMULATOR_HOST answering), else one started here."""
    existing = os.environ.get("PUBSUB_EMULATOR_HOST")
    if existing and emulator_answers(existing):
        yield EmulatorHandle(host=existing, project=PROJECT)
        return
    emulator = PubSubEmulator(project=PROJECT).start()
    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
    try:
        yield EmulatorHandle(host=emulator.host, project=PROJECT)
    finally:
        emulator.stop()
        if existing is None:
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = existing


@pytest.fixture
def names() -> Names:
    return Names()
