"""ServiceResolver with a fake Admin API client of our own (no Google client involved)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest
from google.api_core import exceptions as api_exceptions

from worker.core.errors import PermanentJobError, TransientJobError
from worker.gcp.resolver import RETRY_BASE_S, RETRY_MAX_S, ServiceResolver


@dataclass
class Found:
    uri: str


class Client:
    """`get_service` as run_v2.ServicesClient has it: answers `uri`, or raises `error`."""

    def __init__(self, uri: str = "https://svc-abc-uc.a.run.app", delay_s: float = 0.0) -> None:
        self.uri = uri
        self.error: Exception | None = None
        self.delay_s = delay_s
        self.names: list[str] = []
        self._lock = threading.Lock()

    def get_service(self, name: str, retry: object, timeout: float) -> Found:
        with self._lock:
            self.names.append(name)
        if self.delay_s:
            threading.Event().wait(self.delay_s)  # the worker calls this in a thread
        if self.error is not None:
            raise self.error
        return Found(self.uri)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(client: Client, **kw: object) -> tuple[ServiceResolver, Clock]:
    clock = Clock()
    return ServiceResolver(client, "proj", ttl_s=60, clock=clock, **kw), clock  # type: ignore[arg-type]


def resolve(resolver: ServiceResolver, service: str = "svc") -> str:
    return asyncio.run(resolver.resolve(service, "europe-west1"))


def test_a_hundred_concurrent_resolves_make_one_call() -> None:
    client = Client(delay_s=0.2)
    resolver, _ = make(client)

    async def many() -> list[str]:
        return await asyncio.gather(*(resolver.resolve("svc", "europe-west1") for _ in range(100)))

    assert set(asyncio.run(many())) == {"https://svc-abc-uc.a.run.app"}
    assert client.names == ["projects/proj/locations/europe-west1/services/svc"]


def test_a_failed_single_flight_fails_every_waiter_once() -> None:
    client = Client(delay_s=0.1)
    client.error = api_exceptions.ServiceUnavailable("down")
    resolver, _ = make(client)

    async def many() -> list[object]:
        return await asyncio.gather(
            *(resolver.resolve("svc", "europe-west1") for _ in range(20)), return_exceptions=True
        )

    errors = asyncio.run(many())
    assert all(isinstance(e, TransientJobError) for e in errors) and len(client.names) == 1


def test_the_cache_is_used_until_the_ttl_then_refreshed() -> None:
    client = Client()
    resolver, clock = make(client)
    assert resolve(resolver) == "https://svc-abc-uc.a.run.app"
    clock.now += 59
    resolve(resolver)
    assert len(client.names) == 1
    client.uri = "https://svc-new-uc.a.run.app/"
    clock.now += 2
    assert resolve(resolver) == "https://svc-new-uc.a.run.app", "trailing slash dropped"
    assert len(client.names) == 2


@pytest.mark.parametrize(
    "error",
    [
        api_exceptions.ServiceUnavailable("down"),
        api_exceptions.DeadlineExceeded("slow"),
        ConnectionError("refused"),
    ],
)
def test_an_outage_with_a_cached_url_serves_the_stale_url(error: Exception) -> None:
    client = Client()
    resolver, clock = make(client)
    resolve(resolver)
    client.error = error
    clock.now += 3600
    assert resolve(resolver) == "https://svc-abc-uc.a.run.app"
    assert len(client.names) == 2, "the refresh was attempted"


def test_an_outage_without_a_cached_url_is_transient() -> None:
    client = Client()
    client.error = api_exceptions.ServiceUnavailable("Admin API down")
    resolver, _ = make(client)
    with pytest.raises(TransientJobError) as err:
        resolve(resolver)
    assert err.value.code == "admin_api_unavailable" and "svc" in err.value.message


def test_not_found_is_permanent_and_names_the_service() -> None:
    client = Client()
    client.error = api_exceptions.NotFound("no such service")
    resolver, _ = make(client)
    with pytest.raises(PermanentJobError) as err:
        resolve(resolver, "missing-svc")
    assert err.value.code == "service_not_found"
    assert "'missing-svc'" in err.value.message and "europe-west1" in err.value.message


@pytest.mark.parametrize("error", [api_exceptions.Forbidden("no"), api_exceptions.PermissionDenied("no")])
def test_forbidden_is_permanent_and_names_run_viewer(error: Exception) -> None:
    client = Client()
    client.error = error
    resolver, _ = make(client)
    with pytest.raises(PermanentJobError) as err:
        resolve(resolver)
    assert err.value.code == "permission_denied" and "roles/run.viewer" in err.value.message
    # The fix names the binding on that one service, not on the project.
    assert "gcloud run services add-iam-policy-binding" in err.value.message
    assert "projects add-iam-policy-binding" not in err.value.message


@pytest.mark.parametrize(
    "uri",
    [
        "http://evil.example",
        "http://svc-abc-uc.a.run.app",
        "http://10.0.0.1:8080",
        "ftp://svc.example",
        "https://",
        "",
        "svc-abc-uc.a.run.app",
    ],
)
def test_a_non_https_url_is_refused(uri: str) -> None:
    resolver, _ = make(Client(uri), allow_insecure_loopback=True)
    with pytest.raises(PermanentJobError) as err:
        resolve(resolver)
    assert err.value.code == "insecure_service_url"


def test_https_is_accepted() -> None:
    resolver, _ = make(Client("https://svc-abc-uc.a.run.app"))
    assert resolve(resolver) == "https://svc-abc-uc.a.run.app"


@pytest.mark.parametrize("uri", ["http://127.0.0.1:8123", "http://localhost:8123", "http://[::1]:8123"])
def test_http_loopback_only_with_allow_insecure_loopback(uri: str) -> None:
    strict, _ = make(Client(uri))
    with pytest.raises(PermanentJobError) as err:
        resolve(strict)
    assert err.value.code == "insecure_service_url"
    local, _ = make(Client(uri), allow_insecure_loopback=True)
    assert resolve(local) == uri


def test_a_refused_url_is_not_cached() -> None:
    client = Client("http://evil.example")
    resolver, _ = make(client)
    for _ in range(2):
        with pytest.raises(PermanentJobError):
            resolve(resolver)
    assert len(client.names) == 2


def test_cancelling_the_waiter_that_started_a_lookup_cancels_no_one_else() -> None:
    client = Client(delay_s=0.1)
    resolver, _ = make(client)

    async def scenario() -> None:
        leader = asyncio.ensure_future(resolver.resolve("svc", "europe-west1"))
        await asyncio.sleep(0.01)  # the leader started the lookup
        followers = [asyncio.ensure_future(resolver.resolve("svc", "europe-west1")) for _ in range(5)]
        await asyncio.sleep(0.01)
        leader.cancel()
        assert await asyncio.gather(*followers) == ["https://svc-abc-uc.a.run.app"] * 5
        with pytest.raises(asyncio.CancelledError):
            await leader
        # The answer was kept: the next job needs no lookup.
        assert await resolver.resolve("svc", "europe-west1") == "https://svc-abc-uc.a.run.app"

    asyncio.run(scenario())
    assert len(client.names) == 1


def test_a_failed_refresh_keeps_the_known_url_and_backs_off_without_making_jobs_wait() -> None:
    client = Client()
    resolver, clock = make(client)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        assert await resolver.resolve("svc", "r") == "https://svc-abc-uc.a.run.app"
        client.error, client.delay_s = api_exceptions.DeadlineExceeded("Admin API slow"), 0.2
        clock.now += 61  # past the TTL: the first refresh fails, the known URL is used
        assert await resolver.resolve("svc", "r") == "https://svc-abc-uc.a.run.app"
        assert len(client.names) == 2
        # Within the backoff: the known URL at once, no lookup.
        started = loop.time()
        for _ in range(50):
            assert await resolver.resolve("svc", "r") == "https://svc-abc-uc.a.run.app"
        assert len(client.names) == 2 and loop.time() - started < 0.05
        # After it: one lookup in the background; jobs still do not wait for it.
        clock.now += RETRY_BASE_S * 2 + 0.1
        started = loop.time()
        assert await resolver.resolve("svc", "r") == "https://svc-abc-uc.a.run.app"
        assert await resolver.resolve("svc", "r") == "https://svc-abc-uc.a.run.app"
        assert loop.time() - started < 0.05, "a job waited for the Admin API during the outage"
        await until_calls(client, 3)
        # The Admin API is back: the next try (after a longer backoff) takes the new URL.
        client.error, client.delay_s = None, 0.0
        client.uri = "https://svc-new-uc.a.run.app"
        await asyncio.sleep(0.25)  # the failed background lookup lands
        clock.now += RETRY_MAX_S + 1
        await resolver.resolve("svc", "r")
        await until_calls(client, 4)
        await asyncio.sleep(0.01)
        assert await resolver.resolve("svc", "r") == "https://svc-new-uc.a.run.app"
        assert len(client.names) == 4

    asyncio.run(scenario())


async def until_calls(client: Client, n: int) -> None:
    for _ in range(1000):
        if len(client.names) >= n:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{len(client.names)} lookups, not {n}")
