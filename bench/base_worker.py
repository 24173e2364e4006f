"""`worker run` from another source tree, to compare this code with a base side by side.

    BENCH_BASE_TREE=/path/with/worker/package python -m bench.base_worker

The tree's `worker` package (e.g. `git archive main worker | tar -x -C DIR`) is
imported instead of this checkout's, with the same virtual environment.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.environ["BENCH_BASE_TREE"])
    for name in [m for m in sys.modules if m == "worker" or m.startswith("worker.")]:
        del sys.modules[name]
    from worker.cli import main

    sys.argv = ["worker", "run"]
    main()
