"""What tracing costs: `worker run` on one backlog, tracing off and on, side by side.

    python -m bench.tracing [--jobs N] [--rounds R] [--latency-s S] [--rate JOBS_PER_S] [--base-tree DIR]

Each round runs, one after another on fresh topics, the same backlog (no added
latency by default, so the worker is CPU-bound and any per-job cost shows in jobs/s),
or with `--rate` an open loop (steady state: compare CPU per 1,000 jobs and latency):

- **off**: as shipped, no OTEL_* variables (tracing and metrics off);
- **otlp**: OTEL_TRACES_EXPORTER=otlp, OTEL_TRACES_SAMPLER=always_on, to a local
  OTLP/HTTP receiver (`bench/otlp_sink.py`, its own process) that counts the spans
  (it decodes them only when asked for the count, after each run);
- **otlp-down**: the same, to a port where nothing listens: jobs must keep flowing
  while the exporter fails (the batch processor drops what it cannot send).

`worker run` exports its spans from the span relay, a child process
(worker/telemetry/relay.py); the CPU figures include it (bench/measure.py counts the
contender's live children). Rounds alternate the contenders, so a change in the
shared machine's load shows as spread between rounds rather than as a cost of
tracing. For steady state, give it a backlog that takes over 60 s (`--jobs 110000`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import urllib.request
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from tests.conftest import METADATA_PORT, PROJECT

BASE, OFF, ON, DOWN = "base", "off", "otlp", "otlp-down"


def sink_counts(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=10) as response:
        counts: dict[str, int] = json.loads(response.read())
        return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=int, default=4_000, help="jobs per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-in-flight", type=int, default=200)
    parser.add_argument("--latency-s", type=float, default=0.0, help="the function's added latency")
    parser.add_argument(
        "--rate", type=float, default=None, help="open loop: publish at this rate (jobs/s) while consuming"
    )
    parser.add_argument("--quick", action="store_true", help="5,000 jobs, one round")
    parser.add_argument("--only", default=f"{OFF},{ON},{DOWN}", help="contenders, in round order")
    parser.add_argument(
        "--base-tree",
        default=None,
        help=f"a tree with another `worker` package: adds contender {BASE!r} (e.g. main, no telemetry)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from bench.measure import machine
    from bench.report import RESULTS_DIR, row
    from bench.scenarios import CONTENDER_ENV, CONTENDERS, Scenario, run_contender
    from localcloud import LocalCloud, PubSubEmulator, free_port
    from tests.e2e.harness import WorkerProcess

    jobs, rounds = (5_000, 1) if args.quick else (args.jobs, args.rounds)
    sink_port, dead_port = free_port(), free_port()
    traced = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{sink_port}/v1/traces",
    }
    CONTENDER_ENV.update(
        {
            OFF: {},
            ON: traced,
            DOWN: {**traced, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{dead_port}/v1/traces"},
        }
    )
    CONTENDERS.update({OFF: "worker", ON: "worker", DOWN: "worker"})
    contenders = tuple(args.only.split(","))
    if args.base_tree:
        CONTENDERS[BASE] = "bench.base_worker"
        CONTENDER_ENV[BASE] = {"BENCH_BASE_TREE": str(Path(args.base_tree).resolve())}
        contenders = (BASE, *contenders)
    scenario = Scenario(
        "t",
        f"{'open loop' if args.rate else 'backlog'}, {args.latency_s * 1000:g} ms function, tracing off/on",
        jobs,
        args.latency_s,
        contenders,
        args.max_in_flight,
        rate_per_s=args.rate,
        timeout_s=max(300.0, jobs / 20),
    )
    runs = []
    spans: list[dict[str, int] | None] = []
    with (
        PubSubEmulator(project=PROJECT) as emulator,
        LocalCloud(project=PROJECT, metadata_port=METADATA_PORT) as cloud,
        WorkerProcess(
            dict(os.environ, BENCH_SINK_PORT=str(sink_port)), name="otlp-sink", module="bench.otlp_sink"
        ) as sink,
    ):
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        os.environ.update(cloud.env)
        sink.wait_ready()
        for round_no in range(rounds):
            for contender in contenders:
                print(f"round {round_no + 1}: {contender}, {jobs} jobs ...", flush=True)
                before = sink_counts(sink_port)
                run = run_contender(cloud, scenario, contender)
                after = sink_counts(sink_port)
                got = {k: after[k] - before[k] for k in after} if contender == ON else None
                runs.append(run)
                spans.append(got)
                print("    " + row(run) + (f"  spans received: {got['spans']}" if got else ""), flush=True)
    report = {
        "machine": machine(),
        "scenario": asdict(scenario),
        "runs": [{**asdict(r), "spans_received": s} for r, s in zip(runs, spans, strict=True)],
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"tracing-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
