"""Push verification (worker.client.push): every hostile token and envelope is refused
and stores nothing; a genuine push stores its result once per job_id.

Certificates come from a stand-in transport serving the local authority's certs, so
google-auth's real `id_token.verify_token` runs on every token here.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.doubles import (
    AUDIENCE,
    CERTS_URL,
    GOOD,
    GOOGLE,
    IMPOSTOR,
    PUSH_SA,
    VERIFIER,
    CertsTransport,
    bearer,
    claims,
    envelope,
    result,
    verifier,
)
from worker.client.push import (
    MemoryResultStore,
    PushHandler,
    PushRefused,
    PushVerifier,
    decode_envelope,
    supersedes,
)
from worker.core.messages import JobStatus, Result

# -- the genuine case ----------------------------------------------------------------


def test_a_genuine_push_is_stored_once_and_acked() -> None:
    store = MemoryResultStore()
    handler = PushHandler(VERIFIER, store)
    body = envelope(result().to_bytes())
    first = handler.handle(GOOD, body)
    again = handler.handle(GOOD, body)
    assert (first.status, again.status) == (204, 204)
    assert list(store.results) == ["job-1"] and store.results["job-1"].response == {"score": 71}


def test_the_envelope_decodes_into_the_result_model_with_pubsubs_facts() -> None:
    delivery = decode_envelope(envelope(result(batch={"id": "b", "index": 2, "total": 5}).to_bytes()))
    assert delivery.result.batch is not None and delivery.result.batch.index == 2
    assert delivery.message_id == "1234567890" and delivery.delivery_attempt == 1
    assert delivery.attributes["status"] == "succeeded"
    assert delivery.publish_time == datetime(2026, 12, 1, 7, 0, 0, 123000, tzinfo=UTC)
    assert delivery.subscription.endswith("/job-results-webapp")


def test_snake_case_fields_are_read_too() -> None:
    # Pub/Sub push sends message_id/publish_time beside messageId/publishTime.
    body = json.loads(envelope(result().to_bytes()))
    message = body["message"]
    message["message_id"] = message.pop("messageId")
    assert decode_envelope(json.dumps(body).encode()).message_id == "1234567890"


def test_a_failed_result_is_replaced_by_a_later_success_but_never_the_reverse() -> None:
    store = MemoryResultStore()
    handler = PushHandler(VERIFIER, store)
    handler.handle(GOOD, envelope(result(status="failed").to_bytes()))
    handler.handle(GOOD, envelope(result(status="succeeded").to_bytes()))
    handler.handle(GOOD, envelope(result(status="failed").to_bytes()))
    assert store.results["job-1"].status == JobStatus.SUCCEEDED
    assert supersedes(None, "failed") and supersedes("failed", "succeeded")
    assert not supersedes("succeeded", "failed") and not supersedes("failed", "failed")
    # A Cloud Run job execution's `running` is replaced by its end, never the reverse.
    assert supersedes("running", "failed") and supersedes("running", "succeeded")
    assert not supersedes("failed", "running") and not supersedes("succeeded", "running")


def test_a_result_without_job_id_is_acked_without_storing() -> None:
    store = MemoryResultStore()
    body = envelope(result(job_id=None, status="rejected").to_bytes())
    response = PushHandler(VERIFIER, store).handle(GOOD, body)
    assert response.status == 204 and not store.results


def test_certificates_are_fetched_once_while_their_max_age_lasts() -> None:
    transport = CertsTransport()
    cached = verifier(transport)
    for _ in range(5):
        cached.verify(GOOD)
    assert transport.calls == 1
    no_cache = verifier(CertsTransport(max_age=0))
    no_cache.verify(GOOD)
    no_cache.verify(GOOD)
    assert no_cache._request.fetches == 2  # type: ignore[attr-defined]


def test_unreachable_certificates_answer_503_so_pubsub_retries() -> None:
    with pytest.raises(PushRefused) as refused:
        verifier(CertsTransport(status=500)).verify(GOOD)
    assert refused.value.status == 503 and CERTS_URL in refused.value.message


def test_an_unparseable_certificate_answer_is_503_and_not_kept() -> None:
    class Garbled(CertsTransport):
        def __call__(self, url: str, method: str = "GET", **kw: Any) -> Any:
            answer = super().__call__(url, method, **kw)
            if self.calls == 1:
                answer.data = b"<html>captive portal</html>"
            return answer

    transport = Garbled()
    garbled = verifier(transport)
    with pytest.raises(PushRefused) as refused:
        garbled.verify(GOOD)
    assert refused.value.status == 503, "Pub/Sub retries; a 401 would drop the push as unauthentic"
    garbled.verify(GOOD)  # the next push fetches again and passes
    assert transport.calls == 2


def test_a_token_with_nbf_in_the_past_passes() -> None:
    VERIFIER.verify(bearer(GOOGLE.sign(claims(nbf=int(time.time()) - 10))))


def test_the_store_failing_answers_503() -> None:
    class Broken:
        def record(self, result: Result) -> bool:
            raise OSError("database is locked")

    response = PushHandler(VERIFIER, Broken()).handle(GOOD, envelope(result().to_bytes()))
    assert response.status == 503 and response.body and "database is locked" in response.body["error"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"audience": ""}, "audience"),
        ({"service_account": "results-push"}, "not an email"),
        ({"clock_skew_s": 301}, "clock skew"),
        ({"certs_url": "http://certs.example.com/certs"}, "https"),
    ],
)
def test_the_verifier_refuses_a_weakening_configuration(kwargs: dict[str, Any], match: str) -> None:
    options = {"audience": AUDIENCE, "service_account": PUSH_SA, **kwargs}
    with pytest.raises(ValueError, match=match):
        PushVerifier(options.pop("audience"), options.pop("service_account"), **options)


# -- the named hostile cases -----------------------------------------------------------


def _unsigned(payload: dict[str, Any], alg: str = "none") -> str:
    def part(value: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': alg, 'typ': 'JWT', 'kid': GOOGLE.key_id})}.{part(payload)}."


# Built when each test runs: a token made at import time would age during a long suite.
HOSTILE: dict[str, Callable[[], tuple[str | None, int]]] = {
    "no header": lambda: (None, 401),
    "empty bearer": lambda: ("Bearer ", 401),
    "basic auth": lambda: ("Basic dXNlcjpwYXNz", 401),
    "another audience": lambda: (bearer(GOOGLE.sign(claims(aud="https://other.example.com/push"))), 401),
    "another service account": lambda: (
        bearer(GOOGLE.sign(claims(email="intruder@evil.iam.gserviceaccount.com"))),
        403,
    ),
    "email not verified": lambda: (bearer(GOOGLE.sign(claims(email_verified=False))), 403),
    "no email": lambda: (bearer(GOOGLE.sign(claims(email=..., email_verified=...))), 403),
    "expired": lambda: (
        bearer(GOOGLE.sign(claims(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600))),
        401,
    ),
    "expired beyond the skew": lambda: (bearer(GOOGLE.sign(claims(exp=int(time.time()) - 30))), 401),
    "issued in the future": lambda: (bearer(GOOGLE.sign(claims(iat=int(time.time()) + 600))), 401),
    "no exp": lambda: (bearer(GOOGLE.sign(claims(exp=...))), 401),
    # google-auth checks neither (issue 24)
    "not valid yet (nbf)": lambda: (bearer(GOOGLE.sign(claims(nbf=int(time.time()) + 600))), 401),
    "nbf not a number": lambda: (bearer(GOOGLE.sign(claims(nbf="soon"))), 401),
    "lives a year": lambda: (bearer(GOOGLE.sign(claims(exp=int(time.time()) + 365 * 86400))), 401),
    "lives an hour and a minute": lambda: (bearer(GOOGLE.sign(claims(exp=int(time.time()) + 3660))), 401),
    "another issuer": lambda: (bearer(GOOGLE.sign(claims(iss="https://evil.example.com"))), 401),
    "signed by another key": lambda: (bearer(IMPOSTOR.sign(claims())), 401),
    "unsigned (alg none)": lambda: (bearer(_unsigned(claims())), 401),
    "empty signature": lambda: (bearer(_unsigned(claims(), alg="RS256")), 401),
    "tampered payload": lambda: (
        bearer(
            ".".join(
                [
                    GOOD.split()[1].split(".")[0],
                    _unsigned(claims(email="x@y.z")).split(".")[1],
                    GOOD.split(".")[2],
                ]
            )
        ),
        401,
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_each_hostile_token_is_refused_and_nothing_is_stored(case: str) -> None:
    authorization, status = HOSTILE[case]()
    store = MemoryResultStore()
    response = PushHandler(VERIFIER, store).handle(authorization, envelope(result().to_bytes()))
    assert response.status == status, response.body
    assert response.body and response.body["error"]
    assert not store.results


def test_a_token_within_the_clock_skew_passes() -> None:
    VERIFIER.verify(bearer(GOOGLE.sign(claims(exp=int(time.time()) - 3))))


MALFORMED = {
    "not json": b"{not json",
    "json list": b"[1, 2]",
    "no message": b'{"subscription": "s"}',
    "no data": json.dumps({"message": {"messageId": "1"}}).encode(),
    "data not base64": json.dumps({"message": {"data": "@@@", "messageId": "1"}}).encode(),
    "no message id": json.dumps({"message": {"data": "e30="}}).encode(),
    "data not a result": envelope(b'{"job_id": "x"}'),
    "data not json": envelope(b"\xff\xfe"),
    "bad delivery attempt": json.dumps(
        {"message": {"data": "e30=", "messageId": "1"}, "deliveryAttempt": -1}
    ).encode(),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_envelope_is_400_and_nothing_is_stored(case: str) -> None:
    store = MemoryResultStore()
    response = PushHandler(VERIFIER, store).handle(GOOD, MALFORMED[case])
    assert response.status == 400, response.body
    assert not store.results


# -- hundreds of hostile tokens and envelopes ------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)

SKEW = VERIFIER.clock_skew_s
DELETE = object()
# Per claim, values a genuine push token never has (DELETE: the claim is missing).
DEFECTS: dict[str, st.SearchStrategy[Any]] = {
    "aud": st.sampled_from(["https://other.example.com/push", AUDIENCE + "/", AUDIENCE.upper(), "", DELETE])
    | json_values.filter(lambda v: v != AUDIENCE),
    "email": st.sampled_from(
        [
            "someone@acme.iam.gserviceaccount.com",
            "results-push@evil.iam.gserviceaccount.com",
            PUSH_SA + ".evil.com",
            "",
            DELETE,
        ]
    )
    | json_values.filter(lambda v: not isinstance(v, str) or v.lower() != PUSH_SA),
    "email_verified": st.sampled_from([False, "true", 1, None, DELETE]),
    "iss": st.sampled_from(
        ["https://evil.example", "http://accounts.google.com", "accounts.google.com.evil.com", "", DELETE]
    ),
    "exp": st.integers(-(10**7), -(SKEW + 3)).map(lambda offset: int(time.time()) + offset)
    | st.sampled_from(["tomorrow", None, DELETE]),
    "iat": st.integers(SKEW + 3, 10**7).map(lambda offset: int(time.time()) + offset)
    | st.sampled_from(["now", DELETE]),
    "signer": st.sampled_from(["impostor", "unsigned"]),
}


@st.composite
def push_tokens(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A token with 0 to 3 defects; (bearer token, the defects' names)."""
    defects = draw(st.lists(st.sampled_from(sorted(DEFECTS)), max_size=3, unique=True))
    payload = claims()
    signer = "google"
    for name in defects:
        value = draw(DEFECTS[name])
        if name == "signer":
            signer = value
        elif value is DELETE:
            payload.pop(name)
        else:
            payload[name] = value
    if signer == "google":
        token = GOOGLE.sign(payload)
    elif signer == "impostor":
        token = IMPOSTOR.sign(payload)
    else:
        token = _unsigned(payload, alg="RS256")
    return bearer(token), defects


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token=push_tokens())
def test_property_only_a_token_without_defects_stores_anything(token: tuple[str, list[str]]) -> None:
    authorization, defects = token
    store = MemoryResultStore()
    response = PushHandler(VERIFIER, store).handle(authorization, envelope(result().to_bytes()))
    if not defects:
        assert response.status == 204 and list(store.results) == ["job-1"]
    else:
        assert response.status in (401, 403), (defects, response)
        assert not store.results


@settings(max_examples=300, deadline=None)
@given(
    authorization=st.none()
    | st.text(max_size=300)
    | st.builds(lambda t: "Bearer " + t, st.text(max_size=300))
    | st.builds(
        lambda parts: "Bearer " + ".".join(parts),
        st.lists(
            st.text(
                alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                min_size=1,
                max_size=60,
            ),
            min_size=1,
            max_size=4,
        ),
    )
    | st.builds(lambda h, p: "Bearer " + _unsigned(p, alg=h), st.text(max_size=8), json_values),
    body=st.binary(max_size=300),
)
def test_property_garbage_authorization_is_401(authorization: str | None, body: bytes) -> None:
    store = MemoryResultStore()
    response = PushHandler(VERIFIER, store).handle(authorization, body)
    assert response.status == 401, response
    assert not store.results


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=400)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.builds(
        lambda message, extra: json.dumps({"message": message, **extra}).encode(),
        st.dictionaries(st.sampled_from(["data", "messageId", "attributes", "publishTime"]), json_values),
        st.dictionaries(st.sampled_from(["subscription", "deliveryAttempt"]), json_values),
    )
    | st.builds(lambda data: envelope(data), st.binary(max_size=200))
    | st.builds(lambda value: envelope(json.dumps(value).encode()), json_values)
)
def test_property_hostile_envelopes_with_a_genuine_token_are_400(body: bytes) -> None:
    store = MemoryResultStore()
    response = PushHandler(VERIFIER, store).handle(GOOD, body)
    assert response.status == 400, response
    assert not store.results
