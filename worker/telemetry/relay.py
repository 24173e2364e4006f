"""The span relay: a child process that exports the worker's spans, off its core.

    python -m worker.telemetry.relay PROJECT     (started by `RelaySink`, never by hand)

`RelaySink` (in the worker) buffers finished jobs' span records and, from a thread of
its own, writes them in batches down the child's stdin as length-prefixed pickles.
The child builds SDK `ReadableSpan`s (`ProcessorSink`) and hands them to a
`BatchSpanProcessor` per exporter named by OTEL_TRACES_EXPORTER, configured by the
same environment variables as the SDK's (OTEL_EXPORTER_OTLP_*, OTEL_BSP_*,
OTEL_SERVICE_NAME...). What costs CPU per span (the OTLP or Cloud Trace encoding and
the HTTP requests) runs there, on another core, not under the worker's GIL.

Neither side ever holds up a job: the worker's side only appends to a buffer; a
buffer past MAX_BUFFERED records drops what comes next (counted, logged once a
minute), as the SDK's batch processor drops on a full queue; a relay that died is
not restarted, its spans are dropped and the worker goes on. The child runs at a lower
scheduling priority (NICENESS) than the worker, so exporting spans takes the CPU the
jobs leave rather than the jobs' CPU. It ignores SIGINT and SIGTERM (a Ctrl-C or a
container stop reaches the whole process group) and exits at the end of its input,
once its processors have exported what they hold: the worker closes the pipe at
shutdown, or dies and the pipe closes by itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import IO, Any, BinaryIO

from worker.telemetry.recorder import ProcessorSink, SpanRecord, SpanSink

MAX_BUFFERED = 50_000  # span records waiting in the worker for the relay
BATCH = 2_048  # a write wakes up at this many records, else every FLUSH_EVERY_S
FLUSH_EVERY_S = 0.5
NICENESS = 10  # the relay's scheduling priority below the worker's
QUEUE_SIZE = 4 * MAX_BUFFERED  # the relay's batch span processors' queue
_HEADER = struct.Struct(">I")

log = logging.getLogger("worker.telemetry")


class RelaySink(SpanSink):
    """Span records to a relay child process; `command` starts it (tests may pass another)."""

    def __init__(self, project: str, command: list[str] | None = None) -> None:
        self._child = subprocess.Popen(
            command or [sys.executable, "-m", "worker.telemetry.relay", project],
            stdin=subprocess.PIPE,
            start_new_session=False,
        )
        self._lock = threading.Lock()
        self._pending: list[tuple[Any, ...]] = []
        self._wake = threading.Event()
        self._stopping = False
        self._dead = False
        self.dropped = 0
        self._last_warning = 0.0
        self._writer = threading.Thread(target=self._write_loop, name="span-relay", daemon=True)
        self._writer.start()

    @property
    def pid(self) -> int:
        return self._child.pid

    def submit(self, records: list[SpanRecord]) -> None:
        with self._lock:
            if self._dead or len(self._pending) >= MAX_BUFFERED:
                self.dropped += len(records)
                self._warn_dropped()
                return
            self._pending.extend(r.as_tuple() for r in records)
            if len(self._pending) >= BATCH:
                self._wake.set()

    def _warn_dropped(self) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 60.0:
            self._last_warning = now
            log.warning(
                "span relay %s: %d span(s) dropped so far",
                "exited" if self._dead else "cannot keep up",
                self.dropped,
            )

    def _write_loop(self) -> None:
        pipe = self._child.stdin
        assert pipe is not None
        while True:
            self._wake.wait(FLUSH_EVERY_S)
            self._wake.clear()
            with self._lock:
                batch, self._pending = self._pending, []
                stopping = self._stopping
            if batch and not self._write(pipe, batch):
                return
            if stopping:
                return

    def _write(self, pipe: IO[bytes], batch: list[tuple[Any, ...]]) -> bool:
        data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            pipe.write(_HEADER.pack(len(data)))
            pipe.write(data)
            pipe.flush()
        except (OSError, ValueError):  # the relay has gone
            with self._lock:
                self._dead = True
                self.dropped += len(batch)
                self._warn_dropped()
            return False
        return True

    def shutdown(self, timeout_s: float) -> None:
        """Send what is buffered, close the pipe, and give the relay until `timeout_s` to
        export; a relay still busy then is killed (what it held is lost)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._writer.join(max(0.0, deadline - time.monotonic()))
        if self._child.stdin is not None:
            with contextlib.suppress(OSError):
                self._child.stdin.close()
        try:
            self._child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("span relay did not finish exporting within %.1fs; the rest is dropped", timeout_s)
            self._child.kill()
            self._child.wait()


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = stream.read(size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def relay(stream: BinaryIO, sink: ProcessorSink) -> int:
    """Read batches from `stream` into `sink` until it ends; the number of spans read."""
    spans = 0
    while True:
        header = _read_exactly(stream, _HEADER.size)
        if header is None:
            return spans
        data = _read_exactly(stream, _HEADER.unpack(header)[0])
        if data is None:
            return spans
        batch = pickle.loads(data)
        sink.submit_tuples(batch)
        spans += len(batch)


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    # Jobs first: the relay takes the CPU the worker leaves (its buffer absorbs the wait).
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from worker.telemetry.config import TelemetryConfig
    from worker.telemetry.exporters import quiet_exporter_logs, resource, span_exporters

    logging.basicConfig(level=logging.WARNING, format="span relay: %(name)s: %(message)s")
    quiet_exporter_logs()
    project = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("GOOGLE_CLOUD_PROJECT", "")
    config = TelemetryConfig.from_env(os.environ)
    # The worker's spans arrive BATCH at a time, every FLUSH_EVERY_S: a queue of the SDK's
    # default 2,048 would drop part of every burst. OTEL_BSP_MAX_QUEUE_SIZE still wins.
    queue = None if os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE") else QUEUE_SIZE
    processors = [
        BatchSpanProcessor(e, max_queue_size=queue) for e in span_exporters(config.trace_exporters, project)
    ]
    sink = ProcessorSink(processors, resource())
    try:
        relay(sys.stdin.buffer, sink)
    finally:
        sink.shutdown(0)


if __name__ == "__main__":
    main()
