"""`worker cancel JOB_ID`: cancel the running Cloud Run job execution of a job, record `cancelled`;
or, for a job put off to its `not_before`, delete its Cloud Tasks task before it runs.

The execution is found the way the worker finds it before starting one: by the
`WORKER_JOB_ID` env in its template, among the executions of every `run_job` kind's
job (or of `--kind`'s). It is cancelled with CancelExecution, and once the Admin API
reports it ended, a `cancelled` result is published so the web app learns it at
once; the worker following the execution publishes the same verdict when it next
looks, which the web app sees as a duplicate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from google.api_core import exceptions

from worker.core.catalog import Catalog, JobKind
from worker.core.messages import ErrorInfo, Job, JobStatus, Result, now
from worker.gcp.delay import find_job_tasks, job_of
from worker.gcp.runjobs import execution_info, execution_state, find_executions, job_path

_API_TIMEOUT_S = 30.0
_POLL_S = 0.5


class CancelError(Exception):
    """Nothing to cancel, or the Admin API refused; the message says which and what to do."""


@dataclass
class CancelReport:
    cancelled: list[tuple[JobKind, Any]] = field(default_factory=list)  # (kind, execution) now cancelled
    ended_otherwise: list[tuple[JobKind, Any, JobStatus]] = field(default_factory=list)
    still_running: list[tuple[JobKind, Any]] = field(default_factory=list)  # no end within the wait


def run_job_kinds(catalog: Catalog, kind: str | None) -> list[JobKind]:
    kinds = [k for k in catalog.values() if k.run_job is not None and kind in (None, k.kind)]
    if not kinds:
        known = sorted(k.kind for k in catalog.values() if k.run_job is not None)
        raise CancelError(
            f"kind {kind!r} does not run a Cloud Run job (run_job kinds: {', '.join(known) or 'none'})"
            if kind
            else "the catalog has no run_job kind, so no job has an execution to cancel"
        )
    return kinds


def cancel_job(
    executions_client: Any,
    catalog: Catalog,
    project: str,
    region: str,
    job_id: str,
    *,
    kind: str | None = None,
    wait_s: float = 60.0,
) -> CancelReport:
    """Cancel every running execution started for `job_id`; wait up to `wait_s` for them to end."""
    found, unreadable = [], []
    for job_kind in run_job_kinds(catalog, kind):
        assert job_kind.run_job is not None
        parent = job_path(project, job_kind.region or region, job_kind.run_job.job)
        try:
            found += [(job_kind, e) for e in find_executions(executions_client, parent, job_id, None)]
        except (exceptions.NotFound, exceptions.Forbidden) as exc:
            # One kind's job missing or out of reach must not hide another's execution.
            unreadable.append(f"{parent}: {exc.message}")
    running = [(k, e) for k, e in found if execution_state(e) is None]
    if not running:
        ended = ", ".join(f"{e.name} ({execution_state(e)})" for _, e in found)
        raise CancelError(
            f"job {job_id} has no running execution"
            + (f"; its executions have ended: {ended}" if found else " (none was started for it)")
            + (f"; could not look in {'; '.join(unreadable)}" if unreadable else "")
        )
    for _, execution in running:
        executions_client.cancel_execution(name=execution.name, retry=None, timeout=_API_TIMEOUT_S)
    report = CancelReport()
    deadline = time.monotonic() + wait_s
    pending = list(running)
    while pending:
        still = []
        for job_kind, execution in pending:
            latest = executions_client.get_execution(name=execution.name, timeout=_API_TIMEOUT_S)
            state = execution_state(latest)
            if state is None:
                still.append((job_kind, latest))
            elif state == JobStatus.CANCELLED:
                report.cancelled.append((job_kind, latest))
            else:
                report.ended_otherwise.append((job_kind, latest, state))
        pending = still
        if pending and time.monotonic() >= deadline:
            report.still_running = pending
            break
        if pending:
            time.sleep(_POLL_S)
    return report


def cancelled_result(job_id: str, kind: JobKind, execution: Any) -> Result:
    """The `cancelled` result of a job whose execution was cancelled."""
    started = execution.create_time or now()
    finished = execution.completion_time or now()
    return Result(
        job_id=job_id,
        kind=kind.kind,
        status=JobStatus.CANCELLED,
        attempts=1,
        error=ErrorInfo(code="execution_cancelled", message=f"execution {execution.name} was cancelled"),
        started_at=started,
        finished_at=finished,
        duration_ms=max(0, int((finished - started).total_seconds() * 1000)),
        execution=execution_info(execution),
    )


# -- jobs put off to their not_before (worker/gcp/delay.py) ----------------------------


def cancel_scheduled(
    tasks_client: Any, queue: str, job_id: str, kind: str | None = None
) -> list[tuple[Any, Job]]:
    """Delete the Cloud Tasks task(s) that would publish `job_id` again (only `kind`'s, with
    a kind: another kind's task is left alone); (task, job) of each deleted. A task that ran
    (or was deleted) in the meantime is not counted."""
    cancelled = []
    for task in find_job_tasks(tasks_client, queue, job_id):
        job, _ = job_of(task)
        if job is None or kind not in (None, job.kind):
            continue
        try:
            tasks_client.delete_task(name=task.name, timeout=_API_TIMEOUT_S)
        except exceptions.NotFound:
            continue  # dispatched meanwhile: the job runs, its result says so
        cancelled.append((task, job))
    return cancelled


def scheduled_cancelled_result(job: Job, task: Any) -> Result:
    """The `cancelled` result of a job whose task was deleted before it ran."""
    at = now()
    return Result(
        job_id=job.job_id,
        kind=job.kind,
        status=JobStatus.CANCELLED,
        attempts=0,
        error=ErrorInfo(
            code="scheduled_cancelled",
            message=f"cancelled before its not_before ({job.not_before}): task {task.name} deleted",
        ),
        started_at=at,
        finished_at=at,
        duration_ms=0,
        batch=job.batch,
        not_before=job.not_before,
        task=task.name,
    )
