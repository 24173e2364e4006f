"""Push delivery on the local cloud: the emulator's messages POSTed as Pub/Sub push
envelopes with the local authority's OIDC token, verified for real (certificates
fetched over HTTP from the local cloud) by the web app's Flask endpoint."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from google.cloud import pubsub_v1
from localcloud.ports import free_port
from werkzeug.serving import make_server

from worker.client.push import GOOGLE_CERTS_URL, MemoryResultStore, PushHandler, PushVerifier
from worker.client.web import flask_view
from worker.core.messages import Result

pytestmark = pytest.mark.e2e

PUSH_SA = "results-push@local-project.iam.gserviceaccount.com"


def result(job_id: str) -> Result:
    now = datetime.now(UTC)
    return Result.model_validate(
        {
            "job_id": job_id,
            "kind": "account-scoring",
            "status": "succeeded",
            "attempts": 1,
            "response": {"score": 50},
            "started_at": now,
            "finished_at": now,
            "duration_ms": 3,
        }
    )


class Endpoint:
    """A Flask push endpoint on 127.0.0.1; `fail_first` requests answer 503 first."""

    def __init__(self, verifier: PushVerifier, fail_first: int = 0) -> None:
        import flask

        self.store = MemoryResultStore()
        self.arrivals: list[float] = []
        self.requests: list[tuple[str | None, dict[str, Any]]] = []  # (Authorization, JSON body)
        self._fail_left = fail_first
        app = flask.Flask(__name__)
        view = flask_view(PushHandler(verifier, self.store))

        def push() -> Any:
            self.arrivals.append(time.monotonic())
            body = json.loads(flask.request.get_data(cache=True))  # the view reads the cached body
            self.requests.append((flask.request.headers.get("Authorization"), body))
            if self._fail_left > 0:
                self._fail_left -= 1
                return "busy", 503
            return view()

        app.add_url_rule("/push", view_func=push, methods=["POST"])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/push"
        self._server = make_server("127.0.0.1", self.port, app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Endpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()


@pytest.fixture
def topic(pubsub_emulator: Any, names: Any) -> Iterator[str]:
    publisher = pubsub_v1.PublisherClient()
    path = publisher.topic_path(pubsub_emulator.project, names.results_topic)
    publisher.create_topic(name=path)
    yield path
    publisher.stop()


def publish_results(topic: str, job_ids: list[str]) -> None:
    publisher = pubsub_v1.PublisherClient()
    for future in [publisher.publish(topic, result(j).to_bytes(), job_id=j) for j in job_ids]:
        future.result(timeout=30)
    publisher.stop()


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def deliverer(local_cloud: Any, topic: str, endpoint: str, **options: Any) -> Any:
    subscriber = pubsub_v1.SubscriberClient()
    subscription = subscriber.subscription_path("local-project", topic.rsplit("/", 1)[1] + "-push")
    return local_cloud.push_deliverer(
        subscriber,
        subscription,
        endpoint,
        service_account=options.pop("service_account", PUSH_SA),
        topic=topic,
        **options,
    )


def test_results_are_pushed_with_a_verified_token_and_stored_once(local_cloud: Any, topic: str) -> None:
    verifier = PushVerifier("https://webapp.local/push", PUSH_SA, certs_url=local_cloud.certs_url)
    with (
        Endpoint(verifier) as endpoint,
        deliverer(local_cloud, topic, endpoint.url, audience="https://webapp.local/push") as push,
    ):
        job_ids = [f"push-{i}" for i in range(30)]
        publish_results(topic, job_ids)
        wait_for(lambda: len(endpoint.store.results) == 30)
        assert sorted(endpoint.store.results) == sorted(job_ids)
        wait_for(lambda: push.acked == 30)
        assert push.nacked == 0 and set(push.statuses) == {204}


def test_a_refused_push_is_nacked_and_retried_with_a_growing_backoff(local_cloud: Any, topic: str) -> None:
    verifier = PushVerifier("https://webapp.local/push", PUSH_SA, certs_url=local_cloud.certs_url)
    with (
        Endpoint(verifier, fail_first=2) as endpoint,
        deliverer(local_cloud, topic, endpoint.url, audience="https://webapp.local/push") as push,
    ):
        publish_results(topic, ["flaky-1"])
        wait_for(lambda: "flaky-1" in endpoint.store.results)
        assert push.statuses[:3] == [503, 503, 204]
        first_wait = endpoint.arrivals[1] - endpoint.arrivals[0]
        second_wait = endpoint.arrivals[2] - endpoint.arrivals[1]
        assert first_wait >= 0.9 and second_wait >= 1.9, (first_wait, second_wait)


def test_another_account_or_audience_is_refused_and_nothing_stored(local_cloud: Any, topic: str) -> None:
    verifier = PushVerifier("https://webapp.local/push", PUSH_SA, certs_url=local_cloud.certs_url)
    with Endpoint(verifier) as endpoint:
        with deliverer(
            local_cloud,
            topic,
            endpoint.url,
            audience="https://webapp.local/push",
            service_account="intruder@local-project.iam.gserviceaccount.com",
        ) as push:
            publish_results(topic, ["intruded-1"])
            wait_for(lambda: push.nacked >= 1)
            assert set(push.statuses) == {403}
        with deliverer(local_cloud, topic, endpoint.url, audience="https://other.local/push") as push:
            wait_for(lambda: push.nacked >= 1)
            assert set(push.statuses) == {401}
        assert not endpoint.store.results


def test_local_tokens_are_accepted_only_when_the_certs_url_says_so(local_cloud: Any) -> None:
    # The default is Google's certificates, which never verify a local token.
    assert PushVerifier("https://webapp.local/push", PUSH_SA).certs_url == GOOGLE_CERTS_URL


def test_the_emulators_own_push_sends_no_token_so_the_local_deliverer_is_needed(
    local_cloud: Any, pubsub_emulator: Any, topic: str
) -> None:
    """The emulator keeps a push config and pushes, but without an OIDC token: the web
    app refuses it. The local deliverer sends the same envelope, with the token."""
    verifier = PushVerifier("https://webapp.local/push", PUSH_SA, certs_url=local_cloud.certs_url)
    subscriber = pubsub_v1.SubscriberClient()
    with Endpoint(verifier) as emulator_target, Endpoint(verifier) as local_target:
        name = topic.rsplit("/", 1)[1] + "-emu"
        emulator_push = subscriber.subscription_path(pubsub_emulator.project, name)
        oidc = {"service_account_email": PUSH_SA, "audience": "https://webapp.local/push"}
        subscriber.create_subscription(
            request={
                "name": emulator_push,
                "topic": topic,
                "push_config": {"push_endpoint": emulator_target.url, "oidc_token": oidc},
            }
        )
        with deliverer(local_cloud, topic, local_target.url, audience="https://webapp.local/push"):
            publish_results(topic, ["both-ways"])
            wait_for(lambda: bool(emulator_target.requests) and "both-ways" in local_target.store.results)
        subscriber.delete_subscription(subscription=emulator_push)
    emulator_auth, emulator_body = emulator_target.requests[0]
    local_auth, local_body = local_target.requests[0]
    assert emulator_auth is None and not emulator_target.store.results
    assert local_auth is not None and local_auth.startswith("Bearer ")
    # The same envelope as the emulator's (Pub/Sub's) own push, field for field.
    assert set(local_body) >= set(emulator_body)
    assert set(local_body["message"]) >= set(emulator_body["message"])
    assert local_body["message"]["data"] == emulator_body["message"]["data"]
