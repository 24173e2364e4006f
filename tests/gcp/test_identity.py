"""Which credentials mint the worker's ID tokens, in the order docs/contract.md gives
(WORKER_IMPERSONATE_SERVICE_ACCOUNT; GOOGLE_APPLICATION_CREDENTIALS; the metadata
server; gcloud's application-default file), one test per source, each minting a real
token from the local cloud's servers (its metadata server, OAuth2 token endpoint and
IAM Credentials). tests/conftest.py pointed google-auth at the local cloud's metadata
server before it was imported; a test that wants "no metadata server" points the
ping (GCE_METADATA_IP, read at each call) at a closed port. Only environment
variables change here; no Google library is patched.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from google.auth import jwt
from localcloud.ports import free_port

from worker.core.errors import ConfigError
from worker.gcp.identity import build_token_source

AUDIENCE = "https://scoring-abc-uc.a.run.app"
TARGET = "worker@local-project.iam.gserviceaccount.com"


@pytest.fixture
def gcloud_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A gcloud config dir of this test's own, and no explicit GCE_METADATA_HOST: the
    worker must find the metadata server by asking it, as on a VM."""
    config = tmp_path / "gcloud"
    config.mkdir()
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(config))
    monkeypatch.delenv("GCE_METADATA_HOST", raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    return config


def no_metadata_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{free_port()}")


def claims(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, verify=False))


def mint(source: Any) -> dict[str, Any]:
    return claims(asyncio.run(source.token(AUDIENCE)))


def test_the_metadata_server_comes_before_a_gcloud_user_file(local_cloud: Any, gcloud_config: Path) -> None:
    # Someone once ran `gcloud auth application-default login` on this VM.
    local_cloud.create_authorized_user_file(gcloud_config / "application_default_credentials.json")
    source = build_token_source(iam_endpoint=local_cloud.iam_endpoint)
    assert source.principal.detail == "metadata server"
    token = mint(source)
    assert token["aud"] == AUDIENCE and token["email"] == local_cloud.worker_email


def test_a_service_account_key_file(
    local_cloud: Any, gcloud_config: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    email = "keyed@local-project.iam.gserviceaccount.com"
    key = local_cloud.create_service_account_key(tmp_path / "key.json", email)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    source = build_token_source(iam_endpoint=local_cloud.iam_endpoint)
    assert source.principal.email == email and source.principal.detail.startswith("service account key")
    token = mint(source)
    assert token["aud"] == AUDIENCE and token["email"] == email


def test_impersonation_comes_first_and_mints_as_the_target(
    local_cloud: Any, gcloud_config: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    developer = "dev-imp@local-project.iam.gserviceaccount.com"
    key = local_cloud.create_service_account_key(tmp_path / "dev.json", developer)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    local_cloud.iam.grant(
        f"serviceAccount:{developer}", "roles/iam.serviceAccountTokenCreator", f"serviceAccount:{TARGET}"
    )
    source = build_token_source(TARGET, iam_endpoint=local_cloud.iam_endpoint)
    assert source.principal.email == TARGET and "impersonation" in source.principal.detail
    token = mint(source)
    assert token["aud"] == AUDIENCE and token["email"] == TARGET


def test_off_google_cloud_gclouds_impersonated_file_is_used(
    local_cloud: Any, gcloud_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_metadata_server(monkeypatch)
    local_cloud.create_impersonated_file(gcloud_config / "application_default_credentials.json", TARGET)
    source = build_token_source(iam_endpoint=local_cloud.iam_endpoint)
    assert source.principal.email == TARGET
    assert "gcloud application-default credentials" in source.principal.detail
    # Its user credentials refresh at Google's own token endpoint (google-auth ignores
    # the file's token_uri), which this machine cannot reach: the choice is the test.


def test_off_google_cloud_a_gcloud_user_file_is_refused_with_the_fix(
    local_cloud: Any, gcloud_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_metadata_server(monkeypatch)
    local_cloud.create_authorized_user_file(gcloud_config / "application_default_credentials.json")
    with pytest.raises(ConfigError, match="cannot mint the ID token") as refused:
        build_token_source(iam_endpoint=local_cloud.iam_endpoint)
    assert "WORKER_IMPERSONATE_SERVICE_ACCOUNT" in str(refused.value)


def test_no_credentials_at_all_says_what_to_run(gcloud_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_metadata_server(monkeypatch)
    with pytest.raises(ConfigError, match="no credentials that can mint ID tokens"):
        build_token_source()


def test_a_waiter_cancelled_mid_refresh_starts_no_second_concurrent_refresh() -> None:
    import threading

    from google.auth import credentials as auth_credentials

    from worker.gcp.identity import IdentityTokenSource, Principal

    class Slow(auth_credentials.Credentials):  # type: ignore[misc]
        """A credential whose refresh takes 0.1 s and counts overlapping refreshes."""

        def __init__(self) -> None:
            super().__init__()
            self.refreshes = 0
            self.running = 0
            self.overlapped = False
            self._lock = threading.Lock()

        def refresh(self, request: Any) -> None:
            with self._lock:
                self.running += 1
                self.overlapped |= self.running > 1
                self.refreshes += 1
            threading.Event().wait(0.1)
            self.token = f"tok-{self.refreshes}"
            with self._lock:
                self.running -= 1

    slow = Slow()
    source = IdentityTokenSource(lambda audience: slow, Principal("w@p.iam.gserviceaccount.com", "test"))

    async def scenario() -> None:
        first = asyncio.ensure_future(source.token(AUDIENCE))
        await asyncio.sleep(0.02)
        first.cancel()  # its job was cancelled (shutdown) while the token was being minted
        second = await source.token(AUDIENCE)
        assert second == "tok-1"

    asyncio.run(scenario())
    assert slow.refreshes == 1 and not slow.overlapped
