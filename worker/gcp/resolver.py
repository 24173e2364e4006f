"""Cloud Run service name -> URL, through the Cloud Run Admin API, cached.

Jobs never carry URLs: the catalog names a service, and this asks the Admin API
(`GetService`) for its `uri`. One call per service per TTL however many jobs wait
for it (single flight): the lookup runs in a task of its own, which waiters await
shielded, so a waiter cancelled (its job's shutdown, a timeout) never cancels the
lookup the others wait for. While the Admin API is away the last known URL is used:
a failed refresh keeps it and backs off (`RETRY_BASE_S` doubling up to
`RETRY_MAX_S`, equal jitter); until the next try jobs get the known URL at once, and
that try runs in the background, so no wave of jobs waits out the Admin API's
timeout again during an outage.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from google.api_core import exceptions as api_exceptions

from worker.core.backoff import Backoff
from worker.core.errors import PermanentJobError, TransientJobError, shorten
from worker.core.gcloud_command import grant
from worker.core.guard import Capacity
from worker.core.logs import log
from worker.core.roles import RUN_VIEWER
from worker.core.settings import is_loopback
from worker.core.telemetry import NO_TELEMETRY, Telemetry
from worker.gcp.identity import TOKEN_CREATOR, credentials_refused

_ADMIN_API_TIMEOUT_S = 10.0
RETRY_BASE_S = 1.0
RETRY_MAX_S = 60.0


@dataclass
class _Entry:
    url: str
    fetched_at: float
    capacity: Capacity | None = None
    failures: int = 0  # refreshes failed in a row since it was fetched
    retry_at: float = 0.0  # no refresh before this, after a failed one


def service_capacity(found: Any, name: str) -> Capacity | None:
    """What a run_v2 `Service` says it can hold at once, when it says so.

    Instances: the service-level `scaling.max_instance_count` and the revision
    template's `template.scaling.max_instance_count` both cap them (the smaller one
    that is set wins; `manual_instance_count` in MANUAL scaling mode). Per instance:
    `template.max_instance_request_concurrency`. 0 means "not set" (Cloud Run then
    applies defaults that depend on the CPU), so then no figure is derived.
    """
    scaling = getattr(found, "scaling", None)
    template = getattr(found, "template", None)
    counts: list[tuple[int, str]] = []
    manual = getattr(scaling, "manual_instance_count", 0) if scaling is not None else 0
    mode = getattr(scaling, "scaling_mode", 0) if scaling is not None else 0
    if manual and int(mode) == 2:  # ServiceScaling.ScalingMode.MANUAL
        counts.append((int(manual), "scaling.manual_instance_count"))
    else:
        if scaling is not None and scaling.max_instance_count:
            counts.append((int(scaling.max_instance_count), "scaling.max_instance_count"))
        revision = getattr(template, "scaling", None) if template is not None else None
        if revision is not None and revision.max_instance_count:
            counts.append((int(revision.max_instance_count), "template.scaling.max_instance_count"))
    concurrency = int(getattr(template, "max_instance_request_concurrency", 0) or 0) if template else 0
    if not counts or concurrency <= 0:
        return None
    instances, field = min(counts)
    return Capacity(instances, concurrency, f"Service {name.rsplit('/', 1)[-1]} ({field})")


class ServiceResolver:
    """Resolves services through a `run_v2.ServicesClient` (sync; called in a thread)."""

    def __init__(
        self,
        client: Any,
        project: str,
        *,
        ttl_s: float = 600.0,
        allow_insecure_loopback: bool = False,
        clock: Callable[[], float] = time.monotonic,
        telemetry: Telemetry = NO_TELEMETRY,
    ) -> None:
        self._telemetry = telemetry
        self._client = client
        self._project = project
        self._ttl_s = ttl_s
        self._allow_insecure_loopback = allow_insecure_loopback
        self._clock = clock
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._in_flight: dict[tuple[str, str], asyncio.Task[str]] = {}

    def capacity(self, service: str, region: str) -> Capacity | None:
        """What the service's `Service` said it can hold, as of its last lookup."""
        entry = self._cache.get((service, region))
        return entry.capacity if entry else None

    def name(self, service: str, region: str) -> str:
        return f"projects/{self._project}/locations/{region}/services/{service}"

    async def resolve(self, service: str, region: str) -> str:
        key = (service, region)
        entry = self._cache.get(key)
        if entry is not None:
            now = self._clock()
            if now - entry.fetched_at < self._ttl_s:
                return entry.url
            if entry.failures:
                # The Admin API failed the last refresh: the known URL, at once; the next
                # refresh, once its backoff is over, runs without anyone waiting for it.
                if now >= entry.retry_at:
                    self._lookup(service, region)
                return entry.url
        return await asyncio.shield(self._lookup(service, region))

    def _lookup(self, service: str, region: str) -> asyncio.Task[str]:
        """The refresh in flight for a service, started if there is none."""
        key = (service, region)
        task = self._in_flight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._traced_refresh(service, region))
            self._in_flight[key] = task
            task.add_done_callback(functools.partial(self._landed, key))
        return task

    def _landed(self, key: tuple[str, str], task: asyncio.Task[str]) -> None:
        if self._in_flight.get(key) is task:
            del self._in_flight[key]
        if not task.cancelled():
            task.exception()  # waiters re-raise it; retrieved so an unwaited one is not logged

    async def _traced_refresh(self, service: str, region: str) -> str:
        # A span only for a real lookup: a cache hit costs nothing worth tracing.
        with self._telemetry.step("resolve", **{"worker.service": service, "cloud.region": region}):
            return await self._refresh(service, region)

    async def _refresh(self, service: str, region: str) -> str:
        name = self.name(service, region)
        try:
            found = await asyncio.to_thread(
                self._client.get_service, name=name, retry=None, timeout=_ADMIN_API_TIMEOUT_S
            )
        except api_exceptions.NotFound:
            raise PermanentJobError(
                "service_not_found",
                f"Cloud Run service {service!r} does not exist in project {self._project!r} "
                f"region {region!r} (Admin API 404 for {name}); fix the catalog's service/region "
                "or deploy the service",
            ) from None
        except api_exceptions.Forbidden:  # REST raises Forbidden; gRPC its subclass PermissionDenied
            raise PermanentJobError(
                "permission_denied",
                f"the worker's identity may not read Cloud Run service {service!r}, or it does not "
                f"exist (Admin API 403 for {name}); grant roles/run.viewer on the service: "
                + grant("serviceAccount:WORKER_SA", RUN_VIEWER, name),
            ) from None
        except Exception as exc:  # any outage: API errors, refused connections, auth refresh
            if credentials_refused(exc):
                raise PermanentJobError(
                    "token_creator_missing",
                    f"the worker's credentials were refused while reading {name}: {shorten(exc)}; "
                    f"when impersonating, the caller needs {TOKEN_CREATOR} on the service account",
                ) from None
            stale = self._cache.get((service, region))
            if stale is not None:
                stale.failures += 1
                wait = Backoff(RETRY_BASE_S, RETRY_MAX_S).equal_jitter(stale.failures)
                stale.retry_at = self._clock() + wait
                log.warning(
                    "admin_api_unavailable_using_cached_url",
                    service=service,
                    error=shorten(exc),
                    failures=stale.failures,
                    retry_in_s=round(wait, 1),
                )
                return stale.url
            raise TransientJobError(
                "admin_api_unavailable",
                f"the Cloud Run Admin API did not answer for {name}: {shorten(exc)}",
            ) from None
        url = self._check_url(service, found.uri)
        self._cache[(service, region)] = _Entry(url, self._clock(), service_capacity(found, name))
        return url

    def _check_url(self, service: str, uri: str) -> str:
        parsed = urlparse(uri or "")
        if parsed.scheme == "https" and parsed.hostname:
            return uri.rstrip("/")
        if (
            parsed.scheme == "http"
            and self._allow_insecure_loopback
            and parsed.hostname
            and is_loopback(parsed.hostname)
        ):
            return uri.rstrip("/")
        raise PermanentJobError(
            "insecure_service_url",
            f"the Admin API gave service {service!r} the URL {uri!r}; the worker only sends "
            "ID tokens to https URLs (plain http only to loopback in the local cloud)",
        )
