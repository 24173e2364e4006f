"""What runs on the Pub/Sub emulator only, and why: the emulator's three faults.

This is the one place they are explained; the README, the consumer, `worker setup`,
BENCHMARKS.md and the tests point here. All are faults of emulator 528 (gcloud 528,
cloud-pubsub-emulator 0.8.20). Real Pub/Sub has none of them, and the worker does none
of this there: it builds this transport only when PUBSUB_EMULATOR_HOST is set
(worker/runtime/app.py), and not when WORKER_EMULATOR_PLAIN_STREAMS=1 (a setting), which tests set
to run the worker on the emulator through the client library's own transport, the
path real Pub/Sub takes.

Fault 1: departed streams. The emulator never notices that a streaming-pull client
went away, killed or closed cleanly: the stream goes on taking messages off the
subscription until the RPC's deadline, 1,800 s by default, and each message it takes
comes back only after its ack deadline, one delivery attempt later. Evidence:
tests/e2e/test_emulator_streams.py shows it with the library's default client (and
its absence with the transport below); after one killed subscriber half of all new
messages went to its dead stream for the three minutes watched, and the chaos soak
burned its delivery attempts on dead streams (BENCHMARKS.md, the soak's first column).
What the worker does: every StreamingPull call on the emulator gets a deadline of
STREAM_DEADLINE_S, which the server enforces too, so a dead worker's stream is gone
within it; and the consumer never nacks after its own stream closed
(worker/gcp/consumer.py): the message would go straight back to that closed stream.

Fault 2: nacks lost under a retry policy. When the jobs subscription has a retry
policy, the emulator loses nacked messages whose subscriber stream dies before their
backoff ends: they are never redelivered. Evidence: the CI-sized chaos soak
(tests/e2e/test_soak.py) lost 264 of 600 jobs with a policy; none without one. What
the worker does: on the emulator the jobs subscription gets no retry policy
(worker.ops.provision.for_target, used by `worker setup`, `worker dev` and the tests),
so a nack is redelivered at once; the consumer's hold before each nack
(worker.core.backoff, equal jitter) keeps an outage from burning every delivery
attempt at once. Real Pub/Sub gets 10 s-600 s.

Fault 3: streams ignore flow control, and a cut strands what was queued. The emulator
writes as much of the backlog into a stream as the transport takes (thousands of
jobs), whatever the client asked for. A call that is cut, by its deadline or a
cancel, strands all of that: each comes back after its ack deadline, and under a retry
policy many never do. Evidence: tests/e2e/test_emulator_streams.py; `python -m
bench.streams` (BENCHMARKS.md): cut at 13 s, a 40,000-message backlog read at 1,500/s
needed 1,700-2,800 second deliveries and finished at 0.36 of the plain client's rate;
the worker cut at 13 s lost 1,796 of 20,000 jobs under a retry policy. What the worker
does: a live worker never lets the deadline cut its own stream. After ROTATE_AFTER_S
it half-closes it; the emulator then stops handing the stream new messages, sends
what it had queued for it and ends the call with OK. The library's next read takes
all of that in one response (read one response per flow-control turn, the tail of a
flush outlived the deadline when the worker was slow: 1,197 of 140,000 jobs lost under
a retry policy) and leases it. The library takes OK as the end of the subscription,
so that one status is reported to it as DEADLINE_EXCEEDED, which it treats as
recoverable: it opens the next stream. Nothing is stranded (a deep backlog, with and
without a retry policy: every job delivered once); the deadline stays as the bound
for streams whose client is gone (fault 1).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

# The server-side bound on any stream: a departed client's stream ends within it.
# 13 s, not a divisor of the usual ack deadlines (10 s, 60 s).
STREAM_DEADLINE_S = 13.0
# When a live client ends its own stream, leaving the emulator's flush (milliseconds)
# and the library's reading of it (a few flow-control turns) 5 s before the deadline.
ROTATE_AFTER_S = 8.0

_HALF_CLOSE = object()


class _HalfClosingRequests:
    """The library's request iterator, ended (half-closing the call) after `seconds`.

    gRPC reads requests on a thread of its own, and the library's iterator blocks
    until it has one; so a pump thread moves them to a queue this iterator can stop
    waiting on."""

    def __init__(self, requests: Iterator[Any], seconds: float) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.half_closed = False
        self._timer = threading.Timer(seconds, self._queue.put, (_HALF_CLOSE,))
        self._timer.daemon = True
        self._timer.start()
        # Ends with the library's iterator, which ends when the call is no longer active.
        threading.Thread(target=self._pump, args=(requests,), daemon=True).start()

    def _pump(self, requests: Iterator[Any]) -> None:
        for request in requests:
            self._queue.put(request)

    def __iter__(self) -> _HalfClosingRequests:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is _HALF_CLOSE:
            self.half_closed = True
            raise StopIteration
        return item

    def cancel(self) -> None:
        self._timer.cancel()


class _RotatedCall(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A StreamingPull call as the library sees it once the worker half-closed it: the
    next read takes everything the emulator flushes, in one response (so the library
    leases all of it at once, however far its flow control has paused it), then the
    end reads as DEADLINE_EXCEEDED, not OK. Until that end is read the call counts as
    active, so the library neither reopens from gRPC's done callback nor reads it from
    another thread while responses are still to be handed over. Before the half-close
    everything passes through."""

    def __init__(self, call: Any, requests: _HalfClosingRequests) -> None:
        self._call = call
        self._requests = requests
        self._lock = threading.Lock()
        self._ended = False  # the library has read the end
        self._error: BaseException | None = None
        call.add_done_callback(lambda _: requests.cancel())

    def _rotated(self) -> bool:
        return bool(
            self._requests.half_closed and self._call.done() and self._call.code() == grpc.StatusCode.OK
        )

    def __iter__(self) -> _RotatedCall:
        return self

    def __next__(self) -> Any:
        with self._lock:
            if self._error is not None:
                self._ended = True
                raise self._error
            try:
                response = next(self._call)
            except StopIteration:
                self._ended = True
                if self._rotated():
                    raise self from None
                raise
            except BaseException:
                self._ended = True
                raise
            if self._requests.half_closed:
                response = self._drain(response)
            return response

    def _drain(self, response: Any) -> Any:
        """`response` and all the rest of the call's responses, merged into one."""
        merged = None
        while True:
            try:
                more = next(self._call)
            except StopIteration:
                break  # the end is read by the next call
            except BaseException as exc:  # e.g. the deadline cut the flush short
                self._error = exc
                break
            if merged is None:
                merged = type(response)()
                merged._pb.MergeFrom(response._pb)
            merged._pb.MergeFrom(more._pb)
        return response if merged is None else merged

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED if self._rotated() else self._call.code()

    def details(self) -> str | None:
        if self._rotated():
            return "stream rotated by the worker on the emulator (worker/gcp/emulator.py)"
        return self._call.details()  # type: ignore[no-any-return]

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._call.add_done_callback(lambda _: callback(self))

    def initial_metadata(self) -> Any:
        return self._call.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._call.trailing_metadata()

    def is_active(self) -> bool:
        if self._requests.half_closed:
            return not self._ended
        return self._call.is_active()  # type: ignore[no-any-return]

    def time_remaining(self) -> float | None:
        return self._call.time_remaining()  # type: ignore[no-any-return]

    def cancel(self) -> bool:
        return self._call.cancel()  # type: ignore[no-any-return]

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return self._call.add_callback(callback)  # type: ignore[no-any-return]

    def done(self) -> bool:
        return self._call.done()  # type: ignore[no-any-return]


class _RotatingStreamingPull(grpc.StreamStreamMultiCallable):  # type: ignore[misc]
    """The StreamingPull stub: deadline capped at `deadline_s`, half-closed at `rotate_after_s`."""

    def __init__(self, stub: Any, deadline_s: float, rotate_after_s: float | None) -> None:
        if rotate_after_s is not None and rotate_after_s >= deadline_s:
            raise ValueError(f"rotate_after_s {rotate_after_s} must be under the deadline {deadline_s}")
        self._stub = stub
        self._deadline_s = deadline_s
        self._rotate_after_s = rotate_after_s
        self.opened = 0  # streams opened so far (tests count rotations with it)

    def __call__(self, request_iterator: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        self.opened += 1
        timeout = self._deadline_s if timeout is None else min(timeout, self._deadline_s)
        if self._rotate_after_s is None:
            return self._stub(request_iterator, timeout=timeout, **kwargs)
        requests = _HalfClosingRequests(iter(request_iterator), self._rotate_after_s)
        return _RotatedCall(self._stub(requests, timeout=timeout, **kwargs), requests)


def subscriber_transport(
    host: str,
    stream_deadline_s: float = STREAM_DEADLINE_S,
    rotate_after_s: float | None = ROTATE_AFTER_S,
) -> Any:
    """The plain-text channel the client library itself would open to the emulator,
    with StreamingPull deadlines capped and streams rotated (`rotate_after_s` None:
    cut by the deadline instead, which strands jobs; kept to measure against).

    A subclass of the library's gRPC transport whose `streaming_pull` stub is wrapped.
    (A gRPC client interceptor would be the obvious tool, but with any stream-stream
    interceptor on the channel, closing the client while the emulator is unreachable
    hangs inside grpc: tests/e2e/test_health.py found it.)"""
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    class RotatingTransport(SubscriberGrpcTransport):  # type: ignore[misc]
        @property
        def streaming_pull(self) -> Any:
            if "rotating_streaming_pull" not in self._stubs:
                self._stubs["rotating_streaming_pull"] = _RotatingStreamingPull(
                    super().streaming_pull, stream_deadline_s, rotate_after_s
                )
            return self._stubs["rotating_streaming_pull"]

    return RotatingTransport(host=host, channel=grpc.insecure_channel(host))
