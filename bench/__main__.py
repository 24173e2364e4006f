"""`make bench`: throughput, latency and cost per job against the ceiling, a naive worker and Celery.

    python -m bench [--quick] [--max-in-flight 200] [--naive-cap-s 60] [--only a,b,c,d]

Starts the Pub/Sub emulator and the local cloud in this process, runs the scenarios
one contender at a time, prints a table and the targets, and writes the JSON and a
results-per-second PNG per scenario to bench/results/. The full run takes about a
quarter of an hour on two cores.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

# Picks the metadata port and points GCE_METADATA_HOST at it: google-auth reads it
# once, at import, so everything that imports google.auth is imported after this.
from tests.conftest import METADATA_PORT, PROJECT


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke size: about a minute")
    parser.add_argument("--max-in-flight", type=int, default=200, help="WORKER_MAX_IN_FLIGHT for (a)-(c)")
    parser.add_argument(
        "--naive-cap-s", type=float, default=60.0, help="stop the naive worker and Celery after this"
    )
    parser.add_argument("--only", default="a,b,c,d", help="scenarios to run, e.g. a,b")
    parser.add_argument("--out", type=Path, default=None, help="JSON directory (default bench/results)")
    parser.add_argument(
        "--contenders", default=None, help="only these contenders, e.g. ceiling,ours (default: all)"
    )
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="py-spy record --gil each `worker run` (and the minimal worker) this long, into bench/results",
    )
    args = parser.parse_args()
    # Exit through the context managers on SIGTERM too: they stop the worker processes,
    # the emulator and the local cloud, which would otherwise outlive the driver.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from bench.report import RESULTS_DIR, run_suite, table
    from bench.scenarios import suite
    from localcloud import LocalCloud, PubSubEmulator

    wanted = set(args.only.split(","))
    scenarios = [
        s
        for s in suite(quick=args.quick, max_in_flight=args.max_in_flight, naive_cap_s=args.naive_cap_s)
        if s.name in wanted
    ]
    if args.contenders:
        keep = args.contenders.split(",")
        scenarios = [replace(s, contenders=tuple(c for c in s.contenders if c in keep)) for s in scenarios]
    if args.profile:
        os.environ["BENCH_PROFILE_S"] = str(args.profile)
    with (
        PubSubEmulator(project=PROJECT) as emulator,
        LocalCloud(project=PROJECT, metadata_port=METADATA_PORT) as cloud,
    ):
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        os.environ.update(cloud.env)
        from localcloud.pubsub import group_members

        pids = group_members(emulator.pgid) if emulator.pgid is not None else []
        report, path = run_suite(cloud, scenarios, args.out or RESULTS_DIR, emulator_pids=pids)
    print()
    print(table(report))
    print(f"\nJSON: {path}")
    for plot in report.get("plots", []):
        print(f"plot: {plot}")


if __name__ == "__main__":
    main()
