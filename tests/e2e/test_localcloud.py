"""The local cloud against Google's real clients: google-auth, run_v2 REST, IAM Credentials
REST and Pub/Sub, over sockets, with no mocks. Each test asserts status codes and counts."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google.auth.compute_engine
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.auth import impersonated_credentials, jwt
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import Request
from google.cloud import iam_credentials_v1, run_v2
from google.cloud.pubsub_v1 import PublisherClient, SubscriberClient
from google.oauth2 import credentials as user_credentials
from google.oauth2 import id_token, service_account
from localcloud.pubsub import group_members

from localcloud import (
    RUN_VIEWER,
    TOKEN_CREATOR,
    LocalCloud,
    LocalService,
    PubSubEmulator,
    emulator_answers,
    score_account,
)

pytestmark = pytest.mark.e2e

CLOUD_PLATFORM = ["https://www.googleapis.com/auth/cloud-platform"]


def uid() -> str:
    return uuid.uuid4().hex[:8]


def sa(name: str) -> str:
    return f"{name}-{uid()}@local-project.iam.gserviceaccount.com"


@pytest.fixture
def deploy(local_cloud: LocalCloud) -> Iterator[Any]:
    """Deploys services for one test and deletes them afterwards."""
    created: list[str] = []

    def _deploy(prefix: str, function: Any = "echo", **kwargs: Any) -> LocalService:
        service = local_cloud.add_service(f"{prefix}-{uid()}", function, **kwargs)
        created.append(service.name)
        return service

    yield _deploy
    for name in created:
        local_cloud.remove_service(name)


def call(service: LocalService, token: str | None, body: Any = None, **kw: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(service.url + "/", json=body, headers=headers, timeout=10, **kw)


def run_client(cloud: LocalCloud, credentials: Any) -> run_v2.ServicesClient:
    return run_v2.ServicesClient(
        transport="rest",
        credentials=credentials,
        client_options={"api_endpoint": cloud.run_api_endpoint},
    )


def test_service_host_reproduces_the_401_and_403_chain(
    local_cloud: LocalCloud, deploy: Any, tmp_path: Path
) -> None:
    scoring = deploy("scoring", "account-scoring")
    other = deploy("other")
    account = {"account_id": "acct-42", "employees": 250, "industry": "software", "region": "emea"}

    missing = call(scoring, None, account)
    assert missing.status_code == 401
    assert "Bearer" in missing.headers["www-authenticate"]
    assert "Your client does not have permission" in missing.text

    vm = google.auth.compute_engine.Credentials()
    vm.refresh(Request())
    assert call(scoring, vm.token, account).status_code == 401  # an access token

    wrong_aud = id_token.fetch_id_token(Request(), other.url)
    assert call(scoring, wrong_aud, account).status_code == 401

    # What `gcloud auth application-default login` users send: an ID token for the OAuth client.
    user = user_credentials.Credentials.from_authorized_user_file(
        str(local_cloud.create_authorized_user_file(tmp_path / "adc.json"))
    ).with_token_uri(local_cloud.token_uri)
    user.refresh(Request())
    assert user.id_token and jwt.decode(user.id_token, verify=False)["aud"] == user.client_id
    assert call(scoring, user.id_token, account).status_code == 401

    expired = local_cloud.mint_id_token(local_cloud.worker_email, scoring.url, lifetime_s=-60)
    assert call(scoring, expired, account).status_code == 401
    assert call(scoring, "not-a-jwt", account).status_code == 401

    outsider = local_cloud.mint_id_token(sa("outsider"), scoring.url)
    forbidden = call(scoring, outsider, account)
    assert forbidden.status_code == 403
    assert "Your client does not have permission to get URL" in forbidden.text

    right = id_token.fetch_id_token(Request(), scoring.url)
    ok = call(scoring, right, account)
    assert ok.status_code == 200
    assert ok.json() == {"account_id": "acct-42", "score": score_account(account), "model": "local-v1"}
    with_slash = local_cloud.mint_id_token(local_cloud.worker_email, scoring.url + "/")
    assert call(scoring, with_slash, {"account_id": "a"}).status_code == 200
    assert call(scoring, right, {"no": "id"}).status_code == 400

    assert scoring.status_counts == {401: 6, 403: 1, 200: 2, 400: 1}
    assert scoring.calls == 10
    assert other.calls == 0
    granted = [r for r in scoring.requests if r.status == 200]
    assert granted[0].token_email == local_cloud.worker_email
    assert granted[0].token_audience == scoring.url
    assert granted[0].headers["Authorization"] == f"Bearer {granted[0].token_sha}"
    assert right not in json.dumps([r.headers for r in local_cloud.requests])


def test_echo_and_accounts_source_functions(local_cloud: LocalCloud, deploy: Any) -> None:
    echo = deploy("echo")
    source = deploy("source", "accounts-source")
    source.total_accounts = 5
    answer = requests.post(
        echo.url + "/some/path",
        json={"x": 1},
        headers={
            "Authorization": f"Bearer {id_token.fetch_id_token(Request(), echo.url)}",
            "X-Job-Id": "job-1",
        },
        timeout=10,
    )
    assert answer.status_code == 200
    body = answer.json()
    assert (body["method"], body["path"], body["json"]) == ("POST", "/some/path", {"x": 1})
    assert "Authorization" not in body["headers"]
    assert echo.requests[0].job_id == "job-1"

    token = id_token.fetch_id_token(Request(), source.url)
    first = call(source, token, {"page_token": None, "page_size": 3}).json()
    assert first == {
        "account_ids": ["acct-000000", "acct-000001", "acct-000002"],
        "next_page_token": "3",
        "total_size": 5,
    }
    second = call(source, token, {"page_token": first["next_page_token"], "page_size": 3}).json()
    assert second == {"account_ids": ["acct-000003", "acct-000004"], "next_page_token": None, "total_size": 5}
    assert call(source, token, {"page_size": 5000}).status_code == 400


def test_fault_knobs(local_cloud: LocalCloud, deploy: Any) -> None:
    flaky = deploy("flaky")
    token = id_token.fetch_id_token(Request(), flaky.url)
    flaky.error_rate, flaky.error_status, flaky.retry_after = 1.0, 429, 2
    limited = call(flaky, token, {})
    assert (limited.status_code, limited.headers["Retry-After"]) == (429, "2")

    flaky.error_rate, flaky.latency_s = 0.0, 0.3
    started = time.monotonic()
    assert call(flaky, token, {}).status_code == 200
    assert time.monotonic() - started >= 0.3

    flaky.latency_s, flaky.hang_rate = 0.0, 1.0
    with pytest.raises(requests.Timeout):
        requests.post(flaky.url, json={}, headers={"Authorization": f"Bearer {token}"}, timeout=0.5)
    deadline = time.monotonic() + 5
    while flaky.status_counts[499] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flaky.status_counts == {429: 1, 200: 1, 499: 1}

    flaky.hang_rate = 0.0
    assert local_cloud.requests[-1].component == "services"


def test_run_admin_api_through_the_real_client(local_cloud: LocalCloud, deploy: Any, tmp_path: Path) -> None:
    scoring = deploy("scoring", "account-scoring")
    other = deploy("other")
    vm = google.auth.compute_engine.Credentials()
    client = run_client(local_cloud, vm)
    parent = f"projects/{local_cloud.project}/locations/{local_cloud.region}"
    before = local_cloud.admin_api_calls

    service = client.get_service(name=f"{parent}/services/{scoring.name}")
    assert service.uri == scoring.url
    assert list(service.urls) == [scoring.url]
    assert service.name == f"{parent}/services/{scoring.name}"
    assert service.terminal_condition.state == run_v2.Condition.State.CONDITION_SUCCEEDED

    other.uri_override = "https://other-abc123-uc.a.run.app"
    assert client.get_service(name=f"{parent}/services/{other.name}").uri == other.uri_override

    # The worker holds roles/run.viewer per service (as `worker setup` grants it): for
    # a service that does not exist, Cloud Run answers 403, not 404, and it may not list.
    missing = f"{parent}/services/no-such-{uid()}"
    with pytest.raises(api_exceptions.Forbidden):
        client.get_service(name=missing)
    with pytest.raises(api_exceptions.Forbidden):
        list(client.list_services(request={"parent": parent}))
    # Granted on the project, the role reveals which services exist.
    worker = f"serviceAccount:{local_cloud.worker_email}"
    local_cloud.iam.grant(worker, RUN_VIEWER, local_cloud.iam.project_resource)
    try:
        with pytest.raises(api_exceptions.NotFound):
            client.get_service(name=missing)
        with pytest.raises(api_exceptions.NotFound):
            client.get_service(
                name=f"projects/{local_cloud.project}/locations/europe-west1/services/{scoring.name}"
            )
        listed = list(client.list_services(request={"parent": parent, "page_size": 1}))
    finally:
        local_cloud.iam.revoke(worker, RUN_VIEWER, local_cloud.iam.project_resource)
    assert {scoring.name, other.name} <= {s.name.rsplit("/", 1)[1] for s in listed}

    # Over REST, google-api-core maps by HTTP status: 403 is Forbidden, the parent of
    # PermissionDenied (which only gRPC raises), so `except PermissionDenied` misses it.
    nobody = user_credentials.Credentials(token=local_cloud.mint_access_token(sa("nobody")))
    with pytest.raises(api_exceptions.Forbidden) as denied:
        run_client(local_cloud, nobody).get_service(name=f"{parent}/services/{scoring.name}")
    assert not isinstance(denied.value, api_exceptions.PermissionDenied)
    assert "run.services.get" in denied.value.message
    # A key file: google-auth sends a self-signed JWT instead of calling the token endpoint.
    key = local_cloud.create_service_account_key(tmp_path / "key.json", sa("keyed"))
    keyed = service_account.Credentials.from_service_account_file(str(key), scopes=CLOUD_PLATFORM)
    with pytest.raises(api_exceptions.Forbidden):
        run_client(local_cloud, keyed).get_service(name=f"{parent}/services/{scoring.name}")
    local_cloud.iam.grant(
        f"serviceAccount:{keyed.service_account_email}", RUN_VIEWER, f"run.service:{scoring.name}"
    )
    assert (
        run_client(local_cloud, keyed).get_service(name=f"{parent}/services/{scoring.name}").uri
        == scoring.url
    )
    # No token: 401. (The client with AnonymousCredentials never shows it: its session
    # retries a 401 by refreshing, and anonymous credentials raise InvalidOperation.)
    anonymous = requests.get(f"{local_cloud.run_api_endpoint}/v2/{parent}/services/{scoring.name}", timeout=5)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["status"] == "UNAUTHENTICATED"
    with pytest.raises(auth_exceptions.InvalidOperation):
        run_client(local_cloud, AnonymousCredentials()).get_service(name=f"{parent}/services/{scoring.name}")

    calls = local_cloud.admin_api_calls
    assert calls[("GetService", scoring.name)] - before[("GetService", scoring.name)] == 7
    # One call per page listed, plus the one denied before the project-wide grant.
    assert calls[("ListServices", "*")] - before[("ListServices", "*")] == len(listed) + 1


def test_fetch_id_token_with_a_service_account_key_file(
    local_cloud: LocalCloud, deploy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caller = sa("caller")
    echo = deploy("echo", invokers=[f"serviceAccount:{caller}"])
    key = local_cloud.create_service_account_key(tmp_path / "key.json", caller)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    minted = local_cloud.id_tokens_minted[echo.url]

    token = id_token.fetch_id_token(Request(), echo.url)
    claims = id_token.verify_token(token, Request(), audience=echo.url, certs_url=local_cloud.certs_url)
    assert claims["email"] == caller
    assert local_cloud.id_tokens_minted[echo.url] == minted + 1
    assert call(echo, token, {}).status_code == 200
    assert call(echo, id_token.fetch_id_token(Request(), echo.url + "/x"), {}).status_code == 401

    forged = json.loads(key.read_text())
    forged["private_key"] = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "forged.json"))
    with pytest.raises(auth_exceptions.RefreshError, match="invalid_grant"):
        id_token.fetch_id_token(Request(), echo.url)
    token_calls = [r for r in local_cloud.requests if r.path == "/token"]
    assert [r.status for r in token_calls[-3:]] == [200, 200, 400]


def test_impersonation_through_iam_credentials(local_cloud: LocalCloud, deploy: Any, tmp_path: Path) -> None:
    target = sa("invoker")
    echo = deploy("echo", invokers=[f"serviceAccount:{target}"])
    dev = user_credentials.Credentials.from_authorized_user_file(
        str(local_cloud.create_authorized_user_file(tmp_path / "adc.json", "dev@example.com"))
    ).with_token_uri(local_cloud.token_uri)
    iam_client = iam_credentials_v1.IAMCredentialsClient(
        transport="rest",
        credentials=dev,
        client_options={"api_endpoint": local_cloud.iam_endpoint},
    )
    name = f"projects/-/serviceAccounts/{target}"
    with pytest.raises(api_exceptions.Forbidden, match="getOpenIdToken"):
        iam_client.generate_id_token(name=name, audience=echo.url, include_email=True)

    local_cloud.iam.grant("user:dev@example.com", TOKEN_CREATOR, f"serviceAccount:{target}")
    try:
        token = iam_client.generate_id_token(name=name, audience=echo.url, include_email=True).token
        assert jwt.decode(token, verify=False)["email"] == target
        assert call(echo, token, {}).status_code == 200
        unnamed = iam_client.generate_id_token(name=name, audience=echo.url).token
        assert "email" not in jwt.decode(unnamed, verify=False)
        assert call(echo, unnamed, {}).status_code == 200  # Cloud Run maps `sub` to the account
    finally:
        local_cloud.iam.revoke("user:dev@example.com", TOKEN_CREATOR, f"serviceAccount:{target}")
    with pytest.raises(api_exceptions.Forbidden):
        iam_client.generate_id_token(name=name, audience=echo.url, include_email=True)
    iam_calls = [
        r.status for r in local_cloud.requests if r.component == "iam" and r.path.startswith(f"/v1/{name}")
    ]
    assert iam_calls == [403, 200, 200, 403]


def test_impersonated_adc_file_refreshes_through_the_local_iam(
    local_cloud: LocalCloud, deploy: Any, tmp_path: Path
) -> None:
    target = sa("impersonated")
    scoring = deploy("scoring", "account-scoring")
    path = local_cloud.create_impersonated_file(tmp_path / "adc.json", target)
    info = json.loads(path.read_text())
    parsed = impersonated_credentials.Credentials.from_impersonated_service_account_info(info)
    assert parsed.service_account_email == target

    # google-auth drops both the file's token_uri and its impersonation URL (it calls
    # Google's fixed endpoints), so a local client passes them back explicitly.
    source = user_credentials.Credentials.from_authorized_user_info(
        info["source_credentials"]
    ).with_token_uri(local_cloud.token_uri)
    creds = impersonated_credentials.Credentials(
        source_credentials=source,
        target_principal=target,
        target_scopes=CLOUD_PLATFORM,
        iam_endpoint_override=info["service_account_impersonation_url"],
    )
    with pytest.raises(auth_exceptions.RefreshError):
        creds.refresh(Request())

    local_cloud.iam.grant("user:dev@example.com", TOKEN_CREATOR, f"serviceAccount:{target}")
    local_cloud.iam.grant(f"serviceAccount:{target}", RUN_VIEWER, f"run.service:{scoring.name}")
    try:
        minted = local_cloud.access_tokens_minted
        creds.refresh(Request())
        assert local_cloud.access_tokens_minted == minted + 1
        parent = f"projects/{local_cloud.project}/locations/{local_cloud.region}"
        found = run_client(local_cloud, creds).get_service(name=f"{parent}/services/{scoring.name}")
        assert found.uri == scoring.url
        assert local_cloud.requests[-1].token_email == target
    finally:
        local_cloud.iam.revoke("user:dev@example.com", TOKEN_CREATOR, f"serviceAccount:{target}")


def test_metadata_server_protocol_and_counts(local_cloud: LocalCloud) -> None:
    base = f"http://{local_cloud.metadata_host}"
    flavor = {"Metadata-Flavor": "Google"}
    ping = requests.get(base + "/", timeout=5)
    assert (ping.status_code, ping.headers["Metadata-Flavor"]) == (200, "Google")
    denied = requests.get(base + "/computeMetadata/v1/project/project-id", timeout=5)
    assert denied.status_code == 403
    missing = requests.get(base + "/computeMetadata/v1/nope", headers=flavor, timeout=5)
    assert missing.status_code == 404
    assert missing.headers["Content-Type"].startswith("text/html")
    assert missing.headers["Metadata-Flavor"] == "Google"
    info = requests.get(
        base + "/computeMetadata/v1/instance/service-accounts/default/",
        params={"recursive": "true"},
        headers=flavor,
        timeout=5,
    ).json()
    assert info["email"] == local_cloud.worker_email

    audience = f"https://counted-{uid()}.a.run.app"
    tokens, accesses = local_cloud.id_tokens_minted[audience], local_cloud.access_tokens_minted
    first = id_token.fetch_id_token(Request(), audience)
    id_token.fetch_id_token(Request(), audience)
    vm, project = google.auth.default(scopes=CLOUD_PLATFORM)
    assert isinstance(vm, google.auth.compute_engine.Credentials)
    assert project == local_cloud.project
    vm.refresh(Request())
    assert vm.service_account_email == local_cloud.worker_email
    assert local_cloud.id_tokens_minted[audience] == tokens + 2
    assert local_cloud.access_tokens_minted == accesses + 1
    claims = id_token.verify_token(first, Request(), audience=audience, certs_url=local_cloud.certs_url)
    assert (claims["email"], claims["iss"]) == (local_cloud.worker_email, "https://accounts.google.com")


def test_metadata_down_then_up(local_cloud: LocalCloud) -> None:
    audience = f"https://down-{uid()}.a.run.app"
    local_cloud.set_down("metadata", True)
    try:
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://{local_cloud.metadata_host}/", timeout=5)
        with pytest.raises(auth_exceptions.DefaultCredentialsError):
            id_token.fetch_id_token(Request(), audience)
    finally:
        local_cloud.set_down("metadata", False)
    assert id_token.fetch_id_token(Request(), audience)
    assert local_cloud.id_tokens_minted[audience] == 1


def test_services_down_then_up(local_cloud: LocalCloud, deploy: Any) -> None:
    echo = deploy("echo")
    token = id_token.fetch_id_token(Request(), echo.url)
    local_cloud.set_down("services", True)
    try:
        with pytest.raises(requests.ConnectionError):
            call(echo, token, {})
    finally:
        local_cloud.set_down("services", False)
    assert call(echo, token, {}).status_code == 200


@pytest.mark.filterwarnings("ignore:The return_immediately flag is deprecated")
def test_emulator_dead_letters_after_max_delivery_attempts(pubsub_emulator: Any, names: Any) -> None:
    project = pubsub_emulator.project
    publisher = PublisherClient()
    subscriber = SubscriberClient()
    topic = publisher.topic_path(project, names.jobs_topic)
    dead_topic = publisher.topic_path(project, names.dead_letter_topic)
    subscription = subscriber.subscription_path(project, names.jobs_subscription)
    dead_subscription = subscriber.subscription_path(project, names.dead_letter_subscription)
    publisher.create_topic(name=topic)
    publisher.create_topic(name=dead_topic)
    subscriber.create_subscription(name=dead_subscription, topic=dead_topic)
    subscriber.create_subscription(
        request={
            "name": subscription,
            "topic": topic,
            "ack_deadline_seconds": 10,
            "dead_letter_policy": {"dead_letter_topic": dead_topic, "max_delivery_attempts": 5},
        }
    )
    publisher.publish(topic, b'{"job_id": "j-1"}', job_id="j-1").result(timeout=30)

    # The emulator forwards to the dead-letter topic when the source subscription is
    # pulled after the last allowed nack, so both are polled. return_immediately keeps an
    # empty pull from long-polling for ~10 s (deprecated for Pub/Sub, honoured here).
    attempts: list[int] = []
    dead: list[Any] = []
    deadline = time.monotonic() + 60
    while not dead and time.monotonic() < deadline:
        pulled = subscriber.pull(
            subscription=subscription, max_messages=10, return_immediately=True, timeout=10
        )
        for received in pulled.received_messages:
            attempts.append(received.delivery_attempt)
            subscriber.modify_ack_deadline(
                subscription=subscription, ack_ids=[received.ack_id], ack_deadline_seconds=0
            )
        dead = list(
            subscriber.pull(
                subscription=dead_subscription, max_messages=10, return_immediately=True, timeout=10
            ).received_messages
        )
        time.sleep(0.1)
    assert attempts == [1, 2, 3, 4, 5]
    assert len(dead) == 1
    attributes = dict(dead[0].message.attributes)
    assert attributes["job_id"] == "j-1"
    assert attributes["CloudPubSubDeadLetterSourceDeliveryCount"] == "5"
    assert attributes["CloudPubSubDeadLetterSourceSubscription"].endswith(names.jobs_subscription)
    assert attributes["CloudPubSubDeadLetterSourceSubscriptionProject"] == project
    subscriber.acknowledge(subscription=dead_subscription, ack_ids=[dead[0].ack_id])
    assert not subscriber.pull(
        subscription=subscription, max_messages=10, return_immediately=True, timeout=10
    ).received_messages
    subscriber.close()


def test_private_emulator_stop_leaves_no_process() -> None:
    emulator = PubSubEmulator(project="private-project").start()
    pgid = emulator.pgid
    assert pgid is not None
    try:
        assert emulator_answers(emulator.host)
        assert len(group_members(pgid)) >= 2  # gcloud and java at least
    finally:
        emulator.stop()
    assert group_members(pgid) == []
    assert not emulator_answers(emulator.host)
