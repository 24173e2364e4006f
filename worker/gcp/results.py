"""Publish results, dead letters and follow-ups; a job is acked only once these have landed."""

from __future__ import annotations

import asyncio
from typing import Any

from worker.core.pipeline import Outcome


class ResultPublisher:
    """Publishes an Outcome's result and dead letter through one PublisherClient.

    The client's futures are awaited through asyncio (no blocking `result()` in a
    thread), so thousands of publishes can be outstanding at once.
    """

    def __init__(
        self, publisher: Any, results_topic: str, dead_letter_topic: str, jobs_topic: str | None = None
    ) -> None:
        self._publisher = publisher
        self.results_topic = results_topic
        self.dead_letter_topic = dead_letter_topic
        self.jobs_topic = jobs_topic  # where follow-ups go (Cloud Run job executions)

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
        if futures:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))

    def flush(self) -> None:
        """Send what is batched and stop (blocking: call it in a thread at shutdown)."""
        self._publisher.stop()
