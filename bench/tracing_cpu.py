"""What tracing costs per job in CPU, measured in one process (robust to a busy machine).

    python -m bench.tracing_cpu [--jobs 5000] [--rounds 3] [--concurrency 50]

The worker's own per-job path, as `worker run` drives it (its garbage collector
settled the same way, worker/runtime/heap.py): `Pipeline.handle` (decode,
catalog, the resolver's cache, the token source's cache) and the real `Invoker` making
an HTTP call to an aiohttp server in this process, then the result-publish step (a
stand-in publisher that resolves at once) and the job span's end. Pub/Sub is left
out, so what remains is the part tracing adds to. Per mode, CPU seconds of this
process (every thread: the batch span processor's export included) per job:

- **off**: no OTEL_* configuration (`NO_TELEMETRY`);
- **sdk-memory**, **sdk-otlp**: the SDK's own tracer in the process (`SdkTelemetry`),
  every job sampled, spans to an in-memory exporter or over OTLP/HTTP to
  `bench/otlp_sink.py` (a process of its own), through a batch span processor;
- **recorder-memory**: the worker's recorder (`RecordingTelemetry`), its spans made
  SDK spans in this process (`ProcessorSink`) for an in-memory exporter;
- **relay-otlp**: as `worker run` does it: the recorder, and the span relay (a child
  process) exporting over OTLP; the relay's CPU is counted (it exits, exported, before
  the figure is taken), less its start-up (importing the SDK); **relay-otlp-10%**
  the same with `parentbased_traceidratio` at 0.1.

Modes alternate within each round, so load from other processes spreads evenly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import psutil
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from localcloud import free_port
from worker.core.catalog import Catalog, JobKind
from worker.core.pipeline import Pipeline
from worker.core.shapes import Delivery
from worker.core.telemetry import NO_TELEMETRY, Metrics, Telemetry
from worker.gcp.invoker import Invoker
from worker.runtime import heap
from worker.telemetry.recorder import ProcessorSink, RecordingTelemetry, Sampler
from worker.telemetry.relay import RelaySink
from worker.telemetry.tracing import SdkTelemetry

STARTUP_CPU_S = [0.0]  # the relay's CPU before the first job, taken off its mode's figure
MODES = ("off", "sdk-memory", "sdk-otlp", "recorder-memory", "relay-otlp", "relay-otlp-10%")


class Tokens:
    async def token(self, audience: str) -> str:
        return "token"

    def invalidate(self, audience: str, token: str) -> None:
        pass


class Resolver:
    def __init__(self, url: str) -> None:
        self.url = url

    async def resolve(self, service: str, region: str) -> str:
        return self.url


def telemetry(mode: str, sink_port: int) -> tuple[Telemetry, Callable[[], None]]:
    """The mode's Telemetry, and what finishes its export (counted in the mode's CPU)."""
    if mode == "off":
        return NO_TELEMETRY, lambda: None
    endpoint = f"http://127.0.0.1:{sink_port}/v1/traces"
    if mode.startswith("relay"):
        os.environ.update(OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=endpoint)
        relay = RelaySink("bench")
        ratio = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
        sampler = Sampler(ratio if mode.endswith("10%") else {})
        traced = RecordingTelemetry(relay, Metrics(), subscription="s", topic="jobs", sampler=sampler)
        time.sleep(3)  # its start-up (importing the SDK and the exporter) is not a cost per job
        warm = psutil.Process(relay.pid).cpu_times()
        STARTUP_CPU_S[0] = warm.user + warm.system
        return traced, lambda: relay.shutdown(60)
    if mode.endswith("memory"):
        exporter: Any = InMemorySpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint)
    processor = BatchSpanProcessor(exporter)

    def finish() -> None:
        processor.force_flush()
        processor.shutdown()

    if mode.startswith("recorder"):
        sink = ProcessorSink([processor])
        return RecordingTelemetry(sink, Metrics(), subscription="s", topic="jobs"), finish
    sampler = ParentBased(TraceIdRatioBased(0.1)) if mode.endswith("10%") else None
    provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
    provider.add_span_processor(processor)
    return SdkTelemetry(provider, Metrics(), subscription="s", topic="jobs", processors=[processor]), finish


async def run_mode(mode: str, jobs: int, concurrency: int, url: str, sink_port: int) -> float:
    tel, finish = telemetry(mode, sink_port)
    kind = JobKind(kind="bench", service="bench", attempts=1)
    catalog = Catalog({"bench": kind})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        invoker = Invoker(session, Tokens(), telemetry=tel)
        pipeline = Pipeline(
            catalog, Resolver(url), invoker, region="r", max_payload_bytes=100_000, telemetry=tel
        )
        prefix = mode.replace("%", "pct")  # a job id allows no "%"
        bodies = [
            json.dumps({"job_id": f"{prefix}-{i}", "kind": "bench", "payload": {"n": i}}).encode()
            for i in range(jobs)
        ]
        outcomes: list[str] = []
        pending = iter(enumerate(bodies))

        async def one(data: bytes, i: int) -> str:
            outcome = await pipeline.handle(Delivery(data=data, attributes={}, message_id=str(i)))
            send = {"messaging.system": "gcp_pubsub", "messaging.operation.type": "send"}
            with outcome.span.step("send job-results", span_kind="producer", **send):
                outcome.result.to_bytes()  # type: ignore[union-attr]
            outcome.span.end(outcome.result.status.value)  # type: ignore[union-attr]
            return outcome.result.status.value  # type: ignore[union-attr]

        async def slot() -> None:  # `concurrency` of these: the worker's call slots
            for i, data in pending:
                outcomes.append(await one(data, i))

        started = time.process_time()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        await asyncio.gather(*(slot() for _ in range(concurrency)))
        finish()  # the relay exits once it has exported everything: its CPU is then a child's
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        spent = time.process_time() - started
        spent += (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
        spent -= STARTUP_CPU_S[0]
        STARTUP_CPU_S[0] = 0.0
        if set(outcomes) != {"succeeded"}:
            raise RuntimeError(f"{mode}: not every job succeeded: {sorted(set(outcomes))}")
    return spent / jobs


async def serve() -> tuple[web.AppRunner, str]:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "n": (await request.json())["n"]})

    app = web.Application()
    app.router.add_post("/", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    heap.settle()  # as `worker run` does once it is built
    sink_port = free_port()
    sink = subprocess.Popen(
        [sys.executable, "-m", "bench.otlp_sink"],
        env=dict(os.environ, BENCH_SINK_PORT=str(sink_port)),
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.5)

        async def all_rounds() -> dict[str, list[float]]:
            runner, url = await serve()
            per_job: dict[str, list[float]] = {m: [] for m in MODES}
            try:
                await run_mode("off", 500, args.concurrency, url, sink_port)  # warm-up
                for round_no in range(args.rounds):
                    for mode in MODES:
                        cost = await run_mode(mode, args.jobs, args.concurrency, url, sink_port)
                        per_job[mode].append(cost)
                        print(f"round {round_no + 1} {mode:>6}: {1e6 * cost:7.0f} us CPU/job", flush=True)
            finally:
                await runner.cleanup()
            return per_job

        per_job = asyncio.run(all_rounds())
    finally:
        sink.terminate()
        sink.wait(10)
    off = statistics.median(per_job["off"])
    print()
    for mode in MODES:
        median = statistics.median(per_job[mode])
        print(f"{mode:>6}: median {1e6 * median:6.0f} us CPU/job ({median / off:.2f}x off)")


if __name__ == "__main__":
    main()
