"""The cyclic garbage collector, tuned for a process that does one thing for hours.

Measured in `bench/` (BENCHMARKS.md, issue 12): with CPython's defaults the collector
took about 40 us of every job's CPU. Each job allocates a few hundred short-lived
containers (a task, futures, an HTTP request and response, a result), so a young
collection ran every couple of jobs, and every tenth of those walked the clients,
modules and catalog built at start-up, which never become garbage.

`settle()` runs once the worker is built: it collects what start-up left, moves every
survivor to the permanent generation (`gc.freeze`, which the collector no longer walks)
and raises the young generation's threshold, so a collection runs every few hundred
jobs instead. Reference counting still frees almost everything at once; only cycles
wait for the collector, and they are few (an exception's traceback, a cancelled task).
"""

from __future__ import annotations

import gc

# Container allocations (minus deallocations) between young collections; CPython's is 700.
YOUNG_THRESHOLD = 50_000


def settle() -> None:
    """Collect, freeze what survives, and collect the young generation less often.

    For a process of its own (`worker run`): the settings are process-wide."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
