"""A Pub/Sub stand-in for unit tests, as dramatiq's StubBroker serves its suite.

It speaks the part of `google.cloud.pubsub_v1` the worker uses, so the consumer and
the result publisher run unmodified in milliseconds, without the emulator:

- `StubSubscriber`: `subscribe(subscription, callback, flow_control=...)` returns a
  `StubStreamingPullFuture` (cancel() closes the stream and resolves the future, as
  the real StreamingPullFuture does once its manager has closed); the callback runs
  on a thread of the "client", as the real one does; `acknowledge` and
  `modify_ack_deadline` are the unary RPCs; `pull` answers a real
  `pubsub_v1.types.PullResponse` from messages a test `queue`d (what operators' tools
  read); `get_subscription` answers a `pubsub_v1.types.Subscription`.
- `StubMessage`: `data`, `attributes`, `message_id`, `ack_id`, `delivery_attempt`,
  `publish_time`, and `ack()`, `nack()`, `modify_ack_deadline(seconds)`, `drop()`
  (recorded as `dropped`: the client's own business, it reaches no Pub/Sub). Like the
  real client, a settle sent on a closed stream goes nowhere: the stand-in records
  it as lost, so a test can tell it from one that reached Pub/Sub.
- `StubPublisher`: `publish(topic, data, **attributes)` returns a
  concurrent.futures.Future, resolved at once, failed (every topic, or one), or held
  until the test releases it; `stop()`.

`StubPubSub.events` is one ordered ledger of what reached "Pub/Sub" (publishes that
resolved, acks, nacks), so a test can assert that a job was acked only after its
result was published. The emulator stays for the end-to-end tests (tests/e2e/).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # lazy-loaded module

_ids = itertools.count(1)


@dataclass(frozen=True)
class Event:
    """One thing Pub/Sub saw: `what` is publish, ack, nack or modack; `via` stream or unary."""

    what: str
    key: str  # the message id (settles) or the topic (publishes)
    via: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    data: bytes = b""
    seconds: int | None = None


class StubPubSub:
    """One subscriber and one publisher sharing a ledger of events."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[Event] = []
        self.subscriber = StubSubscriber(self)
        self.publisher = StubPublisher(self)

    def record(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def settles(self, message: StubMessage) -> list[Event]:
        """What reached Pub/Sub for one message (acks, nacks, deadline changes)."""
        with self._lock:
            return [e for e in self.events if e.what != "publish" and e.key == message.message_id]

    def published(self, topic: str) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.what == "publish" and e.key == topic]

    def index(self, event: Event) -> int:
        with self._lock:
            return self.events.index(event)


class StubMessage:
    """A received message, as `pubsub_v1.subscriber.message.Message` presents it."""

    def __init__(
        self,
        stream: StubStreamingPullFuture,
        data: bytes,
        attributes: dict[str, str],
        *,
        delivery_attempt: int | None,
        publish_time: datetime,
    ) -> None:
        number = next(_ids)
        self._stream = stream
        self.data = data
        self.attributes = dict(attributes)
        self.message_id = str(number)
        self.ack_id = f"ack-{number}"
        self.delivery_attempt = delivery_attempt
        self.publish_time = publish_time
        self.lost: list[str] = []  # settles sent after the stream closed: never reached Pub/Sub
        self.dropped = False  # taken out of the client's lease management (`drop()`)

    def ack(self) -> None:
        self._settle("ack")

    def nack(self) -> None:
        self._settle("nack")

    def modify_ack_deadline(self, seconds: int) -> None:
        self._settle("modack", seconds)

    def drop(self) -> None:
        """Like the real Message.drop(): the client stops leasing it and it no longer
        counts against flow control; nothing reaches Pub/Sub."""
        self.dropped = True

    def _settle(self, what: str, seconds: int | None = None) -> None:
        if not self._stream.open:
            self.lost.append(what)
            return
        self._stream.broker.record(Event(what, self.message_id, via="stream", seconds=seconds))


class StubStreamingPullFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """What `subscribe()` returns: resolved when the stream is cancelled or fails."""

    def __init__(
        self,
        broker: StubPubSub,
        subscription: str,
        callback: Callable[[Any], None],
        flow_control: Any,
        scheduler: Any = None,
    ) -> None:
        super().__init__()
        self.broker = broker
        self.subscription = subscription
        self.callback = callback
        self.flow_control = flow_control
        # Like the library: a given scheduler gets each message (and runs the callback).
        self.scheduler = scheduler
        self.open = True
        self._cancelled = False
        # The client library calls back on threads of its own, never the caller's.
        self._threads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stub-callback")

    def cancel(self) -> bool:
        """Stop the stream; like the real future, resolve it with True once closed."""
        self._cancelled = True
        self._close()
        if not self.done():
            self.set_result(True)
        return True

    def cancelled(self) -> bool:
        return self._cancelled

    def fail(self, error: BaseException) -> None:
        """The stream ended by itself (subscription deleted, permission revoked...)."""
        self._close()
        self.set_exception(error)

    def _close(self) -> None:
        self.open = False
        self._threads.shutdown(wait=False)
        if self.scheduler is not None:
            self.scheduler.shutdown()

    def deliver(self, message: StubMessage) -> None:
        if self.scheduler is not None:
            self._threads.submit(self.scheduler.schedule, self.callback, message).result(timeout=5)
        else:
            self._threads.submit(self.callback, message).result(timeout=5)


class StubSubscriber:
    """`pubsub_v1.SubscriberClient`, the calls the worker makes."""

    def __init__(self, broker: StubPubSub) -> None:
        self._broker = broker
        self.stream: StubStreamingPullFuture | None = None
        self.unary_error: Exception | None = None  # raised by acknowledge/modify_ack_deadline
        self.max_delivery_attempts: int | None = None  # the subscription's dead-letter policy
        self.closed = False
        # Messages waiting on subscriptions for `pull`: ack id -> (subscription, message, leased).
        self._queued: dict[str, tuple[str, Any, bool]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def subscription_path(project: str, subscription: str) -> str:
        return f"projects/{project}/subscriptions/{subscription}"

    def subscribe(
        self,
        subscription: str,
        callback: Callable[[Any], None],
        flow_control: Any = (),
        scheduler: Any = None,
        use_legacy_flow_control: bool = False,
        await_callbacks_on_shutdown: bool = False,
    ) -> StubStreamingPullFuture:
        if self.stream is not None and self.stream.open:
            raise AssertionError("the stand-in serves one stream at a time")
        self.stream = StubStreamingPullFuture(self._broker, subscription, callback, flow_control, scheduler)
        return self.stream

    def deliver(
        self,
        data: bytes,
        attributes: dict[str, str] | None = None,
        *,
        delivery_attempt: int | None = 1,
        publish_time: datetime | None = None,
    ) -> StubMessage:
        """Hand a message to the open stream's callback, on the callback thread."""
        if self.stream is None or not self.stream.open:
            raise AssertionError("no open stream: call Consumer.run first")
        message = StubMessage(
            self.stream,
            data,
            attributes or {},
            delivery_attempt=delivery_attempt,
            publish_time=publish_time or datetime.now(UTC),
        )
        self.stream.deliver(message)
        return message

    def acknowledge(self, *, subscription: str, ack_ids: list[str], **_: Any) -> None:
        self._unary("ack", ack_ids)

    def modify_ack_deadline(
        self, *, subscription: str, ack_ids: list[str], ack_deadline_seconds: int, **_: Any
    ) -> None:
        self._unary("modack", ack_ids, ack_deadline_seconds)

    def _unary(self, what: str, ack_ids: list[str], seconds: int | None = None) -> None:
        if self.unary_error is not None:
            raise self.unary_error
        for ack_id in ack_ids:
            self._broker.record(Event(what, ack_id.removeprefix("ack-"), via="unary", seconds=seconds))
            with self._lock:
                if ack_id not in self._queued:
                    continue
                subscription, message, _ = self._queued[ack_id]
                if what == "ack":
                    del self._queued[ack_id]
                else:  # a deadline of 0 gives the message back; any other holds it
                    self._queued[ack_id] = (subscription, message, seconds != 0)

    def queue(
        self,
        subscription: str,
        data: bytes,
        attributes: dict[str, str] | None = None,
        *,
        publish_time: datetime | None = None,
    ) -> str:
        """Put a message on a subscription for `pull`; returns its message id."""
        number = next(_ids)
        message = pubsub_v1.types.PubsubMessage(
            data=data,
            attributes=attributes or {},
            message_id=str(number),
            publish_time=publish_time or datetime.now(UTC),
        )
        with self._lock:
            self._queued[f"ack-{number}"] = (subscription, message, False)
        return str(number)

    def waiting(self, subscription: str) -> list[Any]:
        """Messages still on the subscription (not acked), leased or not."""
        with self._lock:
            return [m for s, m, _ in self._queued.values() if s == subscription]

    def pull(self, *, subscription: str, max_messages: int, **_: Any) -> Any:
        """Up to `max_messages` messages not leased, each now leased (the ack deadline)."""
        with self._lock:
            chosen = [
                (ack_id, m)
                for ack_id, (s, m, leased) in self._queued.items()
                if s == subscription and not leased
            ][:max_messages]
            for ack_id, message in chosen:
                self._queued[ack_id] = (subscription, message, True)
        return pubsub_v1.types.PullResponse(
            received_messages=[pubsub_v1.types.ReceivedMessage(ack_id=a, message=m) for a, m in chosen]
        )

    def get_subscription(self, *, subscription: str, **_: Any) -> Any:
        found = pubsub_v1.types.Subscription(name=subscription, topic="projects/p/topics/jobs")
        if self.max_delivery_attempts is not None:
            found.dead_letter_policy = pubsub_v1.types.DeadLetterPolicy(
                dead_letter_topic="projects/p/topics/jobs-dead-letter",
                max_delivery_attempts=self.max_delivery_attempts,
            )
        return found

    def close(self) -> None:
        self.closed = True


class StubPublisher:
    """`pubsub_v1.PublisherClient.publish`: resolve at once, fail, or hold until released."""

    def __init__(self, broker: StubPubSub) -> None:
        self._broker = broker
        self._lock = threading.Lock()
        self.error: Exception | None = None  # every publish fails with it
        self.topic_errors: dict[str, Exception] = {}  # publishes to one topic fail
        self.hold = False  # publishes wait for release()
        self._held: list[tuple[concurrent.futures.Future[str], Event]] = []
        self.stopped = False

    @staticmethod
    def topic_path(project: str, topic: str) -> str:
        return f"projects/{project}/topics/{topic}"

    def publish(self, topic: str, data: bytes, **attributes: str) -> concurrent.futures.Future[str]:
        # The real client checks these before batching; so does the stand-in.
        if self.stopped:
            raise RuntimeError("Cannot publish on a stopped publisher.")
        if not isinstance(data, bytes):
            raise TypeError("Data being published to Pub/Sub must be sent as a bytestring.")
        for key, value in attributes.items():
            if not isinstance(value, str):
                raise TypeError(f"attributes published to Pub/Sub must be text strings: {key}")
        future: concurrent.futures.Future[str] = concurrent.futures.Future()
        event = Event("publish", topic, attributes=dict(attributes), data=data)
        error = self.topic_errors.get(topic, self.error)
        if error is not None:
            future.set_exception(error)
        elif self.hold:
            with self._lock:
                self._held.append((future, event))
        else:
            self._resolve(future, event)
        return future

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def release(self) -> None:
        """Resolve every held publish (from any thread, as the client's own threads do)."""
        with self._lock:
            held, self._held = self._held, []
        for future, event in held:
            self._resolve(future, event)

    def _resolve(self, future: concurrent.futures.Future[str], event: Event) -> None:
        self._broker.record(event)
        future.set_result(str(next(_ids)))

    def stop(self) -> None:
        self.stopped = True
