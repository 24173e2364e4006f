"""The Inbox: calls from the client library's threads run on the loop, in order, in batches."""

from __future__ import annotations

import asyncio
import threading

import structlog

from worker.gcp.inbox import Inbox


def test_a_raising_callback_does_not_drop_the_rest_of_its_batch() -> None:
    ran: list[int] = []

    def boom(n: int) -> None:
        raise RuntimeError(f"callback {n} failed")

    async def scenario() -> None:
        inbox = Inbox(asyncio.get_running_loop())

        def from_a_thread() -> None:  # as the client's stream thread hands over a batch
            inbox.put(ran.append, 1)
            inbox.put(boom, 2)
            inbox.put(ran.append, 3)

        with structlog.testing.capture_logs() as logs:
            thread = threading.Thread(target=from_a_thread)
            thread.start()
            thread.join()
            for _ in range(100):
                if len(ran) == 2:
                    break
                await asyncio.sleep(0.001)
        assert ran == [1, 3]
        assert [entry["event"] for entry in logs] == ["inbox_callback_failed"]

    asyncio.run(scenario())
