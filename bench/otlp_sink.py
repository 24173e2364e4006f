"""A minimal OTLP/HTTP trace receiver for the tracing benchmark: counts what it is sent.

    BENCH_SINK_PORT=PORT python -m bench.otlp_sink   (listens on 127.0.0.1:PORT; GET /count -> JSON)

It keeps every `POST /v1/traces` body and answers 200 as a collector does; `GET /count`
decodes what arrived since the last count (protobuf ExportTraceServiceRequest) and
says how many spans that was. Decoding waits for the count, so during a run the sink
costs the shared machine next to nothing (a collector would run elsewhere).
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

_lock = threading.Lock()
_counts = {"requests": 0, "spans": 0, "bytes": 0}
_bodies: list[bytes] = []
_RESPONSE = ExportTraceServiceResponse().SerializeToString()


class Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with _lock:
            _counts["requests"] += 1
            _counts["bytes"] += len(body)
            _bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(_RESPONSE)))
        self.end_headers()
        self.wfile.write(_RESPONSE)

    def do_GET(self) -> None:
        with _lock:
            bodies = _bodies[:]
            _bodies.clear()
        spans = 0
        for body in bodies:
            request = ExportTraceServiceRequest.FromString(body)
            spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        with _lock:
            _counts["spans"] += spans
            data = json.dumps(_counts).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["BENCH_SINK_PORT"])), Sink)
    print("consumer_started", flush=True)  # what WorkerProcess.wait_ready looks for
    server.serve_forever()


if __name__ == "__main__":
    main()
