"""The invoker against a real HTTP server on loopback; the token source is our own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from worker.core.catalog import JobKind
from worker.core.errors import PermanentJobError, TransientJobError
from worker.core.messages import Job
from worker.core.telemetry import NO_TELEMETRY, Metrics
from worker.gcp.invoker import Invoker
from worker.telemetry.tracing import SdkTelemetry


class Tokens:
    def __init__(self) -> None:
        self.serial = 0
        self.invalidated: list[str] = []

    async def token(self, audience: str) -> str:
        return f"tok{self.serial}"

    def invalidate(self, audience: str, token: str) -> None:
        self.invalidated.append(token)
        self.serial += 1


Handler = Callable[[web.Request, int], web.StreamResponse]


def call(
    handler: Handler,
    kind: JobKind | None = None,
    job: Job | None = None,
    telemetry: Any = NO_TELEMETRY,
    gate: Any = None,
) -> tuple[Any, list[web.Request], list[float], Tokens]:
    kind = kind or JobKind(
        kind="k", service="svc", attempts=4, backoff_initial_s=0.01, backoff_max_s=0.05, timeout_s=0.5
    )
    job = job or Job(job_id="job-1", kind="k", payload={"a": 1})
    seen: list[web.Request] = []
    sleeps: list[float] = []
    tokens = Tokens()

    async def main() -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            seen.append(request)
            await request.read()
            return await handler(request, len(seen))  # type: ignore[misc]

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # test-only: the bound port

        async def sleep(s: float) -> None:
            sleeps.append(s)

        try:
            async with aiohttp.ClientSession() as session:
                invoker = Invoker(session, tokens, sleep=sleep, telemetry=telemetry, gate=gate)
                try:
                    return await invoker.invoke(kind, f"http://127.0.0.1:{port}", job, "r1")
                except Exception as exc:
                    return exc
        finally:
            await runner.cleanup()

    return asyncio.run(main()), seen, sleeps, tokens


async def ok(request: web.Request, n: int) -> web.Response:
    return web.json_response({"n": n, "body": await request.json()})


def test_sends_token_job_id_and_idempotency_key() -> None:
    job = Job(
        job_id="job-7", kind="k", payload={"a": 1}, traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    )
    result, seen, _, _ = call(ok, job=job)
    assert (
        result.http_status == 200 and result.response == {"n": 1, "body": {"a": 1}} and result.attempts == 1
    )
    headers = seen[0].headers
    assert headers["Authorization"] == "Bearer tok0"
    assert headers["X-Job-Id"] == headers["Idempotency-Key"] == "job-7"
    assert headers["traceparent"] == job.traceparent


def test_retries_503_then_succeeds() -> None:
    async def flaky(request: web.Request, n: int) -> web.Response:
        return web.Response(status=503) if n < 3 else web.json_response({"ok": True})

    result, seen, sleeps, _ = call(flaky)
    assert result.http_status == 200 and result.attempts == 3 and len(seen) == 3
    assert len(sleeps) == 2 and all(0 <= s <= 0.05 for s in sleeps)


def test_honours_retry_after() -> None:
    async def busy(request: web.Request, n: int) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": "2"}) if n == 1 else web.json_response({})

    result, _, sleeps, _ = call(busy)
    assert result.http_status == 200 and sleeps == [2.0]


def test_a_kind_deferring_on_retry_after_does_not_sleep_past_its_backoff() -> None:
    # Opted in (defer_on_retry_after), a Retry-After beyond backoff_max_s ends the call at
    # once with the server's figure, for the pipeline to put the job off on Cloud Tasks.
    async def busy(request: web.Request, n: int) -> web.Response:
        return web.Response(status=503, headers={"Retry-After": "30"})

    kind = JobKind(kind="k", service="svc", attempts=4, backoff_max_s=10, defer_on_retry_after=True)
    exc, seen, sleeps, _ = call(busy, kind=kind)
    assert isinstance(exc, TransientJobError) and exc.code == "retry_later"
    assert exc.retry_after_s == 30 and exc.http_status == 503 and exc.attempts == 1
    assert len(seen) == 1 and sleeps == []
    # Not opted in, 30 s is still slept through in process.
    _, seen, sleeps, _ = call(busy, kind=JobKind(kind="k", service="svc", attempts=2, backoff_max_s=10))
    assert sleeps == [30.0] and len(seen) == 2


class RecordingGate:
    """A gate that lets every attempt through and notes what the guard would be told."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, int, float | None]] = []
        self._retry = False

    def call(
        self, kind: JobKind, region: str | None = None, job: str | None = None, *, retry: bool = False
    ) -> RecordingGate:
        self._retry = retry
        return self

    async def __aenter__(self) -> RecordingGate:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def answered(self, status: int, retry_after: float | None = None) -> None:
        self.seen.append((self._retry, status, retry_after))


def test_the_gate_learns_the_retry_after_and_which_attempts_are_retries() -> None:
    async def busy(request: web.Request, n: int) -> web.Response:
        if n == 1:
            return web.Response(status=503, headers={"Retry-After": "1"})
        return web.Response(status=503) if n == 2 else web.json_response({})

    gate = RecordingGate()
    result, _, _, _ = call(busy, gate=gate)
    assert result.http_status == 200
    assert gate.seen == [(False, 503, 1.0), (True, 503, None), (True, 200, None)]


def test_gives_up_after_the_attempt_budget_as_transient() -> None:
    async def down(request: web.Request, n: int) -> web.Response:
        return web.Response(status=502, text="bad gateway")

    exc, seen, sleeps, _ = call(down)
    assert isinstance(exc, TransientJobError) and exc.code == "http_502" and exc.attempts == 4
    assert len(seen) == 4
    # Full jitter in a window that doubles from backoff_initial_s (0.01 s) each retry.
    assert len(sleeps) == 3 and all(0 <= s <= w for s, w in zip(sleeps, (0.01, 0.02, 0.04), strict=True))


def test_401_refreshes_the_token_once() -> None:
    async def stale_token(request: web.Request, n: int) -> web.Response:
        return (
            web.Response(status=401)
            if request.headers["Authorization"] == "Bearer tok0"
            else web.json_response({})
        )

    result, seen, _, tokens = call(stale_token)
    assert result.http_status == 200 and tokens.invalidated == ["tok0"] and len(seen) == 2


def test_401_twice_is_permanent_and_explains_the_token() -> None:
    async def deny(request: web.Request, n: int) -> web.Response:
        return web.Response(status=401)

    exc, seen, _, _ = call(deny)
    assert isinstance(exc, PermanentJobError) and exc.code == "unauthenticated"
    assert "ID token" in exc.message and "audience" in exc.message and len(seen) == 2


def test_403_is_permanent_after_one_call_and_names_the_role() -> None:
    async def forbid(request: web.Request, n: int) -> web.Response:
        return web.Response(status=403)

    exc, seen, _, _ = call(forbid)
    assert isinstance(exc, PermanentJobError) and len(seen) == 1
    assert "roles/run.invoker" in exc.message and "--region=r1" in exc.message


@pytest.mark.parametrize("status", [400, 404, 409, 422])
def test_other_4xx_are_permanent(status: int) -> None:
    async def client_error(request: web.Request, n: int) -> web.Response:
        return web.json_response({"error": "no"}, status=status)

    exc, seen, _, _ = call(client_error)
    assert isinstance(exc, PermanentJobError) and exc.http_status == status and len(seen) == 1


def test_a_hang_times_out_and_is_retried() -> None:
    async def hang(request: web.Request, n: int) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    exc, seen, _, _ = call(hang)
    assert isinstance(exc, TransientJobError) and exc.code == "timeout" and len(seen) == 4


def test_each_attempt_is_a_client_span_and_the_function_gets_it_as_parent() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = SdkTelemetry(provider, Metrics(), subscription="s", topic="t")
    sender = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    job = Job(job_id="job-9", kind="k", payload={}, traceparent=sender)

    async def flaky(request: web.Request, n: int) -> web.Response:
        return web.Response(status=503) if n < 3 else web.json_response({"ok": True})

    root = provider.get_tracer("test").start_span("job")
    with trace.use_span(root, end_on_exit=True):
        result, seen, _, _ = call(flaky, job=job, telemetry=telemetry)
    assert result.attempts == 3
    spans = [s for s in exporter.get_finished_spans() if s.name != "job"]
    attempts = [s for s in spans if s.name == "POST"]
    assert [s.name for s in spans] == ["POST"] * 3
    assert all(s.parent is not None and s.parent.span_id == root.context.span_id for s in spans)
    assert [s.attributes.get("http.request.resend_count") for s in attempts] == [None, 1, 2]
    assert [s.attributes["http.response.status_code"] for s in attempts] == [503, 503, 200]
    assert [s.status.status_code for s in attempts] == [StatusCode.ERROR, StatusCode.ERROR, StatusCode.UNSET]
    # Each call carried its own attempt span as parent, never the sender's span.
    for request, span in zip(seen, attempts, strict=True):
        expected = f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-"
        assert request.headers["traceparent"].startswith(expected)


def test_an_attempt_that_never_got_an_answer_records_why() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = SdkTelemetry(provider, Metrics(), subscription="s", topic="t")

    async def hang(request: web.Request, n: int) -> web.Response:
        await asyncio.sleep(2)
        return web.Response()

    kind = JobKind(kind="k", service="svc", attempts=1, timeout_s=0.1)
    result, _, _, _ = call(hang, kind=kind, telemetry=telemetry)
    assert isinstance(result, TransientJobError) and result.code == "timeout"
    (attempt,) = [s for s in exporter.get_finished_spans() if s.name == "POST"]
    assert attempt.attributes["error.type"] == "timeout"
    assert "http.response.status_code" not in attempt.attributes


# -- no secret leaves (issue 24): what a service answers is scrubbed before it is quoted.


@pytest.mark.parametrize(
    "answer",
    [
        "Authorization: Bearer {token}",  # an error page quoting the request's headers
        '{{"headers": {{"authorization": "Bearer {token}"}}}}',
        "db error: postgres://app:hunter2@10.0.0.3/prod",
        '{{"password": "hunter2", "api_key": "AIza' + "x" * 35 + '"}}',
        "x" * 290 + " token=hunter2hunter2",  # a secret across the 300-character cut
    ],
)
def test_a_failed_call_quotes_no_credential_of_the_answer(answer: str) -> None:
    async def leaky(request: web.Request, n: int) -> web.Response:
        token = request.headers["Authorization"].split()[1]
        return web.Response(status=400, text=answer.format(token=token))

    error, _, _, _ = call(leaky)
    assert isinstance(error, PermanentJobError) and error.code == "http_400"
    assert "tok0" not in error.message and "hunter2" not in error.message and "AIza" not in error.message
    assert "[REDACTED]" in error.message or error.message.endswith("...")


def test_a_service_that_echoes_the_token_does_not_put_it_in_the_result() -> None:
    async def echo(request: web.Request, n: int) -> web.Response:
        return web.json_response({"seen": dict(request.headers)})

    result, _, _, _ = call(echo)
    assert result.http_status == 200 and "tok0" not in json.dumps(result.response)
    assert result.response["seen"]["Authorization"] == "Bearer [REDACTED]"
