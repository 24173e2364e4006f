"""The consumer's own policy: how long a job is held before it goes back to Pub/Sub."""

from __future__ import annotations

from worker.gcp.consumer import NACK_DELAY_BASE_S, NACK_DELAY_MAX_S, nack_delay


def test_nack_delay_grows_with_the_delivery_attempt_and_is_capped() -> None:
    for attempt, ceiling in [(None, 0.5), (1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (6, 10.0), (40, 10.0)]:
        delays = [nack_delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > 0, "jittered, so replicas do not retry in step"
    assert NACK_DELAY_BASE_S == 0.5 and NACK_DELAY_MAX_S == 10.0
