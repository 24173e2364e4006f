"""The consumer's own policy: how long a job is held before it goes back to Pub/Sub."""

from __future__ import annotations

from worker.gcp.consumer import NACK_DELAY_BASE_S, NACK_DELAY_MAX_S, nack_delay


def test_nack_delay_grows_with_the_delivery_attempt_and_is_capped() -> None:
    for attempt, ceiling in [(None, 0.5), (1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (6, 10.0), (40, 10.0)]:
        delays = [nack_delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > 0, "jittered, so replicas do not retry in step"
    assert NACK_DELAY_BASE_S == 0.5 and NACK_DELAY_MAX_S == 10.0


class Message:
    """The parts of a pubsub_v1 subscriber Message the consumer uses, recording what it is told."""

    def __init__(self, n: int) -> None:
        self.data = b"{}"
        self.attributes = {"job_id": f"j{n}", "kind": "score"}
        self.message_id = str(n)
        self.ack_id = f"ack-{n}"
        self.delivery_attempt = 1
        self.publish_time = None
        self.calls: list[str] = []

    def ack(self) -> None:
        self.calls.append("ack")

    def nack(self) -> None:
        self.calls.append("nack")

    def drop(self) -> None:
        self.calls.append("drop")

    def modify_ack_deadline(self, seconds: int) -> None:
        self.calls.append(f"modack {seconds}")


class Publisher:
    async def publish(self, outcome: object) -> None:
        return None

    def flush(self) -> None:
        return None


def test_a_held_job_leaves_its_slot_keeps_its_lease_and_is_never_nacked() -> None:
    import asyncio

    from worker.core.pipeline import Outcome
    from worker.gcp.consumer import Consumer

    async def main() -> None:
        resumed = asyncio.Event()
        seen: list[str] = []

        async def handle(delivery):  # type: ignore[no-untyped-def]
            seen.append(delivery.attributes["job_id"])
            if delivery.attributes["job_id"] == "j1" and not resumed.is_set():
                return Outcome(ack=False, hold=resumed.wait)
            return Outcome(ack=True)

        consumer = Consumer(None, "sub", handle, Publisher(), max_in_flight=1, grace_s=1,  # type: ignore[arg-type]
                            max_delivery_attempts=5, lease_extension_s=10)
        consumer._slots = asyncio.Semaphore(1)
        consumer._streaming = True
        held, other = Message(1), Message(2)
        first = asyncio.ensure_future(consumer._process(held))
        await asyncio.sleep(0.01)
        assert consumer.stats.held == 1 and len(consumer.leases) == 1
        # The one slot is free while j1 waits: j2 runs to its ack.
        await asyncio.wait_for(consumer._process(other), 1)
        assert other.calls == ["ack"]
        resumed.set()
        await asyncio.wait_for(first, 1)
        assert seen == ["j1", "j2", "j1"]
        # Taken from the client's lease management, kept by the worker, acked.
        assert held.calls == ["drop", "modack 10", "ack"]
        assert consumer.stats.held == 0 and len(consumer.leases) == 0

    asyncio.run(main())


def test_a_job_held_too_long_on_its_last_attempt_runs_once_more_without_a_hold() -> None:
    import asyncio

    from worker.core.pipeline import Outcome
    from worker.gcp.consumer import Consumer

    async def main() -> None:
        deliveries = []

        async def never() -> None:
            await asyncio.Event().wait()

        async def handle(delivery):  # type: ignore[no-untyped-def]
            deliveries.append(delivery)
            return Outcome(ack=True) if not delivery.may_hold else Outcome(ack=False, hold=never)

        consumer = Consumer(None, "sub", handle, Publisher(), max_in_flight=1, grace_s=1,  # type: ignore[arg-type]
                            max_delivery_attempts=5, lease_extension_s=10, max_hold_s=0.05)
        consumer._slots = asyncio.Semaphore(1)
        consumer._streaming = True
        message = Message(1)
        message.delivery_attempt = 5
        await asyncio.wait_for(consumer._process(message), 2)
        assert [d.may_hold for d in deliveries] == [True, False]
        assert message.calls[-1] == "ack" and "nack" not in message.calls

    asyncio.run(main())
