"""The span recorder's sampling and the span relay's wire, without a worker."""

from __future__ import annotations

import io
import pickle
import struct
import sys
import time

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from worker.telemetry.recorder import CLIENT, ProcessorSink, Sampler, SpanRecord, parse_traceparent
from worker.telemetry.relay import RelaySink, relay

TRACE = int("c" * 32, 16)


def record(span_id: int, parent_id: int = 0, error: str | None = None) -> SpanRecord:
    attributes = {"http.request.method": "POST"}
    made = SpanRecord("POST", CLIENT, TRACE, span_id, parent_id, False, 1_000, attributes)
    made.end_ns = 2_000
    made.error = error
    return made


def frame(records: list[SpanRecord]) -> bytes:
    data = pickle.dumps([r.as_tuple() for r in records])
    return struct.pack(">I", len(data)) + data


def test_the_relay_reads_batches_into_sdk_spans_until_its_input_ends() -> None:
    exporter = InMemorySpanExporter()
    sink = ProcessorSink([SimpleSpanProcessor(exporter)])
    stream = io.BytesIO(frame([record(1)]) + frame([record(2, parent_id=1, error="boom")]) + b"\x00\x00")
    assert relay(stream, sink) == 2  # a torn last frame (the worker died mid-write) is dropped
    first, second = exporter.get_finished_spans()
    assert first.kind is SpanKind.CLIENT and first.parent is None
    assert first.status.status_code is StatusCode.UNSET
    assert (first.start_time, first.end_time) == (1_000, 2_000)
    assert second.parent is not None and second.parent.span_id == 1 and second.context.trace_id == TRACE
    assert second.status.status_code is StatusCode.ERROR and second.status.description == "boom"
    assert second.attributes["http.request.method"] == "POST"


def test_a_relay_that_died_costs_spans_never_a_blocked_job() -> None:
    sink = RelaySink("p", command=[sys.executable, "-c", "pass"])  # exits at once
    time.sleep(0.5)
    started = time.monotonic()
    for i in range(20):
        sink.submit([record(i + 1) for _ in range(500)])
        time.sleep(0.05)
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while sink.dropped == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sink.dropped > 0
    started = time.monotonic()
    sink.shutdown(2.0)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("env", "parent", "sampled"),
    [
        ({}, None, True),  # the default: parent-based, always on
        ({}, False, False),  # the sender did not sample: neither does the worker
        ({"OTEL_TRACES_SAMPLER": "always_on"}, False, True),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, True, False),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, True, True),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, None, False),
    ],
)
def test_sampling_follows_otel_traces_sampler(
    env: dict[str, str], parent: bool | None, sampled: bool
) -> None:
    assert Sampler(env).sampled(TRACE, parent) is sampled


def test_a_ratio_samples_that_share_of_trace_ids_as_the_sdk_does() -> None:
    sampler = Sampler({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    ids = [i * 0x9E3779B97F4A7C15 % (1 << 128) for i in range(1, 20_001)]
    share = sum(sampler.sampled(t, None) for t in ids) / len(ids)
    assert 0.23 < share < 0.27
    assert sampler.sampled((1 << 64) // 4 - 1, None) and not sampler.sampled((1 << 64) // 4, None)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "00-" + "0" * 32 + "-" + "d" * 16 + "-01",
        "00-" + "c" * 32 + "-" + "0" * 16 + "-01",
        "ff-" + "c" * 32 + "-" + "d" * 16 + "-01",
        "00-" + "C" * 32 + "-" + "d" * 16 + "-01",
        "00-" + "c" * 32 + "-" + "d" * 16 + "-01\r\nX: y",
    ],
)
def test_only_a_valid_traceparent_is_continued(bad: str) -> None:
    assert parse_traceparent(bad) is None
    assert parse_traceparent("00-" + "c" * 32 + "-" + "d" * 16 + "-00") == (TRACE, int("d" * 16, 16), False)
