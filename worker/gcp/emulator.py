"""The subscriber transport the worker uses on the Pub/Sub emulator, and why.

The emulator (gcloud 528, cloud-pubsub-emulator 0.8.20) never notices that a
streaming-pull client went away, killed or closed cleanly: the stream goes on taking
messages off the subscription until the RPC's deadline, 1,800 s by default, and each
message it takes comes back only after its ack deadline, one delivery attempt later.
After one killed worker, half of all new jobs went to its dead stream for as long as
we watched (tests/e2e/test_emulator_streams.py).

So on the emulator every StreamingPull call gets a deadline of STREAM_DEADLINE_S, and
the client library, which treats DEADLINE_EXCEEDED on the stream as recoverable,
opens the next one. A dead worker's stream is then gone within that time.

The price: what the emulator hands a stream in its last moments is lost with it and
comes back after its ack deadline (measured: at 50 jobs/s, about 3 jobs per
rotation; with a deep backlog more, since the emulator pushes regardless of flow
control). Ending the stream gently does not help: after a half-close the emulator
ends the call with OK, which the library takes as final. The deadline is 13 s, not a
divisor of the usual ack deadlines (10 s, 60 s), so a job lost at one rotation does
not come back just in time to be lost at the next (at 10 s, some were lost five
times in a row). Real Pub/Sub needs none of this and does not get it.
"""

from __future__ import annotations

from typing import Any

import grpc

STREAMING_PULL = "/google.pubsub.v1.Subscriber/StreamingPull"
STREAM_DEADLINE_S = 13.0


class _CappedStreamingPull(grpc.StreamStreamMultiCallable):  # type: ignore[misc]
    """The StreamingPull stub, with the call's deadline capped at `seconds`."""

    def __init__(self, stub: Any, seconds: float) -> None:
        self._stub = stub
        self._seconds = seconds

    def __call__(self, request_iterator: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        timeout = self._seconds if timeout is None else min(timeout, self._seconds)
        return self._stub(request_iterator, timeout=timeout, **kwargs)


def subscriber_transport(host: str, stream_deadline_s: float = STREAM_DEADLINE_S) -> Any:
    """The plain-text channel the client library itself would open to the emulator,
    with StreamingPull deadlines capped.

    A subclass of the library's gRPC transport whose `streaming_pull` stub caps the
    deadline. (A gRPC client interceptor would be the obvious tool, but with any
    stream-stream interceptor on the channel, closing the client while the emulator
    is unreachable hangs inside grpc: tests/e2e/test_health.py found it.)"""
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    class CappedTransport(SubscriberGrpcTransport):  # type: ignore[misc]
        @property
        def streaming_pull(self) -> Any:
            if "capped_streaming_pull" not in self._stubs:
                self._stubs["capped_streaming_pull"] = _CappedStreamingPull(
                    super().streaming_pull, stream_deadline_s
                )
            return self._stubs["capped_streaming_pull"]

    return CappedTransport(host=host, channel=grpc.insecure_channel(host))
