"""The Flask and Starlette adapters of the push endpoint (worker.client.web), through
each framework's own test client: the same answers as the handler, token first."""

from __future__ import annotations

from typing import Any

import flask
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from tests.doubles import GOOD, VERIFIER, envelope, result
from worker.client.push import MAX_ENVELOPE_BYTES, MemoryResultStore, PushHandler
from worker.client.web import flask_view, starlette_endpoint


def flask_client(store: MemoryResultStore) -> Any:
    app = flask.Flask(__name__)
    app.add_url_rule("/push", view_func=flask_view(PushHandler(VERIFIER, store)), methods=["POST"])
    return app.test_client()


def starlette_client(store: MemoryResultStore) -> Any:
    app = Starlette()
    app.add_route("/push", starlette_endpoint(PushHandler(VERIFIER, store)), methods=["POST"])
    return TestClient(app)


CLIENTS = {"flask": flask_client, "starlette": starlette_client}


@pytest.mark.parametrize("framework", sorted(CLIENTS))
def test_a_genuine_push_is_204_and_stored(framework: str) -> None:
    store = MemoryResultStore()
    client = CLIENTS[framework](store)
    response = client.post(
        "/push", headers={"Authorization": GOOD}, **_body(framework, envelope(result().to_bytes()))
    )
    assert response.status_code == 204 and _content(response) == b""
    assert list(store.results) == ["job-1"]


@pytest.mark.parametrize("framework", sorted(CLIENTS))
def test_no_token_is_401_with_the_cause_and_nothing_stored(framework: str) -> None:
    store = MemoryResultStore()
    response = CLIENTS[framework](store).post("/push", **_body(framework, envelope(result().to_bytes())))
    assert response.status_code == 401
    assert "--push-auth-service-account" in _json(response)["error"]
    assert not store.results


@pytest.mark.parametrize("framework", sorted(CLIENTS))
def test_a_malformed_envelope_is_400(framework: str) -> None:
    store = MemoryResultStore()
    client = CLIENTS[framework](store)
    response = client.post("/push", headers={"Authorization": GOOD}, **_body(framework, b"{}"))
    assert response.status_code == 400 and "push envelope" in _json(response)["error"]
    assert not store.results


@pytest.mark.parametrize("framework", sorted(CLIENTS))
def test_a_body_over_the_limit_is_413_without_storing(framework: str) -> None:
    store = MemoryResultStore()
    body = b" " * (MAX_ENVELOPE_BYTES + 1)
    client = CLIENTS[framework](store)
    response = client.post("/push", headers={"Authorization": GOOD}, **_body(framework, body))
    assert response.status_code == 413
    assert not store.results


def _body(framework: str, body: bytes) -> dict[str, Any]:
    return {"content": body} if framework == "starlette" else {"data": body}


def _content(response: Any) -> bytes:
    return response.content if hasattr(response, "content") else response.data


def _json(response: Any) -> dict[str, Any]:
    return response.get_json() if hasattr(response, "get_json") else response.json()
