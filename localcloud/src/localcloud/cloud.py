"""LocalCloud: the offline Google Cloud the tests and `worker dev` run against.

Every component is a real HTTP server on 127.0.0.1, so Google's unmodified clients
(google-auth, run_v2 REST, IAM Credentials REST) talk to it over sockets. All
servers share one asyncio loop in a daemon thread; the public methods are called
from other threads and hand work to that loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

from aiohttp import web

from localcloud.authority import TokenAuthority, numeric_id
from localcloud.functions import Function
from localcloud.googleapis import CERTS_PATH, TOKEN_PATH, build_googleapis_app
from localcloud.iam import RUN_INVOKER, RUN_VIEWER, IamPolicy, member_for
from localcloud.metadata import MetadataIdentity, build_metadata_app
from localcloud.ports import free_port
from localcloud.push import PushDeliverer
from localcloud.recording import RecordedRequest, Recorder
from localcloud.runapi import RunApiContext, build_run_api_app
from localcloud.runjobs import LocalRunJob
from localcloud.services import LocalService, build_service_app
from localcloud.tasks import LocalTasks, queue_resource

COMPONENTS = ("metadata", "run_api", "iam", "services", "tasks")
# The queue delayed jobs wait in (the worker's WORKER_DELAY_QUEUE default), made at start.
DELAY_QUEUE = "jobs-delayed"
_CONTROL_TIMEOUT_S = 30.0


class _Listener:
    """One app on one fixed port, which can stop listening and listen again."""

    def __init__(
        self, factory: Callable[[], web.Application], port: int, *, cancel_on_disconnect: bool = False
    ) -> None:
        self._factory = factory
        self.port = port
        self._cancel_on_disconnect = cancel_on_disconnect
        self._runner: web.AppRunner | None = None

    async def up(self) -> None:
        if self._runner is not None:
            return
        # A fresh app each time: an aiohttp app is frozen once a runner has used it.
        runner = web.AppRunner(
            self._factory(),
            access_log=None,
            handler_cancellation=self._cancel_on_disconnect,
            # In-flight requests (a hanging service) must not hold up going down.
            shutdown_timeout=0.5,
        )
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._runner = runner

    async def down(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


def _write_json(path: str | os.PathLike[str], info: dict[str, Any]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(info, indent=2) + "\n")
    target.chmod(0o600)
    return target


class LocalCloud:
    """Metadata server, OAuth2 + IAM Credentials, Cloud Run Admin API, and Cloud Run services."""

    def __init__(
        self,
        project: str = "local-project",
        region: str = "us-central1",
        worker_email: str = "worker@local-project.iam.gserviceaccount.com",
        metadata_port: int | None = None,
    ) -> None:
        self.project = project
        self.region = region
        self.worker_email = worker_email
        self.project_number = str(int(hashlib.sha256(project.encode()).hexdigest(), 16))[:12]
        self.recorder = Recorder(lambda token: self.authority.describe(token))
        self.authority = TokenAuthority(self.recorder)
        self.iam = IamPolicy(project)

        metadata_port = metadata_port or free_port()
        googleapis_port, run_api_port, tasks_port = free_port(), free_port(), free_port()
        self.metadata_host = f"127.0.0.1:{metadata_port}"
        self.iam_endpoint = f"http://127.0.0.1:{googleapis_port}"
        self.token_uri = self.iam_endpoint + TOKEN_PATH
        self.certs_url = self.iam_endpoint + CERTS_PATH
        self.run_api_endpoint = f"http://127.0.0.1:{run_api_port}"
        self.tasks_api_endpoint = f"http://127.0.0.1:{tasks_port}"
        # Cloud Tasks: its API and the dispatcher, which runs whether the API listens or not.
        self.tasks = LocalTasks(project, self.authority, self.iam, self.recorder)
        self.add_queue(DELAY_QUEUE)

        identity = MetadataIdentity(project, self.project_number, region, worker_email)
        run_api = RunApiContext(
            project,
            self.project_number,
            self.authority,
            self.iam,
            self.recorder,
            self._service_list,
            self._job_list,
        )
        self._listeners = {
            "metadata": _Listener(
                lambda: build_metadata_app(identity, self.authority, self.recorder),
                metadata_port,
            ),
            "iam": _Listener(
                lambda: build_googleapis_app(self.token_uri, self.authority, self.iam, self.recorder),
                googleapis_port,
            ),
            "run_api": _Listener(lambda: build_run_api_app(run_api), run_api_port),
            "tasks": _Listener(self.tasks.build_app, tasks_port),
        }
        self._lock = threading.Lock()
        self._services: dict[str, LocalService] = {}
        self._jobs: dict[tuple[str, str], LocalRunJob] = {}
        self._service_listeners: dict[str, _Listener] = {}
        self._down: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> LocalCloud:
        """Start every server; returns once all of them listen."""
        if self._thread is not None:
            raise RuntimeError("LocalCloud already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="local-cloud", daemon=True)
        self._thread.start()
        try:
            self._call(self._up_all())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._down_all())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=_CONTROL_TIMEOUT_S)
            loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> LocalCloud:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _up_all(self) -> None:
        await self.tasks.start()
        for name, listener in self._listeners.items():
            if name not in self._down:
                await listener.up()
        if "services" not in self._down:
            for listener in list(self._service_listeners.values()):
                await listener.up()

    async def _down_all(self) -> None:
        await self.tasks.stop()
        for listener in [*self._listeners.values(), *self._service_listeners.values()]:
            await listener.down()

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        if self._loop is None:
            coro.close()
            return None
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LocalCloud control methods cannot be called from its own loop")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CONTROL_TIMEOUT_S)

    def set_down(self, component: str, down: bool) -> None:
        """Stop listening (connection refused) or listen again on the same port.

        `component` is one of COMPONENTS, or "service:NAME" for a single service."""
        if component.startswith("service:"):
            listeners = [self._service_listeners[component.removeprefix("service:")]]
        elif component == "services":
            listeners = list(self._service_listeners.values())
        elif component in self._listeners:
            listeners = [self._listeners[component]]
        else:
            raise ValueError(f"unknown component {component!r}; one of {COMPONENTS}")
        with self._lock:
            (self._down.add if down else self._down.discard)(component)

        async def apply() -> None:
            for listener in listeners:
                await (listener.down() if down else listener.up())

        self._call(apply())

    # -- services ------------------------------------------------------------

    def add_service(
        self,
        name: str,
        function: str | Function = "echo",
        *,
        region: str | None = None,
        invokers: Iterable[str] | None = None,
    ) -> LocalService:
        """Deploy a service; `invokers` (members) default to the worker's service account."""
        service = LocalService(name, function, region or self.region, free_port())
        with self._lock:
            if name in self._services:
                raise ValueError(f"service {name!r} already exists")
            self._services[name] = service
            listener = _Listener(
                lambda: build_service_app(service, self.authority, self.iam, self.recorder, self.certs_url),
                service.port,
                cancel_on_disconnect=True,
            )
            self._service_listeners[name] = listener
            listening = "services" not in self._down
        # As `worker setup` grants them: the worker may read (resolve) every service it is
        # given, per service rather than on the project; who may invoke it is the caller's say.
        self.iam.grant(member_for(self.worker_email), RUN_VIEWER, f"run.service:{name}")
        for member in [member_for(self.worker_email)] if invokers is None else invokers:
            self.iam.grant(member, RUN_INVOKER, f"run.service:{name}")
        if listening:
            self._call(listener.up())
        return service

    def service(self, name: str) -> LocalService:
        with self._lock:
            return self._services[name]

    def remove_service(self, name: str) -> None:
        """Delete a service: it stops listening, and its IAM policy goes with it."""
        with self._lock:
            self._services.pop(name)
            listener = self._service_listeners.pop(name)
        self._call(listener.down())
        for member, role, resource in self.iam.bindings():
            if resource == f"run.service:{name}":
                self.iam.revoke(member, role, resource)

    def _service_list(self) -> list[LocalService]:
        with self._lock:
            return list(self._services.values())

    # -- Cloud Tasks -------------------------------------------------------------

    def add_queue(self, queue_id: str, *, region: str | None = None, **retry: Any) -> Any:
        """Create a Cloud Tasks queue; as `worker setup` grants it, the worker may create,
        read and delete its tasks, and name itself as the tasks' OAuth account (actAs).
        `retry`: max_attempts, min_backoff_s, max_backoff_s, max_doublings."""
        queue = self.tasks.add_queue(queue_id, region or self.region, **retry)
        worker = member_for(self.worker_email)
        for role in ("roles/cloudtasks.enqueuer", "roles/cloudtasks.viewer", "roles/cloudtasks.taskDeleter"):
            self.iam.grant(worker, role, queue_resource(queue_id))
        self.iam.grant(worker, "roles/iam.serviceAccountUser", f"serviceAccount:{self.worker_email}")
        return queue

    # -- Cloud Run jobs --------------------------------------------------------

    def add_run_job(
        self,
        name: str,
        *,
        region: str | None = None,
        executors: Iterable[str] | None = None,
        executor_role: str = "roles/run.jobsExecutorWithOverrides",
        **knobs: Any,
    ) -> LocalRunJob:
        """Deploy a Cloud Run job; `executors` (members) get `executor_role` on it, by
        default the worker's service account. `knobs`: task_count, task_seconds,
        timeout_s, args, env (see LocalRunJob)."""
        region = region or self.region
        job = LocalRunJob(
            name,
            region,
            project=self.project,
            service_account=f"{self.project_number}-compute@developer.gserviceaccount.com",
            **knobs,
        )
        with self._lock:
            if (name, region) in self._jobs:
                raise ValueError(f"job {name!r} already exists in {region}")
            self._jobs[(name, region)] = job
        # As `worker setup` grants it: the worker reads each job (and its executions) it runs.
        self.iam.grant(member_for(self.worker_email), RUN_VIEWER, f"run.job:{name}")
        for member in [member_for(self.worker_email)] if executors is None else executors:
            self.iam.grant(member, executor_role, f"run.job:{name}")
        return job

    def run_job(self, name: str, region: str | None = None) -> LocalRunJob:
        with self._lock:
            return self._jobs[(name, region or self.region)]

    def _job_list(self) -> list[LocalRunJob]:
        with self._lock:
            return list(self._jobs.values())

    # -- credentials files and tokens ---------------------------------------

    def create_service_account_key(self, path: str | os.PathLike[str], email: str) -> Path:
        """Write a service-account JSON key file for `email` whose token_uri is this cloud."""
        key_id, private_key = self.authority.new_service_account_key(email)
        return _write_json(
            path,
            {
                "type": "service_account",
                "project_id": self.project,
                "private_key_id": key_id,
                "private_key": private_key,
                "client_email": email,
                "client_id": numeric_id(email),
                "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                "token_uri": self.token_uri,
                "auth_provider_x509_cert_url": self.certs_url,
                "universe_domain": "googleapis.com",
            },
        )

    def _authorized_user_info(self, email: str) -> dict[str, Any]:
        grant = self.authority.new_user(email)
        return {
            "type": "authorized_user",
            "client_id": grant.client_id,
            "client_secret": grant.client_secret,
            "refresh_token": grant.refresh_token,
            "account": email,
            "token_uri": self.token_uri,
            "universe_domain": "googleapis.com",
        }

    def create_authorized_user_file(
        self, path: str | os.PathLike[str], email: str = "dev@example.com"
    ) -> Path:
        """Write what `gcloud auth application-default login` writes, for `email`.

        google-auth ignores the file's token_uri (it always uses Google's), so a
        client must call `.with_token_uri(cloud.token_uri)` to refresh here."""
        return _write_json(path, self._authorized_user_info(email))

    def create_impersonated_file(
        self, path: str | os.PathLike[str], target_email: str, source_email: str = "dev@example.com"
    ) -> Path:
        """Write what `gcloud auth application-default login --impersonate-service-account`
        writes: user credentials of `source_email` that impersonate `target_email`."""
        url = f"{self.iam_endpoint}/v1/projects/-/serviceAccounts/{target_email}:generateAccessToken"
        return _write_json(
            path,
            {
                "type": "impersonated_service_account",
                "service_account_impersonation_url": url,
                "source_credentials": self._authorized_user_info(source_email),
                "delegates": [],
            },
        )

    def push_deliverer(
        self,
        subscriber: Any,
        subscription: str,
        endpoint: str,
        *,
        service_account: str,
        audience: str | None = None,
        **options: Any,
    ) -> PushDeliverer:
        """A push deliverer (not started) for `subscription`, a pull subscription on the
        emulator, whose OIDC tokens this cloud's authority signs (see localcloud.push)."""
        return PushDeliverer(
            subscriber,
            subscription,
            endpoint,
            service_account=service_account,
            audience=audience,
            mint=self.authority.mint_id_token,
            **options,
        )

    def mint_access_token(self, email: str) -> str:
        return self.authority.mint_access_token(email)

    def mint_id_token(self, email: str, audience: str, *, lifetime_s: int = 3600) -> str:
        """A Google-signed ID token; a negative `lifetime_s` gives an expired one."""
        return self.authority.mint_id_token(email, audience, lifetime_s=lifetime_s)

    # -- observation ---------------------------------------------------------

    @property
    def id_tokens_minted(self) -> Counter[str]:
        return self.recorder.id_tokens_minted

    @property
    def access_tokens_minted(self) -> int:
        return self.recorder.access_tokens_minted

    @property
    def admin_api_calls(self) -> Counter[tuple[str, str]]:
        return self.recorder.admin_api_calls

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.recorder.requests

    def reset_counters(self) -> None:
        self.recorder.reset()
        for service in self._service_list():
            service.reset_counters()

    @property
    def env(self) -> dict[str, str]:
        """The environment a process needs to use this cloud (set before importing google.auth)."""
        return {
            "GCE_METADATA_HOST": self.metadata_host,
            "GCE_METADATA_IP": self.metadata_host,
            "WORKER_RUN_API_ENDPOINT": self.run_api_endpoint,
            "WORKER_IAM_API_ENDPOINT": self.iam_endpoint,
            "WORKER_TASKS_API_ENDPOINT": self.tasks_api_endpoint,
            "GOOGLE_CLOUD_PROJECT": self.project,
            "WORKER_REGION": self.region,
            "WORKER_LOCAL_CLOUD": "1",
        }
