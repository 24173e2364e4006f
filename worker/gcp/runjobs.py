"""Cloud Run jobs: start one execution per job, follow it to its end, find it to cancel it.

`RunJobs.start` is the pipeline's handler for `run_job` kinds. It renders the kind's
template into RunJob overrides (a payload that does not fit is rejected first) and
adds the env `WORKER_JOB_ID` and `WORKER_REPLAY_COUNT`: RunJob takes no labels, but
an execution's `template` is "the template used to create tasks for this execution",
overrides included, so ListExecutions (newest first) finds it again. A start whose
execution already exists adopts it instead of running another; a new execution is
started only when none exists for this job id and replay count, and every earlier
one failed (a replay). Two workers racing on one message both start, then both see
the two executions and keep the oldest, cancelling the other.

The start is answered `running`, with a follow-up message (worker/core/followup.py)
that `RunJobs.follow` handles: it looks at the execution when due and publishes the
final result: `succeeded`, `failed` (plus a dead letter carrying the original job, so
`worker replay` starts a new execution) or `cancelled`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from google.api_core import exceptions as api_exceptions
from pydantic import ValidationError

from worker.core.catalog import Catalog, JobKind
from worker.core.dead_letters import REPLAY_OF, dead_letter_for
from worker.core.errors import InvalidJobError, JobError, PermanentJobError, TransientJobError, shorten
from worker.core.followup import MAX_AGE_S, FollowUp, is_follow_up
from worker.core.gcloud_command import gcloud, grant
from worker.core.messages import (
    ErrorInfo,
    ExecutionInfo,
    Job,
    JobStatus,
    Result,
    clip,
    describe_validation_error,
    now,
)
from worker.core.roles import RUN_JOB_EXECUTOR_WITH_OVERRIDES, RUN_VIEWER
from worker.core.runjob import JOB_ID_ENV, REPLAY_ENV, Overrides, render
from worker.core.shapes import CallResult, Delivery, Outcome, Republish
from worker.gcp.identity import TOKEN_CREATOR, credentials_refused

log = structlog.get_logger("worker.gcp.runjobs")

# Executions this long before the job's message was published cannot be its own.
LOOKBACK = timedelta(minutes=10)
_API_TIMEOUT_S = 30.0
_VIEWER_PERMISSIONS = ("run.executions.list", "run.executions.get", "run.jobs.get")
_PAGE_SIZE = 100

Handle = Callable[[Delivery], Awaitable[Outcome]]


def job_path(project: str, region: str, job: str) -> str:
    return f"projects/{project}/locations/{region}/jobs/{job}"


def execution_env(execution: Any) -> dict[str, str]:
    return {env.name: env.value for c in execution.template.containers for env in c.env}


def execution_state(execution: Any) -> JobStatus | None:
    """The final status of an execution, or None while it runs."""
    from google.cloud.run_v2.types import Condition

    if execution.completion_time is None:
        return None
    completed = next((c for c in execution.conditions if c.type_ == "Completed"), None)
    if completed is not None:
        if completed.execution_reason == Condition.ExecutionReason.CANCELLED:
            return JobStatus.CANCELLED
        if completed.state == Condition.State.CONDITION_SUCCEEDED:
            return JobStatus.SUCCEEDED
        if completed.state == Condition.State.CONDITION_FAILED:
            return JobStatus.FAILED
    if execution.cancelled_count:
        return JobStatus.CANCELLED
    if execution.failed_count or execution.succeeded_count < execution.task_count:
        return JobStatus.FAILED
    return JobStatus.SUCCEEDED


def execution_info(execution: Any) -> ExecutionInfo:
    return ExecutionInfo(
        name=execution.name,
        task_count=execution.task_count,
        succeeded_count=execution.succeeded_count,
        failed_count=execution.failed_count,
        cancelled_count=execution.cancelled_count,
        retried_count=execution.retried_count,
        log_uri=execution.log_uri,
        create_time=execution.create_time,
        completion_time=execution.completion_time,
    )


def completed_message(execution: Any) -> str:
    return next((c.message for c in execution.conditions if c.type_ == "Completed" and c.message), "")


def replay_count(attributes: dict[str, str]) -> int:
    try:
        return max(0, int(attributes.get("replay_count") or 0))
    except ValueError:
        return 0


def find_executions(executions_client: Any, parent: str, job_id: str, floor: datetime | None) -> list[Any]:
    """Executions of `parent` started for `job_id`, newest first, back to `floor` (sync)."""
    found = []
    pager = executions_client.list_executions(
        request={"parent": parent, "page_size": _PAGE_SIZE}, retry=None, timeout=_API_TIMEOUT_S
    )
    for execution in pager:
        if floor is not None and execution.create_time is not None and execution.create_time < floor:
            break
        if execution_env(execution).get(JOB_ID_ENV) == job_id:
            found.append(execution)
    return found


class RunJobs:
    """Starts and follows Cloud Run job executions with `run_v2` Jobs and Executions clients (sync,
    called in threads), as the worker's own identity."""

    def __init__(
        self,
        jobs_client: Any,
        executions_client: Any,
        catalog: Catalog,
        project: str,
        *,
        region: str,
        clock: Callable[[], datetime] = now,
    ) -> None:
        self._jobs = jobs_client
        self._executions = executions_client
        self._catalog = catalog
        self._project = project
        self._region = region
        self._clock = clock

    def route(self, handle: Handle) -> Handle:
        """`handle` for jobs, `follow` for follow-up messages."""

        async def routed(delivery: Delivery) -> Outcome:
            if is_follow_up(delivery.attributes):
                return await self.follow(delivery)
            return await handle(delivery)

        return routed

    # -- start -----------------------------------------------------------------

    async def start(self, job: Job, kind: JobKind, delivery: Delivery) -> CallResult:
        assert kind.run_job is not None  # the catalog guarantees it for "run_job" kinds
        spec = kind.run_job
        replay = replay_count(delivery.attributes)
        proof = delivery.attributes.get(REPLAY_OF, "")
        overrides = render(spec, kind.kind, job.payload, job.job_id, replay)
        region = kind.region or self._region
        parent = job_path(self._project, region, spec.job)
        began = self._clock()
        published = delivery.publish_time or began
        floor = min(job.created_at or published, published) - LOOKBACK
        try:
            execution, started = await asyncio.to_thread(
                self._find_or_run, parent, job.job_id, replay, proof, floor, overrides, spec.container
            )
        except Exception as exc:
            raise self._api_error(exc, spec.job, region, "run") from None
        if started:
            log.info("run_job_started", execution=execution.name)
        else:
            log.info("run_job_adopted", execution=execution.name)
        follow = FollowUp(
            job_id=job.job_id,
            kind=kind.kind,
            execution=execution.name,
            replay_count=replay,
            # An execution found already ended is reported at the first look.
            check_at=began + timedelta(seconds=0 if execution_state(execution) else spec.poll_initial_s),
            interval_s=spec.poll_initial_s,
            started_at=began,
            job_data=delivery.data.decode("utf-8"),
            checks=0,
        )
        return CallResult(
            http_status=None,
            response={"execution": execution.name, "started": started},
            attempts=1,
            status=JobStatus.RUNNING,
            execution=execution_info(execution),
            follow_up=Republish(follow.to_bytes(), follow.attributes()),
        )

    def _find_or_run(
        self,
        parent: str,
        job_id: str,
        replay: int,
        proof: str,
        floor: datetime,
        overrides: Overrides,
        container: str | None,
    ) -> tuple[Any, bool]:
        existing = find_executions(self._executions, parent, job_id, floor)
        same = [e for e in existing if execution_env(e).get(REPLAY_ENV) == str(replay)]
        if same:
            return _oldest(same), False
        unfailed = [e for e in existing if execution_state(e) != JobStatus.FAILED]
        if unfailed:
            return unfailed[0], False  # a replay while an execution runs or after one succeeded
        if existing and not any(e.uid and e.uid == proof for e in existing):
            # Every execution of the job failed: only `worker replay` starts another. Its proof is
            # the failed execution's uid, carried in the dead letter: the web app, which may
            # publish jobs, reads neither dead letters nor executions, so it cannot write one.
            raise InvalidJobError(
                "replay_not_proven",
                f"job {job_id!r} already failed in execution {existing[0].name} and this message "
                f"(replay_count {replay}) does not carry the {REPLAY_OF} attribute of its dead letter: "
                "only `worker replay --job-id JOB_ID` starts another execution",
            )
        mine = self._run(parent, overrides, container)
        # Another worker may have started one for the same message meanwhile: keep the oldest.
        rivals = [
            e
            for e in find_executions(self._executions, parent, job_id, floor)
            if execution_env(e).get(REPLAY_ENV) == str(replay)
        ]
        keep = _oldest(rivals) if rivals else mine
        if keep.name != mine.name:
            log.warning("run_job_duplicate_cancelled", cancelled=mine.name, kept=keep.name)
            self._executions.cancel_execution(name=mine.name, retry=None, timeout=_API_TIMEOUT_S)
            return keep, False
        return mine, True

    def _run(self, parent: str, overrides: Overrides, container: str | None) -> Any:
        from google.cloud import run_v2
        from google.protobuf import duration_pb2

        override = run_v2.RunJobRequest.Overrides.ContainerOverride(
            name=container or "",
            args=overrides.args or [],
            clear_args=overrides.args == [],
            env=[run_v2.EnvVar(name=k, value=v) for k, v in overrides.env.items()],
        )
        request = run_v2.RunJobRequest(
            name=parent,
            overrides=run_v2.RunJobRequest.Overrides(
                container_overrides=[override],
                task_count=overrides.task_count or 0,
                timeout=(
                    duration_pb2.Duration(seconds=overrides.task_timeout_s)
                    if overrides.task_timeout_s
                    else None
                ),
            ),
        )
        # No retry: RunJob is not idempotent. A lost answer is found by the next delivery.
        operation = self._jobs.run_job(request=request, retry=None, timeout=_API_TIMEOUT_S)
        execution = operation.metadata
        if execution is None or not execution.name:
            raise TransientJobError(
                "run_job_unconfirmed", f"RunJob on {parent} answered without its execution; looking again"
            )
        return execution

    def _api_error(self, exc: Exception, job: str, region: str, verb: str) -> JobError:
        if isinstance(exc, JobError):
            return exc
        where = f"Cloud Run job {job!r} in project {self._project!r} region {region!r}"
        if isinstance(exc, api_exceptions.NotFound):
            return PermanentJobError(
                "job_not_found",
                f"{where} does not exist (Admin API 404: {exc.message}); fix the kind's [run_job] job "
                "or region in the catalog, or deploy the job",
            )
        if isinstance(exc, api_exceptions.Forbidden):
            # Reading executions is run.viewer's (granted on the job, as for services); starting and
            # cancelling them is the executor role's, on the job.
            reading = any(p in str(exc.message) for p in _VIEWER_PERMISSIONS)
            if reading:
                role = RUN_VIEWER
                fix = grant("serviceAccount:WORKER_SA", role, job_path(self._project, region, job))
            else:
                role = RUN_JOB_EXECUTOR_WITH_OVERRIDES
                fix = grant("serviceAccount:WORKER_SA", role, job_path(self._project, region, job))
            # Granted per job, a role cannot tell "denied" from "does not exist": Cloud Run
            # answers 403 for both, so the message names both and how to tell them apart.
            listing = gcloud("run", "jobs", "list", region=region, project=self._project)
            return PermanentJobError(
                "permission_denied",
                f"the worker's identity may not {verb} {where}, or it does not exist (Admin API 403: "
                f"{exc.message}); if it exists ({listing}), it needs {role}: {fix}",
            )
        if isinstance(exc, api_exceptions.InvalidArgument | api_exceptions.FailedPrecondition):
            return PermanentJobError(
                "run_job_refused", f"the Admin API refused to run {where}: {exc.message}"
            )
        if credentials_refused(exc):
            return PermanentJobError(
                "token_creator_missing",
                f"the worker's credentials were refused by the Admin API: {shorten(exc)}; when "
                f"impersonating, the caller needs {TOKEN_CREATOR} on the service account",
            )
        return TransientJobError(
            "admin_api_unavailable", f"the Admin API did not answer for {where}: {shorten(exc)}"
        )

    # -- follow ------------------------------------------------------------------

    async def follow(self, delivery: Delivery) -> Outcome:
        try:
            return await self._follow(delivery)
        except Exception:  # a bug must not lose the follow-up nor stop the worker
            log.exception("job_internal_error")
            return Outcome.retry("internal_error")

    async def _follow(self, delivery: Delivery) -> Outcome:
        at = self._clock()
        try:
            follow = FollowUp.model_validate_json(delivery.data)
            kind = self._catalog.lookup(follow.kind)
            if kind.run_job is None:
                raise InvalidJobError("invalid_follow_up", f"kind {kind.kind!r} runs no Cloud Run job")
            region = kind.region or self._region
            parent = job_path(self._project, region, kind.run_job.job)
            if not follow.execution.startswith(parent + "/executions/"):
                raise InvalidJobError(
                    "invalid_follow_up", f"execution {follow.execution[:300]!r} is not one of {parent}"
                )
            refusal = follow.refusal(at, kind.run_job.poll_max_s)
            if refusal is not None:
                raise InvalidJobError("invalid_follow_up", f"follow-up refused: {refusal}")
            job = _started_job(follow)
        except ValidationError as exc:
            return self._reject(
                delivery, at, InvalidJobError("invalid_follow_up", describe_validation_error(exc))
            )
        except InvalidJobError as exc:
            return self._reject(delivery, at, exc)
        if not follow.due(at):
            return Outcome.settled(
                None, follow_up=Republish(delivery.data, follow.attributes()), hold_s=follow.hold(at)
            )
        try:
            execution = await asyncio.to_thread(
                self._executions.get_execution, name=follow.execution, retry=None, timeout=_API_TIMEOUT_S
            )
        except Exception as exc:
            error = self._api_error(exc, kind.run_job.job, region, "read the execution of")
            if isinstance(exc, api_exceptions.NotFound):
                # Nothing to verify a follow-up against: rejected, not `failed` (a forged one
                # naming a made-up execution must not mark a real job failed).
                return self._reject(
                    delivery,
                    at,
                    InvalidJobError(
                        "execution_not_found",
                        f"execution {follow.execution} does not exist (deleted, or the follow-up was "
                        "not written by the worker); nothing was reported for the job",
                    ),
                )
            if isinstance(error, PermanentJobError):
                return self._final(follow, JobStatus.FAILED, None, at, error)
            log.warning("run_job_check_failed", execution=follow.execution, error=error.message)
            state = None
        else:
            forged = self._forged(follow, kind, job, execution)
            if forged is not None:
                return self._reject(delivery, at, InvalidJobError("forged_follow_up", forged))
            state = execution_state(execution)
        if state is None:
            if follow.too_old(at):
                error = PermanentJobError(
                    "follow_up_expired",
                    f"execution {follow.execution} still runs {MAX_AGE_S / 3600:.0f} h after it started; "
                    "the worker stops following it: cancel it (`worker cancel --job-id "
                    f"{follow.job_id}`) or wait, then look at it in the console",
                )
                return self._final(follow, JobStatus.FAILED, None, at, error)
            later = follow.next_check(at, kind.run_job.poll_max_s)
            return Outcome.settled(
                None, follow_up=Republish(later.to_bytes(), later.attributes()), hold_s=later.hold(at)
            )
        final_error: JobError | None = None
        if state == JobStatus.FAILED:
            final_error = PermanentJobError(
                "execution_failed",
                f"execution {follow.execution} failed: {execution.failed_count} of {execution.task_count} "
                f"task(s) failed ({completed_message(execution) or 'no message'}); "
                f"logs: {execution.log_uri}; "
                f"fix the cause, then `worker replay --job-id {follow.job_id}` starts a new execution",
            )
        elif state == JobStatus.CANCELLED:
            final_error = PermanentJobError(
                "execution_cancelled", f"execution {follow.execution} was cancelled"
            )
        return self._final(follow, state, execution, at, final_error)

    def _forged(self, follow: FollowUp, kind: JobKind, job: Job, execution: Any) -> str | None:
        """Why `execution` is not the one the worker started for this follow-up, or None.

        The worker started it with WORKER_JOB_ID and WORKER_REPLAY_COUNT and the overrides
        rendered from `job_data`; a follow-up naming another job's execution, another replay,
        or data other than what started it is not the worker's."""
        assert kind.run_job is not None
        env = execution_env(execution)
        name = follow.execution
        if env.get(JOB_ID_ENV) != follow.job_id:
            return f"execution {name} was not started for job {follow.job_id!r}: forged or misrouted"
        if env.get(REPLAY_ENV) != str(follow.replay_count):
            return f"execution {name} is not replay {follow.replay_count} of job {follow.job_id!r}"
        try:
            overrides = render(kind.run_job, kind.kind, job.payload, job.job_id, follow.replay_count)
        except InvalidJobError as exc:
            return f"job_data does not fit kind {kind.kind!r}: {exc.message}"
        args = [list(c.args) for c in execution.template.containers]
        if any(env.get(k) != v for k, v in overrides.env.items()) or (
            overrides.args is not None and overrides.args not in args
        ):
            return (
                f"job_data does not render to execution {name}'s args and env: not the job that started "
                "it (or the kind's [run_job] template changed while it ran)"
            )
        return None

    def _final(
        self,
        follow: FollowUp,
        status: JobStatus,
        execution: Any,
        at: datetime,
        error: JobError | None,
    ) -> Outcome:
        try:
            batch = Job.model_validate_json(follow.job_data).batch
        except ValidationError:
            batch = None
        finished = (execution.completion_time if execution is not None else None) or at
        result = Result(
            job_id=follow.job_id,
            kind=follow.kind,
            status=status,
            attempts=1,
            error=ErrorInfo(code=error.code, message=error.message) if error else None,
            started_at=follow.started_at,
            finished_at=finished,
            duration_ms=max(0, int((finished - follow.started_at).total_seconds() * 1000)),
            batch=batch,
            execution=execution_info(execution) if execution is not None else None,
        )
        dead_letter = None
        if status == JobStatus.FAILED and error is not None:
            attributes = {
                "job_id": follow.job_id,
                "kind": follow.kind,
                "replay_count": str(follow.replay_count),
            }
            if execution is not None and execution.uid:
                # What lets `worker replay` (who reads this dead letter) start another execution.
                attributes[REPLAY_OF] = execution.uid
            original = Delivery(data=follow.job_data.encode("utf-8"), attributes=attributes)
            dead_letter = dead_letter_for(original, result, error)
        if status == JobStatus.SUCCEEDED:
            log.info("job_succeeded", execution=follow.execution, checks=follow.checks)
        elif status == JobStatus.CANCELLED:
            log.info("job_cancelled", execution=follow.execution, checks=follow.checks)
        else:
            log.warning("job_failed", code=error.code if error else None, execution=follow.execution)
        return Outcome.settled(result, dead_letter=dead_letter, kind=follow.kind)

    def _reject(self, delivery: Delivery, at: datetime, error: InvalidJobError) -> Outcome:
        # A follow-up the worker did not write names a job only in the sender's words: its
        # result names none, so it cannot mark that job (the dead letter keeps the claim).
        result = Result(
            job_id=None,
            kind=None,
            status=JobStatus.REJECTED,
            error=ErrorInfo(code=error.code, message=error.message),
            started_at=at,
            finished_at=at,
            duration_ms=0,
        )
        log.warning(
            "follow_up_rejected",
            claimed_job_id=clip(delivery.attributes.get("job_id") or "", 128),
            error=error.message,
        )
        return Outcome.settled(result, dead_letter=dead_letter_for(delivery, result, error))


def _started_job(follow: FollowUp) -> Job:
    """The job a follow-up's `job_data` holds: the same id and kind, or InvalidJobError."""
    try:
        job = Job.model_validate_json(follow.job_data)
    except ValidationError as exc:
        raise InvalidJobError(
            "invalid_follow_up", f"job_data is not a job: {describe_validation_error(exc)}"
        ) from None
    if job.job_id != follow.job_id or job.kind != follow.kind:
        raise InvalidJobError(
            "invalid_follow_up",
            f"job_data is job {job.job_id!r} of kind {job.kind!r}, not {follow.job_id!r} of {follow.kind!r}",
        )
    return job


def _oldest(executions: list[Any]) -> Any:
    return min(executions, key=lambda e: (e.create_time or datetime.max.replace(tzinfo=UTC), e.name))
