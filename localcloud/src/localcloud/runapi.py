"""The Cloud Run Admin API v2, REST: GetService and ListServices; jobs in runjobs.py.

Answers in the camelCase JSON the `run_v2` REST transport parses, and errors in
Google's `{"error": {code, message, status}}` shape so google-api-core raises
NotFound / PermissionDenied / Unauthenticated as against the real API.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from localcloud.authority import TokenAuthority
from localcloud.googleapis import google_error, unauthenticated
from localcloud.iam import RUN_VIEWER, IamPolicy, member_for
from localcloud.jobsapi import JobsContext, add_job_routes
from localcloud.recording import Recorder, bearer_token
from localcloud.runjobs import LocalRunJob
from localcloud.services import LocalService

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class RunApiContext:
    project: str
    project_number: str
    authority: TokenAuthority
    iam: IamPolicy
    recorder: Recorder
    services: Callable[[], list[LocalService]]
    jobs: Callable[[], list[LocalRunJob]] = list
    # RunJob's and CancelExecution's operations, kept while the API goes down and up.
    operations: dict[str, Any] = field(default_factory=dict)


def _timestamp(epoch: float) -> str:
    micros = int((epoch % 1) * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{micros:06d}Z"


def service_json(service: LocalService, project: str, project_number: str) -> dict[str, object]:
    """The `Service` resource of a local service, as a Gen2 function's looks."""
    name = f"projects/{project}/locations/{service.region}/services/{service.name}"
    uri = service.uri_override or service.url
    created = _timestamp(service.created_at)
    revision = f"{service.name}-00001-loc"
    ready = {"state": "CONDITION_SUCCEEDED", "lastTransitionTime": created}
    latest = {"type": "TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST", "percent": 100}
    # Stated in both places a real Service may state it: service-level and revision-level.
    scaling = (
        {"scaling": {"maxInstanceCount": service.max_instance_count}}
        if service.max_instance_count is not None
        else {}
    )
    return {
        "name": name,
        "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, name)),
        "generation": "1",
        "labels": {"goog-managed-by": "cloudfunctions"},
        "createTime": created,
        "updateTime": created,
        "creator": "dev@example.com",
        "lastModifier": "dev@example.com",
        "ingress": "INGRESS_TRAFFIC_ALL",
        "launchStage": "GA",
        "template": {
            "serviceAccount": f"{project_number}-compute@developer.gserviceaccount.com",
            "containers": [
                {"image": f"{service.region}-docker.pkg.dev/{project}/gcf-artifacts/{service.name}"}
            ],
            "maxInstanceRequestConcurrency": service.max_instance_request_concurrency,
            **scaling,
        },
        **scaling,
        "traffic": [latest],
        "observedGeneration": "1",
        "terminalCondition": {"type": "Ready", **ready},
        "conditions": [{"type": "RoutesReady", **ready}, {"type": "ConfigurationsReady", **ready}],
        "latestReadyRevision": f"{name}/revisions/{revision}",
        "latestCreatedRevision": f"{name}/revisions/{revision}",
        "trafficStatuses": [latest],
        "uri": uri,
        "urls": [uri],
        "etag": f'"{uuid.uuid5(uuid.NAMESPACE_URL, name + uri).hex[:16]}"',
    }


def build_run_api_app(ctx: RunApiContext) -> web.Application:
    """The Admin API app; every call is counted in `admin_api_calls`, denied ones too."""

    def caller(request: web.Request) -> str | None:
        token = bearer_token(request)
        return ctx.authority.principal_for_bearer(token) if token else None

    async def get_service(request: web.Request) -> web.Response:
        project, location, name = (request.match_info[k] for k in ("project", "location", "service"))
        ctx.recorder.count_admin_call("GetService", name)
        principal = caller(request)
        if principal is None:
            return unauthenticated()
        resource = f"projects/{project}/locations/{location}/services/{name}"
        if not ctx.iam.allowed(member_for(principal), RUN_VIEWER, f"run.service:{name}"):
            return google_error(
                403,
                f"Permission 'run.services.get' denied on resource '{resource}' (or resource may not exist).",
                "PERMISSION_DENIED",
            )
        for service in ctx.services():
            if project == ctx.project and service.name == name and service.region == location:
                return web.json_response(service_json(service, ctx.project, ctx.project_number))
        return google_error(
            404,
            f"Resource '{name}' of kind 'SERVICE' in region "
            f"'{location}' in project '{project}' does not exist.",
            "NOT_FOUND",
        )

    async def list_services(request: web.Request) -> web.Response:
        project, location = request.match_info["project"], request.match_info["location"]
        ctx.recorder.count_admin_call("ListServices", "*")
        principal = caller(request)
        if principal is None:
            return unauthenticated()
        if not ctx.iam.allowed(member_for(principal), RUN_VIEWER, ctx.iam.project_resource):
            return google_error(
                403,
                f"Permission 'run.services.list' denied on resource "
                f"'projects/{project}/locations/{location}' (or resource may not exist).",
                "PERMISSION_DENIED",
            )
        try:
            size = int(request.query.get("pageSize") or DEFAULT_PAGE_SIZE)
            offset = int(request.query.get("pageToken") or 0)
        except ValueError:
            return google_error(400, "Invalid page size or page token.", "INVALID_ARGUMENT")
        if size <= 0 or offset < 0:
            return google_error(400, "Invalid page size or page token.", "INVALID_ARGUMENT")
        size = min(size, MAX_PAGE_SIZE)
        matching = (
            sorted(
                (s for s in ctx.services() if location in ("-", s.region)),
                key=lambda s: (s.region, s.name),
            )
            if project == ctx.project
            else []
        )
        page = matching[offset : offset + size]
        body: dict[str, object] = {
            "services": [service_json(s, ctx.project, ctx.project_number) for s in page]
        }
        if offset + size < len(matching):
            body["nextPageToken"] = str(offset + size)
        return web.json_response(body)

    app = web.Application(middlewares=[ctx.recorder.middleware("run_api")])
    base = "/v2/projects/{project}/locations/{location}/services"
    app.router.add_get(base, list_services)
    app.router.add_get(base + "/{service}", get_service)
    add_job_routes(
        app,
        JobsContext(ctx.project, ctx.iam, caller, ctx.recorder.count_admin_call, ctx.jobs, ctx.operations),
    )
    return app
