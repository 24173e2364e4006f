"""What the local cloud saw: every request, and the counters tests and benchmarks assert on.

Everything here is written from the cloud's event-loop thread and read from test
threads, so every access goes through one lock and reads return copies.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

# Status recorded when the client went away before an answer (nginx's convention).
CLIENT_CLOSED = 499

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Observed(Protocol):
    """What the middleware tells a service about its requests (services.LocalService)."""

    name: str

    def note_request(self, entry: RecordedRequest) -> None: ...

    def note_answer(self, status: int) -> None: ...


def token_fingerprint(token: str) -> str:
    """A short, stable name for a token that is safe to log and compare."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def bearer_token(request: web.Request) -> str | None:
    """The bearer token Cloud Run would read: X-Serverless-Authorization wins over Authorization."""
    for header in ("X-Serverless-Authorization", "Authorization"):
        value = request.headers.get(header, "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


@dataclass
class RecordedRequest:
    """One request any component received. `status` is 0 while it is still being answered."""

    component: str
    method: str
    path: str
    service: str | None
    headers: dict[str, str]
    token_sha: str | None
    token_audience: str | None
    token_email: str | None
    status: int
    job_id: str | None
    at: float = field(default_factory=time.time)

    @property
    def traceparent(self) -> str | None:
        """The W3C `traceparent` the caller sent, so a test can follow one trace end to end."""
        for name, value in self.headers.items():
            if name.lower() == "traceparent":
                return value
        return None


class Recorder:
    """The cloud's ledger: request log and counters, shared by all components."""

    def __init__(self, describe_token: Callable[[str], tuple[str | None, str | None]]) -> None:
        # describe_token(token) -> (unverified audience, principal email), never raises.
        self._describe_token = describe_token
        self._described: dict[str, tuple[str, str | None, str | None]] = {}
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._id_tokens: Counter[str] = Counter()
        self._access_tokens = 0
        self._admin_calls: Counter[tuple[str, str]] = Counter()

    def count_id_token(self, audience: str) -> None:
        with self._lock:
            self._id_tokens[audience] += 1

    def count_access_token(self) -> None:
        with self._lock:
            self._access_tokens += 1

    def count_admin_call(self, method: str, service: str) -> None:
        with self._lock:
            self._admin_calls[(method, service)] += 1

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def id_tokens_minted(self) -> Counter[str]:
        with self._lock:
            return Counter(self._id_tokens)

    @property
    def access_tokens_minted(self) -> int:
        with self._lock:
            return self._access_tokens

    @property
    def admin_api_calls(self) -> Counter[tuple[str, str]]:
        with self._lock:
            return Counter(self._admin_calls)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._id_tokens.clear()
            self._access_tokens = 0
            self._admin_calls.clear()

    def _begin(self, component: str, request: web.Request) -> RecordedRequest:
        headers = dict(request.headers)
        token = bearer_token(request)
        audience = email = sha = None
        if token is not None:
            described = self._described.get(token)
            if described is None:
                # Hashing and decoding the same token per request cost the benchmark
                # driver CPU the worker it measures needs; a token's description is fixed.
                if len(self._described) >= 1024:
                    self._described.clear()
                described = self._described[token] = (token_fingerprint(token), *self._describe_token(token))
            sha, audience, email = described
            for name in ("Authorization", "X-Serverless-Authorization"):
                if name in headers:
                    headers[name] = f"Bearer {sha}"
        return RecordedRequest(
            component=component,
            method=request.method,
            # Decoded, so "@" in a service-account path reads as itself.
            path=request.path + (f"?{request.query_string}" if request.query_string else ""),
            service=request.match_info.get("service"),
            headers=headers,
            token_sha=sha,
            token_audience=audience,
            token_email=email,
            status=0,
            job_id=request.headers.get("X-Job-Id"),
        )

    def middleware(self, component: str, service: Observed | None = None) -> Callable:
        """An aiohttp middleware logging each request of `component` (and of `service`)."""

        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            entry = self._begin(component, request)
            if service is not None:
                entry.service = service.name
            with self._lock:
                self._requests.append(entry)
            if service is not None:
                service.note_request(entry)
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            except asyncio.CancelledError:
                status = CLIENT_CLOSED
                raise
            finally:
                with self._lock:
                    entry.status = status
                if service is not None:
                    service.note_answer(status)

        return record
