"""The one backoff formula (worker/core/backoff.py) and the two jitters drawn under it."""

from __future__ import annotations

from worker.core.backoff import Backoff


def test_the_ceiling_doubles_from_the_initial_wait_up_to_the_cap() -> None:
    backoff = Backoff(0.5, 10.0)
    assert [backoff.ceiling(n) for n in (0, 1, 2, 3, 5, 6, 40, 10_000)] == [
        0.5,
        0.5,
        1.0,
        2.0,
        8.0,
        10.0,
        10.0,
        10.0,
    ]


def test_full_jitter_spans_zero_to_the_ceiling() -> None:
    backoff = Backoff(0.2, 10.0)
    waits = [backoff.full_jitter(3) for _ in range(500)]
    assert all(0 <= w <= 0.8 for w in waits)
    assert min(waits) < 0.2 and max(waits) > 0.6, "drawn over the whole window"


def test_equal_jitter_waits_at_least_half_the_ceiling() -> None:
    backoff = Backoff(0.5, 10.0)
    waits = [backoff.equal_jitter(4) for _ in range(500)]
    assert all(2.0 <= w <= 4.0 for w in waits)
    assert max(waits) - min(waits) > 1.0, "jittered, so replicas do not retry in step"
