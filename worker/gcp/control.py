"""The control channel: operators' pause/resume orders and status requests, over Pub/Sub.

One topic, WORKER_CONTROL_TOPIC (`worker-control`, made by `worker setup`). Every
worker instance subscribes to it with a subscription of its own,
`<topic>-<random id>`, made at start-up and deleted at a clean shutdown; its
expiration policy (1 day of inactivity, the least real Pub/Sub accepts) removes the
subscription of an instance that died without cleaning up. Messages are JSON objects
with an `op` (also an attribute):

- `pause` / `resume` {entry: {kind, paused, at, until, by}}: from `worker pause` and
  `worker resume`. The newest order per kind wins (worker/core/pauses.py).
- `hello` {replica}: a starting instance asks the others what they know;
- `state` {replica, entries: [...]}: their answer (every recent order). Pause state
  lives in the running instances and travels between them this way; no database.
  If every instance stops at once, the state is gone (pause again after).
- `status` {request_id}: `worker status` asks; every instance answers with
- `status-reply` {request_id, replica, status}: its paused kinds, breaker states and
  current limits. `worker status` reads replies on a subscription of its own, made
  for the question and deleted after it.

The channel's state follows its stream: `listening` while the pull stream is open,
`down` (with the reason, for /readyz and `worker status`) once it ended by itself,
`off` when it never started (no topic, no permission). A stream that ends is
reopened after a backoff (`RECONNECT_BASE_S` doubling to `RECONNECT_MAX_S`, equal
jitter), its subscription made again if it is gone, and the instance says hello
again so it learns the orders it missed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from google.api_core import exceptions

from worker.core.backoff import Backoff
from worker.core.errors import shorten
from worker.core.pauses import PauseBook, PauseEntry

log = structlog.get_logger("worker.gcp.control")

SUBSCRIPTION_TTL_S = 24 * 3600  # Pub/Sub's minimum expiration_policy ttl
RETENTION_S = 600  # orders older than this are of no use to anyone
MAX_MESSAGE_BYTES = 256 * 1024
RECONNECT_BASE_S = 1.0
RECONNECT_MAX_S = 60.0


def replica_id() -> str:
    return f"{socket.gethostname()[:40]}-{uuid.uuid4().hex[:8]}"


def subscription_id(topic: str, suffix: str) -> str:
    return f"{topic}-{suffix}"[:255]


def create_subscription(subscriber: Any, project: str, topic: str, name: str) -> str:
    """A short-lived subscription to the control topic; raises NotFound without the topic."""
    from google.protobuf import duration_pb2

    path = subscriber.subscription_path(project, name)
    subscriber.create_subscription(
        request={
            "name": path,
            "topic": f"projects/{project}/topics/{topic}",
            "ack_deadline_seconds": 10,
            "expiration_policy": {"ttl": duration_pb2.Duration(seconds=SUBSCRIPTION_TTL_S)},
            "message_retention_duration": duration_pb2.Duration(seconds=RETENTION_S),
        }
    )
    return str(path)


def encode(op: str, **fields: Any) -> bytes:
    return json.dumps({"op": op, **fields}).encode()


def decode(data: bytes) -> dict[str, Any]:
    """The message as a dict with an `op`, or ValueError."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError("control message too large")
    raw = json.loads(data)
    if not isinstance(raw, dict) or not isinstance(raw.get("op"), str):
        raise ValueError("a control message is a JSON object with an 'op'")
    return raw


class ControlChannel:
    """A worker instance's end of the channel."""

    def __init__(
        self,
        publisher: Any,
        subscriber: Any,
        *,
        project: str,
        topic: str,
        pauses: PauseBook,
        status: Callable[[], dict[str, Any]],
        replica: str | None = None,
        reconnect: Backoff | None = None,
    ) -> None:
        self._publisher = publisher
        self._subscriber = subscriber
        self._project = project
        self._topic = topic
        self._topic_path = f"projects/{project}/topics/{topic}"
        self.pauses = pauses
        self._status = status
        self.replica = replica or replica_id()
        self._subscription: str | None = None
        self._future: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.listening = False
        self.down_reason: str | None = None  # why the stream ended, while it is down
        self.reconnects = 0
        self._reconnect = reconnect or Backoff(RECONNECT_BASE_S, RECONNECT_MAX_S)
        self._reconnecting: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def state(self) -> str:
        """`listening`, `down` (the stream ended; see `down_reason`) or `off`."""
        if self.listening:
            return "listening"
        return "down" if self.down_reason is not None else "off"

    async def start(self) -> None:
        """Subscribe and say hello; without the topic, log why and go on without control."""
        self._loop = asyncio.get_running_loop()
        name = subscription_id(self._topic, uuid.uuid4().hex[:12])
        try:
            self._subscription = await asyncio.to_thread(
                create_subscription, self._subscriber, self._project, self._topic, name
            )
        except exceptions.NotFound:
            log.warning(
                "control_channel_off",
                error=f"topic {self._topic_path} does not exist: `worker pause` and `worker status` "
                "will not reach this instance; create it with `worker setup`",
            )
            return
        except exceptions.GoogleAPICallError as exc:
            log.warning(
                "control_channel_off",
                error=f"cannot subscribe to {self._topic_path}: {exc}"[:400]
                + "; grant the worker roles/pubsub.editor (see `worker setup --print-gcloud`)",
            )
            return
        self._listen()
        log.info("control_channel_listening", subscription=self._subscription, replica=self.replica)

    def _listen(self) -> None:
        assert self._subscription is not None and self._loop is not None
        future = self._subscriber.subscribe(self._subscription, self._on_message)
        self._future = future
        self.listening, self.down_reason = True, None
        loop = self._loop
        future.add_done_callback(lambda done: loop.call_soon_threadsafe(self._ended, done))
        self._publish("hello", replica=self.replica)

    def _ended(self, future: Any) -> None:
        """The stream's future resolved (on the loop): down, and reconnect, unless closing."""
        if self._closing or future is not self._future:
            return
        try:
            error = future.exception(timeout=0)
        except BaseException as exc:  # cancelled
            error = exc
        self.listening = False
        self.down_reason = shorten(error) if error is not None else "the pull stream ended"
        log.warning("control_channel_down", error=self.down_reason, reconnects=self.reconnects)
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.ensure_future(self._reopen(error))

    async def _reopen(self, error: BaseException | None) -> None:
        failures = 0
        while not self._closing:
            failures += 1
            await asyncio.sleep(self._reconnect.equal_jitter(failures))
            if self._closing:
                return
            try:
                if isinstance(error, exceptions.NotFound):  # the subscription is gone
                    assert self._subscription is not None
                    name = self._subscription.rsplit("/", 1)[-1]
                    await asyncio.to_thread(
                        create_subscription, self._subscriber, self._project, self._topic, name
                    )
                self._listen()
            except Exception as exc:
                error = exc
                self.down_reason = shorten(exc)
                log.warning("control_channel_reconnect_failed", error=self.down_reason, failures=failures)
                continue
            self.reconnects += 1
            log.info("control_channel_listening", subscription=self._subscription, reconnects=self.reconnects)
            return

    async def close(self) -> None:
        self._closing = True
        self.listening = False
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self._future is not None:
            self._future.cancel()
        if self._subscription is not None:
            try:
                # One short try: at shutdown Pub/Sub may be away, and the client's own
                # retry would hold the exit for a minute.
                await asyncio.to_thread(
                    self._subscriber.delete_subscription,
                    subscription=self._subscription,
                    retry=None,
                    timeout=5,
                )
            except Exception as exc:  # its expiration policy removes it in a day
                log.warning("control_subscription_not_deleted", error=f"{type(exc).__name__}: {exc}"[:300])

    def _on_message(self, message: Any) -> None:
        # The client's callback thread: ack and hand over.
        message.ack()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.handle, bytes(message.data))

    def handle(self, data: bytes) -> None:
        try:
            raw = decode(data)
            op = raw["op"]
            if op in ("pause", "resume"):
                self.pauses.apply(PauseEntry.from_json(raw.get("entry")))
            elif op == "state" and raw.get("replica") != self.replica:
                for entry in raw.get("entries") or []:
                    self.pauses.apply(PauseEntry.from_json(entry))
            elif op == "hello" and raw.get("replica") != self.replica:
                entries = [e.to_json() for e in self.pauses.entries()]
                if entries:
                    self._publish("state", replica=self.replica, entries=entries)
            elif op == "status":
                self._publish(
                    "status-reply",
                    request_id=str(raw.get("request_id", ""))[:64],
                    replica=self.replica,
                    status=self._status(),
                )
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("control_message_ignored", error=str(exc)[:300])

    def _publish(self, op: str, **fields: Any) -> None:
        future = self._publisher.publish(self._topic_path, encode(op, **fields), op=op)
        future.add_done_callback(_log_publish_failure)


def _log_publish_failure(future: Any) -> None:
    error = future.exception()
    if error is not None:
        log.warning("control_publish_failed", error=f"{type(error).__name__}: {error}"[:300])


# The operator's end: `worker pause`, `worker resume`, `worker status`.


def send_order(publisher: Any, project: str, topic: str, entry: PauseEntry) -> None:
    op = "pause" if entry.paused else "resume"
    publisher.publish(f"projects/{project}/topics/{topic}", encode(op, entry=entry.to_json()), op=op).result(
        timeout=30
    )


def ask_status(
    publisher: Any, subscriber: Any, project: str, topic: str, *, wait_s: float
) -> list[dict[str, Any]]:
    """Every answering instance's status-reply, collected for `wait_s` seconds."""
    request_id = uuid.uuid4().hex[:16]
    path = create_subscription(subscriber, project, topic, subscription_id(topic, f"status-{request_id}"))
    replies: dict[str, dict[str, Any]] = {}
    try:
        publisher.publish(
            f"projects/{project}/topics/{topic}", encode("status", request_id=request_id), op="status"
        ).result(timeout=30)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                response = subscriber.pull(
                    subscription=path, max_messages=100, timeout=max(0.5, deadline - time.monotonic())
                )
            except (exceptions.DeadlineExceeded, exceptions.ServiceUnavailable):
                continue
            if not response.received_messages:
                time.sleep(0.1)
                continue
            subscriber.acknowledge(subscription=path, ack_ids=[m.ack_id for m in response.received_messages])
            for received in response.received_messages:
                try:
                    raw = decode(received.message.data)
                except ValueError:
                    continue
                if raw["op"] == "status-reply" and raw.get("request_id") == request_id:
                    replies[str(raw.get("replica"))] = raw
    finally:
        subscriber.delete_subscription(subscription=path, timeout=10)
    return [replies[k] for k in sorted(replies)]
