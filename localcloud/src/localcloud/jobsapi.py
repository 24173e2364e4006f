"""The Cloud Run Admin API v2's jobs, REST: what google-cloud-run's JobsClient and ExecutionsClient call.

- `GET  /v2/projects/P/locations/L/jobs/J`                    GetJob (run.jobs.get)
- `POST /v2/projects/P/locations/L/jobs/J:run`                RunJob: a google.longrunning.Operation
  whose metadata is the new Execution (run.jobs.run, plus run.jobs.runWithOverrides
  when the body carries overrides)
- `POST /v2/projects/P/locations/L/jobs/J:testIamPermissions` the asked permissions the caller holds
- `GET  /v2/projects/P/locations/L/jobs/J/executions`         ListExecutions, newest first, paged
- `GET  /v2/projects/P/locations/L/jobs/J/executions/E`       GetExecution
- `POST /v2/projects/P/locations/L/jobs/J/executions/E:cancel` CancelExecution (an Operation)
- `GET  /v2/projects/P/locations/L/operations/O`              GetOperation

Permissions go through the predefined roles that hold them (iam.ROLE_PERMISSIONS);
a denied call answers 403 before a missing job answers 404, as Google's does.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from localcloud.googleapis import google_error, unauthenticated
from localcloud.iam import IamPolicy, has_permission, member_for
from localcloud.runjobs import LocalExecution, LocalRunJob

EXECUTION_TYPE = "type.googleapis.com/google.cloud.run.v2.Execution"


@dataclass
class _Operation:
    name: str
    execution: LocalExecution


@dataclass(frozen=True)
class JobsContext:
    project: str
    iam: IamPolicy
    caller: Callable[[web.Request], str | None]
    count: Callable[[str, str], None]
    jobs: Callable[[], list[LocalRunJob]]
    operations: dict[str, _Operation] = field(default_factory=dict)


def add_job_routes(app: web.Application, ctx: JobsContext) -> None:
    base = "/v2/projects/{project}/locations/{location}"

    def find(request: web.Request, permission: str) -> tuple[LocalRunJob | None, web.Response | None]:
        project, location = request.match_info["project"], request.match_info["location"]
        name = request.match_info["job"].split(":", 1)[0]
        principal = ctx.caller(request)
        if principal is None:
            return None, unauthenticated()
        resource = f"projects/{project}/locations/{location}/jobs/{name}"
        if not has_permission(ctx.iam, member_for(principal), permission, f"run.job:{name}"):
            return None, denied(permission, resource)
        for job in ctx.jobs():
            if project == ctx.project and job.name == name and job.region == location:
                return job, None
        return None, google_error(
            404,
            f"Resource '{name}' of kind 'JOB' in region '{location}' in project '{project}' does not exist.",
            "NOT_FOUND",
        )

    async def get_job(request: web.Request) -> web.Response:
        ctx.count("GetJob", request.match_info["job"])
        job, error = find(request, "run.jobs.get")
        return error or web.json_response(job.to_json(time.time()))  # type: ignore[union-attr]

    async def job_action(request: web.Request) -> web.Response:
        name, _, verb = request.match_info["job"].partition(":")
        if verb == "run":
            return await run_job(request, name)
        if verb == "testIamPermissions":
            return await test_permissions(request, name)
        return google_error(404, f"Method '{verb}' not found.", "NOT_FOUND")

    async def run_job(request: web.Request, name: str) -> web.Response:
        ctx.count("RunJob", name)
        body = await _json_body(request)
        overrides = body.get("overrides") or {}
        job, error = find(request, "run.jobs.run")
        if error is not None:
            return error
        assert job is not None
        principal = ctx.caller(request) or ""
        if overrides and not has_permission(
            ctx.iam, member_for(principal), "run.jobs.runWithOverrides", f"run.job:{job.name}"
        ):
            return denied("run.jobs.runWithOverrides", job.resource)
        try:
            execution = job.start(principal, overrides)
        except ValueError as exc:
            return google_error(400, f"Invalid overrides: {exc}", "INVALID_ARGUMENT")
        operation = _Operation(
            f"projects/{ctx.project}/locations/{job.region}/operations/{uuid.uuid4()}", execution
        )
        ctx.operations[operation.name] = operation
        return web.json_response(_operation_json(operation, ctx.project))

    async def test_permissions(request: web.Request, name: str) -> web.Response:
        ctx.count("TestIamPermissions", name)
        principal = ctx.caller(request)
        if principal is None:
            return unauthenticated()
        asked = (await _json_body(request)).get("permissions") or []
        held = [p for p in asked if has_permission(ctx.iam, member_for(principal), p, f"run.job:{name}")]
        return web.json_response({"permissions": held} if held else {})

    async def list_executions(request: web.Request) -> web.Response:
        ctx.count("ListExecutions", request.match_info["job"])
        job, error = find(request, "run.executions.list")
        if error is not None:
            return error
        assert job is not None
        try:
            size = min(int(request.query.get("pageSize") or 100), 1000)
            offset = int(request.query.get("pageToken") or 0)
        except ValueError:
            return google_error(400, "Invalid page size or page token.", "INVALID_ARGUMENT")
        newest_first = list(reversed(job.executions))
        now = time.time()
        page = newest_first[offset : offset + max(1, size)]
        body: dict[str, Any] = {"executions": [e.to_json(ctx.project, now) for e in page]}
        if offset + len(page) < len(newest_first):
            body["nextPageToken"] = str(offset + len(page))
        return web.json_response(body)

    def execution_of(
        request: web.Request, permission: str
    ) -> tuple[LocalExecution | None, web.Response | None]:
        job, error = find(request, permission)
        if error is not None:
            return None, error
        assert job is not None
        short = request.match_info["execution"].split(":", 1)[0]
        execution = job.execution(short)
        if execution is None:
            return None, google_error(
                404,
                f"Resource '{short}' of kind 'EXECUTION' in region '{job.region}' in project "
                f"'{ctx.project}' does not exist.",
                "NOT_FOUND",
            )
        return execution, None

    async def get_execution(request: web.Request) -> web.Response:
        ctx.count("GetExecution", request.match_info["execution"])
        execution, error = execution_of(request, "run.executions.get")
        return error or web.json_response(execution.to_json(ctx.project, time.time()))  # type: ignore[union-attr]

    async def cancel_execution(request: web.Request) -> web.Response:
        short, _, verb = request.match_info["execution"].partition(":")
        if verb != "cancel":
            return google_error(404, f"Method '{verb}' not found.", "NOT_FOUND")
        ctx.count("CancelExecution", short)
        execution, error = execution_of(request, "run.executions.cancel")
        if error is not None:
            return error
        assert execution is not None
        execution.job.cancel(execution)
        operation = _Operation(
            f"projects/{ctx.project}/locations/{execution.job.region}/operations/{uuid.uuid4()}", execution
        )
        ctx.operations[operation.name] = operation
        return web.json_response(_operation_json(operation, ctx.project))

    async def get_operation(request: web.Request) -> web.Response:
        name = (
            f"projects/{request.match_info['project']}/locations/{request.match_info['location']}"
            f"/operations/{request.match_info['operation']}"
        )
        ctx.count("GetOperation", name)
        if ctx.caller(request) is None:
            return unauthenticated()
        operation = ctx.operations.get(name)
        if operation is None:
            return google_error(404, f"Operation '{name}' does not exist.", "NOT_FOUND")
        return web.json_response(_operation_json(operation, ctx.project))

    app.router.add_get(base + "/jobs/{job}", get_job)
    app.router.add_post(base + "/jobs/{job}", job_action)
    app.router.add_get(base + "/jobs/{job}/executions", list_executions)
    app.router.add_get(base + "/jobs/{job}/executions/{execution}", get_execution)
    app.router.add_post(base + "/jobs/{job}/executions/{execution}", cancel_execution)
    app.router.add_get(base + "/operations/{operation}", get_operation)


def denied(permission: str, resource: str) -> web.Response:
    return google_error(
        403,
        f"Permission '{permission}' denied on resource '{resource}' (or resource may not exist).",
        "PERMISSION_DENIED",
    )


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        body = {}
    return body if isinstance(body, dict) else {}


def _operation_json(operation: _Operation, project: str) -> dict[str, Any]:
    now = time.time()
    execution = {"@type": EXECUTION_TYPE, **operation.execution.to_json(project, now)}
    body: dict[str, Any] = {"name": operation.name, "metadata": execution, "done": False}
    if operation.execution.completed_at(now) is not None:
        body.update(done=True, response=execution)
    return body
