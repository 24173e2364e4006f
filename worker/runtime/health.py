"""`/healthz` and `/readyz`, so Cloud Run can tell a working worker from a stuck one.

They listen on WORKER_HEALTH_PORT, else on $PORT. A Cloud Run service sets PORT and
must listen on it; a worker pool sets no PORT, so its deploy sets WORKER_HEALTH_PORT and
points the probes there. `/readyz` answers 200 once the catalog is loaded and the
clients are built (the startup probe waits on it). `/healthz` answers 503 when the pull
stream is down or stalled (the liveness probe then replaces the instance): the client
library retries a broken stream forever without failing its future, so an instance cut
off from Pub/Sub would otherwise sit idle while looking alive. "Stalled" means Pub/Sub
has not answered for WORKER_HEALTH_STALL_SECONDS; a message arriving counts as an
answer, and so does a cheap `get_subscription` probe run a few times per stall window.
With neither variable set (a laptop) nothing listens and nothing is probed.

With OTEL_METRICS_EXPORTER=prometheus the same port serves `/metrics`, the worker's
metrics as Prometheus text (worker/telemetry/metrics.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from google.api_core import exceptions

from worker.core.errors import ConfigError
from worker.core.settings import Settings
from worker.core.telemetry import Metrics
from worker.gcp.consumer import Lanes

log = structlog.get_logger("worker.runtime.health")

# Probes per stall window: one lost probe must not fail the check on its own.
_PROBES_PER_WINDOW = 3
_MAX_PROBE_INTERVAL_S = 30.0
_MAX_PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Verdict:
    ok: bool
    status: str
    detail: dict[str, Any]


class PubSubProbe:
    """Remembers when Pub/Sub last answered; asks it with `get_subscription` every `interval_s`.

    Any answer from the server counts, a 4xx included: the probe measures whether
    Pub/Sub can be reached, and a worker granted only roles/pubsub.subscriber gets 403
    for `get_subscription` while its stream works. Only an unreachable, timed-out or
    failing (5xx) service leaves `last_answer` where it was.
    """

    def __init__(
        self,
        subscriber: Any,
        subscription: str,
        *,
        interval_s: float,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._subscriber = subscriber
        self._subscription = subscription
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._clock = clock
        self.last_answer = clock()
        self._reachable = True

    async def run(self) -> None:
        """Probe until cancelled."""
        while True:
            error = await asyncio.to_thread(self.probe_once)
            if error is None:
                self.last_answer = self._clock()
                if not self._reachable:
                    log.info("pubsub_reachable_again")
            elif self._reachable:
                log.warning("pubsub_unreachable", error=error)
            self._reachable = error is None
            await asyncio.sleep(self._interval_s)

    def probe_once(self) -> str | None:
        """None if Pub/Sub answered, else why not. Runs on a thread: the call blocks."""
        try:
            self._subscriber.get_subscription(
                subscription=self._subscription, retry=None, timeout=self._timeout_s
            )
        except exceptions.ClientError:
            return None
        except Exception as exc:  # unreachable, deadline, 5xx, closed channel, credentials
            return f"{type(exc).__name__}: {exc}"[:300]
        return None


class Health:
    """The worker's liveness and readiness, computed on each request from live state."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._consumer: Lanes | None = None
        self._probe: PubSubProbe | None = None
        self._failing_reason: str | None = None
        self._status: Callable[[], dict[str, Any]] | None = None

    def watch(
        self,
        consumer: Lanes,
        subscriber: Any,
        stack: AsyncExitStack,
        status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """Start reporting on a built worker; the probe stops when `stack` closes."""
        interval = min(_MAX_PROBE_INTERVAL_S, self._settings.health_stall_s / _PROBES_PER_WINDOW)
        self._probe = PubSubProbe(
            subscriber,
            subscriber.subscription_path(self._settings.project, self._settings.jobs_subscription),
            interval_s=interval,
            timeout_s=min(_MAX_PROBE_TIMEOUT_S, interval),
            clock=self._clock,
        )
        self._consumer = consumer
        self._status = status
        task = asyncio.ensure_future(self._probe.run())
        # Registered after the clients' own callbacks, so it runs first: no probe
        # reports a closed channel as an outage while the worker shuts down.
        stack.callback(task.cancel)

    def readiness(self) -> Verdict:
        if self._consumer is None:
            return Verdict(False, "starting", {})
        # Paused kinds and open breakers are reported, never a reason to be unready: the
        # worker is fine, its targets are not (and other kinds still run).
        protections = self._status() if self._status is not None else {}
        return Verdict(True, "ready", {"subscription": self._settings.jobs_subscription, **protections})

    def liveness(self) -> Verdict:
        consumer, probe = self._consumer, self._probe
        if consumer is None or probe is None:
            return Verdict(False, "starting", {})
        now = self._clock()
        stats = consumer.stats
        silent_s = now - max(probe.last_answer, stats.last_message_at)
        detail = {
            "stream_alive": consumer.stream_alive,
            "pubsub_silent_s": round(silent_s, 1),
            "stall_after_s": self._settings.health_stall_s,
            "received": stats.received,
            "in_flight": consumer.in_flight,
        }
        if not consumer.stream_alive:
            verdict = Verdict(False, "stream_down", detail)
        elif silent_s > self._settings.health_stall_s:
            verdict = Verdict(False, "stalled", detail)
        else:
            verdict = Verdict(True, "ok", detail)
        self._log_change(verdict)
        return verdict

    def _log_change(self, verdict: Verdict) -> None:
        # One line when liveness starts failing (the reason Cloud Run restarts the
        # instance), not one per probe request.
        if verdict.ok:
            self._failing_reason = None
        elif verdict.status != self._failing_reason:
            self._failing_reason = verdict.status
            log.warning("liveness_failing", reason=verdict.status, **verdict.detail)


def _respond(verdict: Verdict) -> web.Response:
    return web.json_response({"status": verdict.status, **verdict.detail}, status=200 if verdict.ok else 503)


async def serve_health(
    settings: Settings, stack: AsyncExitStack, metrics: Metrics | None = None
) -> Health | None:
    """Listen on WORKER_HEALTH_PORT or $PORT (on WORKER_HEALTH_HOST, all interfaces by default,
    as Cloud Run requires); None when neither is set."""
    listen = settings.health_listen_port
    if listen is None:
        return None
    variable, port = listen
    health = Health(settings)

    async def healthz(_: web.Request) -> web.Response:
        return _respond(health.liveness())

    async def readyz(_: web.Request) -> web.Response:
        return _respond(health.readiness())

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if metrics is not None and metrics.prometheus_text() is not None:

        async def prometheus(_: web.Request) -> web.Response:
            text = metrics.prometheus_text() or b""
            return web.Response(body=text, content_type="text/plain", charset="utf-8")

        app.router.add_get("/metrics", prometheus)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    try:
        await web.TCPSite(runner, settings.health_host, port).start()
    except OSError as exc:
        raise ConfigError(
            f"{variable}={port}: cannot listen for health checks on {settings.health_host}: {exc}; "
            f"choose a free port"
        ) from None
    log.info("health_listening", port=port, host=settings.health_host, variable=variable)
    return health
