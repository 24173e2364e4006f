"""Batch scoring end to end: one batch job -> a page-through of the source -> children.

The worker process pages through an `accounts-source` service of the test's own,
publishes one account-scoring child per id back to the jobs topic, consumes those
too, and the test reads the results the way the web app does, with ResultsReader.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from localcloud.functions import score_account

from tests.e2e.harness import WorkerProcess, provision, publish, uid, worker_env, write_kind
from worker.client import BatchProgress, ResultsReader
from worker.core.messages import Result
from worker.core.settings import load_settings

pytestmark = pytest.mark.e2e

ACCOUNTS = 5000


def write_batch_kind(catalog: Path, source: str, *, page_size: int = 500) -> None:
    (catalog / "batch-scoring.toml").write_text(
        "\n".join(
            [
                'kind = "batch-scoring"',
                'handler = "batch"',
                f'service = "{source}"',
                "attempts = 4",
                "backoff_initial_s = 0.05",
                "backoff_max_s = 0.2",
                "[batch]",
                'child_kind = "account-scoring"',
                f"page_size = {page_size}",
                "page_source = true",
            ]
        )
        + "\n"
    )


@pytest.fixture
def stack(local_cloud: Any, pubsub_emulator: Any, names: Any, tmp_path: Path) -> dict[str, Any]:
    suffix = uid()
    scoring = local_cloud.add_service(f"scoring-{suffix}", "account-scoring")
    source = local_cloud.add_service(f"source-{suffix}", "accounts-source")
    source.total_accounts = ACCOUNTS
    catalog = tmp_path / "jobs"
    write_kind(catalog, "account-scoring", scoring.name, attempts=6, backoff_initial_s=0.05)
    write_batch_kind(catalog, source.name)
    env = worker_env(local_cloud, names, WORKER_CATALOG_DIR=str(catalog), WORKER_MAX_IN_FLIGHT="200")
    provision(env)
    return {"env": env, "scoring": scoring, "source": source}


# Turns of 4 pages of 500 (worker/gcp/batch.py PAGES_PER_TURN): 2,000, 4,000, 5,000.
TURNS = 3


def test_a_batch_delivered_twice_fans_out_to_each_source_account_once(stack: dict[str, Any]) -> None:
    env = stack["env"]
    batch_id = f"batch-{uid()}"
    job = {"job_id": batch_id, "kind": "batch-scoring", "payload": {"source": True}}
    reader = ResultsReader(settings=load_settings(**env), max_messages=1000, pull_timeout_s=5)
    progress = reader.progress(batch_id)
    mirror = BatchProgress(batch_id)  # recomputed here from what the reader hands out
    parents: list[Result] = []
    children: dict[str, Result] = {}
    with WorkerProcess(env) as worker:
        worker.wait_ready()
        publish(env, [job, job])  # the same batch job twice, as a redelivery would
        deadline = time.monotonic() + 50
        # Every child arrives twice (once per fan-out) and so does the parent's result;
        # the reader hands each out once and counts the rest as duplicates.
        while time.monotonic() < deadline and not (
            progress.done and reader.duplicates == ACCOUNTS + TURNS * 2 - 2
        ):
            for result in reader.poll():
                if result.job_id == batch_id:
                    parents.append(result)
                else:
                    children[result.job_id or ""] = result
                mirror.update(result)
                assert (progress.succeeded, progress.failed, progress.outstanding) == (
                    mirror.succeeded,
                    mirror.failed,
                    mirror.outstanding,
                )
        assert worker.stop() == 0
    assert progress.done, progress.as_dict()
    assert len(children) == ACCOUNTS
    assert set(children) == {f"{batch_id}:{i}" for i in range(ACCOUNTS)}
    for job_id, result in children.items():
        index = int(job_id.rsplit(":", 1)[1])
        assert result.status == "succeeded", result
        assert result.batch is not None and (result.batch.id, result.batch.index) == (batch_id, index)
        assert result.batch.total == ACCOUNTS
        assert result.response["score"] == score_account({"account_id": f"acct-{index:06d}"})
    assert progress.as_dict() == {
        "batch_id": batch_id,
        "total": ACCOUNTS,
        "succeeded": ACCOUNTS,
        "failed": 0,
        "rejected": 0,
        "expired": 0,
        "cancelled": 0,
        "running": 0,
        "scheduled": 0,
        "outstanding": 0,
        "done": True,
    }
    # Both deliveries of the batch job published the same 5,000 ids: 10,000 child
    # results in all, 5,000 of them duplicates, and the batch job's results of each
    # turn (two `running`, then `succeeded`) twice: the first running and the final
    # one are handed out.
    assert reader.duplicates == ACCOUNTS + TURNS * 2 - 2
    assert [p.status for p in parents] == ["running", "succeeded"]
    assert parents[0].response == {"batch_id": batch_id, "children_published": 2000, "total": ACCOUNTS}
    assert parents[-1].response == {"batch_id": batch_id, "children_published": ACCOUNTS, "total": ACCOUNTS}
    assert progress.parent is not None and progress.parent.response["children_published"] == ACCOUNTS
    # Each source page was asked for with the worker's token, once per delivery: the
    # source says its total_size, so there is no separate counting pass.
    assert len(stack["source"].requests) == 2 * (ACCOUNTS // 500)
