"""Publish results, dead letters and follow-ups; a job is acked only once these have landed."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from typing import Any

from worker.core.shapes import Outcome
from worker.gcp.inbox import Inbox


class ResultPublisher:
    """Publishes an Outcome's result and dead letter through one PublisherClient.

    The client's futures are awaited through asyncio (no blocking `result()` in a
    thread), so thousands of publishes can be outstanding at once; their outcomes
    reach the loop through an `Inbox`, one wake-up per batch the client committed.
    """

    def __init__(
        self, publisher: Any, results_topic: str, dead_letter_topic: str, jobs_topic: str | None = None
    ) -> None:
        self._publisher = publisher
        self.results_topic = results_topic
        self.dead_letter_topic = dead_letter_topic
        self.jobs_topic = jobs_topic  # where follow-ups go (Cloud Run job executions)
        self._inbox: Inbox | None = None

    async def publish(self, outcome: Outcome) -> None:
        """Resolve when every message of the outcome is published; raise if one was not."""
        futures = []
        if outcome.result is not None:
            futures.append(
                self._publisher.publish(
                    self.results_topic, outcome.result.to_bytes(), **outcome.result.attributes()
                )
            )
        if outcome.dead_letter is not None:
            futures.append(
                self._publisher.publish(
                    self.dead_letter_topic, outcome.dead_letter.data, **outcome.dead_letter.attributes
                )
            )
        if outcome.follow_up is not None:
            if self.jobs_topic is None:
                raise RuntimeError("a follow-up needs the jobs topic: pass jobs_topic to ResultPublisher")
            futures.append(
                self._publisher.publish(
                    self.jobs_topic, outcome.follow_up.data, **outcome.follow_up.attributes
                )
            )
        if len(futures) == 1:
            await self._landed(futures[0])
        elif futures:
            await asyncio.gather(*(self._landed(f) for f in futures))

    async def forward(self, topic: str, data: bytes, attributes: dict[str, str]) -> None:
        """Publish a job unchanged to another lane's topic; resolve once it landed."""
        await self._landed(self._publisher.publish(topic, data, **attributes))

    def _landed(self, published: concurrent.futures.Future[str]) -> asyncio.Future[str]:
        """An asyncio future that settles as `published` does (which the client settles
        on its commit thread)."""
        loop = asyncio.get_running_loop()
        if self._inbox is None:
            self._inbox = Inbox(loop)
        waiter: asyncio.Future[str] = loop.create_future()
        published.add_done_callback(functools.partial(self._inbox.put, _settle, waiter))
        return waiter

    def flush(self) -> None:
        """Send what is batched and stop (blocking: call it in a thread at shutdown)."""
        self._publisher.stop()


def _settle(waiter: asyncio.Future[str], published: concurrent.futures.Future[str]) -> None:
    if waiter.done():  # the job was cancelled meanwhile (a shutdown past its grace)
        return
    if published.cancelled():
        waiter.cancel()
        return
    error = published.exception()
    if error is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(published.result())
