"""Audience -> ID token, from the worker's own service-account identity.

Cloud Run accepts only an OIDC ID token whose `aud` is the service URL. A service
account can mint one (metadata server, key file, or IAM Credentials
`generateIdToken` when impersonating); user credentials cannot, so they are refused
at start-up with the fix. One credential per audience, reused until google-auth
says it is near expiry, refreshed under a lock (google-auth's refresh is not
thread-safe, and one refresh serves every waiting job).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import google.auth
import google.auth.transport.requests
from google.api_core import exceptions as api_exceptions
from google.auth import credentials as auth_credentials
from google.auth import exceptions as auth_exceptions
from google.auth import jwt
from google.auth.compute_engine import IDTokenCredentials as MetadataIDTokenCredentials
from google.oauth2 import service_account

from worker.core.errors import ConfigError, PermanentJobError, TransientJobError
from worker.core.gcloud_command import gcloud
from worker.core.roles import TOKEN_CREATOR
from worker.core.telemetry import NO_TELEMETRY, Telemetry

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
METADATA_PING_S = 2
_IMPERSONATION_URL_RE = re.compile(r"/serviceAccounts/([^/:]+):generateAccessToken")

# What gcloud's application-default login writes, and how to log in as the worker instead.
ADC_LOGIN = gcloud("auth", "application-default", "login")
ADC_LOGIN_AS_WORKER = gcloud("auth", "application-default", "login", impersonate_service_account="WORKER_SA")

USER_CREDENTIALS_EXPLANATION = (
    f"user credentials ({ADC_LOGIN}) cannot mint the ID token "
    "Cloud Run wants: an OIDC token whose audience is the service URL is only issued to a "
    "service account. Fix: let your account impersonate the worker's service account, then "
    "run with it: "
    + gcloud(
        "iam",
        "service-accounts",
        "add-iam-policy-binding",
        "WORKER_SA",
        member="user:YOU",
        role=TOKEN_CREATOR,
    )
    + f" and set WORKER_IMPERSONATE_SERVICE_ACCOUNT=WORKER_SA (or run {ADC_LOGIN_AS_WORKER})"
)


@dataclass(frozen=True)
class Principal:
    """Which credentials the worker uses, for logs and `worker doctor`."""

    email: str | None
    detail: str

    def describe(self) -> str:
        return f"{self.detail} as {self.email or 'unknown principal'}"


CredentialsFactory = Callable[[str], auth_credentials.Credentials]


class IamIdTokenCredentials(auth_credentials.Credentials):
    """ID tokens for `target` minted by IAM Credentials `generateIdToken`.

    google-auth's own impersonated IDTokenCredentials posts to a fixed
    iamcredentials.googleapis.com URL; the client library takes an endpoint, so the
    same code runs against Google and against the local cloud.
    """

    def __init__(self, client: Any, target: str, audience: str) -> None:
        super().__init__()
        self._client = client
        self._target = target
        self._audience = audience

    def refresh(self, request: Any) -> None:
        try:
            answer = self._client.generate_id_token(
                name=f"projects/-/serviceAccounts/{self._target}",
                audience=self._audience,
                include_email=True,
                timeout=15.0,
            )
        except api_exceptions.Forbidden as exc:  # REST transport: 403 -> Forbidden
            raise auth_exceptions.RefreshError(
                f"not allowed to impersonate {self._target}: the caller needs {TOKEN_CREATOR} "
                f"on it ({exc.message})"
            ) from None
        except api_exceptions.GoogleAPICallError as exc:
            raise auth_exceptions.TransportError(f"IAM Credentials: {exc.message}") from None
        payload = jwt.decode(answer.token, verify=False)
        self.token = answer.token
        self.expiry = _utc_naive(payload["exp"])


def _utc_naive(exp: int) -> datetime:
    # google-auth compares expiry as a naive UTC datetime.
    return datetime.fromtimestamp(exp, UTC).replace(tzinfo=None)


class _Slot:
    __slots__ = ("credentials", "refreshing")

    def __init__(self, credentials: auth_credentials.Credentials) -> None:
        self.credentials = credentials
        # The refresh in flight, in a task of its own: a waiter cancelled mid-refresh
        # neither cancels it nor lets a second, concurrent refresh start (google-auth's
        # refresh is not thread-safe, and its thread would run on regardless).
        self.refreshing: asyncio.Task[None] | None = None


class IdentityTokenSource:
    """Hands out a valid ID token per audience; refreshes at most once at a time."""

    def __init__(self, factory: CredentialsFactory, principal: Principal) -> None:
        self._factory = factory
        self.principal = principal
        self._slots: dict[str, _Slot] = {}
        self._request = google.auth.transport.requests.Request()
        # Set by the worker's assembly: a span and a count per token minted (a cached one costs nothing).
        self.telemetry: Telemetry = NO_TELEMETRY

    async def token(self, audience: str) -> str:
        slot = self._slots.get(audience)
        if slot is None:
            slot = self._slots[audience] = _Slot(self._factory(audience))
        creds = slot.credentials
        if creds.valid:
            return str(creds.token)
        if slot.refreshing is None or slot.refreshing.done():
            slot.refreshing = asyncio.ensure_future(self._traced_refresh(audience, creds))
            slot.refreshing.add_done_callback(_retrieve)
        await asyncio.shield(slot.refreshing)
        return str(creds.token)

    async def _traced_refresh(self, audience: str, creds: auth_credentials.Credentials) -> None:
        with self.telemetry.step("token", **{"worker.token.audience": audience}):
            self.telemetry.metrics.token_refreshed(audience)
            await self._refresh(audience, creds)

    def invalidate(self, audience: str, token: str) -> None:
        """Forget a token the service refused, so the next `token()` mints a fresh one."""
        slot = self._slots.get(audience)
        if slot is not None and slot.credentials.token == token:
            slot.credentials.token = None

    async def _refresh(self, audience: str, creds: auth_credentials.Credentials) -> None:
        try:
            await asyncio.to_thread(creds.refresh, self._request)
        except auth_exceptions.RefreshError as exc:
            text = str(exc)
            if credentials_refused(exc):
                raise PermanentJobError(
                    "token_creator_missing",
                    f"cannot mint an ID token for {audience} as {self.principal.describe()}: {text[:400]}",
                ) from None
            raise TransientJobError(
                "identity_unavailable",
                f"cannot mint an ID token for {audience} as {self.principal.describe()}: {text[:400]}",
            ) from None
        except (auth_exceptions.GoogleAuthError, OSError, ValueError) as exc:
            raise TransientJobError(
                "identity_unavailable",
                f"cannot mint an ID token for {audience} as {self.principal.describe()}: "
                f"{type(exc).__name__}: {str(exc)[:400]}",
            ) from None


def _retrieve(task: asyncio.Task[None]) -> None:
    # Waiters re-raise a failed refresh; retrieved so one nobody awaited is not logged.
    if not task.cancelled():
        task.exception()


def credentials_refused(exc: BaseException) -> bool:
    """True when refreshing credentials failed for lack of a permission (not an outage)."""
    text = str(exc)
    return isinstance(exc, auth_exceptions.RefreshError) and (
        "not allowed to impersonate" in text or "PERMISSION_DENIED" in text
    )


def build_token_source(
    impersonate: str | None = None, iam_endpoint: str | None = None
) -> IdentityTokenSource:
    """Choose the worker's credentials; raise ConfigError with the fix if none can mint ID tokens.

    Order: WORKER_IMPERSONATE_SERVICE_ACCOUNT; GOOGLE_APPLICATION_CREDENTIALS; the
    metadata server; gcloud's application-default file (impersonated form only).
    """
    if impersonate:
        source, _ = _default_credentials()
        return _impersonating(source, impersonate, iam_endpoint, "WORKER_IMPERSONATE_SERVICE_ACCOUNT")
    key_file = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if key_file:
        return _from_file(Path(key_file), "GOOGLE_APPLICATION_CREDENTIALS", iam_endpoint)
    # The metadata server before gcloud's file: on a VM where someone once ran
    # `gcloud auth application-default login`, the VM's service account is the worker.
    # An explicit GCE_METADATA_HOST is the operator saying where the metadata server is.
    if os.environ.get("GCE_METADATA_HOST") or _on_google_compute():
        request = google.auth.transport.requests.Request()
        try:
            base = MetadataIDTokenCredentials(request, "-", use_metadata_identity_endpoint=True)
        except auth_exceptions.TransportError as exc:
            raise ConfigError(f"the metadata server did not answer at start-up: {exc}") from None
        return IdentityTokenSource(
            base.with_target_audience,
            Principal(base.service_account_email, "metadata server"),
        )
    well_known = _gcloud_adc_path()
    if well_known.is_file():
        return _from_file(well_known, "gcloud application-default credentials", iam_endpoint)
    raise ConfigError(
        "no credentials that can mint ID tokens: not on Cloud Run (no metadata server), "
        "GOOGLE_APPLICATION_CREDENTIALS is not set and gcloud has no application-default "
        f"credentials. Fix: on a laptop run {ADC_LOGIN_AS_WORKER}, or set WORKER_IMPERSONATE_SERVICE_ACCOUNT"
    )


def _from_file(path: Path, origin: str, iam_endpoint: str | None) -> IdentityTokenSource:
    try:
        info = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{origin} file {path} cannot be read as JSON: {exc}") from None
    kind = info.get("type") if isinstance(info, dict) else None
    if kind == "service_account":
        try:
            key = service_account.IDTokenCredentials.from_service_account_info(info, target_audience="-")
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"{origin} file {path} is not a valid service account key: {exc}") from None
        return IdentityTokenSource(
            key.with_target_audience,
            Principal(info.get("client_email"), f"service account key {path}"),
        )
    if kind == "impersonated_service_account":
        match = _IMPERSONATION_URL_RE.search(info.get("service_account_impersonation_url", ""))
        if not match or "source_credentials" not in info:
            raise ConfigError(
                f"{origin} file {path} has no service_account_impersonation_url/source_credentials"
            )
        source, _ = google.auth.load_credentials_from_dict(
            info["source_credentials"], scopes=[CLOUD_PLATFORM]
        )
        endpoint = iam_endpoint or _endpoint_of(info["service_account_impersonation_url"])
        return _impersonating(source, match.group(1), endpoint, f"{origin} {path}")
    if kind == "authorized_user":
        raise ConfigError(f"{origin} file {path} holds {USER_CREDENTIALS_EXPLANATION}")
    raise ConfigError(
        f"{origin} file {path} is of type {kind!r}; the worker mints ID tokens from a "
        "service_account key or an impersonated_service_account file"
    )


def _impersonating(
    source: auth_credentials.Credentials, target: str, endpoint: str | None, origin: str
) -> IdentityTokenSource:
    from google.cloud import iam_credentials_v1

    options = {"api_endpoint": endpoint} if endpoint else None
    client = iam_credentials_v1.IAMCredentialsClient(
        transport="rest", credentials=source, client_options=options
    )
    return IdentityTokenSource(
        lambda aud: IamIdTokenCredentials(client, target, aud),
        Principal(target, f"impersonation via IAM Credentials ({origin})"),
    )


def _default_credentials() -> tuple[auth_credentials.Credentials, str | None]:
    try:
        return google.auth.default(scopes=[CLOUD_PLATFORM])
    except auth_exceptions.DefaultCredentialsError as exc:
        raise ConfigError(
            f"WORKER_IMPERSONATE_SERVICE_ACCOUNT is set but there are no source credentials to "
            f"impersonate with ({exc}); run {ADC_LOGIN}"
        ) from None


def _on_google_compute() -> bool:
    """Is a metadata server there (Cloud Run, GCE, GKE)? Asked of it directly, not
    through `google.auth.default()`, which would answer with gcloud's file first."""
    from google.auth.compute_engine import _metadata  # google.auth.default's own probe

    request = google.auth.transport.requests.Request()
    # One short try: off Google Cloud this costs start-up at most METADATA_PING_S.
    if _metadata.ping(request, timeout=METADATA_PING_S, retry_count=1):
        return True
    return bool(_metadata.detect_gce_residency_linux())


def _gcloud_adc_path() -> Path:
    config = os.environ.get("CLOUDSDK_CONFIG") or str(Path.home() / ".config" / "gcloud")
    return Path(config) / "application_default_credentials.json"


def _endpoint_of(url: str) -> str:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    return f"{parsed.scheme}://{parsed.netloc}"
