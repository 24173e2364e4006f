"""The web app first (docs/contract.md, "Lanes"), end to end on the emulator and the
local cloud, measured as bench/lanes.py measures it at full size: interactive jobs
published during a batch reach the function about as fast as on an idle worker, every
child of the batch runs exactly once, and two batches started apart both progress."""

from __future__ import annotations

from typing import Any

import pytest

from bench.lanes import run_mode

pytestmark = pytest.mark.e2e


def test_interactive_jobs_do_not_wait_behind_a_batch_and_two_batches_take_turns(
    local_cloud: Any, pubsub_emulator: Any
) -> None:
    children = 6000
    report = run_mode(
        local_cloud, "lanes", children=children, interactive=12, rate=4.0, gap_s=2.0, fairness=True
    )
    idle_p95 = report["idle"]["to_call_s"]["p95"]
    during = report["during_batch"]["to_call_s"]
    assert during["n"] == 12, report
    assert during["p95"] <= max(1.0, 3 * idle_p95), report
    # Every child of the three batches (the big one, the one alone, the two halves)
    # called once, and every result a success or a turn's `running`.
    assert report["children_called"] == {1: 3 * children}, report
    assert set(report["statuses"]) <= {"succeeded", "running"}, report
    first = report["two_batches"]["first_progress_s"]
    assert first["A"] <= 10 and first["B"] <= 10, report
