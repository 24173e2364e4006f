"""Pub/Sub push delivery with an OIDC token, as Pub/Sub does it, for the local cloud.

Google's emulator can push, but without a token, so the web app's verification would
go untested. Here a pull subscription on the emulator stands under the push one: each
message is POSTed to the endpoint as Pub/Sub's push envelope with
`Authorization: Bearer <ID token>` minted by the local cloud's authority (iss
https://accounts.google.com, aud the configured audience, email the push service
account, email_verified true). A 102, 200, 201, 202 or 204 answer acks it; anything
else, or no answer, nacks it with a backoff that doubles per attempt, as Pub/Sub's
push backoff does.
"""

from __future__ import annotations

import base64
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

ACK_STATUSES = frozenset({102, 200, 201, 202, 204})
_TOKEN_REFRESH_MARGIN_S = 300
_MAX_TRACKED = 100_000  # messages whose failed attempts are counted for the backoff


class PushDeliverer:
    """Delivers a subscription's messages to `endpoint` until `stop()`; thread-based.

    `mint(email, audience)` makes the ID token (the authority's mint_id_token).
    `subscriber` is a pubsub_v1.SubscriberClient on the emulator; with `topic`, the
    pull subscription under the push one is created on start if it does not exist.
    """

    def __init__(
        self,
        subscriber: Any,
        subscription: str,
        endpoint: str,
        *,
        service_account: str,
        mint: Callable[..., str],
        audience: str | None = None,
        topic: str | None = None,
        min_backoff_s: int = 1,
        max_backoff_s: int = 10,
        max_messages: int = 50,
        concurrency: int = 4,
        timeout_s: float = 10.0,
    ) -> None:
        self.subscriber = subscriber
        self.subscription = subscription
        self.endpoint = endpoint
        self.audience = audience or endpoint  # Pub/Sub's default audience is the endpoint
        self.service_account = service_account
        self.topic = topic
        self._mint = mint
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        self._max_messages = max_messages
        self._timeout_s = timeout_s
        self._session = requests.Session()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="push")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._attempts: dict[str, int] = {}
        self._token: tuple[str, float] | None = None
        self.acked = 0
        self.nacked = 0
        self.statuses: list[int] = []  # every answer (0: no answer), in order, bounded

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> PushDeliverer:
        if self._thread is not None:
            raise RuntimeError("push deliverer already started")
        if self.topic is not None:
            self._ensure_subscription()
        self._thread = threading.Thread(target=self._run, name="push-deliverer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=30)
        self._pool.shutdown(wait=True)
        self._session.close()

    def __enter__(self) -> PushDeliverer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ensure_subscription(self) -> None:
        from google.api_core import exceptions

        with contextlib.suppress(exceptions.AlreadyExists):
            self.subscriber.create_subscription(
                request={"name": self.subscription, "topic": self.topic, "ack_deadline_seconds": 10}
            )

    # -- delivery ----------------------------------------------------------------

    def _run(self) -> None:
        from google.api_core import exceptions

        while not self._stop.is_set():
            try:
                response = self.subscriber.pull(
                    subscription=self.subscription, max_messages=self._max_messages, timeout=5
                )
            except exceptions.DeadlineExceeded:
                continue
            except exceptions.GoogleAPICallError:
                if self._stop.wait(1.0):
                    return
                continue
            except ValueError:
                return  # the client was closed under us: the cloud is going down
            received = list(response.received_messages)
            if not received:
                self._stop.wait(0.1)
                continue
            statuses = list(self._pool.map(self._post, received))
            # Unsettled messages come back when their ack deadline lapses.
            with contextlib.suppress(exceptions.GoogleAPICallError, ValueError):
                self._settle(received, statuses)

    def envelope(self, received: Any) -> dict[str, Any]:
        """The JSON body Pub/Sub pushes for one received message."""
        message = received.message
        publish_time = message.publish_time.isoformat().replace("+00:00", "Z")
        body: dict[str, Any] = {
            "message": {
                "data": base64.b64encode(message.data).decode(),
                "attributes": dict(message.attributes),
                "messageId": message.message_id,
                "message_id": message.message_id,
                "publishTime": publish_time,
                "publish_time": publish_time,
            },
            "subscription": self.subscription,
        }
        if message.ordering_key:
            body["message"]["orderingKey"] = message.ordering_key
        if received.delivery_attempt:
            body["deliveryAttempt"] = received.delivery_attempt
        return body

    def _post(self, received: Any) -> int:
        try:
            answer = self._session.post(
                self.endpoint,
                json=self.envelope(received),
                headers={"Authorization": f"Bearer {self._id_token()}"},
                timeout=self._timeout_s,
                allow_redirects=False,
            )
        except requests.RequestException:
            return 0
        return answer.status_code

    def _id_token(self) -> str:
        with self._lock:
            if self._token is None or self._token[1] - time.time() < _TOKEN_REFRESH_MARGIN_S:
                token = self._mint(self.service_account, self.audience)
                self._token = (token, time.time() + 3600)
            return self._token[0]

    def _settle(self, received: list[Any], statuses: list[int]) -> None:
        acks: list[str] = []
        backoffs: dict[int, list[str]] = {}
        with self._lock:
            for message, status in zip(received, statuses, strict=True):
                self.statuses = [*self.statuses[-999:], status]
                message_id = message.message.message_id
                if status in ACK_STATUSES:
                    acks.append(message.ack_id)
                    self._attempts.pop(message_id, None)
                    self.acked += 1
                    continue
                attempt = self._attempts[message_id] = self._attempts.get(message_id, 0) + 1
                if len(self._attempts) > _MAX_TRACKED:
                    self._attempts.pop(next(iter(self._attempts)))
                delay = min(self._max_backoff_s, self._min_backoff_s * 2 ** (attempt - 1))
                backoffs.setdefault(delay, []).append(message.ack_id)
                self.nacked += 1
        if acks:
            self.subscriber.acknowledge(subscription=self.subscription, ack_ids=acks)
        for delay, ack_ids in backoffs.items():
            # Handing a message back with a deadline of N s is a nack redelivered after N s.
            self.subscriber.modify_ack_deadline(
                subscription=self.subscription, ack_ids=ack_ids, ack_deadline_seconds=delay
            )
