"""Local Cloud Run services: each on its own port, checking every request as Cloud Run does.

No or unverifiable bearer -> 401; an ID token whose `aud` is not this service's URL
(an access token, another service's token, a user's OAuth client token) -> 401; a
valid token whose principal lacks roles/run.invoker -> 403; else the fault knobs,
then the function. Signatures are checked by google-auth's own `verify_token`
against the certs the cloud publishes, served here from memory so the event loop
never blocks on HTTP.
"""

from __future__ import annotations

import asyncio
import html
import inspect
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from google.auth import transport
from google.oauth2 import id_token

from localcloud.authority import TokenAuthority
from localcloud.functions import BUILTIN, Function
from localcloud.iam import RUN_INVOKER, IamPolicy, member_for
from localcloud.recording import RecordedRequest, Recorder, bearer_token

_CREDENTIAL_HEADERS = frozenset({"authorization", "x-serverless-authorization"})
_WWW_AUTHENTICATE = 'Bearer error="invalid_token" error_description="The access token could not be verified"'


_VERIFIED_TOKENS = 1024


class LocalService:
    """A Cloud Run service on 127.0.0.1. Its knobs are plain attributes, settable any time."""

    def __init__(self, name: str, function: str | Function, region: str, port: int) -> None:
        if isinstance(function, str) and function not in BUILTIN:
            raise ValueError(f"unknown function {function!r}; built-in: {sorted(BUILTIN)}")
        self.name = name
        self.region = region
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.function: str | Function = function
        self.latency_s: float = 0.0
        self.error_rate: float = 0.0
        self.error_status: int = 503
        self.hang_rate: float = 0.0
        self.hang_s: float = 3600.0
        self.retry_after: float | None = None
        self.uri_override: str | None = None
        self.total_accounts: int = 1000
        # Capacity, as Cloud Run has it: above `capacity` requests at once the service
        # answers 429 ("no available instance"); the Admin API's Service states
        # `max_instance_count` (None: not stated) and `max_instance_request_concurrency`.
        self.capacity: int | None = None
        self.max_instance_count: int | None = None
        self.max_instance_request_concurrency: int = 80
        self.active = 0
        self.peak_active = 0
        self.created_at = time.time()
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._status: Counter[int] = Counter()

    def __repr__(self) -> str:
        return f"LocalService({self.name!r}, url={self.url!r}, function={self.function!r})"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def calls(self) -> int:
        """Requests received, answered or not."""
        with self._lock:
            return len(self._requests)

    @property
    def status_counts(self) -> Counter[int]:
        """Answered requests by status (499: the client went away first)."""
        with self._lock:
            return Counter(self._status)

    def set_capacity(self, instances: int, per_instance: int, *, stated: bool = True) -> None:
        """Hold at most instances x per_instance requests at once; the Service says so if `stated`."""
        self.capacity = instances * per_instance
        if stated:
            self.max_instance_count = instances
            self.max_instance_request_concurrency = per_instance

    def reset_counters(self) -> None:
        with self._lock:
            self._requests.clear()
            self._status.clear()
            self.peak_active = self.active

    def audiences(self) -> list[str]:
        """The `aud` values Cloud Run accepts: the service's URLs, with or without a slash."""
        urls = [self.url] + ([self.uri_override] if self.uri_override else [])
        return [variant for url in urls for variant in (url, url.rstrip("/") + "/")]

    def note_request(self, entry: RecordedRequest) -> None:
        """Called by the request log when a request arrives."""
        with self._lock:
            self._requests.append(entry)

    def note_answer(self, status: int) -> None:
        """Called by the request log once a request is answered."""
        with self._lock:
            self._status[status] += 1


class _CertsResponse(transport.Response):
    def __init__(self, status: int, data: bytes) -> None:
        self._status = status
        self._data = data

    @property
    def status(self) -> int:
        return self._status

    @property
    def headers(self) -> Mapping[str, str]:
        return {"content-type": "application/json"}

    @property
    def data(self) -> bytes:
        return self._data


class CertsRequest(transport.Request):
    """A google-auth transport that knows one document: the cloud's certs."""

    def __init__(self, certs_url: str, certs_json: bytes) -> None:
        self._certs_url = certs_url
        self._certs_json = certs_json

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Any = None,
        timeout: Any = None,
        **kwargs: Any,
    ) -> transport.Response:
        if url == self._certs_url and method == "GET":
            return _CertsResponse(200, self._certs_json)
        return _CertsResponse(404, b"{}")


def _error_page(status: int, title: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        content_type="text/html",
        text=(
            '<html><head>\n<meta http-equiv="content-type" content="text/html;charset=utf-8">\n'
            f"<title>{status} {title}</title>\n</head>\n<body text=#000000 bgcolor=#ffffff>\n"
            f"<h1>Error: {title}</h1>\n<h2>{message}</h2>\n<h2></h2>\n</body></html>\n"
        ),
    )


def _unauthorized(request: web.Request) -> web.Response:
    path = html.escape(request.path)
    response = _error_page(
        401,
        "Unauthorized",
        f"Your client does not have permission to the requested URL <code>{path}</code>.",
    )
    response.headers["WWW-Authenticate"] = _WWW_AUTHENTICATE
    return response


def _forbidden(request: web.Request) -> web.Response:
    path = html.escape(request.path)
    return _error_page(
        403,
        "Forbidden",
        f"Your client does not have permission to get URL <code>{path}</code> from this server.",
    )


def build_service_app(
    service: LocalService,
    authority: TokenAuthority,
    iam: IamPolicy,
    recorder: Recorder,
    certs_url: str,
) -> web.Application:
    """The app answering every path of `service`."""
    certs = CertsRequest(certs_url, authority.certs_json)
    # A worker sends the same token with every call until it expires: its signature is
    # verified once (google-auth, RS256), then only its expiry and audience. The local
    # cloud never rotates or revokes a key, so the verdict cannot change before `exp`;
    # verifying it again per request was a quarter of the benchmark driver's CPU, taken
    # from the worker it measures. Bounded: cleared past _VERIFIED_TOKENS entries.
    verified: dict[tuple[str, tuple[str, ...]], Mapping[str, Any]] = {}

    def caller_email(request: web.Request) -> str | None:
        """The verified principal, or None where Cloud Run would answer 401."""
        token = bearer_token(request)
        if token is None:
            return None
        key = (token, tuple(service.audiences()))
        found = verified.get(key)
        if found is None or time.time() >= float(found.get("exp", 0)):
            try:
                found = id_token.verify_token(token, certs, audience=list(key[1]), certs_url=certs_url)
            except Exception:
                # Any token google-auth cannot verify (garbage, access token, wrong aud,
                # expired, unknown key) is a 401 on Cloud Run.
                return None
            if len(verified) >= _VERIFIED_TOKENS:
                verified.clear()
            verified[key] = found
        claims = found
        email = claims.get("email") or authority.email_for_subject(str(claims.get("sub", "")))
        return str(email) if email else ""

    async def handle(request: web.Request) -> web.Response:
        email = caller_email(request)
        if email is None:
            return _unauthorized(request)
        if not email or not iam.allowed(member_for(email), RUN_INVOKER, f"run.service:{service.name}"):
            return _forbidden(request)
        if service.capacity is not None and service.active >= service.capacity:
            return _error_page(
                429,
                "Too Many Requests",
                "The request was aborted because there was no available instance.",
            )
        service.active += 1
        service.peak_active = max(service.peak_active, service.active)
        try:
            return await _serve(service, request, email)
        finally:
            service.active -= 1

    async def _serve(service: LocalService, request: web.Request, email: str) -> web.Response:
        if service.latency_s > 0:
            await asyncio.sleep(service.latency_s)
        if service.hang_rate > 0 and random.random() < service.hang_rate:
            await asyncio.sleep(service.hang_s)
            # What Cloud Run answers when a request outlives the service's timeout.
            return web.Response(status=504, text="upstream request timeout")
        if service.error_rate > 0 and random.random() < service.error_rate:
            response = web.Response(
                status=service.error_status, text=f"injected error {service.error_status}"
            )
            if service.retry_after is not None:
                response.headers["Retry-After"] = f"{service.retry_after:g}"
            return response
        return await run_function(service, request, email)

    app = web.Application(middlewares=[recorder.middleware("services", service)])
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def run_function(service: LocalService, request: web.Request, email: str) -> web.Response:
    raw = await request.read()
    text = raw.decode("utf-8", errors="replace")
    try:
        payload = json.loads(text) if text else None
    except ValueError:
        payload = None
    info: dict[str, Any] = {
        "method": request.method,
        "path": request.path,
        "query": dict(request.query),
        "headers": {k: v for k, v in request.headers.items() if k.lower() not in _CREDENTIAL_HEADERS},
        "body": text,
        "email": email,
        "service": service.name,
        "total_accounts": service.total_accounts,
    }
    function = BUILTIN[service.function] if isinstance(service.function, str) else service.function
    result = function(payload, info)
    if inspect.isawaitable(result):
        result = await result
    status, body = result
    return web.json_response(body, status=status)
