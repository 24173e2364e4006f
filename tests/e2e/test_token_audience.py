"""Jobs cannot redirect the worker's identity: every ID token goes only to its audience.

A `worker run` process with a service-account key file consumes hostile jobs that try
to point the call elsewhere. The local cloud records every request it receives, with a
fingerprint and the audience of the bearer token, so the test can prove where tokens went.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from localcloud.iam import RUN_INVOKER, RUN_VIEWER, member_for

from tests.e2e.harness import (
    WorkerProcess,
    collect_results,
    drain,
    provision,
    publish,
    uid,
    worker_env,
    write_kind,
)

pytestmark = pytest.mark.e2e

KEY_EMAIL = "keyworker@local-project.iam.gserviceaccount.com"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
REDIRECTS: list[tuple[str, Any]] = [
    ("url", "http://127.0.0.1:1/"),
    ("url", "https://evil.example/"),
    ("host", "evil.example"),
    ("headers", {"Host": "evil.example", "Authorization": "Basic c3RvbGVu"}),
    ("path", "/../admin"),
    ("path", "//evil.example/steal"),
    ("path", "@evil.example"),
]
SECRETS = [
    re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\."),  # a JWT (ID token)
    re.compile(r"Bearer "),
    re.compile(r"ya29\."),  # an OAuth access token
    re.compile(r"PRIVATE KEY"),
]


@pytest.fixture
def stack(local_cloud: Any, pubsub_emulator: Any, names: Any, tmp_path: Path) -> dict[str, Any]:
    """Two echo services only the key file's identity may invoke, a catalog with fixed paths."""
    suffix = uid()
    member = member_for(KEY_EMAIL)
    local_cloud.iam.grant(member, RUN_VIEWER, local_cloud.iam.project_resource)
    # No invokers but the key's identity: a call made as anyone else would fail with 403.
    alpha = local_cloud.add_service(f"alpha-{suffix}", "echo", invokers=())
    beta = local_cloud.add_service(f"beta-{suffix}", "echo", invokers=())
    for service in (alpha, beta):
        local_cloud.iam.grant(member, RUN_INVOKER, f"run.service:{service.name}")
    catalog = tmp_path / "jobs"
    write_kind(catalog, "alpha", alpha.name, path="/v1/run", attempts=2, backoff_initial_s=0.05)
    write_kind(catalog, "beta", beta.name, path="/hooks/beta", attempts=2, backoff_initial_s=0.05)
    key = local_cloud.create_service_account_key(tmp_path / "key.json", KEY_EMAIL)
    env = worker_env(
        local_cloud,
        names,
        WORKER_CATALOG_DIR=str(catalog),
        GOOGLE_APPLICATION_CREDENTIALS=str(key),
        WORKER_LOG_LEVEL="debug",
    )
    provision(env)
    return {"env": env, "cloud": local_cloud, "alpha": alpha, "beta": beta, "catalog": catalog}


def hostile_top_level_jobs() -> list[dict[str, Any]]:
    """Jobs whose envelope itself tries to steer the call: each must be rejected."""
    jobs: list[dict[str, Any]] = [
        {"job_id": f"top-{i}", "kind": "alpha", "payload": {}, field: value}
        for i, (field, value) in enumerate(REDIRECTS)
    ]
    jobs += [
        {"job_id": "crlf\r\nX-Evil: 1", "kind": "alpha", "payload": {}},
        {"job_id": "kind-dots", "kind": "alpha/../beta", "payload": {}},
        {"job_id": "kind-url", "kind": "http://127.0.0.1:1/", "payload": {}},
    ]
    return jobs


def hostile_payload_jobs() -> list[dict[str, Any]]:
    """The same redirects inside the payload: harmless data, sent to the catalog's service."""
    jobs = [
        {"job_id": f"in-payload-{i}", "kind": ("alpha", "beta")[i % 2], "payload": {field: value}}
        for i, (field, value) in enumerate(REDIRECTS)
    ]
    jobs.append(
        {"job_id": "all-in-payload", "kind": "beta", "payload": dict(REDIRECTS), "traceparent": TRACEPARENT}
    )
    return jobs


def test_hostile_jobs_cannot_redirect_a_token(stack: dict[str, Any]) -> None:
    env, cloud, alpha, beta = stack["env"], stack["cloud"], stack["alpha"], stack["beta"]
    started = time.time()
    top, inside = hostile_top_level_jobs(), hostile_payload_jobs()
    normal = [
        {"job_id": f"normal-{i}", "kind": ("alpha", "beta")[i % 2], "payload": {"i": i}} for i in range(6)
    ]
    # A header smuggled in the traceparent: dropped (the job runs in a fresh trace), never sent.
    smuggling = TRACEPARENT + "\r\nHost: evil.example"
    normal.append({"job_id": "tp-crlf", "kind": "beta", "payload": {}, "traceparent": smuggling})
    with WorkerProcess(env) as worker:
        worker.wait_ready()
        publish(env, [*top, *inside, *normal])
        results = collect_results(env, {j["job_id"] for j in [*top, *inside, *normal]})
        dead = drain(env, "WORKER_DEAD_LETTER_SUBSCRIPTION", len(top), timeout=30)
        assert worker.stop() == 0
        logs = worker.logs()

    for job in top:
        result = results[job["job_id"]][0]
        assert result["status"] == "rejected", result
        assert result["error"]["code"] in ("invalid_job", "unknown_kind") and result["error"]["message"]
    assert len(dead) == len(top)
    for message in dead:
        assert all(len(v.encode()) <= 1024 for v in message.attributes.values())

    paths = {alpha.name: "/v1/run", beta.name: "/hooks/beta"}
    services = {"alpha": alpha, "beta": beta}
    for job in [*inside, *normal]:
        result = results[job["job_id"]][0]
        assert result["status"] == "succeeded", result
        service = services[job["kind"]]
        seen = result["response"]
        assert seen["path"] == paths[service.name] and seen["json"] == job["payload"]
        assert seen["headers"]["Host"] == service.url.removeprefix("http://"), seen["headers"]
        assert [r.job_id for r in service.requests].count(job["job_id"]) == 1
    (smuggled,) = [r for r in beta.requests if r.job_id == "tp-crlf"]
    assert smuggled.traceparent is None and "evil" not in json.dumps(smuggled.headers)

    # Nothing of a rejected job reached any service.
    rejected_ids = {job["job_id"] for job in top}
    ours = [r for r in cloud.requests if r.component == "services" and r.at >= started]
    assert not [r for r in ours if r.job_id in rejected_ids]

    # Each token went only to the service whose URL is its audience, at the catalog path.
    services_of_token: dict[str, set[str]] = defaultdict(set)
    for request in ours:
        if request.service not in paths:
            continue
        assert request.path == paths[request.service] and request.method == "POST", request
        assert request.token_sha is not None and request.status == 200, request
        assert request.token_email == KEY_EMAIL, "the key file's identity made the call"
        assert request.token_audience == cloud.service(request.service).url, request
        services_of_token[request.token_sha].add(request.service)
    assert services_of_token and all(len(names) == 1 for names in services_of_token.values())
    ours_tokens = set(services_of_token)
    elsewhere = [r for r in cloud.requests if r.token_sha in ours_tokens and r.service not in paths]
    assert not elsewhere, f"a token was presented to another component: {elsewhere[:3]}"

    # No credential in logs, results or dead letters, although a private key was in play.
    texts = [
        logs,
        json.dumps(results),
        *(m.data.decode("utf-8", "replace") + json.dumps(dict(m.attributes)) for m in dead),
    ]
    for text in texts:
        for secret in SECRETS:
            assert not secret.search(text), f"{secret.pattern} found in {text[:200]!r}"
    assert "job_rejected" in logs and "job_succeeded" in logs, "the scanned logs are the real ones"


def test_an_insecure_service_url_fails_jobs_and_is_never_called(stack: dict[str, Any]) -> None:
    env, cloud = stack["env"], stack["cloud"]
    evil = cloud.add_service(f"evil-{uid()}", "echo", invokers=[member_for(KEY_EMAIL)])
    evil.uri_override = "http://evil.example"
    write_kind(stack["catalog"], "evil", evil.name, attempts=1)
    jobs = [{"job_id": f"evil-{i}", "kind": "evil", "payload": {"i": i}} for i in range(3)]
    minted_before = cloud.id_tokens_minted["http://evil.example"]
    with WorkerProcess(env) as worker:
        worker.wait_ready()
        publish(env, jobs)
        results = collect_results(env, {j["job_id"] for j in jobs})
        dead = drain(env, "WORKER_DEAD_LETTER_SUBSCRIPTION", len(jobs), timeout=30)
        worker.stop()
    for job in jobs:
        result = results[job["job_id"]][0]
        assert result["status"] == "failed" and result["error"]["code"] == "insecure_service_url", result
        assert "http://evil.example" in result["error"]["message"]
    assert {m.attributes["error_code"] for m in dead} == {"insecure_service_url"}
    assert evil.requests == [], "the service behind the refused URL was called"
    assert cloud.id_tokens_minted["http://evil.example"] == minted_before, "a token was minted for it"
