"""What runs on the Pub/Sub emulator only, and why: the emulator's two faults.

This is the one place they are explained; the README, the consumer, `worker setup`
and the tests point here. Both are faults of emulator 528 (gcloud 528,
cloud-pubsub-emulator 0.8.20). Real Pub/Sub has neither, and the worker does none of
this there.

Fault 1: departed streams. The emulator never notices that a streaming-pull client
went away, killed or closed cleanly: the stream goes on taking messages off the
subscription until the RPC's deadline, 1,800 s by default, and each message it takes
comes back only after its ack deadline, one delivery attempt later. Evidence:
tests/e2e/test_emulator_streams.py shows it with the library's default client (and
its absence with the transport below); measured, after one killed subscriber half of
all new messages went to its dead stream for the three minutes watched, and the chaos
soak burned its delivery attempts on dead streams (BENCHMARKS.md, "What the fix was").
What the worker does:
- Every StreamingPull call on the emulator gets a deadline of STREAM_DEADLINE_S
  (`subscriber_transport`); the client library treats DEADLINE_EXCEEDED on the stream
  as recoverable and opens the next one, so a dead worker's stream is gone within
  that time. The price: what the emulator hands a stream in its last moments is lost
  with it and comes back after its ack deadline (a plain subscriber at 50 msg/s for
  90 s: 18 of 4,430 messages, each once, about 3 per rotation; with a deep backlog
  more, since the emulator pushes regardless of flow control). Ending the stream
  gently does not help: after a half-close the emulator ends the call with OK, which
  the library takes as final. The deadline is 13 s, not a divisor of the usual ack
  deadlines (10 s, 60 s), so a job lost at one rotation does not come back just in
  time to be lost at the next (at 10 s, 27 of 4,434 were lost, some up to 6 times).
- The consumer never nacks after its own stream closed (worker/gcp/consumer.py): the
  message would go straight back to that closed stream.

Fault 2: nacks lost under a retry policy. When the jobs subscription has a retry
policy, the emulator loses nacked messages whose subscriber stream dies before their
backoff ends: they are never redelivered. Evidence: the CI-sized chaos soak
(tests/e2e/test_soak.py) lost 264 of 600 jobs with a policy, the stream cap already
in place; none without one. What the worker does: on the emulator the jobs
subscription gets no retry policy (worker.ops.provision.for_target, used by `worker
setup`, `worker dev` and the tests), so a nack is redelivered at once; the consumer's
hold before each nack (worker.core.backoff, equal jitter) keeps an outage from
burning every delivery attempt at once. Real Pub/Sub gets 10 s-600 s.
"""

from __future__ import annotations

from typing import Any

import grpc

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
