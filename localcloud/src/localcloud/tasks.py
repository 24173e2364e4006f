"""Cloud Tasks v2, REST: queues (get, create, list) and tasks (create, get, delete, list),
and the dispatcher that calls each HTTP task's URL at its `scheduleTime`.

Answers in the camelCase JSON google-cloud-tasks' REST transport parses (enums as names;
the client asks `enum-encoding=int` and sends ints, both are read), errors in Google's
`{"error": {code, message, status}}` shape so google-api-core raises AlreadyExists,
NotFound, PermissionDenied as against the real API.

What the dispatcher does as Cloud Tasks does: a task is called at `scheduleTime` (at
once if past) with the method, headers and body it names, plus `X-CloudTasks-*`
headers and, when it names one, an OAuth access token (or an OIDC ID token) minted
for its service account; a 2xx answer removes it, anything else (or no answer within
`dispatchDeadline`) is retried after the queue's backoff (`minBackoff` doubling
`maxDoublings` times, capped at `maxBackoff`) until `maxAttempts`. A task's name
cannot be used again for `tombstone_s` after it ran or was deleted (Google: about an
hour), which is what makes a named task a deduplication key. The dispatcher runs
whether or not the API listens: taking the API down (`LocalCloud.set_down("tasks")`)
refuses clients, as an outage seen from the caller does, and tasks still run.

Not emulated (localcloud's README): rate limits (`maxDispatchesPerSecond`,
`maxBurstSize`; `maxConcurrentDispatches` is kept), `maxRetryDuration`, queue
pause/resume/purge/update/delete, RunTask, BatchCreate, App Engine tasks, queue IAM
policies through the API (bindings are set on `LocalCloud.iam`), the 30-day horizon's
exact error text, and Cloud Logging of attempts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from localcloud.authority import TokenAuthority
from localcloud.googleapis import google_error, unauthenticated
from localcloud.iam import IamPolicy, has_permission, member_for
from localcloud.recording import Recorder, bearer_token

MAX_SCHEDULE_AHEAD_S = 30 * 86400  # Cloud Tasks refuses a scheduleTime further than 30 days ahead
TOMBSTONE_S = 3600.0
MAX_PAGE_SIZE = 1000
DEFAULT_DEADLINE_S = 600.0
_TASK_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,500}$")
_QUEUE_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,100}$")
_METHODS = ["HTTP_METHOD_UNSPECIFIED", "POST", "GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"]
_VIEWS = ["VIEW_UNSPECIFIED", "BASIC", "FULL"]


def queue_resource(queue_id: str) -> str:
    """The IAM resource string of a queue (localcloud.iam's convention)."""
    return f"cloudtasks.queue:{queue_id}"


def _ts(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_ts(value: Any) -> float:
    if not isinstance(value, str):
        raise ValueError("not a timestamp")
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _parse_duration(value: Any, default: float) -> float:
    if value in (None, ""):
        return default
    match = re.fullmatch(r"(\d+(?:\.\d+)?)s", str(value))
    if match is None:
        raise ValueError(f"invalid duration {value!r}")
    return float(match.group(1))


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s" if seconds % 1 else f"{int(seconds)}s"


def _enum(value: Any, names: list[str], default: str) -> str:
    if value in (None, "", 0):
        return default
    if isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    if isinstance(value, str) and value in names:
        return value
    raise ValueError(f"invalid enum value {value!r}")


@dataclass
class RetryConfig:
    max_attempts: int = 100  # -1: unlimited
    min_backoff_s: float = 0.1
    max_backoff_s: float = 3600.0
    max_doublings: int = 16

    def backoff(self, failures: int) -> float:
        return min(self.max_backoff_s, self.min_backoff_s * 2 ** min(failures - 1, self.max_doublings))

    def json(self) -> dict[str, Any]:
        return {
            "maxAttempts": self.max_attempts,
            "minBackoff": _duration(self.min_backoff_s),
            "maxBackoff": _duration(self.max_backoff_s),
            "maxDoublings": self.max_doublings,
        }


@dataclass
class LocalQueue:
    name: str  # projects/P/locations/L/queues/Q
    retry: RetryConfig = field(default_factory=RetryConfig)
    max_concurrent: int = 1000

    @property
    def queue_id(self) -> str:
        return self.name.rsplit("/", 1)[1]

    def json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rateLimits": {
                "maxDispatchesPerSecond": 500,
                "maxBurstSize": 100,
                "maxConcurrentDispatches": self.max_concurrent,
            },
            "retryConfig": self.retry.json(),
            "state": "RUNNING",
        }


@dataclass
class LocalTask:
    name: str
    queue: str
    schedule_time: float
    create_time: float
    url: str
    method: str
    headers: dict[str, str]
    body: bytes
    oauth: dict[str, str] | None
    oidc: dict[str, str] | None
    deadline_s: float = DEFAULT_DEADLINE_S
    dispatch_count: int = 0
    response_count: int = 0
    first_attempt: dict[str, Any] | None = None
    last_attempt: dict[str, Any] | None = None
    dispatching: bool = False

    def json(self, view: str) -> dict[str, Any]:
        http: dict[str, Any] = {"url": self.url, "httpMethod": self.method, "headers": dict(self.headers)}
        if view == "FULL" and self.body:
            http["body"] = base64.b64encode(self.body).decode()
        if self.oauth:
            http["oauthToken"] = dict(self.oauth)
        if self.oidc:
            http["oidcToken"] = dict(self.oidc)
        out: dict[str, Any] = {
            "name": self.name,
            "httpRequest": http,
            "scheduleTime": _ts(self.schedule_time),
            "createTime": _ts(self.create_time),
            "dispatchDeadline": _duration(self.deadline_s),
            "dispatchCount": self.dispatch_count,
            "responseCount": self.response_count,
            "view": view,
        }
        if self.first_attempt:
            out["firstAttempt"] = self.first_attempt
        if self.last_attempt:
            out["lastAttempt"] = self.last_attempt
        return out


@dataclass
class Dispatch:
    """One call the dispatcher made, for tests: which task, when, what came back."""

    task: str
    at: float
    status: int  # HTTP status, 0 when there was no answer
    attempt: int


class LocalTasks:
    """The queues, their tasks and the dispatcher. Everything runs on the cloud's loop;
    `lock` guards the state for readers on other threads (`LocalCloud.tasks`)."""

    def __init__(
        self,
        project: str,
        authority: TokenAuthority,
        iam: IamPolicy,
        recorder: Recorder,
        *,
        tombstone_s: float = TOMBSTONE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.project = project
        self.authority = authority
        self.iam = iam
        self.recorder = recorder
        self.tombstone_s = tombstone_s
        self.clock = clock
        self.lock = threading.Lock()
        self.queues: dict[str, LocalQueue] = {}
        self.tasks: dict[str, LocalTask] = {}
        self.tombstones: dict[str, float] = {}
        self.dispatches: list[Dispatch] = []
        self._heap: list[tuple[float, str]] = []
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._in_flight: dict[str, int] = {}

    # -- state -----------------------------------------------------------------

    def add_queue(self, queue_id: str, location: str, **retry: Any) -> LocalQueue:
        name = f"projects/{self.project}/locations/{location}/queues/{queue_id}"
        queue = LocalQueue(name, RetryConfig(**retry))
        with self.lock:
            self.queues[name] = queue
        return queue

    def _push(self, task: LocalTask) -> None:
        heapq.heappush(self._heap, (task.schedule_time, task.name))
        if self._wake is not None:
            self._wake.set()

    def _remove(self, name: str) -> None:
        with self.lock:
            self.tasks.pop(name, None)
            self.tombstones[name] = self.clock() + self.tombstone_s

    def _tombstoned(self, name: str) -> bool:
        until = self.tombstones.get(name)
        if until is None:
            return False
        if until <= self.clock():
            del self.tombstones[name]
            return False
        return True

    # -- the dispatcher ----------------------------------------------------------

    async def start(self) -> None:
        if self._runner is None:
            self._wake = asyncio.Event()
            self._session = aiohttp.ClientSession()
            self._runner = asyncio.create_task(self._run())

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _run(self) -> None:
        assert self._wake is not None
        pending: set[asyncio.Task[None]] = set()
        while True:
            now = self.clock()
            while self._heap and self._heap[0][0] <= now:
                at, name = heapq.heappop(self._heap)
                task = self.tasks.get(name)
                if task is None or task.dispatching or task.schedule_time != at:
                    continue  # deleted, or rescheduled (a newer heap entry stands for it)
                queue = self.queues.get(task.queue)
                limit = queue.max_concurrent if queue else 1000
                if self._in_flight.get(task.queue, 0) >= limit:
                    heapq.heappush(self._heap, (now + 0.05, name))
                    task.schedule_time = now + 0.05
                    continue
                task.dispatching = True
                self._in_flight[task.queue] = self._in_flight.get(task.queue, 0) + 1
                job = asyncio.create_task(self._dispatch(task))
                pending.add(job)
                job.add_done_callback(pending.discard)
            self._wake.clear()
            wait = min(1.0, self._heap[0][0] - self.clock()) if self._heap else 1.0
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)

    def _auth_header(self, task: LocalTask) -> dict[str, str]:
        if task.oauth:
            return {
                "Authorization": "Bearer "
                + self.authority.mint_access_token(task.oauth["serviceAccountEmail"])
            }
        if task.oidc:
            audience = task.oidc.get("audience") or task.url
            token = self.authority.mint_id_token(task.oidc["serviceAccountEmail"], audience)
            return {"Authorization": "Bearer " + token}
        return {}

    async def _dispatch(self, task: LocalTask) -> None:
        assert self._session is not None
        started = self.clock()
        retries = task.dispatch_count
        task.dispatch_count += 1
        headers = {
            "User-Agent": "Google-Cloud-Tasks",
            "X-CloudTasks-QueueName": task.queue.rsplit("/", 1)[1],
            "X-CloudTasks-TaskName": task.name.rsplit("/", 1)[1],
            "X-CloudTasks-TaskRetryCount": str(retries),
            "X-CloudTasks-TaskExecutionCount": str(task.response_count),
            "X-CloudTasks-TaskETA": f"{task.schedule_time:.6f}",
            **task.headers,
        }
        if task.body and not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/octet-stream"
        status = 0
        try:
            headers.update(self._auth_header(task))
            async with self._session.request(
                task.method,
                task.url,
                data=task.body or None,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=task.deadline_s),
            ) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError):
            status = 0
        finally:
            self._in_flight[task.queue] -= 1
        attempt: dict[str, Any] = {"scheduleTime": _ts(task.schedule_time), "dispatchTime": _ts(started)}
        if status:
            task.response_count += 1
            attempt["responseTime"] = _ts(self.clock())
            attempt["responseStatus"] = {"code": 0 if 200 <= status < 300 else 2, "message": f"HTTP {status}"}
        with self.lock:
            self.dispatches.append(Dispatch(task.name, started, status, task.dispatch_count))
            task.first_attempt = task.first_attempt or attempt
            task.last_attempt = attempt
        if 200 <= status < 300:
            self._remove(task.name)
            return
        queue = self.queues.get(task.queue)
        retry = queue.retry if queue else RetryConfig()
        if task.name not in self.tasks:
            return  # deleted while it was being called
        if retry.max_attempts != -1 and task.dispatch_count >= retry.max_attempts:
            self._remove(task.name)  # Cloud Tasks deletes a task whose attempts ran out
            return
        task.dispatching = False
        task.schedule_time = self.clock() + retry.backoff(task.dispatch_count)
        self._push(task)

    # -- the API ---------------------------------------------------------------

    def build_app(self) -> web.Application:
        return build_tasks_app(self)


def _denied(permission: str, resource: str) -> web.Response:
    return google_error(
        403,
        f'The principal (user or service account) lacks IAM permission "{permission}" for the '
        f'resource "{resource}" (or the resource may not exist).',
        "PERMISSION_DENIED",
    )


def _bad(message: str) -> web.Response:
    return google_error(400, message, "INVALID_ARGUMENT")


def _query_view(request: web.Request) -> str:
    raw = request.query.get("responseView")
    return _enum(int(raw) if raw and raw.isdigit() else raw, _VIEWS, "BASIC")


def build_tasks_app(state: LocalTasks) -> web.Application:
    def principal(request: web.Request) -> str | None:
        token = bearer_token(request)
        return state.authority.principal_for_bearer(token) if token else None

    def allowed(member: str, permission: str, resource: str) -> bool:
        return has_permission(state.iam, member, permission, resource)

    def queue_name(request: web.Request) -> str:
        m = request.match_info
        return f"projects/{m['project']}/locations/{m['location']}/queues/{m['queue']}"

    def guard(request: web.Request, permission: str) -> tuple[str, web.Response | None]:
        who = principal(request)
        if who is None:
            return "", unauthenticated()
        resource = queue_resource(request.match_info["queue"])
        if not allowed(member_for(who), permission, resource):
            return who, _denied(permission, queue_name(request))
        return who, None

    def count(method: str, request: web.Request) -> None:
        state.recorder.count_admin_call(method, request.match_info.get("queue", "*"))

    async def body_of(request: web.Request) -> dict[str, Any] | None:
        try:
            body = await request.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    async def get_queue(request: web.Request) -> web.Response:
        count("GetQueue", request)
        _, refusal = guard(request, "cloudtasks.queues.get")
        if refusal:
            return refusal
        queue = state.queues.get(queue_name(request))
        if queue is None:
            return google_error(404, "Requested entity was not found.", "NOT_FOUND")
        return web.json_response(queue.json())

    async def list_queues(request: web.Request) -> web.Response:
        state.recorder.count_admin_call("ListQueues", "*")
        who = principal(request)
        if who is None:
            return unauthenticated()
        parent = f"projects/{request.match_info['project']}/locations/{request.match_info['location']}"
        visible = [
            q.json()
            for n, q in sorted(state.queues.items())
            if n.startswith(parent + "/")
            and allowed(member_for(who), "cloudtasks.queues.list", queue_resource(q.queue_id))
        ]
        return web.json_response({"queues": visible} if visible else {})

    async def create_queue(request: web.Request) -> web.Response:
        state.recorder.count_admin_call("CreateQueue", "*")
        who = principal(request)
        if who is None:
            return unauthenticated()
        parent = f"projects/{request.match_info['project']}/locations/{request.match_info['location']}"
        if not allowed(member_for(who), "cloudtasks.queues.create", state.iam.project_resource):
            return _denied("cloudtasks.queues.create", parent)
        body = await body_of(request)
        if body is None:
            return _bad("Invalid JSON payload received.")
        name = str(body.get("name") or "")
        queue_id = name.rsplit("/", 1)[-1]
        if not name.startswith(parent + "/queues/") or not _QUEUE_ID_RE.fullmatch(queue_id):
            return _bad(f"Queue name {name!r} must be {parent}/queues/QUEUE_ID ([A-Za-z0-9-]{{1,100}}).")
        if name in state.queues:
            return google_error(409, "Queue already exists", "ALREADY_EXISTS")
        retry = body.get("retryConfig") or {}
        try:
            config = RetryConfig(
                max_attempts=int(retry.get("maxAttempts", 100)),
                min_backoff_s=_parse_duration(retry.get("minBackoff"), 0.1),
                max_backoff_s=_parse_duration(retry.get("maxBackoff"), 3600.0),
                max_doublings=int(retry.get("maxDoublings", 16)),
            )
        except (TypeError, ValueError) as exc:
            return _bad(f"Invalid retryConfig: {exc}")
        queue = LocalQueue(name, config)
        limits = body.get("rateLimits") or {}
        if limits.get("maxConcurrentDispatches"):
            queue.max_concurrent = int(limits["maxConcurrentDispatches"])
        with state.lock:
            state.queues[name] = queue
        return web.json_response(queue.json())

    async def create_task(request: web.Request) -> web.Response:
        count("CreateTask", request)
        who, refusal = guard(request, "cloudtasks.tasks.create")
        if refusal:
            return refusal
        parent = queue_name(request)
        if parent not in state.queues:
            return google_error(404, "Queue does not exist.", "NOT_FOUND")
        body = await body_of(request)
        if body is None or not isinstance(body.get("task"), dict):
            return _bad("Invalid JSON payload received: a CreateTaskRequest needs a task.")
        spec = body["task"]
        try:
            view = _enum(body.get("responseView"), _VIEWS, "BASIC")
        except ValueError as exc:
            return _bad(str(exc))
        name = str(spec.get("name") or f"{parent}/tasks/{uuid.uuid4().int % 10**19}")
        if not name.startswith(parent + "/tasks/") or not _TASK_ID_RE.fullmatch(name.rsplit("/", 1)[1]):
            return _bad(f"Task name {name!r} must be {parent}/tasks/TASK_ID ([A-Za-z0-9_-]{{1,500}}).")
        http = spec.get("httpRequest")
        if not isinstance(http, dict) or not isinstance(http.get("url"), str):
            return _bad("Task.httpRequest.url is required (App Engine tasks are not emulated).")
        if not re.match(r"^https?://", http["url"]):
            return _bad(f"HttpRequest.url {http['url']!r} must be an http or https URL.")
        now = state.clock()
        try:
            method = _enum(http.get("httpMethod"), _METHODS, "POST")
            schedule = _parse_ts(spec["scheduleTime"]) if spec.get("scheduleTime") else now
            deadline = _parse_duration(spec.get("dispatchDeadline"), DEFAULT_DEADLINE_S)
            payload = base64.b64decode(http.get("body") or "", validate=True)
        except (ValueError, TypeError) as exc:
            return _bad(f"Invalid task: {exc}")
        if schedule > now + MAX_SCHEDULE_AHEAD_S:
            return _bad("The Task.scheduleTime is too far in the future: at most 30 days ahead.")
        if not 15 <= deadline <= 1800:
            return _bad("Task.dispatchDeadline must be between 15 seconds and 30 minutes.")
        oauth, oidc = http.get("oauthToken"), http.get("oidcToken")
        for token in (oauth, oidc):
            if token is not None:
                email = token.get("serviceAccountEmail") if isinstance(token, dict) else None
                if not email:
                    return _bad("serviceAccountEmail is required in an oauthToken or oidcToken.")
                if not allowed(member_for(who), "iam.serviceAccounts.actAs", f"serviceAccount:{email}"):
                    return _denied("iam.serviceAccounts.actAs", email)
        if name in state.tasks or state._tombstoned(name):
            return google_error(409, "Requested entity already exists", "ALREADY_EXISTS")
        headers = http.get("headers") or {}
        task = LocalTask(
            name=name,
            queue=parent,
            schedule_time=schedule,
            create_time=now,
            url=http["url"],
            method=method,
            headers={str(k): str(v) for k, v in headers.items()},
            body=payload,
            oauth={k: str(v) for k, v in oauth.items()} if oauth else None,
            oidc={k: str(v) for k, v in oidc.items()} if oidc else None,
            deadline_s=deadline,
        )
        with state.lock:
            state.tasks[name] = task
        state._push(task)
        return web.json_response(task.json(view))

    def task_name(request: web.Request) -> str:
        return f"{queue_name(request)}/tasks/{request.match_info['task']}"

    async def get_task(request: web.Request) -> web.Response:
        count("GetTask", request)
        _, refusal = guard(request, "cloudtasks.tasks.get")
        if refusal:
            return refusal
        task = state.tasks.get(task_name(request))
        if task is None:
            return google_error(404, "Requested entity was not found.", "NOT_FOUND")
        try:
            view = _query_view(request)
        except ValueError as exc:
            return _bad(str(exc))
        return web.json_response(task.json(view))

    async def delete_task(request: web.Request) -> web.Response:
        count("DeleteTask", request)
        _, refusal = guard(request, "cloudtasks.tasks.delete")
        if refusal:
            return refusal
        name = task_name(request)
        if name not in state.tasks:
            return google_error(404, "Requested entity was not found.", "NOT_FOUND")
        state._remove(name)
        return web.json_response({})

    async def list_tasks(request: web.Request) -> web.Response:
        count("ListTasks", request)
        _, refusal = guard(request, "cloudtasks.tasks.list")
        if refusal:
            return refusal
        parent = queue_name(request)
        if parent not in state.queues:
            return google_error(404, "Queue does not exist.", "NOT_FOUND")
        try:
            size = min(int(request.query.get("pageSize") or MAX_PAGE_SIZE), MAX_PAGE_SIZE)
            offset = int(request.query.get("pageToken") or 0)
            view = _query_view(request)
        except ValueError:
            return _bad("Invalid page size, page token or view.")
        if size <= 0 or offset < 0:
            return _bad("Invalid page size or page token.")
        with state.lock:
            matching = sorted(n for n, t in state.tasks.items() if t.queue == parent)
            page = [state.tasks[n].json(view) for n in matching[offset : offset + size]]
        out: dict[str, Any] = {"tasks": page} if page else {}
        if offset + size < len(matching):
            out["nextPageToken"] = str(offset + size)
        return web.json_response(out)

    async def queue_method(request: web.Request) -> web.Response:
        queue, _, method = request.match_info["queue_method"].partition(":")
        if method != "testIamPermissions":
            return google_error(404, f"Method {method!r} is not emulated.", "NOT_FOUND")
        state.recorder.count_admin_call("TestIamPermissions", queue)
        who = principal(request)
        if who is None:
            return unauthenticated()
        body = await body_of(request)
        if body is None:
            return _bad("Invalid JSON payload received.")
        asked = [str(p) for p in body.get("permissions") or []]
        held = [p for p in asked if allowed(member_for(who), p, queue_resource(queue))]
        return web.json_response({"permissions": held} if held else {})

    app = web.Application(middlewares=[state.recorder.middleware("tasks")])
    queues = "/v2/projects/{project}/locations/{location}/queues"
    app.router.add_get(queues, list_queues)
    app.router.add_post(queues, create_queue)
    app.router.add_get(queues + "/{queue}", get_queue)
    app.router.add_post(queues + "/{queue_method}", queue_method)
    tasks = queues + "/{queue}/tasks"
    app.router.add_get(tasks, list_tasks)
    app.router.add_post(tasks, create_task)
    app.router.add_get(tasks + "/{task}", get_task)
    app.router.add_delete(tasks + "/{task}", delete_task)
    return app
