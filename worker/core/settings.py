"""Typed configuration from the environment.

Every setting has one environment variable (docs/contract.md, "Configuration"). A bad value stops
start-up with a message naming the variable, never a traceback.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlparse

from pydantic import AliasChoices, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.core.errors import ConfigError


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class Settings(BaseSettings):
    """The worker's configuration. Field aliases are the environment variable names."""

    model_config = SettingsConfigDict(
        populate_by_name=True, extra="ignore", env_ignore_empty=True, frozen=True
    )

    project: str = Field(
        validation_alias=AliasChoices("GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT"),
        min_length=1,
    )
    region: str = Field("us-central1", validation_alias=_env("WORKER_REGION"))
    jobs_topic: str = Field("jobs", validation_alias=_env("WORKER_JOBS_TOPIC"))
    jobs_subscription: str = Field("jobs-worker", validation_alias=_env("WORKER_JOBS_SUBSCRIPTION"))
    # The batch lane (worker/core/lanes.py): batch children, and jobs a publisher marks bulk.
    batch_topic: str = Field("jobs-batch", validation_alias=_env("WORKER_BATCH_TOPIC"))
    batch_subscription: str = Field("jobs-batch-worker", validation_alias=_env("WORKER_BATCH_SUBSCRIPTION"))
    results_topic: str = Field("job-results", validation_alias=_env("WORKER_RESULTS_TOPIC"))
    results_subscription: str = Field(
        "job-results-webapp", validation_alias=_env("WORKER_RESULTS_SUBSCRIPTION")
    )
    dead_letter_topic: str = Field("jobs-dead-letter", validation_alias=_env("WORKER_DEAD_LETTER_TOPIC"))
    dead_letter_subscription: str = Field(
        "jobs-dead-letter-ops", validation_alias=_env("WORKER_DEAD_LETTER_SUBSCRIPTION")
    )
    control_topic: str = Field("worker-control", validation_alias=_env("WORKER_CONTROL_TOPIC"))
    # The deployment's max instances: only for printing global limits (per instance x this).
    max_instances: int | None = Field(None, ge=1, le=100_000, validation_alias=_env("WORKER_MAX_INSTANCES"))
    max_hold_s: float = Field(3600.0, gt=0, le=86_400, validation_alias=_env("WORKER_MAX_HOLD_SECONDS"))
    max_held: int = Field(5000, ge=1, le=1_000_000, validation_alias=_env("WORKER_MAX_HELD"))
    max_held_bytes: int = Field(
        256 * 1024 * 1024, ge=1, le=64 * 1024**3, validation_alias=_env("WORKER_MAX_HELD_BYTES")
    )
    max_in_flight: int = Field(100, ge=1, le=10_000, validation_alias=_env("WORKER_MAX_IN_FLIGHT"))
    # In-flight slots the batch lane may never take (default: a tenth of WORKER_MAX_IN_FLIGHT).
    interactive_slots: int | None = Field(
        None, ge=0, le=10_000, validation_alias=_env("WORKER_INTERACTIVE_SLOTS")
    )
    max_delivery_attempts: int | None = Field(
        None, ge=5, le=100, validation_alias=_env("WORKER_MAX_DELIVERY_ATTEMPTS")
    )
    max_payload_bytes: int = Field(
        1_000_000, ge=1, le=9_000_000, validation_alias=_env("WORKER_MAX_PAYLOAD_BYTES")
    )
    shutdown_grace_s: float = Field(
        8.0, ge=0, le=3600, validation_alias=_env("WORKER_SHUTDOWN_GRACE_SECONDS")
    )
    lease_extension_s: int = Field(20, ge=10, le=600, validation_alias=_env("WORKER_LEASE_EXTENSION_SECONDS"))
    resolver_ttl_s: float = Field(600.0, ge=0, validation_alias=_env("WORKER_RESOLVER_TTL_SECONDS"))
    impersonate_service_account: str | None = Field(
        None, validation_alias=_env("WORKER_IMPERSONATE_SERVICE_ACCOUNT")
    )
    run_api_endpoint: str | None = Field(None, validation_alias=_env("WORKER_RUN_API_ENDPOINT"))
    iam_api_endpoint: str | None = Field(None, validation_alias=_env("WORKER_IAM_API_ENDPOINT"))
    # Jobs with a `not_before` wait in this Cloud Tasks queue (worker/gcp/delay.py), in
    # WORKER_REGION; the tasks publish as WORKER_DELAY_SERVICE_ACCOUNT (else the worker's own).
    tasks_api_endpoint: str | None = Field(None, validation_alias=_env("WORKER_TASKS_API_ENDPOINT"))
    delay_queue: str = Field(
        "jobs-delayed", pattern=r"^[A-Za-z0-9-]{1,100}$", validation_alias=_env("WORKER_DELAY_QUEUE")
    )
    delay_service_account: str | None = Field(None, validation_alias=_env("WORKER_DELAY_SERVICE_ACCOUNT"))
    catalog_dir: Path | None = Field(None, validation_alias=_env("WORKER_CATALOG_DIR"))
    log_format: str = Field("auto", validation_alias=_env("WORKER_LOG_FORMAT"))
    log_level: str = Field("info", validation_alias=_env("WORKER_LOG_LEVEL"))
    port: int | None = Field(None, ge=1, le=65535, validation_alias=_env("PORT"))
    # Where /healthz and /readyz listen (health.py): WORKER_HEALTH_PORT if set, else PORT.
    health_port: int | None = Field(None, ge=1, le=65535, validation_alias=_env("WORKER_HEALTH_PORT"))
    health_host: str = Field("0.0.0.0", validation_alias=_env("WORKER_HEALTH_HOST"))
    health_stall_s: float = Field(60.0, gt=0, validation_alias=_env("WORKER_HEALTH_STALL_SECONDS"))
    # On the emulator only: the client library's own transport, as on real Pub/Sub
    # (worker/gcp/emulator.py); tests use it to cover that path.
    emulator_plain_streams: bool = Field(False, validation_alias=_env("WORKER_EMULATOR_PLAIN_STREAMS"))

    @field_validator("impersonate_service_account", "delay_service_account")
    @classmethod
    def _service_account_email(cls, value: str | None) -> str | None:
        if value is not None and ("@" not in value or not value.endswith(".gserviceaccount.com")):
            raise ValueError("must be a service account email such as worker@PROJECT.iam.gserviceaccount.com")
        return value

    @field_validator("run_api_endpoint", "iam_api_endpoint", "tasks_api_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urlparse(value if "://" in value else f"https://{value}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError("must be an endpoint such as https://run.googleapis.com")
        if parsed.scheme == "http" and not is_loopback(parsed.hostname):
            raise ValueError("plain http is only allowed for a loopback address (the local cloud)")
        return value.rstrip("/")

    @field_validator("health_host")
    @classmethod
    def _health_host(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(
                "must be an IP address: 0.0.0.0 (all interfaces, as Cloud Run needs) or 127.0.0.1"
            ) from None
        return value

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        if value not in ("auto", "json", "console"):
            raise ValueError("must be one of auto, json, console")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("must be one of debug, info, warning, error")
        return value.lower()

    @field_validator("interactive_slots")
    @classmethod
    def _interactive_slots(cls, value: int | None, info: ValidationInfo) -> int | None:
        total = info.data.get("max_in_flight")
        if value is not None and total is not None and value >= total:
            raise ValueError(f"must be below WORKER_MAX_IN_FLIGHT ({total}), or the batch lane gets no slot")
        return value

    @property
    def lanes(self) -> tuple[str, ...]:
        """The lanes this deployment runs: both, or only interactive when WORKER_BATCH_TOPIC
        is the jobs topic (one queue for everything, as before lanes)."""
        if self.batch_topic == self.jobs_topic:
            return ("interactive",)
        return ("interactive", "batch")

    def lane_topic(self, lane: str) -> str:
        """The topic a job of `lane` is published to."""
        return self.batch_topic if lane == "batch" else self.jobs_topic

    def lane_subscription(self, lane: str) -> str:
        return self.batch_subscription if lane == "batch" else self.jobs_subscription

    @property
    def health_listen_port(self) -> tuple[str, int] | None:
        """(variable, port) the health endpoints listen on: WORKER_HEALTH_PORT, else PORT, else None."""
        if self.health_port is not None:
            return "WORKER_HEALTH_PORT", self.health_port
        if self.port is not None:
            return "PORT", self.port
        return None

    @property
    def local_run_api(self) -> bool:
        """True when the Admin API is a loopback endpoint: only then may services be http."""
        if not self.run_api_endpoint:
            return False
        host = urlparse(self.run_api_endpoint).hostname or ""
        return is_loopback(host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_ENV_NAMES = {
    name: (field.validation_alias.choices[0] if isinstance(field.validation_alias, AliasChoices) else name)
    for name, field in Settings.model_fields.items()
}


def load_settings(**overrides: object) -> Settings:
    """Read the environment (plus command-line overrides); raise ConfigError naming the variable."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)  # type: ignore[arg-type]  # aliases and names, checked by pydantic
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            var = _ENV_NAMES.get(field, field)
            if err["type"] == "missing":
                problems.append(f"{var} is not set; set it to your Google Cloud project id")
            else:
                value = err.get("input")
                problems.append(f"{var}={value!r} is invalid: {err['msg']}")
        raise ConfigError("; ".join(problems)) from None
