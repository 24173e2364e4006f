"""Exponential backoff with a cap and jitter: the one formula every retry uses.

Before retry `n` (n = 1 for the first retry) the ceiling is

    ceiling(n) = min(max_s, initial_s * 2 ** (n - 1))

and the wait is drawn below it, so replicas that failed together do not retry in step:

- full jitter:  uniform(0, ceiling(n))                   (calls to a function: invoker.py)
- equal jitter: ceiling(n) / 2 + uniform(0, ceiling(n) / 2)  (a nacked job's hold: consumer.py,
  which must wait at least half the ceiling so an outage cannot use up every
  delivery attempt at once)

A server's `Retry-After` overrides the formula; that choice is the caller's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    initial_s: float
    max_s: float

    def ceiling(self, n: int) -> float:
        """The longest wait before retry `n` (1-based; anything below 1 counts as 1)."""
        # The exponent stops growing long after the cap is reached, so no float overflows.
        return min(self.max_s, self.initial_s * 2 ** min(max(1, n) - 1, 64))

    def full_jitter(self, n: int) -> float:
        return random.uniform(0, self.ceiling(n))

    def equal_jitter(self, n: int) -> float:
        half = self.ceiling(n) / 2
        return half + random.uniform(0, half)
