"""Draw one trace as a waterfall PNG (docs/operations.md's picture).

    TRACE_PICTURE_JSON=/tmp/trace.json .venv/bin/pytest -q tests/e2e/test_telemetry.py
    .venv/bin/python scripts/trace_waterfall.py /tmp/trace.json docs/img/trace-one-job.png

The JSON is what tests/e2e/test_telemetry.py writes of the first job's trace: the
spans an in-memory exporter caught, and the `traceparent` the local Cloud Run service
received. Needs matplotlib (`pip install matplotlib`), which the worker does not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLORS = {"PRODUCER": "#4e79a7", "CONSUMER": "#59a14f", "CLIENT": "#f28e2b", "INTERNAL": "#9c755f"}


def depth_first(spans: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    by_parent: dict[str | None, list[dict[str, Any]]] = {}
    ids = {s["span_id"] for s in spans}
    for span in spans:
        parent = span["parent_id"] if span["parent_id"] in ids else None
        by_parent.setdefault(parent, []).append(span)
    ordered: list[tuple[int, dict[str, Any]]] = []

    def walk(parent: str | None, depth: int) -> None:
        for span in sorted(by_parent.get(parent, []), key=lambda s: s["start_ns"]):
            ordered.append((depth, span))
            walk(span["span_id"], depth + 1)

    walk(None, 0)
    return ordered


def label(span: dict[str, Any]) -> str:
    attrs = span["attributes"]
    name = span["name"]
    if "http.response.status_code" in attrs:
        name += f"  {attrs['http.response.status_code']}"
    if "worker.job.status" in attrs:
        name += f"  [{attrs['worker.job.status']}]"
    return name


def draw(trace: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = depth_first(trace["spans"])
    t0 = min(s["start_ns"] for _, s in rows)
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) + 1.8))
    for y, (_, span) in enumerate(rows):
        start = (span["start_ns"] - t0) / 1e6
        width = max((span["end_ns"] - span["start_ns"]) / 1e6, 0.3)
        ax.barh(y, width, left=start, height=0.6, color=COLORS.get(span["kind"], "#bab0ac"))
        ax.text(start + width + 2, y, f"{width:.1f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(["    " * depth + label(span) for depth, span in rows], fontsize=9, family="monospace")
    ax.invert_yaxis()
    ax.set_xlabel("ms since the web app's enqueue span started")
    trace_id = trace["function_traceparent"].split("-")[1]
    ax.set_title(f"One job on the local cloud: trace {trace_id}", fontsize=10)
    call = next((s for _, s in rows if s["kind"] == "CLIENT"), None)
    if call is not None:
        ax.annotate(
            f"the function received traceparent {trace['function_traceparent']}\n"
            f"(parent = the worker's {call['name']} span {call['span_id']})",
            xy=(0.01, -0.16 - 0.2 / len(rows)),
            xycoords="axes fraction",
            fontsize=8,
            family="monospace",
        )
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, [k.lower() for k in COLORS], loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    draw(json.loads(source.read_text()), out)
    print(out)


if __name__ == "__main__":
    main()
