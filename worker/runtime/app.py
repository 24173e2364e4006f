"""Wiring: settings -> clients -> resolver, identity, invoker -> pipeline -> consumer.

Every Google client is built once here, with its endpoint and credentials passed
explicitly, and handed to the pieces that need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from worker.core.catalog import Catalog, default_catalog_dir
from worker.core.errors import ConfigError
from worker.core.guard import Guard
from worker.core.lanes import BATCH, INTERACTIVE, LaneSlots
from worker.core.pipeline import Pipeline
from worker.core.settings import Settings
from worker.core.telemetry import Telemetry
from worker.gcp import delay, emulator
from worker.gcp.batch import BatchFanOut
from worker.gcp.consumer import Consumer, Lanes, read_max_delivery_attempts
from worker.gcp.control import ControlChannel
from worker.gcp.delay import TaskDeferrer
from worker.gcp.identity import IdentityTokenSource, build_token_source
from worker.gcp.invoker import MAX_IN_PROCESS_RETRY_AFTER_S, Invoker
from worker.gcp.resolver import ServiceResolver
from worker.gcp.results import ResultPublisher
from worker.gcp.runjobs import RunJobs
from worker.runtime import heap
from worker.runtime.gauges import watch_protections
from worker.runtime.health import serve_health
from worker.telemetry import setup_telemetry

# How long the last export of spans and metrics may hold up the exit after the drain.
TELEMETRY_FLUSH_S = 2.0

log = structlog.get_logger("worker")


def load_catalog(settings: Settings) -> Catalog:
    return Catalog.load(settings.catalog_dir or default_catalog_dir())


def access_credentials(settings: Settings) -> Any:
    """OAuth credentials for Google APIs (Admin API, Pub/Sub), as the worker's identity."""
    import google.auth
    from google.auth import impersonated_credentials

    from worker.gcp.identity import CLOUD_PLATFORM

    creds, _ = google.auth.default(scopes=[CLOUD_PLATFORM])
    if settings.impersonate_service_account:
        override = None
        if settings.iam_api_endpoint:
            override = (
                f"{settings.iam_api_endpoint}/v1/projects/-/serviceAccounts/"
                f"{settings.impersonate_service_account}:generateAccessToken"
            )
        creds = impersonated_credentials.Credentials(
            source_credentials=creds,
            target_principal=settings.impersonate_service_account,
            target_scopes=[CLOUD_PLATFORM],
            iam_endpoint_override=override,
        )
    return creds


def run_client(settings: Settings, credentials: Any, kind: str = "ServicesClient") -> Any:
    """A `run_v2` client (ServicesClient, JobsClient, ExecutionsClient) over REST, on
    WORKER_RUN_API_ENDPOINT when set."""
    from google.cloud import run_v2

    options = {"api_endpoint": settings.run_api_endpoint} if settings.run_api_endpoint else None
    return getattr(run_v2, kind)(transport="rest", credentials=credentials, client_options=options)


def tasks_client(settings: Settings, credentials: Any) -> Any:
    """A `tasks_v2.CloudTasksClient` over REST, on WORKER_TASKS_API_ENDPOINT when set."""
    from google.cloud import tasks_v2

    options = {"api_endpoint": settings.tasks_api_endpoint} if settings.tasks_api_endpoint else None
    return tasks_v2.CloudTasksClient(transport="rest", credentials=credentials, client_options=options)


def build_deferrer(settings: Settings, credentials: Any, service_account: str | None) -> TaskDeferrer:
    """Where jobs with a `not_before` wait: a task on WORKER_DELAY_QUEUE publishing to the
    jobs topic's REST endpoint (the emulator's when PUBSUB_EMULATOR_HOST is set)."""
    emulator_host = os.environ.get("PUBSUB_EMULATOR_HOST")
    return TaskDeferrer(
        tasks_client(settings, credentials),
        delay.queue_path(settings.project, settings.region, settings.delay_queue),
        f"projects/{settings.project}/topics/{settings.jobs_topic}",
        lane_topics={
            lane: f"projects/{settings.project}/topics/{settings.lane_topic(lane)}" for lane in settings.lanes
        },
        service_account=settings.delay_service_account or service_account,
        pubsub_endpoint=f"http://{emulator_host}" if emulator_host else delay.GOOGLE_PUBSUB_ENDPOINT,
    )


def pubsub_clients(settings: Settings, credentials: Any) -> tuple[Any, Any]:
    from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # lazy-loaded module

    # With PUBSUB_EMULATOR_HOST set the clients talk to the emulator without credentials.
    emulator_host = os.environ.get("PUBSUB_EMULATOR_HOST")
    kwargs = {} if emulator_host else {"credentials": credentials}
    # Results are batched for up to 10 ms: each batch costs a commit thread and an RPC
    # (on the emulator, its CPU too), so at thousands of results a second 5 ms batches
    # of a few messages cost more than the 5 ms they save.
    publisher = pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=500, max_latency=0.01),
        **kwargs,
    )
    if emulator_host and not settings.emulator_plain_streams:
        # Streams rotated, see worker/gcp/emulator.py.
        return publisher, pubsub_v1.SubscriberClient(transport=emulator.subscriber_transport(emulator_host))
    return publisher, pubsub_v1.SubscriberClient(**kwargs)


@dataclass
class Worker:
    """What the run loop needs of a built worker: the consumer, and what it logs and probes."""

    catalog: Catalog
    tokens: IdentityTokenSource
    consumer: Lanes
    subscriber_client: Any
    telemetry: Telemetry
    guard: Guard
    control: ControlChannel

    def status(self) -> dict[str, Any]:
        return instance_status(self.guard, self.consumer, self.control)


def instance_status(guard: Guard, lanes: Lanes, control: ControlChannel) -> dict[str, Any]:
    """This instance's protections and lanes, for /readyz and `worker status`."""
    return {
        **guard.snapshot(),
        "in_flight": lanes.in_flight,
        "held": lanes.stats.held,
        "lanes": lanes.status(),
        "control": control.state,
        **({"control_error": control.down_reason} if control.down_reason else {}),
    }


def build_telemetry(settings: Settings) -> Telemetry:
    """Traces and metrics as OpenTelemetry's environment variables say (off when unset)."""
    telemetry = setup_telemetry(settings.project, settings.jobs_subscription, settings.jobs_topic)
    if telemetry.metrics.prometheus_text() is not None and settings.port is None:
        telemetry.shutdown(0)
        raise ConfigError(
            "OTEL_METRICS_EXPORTER=prometheus serves /metrics on the health server, which "
            "listens only when PORT is set; set PORT (Cloud Run services set it) or export "
            "with OTEL_METRICS_EXPORTER=gcp_monitoring"
        )
    return telemetry


async def build_worker(settings: Settings, stack: AsyncExitStack, telemetry: Telemetry) -> Worker:
    catalog = load_catalog(settings)
    tokens = build_token_source(settings.impersonate_service_account, settings.iam_api_endpoint)
    credentials = access_credentials(settings)
    resolver = ServiceResolver(
        run_client(settings, credentials),
        settings.project,
        ttl_s=settings.resolver_ttl_s,
        allow_insecure_loopback=settings.local_run_api,
        telemetry=telemetry,
    )
    tokens.telemetry = telemetry
    session = await stack.enter_async_context(
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
        )
    )
    publisher_client, subscriber_client = pubsub_clients(settings, credentials)
    stack.callback(subscriber_client.close)
    subscriptions = {
        lane: subscriber_client.subscription_path(settings.project, settings.lane_subscription(lane))
        for lane in settings.lanes
    }
    max_attempts = {
        lane: settings.max_delivery_attempts
        or await asyncio.to_thread(_subscription_max_attempts, subscriber_client, subscriptions[lane], lane)
        for lane in settings.lanes
    }
    results = ResultPublisher(
        publisher_client,
        publisher_client.topic_path(settings.project, settings.results_topic),
        publisher_client.topic_path(settings.project, settings.dead_letter_topic),
        publisher_client.topic_path(settings.project, settings.jobs_topic),
    )
    guard = Guard(
        catalog, region=settings.region, default_ceiling=settings.max_in_flight, capacity=resolver.capacity
    )
    watch_protections(telemetry.metrics, guard)
    invoker = Invoker(session, tokens, telemetry=telemetry, gate=guard)
    fan_out = BatchFanOut(
        publisher_client,
        publisher_client.topic_path(settings.project, settings.batch_topic),
        invoker,
        resolver,
        region=settings.region,
    )
    run_jobs = RunJobs(
        run_client(settings, credentials, "JobsClient"),
        run_client(settings, credentials, "ExecutionsClient"),
        catalog,
        settings.project,
        region=settings.region,
    )
    pipeline = Pipeline(
        catalog,
        resolver,
        invoker,
        region=settings.region,
        max_payload_bytes=settings.max_payload_bytes,
        batch_handler=fan_out,
        run_job_handler=run_jobs.start,
        telemetry=telemetry,
        deferrer=build_deferrer(settings, credentials, tokens.principal.email),
    )
    slots = LaneSlots(settings.max_in_flight, settings.interactive_slots)
    handle = run_jobs.route(pipeline.handle)
    consumer = Lanes(
        [
            Consumer(
                subscriber_client,
                subscriptions[lane],
                handle,
                results,
                max_in_flight=settings.max_in_flight,
                grace_s=settings.shutdown_grace_s,
                max_delivery_attempts=max_attempts[lane],
                lease_extension_s=settings.lease_extension_s,
                telemetry=telemetry,
                max_hold_s=settings.max_hold_s,
                max_held=settings.max_held,
                longest_run_s=catalog.longest_run_s(MAX_IN_PROCESS_RETRY_AFTER_S),
                max_held_bytes=settings.max_held_bytes,
                lane=lane,
                slots=slots.lane(lane),
                batch_topic=(
                    publisher_client.topic_path(settings.project, settings.batch_topic)
                    if BATCH in settings.lanes
                    else None
                ),
            )
            for lane in settings.lanes
        ]
    )
    control = ControlChannel(
        publisher_client,
        subscriber_client,
        project=settings.project,
        topic=settings.control_topic,
        pauses=guard.pauses,
        status=lambda: instance_status(guard, consumer, control),
        kinds=list(catalog),
    )
    return Worker(catalog, tokens, consumer, subscriber_client, telemetry, guard, control)


def _subscription_max_attempts(subscriber: Any, subscription: str, lane: str = INTERACTIVE) -> int | None:
    from google.api_core import exceptions

    variable = "WORKER_BATCH_SUBSCRIPTION" if lane == BATCH else "WORKER_JOBS_SUBSCRIPTION"
    try:
        return read_max_delivery_attempts(subscriber, subscription)
    except exceptions.NotFound:
        raise ConfigError(
            f"subscription {subscription} ({lane} lane) does not exist; create the topics and "
            f"subscriptions with `worker setup` (or set {variable})"
        ) from None
    except exceptions.PermissionDenied:
        raise ConfigError(
            f"the worker may not read subscription {subscription}; grant it roles/pubsub.viewer "
            "on it, or set WORKER_MAX_DELIVERY_ATTEMPTS (see `worker setup --print-gcloud`)"
        ) from None


async def run_worker(
    settings: Settings,
    stop: asyncio.Event | None = None,
    telemetry: Telemetry | None = None,
    *,
    own_process: bool = False,
) -> None:
    """Run until SIGTERM/SIGINT (or `stop`), drain, flush. Raises ConfigError at start-up.

    `telemetry` defaults to what OpenTelemetry's environment variables configure.
    `own_process` (`worker run`): the process is the worker's alone, so its garbage
    collector is tuned for it once the worker is built (worker/runtime/heap.py)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Not possible off the main thread (worker dev runs it beside the local cloud).
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, _on_signal, stop, sig)
    telemetry = telemetry or build_telemetry(settings)
    async with AsyncExitStack() as stack:
        # Closed last: spans of the drained jobs are exported, for TELEMETRY_FLUSH_S at most.
        stack.push_async_callback(asyncio.to_thread, telemetry.shutdown, TELEMETRY_FLUSH_S)
        # None unless WORKER_HEALTH_PORT or PORT is set
        health = await serve_health(settings, stack, telemetry.metrics)
        worker = await build_worker(settings, stack, telemetry)
        await worker.control.start()
        stack.push_async_callback(worker.control.close)
        if health is not None:
            health.watch(worker.consumer, worker.subscriber_client, stack, status=worker.status)
        log.info(
            "worker_ready",
            identity=worker.tokens.principal.describe(),
            kinds=sorted(worker.catalog),
            subscriptions={lane: settings.lane_subscription(lane) for lane in settings.lanes},
            max_delivery_attempts=worker.consumer.max_delivery_attempts,
            tracing=telemetry.tracing,
            metrics=telemetry.metrics.enabled,
        )
        if own_process:
            heap.settle()
        await worker.consumer.run(stop)


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    log.info("shutdown_requested", signal=sig.name)
    stop.set()
