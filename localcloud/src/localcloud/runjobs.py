"""Cloud Run jobs and their executions, as the local Admin API (jobsapi.py) serves them.

An execution runs all its tasks at once for the job's `task_seconds`, then its
`failing_tasks` (as they were when it started) fail and the rest succeed. Overrides
are applied as the API documents them: args replaced, env merged, task count and
timeout replaced; the execution's `template` shows the result, which is how a
caller finds an execution by an env value it passed.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

_DURATION_RE = re.compile(r"^(\d+)(\.\d+)?s$")
MAX_TASK_COUNT = 10_000
MAX_TIMEOUT_S = 168 * 3600


def timestamp(epoch: float) -> str:
    micros = int((epoch % 1) * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{micros:06d}Z"


@dataclass
class LocalExecution:
    name: str
    job: LocalRunJob
    creator: str
    task_count: int
    timeout_s: int
    containers: list[dict[str, Any]]
    failing: int
    duration_s: float
    created_at: float = field(default_factory=time.time)
    cancelled_at: float | None = None
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def short_name(self) -> str:
        return self.name.rsplit("/", 1)[1]

    def completed_at(self, now: float) -> float | None:
        if self.cancelled_at is not None:
            return self.cancelled_at
        end = self.created_at + self.duration_s
        return end if now >= end else None

    def env(self) -> dict[str, str]:
        return {e["name"]: e.get("value", "") for c in self.containers for e in c.get("env", [])}

    def to_json(self, project: str, now: float) -> dict[str, Any]:
        done_at = self.completed_at(now)
        counts = {"runningCount": 0, "succeededCount": 0, "failedCount": 0, "cancelledCount": 0}
        conditions = [
            {
                "type": "ResourcesAvailable",
                "state": "CONDITION_SUCCEEDED",
                "lastTransitionTime": timestamp(self.created_at),
            },
            {
                "type": "Started",
                "state": "CONDITION_SUCCEEDED",
                "lastTransitionTime": timestamp(self.created_at),
            },
        ]
        body: dict[str, Any] = {
            "name": self.name,
            "uid": self.uid,
            "creator": self.creator,
            "generation": "1",
            "createTime": timestamp(self.created_at),
            "startTime": timestamp(self.created_at),
            "updateTime": timestamp(done_at or self.created_at),
            "launchStage": "GA",
            "job": self.job.name,
            "parallelism": self.task_count,
            "taskCount": self.task_count,
            "template": {
                "containers": self.containers,
                "maxRetries": 0,
                "timeout": f"{self.timeout_s}s",
                "serviceAccount": self.job.service_account,
                "executionEnvironment": "EXECUTION_ENVIRONMENT_GEN2",
            },
            "observedGeneration": "1",
            "logUri": log_uri(project, self.job, self.short_name),
            "etag": f'"{self.uid[:16]}"',
        }
        if done_at is None:
            counts["runningCount"] = self.task_count
            conditions.insert(
                0,
                {
                    "type": "Completed",
                    "state": "CONDITION_PENDING",
                    "lastTransitionTime": timestamp(self.created_at),
                },
            )
        elif self.cancelled_at is not None:
            counts["cancelledCount"] = self.task_count
            conditions.insert(
                0,
                {
                    "type": "Completed",
                    "state": "CONDITION_FAILED",
                    "executionReason": "CANCELLED",
                    "message": "The execution was cancelled.",
                    "lastTransitionTime": timestamp(done_at),
                },
            )
        else:
            failed = min(self.failing, self.task_count)
            counts["failedCount"] = failed
            counts["succeededCount"] = self.task_count - failed
            completed: dict[str, Any] = {"type": "Completed", "lastTransitionTime": timestamp(done_at)}
            if failed:
                completed.update(
                    state="CONDITION_FAILED",
                    executionReason="NON_ZERO_EXIT_CODE",
                    message=f"Task {self.short_name}-task0 failed with message: "
                    "The container exited with an exit code of 1.",
                )
            else:
                completed.update(
                    state="CONDITION_SUCCEEDED",
                    message=f"Execution completed successfully in {self.duration_s:.0f}s.",
                )
            conditions.insert(0, completed)
        if done_at is not None:
            body["completionTime"] = timestamp(done_at)
        body.update(counts, conditions=conditions)
        return body


def log_uri(project: str, job: LocalRunJob, execution: str) -> str:
    query = (
        f'resource.type="cloud_run_job"\nresource.labels.job_name="{job.name}"\n'
        f'resource.labels.location="{job.region}"\nlabels."run.googleapis.com/execution_name"="{execution}"'
    )
    return f"https://console.cloud.google.com/logs/viewer?project={project}&advancedFilter={quote(query)}"


class LocalRunJob:
    """A Cloud Run job. Knobs (plain attributes, settable any time): `task_seconds`, how long
    an execution's tasks run; `failing_tasks`, how many tasks of the next executions fail."""

    def __init__(
        self,
        name: str,
        region: str,
        *,
        project: str,
        service_account: str,
        task_count: int = 1,
        task_seconds: float = 1.0,
        timeout_s: int = 600,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.region = region
        self.project = project
        self.service_account = service_account
        self.task_count = task_count
        self.task_seconds = task_seconds
        self.timeout_s = timeout_s
        self.failing_tasks = 0
        self.containers: list[dict[str, Any]] = [
            {
                "name": "job",
                "image": f"{region}-docker.pkg.dev/{project}/jobs/{name}:latest",
                "args": list(args or []),
                "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
            }
        ]
        self.created_at = time.time()
        self._lock = threading.Lock()
        self._executions: list[LocalExecution] = []

    @property
    def resource(self) -> str:
        return f"projects/{self.project}/locations/{self.region}/jobs/{self.name}"

    @property
    def executions(self) -> list[LocalExecution]:
        """Every execution ever started, oldest first."""
        with self._lock:
            return list(self._executions)

    def execution(self, short_name: str) -> LocalExecution | None:
        with self._lock:
            return next((e for e in self._executions if e.short_name == short_name), None)

    def start(self, creator: str, overrides: dict[str, Any]) -> LocalExecution:
        """A new execution with `overrides` applied (raises ValueError for a bad override)."""
        containers = [dict(c, env=list(c["env"]), args=list(c["args"])) for c in self.containers]
        for override in overrides.get("containerOverrides") or []:
            name = override.get("name")
            matching = [c for c in containers if not name or c["name"] == name]
            if not matching:
                raise ValueError(f"container {name!r} is not in job {self.name!r}")
            target = matching[0]
            if override.get("clearArgs"):
                target["args"] = []
            if override.get("args"):
                target["args"] = [str(a) for a in override["args"]]
            for env in override.get("env") or []:
                target["env"] = [e for e in target["env"] if e["name"] != env["name"]]
                target["env"].append({"name": env["name"], "value": env.get("value", "")})
        task_count = int(overrides.get("taskCount") or self.task_count)
        if not 1 <= task_count <= MAX_TASK_COUNT:
            raise ValueError(f"taskCount must be between 1 and {MAX_TASK_COUNT}")
        timeout_s = self.timeout_s
        if overrides.get("timeout"):
            match = _DURATION_RE.match(str(overrides["timeout"]))
            if not match or not 1 <= int(match.group(1)) <= MAX_TIMEOUT_S:
                raise ValueError(f"timeout must be a duration between 1s and {MAX_TIMEOUT_S}s")
            timeout_s = int(match.group(1))
        with self._lock:
            suffix = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(5))
            execution = LocalExecution(
                name=f"{self.resource}/executions/{self.name}-{suffix}",
                job=self,
                creator=creator,
                task_count=task_count,
                timeout_s=timeout_s,
                containers=containers,
                failing=self.failing_tasks,
                duration_s=self.task_seconds,
            )
            self._executions.append(execution)
        return execution

    def cancel(self, execution: LocalExecution) -> None:
        with self._lock:
            if execution.completed_at(time.time()) is None:
                execution.cancelled_at = time.time()

    def to_json(self, now: float) -> dict[str, Any]:
        executions = self.executions
        body: dict[str, Any] = {
            "name": self.resource,
            "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, self.resource)),
            "generation": "1",
            "createTime": timestamp(self.created_at),
            "updateTime": timestamp(self.created_at),
            "creator": "dev@example.com",
            "launchStage": "GA",
            "template": {
                "taskCount": self.task_count,
                "parallelism": self.task_count,
                "template": {
                    "containers": self.containers,
                    "maxRetries": 0,
                    "timeout": f"{self.timeout_s}s",
                    "serviceAccount": self.service_account,
                },
            },
            "observedGeneration": "1",
            "terminalCondition": {
                "type": "Ready",
                "state": "CONDITION_SUCCEEDED",
                "lastTransitionTime": timestamp(self.created_at),
            },
            "executionCount": len(executions),
            "etag": f'"{uuid.uuid5(uuid.NAMESPACE_URL, self.resource).hex[:16]}"',
        }
        if executions:
            body["latestCreatedExecution"] = {
                "name": executions[-1].short_name,
                "createTime": timestamp(executions[-1].created_at),
            }
        return body
