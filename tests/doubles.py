"""Test doubles shared by the unit tests: the pipeline's collaborators as small objects
(no Pub/Sub, no HTTP), and the push verifier's signing authorities and envelopes."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from localcloud.authority import TokenAuthority
from localcloud.recording import Recorder

from worker.client.push import CachingRequest, PushVerifier
from worker.core.catalog import Catalog, default_catalog_dir
from worker.core.messages import Result
from worker.core.pipeline import Pipeline
from worker.core.shapes import CallResult, Delivery


class Resolver:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def resolve(self, service: str, region: str) -> str:
        self.calls.append((service, region))
        return f"https://{service}-abc-uc.a.run.app"


class Invoker:
    def __init__(self, outcome: object = None) -> None:
        self.outcome = outcome
        self.calls: list[tuple[str, str, str]] = []

    async def invoke(self, kind, url, job, region="REGION"):  # type: ignore[no-untyped-def]
        self.calls.append((kind.kind, url, job.job_id))
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return CallResult(200, {"echo": job.payload}, 1)


def make(invoker: Invoker | None = None, max_bytes: int = 10_000) -> tuple[Pipeline, Resolver, Invoker]:
    resolver, invoker = Resolver(), invoker or Invoker()
    catalog = Catalog.load(default_catalog_dir())
    return (
        Pipeline(catalog, resolver, invoker, region="europe-west1", max_payload_bytes=max_bytes),
        resolver,
        invoker,
    )


def run(pipeline: Pipeline, body: object, **kw: object):  # type: ignore[no-untyped-def]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return asyncio.run(pipeline.handle(Delivery(data=data, attributes={}, **kw)))  # type: ignore[arg-type]


AUDIENCE = "https://webapp-abc123-uc.a.run.app/pubsub/results"
PUSH_SA = "results-push@acme.iam.gserviceaccount.com"
CERTS_URL = "https://certs.example.test/oauth2/v1/certs"

GOOGLE = TokenAuthority(Recorder(lambda token: (None, None)))
# Another key, with its own kid: what an attacker who is not Google can sign with.
IMPOSTOR = TokenAuthority(Recorder(lambda token: (None, None)))


class CertsTransport:
    """A stand-in google.auth transport Request that serves GOOGLE's certificates."""

    def __init__(self, status: int = 200, max_age: int = 20000) -> None:
        self.status = status
        self.max_age = max_age
        self.calls = 0

    def __call__(self, url: str, method: str = "GET", **_: Any) -> Any:
        self.calls += 1
        return SimpleNamespace(
            status=self.status,
            headers={"Cache-Control": f"public, max-age={self.max_age}"},
            data=GOOGLE.certs_json if self.status == 200 else b"unavailable",
        )


def verifier(transport: Any = None, **options: Any) -> PushVerifier:
    return PushVerifier(
        AUDIENCE,
        PUSH_SA,
        certs_url=CERTS_URL,
        request=CachingRequest(transport or CertsTransport()),
        **options,
    )


VERIFIER = verifier()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "aud": AUDIENCE,
        "azp": "112233445566778899001",
        "email": PUSH_SA,
        "email_verified": True,
        "exp": now + 3600,
        "iat": now,
        "iss": "https://accounts.google.com",
        "sub": "112233445566778899001",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def result(job_id: str | None = "job-1", status: str = "succeeded", **extra: Any) -> Result:
    now = datetime.now(UTC)
    return Result.model_validate(
        {
            "job_id": job_id,
            "kind": "account-scoring",
            "status": status,
            "attempts": 1,
            "response": {"score": 71},
            "started_at": now,
            "finished_at": now,
            "duration_ms": 12,
            **extra,
        }
    )


def envelope(data: bytes, **message: Any) -> bytes:
    body = {
        "message": {
            "data": base64.b64encode(data).decode(),
            "attributes": {"job_id": "job-1", "status": "succeeded"},
            "messageId": "1234567890",
            "publishTime": "2026-12-01T07:00:00.123Z",
            **message,
        },
        "subscription": "projects/acme/subscriptions/job-results-webapp",
        "deliveryAttempt": 1,
    }
    return json.dumps(body).encode()


def bearer(token: str) -> str:
    return f"Bearer {token}"


# A real push token's hour (the verifier refuses a longer life), starting now: it
# outlives any test run of the client tests.
GOOD = bearer(GOOGLE.sign(claims(exp=int(time.time()) + 3600)))
