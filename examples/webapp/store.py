"""Results in SQLite, keyed by job_id, written idempotently (worker.client.push.ResultStore).

One upsert decides, inside SQLite, whether a result replaces the stored one, by the
same rule as worker.client.supersedes: a job's first result is kept, a later one
replaces it only if the stored one did not succeed, the new status differs and is not
`running` or `scheduled` (a Cloud Run job execution's start, or a job put off to its
`not_before`, never replaces a final result; one replaces the other). So
Pub/Sub's redeliveries, and pushes racing on several instances, change nothing.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker.client import Result

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    job_id      TEXT PRIMARY KEY,
    kind        TEXT,
    status      TEXT NOT NULL,
    batch_id    TEXT,
    batch_index INTEGER,
    batch_total INTEGER,
    result      TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_by_batch ON results (batch_id);
"""

_UPSERT = """
INSERT INTO results (job_id, kind, status, batch_id, batch_index, batch_total, result, updated_at)
VALUES (:job_id, :kind, :status, :batch_id, :batch_index, :batch_total, :result, :updated_at)
ON CONFLICT (job_id) DO UPDATE SET
    kind = excluded.kind, status = excluded.status, batch_id = excluded.batch_id,
    batch_index = excluded.batch_index, batch_total = excluded.batch_total,
    result = excluded.result, updated_at = excluded.updated_at
WHERE results.status != 'succeeded' AND results.status != excluded.status
    AND (excluded.status NOT IN ('running', 'scheduled') OR results.status IN ('running', 'scheduled'))
"""

FINAL_STATUSES = ("succeeded", "failed", "rejected", "expired", "cancelled")


class SqliteResultStore:
    """A ResultStore in one SQLite file; a connection per call, so any thread may use it."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        with closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def record(self, result: Result) -> bool:
        batch = result.batch
        row = {
            "job_id": result.job_id,
            "kind": result.kind,
            "status": result.status.value,
            "batch_id": batch.id if batch else None,
            "batch_index": batch.index if batch else None,
            "batch_total": batch.total if batch else None,
            "result": result.model_dump_json(),
            "updated_at": datetime.now(UTC).isoformat(),
        }
        with closing(self._connect()) as db:
            return db.execute(_UPSERT, row).rowcount == 1

    def result(self, job_id: str) -> dict[str, Any] | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT result FROM results WHERE job_id = ?", (job_id,)).fetchone()
        return json.loads(row["result"]) if row else None

    def recent(self, jobs: int = 20, batches: int = 10) -> dict[str, Any]:
        """What the page shows when it loads: the newest results that belong to no batch
        (whoever published the job: the page, `worker enqueue`, `worker dev`), newest
        first, and the progress of the newest batches."""
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT result FROM results WHERE batch_id IS NULL AND job_id NOT IN "
                "(SELECT batch_id FROM results WHERE batch_id IS NOT NULL) "
                "ORDER BY updated_at DESC LIMIT ?",
                (jobs,),
            ).fetchall()
            batch_ids = db.execute(
                "SELECT batch_id FROM results WHERE batch_id IS NOT NULL "
                "GROUP BY batch_id ORDER BY MIN(updated_at) DESC LIMIT ?",
                (batches,),
            ).fetchall()
        return {
            "jobs": [json.loads(row["result"]) for row in rows],
            "batches": [self.progress(row["batch_id"]) for row in batch_ids],
        }

    def progress(self, batch_id: str) -> dict[str, Any]:
        """A batch's progress from its children's results (each child counted once)."""
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT status, COUNT(*) AS n, MAX(batch_total) AS total FROM results "
                "WHERE batch_id = ? GROUP BY status",
                (batch_id,),
            ).fetchall()
            parent = db.execute("SELECT status FROM results WHERE job_id = ?", (batch_id,)).fetchone()
        counts = {status: 0 for status in (*FINAL_STATUSES, "running", "scheduled")}
        total = None
        for row in rows:
            counts[row["status"]] = row["n"]
            total = row["total"] if total is None else max(total, row["total"])
        finished = sum(counts[status] for status in FINAL_STATUSES)  # `running`, `scheduled` are not finished
        return {
            "batch_id": batch_id,
            "total": total,
            **counts,
            "finished": finished,
            "outstanding": None if total is None else total - finished,
            "done": total is not None and finished >= total,
            "batch_job": parent["status"] if parent else None,
        }
