"""The subscriber transport the worker uses on the Pub/Sub emulator, and why.

Two faults of the emulator (gcloud 528, cloud-pubsub-emulator 0.8.20) meet here; this
is the one place they are explained (tests/e2e/test_emulator_streams.py shows each).

1. Departed streams. The emulator never notices that a streaming-pull client went
   away, killed or closed cleanly: the stream goes on taking messages off the
   subscription until the RPC's deadline, 1,800 s by default, and each message it
   takes comes back only after its ack deadline, one delivery attempt later. After one
   killed worker, half of all new jobs went to its dead stream for as long as we
   watched. So every StreamingPull call gets a deadline of STREAM_DEADLINE_S, which
   the server enforces too: a dead worker's stream is gone within it.

2. Streams ignore flow control. The emulator writes as much of the backlog into a
   stream as the transport takes (thousands of jobs), whatever the client asked for.
   A call that is cut, by its deadline or a cancel, strands all of that: each comes
   back after its ack deadline (with a deep backlog, ~2,000 jobs per cut, and the
   run's last jobs 10 s late), and on a subscription with a retry policy the emulator
   never redelivers many of them at all (1,796 of 20,000 in one run).

So a live worker never lets the deadline cut its stream: after ROTATE_AFTER_S it
half-closes it. The emulator then stops handing the stream new messages, sends what
it had queued for it and ends the call with OK. The library's next read takes all of
that in one response (read one response per flow-control turn, thousands of queued
jobs outlived the deadline when the worker was slow) and leases it. The library
takes OK as the end of the subscription, so that one status is reported to it as
DEADLINE_EXCEEDED, which it treats as recoverable: it opens the next stream.
Nothing is stranded (a deep backlog, with and without a retry policy: every job once).
The deadline stays as the bound for streams whose client is gone.

Real Pub/Sub needs none of this and does not get it: the worker builds this transport
only when PUBSUB_EMULATOR_HOST is set (worker/runtime/app.py), and not when
WORKER_EMULATOR_PLAIN_STREAMS=1, which tests set to run the worker on the emulator
through the client library's own transport: the path real Pub/Sub takes.
"""

from __future__ import annotations

import os
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
PLAIN_STREAMS_VARIABLE = "WORKER_EMULATOR_PLAIN_STREAMS"


def wanted() -> bool:
    """Whether the worker, on the emulator, uses this transport (see the module docstring)."""
    return os.environ.get(PLAIN_STREAMS_VARIABLE, "") not in ("1", "true", "yes")


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
