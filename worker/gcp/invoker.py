"""One authenticated call to a Cloud Run service, with the kind's retry policy.

Which outcomes are retried is decided in one place, `classify`: connection errors,
timeouts and the kind's `retry_on` statuses (429, 500, 502, 503, 504 by default)
are retried with full-jitter exponential backoff, honouring `Retry-After`. A 401
gets one fresh token, then fails with what is wrong about the token; a 403 and any
other 4xx are permanent.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

from worker.core.backoff import Backoff
from worker.core.catalog import JobKind
from worker.core.errors import JobError, PermanentJobError, TransientJobError
from worker.core.gcloud_command import gcloud
from worker.core.logs import REDACTED, scrub
from worker.core.messages import Job, now
from worker.core.roles import RUN_INVOKER
from worker.core.shapes import CallResult
from worker.core.telemetry import NO_STEP, NO_TELEMETRY, Step, Telemetry

USER_AGENT = "cloudrun-job-worker/0.1"
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
# A Retry-After longer than this is not slept through in process: the job is nacked
# and Pub/Sub's backoff takes over.
MAX_IN_PROCESS_RETRY_AFTER_S = 30.0


def _host(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]


class Gate(Protocol):
    """Around each HTTP attempt (worker/core/guard.py): may hold the job, wait, and learn the status."""

    def call(
        self, kind: JobKind, region: str | None = None, job: str | None = None, *, retry: bool = False
    ) -> Any: ...


class _Open:
    """The gate of an invoker without protections: every attempt goes at once."""

    def call(
        self, kind: JobKind, region: str | None = None, job: str | None = None, *, retry: bool = False
    ) -> _Open:
        return self

    async def __aenter__(self) -> _Open:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def answered(self, status: int, retry_after: float | None = None) -> None:
        return None


class TokenSource(Protocol):
    async def token(self, audience: str) -> str: ...

    def invalidate(self, audience: str, token: str) -> None: ...


class CallFailed(TransientJobError):
    """A retryable outcome of one attempt; `retry_after` is the server's hint, if any."""

    def __init__(self, code: str, message: str, *, http_status: int | None, retry_after: float | None):
        super().__init__(code, message, http_status=http_status)
        self.retry_after = retry_after


def classify(status: int, kind: JobKind) -> str:
    """The outcome of an HTTP status for a kind: ok, retry, unauthenticated, forbidden or permanent."""
    if 200 <= status < 300:
        return "ok"
    if status == 401:
        return "unauthenticated"
    if status == 403:
        return "forbidden"
    if status in kind.retry_on:
        return "retry"
    return "permanent"


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, CallFailed)


class wait_retry_after_or_backoff:
    """tenacity wait: the server's Retry-After if it sent one, else full-jitter backoff
    (worker.core.backoff) for this retry, counting the `done` retries already waited
    for outside this tenacity loop."""

    def __init__(self, initial_s: float, max_s: float, done: int = 0) -> None:
        self._backoff = Backoff(initial_s, max_s)
        self._done = done

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, CallFailed) and exc.retry_after is not None:
            return exc.retry_after
        return self._backoff.full_jitter(state.attempt_number + self._done)


class Invoker:
    """Calls `url + kind.path` with an ID token for `url`; retries per the kind's policy."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        tokens: TokenSource,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        telemetry: Telemetry = NO_TELEMETRY,
        gate: Gate | None = None,
    ) -> None:
        self._session = session
        self._tokens = tokens
        self._sleep = sleep
        self._telemetry = telemetry
        self._metrics = telemetry.metrics
        self._gate: Gate = gate or _Open()

    async def invoke(self, kind: JobKind, url: str, job: Job, region: str = "REGION") -> CallResult:
        """Call `url + kind.path` for `job` with an ID token for `url`, under the guard,
        retrying what the kind's `retry_on` and backoff allow; the answer, or a JobError
        saying why there is none (transient: the job goes back to Pub/Sub)."""
        attempts = 0

        async def attempt() -> CallResult:
            nonlocal attempts
            refreshed = False
            while True:
                attempts += 1
                token = await self._tokens.token(url)
                async with self._gate.call(kind, region, job.job_id, retry=attempts > 1) as call:
                    status, body, retry_after = await self._attempt(kind, url, job, token, attempts)
                    call.answered(status, retry_after)
                verdict = classify(status, kind)
                if verdict == "ok":
                    return CallResult(status, body, attempts)
                if verdict == "unauthenticated" and not refreshed:
                    # The token may have been revoked or expired in flight: one fresh one.
                    self._tokens.invalidate(url, token)
                    refreshed = True
                    continue
                raise self._failure(verdict, status, body, retry_after, kind, url, region)

        try:
            try:
                # Nearly every call succeeds first time: set up no retry machinery for it
                # (tenacity's per-call state was ~11% of the worker's CPU in the benchmark).
                return await attempt()
            except CallFailed as failure:
                if kind.attempts == 1:
                    raise
                first = failure
            await self._sleep(
                first.retry_after
                if first.retry_after is not None
                else Backoff(kind.backoff_initial_s, kind.backoff_max_s).full_jitter(1)
            )
            retrying = AsyncRetrying(
                stop=stop_after_attempt(kind.attempts - 1),
                wait=wait_retry_after_or_backoff(kind.backoff_initial_s, kind.backoff_max_s, done=1),
                retry=retry_if_exception(is_retryable),
                sleep=self._sleep,
                reraise=True,
            )
            return await retrying(attempt)
        except JobError as exc:
            exc.attempts = attempts
            raise

    async def _attempt(
        self, kind: JobKind, url: str, job: Job, token: str, attempt: int
    ) -> tuple[int, Any, float | None]:
        """One HTTP call, as a CLIENT span (HTTP semantic conventions) and a latency sample."""
        if not self._telemetry.tracing and not self._metrics.enabled:
            return await self._call(kind, url, job, token, NO_STEP)
        with self._telemetry.step(
            kind.method,
            span_kind="client",
            **{
                "http.request.method": kind.method,
                "url.full": url + kind.path,
                "server.address": _host(url),
                "http.request.resend_count": attempt - 1 or None,
            },
        ) as step:
            started = time.perf_counter() if self._metrics.enabled else 0.0
            status = None
            try:
                status, body, retry_after = await self._call(kind, url, job, token, step)
            except JobError as exc:
                step.fail(exc.code)
                raise
            finally:
                if self._metrics.enabled:
                    self._metrics.call_finished(kind.kind, time.perf_counter() - started, status)
            step.set("http.response.status_code", status)
            if status >= 400:
                step.fail(str(status))
            return status, body, retry_after

    async def _call(
        self, kind: JobKind, url: str, job: Job, token: str, step: Step
    ) -> tuple[int, Any, float | None]:
        headers = {
            "Authorization": f"Bearer {token}",
            "X-Job-Id": job.job_id,
            "Idempotency-Key": job.job_id,
            "User-Agent": USER_AGENT,
        }
        # The function's parent is this attempt's span when tracing; else the sender's.
        traceparent = step.traceparent or job.traceparent
        if traceparent:
            headers["traceparent"] = traceparent
        body = None if kind.method == "GET" else json.dumps(job.payload).encode()
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(
                kind.method,
                url + kind.path,
                data=body,
                headers=headers,
                timeout=_timeout(kind.timeout_s),
                allow_redirects=False,
            ) as response:
                raw = await response.content.read(MAX_RESPONSE_BYTES)
                secret = token.encode()
                if secret and secret in raw:
                    # A service that echoes its request (a debug endpoint, an error page
                    # quoting headers) must not put the worker's ID token on the results topic.
                    raw = raw.replace(secret, REDACTED.encode())
                return response.status, _decode_body(raw, response), _retry_after(response)
        except TimeoutError:
            if not kind.retry_on_timeout:
                raise PermanentJobError(
                    "timeout", f"{kind.service} did not answer within {kind.timeout_s:g}s"
                ) from None
            raise CallFailed(
                "timeout",
                f"{kind.service} did not answer within {kind.timeout_s:g}s",
                http_status=None,
                retry_after=None,
            ) from None
        except aiohttp.ClientError as exc:
            raise CallFailed(
                "connection",
                f"cannot reach {kind.service} at {url}: {type(exc).__name__}: {str(exc)[:200]}",
                http_status=None,
                retry_after=None,
            ) from None

    @staticmethod
    def _failure(
        verdict: str,
        status: int,
        body: Any,
        retry_after: float | None,
        kind: JobKind,
        url: str,
        region: str,
    ) -> JobError:
        detail = _snippet(body)
        if verdict == "retry":
            # Longer than is slept in process (for a kind that puts jobs off on a
            # Retry-After, longer than its backoff): left to redelivery, or to the timer.
            limit = kind.backoff_max_s if kind.defer_on_retry_after else MAX_IN_PROCESS_RETRY_AFTER_S
            if retry_after is not None and retry_after > limit:
                error = TransientJobError(
                    "retry_later",
                    f"{kind.service} answered {status} with Retry-After {retry_after:g}s",
                    http_status=status,
                )
                error.retry_after_s = retry_after
                return error
            return CallFailed(
                f"http_{status}",
                f"{kind.service} answered {status}: {detail}",
                http_status=status,
                retry_after=retry_after,
            )
        if verdict == "unauthenticated":
            return PermanentJobError(
                "unauthenticated",
                f"{kind.service} answered 401 twice: Cloud Run rejected the token. It must be an "
                f"OIDC ID token (not an OAuth access token) whose audience is exactly {url}, "
                "minted for a service account; run `worker doctor "
                f"{kind.service}` to see which part of the chain is wrong",
                http_status=status,
            )
        if verdict == "forbidden":
            return PermanentJobError(
                "forbidden",
                f"{kind.service} answered 403: the worker's service account lacks roles/run.invoker "
                f"on Cloud Run service {kind.service!r}. Fix: "
                + gcloud(
                    "run",
                    "services",
                    "add-iam-policy-binding",
                    kind.service or "SERVICE",
                    region=region,
                    member="serviceAccount:WORKER_SA",
                    role=RUN_INVOKER,
                ),
                http_status=status,
            )
        return PermanentJobError(
            f"http_{status}", f"{kind.service} answered {status}: {detail}", http_status=status
        )


@functools.lru_cache(maxsize=64)
def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    """One (immutable) ClientTimeout per kind's timeout, not one per call."""
    return aiohttp.ClientTimeout(total=seconds)


def _decode_body(raw: bytes, response: aiohttp.ClientResponse) -> Any:
    if not raw:
        return None
    text = raw.decode(response.charset or "utf-8", "replace")
    if "json" in (response.content_type or ""):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - now()).total_seconds())


def _snippet(body: Any) -> str:
    """At most 300 characters of a service's answer for an error message, every credential
    shape scrubbed first (the message reaches results, dead letters and logs)."""
    text = body if isinstance(body, str) else json.dumps(body, default=str)
    text = scrub(text[:4096])  # a window well past the cut: a secret across it is redacted whole
    return text if len(text) <= 300 else text[:297] + "..."
