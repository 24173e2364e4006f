"""Results pushed to the web app by Pub/Sub, each request's OIDC token verified first.

On Cloud Run a web app gets CPU only while it handles a request, so it takes results
from a **push** subscription rather than reading them on a background thread:

    verifier = PushVerifier(
        audience="https://webapp-abc123-uc.a.run.app/pubsub/results",   # --push-auth-token-audience
        service_account="results-push@acme.iam.gserviceaccount.com",    # --push-auth-service-account
    )
    handler = PushHandler(verifier, store)     # store: anything with record(result) -> bool
    app.add_url_rule("/pubsub/results", view_func=flask_view(handler), methods=["POST"])

A request is answered 401 without a valid Google-signed token for the audience, 403
when the token is another principal's, 400 when the body is not a push envelope
holding a result, 204 once the caller's store has the result (or already had it),
and 503 when the signing certificates or the store cannot be reached, so Pub/Sub
delivers it again. Nothing is stored unless the token passed every check.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import structlog
from google.auth import transport
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from worker.core.errors import shorten
from worker.core.messages import Result, supersedes

log = structlog.get_logger("worker.client.push")


def _brief(value: object) -> str:
    """A caller's value or an error in a refusal: its text alone, at most 160 characters."""
    return shorten(value, 160, with_type=False)


GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
# What Google writes in `iss` for the ID tokens Pub/Sub push sends.
GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
MAX_CLOCK_SKEW_S = 300
# A Pub/Sub message is at most 10 MB; base64 makes that 13.4 MB, plus attributes.
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024
# Pub/Sub push takes these as an ack; anything else is a nack, redelivered with backoff.
ACK_STATUSES = frozenset({102, 200, 201, 202, 204})
_MAX_TOKEN_CHARS = 8192
_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")
_CERTS_TTL_DEFAULT_S = 300.0
# Google's ID tokens (Pub/Sub push's included) live one hour: a longer-lived one was not
# minted by Google for a push, whatever else it says.
MAX_TOKEN_LIFETIME_S = 3600
_CERTS_TTL_MAX_S = 86400.0


class PushRefused(Exception):
    """A push request that is not acked: `status` is the HTTP answer, the message says why and what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- certificates --------------------------------------------------------------


class CachingRequest(transport.Request):
    """A google.auth transport Request that keeps successful GET answers while their
    Cache-Control max-age lasts (5 min when none is given, never over a day).

    Google rotates its signing keys about daily and says how long to keep them; without
    a cache every push would fetch the certificates again (id_token's own advice).
    """

    def __init__(self, request: Any = None) -> None:
        if request is None:
            import google.auth.transport.requests

            request = google.auth.transport.requests.Request()
        self._request = request
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Any]] = {}
        self.fetches = 0

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        if method != "GET" or body is not None:
            return self._request(url, method=method, body=body, headers=headers, timeout=timeout, **kwargs)
        with self._lock:
            cached = self._cache.get(url)
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
        response = self._request(url, method="GET", headers=headers, timeout=timeout or 10, **kwargs)
        self.fetches += 1
        if response.status == 200:
            if not _json_object(response.data):
                # Not kept: a garbled answer (a captive portal, a proxy's error page) would
                # otherwise refuse every push as unauthentic until it expired. Raised as the
                # transport's failure, it answers 503 and Pub/Sub retries.
                from google.auth import exceptions as auth_exceptions

                raise auth_exceptions.TransportError(
                    f"{url} answered 200 with no JSON object of certificates"
                )
            with self._lock:
                self._cache[url] = (time.monotonic() + _max_age(response.headers), response)
        return response


def _json_object(data: Any) -> bool:
    try:
        return isinstance(json.loads(data), dict)
    except (TypeError, ValueError):
        return False


def _max_age(headers: Mapping[str, str] | None) -> float:
    control = ""
    for key, value in (headers or {}).items():
        if key.lower() == "cache-control":
            control = value
    if "no-store" in control or "no-cache" in control:
        return 0.0
    match = re.search(r"max-age=(\d+)", control)
    return min(float(match.group(1)), _CERTS_TTL_MAX_S) if match else _CERTS_TTL_DEFAULT_S


# -- the token -----------------------------------------------------------------


@dataclass(frozen=True)
class PushIdentity:
    """Who sent a verified push request."""

    email: str
    subject: str
    expires_at: int


class PushVerifier:
    """Checks a push request's `Authorization: Bearer <ID token>`: Google's signature
    (certificates from `certs_url`, cached), the audience, the issuer, that `email` is
    the push service account and `email_verified` is true, and `exp`/`iat` within
    `clock_skew_s` (at most 300 s).

    `certs_url` is Google's unless set: pointing it at the local cloud's authority
    (WEBAPP_PUSH_CERTS_URL) is how `worker dev` and the tests opt in to local tokens.
    """

    def __init__(
        self,
        audience: str,
        service_account: str,
        *,
        certs_url: str = GOOGLE_CERTS_URL,
        clock_skew_s: int = 10,
        request: Any = None,
    ) -> None:
        if not audience or not audience.strip():
            raise ValueError(
                "push audience is empty: set it to the subscription's --push-auth-token-audience "
                "(the push endpoint URL unless overridden)"
            )
        if "@" not in service_account:
            raise ValueError(
                f"push service account {service_account!r} is not an email: set it to the "
                "subscription's --push-auth-service-account, "
                "e.g. results-push@PROJECT.iam.gserviceaccount.com"
            )
        if not 0 <= clock_skew_s <= MAX_CLOCK_SKEW_S:
            raise ValueError(
                f"clock skew {clock_skew_s} s is outside 0..{MAX_CLOCK_SKEW_S}: a wider window "
                "accepts expired tokens; fix the server's clock instead"
            )
        _check_certs_url(certs_url)
        self.audience = audience
        self.service_account = service_account.lower()
        self.certs_url = certs_url
        self.clock_skew_s = clock_skew_s
        self._request = request if request is not None else CachingRequest()

    def verify(self, authorization: str | None) -> PushIdentity:
        """The sender, or PushRefused(401/403/503) saying why not."""
        token = _bearer(authorization)
        _precheck(token)
        from google.auth import exceptions as auth_exceptions
        from google.oauth2 import id_token

        try:
            claims = id_token.verify_token(
                token,
                self._request,
                audience=self.audience,
                certs_url=self.certs_url,
                clock_skew_in_seconds=self.clock_skew_s,
            )
        except auth_exceptions.TransportError as exc:
            log.warning("push_certs_unavailable", certs_url=self.certs_url, error=str(exc)[:200])
            raise PushRefused(
                503,
                f"cannot fetch the token signing certificates from {self.certs_url} ({exc}); "
                "Pub/Sub retries, check the web app's egress",
            ) from None
        except Exception as exc:  # any token google-auth cannot verify is simply not authentic
            raise PushRefused(
                401,
                f"push token refused: {_brief(exc)}; the subscription must push with "
                f"--push-auth-token-audience={self.audience}",
            ) from None
        if not isinstance(claims, Mapping):
            raise PushRefused(401, "push token refused: its payload is not a JSON object")
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise PushRefused(
                401,
                f"push token refused: issuer {_brief(claims.get('iss'))} is not Google's",
            )
        email = claims.get("email")
        if not isinstance(email, str) or email.lower() != self.service_account:
            raise PushRefused(
                403,
                f"push token is for {_brief(email)}, not the push service account "
                f"{self.service_account}; set --push-auth-service-account={self.service_account} "
                "on the subscription, or configure the verifier with the account it uses",
            )
        if claims.get("email_verified") is not True:
            raise PushRefused(403, f"push token for {email} does not say email_verified: true")
        _check_times(claims, self.clock_skew_s)
        return PushIdentity(email=email, subject=str(claims.get("sub", "")), expires_at=int(claims["exp"]))


def _check_times(claims: Mapping[str, Any], skew_s: float) -> None:
    """What google-auth leaves unchecked: `nbf`, and a lifetime no Google token has."""
    iat, exp, nbf = claims.get("iat"), claims.get("exp"), claims.get("nbf")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (iat, exp)):
        raise PushRefused(401, "push token refused: iat and exp must be numbers")
    if exp - iat > MAX_TOKEN_LIFETIME_S:  # type: ignore[operator]  # numbers, checked above
        raise PushRefused(
            401,
            f"push token refused: it lives {exp - iat:.0f} s, over the {MAX_TOKEN_LIFETIME_S} s "  # type: ignore[operator]
            "of Google's ID tokens",
        )
    if nbf is not None:
        if not isinstance(nbf, int | float) or isinstance(nbf, bool):
            raise PushRefused(401, "push token refused: nbf must be a number")
        if nbf > time.time() + skew_s:
            raise PushRefused(401, "push token refused: not valid yet (nbf in the future)")


def _check_certs_url(url: str) -> None:
    parts = urlsplit(url)
    loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if parts.scheme == "https" or (parts.scheme == "http" and loopback):
        return
    raise ValueError(
        f"certificates URL {url!r} must be https (plain http only on loopback, for the local cloud); "
        f"leave it unset for Google's ({GOOGLE_CERTS_URL})"
    )


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise PushRefused(
            401,
            "no Authorization header: create the push subscription with "
            "--push-auth-service-account so Pub/Sub sends an OIDC token",
        )
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise PushRefused(401, "Authorization is not 'Bearer <token>': only Pub/Sub's OIDC token is accepted")
    return token


def _precheck(token: str) -> None:
    """Refuse what cannot be a Google RS256 JWT before fetching certificates for it."""
    parts = token.split(".")
    if len(token) > _MAX_TOKEN_CHARS or len(parts) != 3 or not all(_B64URL.match(p) for p in parts):
        raise PushRefused(401, "push token refused: not a signed JWT (three base64url parts)")
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        header = None
    if not isinstance(header, dict) or header.get("alg") != "RS256" or not isinstance(header.get("kid"), str):
        raise PushRefused(401, "push token refused: not signed with RS256 by a Google key (alg, kid)")


# -- the envelope --------------------------------------------------------------


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    data: str = Field(min_length=1)
    attributes: dict[str, str] = Field(default_factory=dict)
    message_id: str = Field(validation_alias=AliasChoices("messageId", "message_id"), min_length=1)
    publish_time: datetime | None = Field(None, validation_alias=AliasChoices("publishTime", "publish_time"))


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message: _Message
    subscription: str = ""
    delivery_attempt: int | None = Field(
        None, validation_alias=AliasChoices("deliveryAttempt", "delivery_attempt"), ge=1
    )


@dataclass(frozen=True)
class PushDelivery:
    """One pushed message: the result it carries and Pub/Sub's facts about it."""

    result: Result
    message_id: str
    attributes: dict[str, str] = field(default_factory=dict)
    publish_time: datetime | None = None
    subscription: str = ""
    delivery_attempt: int | None = None


def decode_envelope(body: bytes) -> PushDelivery:
    """A push request body -> PushDelivery, or PushRefused(400/413) saying what is wrong.

    The envelope is {"message": {"data": base64, "attributes", "messageId",
    "publishTime"}, "subscription", "deliveryAttempt"} (deliveryAttempt only with a
    dead-letter policy); `data` must be a result as the worker publishes it."""
    if len(body) > MAX_ENVELOPE_BYTES:
        raise PushRefused(413, f"push body is {len(body)} bytes, over {MAX_ENVELOPE_BYTES}")
    try:
        envelope = _Envelope.model_validate_json(body)
    except (ValidationError, ValueError, RecursionError) as exc:
        raise PushRefused(400, f"not a Pub/Sub push envelope: {_describe(exc)}") from None
    try:
        data = base64.b64decode(envelope.message.data, validate=True)
    except (binascii.Error, ValueError):
        raise PushRefused(
            400, "message.data is not base64: Pub/Sub push sends the message data base64-encoded"
        ) from None
    try:
        result = Result.model_validate_json(data)
    except (ValidationError, ValueError, RecursionError) as exc:
        raise PushRefused(
            400,
            f"message {envelope.message.message_id[:80]!r} is not a worker result: {_describe(exc)}; "
            "only the worker publishes to the results topic",
        ) from None
    return PushDelivery(
        result=result,
        message_id=envelope.message.message_id,
        attributes=envelope.message.attributes,
        publish_time=envelope.message.publish_time,
        subscription=envelope.subscription,
        delivery_attempt=envelope.delivery_attempt,
    )


def _describe(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        errors = exc.errors()[:3]
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors)
    return _brief(exc)


# -- storing, idempotently -----------------------------------------------------


class ResultStore(Protocol):
    """The caller's store of results, keyed by job_id.

    `record` keeps `result` unless the job already has one that `supersedes` says
    wins, atomically (an upsert with a condition), and returns True if it changed
    anything. Pub/Sub pushes a message at least once, and to several instances."""

    def record(self, result: Result) -> bool: ...


class MemoryResultStore:
    """A ResultStore in a dict, for tests and one-instance demos."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.results: dict[str, Result] = {}

    def record(self, result: Result) -> bool:
        assert result.job_id is not None
        with self._lock:
            stored = self.results.get(result.job_id)
            if not supersedes(stored.status if stored else None, result.status):
                return False
            self.results[result.job_id] = result
            return True


@dataclass(frozen=True)
class PushResponse:
    status: int
    body: dict[str, Any] | None = None


class PushHandler:
    """Framework-free push endpoint: `authorize` the header, then `receive` the body."""

    def __init__(self, verifier: PushVerifier, store: ResultStore) -> None:
        self.verifier = verifier
        self.store = store

    def authorize(self, authorization: str | None) -> PushResponse | None:
        """None when the sender is the push service account, else the refusal to send."""
        try:
            self.verifier.verify(authorization)
        except PushRefused as refused:
            log.warning("push_refused", status=refused.status, reason=refused.message[:300])
            return PushResponse(refused.status, {"error": refused.message})
        return None

    def receive(self, body: bytes) -> PushResponse:
        """Decode and store one authorized delivery."""
        try:
            delivery = decode_envelope(body)
        except PushRefused as refused:
            log.warning("push_malformed", status=refused.status, reason=refused.message[:300])
            return PushResponse(refused.status, {"error": refused.message})
        result = delivery.result
        if result.job_id is None:
            # A rejected message that had no id: nothing to key it by; acked, not retried forever.
            log.warning("push_result_without_job_id", message_id=delivery.message_id, status=result.status)
            return PushResponse(204)
        try:
            changed = self.store.record(result)
        except Exception as exc:  # the caller's database: Pub/Sub will deliver again
            log.error("push_store_failed", job_id=result.job_id, error=shorten(exc, 300, with_type=False))
            return PushResponse(
                503,
                {"error": f"storing the result failed: {_brief(exc)}; Pub/Sub retries"},
            )
        log.info(
            "push_result",
            job_id=result.job_id,
            status=result.status,
            stored=changed,
            delivery_attempt=delivery.delivery_attempt,
        )
        return PushResponse(204)

    def handle(self, authorization: str | None, body: bytes) -> PushResponse:
        return self.authorize(authorization) or self.receive(body)
